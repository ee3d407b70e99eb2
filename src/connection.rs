//! One stream's life: its bounded queue of shared frames, how it is closed and why, and the
//! HTTP body that drains the queue into the socket.
//!
//! A connection costs one small allocation and no task, timer or channel of its own: the hub
//! pushes shared `Bytes` into its queue under a short mutex, heartbeats and timeouts come from
//! one node-wide ticker, and hyper's connection task polls the body. The queue starts empty
//! and grows only while the client is slower than the publishers; at `capacity` frames the
//! stream is cut off as a slow consumer rather than buffering without bound.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;

use crate::auth::UserId;
use crate::channel::ChannelName;
use crate::hub::Membership;

/// Node-local connection number; `connected` events show it as `<node>:<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

/// Why the node ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer stream of the same user took the place (per-user limit, `evict-oldest`).
    Replaced,
    /// The client did not read fast enough and its queue filled up.
    SlowConsumer,
    /// No event for the configured inactivity timeout.
    Inactive,
    /// The configured maximum lifetime elapsed.
    Lifetime,
    /// The token's `exp` passed; the client must reconnect with a fresh token.
    TokenExpired,
    /// The node is draining.
    Shutdown,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Replaced => "replaced",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Inactive => "inactive",
            CloseReason::Lifetime => "lifetime",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The `disconnected` event the client reads before the stream ends.
    pub fn farewell(self) -> Bytes {
        crate::frame::event(Some("disconnected"), None, &format!(r#"{{"reason":"{}"}}"#, self.label()))
    }
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full: the caller cuts the connection off.
    Full,
    /// The stream is already closing; the frame was dropped.
    Closed,
}

pub struct Connection {
    pub id: ConnectionId,
    pub user: UserId,
    pub channels: Box<[ChannelName]>,
    pub opened_at: Instant,
    /// Token `exp`, seconds since the UNIX epoch.
    pub token_expires_at: u64,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Bytes>,
    closed: bool,
    /// Hub clock second of the last event queued (heartbeats excluded), for the inactivity timeout.
    last_event_at: u32,
    waker: Option<Waker>,
}

impl Connection {
    pub fn new(id: ConnectionId, user: UserId, channels: Box<[ChannelName]>, token_expires_at: u64, now: u32) -> Self {
        Self {
            id,
            user,
            channels,
            opened_at: Instant::now(),
            token_expires_at,
            state: Mutex::new(State { queue: VecDeque::new(), closed: false, last_event_at: now, waker: None }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-written; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame. `now` is the hub clock; `None` for frames that are not events (heartbeats).
    pub fn push(&self, frame: Bytes, capacity: usize, now: Option<u32>) -> Pushed {
        let waker = {
            let mut state = self.state();
            if state.closed {
                return Pushed::Closed;
            }
            if state.queue.len() >= capacity {
                return Pushed::Full;
            }
            state.queue.push_back(frame);
            if let Some(now) = now {
                state.last_event_at = now;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Pushed::Queued
    }

    /// Ends the stream after what is queued plus `farewell`. Returns false if already closed.
    pub fn close(&self, farewell: Bytes) -> bool {
        self.end(|queue| queue.push_back(farewell))
    }

    /// Ends the stream at once, dropping what is queued: the client is not reading.
    pub fn cut(&self) -> bool {
        self.end(VecDeque::clear)
    }

    fn end(&self, finish: impl FnOnce(&mut VecDeque<Bytes>)) -> bool {
        let waker = {
            let mut state = self.state();
            if state.closed {
                return false;
            }
            finish(&mut state.queue);
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Hub clock second of the last event queued.
    pub fn last_event_at(&self) -> u32 {
        self.state().last_event_at
    }

    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = self.state();
        if let Some(frame) = state.queue.pop_front() {
            if state.queue.is_empty() && state.queue.capacity() > 64 {
                // A burst grew the queue; give the memory back once the client caught up.
                state.queue.shrink_to(8);
            }
            return Poll::Ready(Some(frame));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        // Registered under the lock: a push after we unlock sees this waker.
        if !state.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The response body of one stream: a preamble, then whatever the hub queues. Dropping it
/// (the client went away, or the stream ended) leaves the hub.
pub struct EventStream {
    membership: Membership,
    preamble: Option<Bytes>,
}

impl EventStream {
    pub fn new(membership: Membership, preamble: Bytes) -> Self {
        Self { membership, preamble: Some(preamble) }
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(preamble) = self.preamble.take() {
            return Poll::Ready(Some(Ok(Frame::data(preamble))));
        }
        self.membership.connection().poll_next(cx).map(|frame| frame.map(|f| Ok(Frame::data(f))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn connection() -> Connection {
        let user = UserId::new("u").expect("valid id");
        Connection::new(ConnectionId(1), user, Box::new([]), u64::MAX, 0)
    }

    #[test]
    fn frames_come_out_in_order_and_a_push_wakes_the_reader() {
        let conn = connection();
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(conn.poll_next(&mut cx), Poll::Pending);
        assert_eq!(conn.push(Bytes::from_static(b"a"), 4, Some(5)), Pushed::Queued);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst), "push must wake the body");
        conn.push(Bytes::from_static(b"b"), 4, None);
        assert_eq!(conn.poll_next(&mut cx), Poll::Ready(Some(Bytes::from_static(b"a"))));
        assert_eq!(conn.poll_next(&mut cx), Poll::Ready(Some(Bytes::from_static(b"b"))));
        assert_eq!(conn.last_event_at(), 5, "heartbeats do not count as activity");
    }

    #[test]
    fn a_full_queue_is_reported_and_cut_drops_everything() {
        let conn = connection();
        for _ in 0..3 {
            assert_eq!(conn.push(Bytes::from_static(b"x"), 3, None), Pushed::Queued);
        }
        assert_eq!(conn.push(Bytes::from_static(b"x"), 3, None), Pushed::Full);
        assert!(conn.cut());
        assert!(!conn.cut(), "closing twice is a no-op");
        let waker = Waker::noop();
        assert_eq!(conn.poll_next(&mut Context::from_waker(waker)), Poll::Ready(None));
        assert_eq!(conn.push(Bytes::from_static(b"x"), 3, None), Pushed::Closed);
    }

    #[test]
    fn close_delivers_the_queue_then_the_farewell() {
        let conn = connection();
        conn.push(Bytes::from_static(b"last"), 3, None);
        assert!(conn.close(CloseReason::Replaced.farewell()));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(conn.poll_next(&mut cx), Poll::Ready(Some(Bytes::from_static(b"last"))));
        let Poll::Ready(Some(farewell)) = conn.poll_next(&mut cx) else { panic!("farewell expected") };
        assert_eq!(&farewell[..], b"event: disconnected\ndata: {\"reason\":\"replaced\"}\n\n");
        assert_eq!(conn.poll_next(&mut cx), Poll::Ready(None));
    }
}
