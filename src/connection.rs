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

use crate::auth::{UserId, unix_now};
use crate::channel::ChannelName;
use crate::history::{Cursor, StreamId, channel_hash};
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
    /// The node fell behind its bus and dropped live messages: the client resumes from history.
    Overflow,
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
            CloseReason::Overflow => "overflow",
        }
    }

    /// The `disconnected` event the client reads before the stream ends.
    pub fn farewell(self) -> Bytes {
        crate::frame::event(Some("disconnected"), None, &format!(r#"{{"reason":"{}"}}"#, self.label()))
    }
}

/// One entry of a stream's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Written as it is: heartbeats, farewells, events that are not in history.
    Raw(Bytes),
    /// An event recorded in history: written with the stream's cursor as `id:`, and skipped
    /// when the stream already delivered `id` on `channel` (a replayed entry arriving live).
    Event { channel: ChannelName, id: StreamId, frame: Bytes },
}

/// What the body writes next: an optional `id:` line, then the shared frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub id_line: Option<Bytes>,
    pub frame: Bytes,
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
    /// `channel_hash` of each channel, computed once for cursors.
    channel_hashes: Box<[u32]>,
    pub opened_at: Instant,
    /// Token `exp`, seconds since the UNIX epoch.
    pub token_expires_at: u64,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Item>,
    /// Room granted above `capacity` for a resume's replay, used up as the replay is written.
    allowance: usize,
    /// History position of each channel (same order as `channels`); empty when history is off.
    positions: Box<[StreamId]>,
    epoch: u32,
    closed: bool,
    /// Hub clock second of the last event queued (heartbeats excluded), for the inactivity timeout.
    last_event_at: u32,
    waker: Option<Waker>,
}

