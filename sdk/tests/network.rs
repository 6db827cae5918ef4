//! Network (L4) filters on the SDK's runtime and native harness, written the
//! way users write them: events only when declared, data rewriting, close,
//! pause (buffering without a callout, blocking with one), callouts from
//! connections and ticks (each instance its own), the connection's facts,
//! config errors and host errors as `Result`s.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_sdk::callout::{self, CalloutId, CalloutRequest, CalloutResponse};
use legate_sdk::metrics::Counter;
use legate_sdk::testing::{Conn, NetworkFilterTest, TestHost};
use legate_sdk::{
    Body, Connection, Direction, Error, NetworkAction, NetworkEvent, NetworkFilter, NetworkSetup,
    Peer, TlsVersion,
};
use serde::Deserialize;

// ------------------------------------------------------------ a line filter

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineConfig {
    /// Upper-case downstream lines.
    upper: bool,
    #[serde(default)]
    quit: Option<String>,
}

/// Holds downstream data until a full line is there, then forwards it
/// (upper-cased if configured); a line equal to `quit` closes. Upstream data
/// has `o` replaced by `0`. Counts closes per peer and lines per connection.
struct Lines {
    upper: bool,
    quit: Option<Vec<u8>>,
    closes: Counter,
    seen_data_in_close: bool,
}

#[derive(Default)]
struct LineCtx {
    lines: u32,
}

impl NetworkFilter for Lines {
    type Config = LineConfig;
    type Context = LineCtx;

    fn configure(c: LineConfig) -> Result<Self, String> {
        let closes = Counter::define("closes_total", "closes", &["peer"])
            .map_err(|e| format!("closes_total: {e}"))?;
        Ok(Lines {
            upper: c.upper,
            quit: c.quit.map(String::into_bytes),
            closes,
            seen_data_in_close: false,
        })
    }

    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new()
            .on_downstream_data()
            .on_upstream_data()
            .on_close()
    }

    fn on_downstream_data(
        &mut self,
        ctx: &mut LineCtx,
        conn: &Connection<'_>,
        data: &Body<'_>,
        _eos: bool,
    ) -> NetworkAction {
        let bytes = data.to_vec();
        // The same buffer through the connection.
        assert_eq!(conn.data(Direction::Request).unwrap().to_vec(), bytes);
        assert!(conn.data(Direction::Response).is_none());
        if bytes.last() != Some(&b'\n') {
            return NetworkAction::Pause;
        }
        ctx.lines += 1;
        if self.quit.as_deref() == Some(&bytes[..bytes.len() - 1]) {
            return NetworkAction::Close;
        }
        if self.upper && data.replace(bytes.to_ascii_uppercase()).is_err() {
            return NetworkAction::Close;
        }
        NetworkAction::Continue
    }

    fn on_upstream_data(
        &mut self,
        _: &mut LineCtx,
        _: &Connection<'_>,
        data: &Body<'_>,
        _eos: bool,
    ) -> NetworkAction {
        let out: Vec<u8> = data
            .to_vec()
            .into_iter()
            .map(|b| if b == b'o' { b'0' } else { b })
            .collect();
        match data.replace(out) {
            Ok(()) => NetworkAction::Continue,
            Err(_) => NetworkAction::Close,
        }
    }

    fn on_close(&mut self, ctx: &mut LineCtx, conn: &Connection<'_>, peer: Peer) {
        self.seen_data_in_close |= conn.data(Direction::Request).is_some();
        let label = match peer {
            Peer::Downstream => "downstream",
            Peer::Upstream => "upstream",
        };
        let lines = ctx.lines.to_string();
        legate_sdk::info!("{label} closed after {lines} lines");
        if let Ok(c) = self.closes.with_labels(&[label]) {
            c.inc();
        }
    }
}

