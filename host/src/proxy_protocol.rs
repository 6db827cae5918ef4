//! The PROXY protocol (HAProxy's, versions 1 and 2). On a listener: a load
//! balancer in front of Legate (AWS NLB, HAProxy, another Legate) sends the
//! client's and the destination's addresses in a header before the connection's
//! own bytes (TLS, HTTP), and Legate takes them as the connection's peer and local
//! addresses, as Envoy's `proxy_protocol` listener filter and nginx's `listen ...
//! proxy_protocol` do.
//!
//! The header is read with `MSG_PEEK` first, so that on a listener that also
//! takes connections without one nothing of the connection's own bytes is
//! consumed; then exactly the header's bytes are read. Version 2's TLVs are
//! skipped; `LOCAL` (a load balancer's health check), `UNKNOWN` and `UNSPEC` or
//! UNIX addresses keep the connection's own addresses.
//!
//! Towards an upstream (a TCP proxy cluster's `proxy_protocol`, as Envoy's
//! upstream proxy-protocol transport socket and nginx's stream `proxy_protocol
//! on`): [`header`] is written first on each connection, before TLS; a health
//! check sends [`local_header`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Version 2's signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's start.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest version 2 address block (with TLVs) accepted. The specification
/// allows 65535; load balancers send tens of bytes of TLVs.
const V2_MAX_BLOCK: usize = 4096;

/// What the header said.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// The client's address and the one it connected to.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// Where it connected.
        destination: SocketAddr,
    },
    /// A header without addresses (`LOCAL`, `UNKNOWN`, UNIX or unspecified):
    /// the connection's own addresses stand.
    Local,
    /// No header, on a listener where it is optional.
    Absent,
}

/// Reads the connection's PROXY header; an error says what was wrong with it
/// (or that it is missing where `required`). The caller bounds the time.
///
/// Nothing but the header is consumed, and nothing is polled in a loop: a
/// required header's first 12 bytes are read (the shortest header is 15), an
/// optional one's are peeked until they tell (a header's first segment holds
/// them; a client that sends fewer is polled with a backoff); then a version 2
/// header is read by its length, a version 1 line by peeking the bytes at
/// hand, reading those before its CRLF and waiting for more.
pub async fn read(stream: &mut TcpStream, required: bool) -> Result<Header, String> {
    let io = |e: std::io::Error| format!("reading the PROXY header: {e}");
    let closed = || "the connection closed before its PROXY header".to_string();
    let mut head = [0u8; 12];
    let kind = if required {
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => closed(),
                _ => io(e),
            })?;
        classify(&head)
    } else {
        let mut wait = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut head).await.map_err(io)?;
            if n == 0 {
                return Err(closed());
            }
            match classify(head.get(..n).unwrap_or_default()) {
                Kind::Undecided => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Kind::Other => return Ok(Header::Absent),
                kind => {
                    // Ours: take its first bytes as the required case does.
                    stream.read_exact(&mut head).await.map_err(io)?;
                    break kind;
                }
            }
        }
    };
    match kind {
        Kind::V2 => {
            let mut rest = [0u8; 4];
            stream.read_exact(&mut rest).await.map_err(io)?;
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            if len > V2_MAX_BLOCK {
                return Err(format!(
                    "PROXY v2 address block of {len} bytes (at most {V2_MAX_BLOCK} accepted)"
                ));
            }
            let mut header = Vec::with_capacity(16 + len);
            header.extend_from_slice(&head);
            header.extend_from_slice(&rest);
            header.resize(16 + len, 0);
            stream
                .read_exact(header.get_mut(16..).unwrap_or_default())
                .await
                .map_err(io)?;
            parse_v2(&header)
        }
        Kind::V1 => {
            let mut line = head.to_vec();
            loop {
                if let Some(end) = line.windows(2).position(|w| w == b"\r\n") {
                    return parse_v1(line.get(..end).unwrap_or_default());
                }
                if line.len() >= V1_MAX {
                    return Err(format!("PROXY v1 header without CRLF in {V1_MAX} bytes"));
                }
                // What is at hand, up to the line's end if it is there (a
                // peek waits for data: no busy loop).
                let mut chunk = [0u8; V1_MAX];
                let room = V1_MAX - line.len();
                let n = stream
                    .peek(chunk.get_mut(..room).unwrap_or_default())
                    .await
                    .map_err(io)?;
                if n == 0 {
                    return Err(closed());
                }
                let seen = chunk.get(..n).unwrap_or_default();
                // A CR at the line's end may pair with an LF first in `seen`.
                let take = if line.last() == Some(&b'\r') && seen.first() == Some(&b'\n') {
                    1
                } else {
                    seen.windows(2)
                        .position(|w| w == b"\r\n")
                        .map_or(n, |i| i + 2)
                };
                let mut got = vec![0u8; take];
                stream.read_exact(&mut got).await.map_err(io)?;
                line.extend_from_slice(&got);
            }
        }
        Kind::Other | Kind::Undecided => {
            Err("the connection did not start with a PROXY protocol header".into())
        }
    }
}

