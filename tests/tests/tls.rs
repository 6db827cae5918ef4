//! TLS: termination (certificate choice by SNI, minimum version, client
//! certificates) and origination towards upstreams (custom CA, SNI, client
//! certificate, ALPN).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::*;

struct Pki {
    ca: Ca,
    a: TlsFiles,
    b: TlsFiles,
}

fn pki() -> Pki {
    let ca = Ca::new("legate test CA");
    let a = ca.server(&["a.example", "fallback.example"]);
    let b = ca.server(&["b.example"]);
    Pki { ca, a, b }
}

fn tls_listener_config(up: std::net::SocketAddr, tls: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
    tls:
{tls}routes:
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
"
    )
}

fn certs_yaml(p: &Pki) -> String {
    format!(
        "      certificates:
        - cert: {}
          key: {}
          server_names: [a.example]
        - cert: {}
          key: {}
",
        p.a.cert.display(),
        p.a.key.display(),
        p.b.cert.display(),
        p.b.key.display()
    )
}

const TLS_ERRORS: &str = r#"legate_listener_tls_errors_total{listener="web"}"#;

each_proto!(
    async fn certificate_chosen_by_sni(proto) {
        let p = pki();
        let up = upstream().start().await;
        let lg = legate().config(&tls_listener_config(up.addr, &certs_yaml(&p))).start();
        let addr = lg.addr("web");
        for (sni, cert) in [("a.example", &p.a), ("b.example", &p.b), ("fallback.example", &p.a)] {
            let mut c = tls_client(proto, addr, TlsOptions::new(cert, sni))
                .await
                .unwrap_or_else(|e| panic!("TLS to {sni}: {e:#}"));
            assert_eq!(c.peer_cert.as_ref(), Some(&cert.chain[0]), "certificate for {sni}");
            let expected_alpn = match proto {
                Proto::H1 => "http/1.1",
                Proto::H2 => "h2",
            };
            assert_eq!(c.alpn.as_deref(), Some(expected_alpn));
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.version, proto.version());
            let e = r.echo();
            assert_eq!(e.header("x-forwarded-proto"), Some("https"));
            assert_eq!(e.header("host"), Some(sni));
        }
        // An untrusted client (other CA) fails verification of any of them.
        let other = Ca::new("other").server(&["a.example"]);
        assert!(tls_client(proto, addr, TlsOptions::new(&other, "a.example")).await.is_err());
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 3.0)
            .await;
        lg.assert_stat(TLS_ERRORS, 1.0).await;
        drop(p.ca);
    }
);

each_proto!(
    /// A listener serves a certificate whose key is encrypted
    /// (`key_password_file`); a renewal that replaces the certificate, the
    /// key and its password at the same paths applies to new connections.
    async fn an_encrypted_key_is_served_and_renewed_with_its_password(proto) {
        let p = pki();
        let (key, password) = p.a.write_encrypted_key("a.enc.key", "a.pass", "first password");
        let up = upstream().start().await;
        let tls = format!(
            "      certificates:
        - cert: {}
          key: {}
          key_password_file: {}
",
            p.a.cert.display(),
            key.display(),
            password.display()
        );
        let lg = legate().config(&tls_listener_config(up.addr, &tls)).from_file().start();
        let addr = lg.addr("web");
        let mut c = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example"))
            .await
            .expect("TLS to the encrypted key's certificate");
        assert_eq!(c.peer_cert.as_ref(), Some(&p.a.chain[0]));
        assert_eq!(c.get("/").send().await.status, 200);

        // The renewed certificate, its key encrypted with a new password.
        let renewed = p.ca.server(&["a.example"]);
        std::fs::copy(&renewed.cert, &p.a.cert).unwrap();
        renewed.write_encrypted_key("a.enc.key", "a.pass", "second password");
        let (status, body) = lg.admin_post("/reload").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("certificates_renewed"), "{body}");
        let mut c = tls_client(proto, addr, TlsOptions::new(&renewed, "a.example"))
            .await
            .expect("TLS to the renewed certificate");
        assert_eq!(c.peer_cert.as_ref(), Some(&renewed.chain[0]));
        assert_eq!(c.get("/").send().await.status, 200);
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(TLS_ERRORS, 0.0).await;
    }
);