#[test]
fn pause_without_a_callout_buffers_until_the_filter_continues() {
    let mut t = NetworkFilterTest::<Lines>::configure(r#"{"upper": true}"#).unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Continue); // undeclared
    assert!(c.is_connected());
    assert_eq!(c.downstream("hel", false), NetworkAction::Pause);
    assert_eq!(c.held(Peer::Downstream).as_deref(), Some(&b"hel"[..]));
    assert!(!c.may_pause(), "a pause with nothing outstanding");
    assert_eq!(c.sent_upstream(), b"");
    // Called again with everything held so far plus the new bytes.
    assert_eq!(c.downstream("lo\n", false), NetworkAction::Continue);
    assert_eq!(c.sent_upstream(), b"HELLO\n");
    assert_eq!(c.held(Peer::Downstream), None);
    assert_eq!(c.upstream("foo", false), NetworkAction::Continue);
    assert_eq!(c.sent_downstream(), b"f00");
    assert_eq!(c.state().lines, 1);
}

#[test]
fn close_closes_both_sides_and_notifies_each_once() {
    let mut t =
        NetworkFilterTest::<Lines>::configure(r#"{"upper": false, "quit": "bye"}"#).unwrap();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("one\n", false), NetworkAction::Continue);
    assert_eq!(c.downstream("bye\n", false), NetworkAction::Close);
    assert!(c.is_closed());
    // Nothing more reaches the filter or either side.
    assert_eq!(c.downstream("two\n", false), NetworkAction::Close);
    assert_eq!(c.upstream("late", false), NetworkAction::Close);
    c.close(Peer::Downstream); // already closed: not notified again
    assert_eq!(c.sent_upstream(), b"one\n");
    assert_eq!(c.sent_downstream(), b"");
    drop(c);
    let h = t.host();
    assert_eq!(h.counter("closes_total", &["downstream"]), Some(1));
    assert_eq!(h.counter("closes_total", &["upstream"]), Some(1));
    assert!(h.logged(
        legate_sdk::log::Level::Info,
        "downstream closed after 2 lines"
    ));
    // Outside a data call there is no data.
    assert!(!t.filter().seen_data_in_close);
}

#[test]
fn a_side_that_never_opened_gets_no_close() {
    let mut t = NetworkFilterTest::<Lines>::configure(r#"{"upper": false}"#).unwrap();
    let mut c = t.connect(Conn::new());
    // Closed before `new_connection` connected upstream.
    c.close(Peer::Downstream);
    c.close(Peer::Upstream);
    assert!(c.is_closed());
    drop(c);
    assert_eq!(t.host().counter("closes_total", &["downstream"]), Some(1));
    // The series does not exist: never recorded into.
    assert_eq!(t.host().counter("closes_total", &["upstream"]), None);
}

#[test]
fn config_errors_name_the_field() {
    let e = NetworkFilterTest::<Lines>::configure(r#"{"upper": "yes"}"#)
        .err()
        .unwrap();
    assert!(e.contains("field `upper`"), "{e}");
    let e = NetworkFilterTest::<Lines>::configure(r#"{"upper": true, "extra": 1}"#)
        .err()
        .unwrap();
    assert!(e.contains("extra"), "{e}");
    // `null` does not make a `LineConfig` (`upper` is required).
    assert!(NetworkFilterTest::<Lines>::configure("null").is_err());
}

// ----------------------------------------------------- callouts and ticks

/// Asks cluster `authz` on each new connection and on the first data of
/// each direction; ticks count, and every third tick sends a callout.
struct Gate {
    ticks: u32,
    tick_answers: Vec<u16>,
    refused: Option<Error>,
}

#[derive(Default)]
struct GateCtx {
    asked: [bool; 2],
    upstream_at_resume: Option<SocketAddr>,
}

fn ask(path: &str) -> Result<CalloutId, Error> {
    callout::send(&CalloutRequest::new("authz", "GET", path))
}

impl NetworkFilter for Gate {
    type Config = ();
    type Context = GateCtx;

    fn configure(_: ()) -> Result<Self, String> {
        Ok(Gate {
            ticks: 0,
            tick_answers: Vec::new(),
            refused: None,
        })
    }

    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new()
            .on_new_connection()
            .on_downstream_data()
            .on_upstream_data()
            .tick_every_ms(50)
    }

    fn on_new_connection(&mut self, _: &mut GateCtx, conn: &Connection<'_>) -> NetworkAction {
        assert!(conn.upstream_address().is_none());
        match ask("/connect") {
            Ok(_) => NetworkAction::Pause,
            Err(e) => {
                self.refused = Some(e);
                NetworkAction::Close
            }
        }
    }

    fn on_downstream_data(
        &mut self,
        ctx: &mut GateCtx,
        _: &Connection<'_>,
        _: &Body<'_>,
        _: bool,
    ) -> NetworkAction {
        if ctx.asked[0] {
            return NetworkAction::Continue;
        }
        ctx.asked[0] = true;
        match ask("/data") {
            Ok(_) => NetworkAction::Pause,
            Err(_) => NetworkAction::Close,
        }
    }

    fn on_callout_response(
        &mut self,
        ctx: &mut GateCtx,
        conn: &Connection<'_>,
        _: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        // Held data is not visible outside its data call.
        assert!(conn.data(Direction::Request).is_none());
        ctx.upstream_at_resume = conn.upstream_address();
        match response {
            Ok(r) if r.status == 200 => NetworkAction::Continue,
            _ => NetworkAction::Close,
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(3) {
            let _ = ask("/tick");
        }
    }

    fn on_tick_callout_response(&mut self, _: CalloutId, r: Result<CalloutResponse, Error>) {
        self.tick_answers.push(r.map_or(0, |r| r.status));
    }
}

fn ok() -> Result<CalloutResponse, Error> {
    Ok(CalloutResponse::new(200, "ok"))
}

#[test]
fn a_paused_connection_resumes_on_the_callout_response() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure_network::<Gate>("null").unwrap();
    assert!(t.setup().declares(NetworkEvent::NewConnection));
    assert_eq!(t.setup().tick_interval_ms(), 50);
    let mut c = t.connect(Conn::new().upstream("10.0.0.9:5432".parse().unwrap()));
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    assert!(c.may_pause());
    assert!(!c.is_connected());
    // Nothing queued for `authz` yet: nothing delivered.
    assert!(c.deliver_callouts().is_empty());
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Continue]);
    assert!(c.is_connected());
    // The response ran before connecting.
    assert_eq!(c.state().upstream_at_resume, None);

    // The first data pauses on a callout: the direction is blocked, later
    // data is queued (not delivered) and the other direction flows.
    assert_eq!(c.downstream("a", false), NetworkAction::Pause);
    assert_eq!(c.downstream("b", false), NetworkAction::Pause);
    assert_eq!(c.held(Peer::Downstream).as_deref(), Some(&b"a"[..]));
    assert_eq!(c.upstream("up", false), NetworkAction::Continue);
    assert_eq!(c.sent_downstream(), b"up");
    assert_eq!(c.sent_upstream(), b"");
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Continue]);
    assert_eq!(c.sent_upstream(), b"ab");
    assert_eq!(
        c.state().upstream_at_resume,
        Some("10.0.0.9:5432".parse().unwrap())
    );
    let sent = host.callouts();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].request.path, "/connect");
    assert_eq!(sent[1].request.path, "/data");
    assert!(sent.iter().all(|s| !s.outstanding));
}

