//! The stream idle timeout (Envoy's `stream_idle_timeout` and route
//! `idle_timeout`): one [`Clock`] per request holds the instant of the
//! stream's last activity (its request and response heads, body data and
//! trailers, either direction) and the timeout in force.
//!
//! Activity only stores an instant; nothing is re-armed per chunk. One timer
//! ([`Timer`]) waits for `last + timeout` and, when it fires, looks at `last`
//! again: moved on, it sleeps until the new deadline; not, the stream is idle.
//! Before the response head the timer races the request's future
//! ([`within`]: the client gets 408). After it, the timer lives in the future
//! hyper sends the response from ([`Watching`]: the HTTP/1.1 connection, or
//! the HTTP/2 stream's task), not in the response body: hyper stops polling a
//! body while the client does not read (a full socket, an exhausted HTTP/2
//! window), and a timer there would stop with it. On expiry the body
//! ([`Guarded`]) fails if hyper polls it (hyper resets the stream or closes
//! the connection), and that future ends and is dropped: the HTTP/1.1
//! connection is closed, the HTTP/2 stream reset (h2 sends `RST_STREAM`
//! `CANCEL` for a stream nothing holds; the connection's other streams go on).
//!
//! The request future finds that future's [`Slot`] through [`Current`], set
//! while the future is polled: the request is polled inside it (hyper's
//! HTTP/1.1 dispatcher polls it in the connection; HTTP/2 runs each stream,
//! request future included, as one task given to the connection's executor).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, Watch};

/// One request's idle state, shared by its bodies and timer.
pub struct Clock {
    last: Cell<Instant>,
    /// The timeout in force: the listener's, then the matched route's.
    timeout: Cell<Option<Duration>>,
    expired: Cell<bool>,
    /// The request is over: nothing watches the stream any more.
    finished: Cell<bool>,
}

impl Clock {
    /// A clock whose last activity is `start`.
    pub fn new(start: Instant, timeout: Option<Duration>) -> Rc<Self> {
        Rc::new(Clock {
            last: Cell::new(start),
            timeout: Cell::new(timeout),
            expired: Cell::new(false),
            finished: Cell::new(false),
        })
    }

    /// Something moved on the stream.
    pub fn touch(&self) {
        self.last.set(Instant::now());
    }

    /// The timeout from now on (a route's `idle_timeout`); `None` disables it.
    pub fn set_timeout(&self, t: Option<Duration>) {
        self.timeout.set(t);
    }

    /// Whether a timeout is in force.
    pub fn enabled(&self) -> bool {
        self.timeout.get().is_some()
    }

    /// Whether the stream was ended by its idle timeout.
    pub fn expired(&self) -> bool {
        self.expired.get()
    }

    /// The request is over (its response body ended or was dropped): a
    /// [`Slot`] watching it lets it go.
    pub fn finish(&self) {
        self.finished.set(true);
    }

    fn finished(&self) -> bool {
        self.finished.get()
    }

    /// Activity at `at`, seen after the fact: moves the last activity
    /// forward only.
    fn touched_at(&self, at: Instant) {
        if at > self.last.get() {
            self.last.set(at);
        }
    }

    /// When the stream becomes idle (`None`: never, or too far to represent).
    fn deadline(&self) -> Option<Instant> {
        self.last.get().checked_add(self.timeout.get()?)
    }
}

/// The one timer of a stream: armed lazily, moved only when it fires or the
/// timeout changes.
#[derive(Default)]
pub struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<Duration>,
}

