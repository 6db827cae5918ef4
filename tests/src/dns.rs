//! A minimal DNS server on loopback for `dns` discovery tests: it answers every A
//! query, whatever the name, with the current address list (TTL 1, or the
//! name's own TTL when told one; A queries are counted per name) and every AAAA
//! query with no record; or everything with SERVFAIL when told to, or the names
//! it is told to with NXDOMAIN; optionally each
//! answer after a delay (a slow name server). Point a cluster's
//! `discovery.dns_resolvers` at [`DnsServer::addr`]: nothing of the machine's
//! resolver configuration is used or touched.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// What the server answers; change it at any time.
#[derive(Default)]
pub struct DnsState {
    answers: Mutex<Vec<Ipv4Addr>>,
    /// Answer everything with SERVFAIL.
    pub servfail: AtomicBool,
    /// Queries received.
    pub queries: AtomicU64,
    /// Milliseconds to wait before each answer.
    pub delay_ms: AtomicU64,
    /// Names (`a.test`) answered with NXDOMAIN.
    missing: Mutex<Vec<String>>,
    /// Names (`a.test`) whose A records get another TTL than 1.
    ttls: Mutex<Vec<(String, u32)>>,
    /// A queries received per name (lowercase).
    a_queries: Mutex<BTreeMap<String, u64>>,
}

/// A running server; stops when dropped.
pub struct DnsServer {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    /// What it answers.
    pub state: Arc<DnsState>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Starts a server answering A queries with `answers`.
    pub async fn start(answers: &[Ipv4Addr]) -> DnsServer {
        let sock = Arc::new(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the test DNS server"),
        );
        let addr = sock.local_addr().expect("the test DNS server's address");
        let state = Arc::new(DnsState::default());
        state.set(answers);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                st.queries.fetch_add(1, Ordering::SeqCst);
                let Some(reply) = st.reply(&buf[..n]) else {
                    continue;
                };
                let delay = st.delay_ms.load(Ordering::SeqCst);
                if delay == 0 {
                    let _ = sock.send_to(&reply, from).await;
                } else {
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = sock.send_to(&reply, from).await;
                    });
                }
            }
        });
        DnsServer { addr, state, task }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsState {
    /// The addresses every A query gets from now on.
    pub fn set(&self, answers: &[Ipv4Addr]) {
        *self.answers.lock().unwrap_or_else(PoisonError::into_inner) = answers.to_vec();
    }

    /// Queries for `name` (`gone.test`) get NXDOMAIN from now on.
    pub fn remove_name(&self, name: &str) {
        self.missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.to_string());
    }

    /// The A records of `name` (`a.test`) get TTL `ttl` (seconds) from now on.
    pub fn set_ttl(&self, name: &str, ttl: u32) {
        self.ttls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_ascii_lowercase(), ttl));
    }

    /// A queries received so far for `name` (`a.test`).
    pub fn a_queries(&self, name: &str) -> u64 {
        self.a_queries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    fn reply(&self, q: &[u8]) -> Option<Vec<u8>> {
        // Header, then one question: the name's labels, a zero byte, type, class.
        let mut end = 12;
        let mut labels: Vec<String> = Vec::new();
        while *q.get(end)? != 0 {
            let len = usize::from(*q.get(end)?);
            labels.push(String::from_utf8_lossy(q.get(end + 1..end + 1 + len)?).into_owned());
            end += 1 + len;
        }
        let name = labels.join(".");
        let question = q.get(12..end + 5)?;
        let qtype = u16::from_be_bytes([q[end + 1], q[end + 2]]);
        let name = name.to_ascii_lowercase();
        if qtype == 1 {
            *self
                .a_queries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(name.clone())
                .or_insert(0) += 1;
        }
        let ttl = self
            .ttls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map_or(1, |(_, t)| *t);
        let mut r = q.get(..2)?.to_vec();
        let servfail = self.servfail.load(Ordering::SeqCst);
        let nxdomain = self
            .missing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&name));
        let answers: Vec<Ipv4Addr> = if qtype == 1 && !servfail && !nxdomain {
            self.answers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        } else {
            Vec::new()
        };
        // QR, RD, RA; rcode 2 (SERVFAIL), 3 (NXDOMAIN) or 0.
        let rcode = if servfail {
            0x82
        } else if nxdomain {
            0x83
        } else {
            0x80
        };
        r.extend_from_slice(&[0x81, rcode]);
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(question);
        for ip in answers {
            // Name: pointer to the question's; type A, class IN, TTL, 4 bytes.
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&[0, 4]);
            r.extend_from_slice(&ip.octets());
        }
        Some(r)
    }
}