impl Connection {
    pub fn new(id: ConnectionId, user: UserId, channels: Box<[ChannelName]>, token_expires_at: u64, now: u32) -> Self {
        let channel_hashes = channels.iter().map(channel_hash).collect();
        Self {
            id,
            user,
            channels,
            channel_hashes,
            opened_at: Instant::now(),
            token_expires_at,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                allowance: 0,
                positions: Box::new([]),
                epoch: 0,
                closed: false,
                last_event_at: now,
                waker: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-written; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame. `now` is the hub clock; `None` for frames that are not events (heartbeats).
    pub fn push(&self, item: Item, capacity: usize, now: Option<u32>) -> Pushed {
        let waker = {
            let mut state = self.state();
            if state.closed {
                return Pushed::Closed;
            }
            if state.queue.len() >= capacity + state.allowance {
                return Pushed::Full;
            }
            state.queue.push_back(item);
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

    /// Starts history tracking: the epoch and per-channel positions the stream resumes from,
    /// and the entries it missed, written before anything that arrived live meanwhile.
    pub fn start_history(&self, epoch: u32, positions: Vec<StreamId>, replay: Vec<Item>) {
        debug_assert_eq!(positions.len(), self.channels.len());
        let mut state = self.state();
        state.epoch = epoch;
        state.positions = positions.into();
        state.allowance += replay.len();
        for item in replay.into_iter().rev() {
            state.queue.push_front(item);
        }
    }

    /// The stream's current resume cursor (`None` when history is off).
    pub fn cursor(&self) -> Option<String> {
        let state = self.state();
        self.cursor_of(&state)
    }

    /// (channel hash, position) pairs, the content of a cursor.
    fn positions<'a>(&'a self, state: &'a State) -> impl Iterator<Item = (u32, StreamId)> + 'a {
        self.channel_hashes.iter().copied().zip(state.positions.iter().copied())
    }

    fn cursor_of(&self, state: &State) -> Option<String> {
        if state.positions.is_empty() {
            return None;
        }
        Some(Cursor::encode(state.epoch, unix_now(), self.positions(state)))
    }

    /// Ends the stream after what is queued plus `farewell`. Returns false if already closed.
    pub fn close(&self, farewell: Bytes) -> bool {
        self.end(|queue| queue.push_back(Item::Raw(farewell)))
    }

    /// Ends the stream at once, dropping what is queued: the client is not reading.
    pub fn cut(&self) -> bool {
        self.end(VecDeque::clear)
    }

    fn end(&self, finish: impl FnOnce(&mut VecDeque<Item>)) -> bool {
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

    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let mut state = self.state();
        while let Some(item) = state.queue.pop_front() {
            state.allowance = state.allowance.saturating_sub(1);
            if state.queue.is_empty() && state.queue.capacity() > 64 {
                // A burst grew the queue; give the memory back once the client caught up.
                state.queue.shrink_to(8);
            }
            let (channel, id, frame) = match item {
                Item::Raw(frame) => return Poll::Ready(Some(Outgoing { id_line: None, frame })),
                Item::Event { channel, id, frame } => (channel, id, frame),
            };
            let Some(slot) = self.channels.iter().position(|c| *c == channel) else { continue };
            let Some(position) = state.positions.get_mut(slot) else {
                // History is off for this stream: write the event without a cursor.
                return Poll::Ready(Some(Outgoing { id_line: None, frame }));
            };
            if id <= *position {
                continue; // Already delivered (replayed from history, now arriving live).
            }
            *position = id;
            let id_line = Some(Cursor::id_line(state.epoch, unix_now(), self.positions(&state)));
            return Poll::Ready(Some(Outgoing { id_line, frame }));
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
    /// Written before anything else (the preamble), or after an `id:` line (the event it names).
    next: Option<Bytes>,
}

impl EventStream {
    pub fn new(membership: Membership, preamble: Bytes) -> Self {
        Self { membership, next: Some(preamble) }
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(next) = self.next.take() {
            return Poll::Ready(Some(Ok(Frame::data(next))));
        }
        match self.membership.connection().poll_next(cx) {
            Poll::Ready(Some(Outgoing { id_line: Some(id_line), frame })) => {
                self.next = Some(frame);
                Poll::Ready(Some(Ok(Frame::data(id_line))))
            }
            Poll::Ready(Some(Outgoing { id_line: None, frame })) => Poll::Ready(Some(Ok(Frame::data(frame)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
        Connection::new(ConnectionId(1), user, Box::new([ChannelName::from_bus("sse:user:u")]), u64::MAX, 0)
    }

    fn raw(b: &'static [u8]) -> Item {
        Item::Raw(Bytes::from_static(b))
    }

    fn out(b: &'static [u8]) -> Poll<Option<Outgoing>> {
        Poll::Ready(Some(Outgoing { id_line: None, frame: Bytes::from_static(b) }))
    }

    #[test]
    fn frames_come_out_in_order_and_a_push_wakes_the_reader() {
        let conn = connection();
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(conn.poll_next(&mut cx), Poll::Pending);
        assert_eq!(conn.push(raw(b"a"), 4, Some(5)), Pushed::Queued);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst), "push must wake the body");
        conn.push(raw(b"b"), 4, None);
        assert_eq!(conn.poll_next(&mut cx), out(b"a"));
        assert_eq!(conn.poll_next(&mut cx), out(b"b"));
        assert_eq!(conn.last_event_at(), 5, "heartbeats do not count as activity");
    }

    #[test]
    fn a_full_queue_is_reported_and_cut_drops_everything() {
        let conn = connection();
        for _ in 0..3 {
            assert_eq!(conn.push(raw(b"x"), 3, None), Pushed::Queued);
        }
        assert_eq!(conn.push(raw(b"x"), 3, None), Pushed::Full);
        assert!(conn.cut());
        assert!(!conn.cut(), "closing twice is a no-op");
        let waker = Waker::noop();
        assert_eq!(conn.poll_next(&mut Context::from_waker(waker)), Poll::Ready(None));
        assert_eq!(conn.push(raw(b"x"), 3, None), Pushed::Closed);
    }

    #[test]
    fn close_delivers_the_queue_then_the_farewell() {
        let conn = connection();
        conn.push(raw(b"last"), 3, None);
        assert!(conn.close(CloseReason::Replaced.farewell()));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(conn.poll_next(&mut cx), out(b"last"));
        assert_eq!(conn.poll_next(&mut cx), out(b"event: disconnected\ndata: {\"reason\":\"replaced\"}\n\n"));
        assert_eq!(conn.poll_next(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn replayed_entries_come_first_and_their_live_copies_are_dropped() {
        let conn = connection();
        let channel = ChannelName::from_bus("sse:user:u");
        let event = |seq: u64, frame: &'static [u8]| Item::Event {
            channel: channel.clone(),
            id: StreamId { ms: 10, seq },
            frame: Bytes::from_static(frame),
        };
        // Live copies of entries 2 and 3 arrived while the replay was being read.
        conn.push(event(2, b"two"), 4, None);
        conn.push(event(3, b"three"), 4, None);
        conn.start_history(7, vec![StreamId { ms: 10, seq: 0 }], vec![event(1, b"one"), event(2, b"two")]);
        let mut cx = Context::from_waker(Waker::noop());
        let mut frames = Vec::new();
        let mut last_cursor = None;
        while let Poll::Ready(Some(outgoing)) = conn.poll_next(&mut cx) {
            last_cursor = outgoing.id_line.clone();
            frames.push(outgoing.frame);
        }
        assert_eq!(frames, [Bytes::from_static(b"one"), Bytes::from_static(b"two"), Bytes::from_static(b"three")]);
        let line = String::from_utf8(last_cursor.expect("an id line").to_vec()).expect("utf8");
        let cursor = Cursor::decode(line.trim_start_matches("id: ").trim_end()).expect("a cursor");
        assert_eq!(cursor.epoch, 7);
        assert_eq!(cursor.position(&channel), Some(StreamId { ms: 10, seq: 3 }));
    }
}