impl Timer {
    /// Ready once `clock` has seen no activity for its timeout (and marks it
    /// expired); registers `cx` to be woken then otherwise.
    ///
    /// `seen`, asked only when the timer fires, tells of activity the clock
    /// was not told about (bytes that left for the client): it moves the
    /// deadline as a touch would have.
    fn poll_idle(
        &mut self,
        clock: &Clock,
        seen: impl Fn() -> Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let Some(deadline) = clock.deadline() else {
            return Poll::Pending;
        };
        let timeout = clock.timeout.get();
        let changed = self.armed != timeout;
        self.armed = timeout;
        let sleep = match &mut self.sleep {
            Some(s) => {
                if changed {
                    // A route changed the timeout: a shorter one must not
                    // wait for the old deadline.
                    s.as_mut().reset(deadline);
                }
                s
            }
            slot => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: idle unless something moved since it was armed.
            if let Some(at) = seen() {
                clock.touched_at(at);
            }
            let Some(deadline) = clock.deadline() else {
                return Poll::Pending;
            };
            if Instant::now() >= deadline {
                clock.expired.set(true);
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// Runs `fut` (the request up to its response head) unless the stream goes
/// idle first: `None` then.
pub fn within<F: Future>(fut: F, clock: &Clock) -> Within<'_, F> {
    Within {
        fut,
        clock,
        timer: Timer::default(),
    }
}

pin_project_lite::pin_project! {
    /// [`within`]'s future. A struct, not an `async fn`: an `async fn` keeps
    /// its argument apart from the pinned copy it polls, so the request's
    /// whole state (kilobytes) would be held, and moved, twice.
    pub struct Within<'a, F> {
        #[pin]
        fut: F,
        clock: &'a Clock,
        timer: Timer,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Some(v));
        }
        // After the poll: a route matched in it may have set its timeout.
        this.timer.poll_idle(this.clock, || None, cx).map(|()| None)
    }
}

/// Marks a request body's frames as activity.
pub struct Activity(pub Rc<Clock>);

impl Watch for Activity {
    fn frame(&mut self, _frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        self.0.touch();
        Ok(())
    }
}

/// Where a stream's clock is watched once its response head is out: the
/// future hyper sends that response from owns one ([`Watching`]).
#[derive(Default)]
pub struct Slot(RefCell<Option<(Rc<Clock>, Timer)>>);

impl Slot {
    /// The response head is out: the stream's timer runs here from now on,
    /// until the clock is [`Clock::finish`]ed (or another stream's replaces it).
    pub fn watch(&self, clock: Rc<Clock>) {
        *self.0.borrow_mut() = Some((clock, Timer::default()));
    }

    /// Ready once the watched stream is idle. `writes`: the connection's
    /// writes are the stream's activity too (HTTP/1.1, one stream at a time).
    fn poll_idle(&self, writes: Option<&crate::io::Activity>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.0.borrow_mut();
        let Some((clock, timer)) = slot.as_mut() else {
            return Poll::Pending;
        };
        if clock.finished() {
            // The stream is over; its timer goes with it.
            *slot = None;
            return Poll::Pending;
        }
        // Asked only when the timer fires: bytes that left for the client
        // are progress, as what the body handed over (acknowledged ones are
        // seen only then: a client that stops reading after a slow while is
        // cut within two timeouts).
        let seen = || {
            writes
                .and_then(crate::io::Activity::last_progress)
                .map(Instant::from_std)
        };
        timer.poll_idle(clock, seen, cx)
    }
}

/// The [`Slot`] of the [`Watching`] future being polled right now, if any: a
/// request's future, polled inside it, finds there where its stream is sent
/// from. One per connection; all its futures run on one thread.
#[derive(Clone, Default)]
pub struct Current(Rc<Cell<Option<Rc<Slot>>>>);

impl Current {
    /// The slot of the future being polled.
    pub fn slot(&self) -> Option<Rc<Slot>> {
        let s = self.0.take();
        self.0.set(s.clone());
        s
    }

    /// `inner` with a slot of its own, published here while it is polled.
    /// `writes`: the connection whose writes are its stream's activity too,
    /// for a future that sends one stream at a time on it (HTTP/1.1).
    pub fn watching<F>(&self, inner: F, writes: Option<Arc<crate::io::Activity>>) -> Watching<F> {
        Watching {
            inner,
            slot: Rc::default(),
            current: self.clone(),
            writes,
        }
    }
}

pin_project_lite::pin_project! {
    /// A future that sends responses (an HTTP/1.1 connection, an HTTP/2
    /// stream's task), with the timer of the stream it sends: it ends with
    /// `None` once that stream is idle, and whoever drops it then ends the
    /// stream (hyper closes the connection, or resets the stream).
    pub struct Watching<F> {
        #[pin]
        inner: F,
        slot: Rc<Slot>,
        current: Current,
        writes: Option<Arc<crate::io::Activity>>,
    }
}

