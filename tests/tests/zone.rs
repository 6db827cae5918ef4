//! Zone-aware routing with real upstreams: the local zone takes the traffic while it
//! is whole, and spills to the other zone when part of it fails health checks.

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

/// A config in zone `z1` routing everything to `backend`: zone-aware with
/// `min_cluster_size`, health-checked every 30ms, panic mode off, with
/// `endpoints` (address, zone).
fn zoned_config(min_cluster_size: u32, endpoints: &[(std::net::SocketAddr, &str)]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, zone)| format!("      - {{ address: \"{addr}\", zone: {zone} }}\n"))
        .collect();
    format!(
        "version: 1
local_zone: z1
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
clusters:
  - name: backend
    zone_aware: {{ min_cluster_size: {min_cluster_size} }}
    health_check: {{ http: {{ path: /healthz }}, interval: 30ms }}
    panic_threshold: 0%
    endpoints:
{endpoints}"
    )
}

each_proto!(
    async fn local_zone_first_then_spill(proto) {
        let b_ok = Arc::new(AtomicBool::new(true));
        let always = Arc::new(AtomicBool::new(true));
        let a = health_checked("a", &always).await;
        let b = health_checked("b", &b_ok).await;
        let c = health_checked("c", &always).await;
        let cfg = zoned_config(3, &[(a.addr, "z1"), (b.addr, "z1"), (c.addr, "z2")]);
        let lg = legate().config(&cfg).start();
        let mut cl = client(proto, lg.addr("web")).await;
        let local = spread(&mut cl, "/", 20).await;
        assert_eq!((local.get("a"), local.get("b"), local.get("c")), (Some(&10), Some(&10), None), "{local:?}");
        lg.assert_stat_with(&stat("lb_zone_routing_all_directly"), |v| v >= 20.0, ">= 20")
            .await;

        // Half the local zone fails: about half the traffic spills to z2.
        b_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "b out", || async {
            (lg.stat(&stat("membership_healthy")).await == Some(2.0)).then_some(())
        })
        .await;
        let spilled = spread(&mut cl, "/", 60).await;
        assert_eq!(spilled.get("b"), None, "{spilled:?}");
        assert!(spilled.contains_key("a") && spilled.contains_key("c"), "{spilled:?}");
        lg.assert_stat_with(&stat("lb_zone_routing_sampled"), |v| v >= 1.0, ">= 1").await;
        lg.assert_stat_with(&stat("lb_zone_routing_cross_zone"), |v| v >= 1.0, ">= 1").await;
    }
);

each_proto!(
    /// The traffic that spills out of the local zone is shared evenly by the
    /// other zone's endpoints: round robin takes turns within each side even
    /// though picks alternate between the sides. (The rotation's cursor went on
    /// from the local pick, so the first endpoint of the other zone took about
    /// two thirds of its traffic: 134 against 71 of 400 requests.)
    async fn spilled_traffic_is_shared_evenly_by_the_other_zone(proto) {
        let a_ok = Arc::new(AtomicBool::new(true));
        let always = Arc::new(AtomicBool::new(true));
        let a = health_checked("a", &a_ok).await;
        let b = health_checked("b", &always).await;
        let c = health_checked("c", &always).await;
        let d = health_checked("d", &always).await;
        let cfg = zoned_config(
            1,
            &[(a.addr, "z1"), (b.addr, "z1"), (c.addr, "z2"), (d.addr, "z2")],
        );
        let lg = legate().config(&cfg).start();
        a_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "a out", || async {
            (lg.stat(&stat("membership_healthy")).await == Some(3.0)).then_some(())
        })
        .await;
        let mut cl = client(proto, lg.addr("web")).await;
        let seen = spread(&mut cl, "/", 400).await;
        assert_eq!(seen.get("a"), None, "{seen:?}");
        let (to_c, to_d) = (seen.get("c").copied(), seen.get("d").copied());
        let (to_c, to_d) = (to_c.unwrap_or(0), to_d.unwrap_or(0));
        assert!(to_c + to_d >= 100, "about half spills: {seen:?}");
        assert!(to_c.abs_diff(to_d) <= 1, "the other zone's share is uneven: {seen:?}");
        let cross = lg.stat(&stat("lb_zone_routing_cross_zone")).await.unwrap();
        assert_eq!(cross, (to_c + to_d) as f64);
    }
);