#[test]
fn a_denied_callout_closes_and_an_ungranted_cluster_is_an_error() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure_network::<Gate>("null").unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    host.queue_callout_response("authz", Ok(CalloutResponse::new(403, "no")));
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Close]);
    assert!(c.is_closed() && !c.is_connected());
    assert_eq!(c.downstream("x", false), NetworkAction::Close);
    assert_eq!(c.sent_upstream(), b"");

    // Without the capability, `send` returns `Denied` (no panic, no trap).
    let mut t = NetworkFilterTest::<Gate>::configure("null").unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Close);
    drop(c);
    assert_eq!(t.filter().refused, Some(Error::Denied));
}

#[test]
fn closing_cancels_outstanding_callouts() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure_network::<Gate>("null").unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    c.close_all();
    host.queue_callout_response("authz", ok());
    assert!(c.deliver_callouts().is_empty());
    let sent = host.callouts();
    assert!(sent[0].cancelled && !sent[0].outstanding);
}

#[test]
fn ticks_and_their_callouts() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure_network::<Gate>("null").unwrap();
    for _ in 0..3 {
        t.tick();
    }
    assert_eq!(t.filter().ticks, 3);
    let sent = host.callouts();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].context, None, "sent from on_tick");
    assert_eq!(t.deliver_tick_callouts(), 0, "no response queued yet");
    host.queue_callout_response("authz", Ok(CalloutResponse::new(204, "")));
    assert_eq!(t.deliver_tick_callouts(), 1);
    assert_eq!(t.filter().tick_answers, vec![204]);
}

