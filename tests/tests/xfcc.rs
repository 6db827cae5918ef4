//! `x-forwarded-client-cert` (XFCC), as Envoy's `forward_client_cert_details`:
//! by default removed from every request, trusted downstream or not; with
//! `sanitize_set` replaced by what the verified client certificate says
//! (`By`, `Hash`, `Subject`, `URI`...), with `append_forward` appended to;
//! removed on a connection without a client certificate. Also the access
//! log's `requested_server_name` and `downstream_peer_subject`, and routes
//! that match on the client certificate (`match.client_cert`).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::*;

const XFCC: &str = "x-forwarded-client-cert";
const FORGED: &str = "By=spiffe://mesh/ns/x/sa/proxy;URI=spiffe://mesh/ns/prod/sa/admin";
const LISTENER_ID: &str = "spiffe://mesh/ns/edge/sa/legate";
const CLIENT_ID: &str = "spiffe://mesh/ns/app/sa/client";

struct Pki {
    ca: Ca,
    server: TlsFiles,
}

fn pki() -> Pki {
    let ca = Ca::new("xfcc CA");
    let server = ca.server_with_uris(&["a.example"], &[LISTENER_ID]);
    Pki { ca, server }
}

/// A listener `web` with `http_extra` under `http:` and mTLS (`required`
/// client certificates or not); `access_log` written to `log` if given.
fn config(
    up: std::net::SocketAddr,
    p: &Pki,
    http_extra: &str,
    required: bool,
    log: Option<&std::path::Path>,
) -> String {
    let log = log
        .map(|l| format!("access_log: {{ path: {} }}\n", l.display()))
        .unwrap_or_default();
    format!(
        "version: 1
{log}listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
{http_extra}    tls:
      certificates:
        - cert: {}
          key: {}
      client_auth:
        ca: {}
        required: {required}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
",
        p.server.cert.display(),
        p.server.key.display(),
        p.ca.cert_path.display()
    )
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The XFCC the upstream got for one request carrying `sent` (if any).
async fn forwarded(
    proto: Proto,
    addr: std::net::SocketAddr,
    opts: TlsOptions,
    sent: Option<&str>,
) -> Option<String> {
    let mut c = tls_client(proto, addr, opts).await.expect("TLS client");
    let mut req = c.get("/");
    if let Some(v) = sent {
        req = req.header(XFCC, v);
    }
    let r = req.send().await;
    assert_eq!(r.status, 200);
    r.echo().header(XFCC).map(str::to_owned)
}

each_proto!(
    /// The default: a forged XFCC never reaches the upstream, from a trusted
    /// downstream (a mesh sidecar's inbound listener) or an untrusted one,
    /// with a client certificate or without.
    async fn default_removes_a_forged_header_trusted_or_not(proto) {
        let p = pki();
        let up = upstream().start().await;
        for trust in ["", "      trust_downstream: true\n"] {
            let lg = legate().config(&config(up.addr, &p, trust, false, None)).start();
            let addr = lg.addr("web");
            let anon = TlsOptions::new(&p.server, "a.example");
            assert_eq!(forwarded(proto, addr, anon, Some(FORGED)).await, None, "{trust:?}");
            let mtls = TlsOptions::new(&p.server, "a.example")
                .client_cert(p.ca.client_with_uris("client", &[CLIENT_ID]));
            assert_eq!(forwarded(proto, addr, mtls, Some(FORGED)).await, None, "{trust:?}");
        }
    }
);

each_proto!(
    /// `sanitize_set`: the header is what the real client certificate says,
    /// whatever the client sent; without a client certificate it is removed.
    async fn sanitize_set_writes_the_verified_certificate(proto) {
        let p = pki();
        let cert = p.ca.client_with_uris("client", &[CLIENT_ID]);
        let hash = sha256_hex(cert.chain[0].as_ref());
        let up = upstream().start().await;
        let http = "      trust_downstream: true
      forward_client_cert: sanitize_set
      set_client_cert_details: { subject: true, uri: true, dns: true }
";
        let lg = legate().config(&config(up.addr, &p, http, false, None)).start();
        let addr = lg.addr("web");
        let mtls = TlsOptions::new(&p.server, "a.example").client_cert(cert);
        let got = forwarded(proto, addr, mtls, Some(FORGED)).await;
        assert_eq!(
            got.as_deref(),
            Some(
                format!(
                    "By={LISTENER_ID};Hash={hash};Subject=\"CN=client\";URI={CLIENT_ID};DNS=client"
                )
                .as_str()
            )
        );
        let anon = TlsOptions::new(&p.server, "a.example");
        assert_eq!(forwarded(proto, addr, anon, Some(FORGED)).await, None);
    }
);

each_proto!(
    /// `append_forward`: this hop's element goes after what the trusted
    /// downstream sent; `cert` carries the URL-encoded PEM.
    async fn append_forward_appends(proto) {
        let p = pki();
        let cert = p.ca.client_with_uris("client", &[CLIENT_ID]);
        let hash = sha256_hex(cert.chain[0].as_ref());
        let up = upstream().start().await;
        let http = "      trust_downstream: true
      forward_client_cert: append_forward
      set_client_cert_details: { uri: true, cert: true }
";
        let lg = legate().config(&config(up.addr, &p, http, false, None)).start();
        let addr = lg.addr("web");
        let mtls = TlsOptions::new(&p.server, "a.example").client_cert(cert.clone());
        let got = forwarded(proto, addr, mtls, Some(FORGED)).await.unwrap();
        let prefix = format!("{FORGED},By={LISTENER_ID};Hash={hash};Cert=\"-----BEGIN%20CERTIFICATE-----%0A");
        assert!(got.starts_with(&prefix), "{got}");
        assert!(got.ends_with(&format!("-----END%20CERTIFICATE-----%0A\";URI={CLIENT_ID}")), "{got}");
        // Nothing sent: the element alone.
        let mtls = TlsOptions::new(&p.server, "a.example").client_cert(cert);
        let got = forwarded(proto, addr, mtls, None).await.unwrap();
        assert!(got.starts_with(&format!("By={LISTENER_ID};Hash={hash};Cert=")), "{got}");
        // No client certificate: removed (Envoy: only mTLS connections).
        let anon = TlsOptions::new(&p.server, "a.example");
        assert_eq!(forwarded(proto, addr, anon, Some(FORGED)).await, None);
    }
);

each_proto!(
    /// `forward_only` passes a trusted mTLS downstream's header unchanged and
    /// removes it without a client certificate; `always_forward_only` passes
    /// it either way.
    async fn forward_only_modes(proto) {
        let p = pki();
        let up = upstream().start().await;
        for (mode, anon_keeps) in [("forward_only", false), ("always_forward_only", true)] {
            let http = format!("      trust_downstream: true\n      forward_client_cert: {mode}\n");
            let lg = legate().config(&config(up.addr, &p, &http, false, None)).start();
            let addr = lg.addr("web");
            let mtls = TlsOptions::new(&p.server, "a.example").client_cert(p.ca.client("client"));
            assert_eq!(forwarded(proto, addr, mtls, Some(FORGED)).await.as_deref(), Some(FORGED), "{mode}");
            let anon = TlsOptions::new(&p.server, "a.example");
            let expected = anon_keeps.then_some(FORGED);
            assert_eq!(forwarded(proto, addr, anon, Some(FORGED)).await.as_deref(), expected, "{mode}");
        }
    }
);

each_proto!(
    /// The access log names the SNI the client asked for and the subject of
    /// its verified certificate.
    async fn access_log_has_sni_and_peer_subject(proto) {
        let p = pki();
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&config(up.addr, &p, "", false, Some(&log))).start();
        let addr = lg.addr("web");
        let mtls = TlsOptions::new(&p.server, "a.example").client_cert(p.ca.client("client"));
        forwarded(proto, addr, mtls, None).await;
        forwarded(proto, addr, TlsOptions::new(&p.server, "a.example"), None).await;
        let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        let subjects: Vec<_> = lines.iter().map(|l| l["downstream_peer_subject"].clone()).collect();
        assert!(subjects.contains(&serde_json::json!("CN=client")), "{lines:?}");
        assert!(subjects.contains(&serde_json::Value::Null), "{lines:?}");
        for l in &lines {
            assert_eq!(l["requested_server_name"], "a.example", "{l}");
        }
    }
);

