//! Network (L4) filters on the SDK's runtime and native harness, written the
//! way users write them: events only when declared, data rewriting, close,
//! pause (buffering without a callout, blocking with one), callouts from
//! connections and ticks (each instance its own), the connection's facts,
//! config errors and host errors as `Result`s, and the host's failures (a
//! pause nothing could end) under either failure policy.

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
    assert_eq!(
        e,
        "invalid config: field `upper`: invalid type: string \"yes\", expected a boolean"
    );
    let e = NetworkFilterTest::<Lines>::configure(r#"{"upper": true, "extra": 1}"#)
        .err()
        .unwrap();
    assert!(e.contains("extra"), "{e}");
    // `null` does not make a `LineConfig` (`upper` is required).
    assert_eq!(
        NetworkFilterTest::<Lines>::configure("null")
            .err()
            .as_deref(),
        Some("invalid config: missing field `upper` (the plugin has no `config`)")
    );
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

// ------------------------------------------------------------- failures

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StallConfig {
    /// What `on_new_connection` does: `pause` (nothing sent), `ask` (a
    /// callout, then pause); anything else continues.
    #[serde(default)]
    new: String,
    /// What each callout response returns, in order (`pause`, `close`;
    /// `continue` once the list is used up).
    #[serde(default)]
    replies: Vec<String>,
}

/// Pauses as its data tells it: `ask` sends a callout and pauses, `ask2`
/// two; `cancel` cancels the connection's callouts and continues; data
/// ending in `+` is held (buffering, no callout); the rest continues.
/// Records every call it gets.
struct Stalls {
    config: StallConfig,
    calls: Vec<String>,
}

#[derive(Default)]
struct StallCtx {
    sent: Vec<CalloutId>,
    replies: usize,
}

impl NetworkFilter for Stalls {
    type Config = StallConfig;
    type Context = StallCtx;

    fn configure(config: StallConfig) -> Result<Self, String> {
        Ok(Stalls {
            config,
            calls: Vec::new(),
        })
    }

    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new()
            .on_new_connection()
            .on_downstream_data()
            .on_upstream_data()
            .on_close()
    }

    fn on_new_connection(&mut self, ctx: &mut StallCtx, _: &Connection<'_>) -> NetworkAction {
        self.calls.push("new".to_owned());
        match self.config.new.as_str() {
            "pause" => NetworkAction::Pause,
            "ask" => {
                ctx.sent.push(ask("/new").unwrap());
                NetworkAction::Pause
            }
            _ => NetworkAction::Continue,
        }
    }

    fn on_downstream_data(
        &mut self,
        ctx: &mut StallCtx,
        _: &Connection<'_>,
        data: &Body<'_>,
        eos: bool,
    ) -> NetworkAction {
        self.stall(ctx, "downstream", data, eos)
    }

    fn on_upstream_data(
        &mut self,
        ctx: &mut StallCtx,
        _: &Connection<'_>,
        data: &Body<'_>,
        eos: bool,
    ) -> NetworkAction {
        self.stall(ctx, "upstream", data, eos)
    }

    fn on_close(&mut self, _: &mut StallCtx, _: &Connection<'_>, peer: Peer) {
        self.calls.push(format!("close {peer:?}"));
    }

    fn on_callout_response(
        &mut self,
        ctx: &mut StallCtx,
        _: &Connection<'_>,
        _: CalloutId,
        _: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        self.calls.push("reply".to_owned());
        let r = self.config.replies.get(ctx.replies).cloned();
        ctx.replies += 1;
        match r.as_deref() {
            Some("pause") => NetworkAction::Pause,
            Some("close") => NetworkAction::Close,
            _ => NetworkAction::Continue,
        }
    }
}

impl Stalls {
    fn stall(
        &mut self,
        ctx: &mut StallCtx,
        from: &str,
        data: &Body<'_>,
        eos: bool,
    ) -> NetworkAction {
        let bytes = String::from_utf8(data.to_vec()).unwrap();
        self.calls.push(format!("{from} {bytes} {eos}"));
        if bytes.contains("cancel") {
            for id in ctx.sent.drain(..) {
                let _ = callout::cancel(id);
            }
            return NetworkAction::Continue;
        }
        if bytes.contains("ask") {
            let n = if bytes.contains("ask2") { 2 } else { 1 };
            for _ in 0..n {
                ctx.sent.push(ask("/data").unwrap());
            }
            return NetworkAction::Pause;
        }
        if bytes.ends_with('+') {
            return NetworkAction::Pause;
        }
        NetworkAction::Continue
    }
}

