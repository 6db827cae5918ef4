//! A minimal DNS stub resolver for `dns` discovery: A and AAAA queries over UDP to
//! the configured name servers (or /etc/resolv.conf's), answers with their TTLs.
//!
//! Why hand-written rather than a resolver crate: discovery needs only "the
//! addresses of this name and how long they are good for", and these ~200 lines
//! cost nothing to build. What it does not do, by design: search domains and
//! `ndots` (names are queried as written, fully qualified), TCP fallback for
//! truncated answers (the addresses that fit are used), caching (each refresh asks
//! again; the name server caches), DNSSEC.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;

/// Query type A (IPv4 address).
const TYPE_A: u16 = 1;
/// Query type AAAA (IPv6 address).
const TYPE_AAAA: u16 = 28;
/// Class IN.
const CLASS_IN: u16 = 1;

/// A name server address from config: `ip` (port 53) or `ip:port`.
pub fn parse_server(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// The `nameserver` lines of a resolv.conf text.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                // A scoped IPv6 (`fe80::1%eth0`) cannot be parsed; skipped.
                .and_then(parse_server)
        })
        .collect()
}

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Addresses in answer order, IPv4 ones first.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL among them, in seconds.
    pub ttl: u32,
}

/// Resolves names with A and AAAA queries to `servers`, tried in order.
#[derive(Debug, Clone)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Resolver {
    /// A resolver asking `servers`, or /etc/resolv.conf's name servers when empty.
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Resolver {
        let servers = if servers.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| resolv_conf_servers(&t))
                .unwrap_or_default()
        } else {
            servers
        };
        Resolver { servers, timeout }
    }

    /// The addresses of `host`. An IP literal is its own answer (TTL `u32::MAX`).
    /// The error says which name and which servers, and why.
    pub async fn resolve(&self, host: &str) -> io::Result<Answer> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Answer {
                addrs: vec![ip],
                ttl: u32::MAX,
            });
        }
        if self.servers.is_empty() {
            return Err(io::Error::other(format!(
                "cannot resolve `{host}`: no name server (set `dns_resolvers`, or add a \
                 `nameserver` line to /etc/resolv.conf)"
            )));
        }
        let mut why = Vec::new();
        for &server in &self.servers {
            match self.ask(server, host).await {
                Ok(a) if !a.addrs.is_empty() => return Ok(a),
                Ok(_) => why.push(format!("{server}: no A or AAAA record")),
                Err(e) => why.push(format!("{server}: {e}")),
            }
        }
        Err(io::Error::other(format!(
            "cannot resolve `{host}`: {}",
            why.join("; ")
        )))
    }

    /// Sends the A and AAAA queries to one server and collects both answers.
    async fn ask(&self, server: SocketAddr, host: &str) -> io::Result<Answer> {
        let bind: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(server).await?;
        let (id_a, id_aaaa): (u16, u16) = {
            let mut rng = rand::rng();
            let a = rng.random();
            (a, a.wrapping_add(1))
        };
        sock.send(&query(id_a, host, TYPE_A)?).await?;
        sock.send(&query(id_aaaa, host, TYPE_AAAA)?).await?;
        let mut v4 = None;
        let mut v6 = None;
        let mut buf = [0u8; 1500];
        let deadline = tokio::time::Instant::now() + self.timeout;
        while v4.is_none() || v6.is_none() {
            let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    if v4.is_some() || v6.is_some() {
                        break;
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", self.timeout),
                    ));
                }
            };
            let Some(packet) = buf.get(..n) else { continue };
            let Some((id, parsed)) = parse_response(packet) else {
                continue;
            };
            if id == id_a && v4.is_none() {
                v4 = Some(parsed);
            } else if id == id_aaaa && v6.is_none() {
                v6 = Some(parsed);
            }
        }
        // One family's error (a server that fails AAAA queries: SERVFAIL,
        // NOTIMP) does not void the other's answer, as one that does not come
        // in time does not; both failing is the name's error.
        let (v4, v6) = match (v4, v6) {
            (Some(Err(e)), None | Some(Err(_))) | (None, Some(Err(e))) => return Err(e),
            (a, b) => (a.and_then(Result::ok), b.and_then(Result::ok)),
        };
        let mut addrs = Vec::new();
        let mut ttl = u32::MAX;
        for (a, t) in v4.into_iter().chain(v6).flatten() {
            addrs.push(a);
            ttl = ttl.min(t);
        }
        Ok(Answer { addrs, ttl })
    }
}

