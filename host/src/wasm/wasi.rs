//! WASI 0.2 for plugins, linked synchronously so a guest call is a plain
//! function call on the worker's stack (no fiber: wasmtime's async entry made
//! and resumed one per call, ~0.6k instructions of a no-op filter's ~9k).
//!
//! wasmtime-wasi's synchronous linking runs its few async host functions
//! (blocking stream writes, `wasi:io/poll`, and some filesystem and socket
//! calls) through a nested tokio `block_on`, which panics on a worker thread.
//! So [`add_to_linker`] links the synchronous set and then replaces exactly
//! those functions:
//!
//! - `wasi:io/poll` and `wasi:io/streams`: the same host code, polled in place
//!   by [`poll_inline`]. Our streams (stdout/stderr to the log, stdin at its
//!   end) are always ready; a guest waiting on a clock pollable (`sleep`) spins
//!   until its wall deadline, as a call always did (abi/README.md §7).
//! - the socket calls that would block (`create-udp-socket`, TCP `start-bind`
//!   and `start-listen`): they fail with `access-denied`, as every socket
//!   operation does for a plugin (abi/README.md §10). The other async socket
//!   calls need a UDP socket, which cannot be made.
//! - `wasi:filesystem/types`: its async calls all need a descriptor, and a
//!   plugin has none (no preopened directories), so none can be reached.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime::Trap;
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::io::streams::{
    self as async_streams, HostInputStream as AsyncIn, HostOutputStream as AsyncOut,
};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily, IpSocketAddress};
use wasmtime_wasi::p2::bindings::sync::io::poll::{self, Pollable};
use wasmtime_wasi::p2::bindings::sync::io::streams::{self, InputStream, OutputStream};
use wasmtime_wasi::p2::{Network, StreamError, StreamResult, TcpSocket, UdpSocket};
use wasmtime_wasi::WasiView;

use super::engine;

/// The WASI version wasmtime-wasi defines (older 0.2.x imports link to it).
const VERSION: &str = "0.2.12";

/// Links WASI 0.2 (nothing granted, see the module docs) synchronously: the
/// interfaces of `legate_abi_rules::wasi::PROVIDED`, which abi/README.md §10
/// lists (change both with this).
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, Inline>(linker, |t| InlineIo(t.ctx().table))?;
    streams::add_to_linker::<T, Inline>(linker, |t| InlineIo(t.ctx().table))?;
    let denied = || Ok((Err::<(), _>(ErrorCode::AccessDenied),));
    let mut tcp = linker.instance(&format!("wasi:sockets/tcp@{VERSION}"))?;
    tcp.func_wrap(
        "[method]tcp-socket.start-bind",
        move |_, _: (Resource<TcpSocket>, Resource<Network>, IpSocketAddress)| denied(),
    )?;
    tcp.func_wrap(
        "[method]tcp-socket.start-listen",
        move |_, _: (Resource<TcpSocket>,)| denied(),
    )?;
    linker
        .instance(&format!("wasi:sockets/udp-create-socket@{VERSION}"))?
        .func_wrap("create-udp-socket", |_, _: (IpAddressFamily,)| {
            Ok((Err::<Resource<UdpSocket>, _>(ErrorCode::AccessDenied),))
        })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Polls `f` to completion on this thread; `None` once the wall deadline of
/// the call armed here ([`engine::wall_deadline`]) has passed while it was
/// pending. Nothing here registers a waker, so it spins (yielding the core)
/// between polls; host futures the guest can wait on are ready at once except
/// clock pollables, which a filter must not use (abi/README.md §7).
pub fn poll_inline<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
        return Some(v);
    }
    let deadline = engine::wall_deadline();
    loop {
        std::thread::yield_now();
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            engine::wall_bound_hit();
            return None;
        }
    }
}

/// A `wasmtime::Result` future polled in place; past the deadline, a timeout
/// trap ([`Trap::Interrupt`]), as an epoch interrupt reports one.
fn inline<T>(f: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    poll_inline(f).unwrap_or_else(|| Err(Trap::Interrupt.into()))
}

/// The same for a stream operation.
fn inline_stream<T>(f: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    poll_inline(f).unwrap_or_else(|| Err(StreamError::Trap(Trap::Interrupt.into())))
}

/// The store's resource table, seen through the synchronous `wasi:io` traits.
struct InlineIo<'a>(&'a mut ResourceTable);

