//! `listeners[].http.compression`: gzip (and brotli and zstd, when offered) for clients
//! that accept it, with real upstreams, over HTTP/1.1 and HTTP/2; a streamed
//! response is not held back.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use http_body_util::BodyExt;
use legate_tests::*;
use tokio::sync::Notify;

fn stat(name: &str) -> String {
    format!("legate_listener_{name}{{listener=\"web\"}}")
}

fn gunzip(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut s)
        .unwrap();
    s
}

fn page() -> String {
    (0..400)
        .map(|i| format!("<p>line {i} of a page</p>\n"))
        .collect()
}

/// `simple_config` with `http.compression: {settings}`.
fn config(up: std::net::SocketAddr, settings: &str) -> String {
    simple_config(&[up]).replacen(
        "      routes: main\n",
        &format!("      routes: main\n      compression: {settings}\n"),
        1,
    )
}

each_proto!(
    async fn a_page_is_gzipped_for_a_client_that_accepts_it(proto) {
        let up = upstream()
            .route("/page", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from(page())));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("text/html; charset=utf-8"));
                r.headers_mut().insert("etag", HeaderValue::from_static("\"v7\""));
                r
            })
            .route("/logo", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from(page())));
                r.headers_mut().insert("content-type", HeaderValue::from_static("image/png"));
                r
            })
            .start()
            .await;
        let lg = legate().config(&config(up.addr, "{ level: 9 }")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/page").header("accept-encoding", "br;q=1, gzip;q=0.8").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert_eq!(r.header("etag"), Some("W/\"v7\""));
        assert_eq!(gunzip(&r.body), page());
        assert!(r.body.len() * 10 < page().len(), "{} of {}", r.body.len(), page().len());
        lg.assert_stat(&stat("compressed_total"), 1.0).await;
        lg.assert_stat(&stat("compression_bytes_in_total"), page().len() as f64).await;
        lg.assert_stat(&stat("compression_bytes_out_total"), r.body.len() as f64).await;

        // HEAD: the head the GET got, no body.
        let r = c
            .request(Method::HEAD, "/page")
            .header("accept-encoding", "gzip")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(r.header("etag"), Some("W/\"v7\""));
        assert_eq!(r.header("content-length"), None);
        assert!(r.body.is_empty());
        // Not accepted: as it was, but with `vary`.
        let r = c.get("/page").send().await;
        assert_eq!(r.header("content-encoding"), None);
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert_eq!(r.text(), page());
        lg.assert_stat(&stat("compression_not_accepted_total"), 1.0).await;
        // Not a listed type: as it was.
        let r = c.get("/logo").header("accept-encoding", "gzip").send().await;
        assert_eq!(r.header("content-encoding"), None);
        assert_eq!(r.text(), page());
        lg.assert_stat(&stat("compressed_total"), 1.0).await;
    }
);

each_proto!(
    /// Each chunk the upstream sends reaches the client compressed before the
    /// next one is sent (the encoder is flushed per chunk).
    async fn a_streamed_response_is_not_held_back(proto) {
        let next = Arc::new(Notify::new());
        let gate = next.clone();
        let up = upstream()
            .route("/events", move |_req| {
                let gate = gate.clone();
                async move {
                    let s = futures_util::stream::iter(["first chunk\n", "second chunk\n"])
                        .enumerate()
                        .then(move |(i, chunk)| {
                            let gate = gate.clone();
                            async move {
                                if i > 0 {
                                    gate.notified().await;
                                }
                                Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(
                                    chunk.as_bytes(),
                                )))
                            }
                        });
                    let mut r = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(s)));
                    r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain"));
                    r
                }
            })
            .start()
            .await;
        let lg = legate().config(&config(up.addr, "{}")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let resp = c.get("/events").header("accept-encoding", "gzip").send_for_head().await;
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        // Until the first chunk decompresses whole, the second is not sent.
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        while !String::from_utf8_lossy(decoder.get_ref()).contains("first chunk\n") {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("the first chunk, flushed")
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
                std::io::Write::write_all(&mut decoder, &data).unwrap();
                std::io::Write::flush(&mut decoder).unwrap();
            }
        }
        next.notify_one();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(gunzip(&got), "first chunk\nsecond chunk\n");
    }
);