impl<F> Watching<F> {
    /// The future inside.
    pub fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F: Future> Watching<F> {
    /// Polls the inner future with its slot published.
    fn poll_inner(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let outer = this.current.0.replace(Some(this.slot.clone()));
        let r = this.inner.poll(cx);
        this.current.0.set(outer);
        r
    }
}

impl<F: Future> Future for Watching<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(v) = self.as_mut().poll_inner(cx) {
            return Poll::Ready(Some(v));
        }
        // After the poll: a response head sent in it may have started a watch
        // (or a body's end finished one).
        let this = self.as_mut().project();
        if this.slot.poll_idle(this.writes.as_deref(), cx).is_pending() {
            return Poll::Pending;
        }
        // Idle. A body hyper waits on fails now ([`Guarded`]): hyper ends the
        // stream its own way (`RST_STREAM`, or the HTTP/1.1 close) in this
        // poll. One it no longer polls (the client stopped reading) ends when
        // this future is dropped.
        let _ = self.poll_inner(cx);
        Poll::Ready(None)
    }
}

/// The error a response body fails with when its stream went idle: hyper
/// resets the HTTP/2 stream or closes the HTTP/1.1 connection.
#[derive(Debug)]
pub struct StreamIdle;

impl std::fmt::Display for StreamIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream idle timeout")
    }
}
impl std::error::Error for StreamIdle {}

/// A response body under the stream idle timeout: its frames are activity,
/// and once the stream expired it fails when polled. (The timer is not here:
/// hyper stops polling a body the client does not read. It is in
/// [`Watching`].)
pub struct Guarded<B> {
    inner: B,
    clock: Rc<Clock>,
}

impl<B> Guarded<B> {
    /// Guards `inner` with `clock`.
    pub fn new(inner: B, clock: Rc<Clock>) -> Self {
        Guarded { inner, clock }
    }
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.clock.expired() {
            return Poll::Ready(Some(Err(Box::new(StreamIdle))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.clock.touch();
                Poll::Ready(Some(Ok(f)))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activity_moves_the_deadline() {
        let ms = Duration::from_millis;
        let clock = Clock::new(Instant::now(), Some(ms(100)));
        let c = clock.clone();
        // Activity every 40ms for 200ms, then silence: idle only after it.
        let touching = async move {
            for _ in 0..5 {
                tokio::time::sleep(ms(40)).await;
                c.touch();
            }
            std::future::pending::<()>().await;
        };
        let start = Instant::now();
        assert!(within(touching, &clock).await.is_none());
        assert!(clock.expired());
        assert!(start.elapsed() >= ms(300));

        // A shorter timeout set while the timer waits applies (else this
        // would wait an hour, and fail the outer bound).
        let clock = Clock::new(Instant::now(), Some(Duration::from_secs(3600)));
        let c = clock.clone();
        let shorten = async move {
            tokio::time::sleep(ms(10)).await;
            c.set_timeout(Some(ms(20)));
            std::future::pending::<()>().await;
        };
        let r = tokio::time::timeout(Duration::from_secs(30), within(shorten, &clock)).await;
        assert!(matches!(r, Ok(None)));

        // Disabled: the future decides.
        let clock = Clock::new(Instant::now(), None);
        assert_eq!(within(async { 7 }, &clock).await, Some(7));
        assert!(!clock.expired());
    }

    #[tokio::test]
    async fn a_watched_stream_ends_its_sending_future() {
        let ms = Duration::from_millis;
        let current = Current::default();
        assert!(current.slot().is_none(), "no slot outside a watched future");
        // A future that starts a watch (as a response head does) and then
        // never moves (as a stalled send): the watch ends it.
        let clock = Clock::new(Instant::now(), Some(ms(20)));
        let (c, cur) = (clock.clone(), current.clone());
        let sending = async move {
            cur.slot().expect("the slot of the future polled").watch(c);
            std::future::pending::<()>().await;
        };
        let r =
            tokio::time::timeout(Duration::from_secs(30), current.watching(sending, None)).await;
        assert!(matches!(r, Ok(None)), "not ended by its idle stream");
        assert!(clock.expired());
        assert!(
            current.slot().is_none(),
            "the slot is published only while polled"
        );

        // A finished stream is let go: the future runs to its end.
        let clock = Clock::new(Instant::now(), Some(ms(20)));
        let (c, cur) = (clock.clone(), current.clone());
        let sending = async move {
            cur.slot()
                .expect("the slot of the future polled")
                .watch(c.clone());
            c.finish();
            tokio::time::sleep(ms(100)).await;
            7
        };
        assert_eq!(current.watching(sending, None).await, Some(7));
        assert!(!clock.expired());
    }
}