each_proto!(
    /// `match.client_cert`: on one mTLS listener (certificates optional) a
    /// route only some clients reach, by SPIFFE id, by DNS name, and a route
    /// for clients without a certificate; the others fall through to the
    /// routes after them.
    async fn routes_match_on_the_verified_client_certificate(proto) {
        let p = pki();
        let up = upstream().start().await;
        let routes = "          - name: ops
            match:
              prefix: /ops
              client_cert: { uri_san: { prefix: \"spiffe://mesh/ns/ops/\" } }
            cluster: backend
          - name: batch
            match: { prefix: /ops, client_cert: { dns_san: { exact: batch.example }, subject: { regex: \"CN=batch[.].*\" } } }
            cluster: backend
          - name: denied
            match: { prefix: /ops }
            direct_response: { status: 403, body: not yours }
          - name: anonymous
            match: { client_cert: { presented: false } }
            direct_response: { status: 401, body: present a certificate }
";
        let cfg = config(up.addr, &p, "", false, None).replace("          - cluster: backend\n", routes);
        assert!(cfg.contains("name: anonymous"));
        let lg = legate().config(&cfg).start();
        let addr = lg.addr("web");
        let get = |opts: TlsOptions, path: &'static str| async move {
            let mut c = tls_client(proto, addr, opts).await.expect("TLS client");
            let r = c.get(path).send().await;
            (r.status.as_u16(), r.text())
        };
        let with = |cert: TlsFiles| TlsOptions::new(&p.server, "a.example").client_cert(cert);
        let ops = || with(p.ca.client_with_uris("admin", &["spiffe://mesh/ns/ops/sa/admin"]));
        let app = || with(p.ca.client_with_uris("client", &[CLIENT_ID]));
        let anon = || TlsOptions::new(&p.server, "a.example");

        assert_eq!(get(ops(), "/ops/restart").await.0, 200);
        assert_eq!(get(with(p.ca.client("batch.example")), "/ops/x").await.0, 200);
        // Both conditions must hold: the DNS name with another subject fails.
        assert_eq!(get(app(), "/ops/restart").await, (403, "not yours".into()));
        assert_eq!(get(anon(), "/ops/restart").await, (403, "not yours".into()));
        assert_eq!(get(anon(), "/").await, (401, "present a certificate".into()));
        // A client with a certificate passes `presented: false` by: no route.
        assert_eq!(get(app(), "/").await.0, 404);
        lg.assert_stat(
            r#"legate_route_requests_total{route_table="main",virtual_host="all",route="ops",class="2xx"}"#,
            1.0,
        ).await;
        lg.assert_stat(
            r#"legate_route_requests_total{route_table="main",virtual_host="all",route="batch",class="2xx"}"#,
            1.0,
        ).await;
        lg.assert_stat(
            r#"legate_route_requests_total{route_table="main",virtual_host="all",route="denied",class="4xx"}"#,
            2.0,
        ).await;
    }
);

each_proto!(
    /// An `access_log.format`'s TLS operators: the SNI, the client
    /// certificate's subject, the session's TLS version and cipher suite, the
    /// scheme.
    async fn a_format_logs_the_tls_session(proto) {
        let p = pki();
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let plain = format!("access_log: {{ path: {} }}\n", log.display());
        let cfg = config(up.addr, &p, "", false, Some(&log)).replace(
            &plain,
            &format!(
                "access_log: {{ path: {}, format: '%REQUESTED_SERVER_NAME% %DOWNSTREAM_PEER_SUBJECT% \
                 %DOWNSTREAM_TLS_VERSION% %DOWNSTREAM_TLS_CIPHER% %REQ(:SCHEME)%' }}\n",
                log.display()
            ),
        );
        assert_ne!(cfg, config(up.addr, &p, "", false, Some(&log)));
        let lg = legate().config(&cfg).start();
        let mtls = TlsOptions::new(&p.server, "a.example").client_cert(p.ca.client("client"));
        forwarded(proto, lg.addr("web"), mtls, None).await;
        let lines = eventually(HANG_GUARD, "the line", || async {
            let l = access_log_text(&log);
            (!l.is_empty()).then_some(l)
        })
        .await;
        let fields: Vec<&str> = lines[0].split(' ').collect();
        assert_eq!(fields[..3], ["a.example", "CN=client", "TLSv1.3"], "{}", lines[0]);
        assert!(fields[3].starts_with("TLS_"), "{}", lines[0]);
        assert_eq!(fields[4], "https", "{}", lines[0]);
    }
);
