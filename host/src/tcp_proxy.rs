//! TCP proxy listeners (L4): each downstream connection is forwarded byte for byte
//! to an endpoint of the listener's cluster, with a connect retry across endpoints,
//! an idle timeout and byte counters. A listener with `tcp.filters` runs each
//! connection through its network filter chain ([`crate::network_filter`]):
//! `on_new_connection` before the connect, data and close callbacks after; one
//! without filters keeps the plain `copy_bidirectional` path. A connection
//! of a listener that stopped (drain, reload) is closed `drain_timeout` later
//! ([`ListenerCtx::drained`]).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::cluster::outlier::Outcome;
use crate::error::{Kind, ProxyError};
use crate::filter::{ConnFacts, TlsFacts};
use crate::io::{Activity, Conn, Tracked, Verdict};
use crate::listener::ListenerCtx;
use crate::network_filter::{self, NetChain};
use crate::upstream::{open_stream, Target};
use crate::worker::Worker;

/// Proxies one accepted connection until either side closes or it idles out.
pub async fn serve(
    worker: Rc<Worker>,
    ctx: Arc<ListenerCtx>,
    stream: TcpStream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
) {
    let Some(tcp) = &ctx.cfg.tcp else { return };
    let snapshot = ctx.snapshot(&worker.shared.snapshot);
    let Some(entry) = snapshot.clusters.get(&tcp.cluster.value).cloned() else {
        tracing::error!(listener = %ctx.name, "cluster `{}` missing from the snapshot", tcp.cluster.value);
        return;
    };
    // Looked up once; the facts filters see are gathered only when there are
    // filters, so the plain path makes no extra syscall or allocation.
    let filters = snapshot.network.get(&ctx.name);
    let local = match filters {
        Some(_) => stream.local_addr().unwrap_or(peer),
        None => peer,
    };
    let mut tls_info = None;
    let downstream = match ctx.tls.load_full() {
        None => Conn::Plain(stream),
        Some(server_tls) => {
            let hs = tokio::time::timeout(
                ctx.cfg.limits.header_read_timeout.get(),
                server_tls.acceptor.accept(stream),
            );
            match hs.await {
                Ok(Ok(s)) => {
                    if filters.is_some() {
                        tls_info = Some(crate::tls::tls_info(s.get_ref().1));
                    }
                    Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
                }
                _ => {
                    ctx.stats.cx_tls_error.inc();
                    return;
                }
            }
        }
    };

    // Network filters: `on_new_connection` (which may pause for a callout or
    // close) before the connect.
    let mut filtered = None;
    if let Some(filters) = filters {
        let facts = Arc::new(ConnFacts {
            source: peer,
            destination: local,
            tls: tls_info.as_ref().map(TlsFacts::of),
        });
        let x = network_filter::connection(facts, &ctx.name, &tcp.cluster.value);
        let callouts = crate::proxy::callout_sender(&worker, &snapshot);
        crate::filter::set_worker_callouts(callouts.clone());
        let (mut chain, mut rx) = NetChain::new(worker.id, filters, x, callouts);
        if !network_filter::start(&mut chain, &mut rx).await {
            tracing::debug!(listener = %ctx.name, %peer, "a network filter closed the connection");
            network_filter::finish_unconnected(&mut chain);
            return;
        }
        filtered = Some((chain, rx));
    }
    // What the connection needs is held (its cluster, its filters); the rest
    // of the config goes with the next reload instead of living as long as the
    // connection: a long-lived connection would otherwise keep every plugin
    // instance of its config version on every worker.
    drop(snapshot);

    // Connect, trying each endpoint once on failure.
    let cluster = &entry.cluster();
    let balancer = worker.balancer(cluster);
    let hash = cluster.hash_key(&http::HeaderMap::new(), peer.ip());
    let mut tried = Vec::new();
    let attempts = if cluster.config.original_dst {
        1
    } else {
        cluster.endpoints.len().max(1)
    };
    let mut upstream = None;
    for _ in 0..attempts {
        let (addr, host, index) = if cluster.config.original_dst {
            let Some(a) = original_dst else {
                tracing::warn!(listener = %ctx.name, %peer, "no original destination; closing");
                if let Some((mut chain, _)) = filtered {
                    network_filter::finish_unconnected(&mut chain);
                }
                return;
            };
            (a, Arc::<str>::from(a.ip().to_string()), None)
        } else {
            let Some(i) = balancer.pick(hash, &tried) else {
                break;
            };
            tried.push(i);
            let ep = &cluster.endpoints[i];
            (ep.address, ep.host.clone(), Some(i))
        };
        let target = Target {
            addr,
            host: &host,
            cluster,
            endpoint: index,
        };
        let result = open_stream(&entry.upstream, &target).await;
        // Connects are all a TCP proxy learns about an endpoint: outlier detection
        // counts them (a refused or timed-out connect is a gateway failure).
        if let (
            Some(i),
            Ok(_)
            | Err(ProxyError {
                kind: Kind::ConnectFailed,
                ..
            }),
        ) = (index, &result)
        {
            let outcome = if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::LocalFailure
            };
            cluster.outlier_record(i, outcome);
        }
        match result {
            Ok((conn, counted)) => {
                upstream = Some((conn, counted, index, addr));
                break;
            }
            Err(e) => tracing::debug!(listener = %ctx.name, "tcp upstream {addr}: {e}"),
        }
    }
    let Some((upstream, _counted, index, addr)) = upstream else {
        tracing::debug!(listener = %ctx.name, %peer, "no upstream reachable; closing");
        if let Some((mut chain, _)) = filtered {
            network_filter::finish_unconnected(&mut chain);
        }
        return;
    };
    let _active = cluster.start_request(index);

    let activity = Arc::new(Activity::default());
    let mut down = Tracked::new(downstream, activity.clone());
    // Upstream bytes count as activity too (not as the client's bytes): a
    // filter may hold what the upstream sends, or a slow upstream take an
    // upload, with nothing moving on the client's side meanwhile.
    let mut up = Tracked::other(upstream, activity.clone());
    let idle = tcp.idle_timeout.get();
    // Once the listener stops (a drain, or a reload that replaced or removed
    // it), the connection has `drain_timeout` left.
    let drained = ctx.drained(&worker.shared.snapshot);
    tokio::pin!(drained);
    if let Some((mut chain, rx)) = filtered {
        chain.x.upstream = Some(addr);
        network_filter::serve(chain, rx, down, up, &activity, idle, drained).await;
        let (rx, tx) = activity.bytes();
        ctx.stats.rx_bytes.add(rx);
        ctx.stats.tx_bytes.add(tx);
        return;
    }
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    loop {
        let deadline = match activity.check(idle, None) {
            Verdict::WaitUntil(t) => t,
            _ => {
                tracing::debug!(listener = %ctx.name, %peer, "tcp connection idle for {idle:?}; closing");
                break;
            }
        };
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(listener = %ctx.name, %peer, "tcp proxy ended: {e}");
                }
                break;
            }
            () = &mut drained => {
                tracing::debug!(listener = %ctx.name, %peer, "listener closed and drain timeout passed; closing");
                break;
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
    let (rx, tx) = activity.bytes();
    ctx.stats.rx_bytes.add(rx);
    ctx.stats.tx_bytes.add(tx);
}