each_proto!(
    /// `ocsp_staple`: the client is given the file's bytes with the
    /// certificate; a renewed response applies to new connections; one past
    /// its nextUpdate is not stapled.
    async fn the_ocsp_response_is_stapled_and_renewed(proto) {
        let p = pki();
        let staple = p.a.write_ocsp_response("a.ocsp", (2026, 1, 1), Some((2100, 1, 1)));
        let up = upstream().start().await;
        let tls = format!(
            "      certificates:
        - cert: {}
          key: {}
          ocsp_staple: {}
",
            p.a.cert.display(),
            p.a.key.display(),
            staple.display()
        );
        let lg = legate().config(&tls_listener_config(up.addr, &tls)).from_file().start();
        let addr = lg.addr("web");
        let stapled = || async {
            let mut c = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example")).await.unwrap();
            assert_eq!(c.get("/").send().await.status, 200);
            c.ocsp_response
        };
        let first = std::fs::read(&staple).unwrap();
        assert_eq!(stapled().await.as_deref(), Some(&first[..]));

        // A fresh response at the same path: new connections get it.
        p.a.write_ocsp_response("a.ocsp", (2026, 2, 1), Some((2100, 2, 1)));
        let second = std::fs::read(&staple).unwrap();
        assert_ne!(first, second);
        let (status, body) = lg.admin_post("/reload").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("certificates_renewed"), "{body}");
        assert_eq!(stapled().await.as_deref(), Some(&second[..]));

        // An expired one is left out; the certificate is still served.
        p.a.write_ocsp_response("a.ocsp", (2020, 1, 1), Some((2020, 2, 1)));
        assert_eq!(lg.admin_post("/reload").await.0, 200);
        assert_eq!(stapled().await, None);
        assert_eq!(up.requests.get(), 3);
        lg.assert_stat(TLS_ERRORS, 0.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_a_tls_listener_fails() {
    let p = pki();
    let up = upstream().start().await;
    let lg = legate()
        .config(&tls_listener_config(up.addr, &certs_yaml(&p)))
        .start();
    let out = raw(lg.addr("web"), b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n").await;
    assert!(
        !out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(up.requests.get(), 0);
    lg.assert_stat(TLS_ERRORS, 1.0).await;
}

each_proto!(
    async fn tls13_only(proto) {
        let p = pki();
        let up = upstream().start().await;
        let lg = legate()
            .config(&tls_listener_config(
                up.addr,
                &format!("{}      min_version: \"1.3\"\n", certs_yaml(&p)),
            ))
            .start();
        let addr = lg.addr("web");
        let r = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example").tls12_only()).await;
        assert!(r.is_err(), "a TLS 1.2-only client was accepted");
        let mut c = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example"))
            .await
            .expect("TLS 1.3 client");
        assert_eq!(c.tls_version.as_deref(), Some("TLSv1_3"));
        assert_eq!(c.get("/").send().await.status, 200);
        lg.assert_stat(TLS_ERRORS, 1.0).await;
    }
);

each_proto!(
    async fn tls12_is_accepted_by_default(proto) {
        let p = pki();
        let up = upstream().start().await;
        let lg = legate().config(&tls_listener_config(up.addr, &certs_yaml(&p))).start();
        let mut c = tls_client(proto, lg.addr("web"), TlsOptions::new(&p.a, "a.example").tls12_only())
            .await
            .expect("TLS 1.2 client");
        assert_eq!(c.tls_version.as_deref(), Some("TLSv1_2"));
        assert_eq!(c.get("/").send().await.status, 200);
    }
);

/// Whether a TLS client is refused: in TLS 1.3 the server rejects a client
/// certificate after the client considers the handshake done, so the refusal may
/// only show on the first request.
async fn refused(proto: Proto, addr: std::net::SocketAddr, opts: TlsOptions) -> bool {
    match tls_client(proto, addr, opts).await {
        Err(_) => true,
        Ok(mut c) => match c.get("/").try_send().await {
            Err(_) => true,
            Ok(r) => {
                assert_ne!(r.status, 200, "refused client got a 200");
                false
            }
        },
    }
}

each_proto!(
    async fn mtls_required(proto) {
        let p = pki();
        let client_cert = p.ca.client("client-1");
        let stranger = Ca::new("stranger CA").client("client-2");
        let up = upstream().start().await;
        let lg = legate()
            .config(&tls_listener_config(
                up.addr,
                &format!("{}      client_auth:\n        ca: {}\n", certs_yaml(&p), p.ca.cert_path.display()),
            ))
            .start();
        let addr = lg.addr("web");

        assert!(refused(proto, addr, TlsOptions::new(&p.a, "a.example")).await, "no client cert accepted");
        assert!(
            refused(proto, addr, TlsOptions::new(&p.a, "a.example").client_cert(stranger)).await,
            "client cert of another CA accepted"
        );
        assert_eq!(up.requests.get(), 0);

        let mut c = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example").client_cert(client_cert))
            .await
            .expect("mTLS client");
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(TLS_ERRORS, 2.0).await;
    }
);

each_proto!(
    async fn mtls_crl_refuses_revoked_clients_and_is_renewed(proto) {
        let p = pki();
        let kept = p.ca.client("kept");
        let revoked = p.ca.client("revoked");
        let crl = p.ca.crl("clients.crl", &[&revoked]);
        let up = upstream().start().await;
        let lg = legate()
            .config(&tls_listener_config(
                up.addr,
                &format!(
                    "{}      client_auth:\n        ca: {}\n        crl: {}\n",
                    certs_yaml(&p),
                    p.ca.cert_path.display(),
                    crl.display()
                ),
            ))
            .from_file()
            .start();
        let addr = lg.addr("web");
        let opts = |leaf: &TlsFiles| TlsOptions::new(&p.a, "a.example").client_cert(leaf.clone());

        assert!(refused(proto, addr, opts(&revoked)).await, "revoked client accepted");
        let mut c = tls_client(proto, addr, opts(&kept)).await.expect("client not revoked");
        assert_eq!(c.get("/").send().await.status, 200);
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(TLS_ERRORS, 1.0).await;

        // The CA publishes a new list revoking the other client too: a reload
        // of the unchanged config takes it, for new connections.
        p.ca.crl("clients.crl", &[&revoked, &kept]);
        let (status, body) = lg.admin_post("/reload").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("certificates_renewed"), "{body}");
        assert!(refused(proto, addr, opts(&kept)).await, "client revoked by the new list accepted");
        lg.assert_stat(TLS_ERRORS, 2.0).await;

        // A list past its nextUpdate refuses what it covers, as BoringSSL does.
        p.ca.expired_crl("clients.crl", &[]);
        assert_eq!(lg.admin_post("/reload").await.0, 200);
        assert!(refused(proto, addr, opts(&kept)).await, "expired list still trusted");
        lg.assert_stat(TLS_ERRORS, 3.0).await;
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    async fn upstream_crl_refuses_a_revoked_upstream(proto) {
        let p = pki();
        let server = p.ca.server(&["up.example"]);
        let crl = p.ca.crl("upstream.crl", &[&server]);
        let up = upstream().tls(server.clone()).start().await;
        let lg = legate()
            .config(&upstream_tls_config(
                up.addr,
                &format!(
                    "    tls:\n      sni: up.example\n      ca: {}\n      crl: {}\n",
                    p.ca.cert_path.display(),
                    crl.display()
                ),
            ))
            .from_file()
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(up.requests.get(), 0);
        let (_, clusters) = lg.admin_get("/clusters").await;
        assert!(clusters.contains("Revoked"), "{clusters}");
        lg.assert_stat(
            r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#,
            1.0,
        )
        .await;

        p.ca.crl("upstream.crl", &[]);
        assert_eq!(lg.admin_post("/reload").await.0, 200);
        assert_eq!(c.get("/").send().await.status, 200);
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    /// A mesh peer's certificate names a SPIFFE id and no host:
    /// `match_subject_alt_names` accepts it for that id (the SNI check would
    /// refuse it), and refuses a peer with another id, saying which it has.
    async fn upstream_spiffe_id_is_checked_by_match_subject_alt_names(proto) {
        let ca = Ca::new("mesh CA");
        let api = upstream()
            .tls(ca.server_with_uris(&[], &["spiffe://mesh.test/ns/app/sa/api"]))
            .start()
            .await;
        let cluster = |want: &str| {
            format!(
                "    tls:\n      sni: api.mesh.test\n      ca: {}\n      match_subject_alt_names:\n        - uri: {{ exact: \"{want}\" }}\n",
                ca.cert_path.display()
            )
        };
        let lg = legate()
            .config(&upstream_tls_config(api.addr, &cluster("spiffe://mesh.test/ns/app/sa/api")))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(api.requests.get(), 1);

        let lg = legate()
            .config(&upstream_tls_config(api.addr, &cluster("spiffe://mesh.test/ns/db/sa/db")))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 502);
        assert_eq!(api.requests.get(), 1);
        lg.assert_stat(r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#, 1.0).await;
        let (_, clusters) = lg.admin_get("/clusters").await;
        assert!(
            clusters.contains("(it has: URI:spiffe://mesh.test/ns/app/sa/api)"),
            "{clusters}"
        );
    }
);

each_proto!(
    async fn mtls_optional(proto) {
        let p = pki();
        let client_cert = p.ca.client("client-1");
        let up = upstream().start().await;
        let lg = legate()
            .config(&tls_listener_config(
                up.addr,
                &format!(
                    "{}      client_auth:\n        ca: {}\n        required: false\n",
                    certs_yaml(&p),
                    p.ca.cert_path.display()
                ),
            ))
            .start();
        let addr = lg.addr("web");
        let mut anon = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example"))
            .await
            .expect("anonymous client");
        assert_eq!(anon.get("/").send().await.status, 200);
        let mut c = tls_client(proto, addr, TlsOptions::new(&p.a, "a.example").client_cert(client_cert))
            .await
            .expect("client with certificate");
        assert_eq!(c.get("/").send().await.status, 200);
    }
);

fn upstream_tls_config(up: std::net::SocketAddr, cluster_extra: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
{cluster_extra}    endpoints:
      - address: {up}
"
    )
}

each_proto!(
    async fn upstream_tls_with_custom_ca_and_client_cert(proto) {
        let ca = Ca::new("upstream CA");
        let server = ca.server(&["backend.internal"]);
        let legate_cert = ca.client("legate");
        let up = upstream()
            .tls(server.clone())
            .client_ca(legate_cert.clone())
            .start()
            .await;
        let tls = format!(
            "    protocol: auto
    tls:
      sni: backend.internal
      ca: {}
      client_cert: {}
      client_key: {}
",
            ca.cert_path.display(),
            legate_cert.cert.display(),
            legate_cert.key.display()
        );
        let lg = legate().config(&upstream_tls_config(up.addr, &tls)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/secure").body("over tls").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "over tls");
        let t = e.tls.expect("upstream saw TLS");
        assert_eq!(t.sni.as_deref(), Some("backend.internal"));
        assert!(t.client_cert, "Legate did not present its client certificate");
        // `auto` takes h2 when the upstream offers it.
        assert_eq!(t.alpn.as_deref(), Some("h2"));
        assert_eq!(e.version, "HTTP/2.0");
        lg.assert_stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// A cluster whose client key is encrypted (`key_password_file`) presents
    /// its certificate to an upstream that requires one.
    async fn upstream_mtls_with_an_encrypted_client_key(proto) {
        let ca = Ca::new("upstream CA");
        let server = ca.server(&["backend.internal"]);
        let legate_cert = ca.client("legate");
        let (key, password) = legate_cert.write_encrypted_key("legate.enc.key", "legate.pass", "s3cret");
        let up = upstream()
            .tls(server.clone())
            .client_ca(legate_cert.clone())
            .start()
            .await;
        let tls = format!(
            "    protocol: auto
    tls:
      sni: backend.internal
      ca: {}
      client_cert: {}
      client_key: {}
      key_password_file: {}
",
            ca.cert_path.display(),
            legate_cert.cert.display(),
            key.display(),
            password.display()
        );
        let lg = legate().config(&upstream_tls_config(up.addr, &tls)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/secure").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let t = r.echo().tls.expect("upstream saw TLS");
        assert!(t.client_cert, "Legate did not present its client certificate");
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn upstream_tls_http1(proto) {
        let ca = Ca::new("upstream CA");
        let server = ca.server(&["backend.internal"]);
        let up = upstream().tls(server).start().await;
        let tls = format!(
            "    tls:\n      sni: backend.internal\n      ca: {}\n",
            ca.cert_path.display()
        );
        let lg = legate().config(&upstream_tls_config(up.addr, &tls)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.version, "HTTP/1.1");
        let t = e.tls.expect("upstream saw TLS");
        assert!(!t.client_cert);
        assert_ne!(t.alpn.as_deref(), Some("h2"));
    }
);

each_proto!(
    async fn upstream_tls_untrusted_certificate_is_502(proto) {
        let ca = Ca::new("upstream CA");
        let other = Ca::new("other CA");
        let up = upstream().tls(ca.server(&["backend.internal"])).start().await;
        let tls = format!(
            "    tls:\n      sni: backend.internal\n      ca: {}\n",
            other.cert_path.display()
        );
        let lg = legate().config(&upstream_tls_config(up.addr, &tls)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_connect_failure\n");
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// An upstream certificate that does not verify (here: not for the `sni`
    /// the cluster names) says why where an operator looks: the access log's
    /// `upstream_transport_failure_reason` (Envoy's
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`) and the endpoint's
    /// `last_connect_failure` in `/clusters`. The client's 502 stays as it
    /// was: no internal detail goes to clients.
    async fn upstream_tls_failure_reason_is_logged_and_shown(proto) {
        let ca = Ca::new("upstream CA");
        let up = upstream().tls(ca.server(&["backend.internal"])).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let tls = format!(
            "    tls:\n      sni: wrong.internal\n      ca: {}\n",
            ca.cert_path.display()
        );
        let cfg = upstream_tls_config(up.addr, &tls).replacen(
            "version: 1\n",
            &format!(
                "version: 1\naccess_log: {{ path: {}, flush_interval: 10ms }}\n",
                log.display()
            ),
            1,
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_connect_failure\n");
        assert_eq!(up.requests.get(), 0);
        let names_mismatch = |s: &str| {
            let s = s.to_ascii_lowercase();
            s.contains("notvalidforname") || s.contains("not valid for name")
        };
        let lines = access_log_until(&log, "the 502 line", |l| !l.is_empty()).await;
        let v = &lines[0];
        assert_eq!(v["status"], 502, "{v}");
        assert_eq!(v["cause"], "upstream_connect_failure", "{v}");
        let reason = v["upstream_transport_failure_reason"].as_str().unwrap_or_default();
        assert!(names_mismatch(reason), "{v}");
        let (status, body) = lg.admin_get("/clusters").await;
        assert_eq!(status, 200);
        let clusters: Value = serde_json::from_str(&body).unwrap();
        let ep = clusters["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["endpoints"].as_array().unwrap().iter())
            .find(|e| e["address"] == up.addr.to_string())
            .unwrap_or_else(|| panic!("{} not in /clusters: {body}", up.addr));
        let last = ep["health"]["last_connect_failure"].as_str().unwrap_or_default();
        assert!(names_mismatch(last), "{ep}");
    }
);

/// The endpoint `addr` of `/clusters`.
async fn cluster_endpoint(lg: &LegateHandle, addr: std::net::SocketAddr) -> Value {
    let (status, body) = lg.admin_get("/clusters").await;
    assert_eq!(status, 200);
    let clusters: Value = serde_json::from_str(&body).unwrap();
    clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().unwrap().iter())
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("{addr} not in /clusters: {body}"))
        .clone()
}

each_proto!(
    /// An upstream that requires a client certificate Legate does not send
    /// refuses it after the TLS 1.3 handshake completed on Legate's side:
    /// its alert comes on the first read. That is a TLS handshake failure,
    /// said where an operator looks (the access log's transport failure
    /// reason, `/clusters`, the connect failure counter), as Envoy's
    /// `TLS error: ...`, not an `upstream_reset` with no reason. (Over an
    /// HTTP/1.1 upstream connection: an h2 one is not covered yet.)
    async fn upstream_refusing_the_client_certificate_after_the_handshake_is_a_tls_failure(proto) {
        let ca = Ca::new("upstream CA");
        let wanted = ca.client("someone");
        let up = upstream()
            .tls(ca.server(&["backend.internal"]))
            .client_ca(wanted)
            .start()
            .await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let tls = format!(
            "    protocol: http1\n    tls:\n      sni: backend.internal\n      ca: {}\n",
            ca.cert_path.display()
        );
        let cfg = upstream_tls_config(up.addr, &tls).replacen(
            "version: 1\n",
            &format!(
                "version: 1\naccess_log: {{ path: {}, flush_interval: 10ms }}\n",
                log.display()
            ),
            1,
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_connect_failure\n");
        assert_eq!(up.requests.get(), 0);
        let lines = access_log_until(&log, "the 502 line", |l| !l.is_empty()).await;
        let v = &lines[0];
        assert_eq!(v["cause"], "upstream_connect_failure", "{v}");
        let reason = v["upstream_transport_failure_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("CertificateRequired"), "{v}");
        let ep = cluster_endpoint(&lg, up.addr).await;
        let last = ep["health"]["last_connect_failure"].as_str().unwrap_or_default();
        assert!(last.contains("CertificateRequired"), "{ep}");
        lg.assert_stat(r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#, 1.0)
            .await;
    }
);

/// The same refusal on a TCP proxy's upstream: the session is a connect
/// failure with the alert as its transport failure reason, not a 200 ended
/// by `upstream_close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_upstream_refusing_the_client_certificate_is_a_connect_failure() {
    let ca = Ca::new("upstream CA");
    let up = upstream()
        .tls(ca.server(&["backend.internal"]))
        .client_ca(ca.client("someone"))
        .start()
        .await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = format!(
        "version: 1
access_log: {{ path: {}, flush_interval: 10ms }}
listeners:
  - name: tcp
    address: 127.0.0.1:0
    tcp:
      cluster: backend
clusters:
  - name: backend
    tls:
      sni: backend.internal
      ca: {}
    endpoints:
      - address: {}
",
        log.display(),
        ca.cert_path.display(),
        up.addr
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed);
    let lines = access_log_until(&log, "the session's line", |l| !l.is_empty()).await;
    let v = &lines[0];
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(v["cause"], "upstream_connect_failure", "{v}");
    let reason = v["upstream_transport_failure_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("CertificateRequired"), "{v}");
    let ep = cluster_endpoint(&lg, up.addr).await;
    let last = ep["health"]["last_connect_failure"]
        .as_str()
        .unwrap_or_default();
    assert!(last.contains("CertificateRequired"), "{ep}");
    lg.assert_stat(
        r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#,
        1.0,
    )
    .await;
}

/// `GET /certs` (Envoy's) lists each certificate in force, by listener and
/// cluster: what each serves or presents (`cert_chain`) and trusts
/// (`ca_cert`), with subject, SANs, validity and days left; `/stats` has each
/// one's expiry and the days until the first expires (Envoy's
/// `server.days_until_first_cert_expiring`), what an expiry alert watches. A
/// certificate renewed by a reload is what both show then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certs_and_the_expiry_series_show_the_certificates_in_force() {
    let ca = Ca::new("legate test CA");
    let current = ca.server(&["a.example"]);
    let expired = ca.expired_server(&["old.example"]);
    let up_ca = Ca::new("upstream CA");
    let presented = up_ca.client("legate");
    let up = upstream().start().await;
    let listener_tls = format!(
        "      certificates:
        - cert: {}
          key: {}
        - cert: {}
          key: {}
      client_auth:
        ca: {}
        required: false
",
        current.cert.display(),
        current.key.display(),
        expired.cert.display(),
        expired.key.display(),
        ca.cert_path.display()
    );
    let cluster_tls = format!(
        "  - name: backend
    tls:
      ca: {}
      client_cert: {}
      client_key: {}
",
        up_ca.cert_path.display(),
        presented.cert.display(),
        presented.key.display()
    );
    let yaml =
        tls_listener_config(up.addr, &listener_tls).replace("  - name: backend\n", &cluster_tls);
    let lg = legate().config(&yaml).from_file().start();

    let (status, body) = lg.admin_get("/certs").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let owners = v["certificates"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "{v:#}");
    let web = &owners[0];
    assert_eq!(web["listener"], "web", "{v:#}");
    let chain = web["cert_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{v:#}");
    assert_eq!(chain[0]["path"], current.cert.display().to_string());
    assert_eq!(chain[0]["subject"], "CN=a.example");
    assert_eq!(
        chain[0]["subject_alt_names"],
        serde_json::json!([{ "dns": "a.example" }])
    );
    assert!(
        chain[0]["days_until_expiration"].as_i64().unwrap() > 36_500,
        "{v:#}"
    );
    assert_eq!(chain[1]["subject"], "CN=old.example");
    assert_eq!(chain[1]["days_until_expiration"], 0, "{v:#}");
    assert_eq!(chain[1]["valid_from"], "2020-01-01T00:00:00.000Z");
    assert_eq!(chain[1]["expiration_time"], "2020-02-01T00:00:00.000Z");
    assert_eq!(web["ca_cert"][0]["subject"], "CN=legate test CA", "{v:#}");
    let backend = &owners[1];
    assert_eq!(backend["cluster"], "backend", "{v:#}");
    assert_eq!(backend["cert_chain"][0]["subject"], "CN=legate", "{v:#}");
    assert_eq!(backend["ca_cert"][0]["subject"], "CN=upstream CA", "{v:#}");

    let stats = parse_prometheus(&lg.stats().await);
    let expiry = |path: &std::path::Path| {
        let label = format!("path=\"{}\"", path.display());
        let found: Vec<f64> = stats
            .iter()
            .filter(|(k, _)| {
                k.starts_with("legate_tls_certificate_expiration_timestamp_seconds{")
                    && k.contains(&label)
            })
            .map(|(_, v)| *v)
            .collect();
        found
    };
    assert_eq!(expiry(&expired.cert), vec![1_580_515_200.0]);
    assert_eq!(expiry(&up_ca.cert_path).len(), 1);
    assert_eq!(expiry(&presented.cert).len(), 1);
    assert_eq!(
        stats.get("legate_server_days_until_first_cert_expiring"),
        Some(&0.0)
    );

    // Renewed in place, as certbot does: the reload serves it, and the
    // admin shows it.
    let renewed = ca.server(&["old.example"]);
    std::fs::copy(&renewed.cert, &expired.cert).unwrap();
    std::fs::copy(&renewed.key, &expired.key).unwrap();
    assert_eq!(lg.admin_post("/reload").await.0, 200);
    let v: serde_json::Value = serde_json::from_str(&lg.admin_get("/certs").await.1).unwrap();
    let days = v["certificates"][0]["cert_chain"][1]["days_until_expiration"].as_i64();
    assert!(days.unwrap() > 36_500, "{v:#}");
    let first = lg
        .stat("legate_server_days_until_first_cert_expiring")
        .await;
    assert!(first.unwrap() > 36_500.0, "{first:?}");
}

const RESUMED: &str = r#"legate_listener_tls_session_reused_total{listener="web"}"#;

/// A client offering TLS 1.3 (which it then negotiates), and one offering
/// only TLS 1.2, each with its own sessions.
fn ticket_clients(p: &Pki, proto: Proto) -> [(&'static str, TlsSessions); 2] {
    let opts = TlsOptions::new(&p.a, "a.example");
    [
        ("TLS 1.3", TlsSessions::new(proto, opts.clone())),
        ("TLS 1.2", TlsSessions::new(proto, opts.tls12_only())),
    ]
}

each_proto!(
    /// A client that comes back resumes its session (by the session ticket
    /// it was given), in TLS 1.3 and 1.2, and the listener counts it.
    async fn a_session_ticket_resumption_is_counted(proto) {
        let p = pki();
        let up = upstream().start().await;
        let lg = legate().config(&tls_listener_config(up.addr, &certs_yaml(&p))).start();
        for (version, client) in ticket_clients(&p, proto) {
            assert!(!client.resumes(lg.addr("web")).await, "{version}: a new client");
            lg.assert_stat(RESUMED, if version == "TLS 1.3" { 0.0 } else { 1.0 }).await;
            assert!(client.resumes(lg.addr("web")).await, "{version}: back");
        }
        lg.assert_stat(RESUMED, 2.0).await;
        lg.assert_stat(TLS_ERRORS, 0.0).await;
        assert_families_documented(&lg.stats().await);
    }
);

/// Writes a session ticket key file of `p`'s directory: 80 bytes from
/// `seed` (its name, the first 16, differs from every other seed's).
fn ticket_key(p: &Pki, file: &str, seed: u8) -> std::path::PathBuf {
    let bytes: Vec<u8> = (0..80u8).map(|i| seed.wrapping_mul(37) ^ i).collect();
    let path = p.ca.dir().join(file);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The listener's `tls` lines: [`certs_yaml`], `session_ticket_keys` (if
/// any), then `extra`.
fn ticket_tls(p: &Pki, keys: &[&std::path::Path], extra: &str) -> String {
    let mut out = certs_yaml(p);
    if !keys.is_empty() {
        out.push_str("      session_ticket_keys:\n");
        for key in keys {
            out.push_str(&format!("        - {}\n", key.display()));
        }
    }
    out.push_str(extra);
    out
}

each_proto!(
    /// Two instances given the same `session_ticket_keys` file resume each
    /// other's sessions (instances behind one load balancer), both ways.
    async fn session_tickets_resume_on_another_instance_with_the_same_key(proto) {
        let p = pki();
        let key = ticket_key(&p, "a.ticket", 1);
        let up = upstream().start().await;
        let cfg = tls_listener_config(up.addr, &ticket_tls(&p, &[&key], ""));
        let first = legate().config(&cfg).start();
        let second = legate().config(&cfg).start();
        for (version, client) in ticket_clients(&p, proto) {
            assert!(!client.resumes(first.addr("web")).await, "{version}: a new client");
            assert!(client.resumes(second.addr("web")).await, "{version}: first's ticket");
            assert!(client.resumes(first.addr("web")).await, "{version}: second's ticket");
        }
        first.assert_stat(RESUMED, 2.0).await;
        second.assert_stat(RESUMED, 2.0).await;
        first.assert_stat(TLS_ERRORS, 0.0).await;
        assert_eq!(up.requests.get(), 6);
    }
);

each_proto!(
    /// An instance with another key, or two without keys (each with its own
    /// random key), do a full handshake for a ticket they did not issue;
    /// each instance resumes its own.
    async fn session_tickets_of_another_key_do_not_resume(proto) {
        let p = pki();
        let (a, b) = (ticket_key(&p, "a.ticket", 1), ticket_key(&p, "b.ticket", 2));
        let up = upstream().start().await;
        let with = |keys: &[&std::path::Path]| {
            legate().config(&tls_listener_config(up.addr, &ticket_tls(&p, keys, ""))).start()
        };
        let (under_a, under_b) = (with(&[&a]), with(&[&b]));
        let (random, other_random) = (with(&[]), with(&[]));
        for (version, client) in ticket_clients(&p, proto) {
            assert!(!client.resumes(under_a.addr("web")).await, "{version}");
            assert!(!client.resumes(under_b.addr("web")).await, "{version}: key A's ticket");
            assert!(!client.resumes(random.addr("web")).await, "{version}: key B's ticket");
            assert!(!client.resumes(other_random.addr("web")).await, "{version}: random key");
            assert!(client.resumes(other_random.addr("web")).await, "{version}: its own");
        }
        for lg in [&under_a, &under_b, &random] {
            lg.assert_stat(RESUMED, 0.0).await;
        }
        other_random.assert_stat(RESUMED, 2.0).await;
    }
);

each_proto!(
    /// Rotation: an instance with the new key B first and the old key A
    /// second resumes a ticket issued under A and issues its own under B,
    /// which an instance with only B resumes and one with only A does not.
    async fn rotated_session_ticket_keys_resume_the_old_key_and_issue_the_new(proto) {
        let p = pki();
        let (a, b) = (ticket_key(&p, "a.ticket", 1), ticket_key(&p, "b.ticket", 2));
        let up = upstream().start().await;
        let with = |keys: &[&std::path::Path]| {
            legate().config(&tls_listener_config(up.addr, &ticket_tls(&p, keys, ""))).start()
        };
        let (old, rotated, new) = (with(&[&a]), with(&[&b, &a]), with(&[&b]));
        for (version, client) in ticket_clients(&p, proto) {
            assert!(!client.resumes(old.addr("web")).await, "{version}");
            assert!(client.resumes(rotated.addr("web")).await, "{version}: ticket under A");
            assert!(client.resumes(new.addr("web")).await, "{version}: ticket under B");
            assert!(!client.resumes(old.addr("web")).await, "{version}: B is not old's");
        }
        old.assert_stat(RESUMED, 0.0).await;
        rotated.assert_stat(RESUMED, 2.0).await;
        new.assert_stat(RESUMED, 2.0).await;
    }
);

/// The config of [`tls_listener_config`] with the listener's idle timeout
/// set: a reload to it changes the listener (not its `tls`), which takes
/// over the socket with a new TLS config.
fn with_idle_timeout(cfg: &str, timeout: &str) -> String {
    cfg.replace(
        "    http:\n      routes: main\n",
        &format!("    limits:\n      idle_timeout: {timeout}\n    http:\n      routes: main\n"),
    )
}

each_proto!(
    /// `session_tickets: false`: no ticket carries the session, so it
    /// resumes only from the listener's session cache in this process,
    /// which a reload that rebuilds the listener's TLS starts empty (with
    /// tickets, the same reload keeps resumption:
    /// `a_reload_that_keeps_tls_keeps_the_random_ticket_key`).
    async fn without_session_tickets_only_the_session_cache_resumes(proto) {
        let p = pki();
        let up = upstream().start().await;
        let cfg = tls_listener_config(up.addr, &ticket_tls(&p, &[], "      session_tickets: false\n"));
        let lg = legate().config(&cfg).from_file().start();
        let other = legate().config(&cfg).start();
        let clients = ticket_clients(&p, proto);
        for (version, client) in &clients {
            assert!(!client.resumes(lg.addr("web")).await, "{version}");
            assert!(client.resumes(lg.addr("web")).await, "{version}: from the cache");
        }
        let report = lg.reload_ok(&with_idle_timeout(&cfg, "30s")).await;
        assert_eq!(report["listeners"]["changed"], json!(["web"]), "{report}");
        for (version, client) in &clients {
            assert!(!client.resumes(lg.addr("web")).await, "{version}: after the reload");
            assert!(!client.resumes(other.addr("web")).await, "{version}: another process");
        }
        lg.assert_stat(RESUMED, 2.0).await;
        other.assert_stat(RESUMED, 0.0).await;
    }
);

each_proto!(
    /// Without `session_ticket_keys`, a reload that leaves the listener's
    /// `tls` as it is keeps its random key: one that changes its other
    /// settings, and one that renews its certificate files. One that
    /// changes `tls` starts a new key.
    async fn a_reload_that_keeps_tls_keeps_the_random_ticket_key(proto) {
        let p = pki();
        let up = upstream().start().await;
        let cfg = tls_listener_config(up.addr, &ticket_tls(&p, &[], ""));
        let lg = legate().config(&cfg).from_file().start();
        let clients = ticket_clients(&p, proto);
        for (version, client) in &clients {
            assert!(!client.resumes(lg.addr("web")).await, "{version}");
        }
        let report = lg.reload_ok(&with_idle_timeout(&cfg, "30s")).await;
        assert_eq!(report["listeners"]["changed"], json!(["web"]), "{report}");
        for (version, client) in &clients {
            assert!(client.resumes(lg.addr("web")).await, "{version}: after a reload");
        }

        // The certificate renewed at its paths.
        let renewed = p.ca.server(&["a.example", "fallback.example"]);
        std::fs::copy(&renewed.cert, &p.a.cert).unwrap();
        std::fs::copy(&renewed.key, &p.a.key).unwrap();
        let report = lg.assert_reload_ok().await;
        assert_eq!(report["listeners"]["certificates_renewed"], json!(["web"]), "{report}");
        for (version, client) in &clients {
            assert!(client.resumes(lg.addr("web")).await, "{version}: after a renewal");
        }

        // Other `tls` settings: a new key.
        let changed = ticket_tls(&p, &[], "      ecdh_curves: [X25519, P-256]\n");
        let changed = with_idle_timeout(&tls_listener_config(up.addr, &changed), "30s");
        lg.reload_ok(&changed).await;
        for (version, client) in &clients {
            assert!(!client.resumes(lg.addr("web")).await, "{version}: other settings");
        }
        lg.assert_stat(RESUMED, 4.0).await;
        lg.assert_stat(TLS_ERRORS, 0.0).await;
    }
);

each_proto!(
    /// A ticket is bound to the listener's `client_auth`: the session of a
    /// client without a certificate, issued where none is asked for, does
    /// not resume on a listener sharing the key that requires one (rustls
    /// does not check the client's certificate again on resumption, so it
    /// would pass without one); listeners with the same `client_auth`
    /// resume each other's.
    async fn session_tickets_do_not_resume_past_client_auth(proto) {
        let p = pki();
        let key = ticket_key(&p, "a.ticket", 1);
        let up = upstream().start().await;
        let open = legate()
            .config(&tls_listener_config(up.addr, &ticket_tls(&p, &[&key], "")))
            .start();
        let auth = format!("      client_auth:\n        ca: {}\n", p.ca.cert_path.display());
        let mtls_cfg = tls_listener_config(up.addr, &ticket_tls(&p, &[&key], &auth));
        let (mtls, other_mtls) = (legate().config(&mtls_cfg).start(), legate().config(&mtls_cfg).start());
        let client_cert = p.ca.client("client-1");
        for tls12 in [false, true] {
            let opts = |o: TlsOptions| if tls12 { o.tls12_only() } else { o };
            let anonymous = TlsSessions::new(proto, opts(TlsOptions::new(&p.a, "a.example")));
            assert!(!anonymous.resumes(open.addr("web")).await);
            if let Ok(mut c) = anonymous.connect(mtls.addr("web")).await {
                assert!(!c.resumed, "tls12 {tls12}: resumed without a client certificate");
                let r = c.get("/").try_send().await;
                assert!(r.map_or(true, |r| r.status != 200), "tls12 {tls12}: served");
            }
            let with_cert = TlsSessions::new(
                proto,
                opts(TlsOptions::new(&p.a, "a.example").client_cert(client_cert.clone())),
            );
            assert!(!with_cert.resumes(mtls.addr("web")).await, "tls12 {tls12}");
            assert!(with_cert.resumes(other_mtls.addr("web")).await, "tls12 {tls12}");
        }
        mtls.assert_stat(RESUMED, 0.0).await;
        other_mtls.assert_stat(RESUMED, 2.0).await;
        assert_eq!(up.requests.get(), 6);
    }
);

each_proto!(
    /// A `session_ticket_keys` file rotated at its path is read again by a
    /// reload (as the watch would start it), as a renewed certificate is:
    /// new tickets are sealed with the new key.
    async fn a_session_ticket_key_file_rotated_in_place_is_renewed(proto) {
        let p = pki();
        let (key, b) = (ticket_key(&p, "current.ticket", 1), ticket_key(&p, "b.ticket", 2));
        let up = upstream().start().await;
        let with = |keys: &[&std::path::Path]| tls_listener_config(up.addr, &ticket_tls(&p, keys, ""));
        let lg = legate().config(&with(&[&key])).from_file().start();
        let under_b = legate().config(&with(&[&b])).start();
        std::fs::copy(&b, &key).unwrap();
        let report = lg.assert_reload_ok().await;
        assert_eq!(report["listeners"]["certificates_renewed"], json!(["web"]), "{report}");
        for (version, client) in ticket_clients(&p, proto) {
            assert!(!client.resumes(lg.addr("web")).await, "{version}");
            assert!(client.resumes(under_b.addr("web")).await, "{version}: the new key");
        }
        under_b.assert_stat(RESUMED, 2.0).await;
    }
);