fn stalls(config: &str, open: bool) -> NetworkFilterTest<Stalls> {
    TestHost::new()
        .grant_cluster("authz")
        .configure_network::<Stalls>(config)
        .unwrap()
        .fail_open(open)
}

/// The host's reasons (host/src/network_filter.rs `run_new`, `run_data`,
/// `settle`).
const NEW_PAUSE: &str =
    "paused the new connection with no callout outstanding: nothing could resume it";
const LEFT_PAUSED: &str = "paused with no callout outstanding: nothing could resume it";

fn end_pause(side: &str) -> String {
    format!(
        "paused at the end of the {side} stream with no callout outstanding: nothing could \
         resume it"
    )
}

#[test]
fn a_pause_at_the_end_of_a_stream_with_nothing_outstanding_fails() {
    // Fail closed: the connection closes, what the filter held is lost, and
    // the failed filter gets no `on_close`.
    let mut t = stalls("null", false);
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Continue);
    assert_eq!(c.upstream("u+", false), NetworkAction::Pause);
    assert_eq!(c.failure(), None, "buffering: more data may come");
    assert_eq!(c.downstream("a+", true), NetworkAction::Pause);
    assert_eq!(c.failure(), Some(end_pause("downstream").as_str()));
    assert!(c.is_closed());
    assert_eq!(c.held(Peer::Downstream), None);
    assert_eq!(c.downstream("more", false), NetworkAction::Close);
    assert_eq!((c.sent_upstream(), c.sent_downstream()), (vec![], vec![]));
    drop(c);
    assert_eq!(
        t.filter().calls,
        ["new", "upstream u+ false", "downstream a+ true"]
    );

    // Fail open: the filter is skipped for the rest of the connection; what
    // it held (both directions) goes on, later data passes untouched.
    let mut t = stalls("null", true);
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("d+", false), NetworkAction::Pause);
    assert_eq!(c.upstream("u+", true), NetworkAction::Pause);
    assert_eq!(c.failure(), Some(end_pause("upstream").as_str()));
    assert!(!c.is_closed());
    assert_eq!(c.sent_upstream(), b"d+");
    assert_eq!(c.sent_downstream(), b"u+");
    assert_eq!(c.held(Peer::Downstream), None);
    assert_eq!(c.downstream("ask+", false), NetworkAction::Continue);
    assert_eq!(c.sent_upstream(), b"d+ask+");
    c.close_all();
    assert!(c.is_closed());
    drop(c);
    assert_eq!(
        t.filter().calls,
        ["new", "downstream d+ false", "upstream u+ true"]
    );
    assert!(t.host().callouts().is_empty());
}

