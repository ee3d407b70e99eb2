//! The response body of `GET /events` when hyper serves the stream (a connection whose first
//! request was something else; see [`super::raw_stream`] for the usual path).
//!
//! It takes events the same way the raw path's task does, a batch at a time from
//! `Connection::poll_batch`, and hands hyper each piece (an `id:` line, a frame) as one data
//! frame, so the bytes are those the raw path writes; hyper does the chunked framing itself.
//! It owns the stream's [`Membership`] and its place among its client address's streams:
//! dropping the body (the client went away, the socket stalled, or the stream ended) leaves the
//! hub and gives the place back. It does not decide what is written, nor when a stream ends.

use std::cell::Cell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Frame;

use super::ip_limits::StreamSlot;
use crate::connection::{CloseReason, Next};
use crate::hub::Membership;

tokio::task_local! {
    /// Whether the socket of the hyper connection served by this task stalled. The socket
    /// ([`super::raw_stream::Prefixed`]) and the body of a stream it carries never meet, but
    /// both live in that connection's task, and hyper drops the body after the socket failed:
    /// this is how the body learns why its stream ended.
    static WRITE_STALLED: Cell<bool>;
}

/// Runs a hyper connection so that a stream it serves can tell a write stall from its client
/// leaving.
pub async fn watching_stalls<F: Future>(connection: F) -> F::Output {
    WRITE_STALLED.scope(Cell::new(false), connection).await
}

/// The socket of this task's hyper connection stalled (see [`watching_stalls`]).
pub fn write_stalled() {
    let _ = WRITE_STALLED.try_with(|stalled| stalled.set(true));
}

/// A burst can leave the body holding room for a full batch (128 pieces, 4 KiB); once that is
/// handed to hyper, only this much is kept, as the stream's queue does after a burst.
const KEPT_CAPACITY: usize = 8;

/// The response body of one stream: a preamble, then whatever the hub queues.
pub struct EventStream {
    membership: Membership,
    /// Taken from the stream but not yet handed to hyper: the preamble first, then a batch.
    pieces: VecDeque<Bytes>,
    _ip_slot: Option<StreamSlot>,
}

impl EventStream {
    pub fn new(membership: Membership, preamble: Bytes, ip_slot: Option<StreamSlot>) -> Self {
        Self { membership, pieces: VecDeque::from([preamble]), _ip_slot: ip_slot }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Dropped otherwise, the membership counts its client as gone (unless the node closed
        // the stream first, which counted it then).
        if WRITE_STALLED.try_with(Cell::get).unwrap_or(false) {
            self.membership.end(CloseReason::WriteStalled);
        }
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if let Some(piece) = this.pieces.pop_front() {
                if this.pieces.is_empty() && this.pieces.capacity() > 64 {
                    this.pieces.shrink_to(KEPT_CAPACITY);
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            // Without a socket the stream has no backlog: every piece is an unframed event.
            match ready!(this.membership.connection().poll_batch(cx, &mut this.pieces)) {
                Next::Write { .. } => continue,
                // A gzip stream that ended cleanly ends its member: the trailer, once.
                Next::Ended => {
                    return Poll::Ready(this.membership.connection().take_trailer().map(|t| Ok(Frame::data(t))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::task::Waker;
    use std::time::Duration;

    use http_body::Body;

    use super::*;
    use crate::auth::UserId;
    use crate::bus::memory::MemoryBus;
    use crate::channel::ChannelNames;
    use crate::config::PerUserPolicy;
    use crate::connection::CloseReason;
    use crate::history::StreamId;
    use crate::hub::{Hub, Limits};
    use crate::metrics::HubMetrics;

    fn hub() -> Arc<Hub> {
        let (bus, _inbound) = MemoryBus::new(ChannelNames::new("sse"), None);
        let limits = Limits {
            per_user: 0,
            per_user_policy: PerUserPolicy::Reject,
            per_node: 0,
            queue_capacity: 8,
            queue_max_bytes: 1 << 20,
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: true,
            token: Default::default(),
            compress_from: 512,
        };
        Hub::new(bus, "n1", limits, HubMetrics::new())
    }

    /// The next data frame hyper would get, `Ready(None)` at the end of the body.
    fn next(body: &mut EventStream) -> Poll<Option<Bytes>> {
        match Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(frame.into_data().expect("only data frames"))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    #[tokio::test]
    async fn the_body_is_the_preamble_then_each_id_line_and_frame_then_the_farewell() {
        let hub = hub();
        let channel = ChannelNames::new("sse").user("u");
        let joined = hub.join(UserId::new("u").expect("id"), vec![channel.clone()], u64::MAX).expect("joined");
        joined.membership.connection().start_history(1, vec![StreamId::ZERO], Vec::new());
        let mut body = EventStream::new(joined.membership, Bytes::from_static(b"retry: 1000\n\n"), None);
        assert_eq!(next(&mut body), Poll::Ready(Some(Bytes::from_static(b"retry: 1000\n\n"))));
        assert_eq!(next(&mut body), Poll::Pending);

        hub.deliver(channel.as_str(), Some(StreamId { ms: 5, seq: 0 }), br#"{"data":"one"}"#).await;
        hub.deliver(channel.as_str(), None, br#"{"data":"two"}"#).await;
        let Poll::Ready(Some(id_line)) = next(&mut body) else { panic!("the id line") };
        assert!(id_line.starts_with(b"id: ") && id_line.ends_with(b"\n"), "{id_line:?}");
        assert_eq!(next(&mut body), Poll::Ready(Some(Bytes::from_static(b"data: one\n\n"))));
        assert_eq!(next(&mut body), Poll::Ready(Some(Bytes::from_static(b"data: two\n\n"))));
        assert_eq!(next(&mut body), Poll::Pending);

        assert!(body.membership.connection().close(CloseReason::Shutdown.farewell()));
        assert_eq!(next(&mut body), Poll::Ready(Some(CloseReason::Shutdown.farewell())));
        assert_eq!(next(&mut body), Poll::Ready(None));
        drop(body);
        assert_eq!(hub.stats().connections, 0, "dropping the body leaves the hub");
    }
}
