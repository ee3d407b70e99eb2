//! A request body that must have arrived by a deadline. `SSE_REQUEST_TIMEOUT` covers a request's
//! head and body together: without this, a client that sends its head at once and then its body
//! a byte every few seconds would hold its connection, and a file, for as long as it likes. A
//! per-read idle timeout would not stop that client; a deadline for the whole body does.
//!
//! The route reading the body sees an error when the deadline passes; the accept layer then
//! answers `408 request_timeout` in the route's place (see [`Expired`]) and closes
//! the connection. A body nobody reads is never timed: hyper closes such a connection after its
//! response anyway.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a route reading a late body gets.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

pub struct DeadlineBody<B> {
    inner: B,
    /// `None` for a body that was complete from the start, and once it has ended.
    deadline: Option<Pin<Box<Sleep>>>,
    expired: Expired,
}

/// Tells, after the route has answered, whether the body it read came too late.
#[derive(Clone, Default)]
pub struct Expired(Arc<AtomicBool>);

impl Expired {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<B: Body> DeadlineBody<B> {
    /// Wraps `inner`, which must have ended by `deadline`.
    pub fn new(inner: B, deadline: Instant) -> (Self, Expired) {
        let deadline = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep_until(deadline)));
        let expired = Expired::default();
        (Self { inner, deadline, expired: expired.clone() }, expired)
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.expired.get() {
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() {
                this.deadline = None;
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            this.expired.0.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        Poll::Pending
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
    use std::time::Duration;

    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn a_body_still_arriving_at_the_deadline_fails_and_says_so() {
        // One byte, then nothing: the client stalls.
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x")))])
            .chain(futures_util::stream::pending());
        let (body, expired) = DeadlineBody::new(StreamBody::new(stream), Instant::now() + Duration::from_millis(50));
        let error = body.collect().await.expect_err("the body never ends");
        assert!(error.is::<BodyTimedOut>(), "{error}");
        assert!(expired.get());
    }

    #[tokio::test]
    async fn a_body_in_time_is_passed_through_and_never_expires() {
        let deadline = Instant::now() + Duration::from_millis(50);
        let (body, expired) = DeadlineBody::new(Full::new(Bytes::from_static(b"hello")), deadline);
        assert_eq!(body.collect().await.expect("in time").to_bytes(), "hello");
        tokio::time::sleep_until(deadline + Duration::from_millis(50)).await;
        assert!(!expired.get());
        let (empty, _) = DeadlineBody::new(Empty::<Bytes>::new(), Instant::now());
        assert!(empty.deadline.is_none(), "an empty body needs no timer");
    }
}
