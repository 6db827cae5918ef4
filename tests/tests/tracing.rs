//! Distributed tracing with real sockets (docs/config.md, `tracing`): the app
//! upstream sees Legate's trace context (W3C `traceparent` and B3, Legate's span
//! as the parent), a sampled request's Zipkin span reaches a collector (a
//! harness upstream recording its POSTs), an unsampled one is propagated
//! without a span, and a collector that is down costs no request anything.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use legate_tests::*;

/// The client's context in the tests that continue a trace.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

const SAMPLED: &str = "legate_tracing_spans_sampled_total";
const REPORTED: &str = "legate_tracing_spans_reported_total";
const DROPPED: &str = "legate_tracing_spans_dropped_total";
const FAILURES: &str = "legate_tracing_report_failures_total";

/// What the collector received: (path, content-type, the spans of each POST).
type Posts = Arc<Mutex<Vec<(String, String, Value)>>>;

/// A collector: records each POST to `/api/v2/spans`, answers 202 as Zipkin does.
async fn collector(posts: &Posts) -> UpstreamHandle {
    let posts = posts.clone();
    upstream()
        .name("zipkin")
        .route("/api/v2/spans", move |req: Request<Incoming>| {
            let posts = posts.clone();
            async move {
                let path = req.uri().path().to_string();
                let ct = req
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let spans: Value = serde_json::from_slice(&body).unwrap();
                posts.lock().unwrap().push((path, ct, spans));
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::ACCEPTED;
                resp
            }
        })
        .start()
        .await
}

