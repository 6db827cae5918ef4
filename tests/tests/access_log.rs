//! The access log: a request whose client goes away before the response is
//! written as a 499 `downstream_disconnect` line and counted in the 4xx class.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use legate_tests::*;

each_proto!(
    async fn client_gone_before_the_response_is_logged(proto) {
        let up = upstream().delay(Duration::from_secs(5)).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = simple_config(&[up.addr]).replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let req = tokio::spawn(async move { c.get("/gone?x=1").try_send().await });
        eventually(Duration::from_secs(3), "request upstream", || async {
            (up.in_flight.get() == 1).then_some(())
        })
        .await;
        // The client gives up: its connection (HTTP/1.1) or stream (HTTP/2) ends.
        req.abort();
        let line = eventually(Duration::from_secs(3), "the access-log line", || async {
            std::fs::read_to_string(&log)
                .ok()
                .and_then(|s| s.lines().next().map(str::to_string))
        })
        .await;
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], 499, "{line}");
        assert_eq!(v["cause"], "downstream_disconnect", "{line}");
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["path"], "/gone?x=1", "{line}");
        assert_eq!(v["route"], "all/0", "{line}");
        assert_eq!(v["cluster"], "backend", "{line}");
        assert_eq!(v["bytes_sent"], 0, "{line}");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
        lg.assert_stat(
            r#"legate_route_requests_total{route="all/0",class="4xx"}"#,
            1.0,
        )
        .await;
    }
);