enum Kind {
    V1,
    V2,
    Other,
    Undecided,
}

/// What a connection starting with `head` carries.
fn classify(head: &[u8]) -> Kind {
    let starts = |sig: &[u8]| {
        let k = head.len().min(sig.len());
        head.get(..k) == sig.get(..k)
    };
    if starts(V2_SIGNATURE) {
        if head.len() >= V2_SIGNATURE.len() {
            Kind::V2
        } else {
            Kind::Undecided
        }
    } else if starts(V1_PREFIX) {
        if head.len() >= V1_PREFIX.len() {
            Kind::V1
        } else {
            Kind::Undecided
        }
    } else {
        Kind::Other
    }
}

/// `PROXY TCP4 203.0.113.7 198.51.100.1 51000 443` (without the CRLF).
fn parse_v1(line: &[u8]) -> Result<Header, String> {
    let line = std::str::from_utf8(line).map_err(|_| "PROXY v1 header is not ASCII".to_string())?;
    let shown = || format!("`{}`", line.escape_debug());
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Header::Local),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, String> {
                let ip = match *family {
                    "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
                    _ => s.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
                };
                ip.ok_or_else(|| {
                    format!(
                        "PROXY v1 header {}: `{s}` is not a {family} address",
                        shown()
                    )
                })
            };
            let port = |s: &str| -> Result<u16, String> {
                // Decimal digits, no sign and no leading zero (the specification's form).
                let ok = !s.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && (s == "0" || !s.starts_with('0'));
                ok.then(|| s.parse().ok())
                    .flatten()
                    .ok_or_else(|| format!("PROXY v1 header {}: `{s}` is not a port", shown()))
            };
            Ok(Header::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            })
        }
        _ => Err(format!(
            "PROXY v1 header {} is not `PROXY TCP4|TCP6 SRC DST SPORT DPORT` or `PROXY UNKNOWN`",
            shown()
        )),
    }
}

/// A whole version 2 header: signature, version and command, family, length,
/// addresses and TLVs.
fn parse_v2(header: &[u8]) -> Result<Header, String> {
    let (Some(&ver_cmd), Some(&family), Some(block)) =
        (header.get(12), header.get(13), header.get(16..))
    else {
        return Err("PROXY v2 header cut short".into());
    };
    if ver_cmd >> 4 != 2 {
        return Err(format!("PROXY v2 header of version {}", ver_cmd >> 4));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(Header::Local),
        1 => {}
        c => {
            return Err(format!(
                "PROXY v2 header with command {c} (neither LOCAL nor PROXY)"
            ))
        }
    }
    let u16_at = |i: usize| {
        block
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0)
    };
    match family >> 4 {
        // AF_INET: 4 + 4 + 2 + 2 bytes.
        1 => {
            let (Some(s), Some(d)) = (block.get(0..4), block.get(4..8)) else {
                return Err("PROXY v2 IPv4 addresses cut short".into());
            };
            if block.len() < 12 {
                return Err("PROXY v2 IPv4 addresses cut short".into());
            }
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            Ok(Header::Proxied {
                source: SocketAddr::new(ip(s), u16_at(8)),
                destination: SocketAddr::new(ip(d), u16_at(10)),
            })
        }
        // AF_INET6: 16 + 16 + 2 + 2 bytes.
        2 => {
            let (Some(s), Some(d)) = (block.get(0..16), block.get(16..32)) else {
                return Err("PROXY v2 IPv6 addresses cut short".into());
            };
            if block.len() < 36 {
                return Err("PROXY v2 IPv6 addresses cut short".into());
            }
            let ip = |b: &[u8]| {
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            Ok(Header::Proxied {
                source: SocketAddr::new(ip(s), u16_at(32)),
                destination: SocketAddr::new(ip(d), u16_at(34)),
            })
        }
        // AF_UNSPEC, AF_UNIX: nothing Legate can use as an address.
        0 | 3 => Ok(Header::Local),
        f => Err(format!("PROXY v2 header with address family {f}")),
    }
}

