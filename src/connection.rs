//! One stream's life: its bounded queue of shared frames, what it has delivered (the cursor
//! positions that drop a replayed entry arriving live), who may write its socket, and how it is
//! closed and why.
//!
//! A connection costs one small allocation and no timer or channel of its own: heartbeats and
//! timeouts come from one node-wide ticker. A stream served on the raw path hands its socket
//! to the connection ([`Connection::attach`]), and whoever delivers an event — the dispatcher
//! fanning out a broadcast, the ticker sending a heartbeat — writes it straight into that
//! socket when nothing is waiting before it: one `send` under the connection's mutex, no task
//! wake-up, no allocation. Only when the socket is full, or the stream's task is still writing
//! earlier bytes, does the event wait in the queue for that task, which then takes everything
//! queued in one batch (`Connection::poll_batch`). The queue starts empty and grows only
//! while the client is slower than the publishers; at its [`QueueLimit`] in frames or in bytes
//! the stream is cut off as a slow consumer rather than buffering without bound. Streams served
//! by hyper (no socket to attach) always go through the queue and take it with the same
//! `poll_batch`.
//!
//! Who may write the socket is one `Writer` state, changed only under the mutex. How the bytes
//! are framed and sent is not decided here but in [`crate::wire`]; neither is the HTTP
//! body that hyper polls (`crate::http::event_stream`), nor where the stream is listed (the hub).
//!
//! A stream whose client asked for gzip ([`Connection::start_gzip`]) writes each frame's shared
//! gzip piece instead of its plain bytes, and its own `id:` lines as stored blocks, on both
//! paths alike (the pieces are taken here, in the order they are written). All it keeps for
//! that is the 8-byte [`Member`] its trailer needs; the compressing is done once per message
//! by whoever first needs it ([`Frame::gzip`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::auth::{UserId, unix_now};
use crate::channel::ChannelName;
use crate::frame::Frame;
use crate::gzip::{self, Member};
use crate::history::{Cursor, StreamId, channel_hash};
use crate::wire::{self, Framing, MAX_BATCH, MAX_BATCH_BYTES, Sent};

/// Node-local connection number; `connected` events show it as `<node>:<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// How clients and operators see it: `<node>:<n>`, unique in the cluster.
    pub fn shown(self, node_id: &str) -> String {
        format!("{node_id}:{}", self.0)
    }
}

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
    /// The client went away (closed or reset its connection) while the stream was open.
    ClientClosed,
    /// The client's socket took no byte for the write stall timeout while the stream had
    /// something to write: it stopped reading.
    WriteStalled,
    /// An operator disconnected the user everywhere (`DELETE /api/users/<user>/connections`).
    Revoked,
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
            CloseReason::ClientClosed => "client_closed",
            CloseReason::WriteStalled => "write_stalled",
            CloseReason::Revoked => "revoked",
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
    Raw(Frame),
    /// An event recorded in history: written with the stream's cursor as `id:`, and skipped
    /// when the stream already delivered `id` on `channel` (a replayed entry arriving live).
    Event { channel: ChannelName, id: StreamId, frame: Frame },
    /// A `reset` for a channel whose history was lost while the stream was open (boxed: rare,
    /// and every queue slot is as large as the largest variant).
    Rebase(Arc<Rebase>),
}

/// Where a stream's cursor continues after a channel's history was lost: in `epoch`, with
/// `channel` at `tail`. Applied when the `reset` frame is written, which then carries the new
/// cursor as its `id:`, so what was queued before it keeps the old cursor and a client that
/// reconnects after it resumes in the new history instead of being reset a second time.
#[derive(Debug, PartialEq, Eq)]
pub struct Rebase {
    pub epoch: u32,
    pub channel: ChannelName,
    pub tail: StreamId,
    pub frame: Frame,
}

/// How much a stream's queue may hold before the stream is cut off as a slow consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimit {
    /// Frames queued (`SSE_QUEUE_CAPACITY`).
    pub frames: usize,
    /// Bytes waiting (`SSE_QUEUE_MAX_BYTES`): the frames queued and the rest of a direct send
    /// the socket cut short. Frames are counted whole even when the hub shares them between
    /// streams: each stream keeps them alive for as long as it holds them.
    pub bytes: u32,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Written into the socket, queued for the stream's task, or skipped as already delivered.
    Accepted,
    /// The queue was full: the caller cuts the connection off.
    Full,
    /// The stream is already closing; the frame was dropped.
    Closed,
    /// Writing into the socket failed: the client is gone, and this push ended the stream (the
    /// caller counts the close, as for every call that ends a stream).
    Gone,
}

/// What the stream's task does next, after `Connection::poll_batch`.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Write what was added to the pieces: first the rest of a direct send the socket cut short
    /// (already framed for the wire, written as it is), then, from index `events` on, events
    /// (`id:` lines and frames) that are not framed yet.
    Write { events: usize },
    /// The stream has ended and everything is handed out.
    Ended,
}

pub struct Connection {
    pub id: ConnectionId,
    pub user: UserId,
    pub channels: Box<[ChannelName]>,
    /// What the stream keeps per channel besides its name (same order as `channels`).
    per_channel: Box<[PerChannel]>,
    pub opened_at: Instant,
    /// The token's `exp` (seconds since the UNIX epoch), and in [`WARNED`] whether the stream was
    /// warned of it: one word, so a renewal replaces both at once and a warning is taken only
    /// for the `exp` that is current. Read by the ticker and renewals, never per event.
    token: AtomicU64,
    /// The stream's socket on the raw path, set once its head is written. Kept here rather than
    /// behind its own `Arc`: a fan-out touches every stream's connection anyway, and one more
    /// allocation per stream would be one more cache miss per delivery.
    socket: OnceLock<TcpStream>,
    state: Mutex<State>,
}

struct PerChannel {
    /// `channel_hash` of the channel, computed once for cursors.
    hash: u32,
    /// This stream's index in the hub's listener list of the channel, so that leaving does not
    /// search a list of thousands; [`NOT_LISTED`] once the stream left the channel (a renewed
    /// token no longer grants it). Read and written only under the hub's registry lock.
    listed_at: AtomicU32,
}

/// The bit of [`Connection::token`] set once `token_expiring` was sent for its `exp` (no `exp`
/// reaches it: that is 292 billion years away).
const WARNED: u64 = 1 << 63;

/// `listed_at` of a channel the stream left while it stays open. No list is that long: an index
/// is at most the number of streams.
const NOT_LISTED: u32 = u32::MAX;

