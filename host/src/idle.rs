//! The stream idle timeout (Envoy's `stream_idle_timeout` and route
//! `idle_timeout`): one [`Clock`] per request holds the instant of the
//! stream's last activity (its request and response heads, body data and
//! trailers, either direction) and the timeout in force.
//!
//! Activity only stores an instant; nothing is re-armed per chunk. One timer
//! ([`Timer`]) waits for `last + timeout` and, when it fires, looks at `last`
//! again: moved on, it sleeps until the new deadline; not, the stream is idle.
//! Before the response head the timer races the request's future
//! ([`within`]: the client gets 408); after it, it lives in the response body
//! ([`Guarded`]), armed only once that body waits for data, and fails the
//! body (a reset stream, a closed HTTP/1.1 connection).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
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
}

impl Clock {
    /// A clock whose last activity is `start`.
    pub fn new(start: Instant, timeout: Option<Duration>) -> Rc<Self> {
        Rc::new(Clock {
            last: Cell::new(start),
            timeout: Cell::new(timeout),
            expired: Cell::new(false),
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
    fn poll_idle(&mut self, clock: &Clock, cx: &mut Context<'_>) -> Poll<()> {
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
        this.timer.poll_idle(this.clock, cx).map(|()| None)
    }
}

/// Marks a request body's frames as activity.
pub struct Activity(pub Rc<Clock>);

impl Watch for Activity {
    fn frame(&mut self, _frame: &Frame<Bytes>) -> Result<(), BoxError> {
        self.0.touch();
        Ok(())
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
/// and while it waits for one the stream's timer runs.
pub struct Guarded<B> {
    inner: B,
    clock: Rc<Clock>,
    timer: Timer,
}

impl<B> Guarded<B> {
    /// Guards `inner` with `clock`.
    pub fn new(inner: B, clock: Rc<Clock>) -> Self {
        Guarded {
            inner,
            clock,
            timer: Timer::default(),
        }
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.clock.touch();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.poll_idle(&this.clock, cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(StreamIdle)))),
                Poll::Pending => Poll::Pending,
            },
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
}