each_proto!(
    /// A route with `compression: false` is left alone (its type is listed).
    async fn a_route_can_turn_compression_off(proto) {
        let up = upstream()
            .route("/page", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from(page())));
                r.headers_mut().insert("content-type", HeaderValue::from_static("text/html"));
                r
            })
            .start()
            .await;
        let cfg = simple_config_with(&[up.addr], "            compression: false\n", "").replacen(
            "      routes: main\n",
            "      routes: main\n      compression: {}\n",
            1,
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/page").header("accept-encoding", "gzip").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), None);
        assert_eq!(r.header("vary"), None);
        assert!(r.text() == page(), "not the page as it was");
        assert_eq!(lg.stat(&stat("compressed_total")).await, Some(0.0));
    }
);

each_proto!(
    /// `compression.brotli`: a client that accepts `br` at least as much as
    /// gzip gets brotli (a browser's `gzip, deflate, br, zstd`), one that
    /// prefers gzip gets gzip; without `brotli` in the config, gzip.
    async fn brotli_for_a_client_that_accepts_it_when_offered(proto) {
        let up = upstream()
            .route("/page", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from(page())));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("text/html"));
                r
            })
            .start()
            .await;
        let lg = legate()
            .config(&config(up.addr, "{ brotli: { quality: 5, window_bits: 20 } }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/page")
            .header("accept-encoding", "gzip, deflate, br, zstd")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("br"));
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        let mut plain = String::new();
        brotli::Decompressor::new(&r.body[..], 4096)
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, page());
        assert!(r.body.len() * 10 < page().len(), "{} of {}", r.body.len(), page().len());
        let r = c
            .get("/page")
            .header("accept-encoding", "br;q=0.5, gzip")
            .send()
            .await;
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(gunzip(&r.body), page());
        lg.assert_stat(&stat("compressed_total"), 2.0).await;

        // Not offered: a client that accepts both gets gzip.
        let lg = legate().config(&config(up.addr, "{}")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/page")
            .header("accept-encoding", "gzip, deflate, br, zstd")
            .send()
            .await;
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(gunzip(&r.body), page());
    }
);

each_proto!(
    /// `compression.zstd`: a browser's `gzip, deflate, br, zstd` gets zstd
    /// when both zstd and brotli are offered, a client weighting brotli
    /// higher gets brotli, one without `zstd` gets brotli or gzip; the answer
    /// to a `HEAD` names the coding a `GET` gets.
    async fn zstd_for_a_client_that_accepts_it_when_offered(proto) {
        let up = upstream()
            .route("/page", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from(page())));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("text/html"));
                r
            })
            .start()
            .await;
        let lg = legate()
            .config(&config(up.addr, "{ brotli: {}, zstd: { level: 5, window_bits: 17 } }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let browser = "gzip, deflate, br, zstd";
        let r = c.get("/page").header("accept-encoding", browser).send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some("zstd"));
        assert_eq!(r.header("vary"), Some("accept-encoding"));
        assert_eq!(r.header("content-length"), None);
        assert_eq!(zstd::decode_all(&r.body[..]).unwrap(), page().as_bytes());
        assert!(r.body.len() * 10 < page().len(), "{} of {}", r.body.len(), page().len());
        // The frame asks for the configured window (2^17), no more.
        let mut d = zstd::stream::raw::Decoder::new().unwrap();
        d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(17)).unwrap();
        let mut out = vec![0u8; page().len() + 1];
        let done = zstd::stream::raw::Operation::run_on_buffers(&mut d, &r.body, &mut out).unwrap();
        assert_eq!(&out[..done.bytes_written], page().as_bytes());

        let head = c.request(Method::HEAD, "/page").header("accept-encoding", browser).send().await;
        assert_eq!(head.header("content-encoding"), Some("zstd"));
        let r = c
            .get("/page")
            .header("accept-encoding", "zstd;q=0.5, br;q=0.8, gzip;q=0.1")
            .send()
            .await;
        assert_eq!(r.header("content-encoding"), Some("br"));
        let r = c.get("/page").header("accept-encoding", "gzip, br").send().await;
        assert_eq!(r.header("content-encoding"), Some("br"));
        lg.assert_stat(&stat("compressed_total"), 3.0).await;
        assert_eq!(
            lg.stat(&stat("compression_bytes_in_total")).await,
            Some(3.0 * page().len() as f64)
        );

        // Not offered: a browser gets brotli where it is offered, else gzip.
        let lg = legate().config(&config(up.addr, "{}")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/page").header("accept-encoding", browser).send().await;
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(gunzip(&r.body), page());
        let r = c.get("/page").header("accept-encoding", "zstd").send().await;
        assert_eq!(r.header("content-encoding"), None);
        assert!(r.text() == page(), "not the page as it was");
    }
);