/// The header Legate sends an upstream of a cluster with `proxy_protocol`
/// (`version` 1 or 2) for a connection from `source` to `destination`: the
/// addresses of its client. Mixed families (an IPv4 client of an IPv6 listener
/// address, say) are written as IPv6, IPv4 ones mapped.
pub fn header(version: u8, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (s, d) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(six(s)), IpAddr::V6(six(d))),
    };
    if version == 1 {
        let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
        return format!(
            "PROXY {family} {s} {d} {} {}\r\n",
            source.port(),
            destination.port()
        )
        .into_bytes();
    }
    let mut block = Vec::with_capacity(36);
    let family = match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            block.extend_from_slice(&six(s).octets());
            block.extend_from_slice(&six(d).octets());
            0x21
        }
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(family);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// The header of a connection Legate makes for itself (a health check): no
/// client's addresses, `PROXY UNKNOWN` or version 2's `LOCAL`.
pub fn local_header(version: u8) -> Vec<u8> {
    if version == 1 {
        return b"PROXY UNKNOWN\r\n".to_vec();
    }
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

fn six(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A version 2 header with TLVs after the addresses (tests).
#[cfg(test)]
fn v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut h = header(2, source, destination);
    let len = u16::from_be_bytes([h[14], h[15]]) + tlvs.len() as u16;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn version_1_headers() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 443"),
            Ok(Header::Proxied {
                source: addr("203.0.113.7:51000"),
                destination: addr("198.51.100.1:443"),
            })
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443"),
            Ok(Header::Proxied {
                source: addr("[2001:db8::7]:51000"),
                destination: addr("[2001:db8::1]:443"),
            })
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN"), Ok(Header::Local));
        assert_eq!(
            parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2"),
            Ok(Header::Local)
        );
        for bad in [
            &b"PROXY TCP4 2001:db8::7 198.51.100.1 51000 443"[..],
            b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 65536",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 051000 443",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 51000",
            b"PROXY TCP4  203.0.113.7 198.51.100.1 51000 443",
            b"PROXY UDP4 203.0.113.7 198.51.100.1 51000 443",
            b"PROXY TCP4 203.0.113.7 198.51.100.1 +1 443",
        ] {
            assert!(parse_v1(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn version_2_headers() {
        let h = v2(addr("203.0.113.7:51000"), addr("198.51.100.1:443"), &[]);
        assert_eq!(
            parse_v2(&h),
            Ok(Header::Proxied {
                source: addr("203.0.113.7:51000"),
                destination: addr("198.51.100.1:443"),
            })
        );
        // TLVs (here an AWS VPC endpoint id) are skipped.
        let tlv = [0xea, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e'];
        let h = v2(addr("[2001:db8::7]:1"), addr("[2001:db8::1]:2"), &tlv);
        assert_eq!(
            parse_v2(&h),
            Ok(Header::Proxied {
                source: addr("[2001:db8::7]:1"),
                destination: addr("[2001:db8::1]:2"),
            })
        );
        // LOCAL: a health check of the balancer's own.
        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(parse_v2(&local), Ok(Header::Local));
        // UNSPEC family.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(parse_v2(&unspec), Ok(Header::Local));
        // Version 1 in the v2 byte, an unknown command, a short block.
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(parse_v2(&bad).is_err());
        bad[12] = 0x22;
        assert!(parse_v2(&bad).is_err());
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse_v2(&short).is_err());
    }

    #[test]
    fn the_headers_legate_sends_parse_back() {
        let (s4, d4) = (addr("203.0.113.7:51000"), addr("198.51.100.1:443"));
        let (s6, d6) = (addr("[2001:db8::7]:1"), addr("[2001:db8::1]:2"));
        let want = |s, d| {
            Ok(Header::Proxied {
                source: s,
                destination: d,
            })
        };
        let line = header(1, s4, d4);
        assert_eq!(line, b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 443\r\n");
        assert_eq!(parse_v1(&line[..line.len() - 2]), want(s4, d4));
        let line = header(1, s6, d6);
        assert_eq!(parse_v1(&line[..line.len() - 2]), want(s6, d6));
        assert_eq!(parse_v2(&header(2, s4, d4)), want(s4, d4));
        assert_eq!(parse_v2(&header(2, s6, d6)), want(s6, d6));
        // Mixed families: both as IPv6.
        let mixed = parse_v2(&header(2, s4, d6)).unwrap();
        assert_eq!(
            mixed,
            Header::Proxied {
                source: addr("[::ffff:203.0.113.7]:51000"),
                destination: d6
            }
        );
        assert_eq!(local_header(1), b"PROXY UNKNOWN\r\n");
        assert_eq!(parse_v1(b"PROXY UNKNOWN"), Ok(Header::Local));
        assert_eq!(parse_v2(&local_header(2)), Ok(Header::Local));
    }

    #[test]
    fn what_a_connection_starts_with() {
        assert!(matches!(classify(b"\r\n\r\n\0"), Kind::Undecided));
        assert!(matches!(classify(V2_SIGNATURE), Kind::V2));
        assert!(matches!(classify(b"PRO"), Kind::Undecided));
        assert!(matches!(classify(b"PROXY TCP4"), Kind::V1));
        // HTTP methods and the HTTP/2 preface are not headers.
        for other in [
            &b"PROPFIND / HTTP/1.1"[..],
            b"PRI * HTTP/2.0",
            b"GET /",
            b"\x16\x03\x01",
            b"\r\nGET",
        ] {
            assert!(matches!(classify(other), Kind::Other), "{other:?}");
        }
    }

    /// Reads the header (`required` or not) of a connection whose client sends
    /// `segments` 20ms apart, then checks that what follows is the request line.
    async fn read_from(segments: &[&[u8]], required: bool) -> Result<Header, String> {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let segments: Vec<Vec<u8>> = segments.iter().map(|s| s.to_vec()).collect();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(at).await.unwrap();
            for (i, seg) in segments.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                c.write_all(seg).await.unwrap();
                c.flush().await.unwrap();
            }
            c
        });
        let (mut s, _) = listener.accept().await.unwrap();
        let h = read(&mut s, required).await;
        if h.is_ok() {
            let mut rest = [0u8; 16];
            s.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
        }
        drop(client.await.unwrap());
        h
    }

    #[tokio::test]
    async fn only_the_header_is_consumed() {
        let proxied = Header::Proxied {
            source: addr("203.0.113.7:51000"),
            destination: addr("198.51.100.1:443"),
        };
        // The header in two segments, then the connection's own bytes.
        let split = [
            &b"PROXY TCP4 203.0.113.7 "[..],
            b"198.51.100.1 51000 443\r\nGET / HTTP/1.1\r\n",
        ];
        assert_eq!(read_from(&split, true).await, Ok(proxied));
        // Optional and absent: nothing consumed.
        let plain = [&b"GET / HTTP/1.1\r\n"[..]];
        assert_eq!(read_from(&plain, false).await, Ok(Header::Absent));
        // Optional and present, its CRLF split across two segments: read up
        // to the LF, no further.
        let crlf = [&b"PROXY UNKNOWN\r"[..], b"\nGET / HTTP/1.1\r\n"];
        assert_eq!(read_from(&crlf, false).await, Ok(Header::Local));
        // Version 2, optional, with the request in the same segment.
        let mut bytes = v2(
            addr("203.0.113.7:51000"),
            addr("198.51.100.1:443"),
            &[0xea, 0, 1, 7],
        );
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            read_from(&[&bytes], false).await,
            Ok(Header::Proxied { .. })
        ));
        // Required and absent: an error.
        let e = read_from(&plain, true).await.unwrap_err();
        assert!(e.contains("did not start with a PROXY"), "{e}");
    }
}