fn config(app: SocketAddr, collector: SocketAddr, sampling: &str) -> String {
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
          - name: api
            match: {{ prefix: / }}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: \"{app}\" }}]
  - name: zipkin
    endpoints: [{{ address: \"{collector}\" }}]
tracing:
  collector_cluster: zipkin
  service_name: edge
  random_sampling: {sampling}
  flush_interval: 10ms
"
    )
}

/// Every span the collector received so far.
fn spans(posts: &Posts) -> Vec<Value> {
    posts
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(_, _, s)| s.as_array().unwrap().clone())
        .collect()
}

/// Waits until the collector has `n` spans; returns them.
async fn wait_spans(posts: &Posts, n: usize) -> Vec<Value> {
    eventually(HANG_GUARD, "the collector to receive the spans", || async {
        let s = spans(posts);
        (s.len() >= n).then_some(s)
    })
    .await
}

/// The parts of a `traceparent`: (trace id, parent id, flags).
fn traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p[0], "00", "{v}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

each_proto!(
    async fn a_sampled_request_makes_a_span_and_the_app_is_its_child(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let lg = legate()
            .config(&config(app.addr, zipkin.addr, "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello?x=1").host("shop.example").send().await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        // The app sees one context, Legate's, in both formats.
        let (trace, span, flags) = traceparent(e.header("traceparent").unwrap());
        assert_eq!(flags, "01");
        assert_eq!(trace.len(), 32);
        assert_eq!(e.header("x-b3-traceid"), Some(trace.as_str()));
        assert_eq!(e.header("x-b3-spanid"), Some(span.as_str()));
        assert_eq!(e.header("x-b3-sampled"), Some("1"));
        assert_eq!(e.header("x-b3-parentspanid"), None);
        let request_id = e.header("x-request-id").unwrap().to_string();

        let got = wait_spans(&posts, 1).await;
        assert_eq!(got.len(), 1, "{got:#?}");
        let s = &got[0];
        assert_eq!(s["traceId"], trace.as_str());
        assert_eq!(s["id"], span.as_str());
        assert!(s.get("parentId").is_none(), "{s:#}");
        assert_eq!(s["name"], "api");
        assert_eq!(s["kind"], "SERVER");
        assert!(s["timestamp"].as_u64().unwrap() > 1_600_000_000_000_000, "{s:#}");
        assert!(s["duration"].as_u64().unwrap() >= 1, "{s:#}");
        let web = lg.addr("web");
        assert_eq!(
            s["localEndpoint"],
            json!({"serviceName": "edge", "ipv4": "127.0.0.1", "port": web.port()})
        );
        assert_eq!(s["remoteEndpoint"]["ipv4"], "127.0.0.1");
        assert!(s["remoteEndpoint"]["port"].as_u64().is_some(), "{s:#}");
        let tags = &s["tags"];
        assert_eq!(tags["http.method"], "GET");
        assert_eq!(tags["http.url"], "http://shop.example/hello?x=1");
        assert_eq!(tags["http.protocol"], format!("{:?}", proto.version()));
        assert_eq!(tags["http.status_code"], "200");
        assert_eq!(tags["upstream_cluster"], "app");
        assert_eq!(tags["upstream_address"], app.addr.to_string());
        assert_eq!(tags["request_size"], "0");
        assert_eq!(tags["response_size"], r.body.len().to_string());
        assert_eq!(tags["guid:x-request-id"], request_id.as_str());
        assert!(tags.get("error").is_none(), "{s:#}");
        assert!(tags.get("legate.cause").is_none(), "{s:#}");
        assert!(tags.get("response_flags").is_none(), "{s:#}");
        let (path, ct, _) = posts.lock().unwrap()[0].clone();
        assert_eq!(path, "/api/v2/spans");
        assert_eq!(ct, "application/json");

        lg.assert_stat(SAMPLED, 1.0).await;
        lg.assert_stat(REPORTED, 1.0).await;
        lg.assert_stat(DROPPED, 0.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        // Through the cluster's own path: its counters saw the POST.
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="zipkin"}"#, 1.0)
            .await;
        assert_families_documented(&lg.stats().await);
    }
);

each_proto!(
    async fn an_incoming_traceparent_is_continued(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        // No random sampling: the client's decision is what samples.
        let lg = legate().config(&config(app.addr, zipkin.addr, "0%")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/a")
            .header("traceparent", &format!("00-{TRACE}-{CLIENT_SPAN}-01"))
            .header("tracestate", "congo=t61rcWkgMzE")
            .header("x-b3-spanid", "1111111111111111")
            .send()
            .await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        let (trace, span, flags) = traceparent(e.header("traceparent").unwrap());
        assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
        assert_ne!(span, CLIENT_SPAN);
        assert_eq!(e.header_all("traceparent").len(), 1);
        assert_eq!(e.header("tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(e.header("x-b3-traceid"), Some(TRACE));
        assert_eq!(e.header("x-b3-spanid"), Some(span.as_str()));
        assert_eq!(e.header("x-b3-parentspanid"), Some(CLIENT_SPAN));

        let got = wait_spans(&posts, 1).await;
        assert_eq!(got[0]["traceId"], TRACE);
        assert_eq!(got[0]["id"], span.as_str());
        assert_eq!(got[0]["parentId"], CLIENT_SPAN);
        lg.assert_stat(SAMPLED, 1.0).await;
    }
);

each_proto!(
    async fn an_unsampled_request_is_propagated_without_a_span(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let lg = legate()
            .config(&config(app.addr, zipkin.addr, "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // B3's "not sampled" without ids: a new trace, not sampled.
        let r = c.get("/b3").header("x-b3-sampled", "0").send().await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        let (_, span, flags) = traceparent(e.header("traceparent").unwrap());
        assert_eq!(flags, "00");
        assert_eq!(e.header("x-b3-sampled"), Some("0"));
        assert_eq!(e.header("x-b3-spanid"), Some(span.as_str()));
        // W3C's: the trace goes on, not sampled.
        let r = c
            .get("/w3c")
            .header("traceparent", &format!("00-{TRACE}-{CLIENT_SPAN}-00"))
            .send()
            .await;
        let e = r.echo();
        let (trace, _, flags) = traceparent(e.header("traceparent").unwrap());
        assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "00"));
        assert_eq!(e.header("x-b3-sampled"), Some("0"));
        assert_eq!(e.header("x-b3-parentspanid"), Some(CLIENT_SPAN));
        // Then a sampled one: once its span is in, the two before it would
        // have been sent in the same or an earlier batch.
        let r = c.get("/sampled").send().await;
        assert_eq!(r.status, 200);
        let got = wait_spans(&posts, 1).await;
        assert_eq!(got.len(), 1, "{got:#?}");
        let url = got[0]["tags"]["http.url"].as_str().unwrap();
        assert!(url.ends_with("/sampled"), "{url}");
        lg.assert_stat(SAMPLED, 1.0).await;
        lg.assert_stat(REPORTED, 1.0).await;
    }
);

each_proto!(
    async fn a_collector_that_is_down_costs_no_request(proto) {
        let app = upstream().name("app").start().await;
        let lg = legate()
            .config(&config(app.addr, closed_port_addr(), "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..3 {
            let r = c.get(&format!("/{i}")).send().await;
            assert_eq!(r.status, 200);
            // Still propagated.
            assert!(r.echo().header("traceparent").is_some());
        }
        lg.assert_stat(SAMPLED, 3.0).await;
        eventually(HANG_GUARD, "the failed reports to be counted", || async {
            let failures = lg.stat(FAILURES).await.unwrap_or(0.0);
            let dropped = lg.stat(DROPPED).await.unwrap_or(0.0);
            (failures >= 1.0 && dropped == 3.0).then_some(())
        })
        .await;
        lg.assert_stat(REPORTED, 0.0).await;
        // And the proxy still answers.
        assert_eq!(c.get("/after").send().await.status, 200);
    }
);

each_proto!(
    async fn a_collector_answering_an_error_loses_only_its_batch(proto) {
        let app = upstream().name("app").start().await;
        let zipkin = upstream().name("zipkin").status(503).start().await;
        let lg = legate()
            .config(&config(app.addr, zipkin.addr, "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200);
        eventually(HANG_GUARD, "the failed report to be counted", || async {
            (lg.stat(FAILURES).await == Some(1.0)).then_some(())
        })
        .await;
        lg.assert_stat(DROPPED, 1.0).await;
        lg.assert_stat(REPORTED, 0.0).await;
    }
);

each_proto!(
    async fn a_client_gone_before_the_response_makes_a_499_span(proto) {
        // The span is finished where the access-log line is written, so the
        // request the client abandons has one too, as its line does.
        let app = upstream()
            .name("app")
            .delay(std::time::Duration::from_secs(30))
            .start()
            .await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let lg = legate()
            .config(&config(app.addr, zipkin.addr, "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let req = tokio::spawn(async move { c.get("/gone").try_send().await });
        eventually(HANG_GUARD, "the request upstream", || async {
            (app.in_flight.get() == 1).then_some(())
        })
        .await;
        req.abort();
        let got = wait_spans(&posts, 1).await;
        let tags = &got[0]["tags"];
        assert_eq!(tags["http.status_code"], "499", "{tags:#}");
        assert_eq!(tags["legate.cause"], "downstream_disconnect", "{tags:#}");
        assert_eq!(tags["response_flags"], "DC", "{tags:#}");
        assert_eq!(tags["error"], "true", "{tags:#}");
        assert_eq!(tags["upstream_cluster"], "app", "{tags:#}");
        assert_eq!(got[0]["name"], "api");
    }
);

each_proto!(
    async fn tracing_follows_a_reload(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let traced = config(app.addr, zipkin.addr, "100%");
        let untraced = traced.split("tracing:").next().unwrap().to_string();
        let lg = legate().config(&untraced).from_file().start();
        let clients = format!("00-{TRACE}-{CLIENT_SPAN}-01");
        let sent_upstream = |lg_addr| {
            let clients = clients.clone();
            async move {
                let mut c = client(proto, lg_addr).await;
                let r = c.get("/r").header("traceparent", &clients).send().await;
                assert_eq!(r.status, 200);
                let e = r.echo();
                (
                    e.header("traceparent").map(str::to_string),
                    e.header("x-b3-spanid").map(str::to_string),
                )
            }
        };
        // Without `tracing`, the client's header goes on untouched.
        let (tp, b3) = sent_upstream(lg.addr("web")).await;
        assert_eq!(tp.as_deref(), Some(clients.as_str()));
        assert_eq!(b3, None);
        lg.reload_ok(&traced).await;
        let (tp, b3) = sent_upstream(lg.addr("web")).await;
        let (trace, span, _) = traceparent(&tp.unwrap());
        assert_eq!(trace, TRACE);
        assert_eq!(b3.as_deref(), Some(span.as_str()));
        let got = wait_spans(&posts, 1).await;
        assert_eq!(got[0]["id"], span.as_str());
        lg.reload_ok(&untraced).await;
        let (tp, b3) = sent_upstream(lg.addr("web")).await;
        assert_eq!(tp.as_deref(), Some(clients.as_str()));
        assert_eq!(b3, None);
        lg.assert_stat(SAMPLED, 1.0).await;
    }
);

each_proto!(
    async fn a_route_with_tracing_false_is_passed_on_untraced(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let cfg = config(app.addr, zipkin.addr, "100%").replace(
            "          - name: api\n",
            "          - name: probe\n            match: { path: /healthz }\n            cluster: app\n            tracing: false\n          - name: api\n",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let clients = format!("00-{TRACE}-{CLIENT_SPAN}-01");
        let r = c
            .get("/healthz")
            .header("traceparent", &clients)
            .header("x-b3-sampled", "1")
            .send()
            .await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        // As the client sent them: no span of Legate's in between.
        assert_eq!(e.header("traceparent"), Some(clients.as_str()));
        assert_eq!(e.header("x-b3-sampled"), Some("1"));
        assert_eq!(e.header("x-b3-spanid"), None);
        // The other routes of the table are traced; once their span is in,
        // the probe's would have been too.
        let r = c.get("/other").header("traceparent", &clients).send().await;
        let (trace, span, _) = traceparent(r.echo().header("traceparent").unwrap());
        assert_eq!(trace, TRACE);
        assert_ne!(span, CLIENT_SPAN);
        let got = wait_spans(&posts, 1).await;
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(got[0]["name"], "api");
        lg.assert_stat(SAMPLED, 1.0).await;
    }
);

each_proto!(
    /// A graceful stop sends what waits: a span the reporter would have sent
    /// a minute later reaches the collector before the process exits.
    async fn a_graceful_stop_sends_the_spans_still_waiting(proto) {
        let app = upstream().name("app").start().await;
        let posts = Posts::default();
        let zipkin = collector(&posts).await;
        let cfg = config(app.addr, zipkin.addr, "100%").replace("flush_interval: 10ms", "flush_interval: 1m");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/late").send().await.status, 200);
        lg.assert_stat(SAMPLED, 1.0).await;
        drop(c);
        assert!(spans(&posts).is_empty());
        lg.shutdown_and_wait().await.unwrap();
        let s = spans(&posts);
        assert_eq!(s.len(), 1, "{s:?}");
        let url = s[0]["tags"]["http.url"].as_str().unwrap();
        assert!(url.ends_with("/late"), "{url}");
    }
);

each_proto!(
    /// A collector that hangs: requests go on at once while its batch waits,
    /// the batch fails at its 5 s and is counted, and once the collector
    /// answers again the next batch is reported: one bad batch loses only
    /// itself.
    async fn a_hanging_collector_loses_only_its_batch(proto) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let app = upstream().name("app").start().await;
        let hang = Arc::new(AtomicBool::new(true));
        let posts = Posts::default();
        let zipkin = {
            let (hang, posts) = (hang.clone(), posts.clone());
            upstream()
                .name("zipkin")
                .route("/api/v2/spans", move |req: Request<Incoming>| {
                    let (hang, posts) = (hang.clone(), posts.clone());
                    async move {
                        if hang.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let spans: Value = serde_json::from_slice(&body).unwrap();
                        posts.lock().unwrap().push((String::new(), String::new(), spans));
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = StatusCode::ACCEPTED;
                        resp
                    }
                })
                .start()
                .await
        };
        let lg = legate()
            .config(&config(app.addr, zipkin.addr, "100%"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/first").send().await.status, 200);
        eventually(HANG_GUARD, "the batch to be sent", || async {
            (zipkin.in_flight.get() == 1).then_some(())
        })
        .await;
        // The reporter waits on the collector; requests do not.
        for _ in 0..3 {
            assert_eq!(c.get("/meanwhile").send().await.status, 200);
        }
        eventually(HANG_GUARD, "the hung report to be counted", || async {
            (lg.stat(FAILURES).await == Some(1.0)).then_some(())
        })
        .await;
        hang.store(false, Ordering::SeqCst);
        assert_eq!(c.get("/after").send().await.status, 200);
        // (The batch of the three sent meanwhile may have gone before the
        // collector recovered, and failed too: which one is a race.)
        let urls = eventually(HANG_GUARD, "the span of /after", || async {
            let urls: Vec<String> = spans(&posts)
                .iter()
                .map(|s| s["tags"]["http.url"].as_str().unwrap().to_string())
                .collect();
            urls.iter().any(|u| u.ends_with("/after")).then_some(urls)
        })
        .await;
        assert!(!urls.iter().any(|u| u.ends_with("/first")), "{urls:?}");
        lg.assert_stat(SAMPLED, 5.0).await;
        // Every span is either reported (the collector has it) or counted as
        // dropped; the counters follow the collector's answer.
        let dropped = eventually(HANG_GUARD, "every span counted", || async {
            let reported = lg.stat(REPORTED).await.unwrap_or(0.0);
            let dropped = lg.stat(DROPPED).await.unwrap_or(0.0);
            let received = spans(&posts).len() as f64;
            (reported + dropped == 5.0 && reported == received).then_some(dropped)
        })
        .await;
        assert!(dropped >= 1.0, "{dropped}");
    }
);