struct Inline;

impl HasData for Inline {
    type Data<'a> = InlineIo<'a>;
}

impl poll::Host for InlineIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<Pollable>>) -> wasmtime::Result<Vec<u32>> {
        inline(async_poll::Host::poll(self.0, pollables))
    }
}

impl poll::HostPollable for InlineIo<'_> {
    fn ready(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<bool> {
        inline(async_poll::HostPollable::ready(self.0, pollable))
    }
    fn block(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<()> {
        inline(async_poll::HostPollable::block(self.0, pollable))
    }
    fn drop(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl streams::Host for InlineIo<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        Ok(
            match async_streams::Host::convert_stream_error(self.0, err)? {
                async_streams::StreamError::LastOperationFailed(e) => {
                    streams::StreamError::LastOperationFailed(e)
                }
                async_streams::StreamError::Closed => streams::StreamError::Closed,
            },
        )
    }
}

impl streams::HostOutputStream for InlineIo<'_> {
    fn drop(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<()> {
        inline(AsyncOut::drop(self.0, stream))
    }
    fn check_write(&mut self, stream: Resource<OutputStream>) -> StreamResult<u64> {
        AsyncOut::check_write(self.0, stream)
    }
    fn write(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncOut::write(self.0, stream, bytes)
    }
    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        inline_stream(AsyncOut::blocking_write_and_flush(self.0, stream, bytes))
    }
    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        inline_stream(AsyncOut::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }
    fn subscribe(
        &mut self,
        stream: Resource<OutputStream>,
    ) -> wasmtime::Result<Resource<Pollable>> {
        AsyncOut::subscribe(self.0, stream)
    }
    fn write_zeroes(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        AsyncOut::write_zeroes(self.0, stream, len)
    }
    fn flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        AsyncOut::flush(self.0, stream)
    }
    fn blocking_flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        inline_stream(AsyncOut::blocking_flush(self.0, stream))
    }
    fn splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncOut::splice(self.0, dst, src, len)
    }
    fn blocking_splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        inline_stream(AsyncOut::blocking_splice(self.0, dst, src, len))
    }
}

impl streams::HostInputStream for InlineIo<'_> {
    fn drop(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<()> {
        inline(AsyncIn::drop(self.0, stream))
    }
    fn read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncIn::read(self.0, stream, len)
    }
    fn blocking_read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        inline_stream(AsyncIn::blocking_read(self.0, stream, len))
    }
    fn skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        AsyncIn::skip(self.0, stream, len)
    }
    fn blocking_skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        inline_stream(AsyncIn::blocking_skip(self.0, stream, len))
    }
    fn subscribe(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<Resource<Pollable>> {
        AsyncIn::subscribe(self.0, stream)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmtime::Store;

    use super::*;
    use crate::wasm::plugin::describe;

    struct Data(engine::CallClock);

    impl engine::Clocked for Data {
        fn call_clock(&mut self) -> &mut engine::CallClock {
            &mut self.0
        }
    }

    #[test]
    fn a_call_waiting_outside_wasm_is_stopped_at_its_wall_deadline() {
        let mut store = Store::new(
            engine::engine().unwrap(),
            Data(engine::CallClock::default()),
        );
        let started = Instant::now();
        engine::install(&mut store, Duration::from_millis(2));
        // A guest waiting in a pollable whose timer never fires.
        let r: wasmtime::Result<()> = inline(std::future::pending());
        let e = r.unwrap_err();
        assert_eq!(e.downcast_ref::<Trap>(), Some(&Trap::Interrupt));
        assert_eq!(describe(&e, Duration::from_millis(2)).0, "timeout");
        // Stopped (the future never ends by itself), and only past the wall
        // deadline.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2) * engine::WALL_FACTOR,
            "stopped after {took:?}"
        );
        let r: StreamResult<()> = inline_stream(std::future::pending());
        assert!(
            matches!(r, Err(StreamError::Trap(e)) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt))
        );
    }

    #[test]
    fn a_ready_call_is_not_stopped_even_past_the_deadline() {
        let mut store = Store::new(
            engine::engine().unwrap(),
            Data(engine::CallClock::default()),
        );
        engine::install(&mut store, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(inline(async { Ok(7) }).unwrap(), 7);
    }
}
