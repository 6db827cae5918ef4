//! The body types on the request path and the request-body size limit.
//!
//! Bodies are boxed once at the edge of the proxy so every stage passes one type.
//! They are `!Send` on purpose: each worker owns its requests from accept to
//! response (see ARCHITECTURE.md), so nothing needs to cross threads.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
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

/// The error a [`Limited`] body fails with once its limit is passed.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than the route's max_request_body")
    }
}
impl std::error::Error for BodyTooLarge {}

/// Passes a streamed body through until more than `limit` bytes have gone by, then
/// fails it and raises `tripped`, so the request path can answer 413 instead of 502.
pub struct Limited {
    inner: Body,
    remaining: u64,
    tripped: Rc<Cell<bool>>,
}

impl Limited {
    /// Wraps `inner`; `tripped` becomes true if the limit is passed.
    pub fn new(inner: Body, limit: u64, tripped: Rc<Cell<bool>>) -> Self {
        Limited {
            inner,
            remaining: limit,
            tripped,
        }
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.tripped.set(true);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
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
    async fn limited_trips() {
        let tripped = Rc::new(Cell::new(false));
        let b = Limited::new(full(vec![0u8; 10]), 5, tripped.clone());
        assert!(b.collect().await.is_err());
        assert!(tripped.get());

        let ok = Rc::new(Cell::new(false));
        let b = Limited::new(full(vec![0u8; 5]), 5, ok.clone());
        assert_eq!(b.collect().await.map(|c| c.to_bytes().len()).ok(), Some(5));
        assert!(!ok.get());
    }
}