/// Everything that changes while the stream lives, under one mutex (it sits in every stream:
/// keep it small; `a_stream_state_is_no_larger_than_before` guards its size).
struct State {
    queue: VecDeque<Item>,
    /// Room granted above the frame limit for a resume's replay, used up as the replay is
    /// written. The replay sits at the front of the queue, so it is the next `allowance` items.
    allowance: u32,
    /// Bytes waiting for the client, compared with [`QueueLimit::bytes`]: the frames in `queue`
    /// except the replay (which, as for the frame limit, does not count against the bound), and
    /// the writer's backlog. Zero whenever both are empty.
    queued_bytes: u32,
    /// History position of each channel (same order as `channels`); empty when history is off.
    positions: Box<[StreamId]>,
    epoch: u32,
    /// Hub clock second of the last event queued (heartbeats excluded), for the inactivity timeout.
    last_event_at: u32,
    waker: Option<Waker>,
    writer: Writer,
    /// The CRC and length of what a gzip stream wrote so far, for its trailer; `None` for a
    /// plain stream, and once a gzip stream can no longer end cleanly (cut off, or its socket
    /// failed), so that it gets no trailer.
    gzip: Option<Member>,
}

/// Who may write the stream's socket, and what must be written before the queue. One value
/// rather than separate flags, so that the combinations nothing handles cannot be built: a
/// direct write needs an attached socket nobody is writing; a backlog exists only while the
/// stream's task is writing (or draining a closed stream); nothing is accepted after the close.
///
/// ```text
/// Queued ──attach──▶ Idle ──socket full / task takes a batch──▶ Busy
///                     ▲                                          │
///                     └────────── task finds nothing left ───────┘
/// any ──close / cut / release / failed send──▶ Closed
/// ```
#[derive(Debug, PartialEq, Eq)]
enum Writer {
    /// No socket attached (hyper's body, or the raw path until its response head is out):
    /// every frame waits in the queue for the stream's task.
    Queued,
    /// The socket is attached and nobody is writing it: a push that finds the queue empty
    /// sends its event at once.
    Idle(Framing),
    /// The stream's task holds bytes it has not finished writing, so nobody else may write:
    /// pushes queue behind them. `backlog` is the rest of a direct send the socket cut short,
    /// which the task writes before anything queued.
    Busy { framing: Framing, backlog: Option<Bytes> },
    /// No more pushes. The task still writes `backlog` and what is queued (the farewell),
    /// then ends; after a cut, a failed send or the task's release both are empty.
    Closed { backlog: Option<Bytes> },
}

impl Writer {
    /// Takes the rest of a direct send, which the task writes first.
    fn take_backlog(&mut self) -> Option<Bytes> {
        match self {
            Writer::Busy { backlog, .. } | Writer::Closed { backlog } => backlog.take(),
            Writer::Queued | Writer::Idle(_) => None,
        }
    }

    /// The stream's task took bytes to write: direct writes wait until it is done.
    fn task_writes(&mut self) {
        if let Writer::Idle(framing) = *self {
            *self = Writer::Busy { framing, backlog: None };
        }
    }

    /// The stream's task wrote everything and found nothing left: direct writes resume.
    fn task_done(&mut self) {
        if let Writer::Busy { framing, backlog: None } = *self {
            *self = Writer::Idle(framing);
        }
    }
}