#[test]
fn a_pause_of_the_new_connection_with_nothing_outstanding_fails() {
    let mut t = stalls(r#"{"new": "pause"}"#, false);
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    assert_eq!(c.failure(), Some(NEW_PAUSE));
    assert!(c.is_closed() && !c.is_connected());
    drop(c);
    assert_eq!(t.filter().calls, ["new"]);

    // Fail open: connects past the skipped filter.
    let mut t = stalls(r#"{"new": "pause"}"#, true);
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    assert_eq!(c.failure(), Some(NEW_PAUSE));
    assert!(c.is_connected() && !c.is_closed());
    assert_eq!(c.downstream("x+", true), NetworkAction::Continue);
    assert_eq!(c.sent_upstream(), b"x+");
    drop(c);
    assert_eq!(t.filter().calls, ["new"]);

    // With a callout out, a pause.
    let mut t = stalls(r#"{"new": "ask"}"#, false);
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    assert_eq!(c.failure(), None);
    assert!(!c.is_closed() && !c.is_connected());
}

#[test]
fn a_callout_pause_left_with_nothing_outstanding_fails() {
    // The only reply returns `pause`: nothing could resume the connection.
    let mut t = stalls(r#"{"new": "ask", "replies": ["pause"]}"#, false);
    let host = t.host().clone();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Pause]);
    assert_eq!(c.failure(), Some(LEFT_PAUSED));
    assert!(c.is_closed() && !c.is_connected());
    drop(c);
    assert_eq!(t.filter().calls, ["new", "reply"]);

    // Fail open: the data held by the pause and the data queued meanwhile
    // go on; no more replies are delivered.
    let mut t = stalls(r#"{"replies": ["pause"]}"#, true);
    let host = t.host().clone();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("ask2", false), NetworkAction::Pause);
    assert_eq!(c.downstream("queued", false), NetworkAction::Pause);
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Pause]);
    assert_eq!(c.failure(), None, "the second callout is still out");
    assert_eq!(c.sent_upstream(), b"");
    let second = host.callouts()[1].id;
    assert_eq!(
        c.deliver_callout(second, ok()),
        Some(NetworkAction::Continue)
    );
    assert_eq!(c.sent_upstream(), b"ask2queued");

    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("ask", false), NetworkAction::Pause);
    assert_eq!(c.downstream("queued+", false), NetworkAction::Pause);
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Pause]);
    assert_eq!(c.failure(), Some(LEFT_PAUSED));
    assert!(!c.is_closed());
    assert_eq!(c.sent_upstream(), b"askqueued+");
    drop(c);
    // The data queued behind the failed pause passed untouched.
    assert_eq!(
        t.filter().calls,
        [
            "new",
            "downstream ask2 false",
            "reply",
            "reply",
            "downstream queued false",
            "new",
            "downstream ask false",
            "reply"
        ]
    );
}

#[test]
fn cancelling_the_callout_a_pause_waits_for_fails() {
    // The downstream pause waits for a callout the upstream call cancels.
    for open in [false, true] {
        let mut t = stalls("null", open);
        let mut c = t.connect(Conn::new());
        c.new_connection();
        assert_eq!(c.downstream("ask", false), NetworkAction::Pause);
        assert_eq!(c.upstream("cancel", false), NetworkAction::Continue);
        assert_eq!(c.failure(), Some(LEFT_PAUSED));
        assert_eq!(c.sent_downstream(), b"cancel");
        assert_eq!(c.is_closed(), !open);
        if open {
            assert_eq!(c.sent_upstream(), b"ask");
        } else {
            assert_eq!(c.sent_upstream(), b"");
        }
        drop(c);
        assert!(t.host().callouts()[0].cancelled);
    }
}

/// A hold with nothing outstanding is buffering, not a callout pause (the
/// host's pause slots): a callout the other direction sends later does not
/// block this direction, and a reply's `continue` does not release it.
#[test]
fn a_buffering_hold_is_not_a_callout_pause() {
    let mut t = stalls("null", false);
    let host = t.host().clone();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("a+", false), NetworkAction::Pause);
    assert_eq!(c.upstream("ask", false), NetworkAction::Pause);
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Continue]);
    // The reply resumed the upstream pause only.
    assert_eq!(c.sent_downstream(), b"ask");
    assert_eq!(c.sent_upstream(), b"");
    assert_eq!(c.held(Peer::Downstream).as_deref(), Some(&b"a+"[..]));
    assert_eq!(c.downstream("b", false), NetworkAction::Continue);
    assert_eq!(c.sent_upstream(), b"a+b");

    // Downstream is not blocked by the upstream's callout: the filter gets
    // what it holds and the new bytes (its pause then, with a callout out,
    // is a callout pause, which the reply resumes).
    assert_eq!(c.downstream("c+", false), NetworkAction::Pause);
    assert_eq!(c.upstream("ask", false), NetworkAction::Pause);
    assert_eq!(c.downstream("d+", false), NetworkAction::Pause);
    assert_eq!(c.held(Peer::Downstream).as_deref(), Some(&b"c+d+"[..]));
    host.queue_callout_response("authz", ok());
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Continue]);
    assert_eq!(c.sent_upstream(), b"a+bc+d+");
    assert_eq!(c.sent_downstream(), b"askask");
    assert_eq!(c.failure(), None);
}

