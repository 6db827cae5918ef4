//! Priority levels with real upstreams: the backup level takes the traffic when the
//! primary one fails its health checks and gives it back when it recovers, and a
//! retry whose primaries were all tried goes to the backup.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use legate_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn stat(name: &str) -> String {
    format!("legate_cluster_{name}{{cluster=\"backend\"}}")
}

/// A config routing everything to `backend`, whose `endpoints` are (address,
/// priority), with `cluster_extra` and `route_extra` (indented YAML lines).
fn config(
    endpoints: &[(std::net::SocketAddr, u32)],
    cluster_extra: &str,
    route_extra: &str,
) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, p)| format!("      - {{ address: \"{addr}\", priority: {p} }}\n"))
        .collect();
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
{route_extra}clusters:
  - name: backend
{cluster_extra}    endpoints:
{endpoints}"
    )
}

each_proto!(
    async fn the_backup_level_serves_while_the_primaries_fail(proto) {
        let primaries_ok = Arc::new(AtomicBool::new(true));
        let always = Arc::new(AtomicBool::new(true));
        let a = health_checked("a", &primaries_ok).await;
        let b = health_checked("b", &primaries_ok).await;
        let backup = health_checked("backup", &always).await;
        let cfg = config(
            &[(a.addr, 0), (b.addr, 0), (backup.addr, 1)],
            "    health_check: { http: { path: /healthz }, interval: 30ms }\n",
            "",
        );
        let lg = legate().config(&cfg).start();
        let mut cl = client(proto, lg.addr("web")).await;
        let seen = spread(&mut cl, "/", 20).await;
        assert_eq!(
            (seen.get("a"), seen.get("b"), seen.get("backup")),
            (Some(&10), Some(&10), None),
            "{seen:?}"
        );

        // Both primaries fail: the backup takes everything.
        primaries_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "primaries out", || async {
            (lg.stat(&stat("membership_healthy")).await == Some(1.0)).then_some(())
        })
        .await;
        let seen = spread(&mut cl, "/", 20).await;
        assert_eq!(seen.get("backup"), Some(&20), "{seen:?}");

        // They recover: the backup is left alone again.
        primaries_ok.store(true, Ordering::SeqCst);
        eventually(WAIT, "primaries back", || async {
            (lg.stat(&stat("membership_healthy")).await == Some(3.0)).then_some(())
        })
        .await;
        let seen = spread(&mut cl, "/", 20).await;
        assert_eq!(seen.get("backup"), None, "{seen:?}");
        // The level was never in panic: the backup could take the whole load.
        assert_eq!(lg.stat(&stat("lb_healthy_panic")).await, Some(0.0));
        let (status, clusters) = lg.admin_get("/clusters").await;
        assert_eq!(status, 200);
        let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
        let priorities: Vec<u64> = clusters["clusters"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["priority"].as_u64().unwrap())
            .collect();
        assert_eq!(priorities, [0, 0, 1]);
    }
);

each_proto!(
    /// Half the primaries fail: with the default overprovisioning (140%) their
    /// level scores 70, so about 30% of the traffic goes to the backup.
    async fn a_partly_failed_primary_level_spills_its_lost_share(proto) {
        let b_ok = Arc::new(AtomicBool::new(true));
        let always = Arc::new(AtomicBool::new(true));
        let a = health_checked("a", &always).await;
        let b = health_checked("b", &b_ok).await;
        let backup = health_checked("backup", &always).await;
        let cfg = config(
            &[(a.addr, 0), (b.addr, 0), (backup.addr, 1)],
            "    health_check: { http: { path: /healthz }, interval: 30ms }\n",
            "",
        );
        let lg = legate().config(&cfg).start();
        b_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "b out", || async {
            (lg.stat(&stat("membership_healthy")).await == Some(2.0)).then_some(())
        })
        .await;
        let mut cl = client(proto, lg.addr("web")).await;
        let seen = spread(&mut cl, "/", 400).await;
        assert_eq!(seen.get("b"), None, "{seen:?}");
        let to_backup = seen.get("backup").copied().unwrap_or(0);
        // 30% of 400 is 120; the bounds are over 5 standard deviations wide.
        assert!((70..=170).contains(&to_backup), "{seen:?}");
    }
);

each_proto!(
    /// A retry after the only primary failed goes to the backup, although the
    /// primary still passes its (absent) health checks.
    async fn a_retry_goes_to_the_backup_when_the_primaries_were_tried(proto) {
        let failing = upstream()
            .name("primary")
            .route("/", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from_static(b"down\n")));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            })
            .start()
            .await;
        let backup = upstream().name("backup").start().await;
        let cfg = config(
            &[(failing.addr, 0), (backup.addr, 1)],
            "",
            "            retry: { retry_on: [5xx], num_retries: 1, backoff_base: 1ms }\n",
        );
        let lg = legate().config(&cfg).start();
        let mut cl = client(proto, lg.addr("web")).await;
        for _ in 0..5 {
            let r = cl.get("/").send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-upstream"), Some("backup"));
        }
        assert_eq!(lg.stat(&stat("upstream_rq_retry")).await, Some(5.0));
    }
);
