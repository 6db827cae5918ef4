//! The body types on the request path and the request-body size limit.
//!
//! Bodies are boxed once at the edge of the proxy so every stage passes one type.
//! They are `!Send` on purpose: each worker owns its requests from accept to
//! response (see ARCHITECTURE.md), so nothing needs to cross threads.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

/// The error type of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body anywhere in the proxy: a boxed body that need not be
/// `Send` (http-body-util's boxes all require `Send`).
pub struct Body(Pin<Box<dyn HttpBody<Data = Bytes, Error = BoxError>>>);

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.as_mut().poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// A body with these bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    boxed(Full::new(b.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    Body(Box::pin(b.map_err(Into::into)))
}

/// Sees a body's frames as they pass: the one wrapper behind the request-body
/// limit, returning pooled connections, and end-of-request bookkeeping.
pub trait Watch {
    /// Sees each frame; an error fails the body with it.
    fn frame(&mut self, _frame: &Frame<Bytes>) -> Result<(), BoxError> {
        Ok(())
    }
    /// The body is over: `complete` after its last frame, not on an error. A
    /// body dropped before its end just drops the watcher.
    fn end(self, _complete: bool)
    where
        Self: Sized,
    {
    }
}

/// A body with a [`Watch`].
pub struct Watched<B, W: Watch> {
    inner: B,
    watch: Option<W>,
}

impl<B: HttpBody, W: Watch> Watched<B, W> {
    /// Wraps `inner`. A body that is already at its end (hyper may never poll it)
    /// ends the watch at once.
    pub fn new(inner: B, watch: W) -> Self {
        let mut w = Watched {
            inner,
            watch: Some(watch),
        };
        if w.inner.is_end_stream() {
            w.finish(true);
        }
        w
    }

    fn finish(&mut self, complete: bool) {
        if let Some(w) = self.watch.take() {
            w.end(complete);
        }
    }
}

impl<B, W> HttpBody for Watched<B, W>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(w) = &mut this.watch {
                    if let Err(e) = w.frame(&frame) {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a body fails with once it passes the route's `max_request_body`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than the route's max_request_body")
    }
}
impl std::error::Error for BodyTooLarge {}

/// Fails a streamed body once more than its limit has gone by; the error is found
/// in the failure's source chain by [`crate::error::ProxyError::request_body`], so
/// the client gets 413 instead of 502.
pub struct Limit {
    /// Bytes still allowed.
    pub remaining: u64,
}

impl Watch for Limit {
    fn frame(&mut self, frame: &Frame<Bytes>) -> Result<(), BoxError> {
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        self.remaining = self.remaining.checked_sub(n).ok_or(BodyTooLarge)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limit_fails_the_body() {
        let b = Watched::new(full(vec![0u8; 10]), Limit { remaining: 5 });
        let err = b.collect().await.err().map(|e| e.is::<BodyTooLarge>());
        assert_eq!(err, Some(true));

        let b = Watched::new(full(vec![0u8; 5]), Limit { remaining: 5 });
        assert_eq!(b.collect().await.map(|c| c.to_bytes().len()).ok(), Some(5));
    }

    struct Ends(std::rc::Rc<std::cell::Cell<Option<bool>>>);
    impl Watch for Ends {
        fn end(self, complete: bool) {
            self.0.set(Some(complete));
        }
    }

    #[tokio::test]
    async fn watch_sees_the_end() {
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        // An empty body ends at once: hyper may never poll it.
        let _b = Watched::new(empty(), Ends(seen.clone()));
        assert_eq!(seen.get(), Some(true));

        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let b = Watched::new(full("abc"), Ends(seen.clone()));
        assert_eq!(seen.get(), None);
        let _ = b.collect().await;
        assert_eq!(seen.get(), Some(true));
    }
}