#[test]
fn holding_more_than_limits_body_closes_the_connection() {
    // The host (network_filter.rs `over_cap`) closes a connection whose
    // filter holds more than its `limits.body` in one direction.
    let mut t = NetworkFilterTest::<Lines>::configure(r#"{"upper": false}"#)
        .unwrap()
        .body_limit(1024);
    let mut c = t.connect(Conn::new());
    c.new_connection();
    // Data passing through is not capped.
    let line = [vec![b'a'; 4000], b"\n".to_vec()].concat();
    assert_eq!(c.downstream(line.clone(), false), NetworkAction::Continue);
    assert_eq!(c.sent_upstream(), line);
    // Holding exactly the cap is fine.
    assert_eq!(c.downstream(vec![b'b'; 1024], false), NetworkAction::Pause);
    assert_eq!(c.held(Peer::Downstream).map(|h| h.len()), Some(1024));
    assert!(!c.is_closed());
    // One byte more is over it: closed, the held data is discarded, and
    // the filter (which did not fail) hears of both sides closing.
    assert_eq!(c.downstream("b", false), NetworkAction::Pause);
    assert!(c.is_closed());
    assert_eq!(c.limit_exceeded(), Some(Peer::Downstream));
    assert_eq!(c.failure(), None);
    assert_eq!(c.held(Peer::Downstream), None);
    assert_eq!(c.sent_upstream(), line);
    assert_eq!(c.downstream("more\n", false), NetworkAction::Close);
    drop(c);
    let host = t.host();
    assert_eq!(host.counter("closes_total", &["downstream"]), Some(1));
    assert_eq!(host.counter("closes_total", &["upstream"]), Some(1));

    // The default cap is the host's, 1 MiB.
    let mut t = NetworkFilterTest::<Lines>::configure(r#"{"upper": false}"#).unwrap();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(
        c.downstream(vec![b'x'; 1 << 20], false),
        NetworkAction::Pause
    );
    assert!(!c.is_closed());
    assert_eq!(c.downstream("x", false), NetworkAction::Pause);
    assert!(c.is_closed());
    assert_eq!(c.limit_exceeded(), Some(Peer::Downstream));
}

#[test]
fn a_pause_at_the_end_of_a_stream_over_the_cap_is_a_failure_not_the_cap() {
    // As on the host: the cap applies to a hold something could end; a
    // pause at the end of the stream with nothing outstanding fails first.
    let mut t = NetworkFilterTest::<Lines>::configure(r#"{"upper": false}"#)
        .unwrap()
        .body_limit(1024);
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream(vec![b'b'; 2000], true), NetworkAction::Pause);
    assert!(c.is_closed());
    assert_eq!(c.limit_exceeded(), None);
    assert!(c.failure().is_some());
}

#[test]
#[should_panic(expected = "between `1KiB` and `64MiB`")]
fn a_body_limit_the_host_refuses_is_refused() {
    let _ = NetworkFilterTest::<Lines>::configure(r#"{"upper": false}"#)
        .unwrap()
        .body_limit(100);
}

/// The host reads a callout response's body under a 1 MiB cap and delivers
/// a larger one as `Err(LimitExceeded)` (host/src/proxy.rs `callout`,
/// abi/README.md §7), to a connection's callout and a tick's alike.
#[test]
fn a_callout_response_over_1_mib_is_limit_exceeded() {
    let big = |len: usize| Ok(CalloutResponse::new(200, vec![b'x'; len]));
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure_network::<Gate>("null").unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Pause);
    host.queue_callout_response("authz", big(1 << 20));
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Continue]);
    assert_eq!(c.downstream("a", false), NetworkAction::Pause);
    host.queue_callout_response("authz", big((1 << 20) + 1));
    // Gate closes on anything but a 200.
    assert_eq!(c.deliver_callouts(), vec![NetworkAction::Close]);
    drop(c);

    for _ in 0..6 {
        t.tick();
    }
    host.queue_callout_response("authz", big((1 << 20) + 1));
    host.queue_callout_response("authz", big(1 << 20));
    assert_eq!(t.deliver_tick_callouts(), 2);
    assert_eq!(t.filter().tick_answers, vec![0, 200]);
}