#[test]
fn callouts_belong_to_the_instance_that_sent_them() {
    let host = TestHost::new().grant_cluster("authz");
    let mut a = host.configure_network::<Gate>("null").unwrap();
    let mut b = host.configure_network::<Gate>("null").unwrap();
    let mut ca = a.connect(Conn::new());
    let mut cb = b.connect(Conn::new());
    // Two instances: the same context id, two connections.
    assert_eq!(ca.context(), cb.context());
    assert_eq!(ca.new_connection(), NetworkAction::Pause);
    assert_eq!(cb.new_connection(), NetworkAction::Pause);
    let (id_a, id_b) = (host.callouts()[0].id, host.callouts()[1].id);
    host.queue_callout_response("authz", ok());
    assert_eq!(cb.deliver_callout(id_a, ok()), None);
    assert_eq!(cb.deliver_callouts(), vec![NetworkAction::Continue]);
    assert!(cb.is_connected() && !ca.is_connected());
    assert!(host.callouts()[0].outstanding && !host.callouts()[1].outstanding);
    assert!(ca.may_pause() && !cb.may_pause());
    assert_eq!(ca.deliver_callout(id_b, ok()), None);
    assert_eq!(
        ca.deliver_callout(id_a, ok()),
        Some(NetworkAction::Continue)
    );
    drop((ca, cb));

    // `on_tick`'s callouts too.
    for _ in 0..3 {
        a.tick();
    }
    host.queue_callout_response("authz", ok());
    assert_eq!(b.deliver_tick_callouts(), 0);
    assert_eq!(a.deliver_tick_callouts(), 1);
}

// ------------------------------------------------------------- facts

#[derive(Default)]
struct Facts {
    seen: Vec<String>,
}

impl NetworkFilter for Facts {
    type Config = ();
    type Context = ();

    fn configure(_: ()) -> Result<Self, String> {
        // Metrics can be defined here; recording works anywhere.
        Counter::define("facts_total", "facts", &[]).map_err(|e| e.to_string())?;
        Ok(Facts::default())
    }

    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new().on_new_connection()
    }

    fn on_new_connection(&mut self, _: &mut (), c: &Connection<'_>) -> NetworkAction {
        self.seen.push(format!(
            "{} {} {} {} {:?} {:?} {} {:?} {:?} {}",
            c.id() > 0,
            c.listener_name(),
            c.source_address(),
            c.destination_address(),
            c.tls_version(),
            c.tls_sni(),
            c.tls_peer_certificate_presented(),
            c.tls_peer_subject(),
            c.cluster(),
            c.start_time() > 0,
        ));
        // Outside `configure`, defining a metric is an error, not a panic.
        match Counter::define("late_total", "late", &[]) {
            Err(Error::InvalidState) => NetworkAction::Continue,
            _ => NetworkAction::Close,
        }
    }
}

#[test]
fn the_connection_shows_its_facts() {
    let mut t = NetworkFilterTest::<Facts>::configure("null").unwrap();
    let mut c = t.connect(
        Conn::new()
            .listener("db")
            .source("198.51.100.7:4000".parse().unwrap())
            .tls(TlsVersion::Tls13, Some("db.example"))
            .peer_subject("CN=client")
            .cluster(Some("postgres")),
    );
    assert_eq!(c.new_connection(), NetworkAction::Continue);
    drop(c);
    let mut c2 = t.connect(Conn::new().cluster(None));
    assert_eq!(c2.new_connection(), NetworkAction::Continue);
    drop(c2);
    assert_eq!(
        t.filter().seen,
        vec![
            "true db 198.51.100.7:4000 192.0.2.2:9000 Some(Tls13) Some(\"db.example\") true \
             Some(\"CN=client\") Some(\"postgres\") true"
                .to_owned(),
            "true tcp 192.0.2.1:50000 192.0.2.2:9000 None None false None None true".to_owned(),
        ]
    );
    assert!(!t.host().metric_defined("late_total"));
}
