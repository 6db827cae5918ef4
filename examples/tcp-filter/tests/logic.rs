//! tcp-filter's logic on the SDK's native harness: denied words close the
//! connection before reaching the upstream, redacted words are masked in
//! upstream data, bytes are counted per direction, the config is checked.

#![allow(clippy::unwrap_used)]

use legate_example_tcp_filter::TcpFilter;
use legate_sdk::log::Level;
use legate_sdk::testing::{Conn, NetworkFilterTest};
use legate_sdk::{NetworkAction, Peer};

const CONFIG: &str = r#"{"deny": ["DROP"], "redact": ["secret", "pin"]}"#;

#[test]
fn redacts_upstream_data_and_counts_bytes() {
    let mut t = NetworkFilterTest::<TcpFilter>::configure(CONFIG).unwrap();
    let mut c = t.connect(Conn::new());
    assert_eq!(c.new_connection(), NetworkAction::Continue);
    assert_eq!(c.downstream("get secret\n", false), NetworkAction::Continue);
    // Downstream data is not redacted.
    assert_eq!(c.sent_upstream(), b"get secret\n");
    assert_eq!(
        c.upstream("secret=1 pin=2 secretsecret\n", false),
        NetworkAction::Continue
    );
    assert_eq!(c.sent_downstream(), b"******=1 ***=2 ************\n");
    // Nothing to redact: passed unchanged.
    assert_eq!(c.upstream("ok\n", true), NetworkAction::Continue);
    assert_eq!(c.sent_downstream(), b"******=1 ***=2 ************\nok\n");
    c.close(Peer::Downstream);
    drop(c);
    let h = t.host();
    assert_eq!(h.counter("bytes_total", &["downstream"]), Some(11));
    assert_eq!(h.counter("bytes_total", &["upstream"]), Some(31));
    assert_eq!(h.counter("denied_total", &[]), Some(0));
    assert!(h.logged(Level::Info, "11 bytes in, 31 bytes out"));
}

#[test]
fn a_denied_word_closes_before_forwarding() {
    let mut t = NetworkFilterTest::<TcpFilter>::configure(CONFIG).unwrap();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("hello\n", false), NetworkAction::Continue);
    assert_eq!(c.downstream("DROP TABLE x;\n", false), NetworkAction::Close);
    assert!(c.is_closed());
    assert_eq!(c.sent_upstream(), b"hello\n");
    drop(c);
    assert_eq!(t.host().counter("denied_total", &[]), Some(1));
    // Only forwarded bytes are counted.
    assert_eq!(t.host().counter("bytes_total", &["downstream"]), Some(6));
}

#[test]
fn config_is_checked() {
    // No config: nothing denied or redacted.
    let mut t = NetworkFilterTest::<TcpFilter>::configure("null").unwrap();
    let mut c = t.connect(Conn::new());
    c.new_connection();
    assert_eq!(c.downstream("DROP", false), NetworkAction::Continue);
    drop(c);
    let e = NetworkFilterTest::<TcpFilter>::configure(r#"{"deny": [""]}"#)
        .err()
        .unwrap();
    assert!(e.contains("must not be empty"), "{e}");
    let e = NetworkFilterTest::<TcpFilter>::configure(r#"{"redact": "pin"}"#)
        .err()
        .unwrap();
    assert!(e.contains("field `redact`"), "{e}");
}