impl Connection {
    pub fn new(id: ConnectionId, user: UserId, channels: Box<[ChannelName]>, token_exp: u64, now: u32) -> Self {
        let per_channel =
            channels.iter().map(|c| PerChannel { hash: channel_hash(c), listed_at: AtomicU32::new(0) }).collect();
        Self {
            id,
            user,
            channels,
            per_channel,
            opened_at: Instant::now(),
            token: AtomicU64::new(token_exp & !WARNED),
            socket: OnceLock::new(),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                allowance: 0,
                queued_bytes: 0,
                positions: Box::new([]),
                epoch: 0,
                last_event_at: now,
                waker: None,
                writer: Writer::Queued,
                gzip: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-written; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on events may be written straight into `socket`, framed as `framing`. Called by
    /// the raw path once the response head and preamble are written; the stream's task then
    /// reaches the socket through [`Connection::socket`] (also when the stream closed meanwhile:
    /// it still writes the farewell).
    pub fn attach(&self, socket: TcpStream, framing: Framing) {
        let mut state = self.state();
        if self.socket.set(socket).is_ok() && state.writer == Writer::Queued {
            state.writer = Writer::Idle(framing);
        }
    }

    /// From now on the stream is a gzip member: what it writes next is gzip pieces. Returns what
    /// goes first on the wire, the gzip header and `preamble` (stored), which the member counts.
    /// Called before the stream's first write (its task, or an attach, comes later).
    pub fn start_gzip(&self, preamble: &[u8]) -> Bytes {
        let mut member = Member::default();
        member.add_bytes(preamble);
        self.state().gzip = Some(member);
        let mut out = Vec::with_capacity(gzip::HEADER.len() + preamble.len() + 5);
        out.extend_from_slice(&gzip::HEADER);
        gzip::put_stored(&mut out, preamble);
        Bytes::from(out)
    }

    /// The end of a gzip stream that ended cleanly (closed with its farewell, and everything
    /// handed to its task): the final block, CRC and length. Once; `None` for a plain stream or
    /// one that was cut off.
    pub fn take_trailer(&self) -> Option<Bytes> {
        self.state().gzip.take().map(|member| member.trailer())
    }

    /// Where the hub listed this stream among the listeners of `channels[slot]`.
    pub(crate) fn listed_at(&self, slot: usize) -> usize {
        self.per_channel.get(slot).map_or(usize::MAX, |c| c.listed_at.load(Ordering::Relaxed) as usize)
    }

    pub(crate) fn set_listed_at(&self, slot: usize, index: usize) {
        if let Some(c) = self.per_channel.get(slot) {
            c.listed_at.store(index as u32, Ordering::Relaxed);
        }
    }

    /// Whether the stream still listens on `channels[slot]` (it has not left it on a renewal).
    pub(crate) fn listens_at(&self, slot: usize) -> bool {
        self.per_channel.get(slot).is_some_and(|c| c.listed_at.load(Ordering::Relaxed) != NOT_LISTED)
    }

    /// The stream left `channels[slot]` for good (the hub took it off the channel's lists).
    pub(crate) fn unlist(&self, slot: usize) {
        if let Some(c) = self.per_channel.get(slot) {
            c.listed_at.store(NOT_LISTED, Ordering::Relaxed);
        }
    }

    /// The token's `exp` (seconds since the UNIX epoch).
    pub fn token_exp(&self) -> u64 {
        self.token.load(Ordering::Acquire) & !WARNED
    }

    /// A renewed token's `exp` replaces the old one: the stream lives until it (plus the leeway),
    /// and is warned again before it, unless it is the same `exp` (a page handed back the token
    /// it had: warning it again would only make it renew again, in a loop).
    pub(crate) fn renew_token(&self, exp: u64) {
        let exp = exp & !WARNED;
        let _ =
            self.token.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| (held & !WARNED != exp).then_some(exp));
    }

    /// True once per `exp`, and only while `exp` is the token's: the caller sends the
    /// `token_expiring` warning for it.
    pub(crate) fn take_warning(&self, exp: u64) -> bool {
        let exp = exp & !WARNED;
        self.token.compare_exchange(exp, exp | WARNED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Whether the stream was warned of its token's current `exp` already.
    pub(crate) fn warned(&self) -> bool {
        self.token.load(Ordering::Acquire) & WARNED != 0
    }

    /// Where `channel` is in `channels` (and so in `per_channel` and the cursor positions).
    fn slot_of(&self, channel: &ChannelName) -> Option<usize> {
        self.channels.iter().position(|c| c == channel)
    }

    /// The hub moved this stream from `from` to `to` in `channel`'s listener list (never a
    /// channel it left: `from` is an index, never `NOT_LISTED`).
    pub(crate) fn relist(&self, channel: &ChannelName, from: usize, to: usize) {
        let slot = (0..self.channels.len()).find(|&k| self.channels[k] == *channel && self.listed_at(k) == from);
        if let Some(slot) = slot {
            self.set_listed_at(slot, to);
        }
    }

    /// The socket given to [`Connection::attach`].
    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
    }

    /// Queues a frame, or writes it at once when the stream has a socket and nothing waits
    /// before it. `now` is the hub clock; `None` for frames that are not events (heartbeats).
    pub fn push(&self, item: &Item, limit: QueueLimit, now: Option<u32>) -> Pushed {
        let waker = {
            let mut state = self.state();
            if let Writer::Closed { .. } = state.writer {
                return Pushed::Closed;
            }
            if let Some(now) = now {
                state.last_event_at = now;
            }
            if let Writer::Idle(framing) = state.writer
                && state.queue.is_empty()
            {
                return self.write_direct(&mut state, framing, item);
            }
            if state.queue.len() >= limit.frames + state.allowance as usize || state.over_bytes(item, limit.bytes) {
                return Pushed::Full;
            }
            state.enqueue(item.clone());
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Pushed::Accepted
    }

    /// Writes one item into the socket under the lock (so nothing can overtake it). What the
    /// socket does not take becomes the backlog the stream's task writes when it can.
    fn write_direct(&self, state: &mut State, framing: Framing, item: &Item) -> Pushed {
        let sent = self.socket.get().and_then(|socket| {
            wire::direct(|mut send| {
                let Some(with_cursor) = self.admit(state, item) else { return Sent::All };
                if with_cursor {
                    let prefix = send.prefix();
                    let from = prefix.len();
                    if state.gzip.is_some() {
                        prefix.extend_from_slice(&[0; 5]); // room for the stored block's header
                    }
                    Cursor::put_id_line(prefix, state.epoch, unix_now(), self.positions(state));
                    if let Some(member) = state.gzip.as_mut() {
                        member.add_bytes(&prefix[from + 5..]);
                        gzip::wrap_stored(prefix, from);
                    }
                }
                let frame: &[u8] = match state.gzip.as_mut() {
                    Some(member) => {
                        let piece = item.shared().gzip();
                        member.add(piece);
                        piece.bytes()
                    }
                    None => item.frame(),
                };
                send.send(socket, framing, frame)
            })
        });
        let pushed = match sent {
            Some(Sent::All) => return Pushed::Accepted,
            Some(Sent::Rest(rest)) => {
                // A copy of the rest, held by this stream alone: it counts against the bound.
                state.queued_bytes = byte_count(&rest);
                state.writer = Writer::Busy { framing, backlog: Some(rest) };
                Pushed::Accepted
            }
            // The scratch buffer is in use: the task writes the item, untouched (not admitted).
            None => {
                state.enqueue(item.clone());
                Pushed::Accepted
            }
            Some(Sent::Failed) => {
                // The peer is gone: end the stream; its task notices and leaves the hub.
                state.drop_all();
                state.writer = Writer::Closed { backlog: None };
                state.gzip = None;
                Pushed::Gone
            }
        };
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        pushed
    }

    /// Starts history tracking: the epoch and per-channel positions the stream resumes from,
    /// and the entries it missed, written before anything that arrived live meanwhile.
    pub fn start_history(&self, epoch: u32, positions: Vec<StreamId>, replay: Vec<Item>) {
        debug_assert_eq!(positions.len(), self.channels.len());
        let mut state = self.state();
        state.epoch = epoch;
        state.positions = positions.into();
        state.allowance = state.allowance.saturating_add(u32::try_from(replay.len()).unwrap_or(u32::MAX));
        for item in replay.into_iter().rev() {
            state.queue.push_front(item);
        }
    }

    /// The stream's current resume cursor (`None` when history is off).
    pub fn cursor(&self) -> Option<String> {
        let state = self.state();
        if state.positions.is_empty() {
            return None;
        }
        Some(Cursor::encode(state.epoch, unix_now(), self.positions(&state)))
    }

    /// Whether the stream's cursor stands at `epoch` and `positions` (in the order of its
    /// channels): a long replay queues its next page once the stream has taken the previous one.
    pub fn is_at(&self, epoch: u32, positions: &[StreamId]) -> bool {
        let state = self.state();
        state.epoch == epoch && *state.positions == *positions
    }

    /// Where the stream stands in `channel`'s history (`None` when it does not listen to it, or
    /// without history).
    pub fn position_on(&self, channel: &ChannelName) -> Option<StreamId> {
        let slot = self.slot_of(channel)?;
        self.state().positions.get(slot).copied()
    }

    /// (channel hash, position) pairs, the content of a cursor.
    fn positions<'a>(&'a self, state: &'a State) -> impl Iterator<Item = (u32, StreamId)> + 'a {
        self.per_channel.iter().map(|c| c.hash).zip(state.positions.iter().copied())
    }

    /// Decides whether `item` is written: `None` when the stream already delivered it (a replayed
    /// entry arriving live), else whether an `id:` cursor line goes before it (the positions are
    /// advanced past it first).
    fn admit(&self, state: &mut State, item: &Item) -> Option<bool> {
        let (channel, id) = match item {
            Item::Raw(_) => return Some(false),
            Item::Event { channel, id, .. } => (channel, id),
            Item::Rebase(rebase) => {
                let Some(position) = self.slot_of(&rebase.channel).and_then(|slot| state.positions.get_mut(slot))
                else {
                    return Some(false); // Not this stream's channel, or history is off for it.
                };
                *position = rebase.tail;
                state.epoch = rebase.epoch;
                return Some(true);
            }
        };
        let slot = self.slot_of(channel)?;
        let Some(position) = state.positions.get_mut(slot) else {
            return Some(false); // History is off for this stream: no cursor.
        };
        if *id <= *position {
            return None;
        }
        *position = *id;
        Some(true)
    }

    /// Moves the next queued item into `pieces`, behind its `id:` line if it gets one;
    /// duplicates are skipped. Returns the size of the frame taken, `None` when nothing is left.
    fn take_next(&self, state: &mut State, pieces: &mut VecDeque<Bytes>) -> Option<usize> {
        while let Some(item) = state.queue.pop_front() {
            let size = item.frame().len();
            if state.allowance > 0 {
                state.allowance -= 1; // A replayed item: never counted in bytes.
            } else {
                state.queued_bytes = state.queued_bytes.saturating_sub(byte_count(item.frame()));
            }
            if state.queue.is_empty() {
                // The backlog went first (`poll_batch`): nothing waits, whatever rounding did.
                state.queued_bytes = 0;
                if state.queue.capacity() > 64 {
                    // A burst grew the queue; give the memory back once the client caught up.
                    state.queue.shrink_to(8);
                }
            }
            let Some(with_cursor) = self.admit(state, &item) else { continue };
            if with_cursor {
                if state.gzip.is_some() {
                    let mut line = vec![0; 5];
                    Cursor::put_id_line(&mut line, state.epoch, unix_now(), self.positions(state));
                    if let Some(member) = state.gzip.as_mut() {
                        member.add_bytes(&line[5..]);
                    }
                    gzip::wrap_stored(&mut line, 0);
                    pieces.push_back(Bytes::from(line));
                } else {
                    pieces.push_back(Cursor::id_line(state.epoch, unix_now(), self.positions(state)));
                }
            }
            match state.gzip.as_mut() {
                Some(member) => {
                    let piece = item.shared().gzip();
                    member.add(piece);
                    pieces.push_back(piece.bytes().clone());
                }
                None => pieces.push_back(item.into_frame()),
            }
            return Some(size);
        }
        None
    }

    /// Ends the stream after what is queued plus `farewell`. Returns false if already closed.
    /// Every call that ends a stream (this, [`Connection::cut`], [`Connection::release`], a
    /// push answered [`Pushed::Gone`]) says whether it was the one: its caller counts the
    /// close, so each stream is counted once, for the reason that actually ended it.
    #[must_use = "the caller that ends a stream counts its close"]
    pub fn close(&self, farewell: Bytes) -> bool {
        self.end(Some(farewell))
    }

    /// Ends the stream at once, dropping what is queued: the client is not reading.
    #[must_use = "the caller that ends a stream counts its close"]
    pub fn cut(&self) -> bool {
        let cut = self.end(None);
        if cut && let Some(socket) = self.socket.get() {
            // The stream's task may be waiting for the client to read what it is writing.
            // Shut down, the socket fails that write at once: the task, its batch and the socket
            // go now rather than after the write stall timeout, and the client sees the end.
            let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
        }
        cut
    }

    /// Closes the stream to pushes; what was accepted before is still handed to its task after
    /// a close (with the farewell last), and dropped after a cut (no farewell).
    fn end(&self, farewell: Option<Bytes>) -> bool {
        let waker = {
            let mut state = self.state();
            if let Writer::Closed { .. } = state.writer {
                return false;
            }
            match farewell {
                Some(farewell) => {
                    state.enqueue(Item::Raw(farewell.into()));
                    let backlog = state.writer.take_backlog();
                    state.writer = Writer::Closed { backlog };
                }
                None => {
                    state.drop_all();
                    state.writer = Writer::Closed { backlog: None };
                    state.gzip = None; // Cut short: no trailer claims the stream is whole.
                }
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// The stream's task is done with it: nothing more is written into the socket but what the
    /// task itself writes last (the end of the body). True when the stream was still open, so
    /// that this ended it (the client left, or its socket stalled).
    #[must_use = "the caller that ends a stream counts its close"]
    pub fn release(&self) -> bool {
        let mut state = self.state();
        let was_open = !matches!(state.writer, Writer::Closed { .. });
        state.writer = Writer::Closed { backlog: None };
        state.drop_all();
        was_open
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state().writer, Writer::Closed { .. })
    }

    /// Hub clock second of the last event queued.
    pub fn last_event_at(&self) -> u32 {
        self.state().last_event_at
    }

    /// For the stream's task, on either path: appends to `pieces` what it writes next — the rest
    /// of a direct send the socket cut short, then up to [`MAX_BATCH`] queued events — or
    /// registers to be woken. While the task holds those bytes nobody else writes the socket;
    /// once it finds nothing left, direct writes resume.
    pub(crate) fn poll_batch(&self, cx: &mut Context<'_>, pieces: &mut VecDeque<Bytes>) -> Poll<Next> {
        let mut state = self.state();
        let before = pieces.len();
        let backlog = state.writer.take_backlog();
        let mut taken = backlog.as_ref().map_or(0, Bytes::len);
        if let Some(backlog) = backlog {
            state.queued_bytes = state.queued_bytes.saturating_sub(byte_count(&backlog));
            pieces.push_back(backlog);
        }
        let events = pieces.len();
        // Bounded in bytes too: what the task holds while the socket is full stays small,
        // and the rest keeps counting against the stream's bound where it waits.
        while pieces.len() - events < MAX_BATCH * 2
            && taken < MAX_BATCH_BYTES
            && let Some(size) = self.take_next(&mut state, pieces)
        {
            taken += size;
        }
        if pieces.len() > before {
            state.writer.task_writes();
            return Poll::Ready(Next::Write { events });
        }
        state.writer.task_done();
        if let Writer::Closed { .. } = state.writer {
            return Poll::Ready(Next::Ended);
        }
        register(&mut state, cx);
        Poll::Pending
    }
}

impl State {
    /// Whether queuing `item` would take the bytes waiting past `bound`. An empty stream takes
    /// any one event, however large: the bound is on a client falling behind, not on event size.
    fn over_bytes(&self, item: &Item, bound: u32) -> bool {
        self.queued_bytes > 0 && u64::from(self.queued_bytes) + item.frame().len() as u64 > u64::from(bound)
    }

    /// Queues `item` at the back, counting its bytes.
    fn enqueue(&mut self, item: Item) {
        self.queued_bytes = self.queued_bytes.saturating_add(byte_count(item.frame()));
        self.queue.push_back(item);
    }

    /// Forgets everything waiting (the backlog is the caller's to drop with the writer state).
    fn drop_all(&mut self) {
        self.queue.clear();
        self.queued_bytes = 0;
    }
}

/// A frame's size as the stream's byte count holds it (saturating: a count never wraps).
fn byte_count(frame: &Bytes) -> u32 {
    u32::try_from(frame.len()).unwrap_or(u32::MAX)
}

/// Registered under the lock: a push after we unlock sees this waker.
fn register(state: &mut State, cx: &Context<'_>) {
    if !state.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        state.waker = Some(cx.waker().clone());
    }
}

impl Item {
    /// The shared frame, with its gzip piece.
    pub(crate) fn shared(&self) -> &Frame {
        match self {
            Item::Raw(frame) | Item::Event { frame, .. } => frame,
            Item::Rebase(rebase) => &rebase.frame,
        }
    }

    /// The plain bytes.
    pub(crate) fn frame(&self) -> &Bytes {
        self.shared().plain()
    }

    fn into_frame(self) -> Bytes {
        self.frame().clone()
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

    const STALL: std::time::Duration = std::time::Duration::from_secs(30);

    /// A limit in frames only.
    fn frames(frames: usize) -> QueueLimit {
        QueueLimit { frames, bytes: u32::MAX }
    }

    fn raw(b: &'static [u8]) -> Item {
        Item::Raw(Bytes::from_static(b).into())
    }

    /// What the stream's task is handed next (unframed, as hyper's body takes it): `None` once
    /// the stream has ended.
    fn batch(conn: &Connection, cx: &mut Context<'_>) -> Poll<Option<Vec<Bytes>>> {
        let mut pieces = VecDeque::new();
        let next = conn.poll_batch(cx, &mut pieces);
        next.map(|next| match next {
            Next::Write { events } => {
                assert_eq!(events, 0, "no backlog without a socket");
                Some(pieces.into())
            }
            Next::Ended => None,
        })
    }

    fn pieces(list: &[&'static [u8]]) -> Poll<Option<Vec<Bytes>>> {
        Poll::Ready(Some(list.iter().map(|b| Bytes::from_static(b)).collect()))
    }

    /// A history entry of `channel` at `ms-seq`.
    fn entry(channel: &ChannelName, ms: u64, seq: u64, frame: impl Into<Bytes>) -> Item {
        Item::Event { channel: channel.clone(), id: StreamId { ms, seq }, frame: Frame::from(frame.into()) }
    }

    fn is_id_line(piece: &[u8]) -> bool {
        piece.starts_with(b"id: ")
    }

    /// The cursor of an `id: <cursor>` line.
    fn cursor_in(id_line: &[u8]) -> Cursor {
        let line = std::str::from_utf8(id_line).expect("utf8");
        Cursor::decode(line.trim_start_matches("id: ").trim_end()).expect("a cursor")
    }

    #[test]
    fn frames_come_out_in_order_and_a_push_wakes_the_reader() {
        let conn = connection();
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(batch(&conn, &mut cx), Poll::Pending);
        assert_eq!(conn.push(&raw(b"a"), frames(4), Some(5)), Pushed::Accepted);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst), "push must wake the body");
        conn.push(&raw(b"b"), frames(4), None);
        assert_eq!(batch(&conn, &mut cx), pieces(&[b"a", b"b"]));
        assert_eq!(batch(&conn, &mut cx), Poll::Pending);
        assert_eq!(conn.last_event_at(), 5, "heartbeats do not count as activity");
    }

    #[test]
    fn a_batch_takes_a_bounded_number_of_events() {
        let conn = connection();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..MAX_BATCH * 3 {
            assert_eq!(conn.push(&raw(b"x"), frames(MAX_BATCH * 3), None), Pushed::Accepted);
        }
        let Poll::Ready(Some(first)) = batch(&conn, &mut cx) else { panic!("a batch") };
        assert_eq!(first.len(), MAX_BATCH * 2, "raw frames: no id lines, so twice as many frames");
        let Poll::Ready(Some(second)) = batch(&conn, &mut cx) else { panic!("the rest") };
        assert_eq!(second.len(), MAX_BATCH);
    }

    #[test]
    fn a_full_queue_is_reported_and_cut_drops_everything() {
        let conn = connection();
        for _ in 0..3 {
            assert_eq!(conn.push(&raw(b"x"), frames(3), None), Pushed::Accepted);
        }
        assert_eq!(conn.push(&raw(b"x"), frames(3), None), Pushed::Full);
        assert!(conn.cut());
        assert!(!conn.cut(), "closing twice is a no-op");
        assert_eq!(batch(&conn, &mut Context::from_waker(Waker::noop())), Poll::Ready(None));
        assert_eq!(conn.push(&raw(b"x"), frames(3), None), Pushed::Closed);
    }

    /// A limit in bytes only.
    fn bytes(bytes: u32) -> QueueLimit {
        QueueLimit { frames: usize::MAX / 2, bytes }
    }

    fn sized(len: usize) -> Item {
        Item::Raw(Bytes::from(vec![b'x'; len]).into())
    }

    fn queued_bytes(conn: &Connection) -> u32 {
        conn.state().queued_bytes
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_an_empty_one_takes_any_event() {
        let conn = connection();
        let limit = bytes(1000);
        assert_eq!(conn.push(&sized(400), limit, None), Pushed::Accepted);
        assert_eq!(conn.push(&sized(600), limit, None), Pushed::Accepted, "exactly at the bound");
        assert_eq!(queued_bytes(&conn), 1000);
        assert_eq!(conn.push(&sized(1), limit, None), Pushed::Full, "one byte past it");
        // Taking events gives their bytes back.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(batch(&conn, &mut cx), Poll::Ready(Some(frames)) if frames.len() == 2));
        assert_eq!(queued_bytes(&conn), 0);
        // An event larger than the whole bound still reaches a stream that has nothing waiting.
        assert_eq!(conn.push(&sized(5000), limit, None), Pushed::Accepted);
        assert_eq!(conn.push(&sized(1), limit, None), Pushed::Full);
        assert!(conn.cut());
        assert_eq!(queued_bytes(&conn), 0, "a cut forgets what waited");
    }

    #[test]
    fn a_replay_larger_than_the_bound_is_not_cut_and_live_events_still_get_the_whole_bound() {
        let conn = connection();
        let channel = ChannelName::from_bus("sse:user:u");
        let limit = bytes(1000);
        // A live event arrived while history was read; then a replay of 3000 bytes.
        conn.push(&entry(&channel, 10, 9, vec![b'l'; 500]), limit, None);
        let replay = (1..=3).map(|seq| entry(&channel, 10, seq, vec![b'r'; 1000])).collect();
        conn.start_history(1, vec![StreamId::ZERO], replay);
        assert_eq!(queued_bytes(&conn), 500, "the replay does not count");
        assert_eq!(conn.push(&entry(&channel, 10, 10, vec![b'l'; 500]), limit, None), Pushed::Accepted);
        assert_eq!(conn.push(&entry(&channel, 10, 11, vec![b'l'; 1]), limit, None), Pushed::Full);
        // Writing the replay leaves the live events' bytes counted, and nothing else.
        let mut pieces = VecDeque::new();
        {
            let mut state = conn.state();
            for _ in 0..3 {
                assert_eq!(conn.take_next(&mut state, &mut pieces), Some(1000), "a replayed entry");
            }
            assert_eq!(state.queued_bytes, 1000);
        }
        let _ = batch(&conn, &mut Context::from_waker(Waker::noop()));
        assert_eq!(queued_bytes(&conn), 0);
    }

    #[test]
    fn a_batch_takes_a_bounded_number_of_bytes_and_what_is_left_keeps_counting() {
        let conn = connection();
        let size = 20 * 1024;
        for _ in 0..10 {
            assert_eq!(conn.push(&sized(size), bytes(u32::MAX), None), Pushed::Accepted);
        }
        let Poll::Ready(Some(first)) = batch(&conn, &mut Context::from_waker(Waker::noop())) else { panic!("a batch") };
        // Events are taken whole until the batch holds at least MAX_BATCH_BYTES.
        assert_eq!(first.len(), MAX_BATCH_BYTES.div_ceil(size));
        assert_eq!(queued_bytes(&conn) as usize, (10 - first.len()) * size);
    }

    #[test]
    fn release_says_whether_it_ended_the_stream() {
        let conn = connection();
        conn.push(&sized(10), bytes(100), None);
        assert!(conn.release(), "open until now: the task ended it");
        assert!(!conn.release());
        assert!(!conn.close(Bytes::new()) && !conn.cut(), "nothing ends a stream twice");
        assert_eq!(queued_bytes(&conn), 0);
        let closed = connection();
        assert!(closed.close(Bytes::from_static(b"bye")));
        assert!(!closed.release(), "closed by the node first: not the task's to count");
    }

    #[test]
    fn close_delivers_the_queue_then_the_farewell() {
        let conn = connection();
        conn.push(&raw(b"last"), frames(3), None);
        assert!(conn.close(CloseReason::Replaced.farewell()));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            batch(&conn, &mut cx),
            pieces(&[b"last", b"event: disconnected\ndata: {\"reason\":\"replaced\"}\n\n"])
        );
        assert_eq!(batch(&conn, &mut cx), Poll::Ready(None));
    }

    #[test]
    fn replayed_entries_come_first_and_their_live_copies_are_dropped() {
        let conn = connection();
        let channel = ChannelName::from_bus("sse:user:u");
        let event = |seq: u64, frame: &'static [u8]| entry(&channel, 10, seq, frame);
        // Live copies of entries 2 and 3 arrived while the replay was being read.
        conn.push(&event(2, b"two"), frames(4), None);
        conn.push(&event(3, b"three"), frames(4), None);
        conn.start_history(7, vec![StreamId { ms: 10, seq: 0 }], vec![event(1, b"one"), event(2, b"two")]);
        let Poll::Ready(Some(written)) = batch(&conn, &mut Context::from_waker(Waker::noop())) else {
            panic!("a batch")
        };
        let (ids, frames): (Vec<Bytes>, Vec<Bytes>) = written.into_iter().partition(|p| is_id_line(p));
        assert_eq!(frames, [Bytes::from_static(b"one"), Bytes::from_static(b"two"), Bytes::from_static(b"three")]);
        assert_eq!(ids.len(), 3, "each event behind its id line");
        let cursor = cursor_in(ids.last().expect("an id line"));
        assert_eq!(cursor.epoch, 7);
        assert_eq!(cursor.position(&channel), Some(StreamId { ms: 10, seq: 3 }));
    }

    #[test]
    fn a_rebase_moves_the_cursor_to_the_new_history_where_the_reset_is_written() {
        let conn = connection();
        let channel = ChannelName::from_bus("sse:user:u");
        let event = |ms: u64, frame: &'static [u8]| entry(&channel, ms, 0, frame);
        let at = |id_line: &Bytes| {
            let cursor = cursor_in(id_line);
            (cursor.epoch, cursor.position(&channel))
        };
        conn.start_history(7, vec![StreamId { ms: 50, seq: 0 }], Vec::new());
        // Queued before the loss: keeps the old history's cursor.
        conn.push(&event(60, b"old"), frames(8), None);
        let reset = Bytes::from_static(b"event: reset\n\n");
        let rebase = Rebase {
            epoch: 9,
            channel: channel.clone(),
            tail: StreamId { ms: 20, seq: 0 },
            frame: reset.clone().into(),
        };
        conn.push(&Item::Rebase(Arc::new(rebase)), frames(8), None);
        // The new history's ids are below the old position (restored from an older snapshot).
        conn.push(&event(30, b"new"), frames(8), None);
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Some(written)) = batch(&conn, &mut cx) else { panic!("a batch") };
        let [old_id, old, reset_id, written_reset, new_id, new] = &written[..] else {
            panic!("three events behind their id lines (an event after the reset is not a duplicate): {written:?}")
        };
        assert_eq!((old, at(old_id)), (&Bytes::from_static(b"old"), (7, Some(StreamId { ms: 60, seq: 0 }))));
        assert_eq!((written_reset, at(reset_id)), (&reset, (9, Some(StreamId { ms: 20, seq: 0 }))));
        assert_eq!((new, at(new_id).0), (&Bytes::from_static(b"new"), 9));
        // A rebase for a channel the stream does not have is written as it is.
        let other = Rebase {
            epoch: 9,
            channel: ChannelName::from_bus("sse:topic:x"),
            tail: StreamId::ZERO,
            frame: reset.into(),
        };
        conn.push(&Item::Rebase(Arc::new(other)), frames(8), None);
        assert_eq!(batch(&conn, &mut cx), pieces(&[b"event: reset\n\n"]));
    }

    /// A connected loopback pair: (server side, client side).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    /// Does what the raw path's task does: writes whatever the connection hands it, until the end.
    async fn run_writer(conn: Arc<Connection>, framing: Framing) {
        let socket = conn.socket().expect("attached");
        let mut pieces = VecDeque::new();
        loop {
            let next = std::future::poll_fn(|cx| conn.poll_batch(cx, &mut pieces)).await;
            let Next::Write { events } = next else { break };
            framing.frame_batch(&mut pieces, events);
            wire::write_all(socket, &mut pieces, STALL).await.expect("written");
        }
        assert!(!conn.release(), "the stream ended before its task let go of it");
        assert_eq!(conn.push(&raw(b"data: late\n\n"), frames(8), None), Pushed::Closed);
        pieces.extend(framing.end_of_body());
        wire::write_all(socket, &mut pieces, STALL).await.expect("written");
        socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write).expect("shutdown");
    }

    /// Everything the client reads until the server closes, chunk framing removed.
    async fn read_chunked(mut client: TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.expect("read");
        let mut body = Vec::new();
        let mut rest = &wire[..];
        loop {
            let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                panic!(
                    "no chunk-size line after {} bytes: {:?}",
                    body.len(),
                    String::from_utf8_lossy(&rest[..rest.len().min(60)])
                );
            };
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).expect("ascii"), 16).expect("hex");
            rest = &rest[line_end + 2..];
            if size == 0 {
                assert!(rest == b"\r\n", "the last chunk ends the body: {} bytes after it", rest.len());
                return body;
            }
            body.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n", "a chunk ends with CRLF");
            rest = &rest[size + 2..];
        }
    }

    #[tokio::test]
    async fn an_attached_stream_is_written_at_once_without_its_task() {
        let (server, mut client) = socket_pair().await;
        let conn = connection();
        conn.attach(server, Framing::Chunked);
        assert_eq!(conn.push(&raw(b"data: a\n\n"), frames(4), Some(1)), Pushed::Accepted);
        let big = Bytes::from(format!("data: {}\n\n", "b".repeat(wire::COPY_MAX)));
        assert_eq!(conn.push(&Item::Raw(big.clone().into()), frames(4), None), Pushed::Accepted);
        // Nothing waits for a task: the queue is empty and the bytes are on the wire.
        let mut pieces = VecDeque::new();
        assert_eq!(conn.poll_batch(&mut Context::from_waker(Waker::noop()), &mut pieces), Poll::Pending);
        let expected = [
            b"9\r\ndata: a\n\n\r\n".to_vec(),
            format!("{:x}\r\n", big.len()).into_bytes(),
            big.to_vec(),
            b"\r\n".to_vec(),
        ]
        .concat();
        let mut wire = vec![0u8; expected.len()];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut wire).await.expect("read");
        assert!(wire == expected, "wire: {:?}", String::from_utf8_lossy(&wire[..40]));
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_gets_everything_in_order_once_it_reads_again() {
        let (server, client) = socket_pair().await;
        let conn = Arc::new(connection());
        conn.attach(server, Framing::Chunked);
        let writer = tokio::spawn(run_writer(conn.clone(), Framing::Chunked));
        // Far more than the socket buffers hold while nobody reads: the rest must queue behind
        // the backlog of the direct write the socket cut short, in order.
        let events = 3000;
        let mut expected = Vec::new();
        for seq in 0..events {
            let frame = Bytes::from(format!("data: {seq} {}\n\n", "x".repeat(seq % 3000)));
            expected.extend_from_slice(&frame);
            assert_eq!(conn.push(&Item::Raw(frame.into()), frames(events), None), Pushed::Accepted);
            if seq % 100 == 0 {
                tokio::task::yield_now().await; // let the task write some in between
            }
        }
        {
            let state = conn.state();
            assert!(
                matches!(state.writer, Writer::Busy { .. }) && !state.queue.is_empty(),
                "the socket filled up and events queued"
            );
        }
        assert!(conn.close(Bytes::from_static(b"data: end\n\n")));
        expected.extend_from_slice(b"data: end\n\n");
        let body = read_chunked(client).await;
        assert!(body == expected, "{} bytes read, {} expected", body.len(), expected.len());
        writer.await.expect("the writer ends");
    }

    #[tokio::test]
    async fn direct_writes_carry_the_cursor_and_skip_what_was_delivered() {
        let (server, client) = socket_pair().await;
        let conn = Arc::new(connection());
        let channel = ChannelName::from_bus("sse:user:u");
        let event = |seq: u64| entry(&channel, 10, seq, format!("data: {seq}\n\n"));
        conn.start_history(3, vec![StreamId { ms: 10, seq: 1 }], Vec::new());
        conn.attach(server, Framing::Chunked);
        let writer = tokio::spawn(run_writer(conn.clone(), Framing::Chunked));
        for seq in [1, 2, 2, 3] {
            conn.push(&event(seq), frames(8), None);
        }
        assert!(conn.close(Bytes::new()));
        let body = String::from_utf8(read_chunked(client).await).expect("utf8");
        let mut lines = body.lines().filter(|l| !l.is_empty());
        for seq in [2, 3] {
            let id = lines.next().expect("an id line");
            let cursor = cursor_in(id.as_bytes());
            assert_eq!((cursor.epoch, cursor.position(&channel)), (3, Some(StreamId { ms: 10, seq })));
            assert_eq!(lines.next(), Some(format!("data: {seq}").as_str()));
        }
        assert_eq!(lines.next(), None, "1 and the second 2 were already delivered");
        writer.await.expect("the writer ends");
    }

    #[tokio::test]
    async fn a_write_to_a_vanished_client_ends_the_stream() {
        let (server, client) = socket_pair().await;
        let conn = connection();
        conn.attach(server, Framing::Chunked);
        drop(client);
        // The first write may still be accepted by the kernel; the reset makes a later one fail.
        for _ in 0..50 {
            conn.push(&raw(b"data: x\n\n"), frames(4), None);
            if conn.is_closed() {
                assert_eq!(conn.state().writer, Writer::Closed { backlog: None });
                assert!(conn.state().queue.is_empty());
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("writing to a closed peer never ended the stream");
    }

    #[tokio::test]
    async fn the_writer_state_says_who_may_write_the_socket() {
        let (server, _client) = socket_pair().await;
        // A small send buffer, so that a few frames fill the socket while the client does not read.
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("SO_SNDBUF");
        let conn = connection();
        let writer = |conn: &Connection| format!("{:?}", conn.state().writer);
        let mut cx = Context::from_waker(Waker::noop());
        let mut pieces = VecDeque::new();

        // Until the head is out there is no socket: events queue for the task.
        assert_eq!(conn.push(&raw(b"data: early\n\n"), frames(8), None), Pushed::Accepted);
        assert_eq!(writer(&conn), "Queued");
        conn.attach(server, Framing::Chunked);
        assert_eq!(writer(&conn), "Idle(Chunked)");
        // Attached, but something waits: a push queues behind it rather than overtaking it.
        conn.push(&raw(b"data: behind\n\n"), frames(8), None);
        assert_eq!(conn.state().queue.len(), 2);
        // The task takes both; while it writes them, pushes queue.
        assert_eq!(conn.poll_batch(&mut cx, &mut pieces), Poll::Ready(Next::Write { events: 0 }));
        assert_eq!(pieces, [Bytes::from_static(b"data: early\n\n"), Bytes::from_static(b"data: behind\n\n")]);
        assert_eq!(writer(&conn), "Busy { framing: Chunked, backlog: None }");
        conn.push(&raw(b"data: meanwhile\n\n"), frames(8), None);
        assert_eq!(conn.state().queue.len(), 1);
        pieces.clear(); // (written)
        assert_eq!(conn.poll_batch(&mut cx, &mut pieces), Poll::Ready(Next::Write { events: 0 }));
        pieces.clear();
        // Nothing left: direct writes resume.
        assert_eq!(conn.poll_batch(&mut cx, &mut pieces), Poll::Pending);
        assert_eq!(writer(&conn), "Idle(Chunked)");
        conn.push(&raw(b"data: direct\n\n"), frames(8), None);
        assert!(conn.state().queue.is_empty(), "written into the socket");

        // The socket fills up: the rest of the send it cut short makes the task the writer.
        let big = Item::Raw(Bytes::from(vec![b'x'; 64 * 1024]).into());
        for _ in 0..1000 {
            conn.push(&big, frames(8), None);
            if matches!(conn.state().writer, Writer::Busy { .. }) {
                break;
            }
        }
        assert!(matches!(conn.state().writer, Writer::Busy { backlog: Some(_), .. }), "{}", writer(&conn));
        assert!(conn.state().queue.is_empty(), "the event is in the backlog, not the queue");
        conn.push(&raw(b"data: queued\n\n"), frames(8), None);
        assert_eq!(conn.state().queue.len(), 1);

        // Closing keeps the backlog and the queue for the task, and refuses pushes and attaching.
        assert!(conn.close(Bytes::from_static(b"data: bye\n\n")));
        assert!(matches!(conn.state().writer, Writer::Closed { backlog: Some(_) }), "{}", writer(&conn));
        assert_eq!(conn.push(&raw(b"data: late\n\n"), frames(8), None), Pushed::Closed);
        let Poll::Ready(Next::Write { events: 1 }) = conn.poll_batch(&mut cx, &mut pieces) else {
            panic!("the backlog, then the events")
        };
        assert_eq!(pieces.len(), 3, "backlog, queued, farewell");
        assert_eq!(pieces[2], Bytes::from_static(b"data: bye\n\n"));
        pieces.clear();
        assert_eq!(conn.poll_batch(&mut cx, &mut pieces), Poll::Ready(Next::Ended));
        assert!(!conn.release(), "closed already: the close was counted, not this");
        assert_eq!(conn.state().writer, Writer::Closed { backlog: None });
    }

    #[tokio::test]
    async fn the_rest_of_a_direct_send_counts_against_the_byte_bound() {
        let (server, _client) = socket_pair().await;
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("SO_SNDBUF");
        let conn = connection();
        conn.attach(server, Framing::Chunked);
        let limit = bytes(256 * 1024);
        let big = sized(200 * 1024);
        for _ in 0..1000 {
            assert_eq!(conn.push(&big, limit, None), Pushed::Accepted);
            if matches!(conn.state().writer, Writer::Busy { .. }) {
                break;
            }
        }
        let backlog = match &conn.state().writer {
            Writer::Busy { backlog: Some(rest), .. } => rest.len(),
            other => panic!("the socket never filled: {other:?}"),
        };
        assert_eq!(queued_bytes(&conn) as usize, backlog);
        // The client does not read: the next large event takes it past the bound.
        assert_eq!(conn.push(&big, limit, None), Pushed::Full);
        // The task takes the backlog: its bytes leave the count with it.
        let mut pieces = VecDeque::new();
        assert!(conn.poll_batch(&mut Context::from_waker(Waker::noop()), &mut pieces).is_ready());
        assert_eq!(queued_bytes(&conn), 0);
    }

    #[tokio::test]
    async fn a_failed_direct_send_says_the_client_is_gone_once() {
        let (server, client) = socket_pair().await;
        let conn = connection();
        conn.attach(server, Framing::Chunked);
        drop(client);
        let mut gone = 0;
        for _ in 0..50 {
            match conn.push(&raw(b"data: x\n\n"), frames(4), None) {
                Pushed::Gone => gone += 1,
                Pushed::Closed => break,
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert_eq!(gone, 1, "the push that found the client gone ended the stream, and only it");
        assert!(!conn.release(), "already ended (and counted by the pusher)");
    }

    #[tokio::test]
    async fn a_cut_drops_the_backlog_too() {
        let (server, _client) = socket_pair().await;
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("SO_SNDBUF");
        let conn = connection();
        conn.attach(server, Framing::Identity);
        let big = Item::Raw(Bytes::from(vec![b'x'; 64 * 1024]).into());
        for _ in 0..1000 {
            conn.push(&big, frames(8), None);
            if matches!(conn.state().writer, Writer::Busy { .. }) {
                break;
            }
        }
        assert!(matches!(conn.state().writer, Writer::Busy { framing: Framing::Identity, backlog: Some(_) }));
        assert!(conn.cut());
        assert_eq!(conn.state().writer, Writer::Closed { backlog: None });
        let mut pieces = VecDeque::new();
        assert_eq!(conn.poll_batch(&mut Context::from_waker(Waker::noop()), &mut pieces), Poll::Ready(Next::Ended));
        assert!(pieces.is_empty());
    }

    /// Every stream carries a `Connection`, and the fan-out reads its `State` per delivery:
    /// the writer enum must not make either larger than the loose flags it replaced.
    #[test]
    // Release sizes, as users run it: a debug build lays `Connection` out 8 bytes larger.
    #[cfg(all(target_os = "linux", target_pointer_width = "64", not(debug_assertions)))]
    fn a_stream_state_is_no_larger_than_before() {
        // Measured with the five flags (`closed`, `attached`, `chunked`, `writer_busy`, `backlog`);
        // the byte count (`queued_bytes`) fits beside the replay allowance, now a `u32` too.
        // The gzip trailer state (`Option<Member>`: CRC, length, tag) added 16 bytes, with
        // compression off too: 0.3 % of the 5.3 KB an idle stream costs, against a box that
        // would cost a gzip stream an allocation.
        let (state_before, connection_before) = (120 + 16, 248 + 16);
        assert!(size_of::<State>() <= state_before, "State is {} bytes", size_of::<State>());
        assert!(size_of::<Connection>() <= connection_before, "Connection is {} bytes", size_of::<Connection>());
    }
}
