//! Adaptive concurrency against a real upstream that slows down as it gets busier:
//! the limit converges down and the excess is shed with 503.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use legate_tests::*;

const WAIT: Duration = Duration::from_secs(20);

fn stat(name: &str) -> String {
    format!("legate_cluster_{name}{{cluster=\"backend\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_converges_under_an_overloaded_upstream() {
    // Each request takes 20ms per request in flight: latency grows with concurrency.
    let busy = Arc::new(AtomicUsize::new(0));
    let b = busy.clone();
    let up = upstream()
        .name("slow")
        .handler(move |_req: Request<Incoming>| {
            let b = b.clone();
            async move {
                let n = b.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20 * n as u64)).await;
                b.fetch_sub(1, Ordering::SeqCst);
                Response::new(Full::new(Bytes::from_static(b"ok\n")))
            }
        })
        .start()
        .await;
    let cluster = "    adaptive_concurrency:
      sample_window: 20ms
      min_rtt_interval: 1h
      min_rtt_samples: 10
      min_concurrency: 2
      initial_concurrency: 40
      max_concurrency: 40
";
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", cluster))
        .start();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, shed, overloaded_header) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = client(Proto::H1, lg.addr("web")).await;
        let (stop, ok, shed, hdr) = (
            stop.clone(),
            ok.clone(),
            shed.clone(),
            overloaded_header.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let r = c.get("/").send().await;
                match r.status.as_u16() {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    503 => {
                        if r.header("x-legate-overloaded") == Some("true") {
                            hdr.store(true, Ordering::SeqCst);
                        }
                        // Back off a little so shed requests do not spin.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        shed.fetch_add(1, Ordering::SeqCst)
                    }
                    s => panic!("unexpected status {s}"),
                };
            }
        }));
    }

    // minRTT is measured (limit pinned at 2), then the limit starts at 40 and the
    // latency at 16 in flight (8× that at 2) drives it down. Below 16 the latency is
    // 20ms × limit, so the limit settles where limit ≈ 1.25·minRTT/20ms + √limit:
    // about 5 to 11 for a minRTT of 40ms (2 in flight) plus up to 80ms of overhead on
    // a busy machine, well under the 16 clients and the 40 it started from.
    eventually(WAIT, "minRTT measured", || async {
        (lg.stat(&stat("adaptive_concurrency_min_rtt_ms")).await > Some(0.0)).then_some(())
    })
    .await;
    let limit = eventually(WAIT, "the limit to fall to 12 or less", || async {
        let l = lg.stat(&stat("adaptive_concurrency_limit")).await?;
        (2.0..=12.0).contains(&l).then_some(l)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(limit >= 2.0);
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert!(shed.load(Ordering::SeqCst) > 0);
    assert!(overloaded_header.load(Ordering::SeqCst));
    lg.assert_stat_with(
        &stat("adaptive_concurrency_rq_blocked"),
        |v| v >= 1.0,
        ">= 1",
    )
    .await;
    // Nothing is left counted in flight.
    lg.assert_stat(&stat("upstream_rq_active"), 0.0).await;
}