/// A recursive query for `name`'s records of type `qtype`.
fn query(id: u16, name: &str, qtype: u16) -> io::Result<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // Flags: RD (recursion desired). One question, no other records.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|&l| (1..=63).contains(&l))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{name}` is not a valid DNS name (label `{label}`)"),
                )
            })?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(q)
}

/// The id of a response and its address records with their TTLs; an error for an
/// answer with an error code (NXDOMAIN is an empty list). `None` if the packet is
/// not a response at all or is malformed.
#[allow(clippy::type_complexity)]
fn parse_response(p: &[u8]) -> Option<(u16, io::Result<Vec<(IpAddr, u32)>>)> {
    let u16_at =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?])) };
    let id = u16_at(0)?;
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    match flags & 0x000f {
        0 | 3 => {}
        rcode => {
            return Some((
                id,
                Err(io::Error::other(format!(
                    "the server answered with rcode {rcode}"
                ))),
            ))
        }
    }
    let qdcount = u16_at(4)?;
    let ancount = u16_at(6)?;
    let mut at = 12;
    for _ in 0..qdcount {
        at = skip_name(p, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..ancount {
        at = skip_name(p, at)?;
        let rtype = u16_at(at)?;
        let class = u16_at(at + 2)?;
        let ttl = u32::from_be_bytes(p.get(at + 4..at + 8)?.try_into().ok()?);
        let len = usize::from(u16_at(at + 8)?);
        let data = p.get(at + 10..at + 10 + len)?;
        at += 10 + len;
        if class != CLASS_IN {
            continue;
        }
        let ip = match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::from(<[u8; 4]>::try_from(data).ok()?),
            (TYPE_AAAA, 16) => IpAddr::from(<[u8; 16]>::try_from(data).ok()?),
            // CNAMEs and others: the resolver puts the target's addresses next.
            _ => continue,
        };
        out.push((ip, ttl));
    }
    Some((id, Ok(out)))
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(p: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *p.get(at)?;
        match len {
            0 => return Some(at + 1),
            // A compression pointer ends the name.
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// A name server on loopback answering A queries with 10.0.0.1 and AAAA
    /// queries with SERVFAIL (a server that fails one family).
    async fn servfail_for_aaaa() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = &buf[..n];
                let mut end = 12;
                while q[end] != 0 {
                    end += 1 + usize::from(q[end]);
                }
                let qtype = u16::from_be_bytes([q[end + 1], q[end + 2]]);
                let mut r = q[..2].to_vec();
                let a = qtype == TYPE_A;
                r.extend_from_slice(&[0x81, if a { 0x80 } else { 0x82 }, 0, 1, 0, u8::from(a)]);
                r.extend_from_slice(&[0, 0, 0, 0]);
                r.extend_from_slice(&q[12..end + 5]);
                if a {
                    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
                }
                let _ = sock.send_to(&r, from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn one_familys_failure_keeps_the_others_answer() {
        let server = servfail_for_aaaa().await;
        let r = Resolver::new(vec![server], Duration::from_secs(5));
        let answer = r.resolve("api.internal").await.unwrap();
        assert_eq!(answer.addrs, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn servers_from_config_and_resolv_conf() {
        assert_eq!(
            parse_server("10.0.0.2"),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(
            parse_server("127.0.0.1:5353"),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(parse_server("[::1]"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_server("dns.example"), None);
        let conf = "# comment\nsearch corp\nnameserver 10.0.0.2\nnameserver ::1\noptions ndots:2\n";
        assert_eq!(
            resolv_conf_servers(conf),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn query_encoding_and_response_parsing() {
        let q = query(0x1234, "api.internal.", TYPE_A).unwrap();
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[12..26], b"\x03api\x08internal\x00");
        assert!(query(1, "a..b", TYPE_A).is_err());

        // The query turned into a response with two answers, the second one using
        // a compression pointer to the question's name.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        r.extend_from_slice(b"\x03api\x08internal\x00");
        r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 2]);
        let (id, got) = parse_response(&r).unwrap();
        assert_eq!(id, 0x1234);
        assert_eq!(
            got.unwrap(),
            vec![
                ("10.0.0.1".parse().unwrap(), 30),
                ("10.0.0.2".parse().unwrap(), 5)
            ]
        );
        // SERVFAIL is an error; a query (QR clear) is not a response.
        let mut fail = q.clone();
        fail[2] = 0x81;
        fail[3] = 0x82;
        assert!(parse_response(&fail).unwrap().1.is_err());
        assert!(parse_response(&q).is_none());
        assert!(parse_response(&r[..20]).is_none());
    }
}
