//! The hub: this node's connections by user and by channel, fan-out of shared frames, and the
//! limits that decide whether a new stream may join.
//!
//! One `RwLock` guards the registry. Joins and leaves take it for writing, briefly; fan-out
//! takes it for reading and, per message, frames once and pushes the same `Bytes` into every
//! listener's queue. A channel's first listener asks the bus to subscribe and its last one to
//! unsubscribe, both under the lock so the bus sees them in the registry's order.
//!
//! A stream that is being replayed history joins *held* ([`Hub::join_held`]): it is subscribed
//! like any other, but what arrives live for it waits in its [`Hold`] (bounded like a queue)
//! instead of its queue, so a replay of many pages is written before anything newer; the
//! resume releases it ([`Hub::release`]) once the last page is queued.
//!
//! A stream's token is watched by the ticker: `token_expiring` once before its `exp`, the close
//! at `exp` + leeway. A renewal ([`Hub::renew`]) moves the `exp` and takes the stream off the
//! channels the new token no longer grants, leaving the rest of it untouched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{UserId, unix_now};
use crate::bus::{Bus, SubscriptionReady};
use crate::channel::ChannelName;
use crate::config::PerUserPolicy;
use crate::connection::{CloseReason, Connection, ConnectionId, Item, Pushed, QueueLimit, Rebase};
use crate::envelope;
use crate::frame::{self, Frame};
use crate::history::StreamId;
use crate::log_limit::LogLimiter;
use crate::metrics::HubMetrics;

/// Limits applied when a stream joins and while it lives.
#[derive(Debug, Clone)]
pub struct Limits {
    /// 0: no limit.
    pub per_user: usize,
    pub per_user_policy: PerUserPolicy,
    /// 0: no limit.
    pub per_node: usize,
    pub queue_capacity: usize,
    /// Bytes a stream may have waiting before it is cut off as a slow consumer.
    pub queue_max_bytes: u32,
    /// Zero: off.
    pub inactivity_timeout: Duration,
    /// Zero: off.
    pub max_lifetime: Duration,
    /// History is on: `id:` lines are resume cursors, so a producer's own envelope `id` is not written.
    pub history: bool,
    /// How a stream's token ends it.
    pub token: TokenLife,
    /// Frames of at least this many bytes are deflated for gzip streams, smaller ones stored
    /// (`SSE_COMPRESSION_MIN_SIZE`); irrelevant while no stream asks for gzip.
    pub compress_from: usize,
}

/// When a stream's token warns and ends it, relative to its `exp`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenLife {
    /// `SSE_JWT_LEEWAY`: the stream closes at `exp` + leeway, as its token was accepted with it.
    pub leeway: Duration,
    /// `SSE_TOKEN_EXPIRY_WARNING`: `token_expiring` this long before `exp`; zero: never.
    pub warning: Duration,
}

impl TokenLife {
    /// The unix second from which `exp` is warned of, if warnings are on. Rounded up to whole
    /// seconds (the clock the ticker reads), so a warning never comes later than asked.
    fn warn_from(&self, exp: u64) -> Option<u64> {
        if self.warning.is_zero() {
            return None;
        }
        let lead = self.warning.as_secs() + u64::from(self.warning.subsec_nanos() > 0);
        Some(exp.saturating_sub(lead))
    }

    /// The unix second at which a stream with this `exp` is closed.
    fn closes_at(&self, exp: u64) -> u64 {
        exp.saturating_add(self.leeway.as_secs())
    }
}

/// Work on the hub that must not interleave with a fan-out (a renewal): the dispatcher runs it
/// between two deliveries.
pub type HubWork = Box<dyn FnOnce(&Arc<Hub>) + Send>;

/// What a renewal did ([`Hub::renew`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The stream lives on under the new token; it left `left` (and was told so).
    Applied { left: Vec<ChannelName> },
    /// No open stream on this node has that id.
    NotFound,
    /// The stream belongs to another user.
    OtherUser,
}

impl Limits {
    fn queue(&self) -> QueueLimit {
        QueueLimit { frames: self.queue_capacity, bytes: self.queue_max_bytes }
    }
}

/// Why a stream may not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("the node is draining")]
    Draining,
    #[error("the node holds its maximum number of streams")]
    NodeFull,
    #[error("this user holds the maximum number of streams")]
    UserLimit,
}

impl JoinError {
    pub fn label(self) -> &'static str {
        match self {
            JoinError::Draining => "draining",
            JoinError::NodeFull => "node_full",
            JoinError::UserLimit => "user_limit",
        }
    }
}

/// One tick's heartbeat. Streams are split into `slots` groups by id and each tick pings one
/// group, so 10k streams are not all woken in the same instant (a burst that showed up as
/// 100-200 ms latency spikes for the events around it); each still gets one ping per interval.
pub struct Heartbeat {
    pub frame: Frame,
    pub slot: u64,
    pub slots: u64,
}

/// Counts for `/api/stats`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HubStats {
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
}

pub struct Hub {
    registry: RwLock<Registry>,
    /// This node's name: a stream's id is `<node>:<n>` in the events that name it.
    node_id: Arc<str>,
    bus: Arc<dyn Bus>,
    limits: Limits,
    metrics: HubMetrics,
    next_id: AtomicU64,
    started: Instant,
    /// Seconds since `started`, advanced by the ticker: a clock read per push would cost more.
    clock: AtomicU32,
    refusal_log: LogLimiter,
    /// Runtime workers a large fan-out is split over.
    fan_out_workers: usize,
    /// Opens and closes not yet written to the cluster's presence ([`crate::presence`]).
    journal: Mutex<Journal>,
}

/// Most changes the journal keeps between two presence flushes. Beyond it (Redis down for a
/// long while) it forgets them and says so: presence then rewrites this node's entries whole.
const JOURNAL_MAX: usize = 100_000;

/// A channel's `gap` when it has none (an epoch is a `u32`).
const NO_GAP: u64 = u64::MAX;

/// A stream opened or closed, for presence.
pub enum Change {
    Opened(Arc<Connection>),
    Closed { id: ConnectionId, user: UserId },
}

/// What the hub recorded for presence since it was last asked. Kept only once presence asks
/// for it ([`Hub::keep_journal`]): the embedded bus answers presence from the registry.
#[derive(Default)]
pub struct Journal {
    kept: bool,
    pub changes: Vec<Change>,
    /// Changes were forgotten (more than [`JOURNAL_MAX`]): the reader must resynchronise.
    pub lost: bool,
}

impl Journal {
    fn record(&mut self, change: Change) {
        if !self.kept || self.lost {
            return;
        }
        if self.changes.len() >= JOURNAL_MAX {
            self.changes = Vec::new();
            self.lost = true;
            return;
        }
        self.changes.push(change);
    }
}

/// Listeners per worker below which a fan-out is not worth splitting.
const PARALLEL_FAN_OUT_MIN: usize = 1024;

#[derive(Default)]
struct Registry {
    channels: HashMap<ChannelName, ChannelEntry>,
    /// Each user's streams, oldest first.
    users: HashMap<UserId, Vec<Arc<Connection>>>,
    /// Every stream by its number, for a renewal naming it.
    by_id: HashMap<u64, Arc<Connection>>,
    connections: usize,
    draining: bool,
}

struct ChannelEntry {
    /// Streams listening on this channel whose replay is not written yet (rare, and touched only
    /// under the registry lock).
    held: Vec<Arc<Hold>>,
    /// Shared with fan-outs in progress, which write outside the registry lock; a join or leave
    /// during one copies the list (`Arc::make_mut`) instead of waiting for it. Unordered: a
    /// leave swaps the last listener into the gap, and every listener knows its index
    /// ([`Connection::listed_at`]).
    listeners: Arc<Vec<Arc<Connection>>>,
    ready: Arc<SubscriptionReady>,
    /// The newest history id delivered on this channel, where a backfill starts after a gap.
    last_id: Mutex<StreamId>,
    /// While the channel has a gap (the bus lost its subscription): the history epoch its
    /// positions were in when the gap began; [`NO_GAP`] otherwise.
    gap: AtomicU64,
}

/// What arrived live for a held stream, in bus order, until its replay is written.
pub struct Hold {
    connection: Arc<Connection>,
    items: Mutex<Vec<Item>>,
    /// The frames' bytes in `items` (changed under its lock).
    bytes: AtomicU64,
    /// More arrived than a queue may hold: the stream is cut off as a slow consumer.
    overflowed: AtomicBool,
}

impl Hold {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// The id of the first history entry of `channel` held so far: from it on, the channel's
    /// history arrives live, so a replay stops before it.
    pub fn first_held(&self, channel: &ChannelName) -> Option<StreamId> {
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.iter().find_map(|item| match item {
            Item::Event { channel: held, id, .. } if held == channel => Some(*id),
            _ => None,
        })
    }

    /// Keeps `item` for the stream until its replay is queued, within the bounds of its queue.
    fn keep(&self, item: &Item, limit: QueueLimit) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = self.bytes.load(Ordering::Relaxed) + item.frame().len() as u64;
        if items.len() >= limit.frames || (!items.is_empty() && bytes > u64::from(limit.bytes)) {
            self.overflowed.store(true, Ordering::Release);
        } else {
            items.push(item.clone());
            self.bytes.store(bytes, Ordering::Relaxed);
        }
    }
}

/// A stream's place in the hub. Dropping it leaves (idempotent with the hub closing it).
pub struct Membership {
    hub: Arc<Hub>,
    connection: Arc<Connection>,
}

impl Membership {
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The stream's own side ends it for `reason` (the client left, its socket stalled).
    /// Counted only when the stream was still open: a stream the node closed first was
    /// counted then, for the node's reason.
    pub fn end(&self, reason: CloseReason) {
        if self.connection.release() {
            self.hub.metrics.closed(reason);
        }
    }

    /// Leaves without counting a close: the stream was refused before it opened (its request
    /// is answered with an error status instead of the stream).
    pub fn refuse(self) {
        let _ = self.connection.release();
    }
}

impl Drop for Membership {
    /// Whatever ends a stream without closing it first is its client going away: on the hyper
    /// path, hyper dropping the body of a connection that closed.
    fn drop(&mut self) {
        self.end(CloseReason::ClientClosed);
        self.hub.detach(&self.connection);
    }
}

/// A stream that joined: its membership and the subscriptions it must wait for before
/// telling the client it is connected.
pub struct Joined {
    pub membership: Membership,
    pub pending: Vec<Arc<SubscriptionReady>>,
    /// Set when the stream joined held ([`Hub::join_held`]).
    pub hold: Option<Arc<Hold>>,
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>, node_id: &str, limits: Limits, metrics: HubMetrics) -> Arc<Self> {
        Arc::new(Self {
            registry: RwLock::new(Registry::default()),
            node_id: Arc::from(node_id),
            bus,
            limits,
            metrics,
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            clock: AtomicU32::new(0),
            refusal_log: LogLimiter::default(),
            fan_out_workers: tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()),
            journal: Mutex::new(Journal::default()),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    pub fn now(&self) -> u32 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Adds a stream for `user` listening on `channels`, applying the node and user limits.
    /// `token_exp` is its token's `exp`: the stream is warned before it and closed after it.
    pub fn join(
        self: &Arc<Self>,
        user: UserId,
        channels: Vec<ChannelName>,
        token_exp: u64,
    ) -> Result<Joined, JoinError> {
        self.join_as(user, channels, token_exp, false, None)
    }

    /// Like [`Hub::join`], but what arrives live for the stream is held until [`Hub::release`]
    /// (for a stream whose history is replayed first).
    pub fn join_held(
        self: &Arc<Self>,
        user: UserId,
        channels: Vec<ChannelName>,
        token_exp: u64,
    ) -> Result<Joined, JoinError> {
        self.join_as(user, channels, token_exp, true, None)
    }

    /// A number for a stream that is yet to join: the seat it takes in the cluster
    /// ([`crate::user_limit`]) is named after it before it joins.
    pub fn reserve_id(&self) -> ConnectionId {
        ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Like [`Hub::join`] (`held`: [`Hub::join_held`]) for a stream that took its seat in the
    /// cluster as `id`: the per-user limit was applied there, across every node, so not here.
    pub fn join_seated(
        self: &Arc<Self>,
        id: ConnectionId,
        user: UserId,
        channels: Vec<ChannelName>,
        token_exp: u64,
        held: bool,
    ) -> Result<Joined, JoinError> {
        self.join_as(user, channels, token_exp, held, Some(id))
    }

    fn join_as(
        self: &Arc<Self>,
        user: UserId,
        channels: Vec<ChannelName>,
        token_exp: u64,
        held: bool,
        seated: Option<ConnectionId>,
    ) -> Result<Joined, JoinError> {
        let id = seated.unwrap_or_else(|| self.reserve_id());
        let mut evicted = None;
        let mut pending = Vec::new();
        let connection;
        let hold;
        {
            let mut registry = self.write();
            // Share the registry's name of each channel that already has listeners: events carry
            // that name, and a stream finds its channel by pointer instead of comparing strings.
            let channels: Box<[ChannelName]> = channels
                .into_iter()
                .map(|c| registry.channels.get_key_value(&c).map_or(c, |(known, _)| known.clone()))
                .collect();
            connection = Arc::new(Connection::new(id, user.clone(), channels, token_exp, self.now()));
            hold = held.then(|| {
                Arc::new(Hold {
                    connection: connection.clone(),
                    items: Mutex::new(Vec::new()),
                    bytes: AtomicU64::new(0),
                    overflowed: AtomicBool::new(false),
                })
            });
            if registry.draining {
                return Err(JoinError::Draining);
            }
            if self.limits.per_node > 0 && registry.connections >= self.limits.per_node {
                return Err(JoinError::NodeFull);
            }
            let held = registry.users.get(&user).map_or(0, Vec::len);
            if seated.is_none() && self.limits.per_user > 0 && held >= self.limits.per_user {
                match self.limits.per_user_policy {
                    PerUserPolicy::Reject => return Err(JoinError::UserLimit),
                    PerUserPolicy::EvictOldest => {
                        let oldest = registry.users.get(&user).and_then(|list| list.first().cloned());
                        if let Some(oldest) = oldest {
                            self.remove_locked(&mut registry, &oldest);
                            evicted = Some(oldest);
                        }
                    }
                }
            }
            registry.users.entry(user).or_default().push(connection.clone());
            registry.by_id.insert(id.0, connection.clone());
            registry.connections += 1;
            // Under the registry lock, so the journal's order is the registry's.
            self.journal().record(Change::Opened(connection.clone()));
            for (slot, channel) in connection.channels.iter().enumerate() {
                let entry = registry.channels.entry(channel.clone()).or_insert_with(|| {
                    let ready = Arc::new(SubscriptionReady::default());
                    self.bus.subscribe(channel.clone(), ready.clone());
                    ChannelEntry {
                        held: Vec::new(),
                        listeners: Arc::default(),
                        ready,
                        last_id: Mutex::new(StreamId::ZERO),
                        gap: AtomicU64::new(NO_GAP),
                    }
                });
                if let Some(hold) = &hold {
                    entry.held.push(hold.clone());
                } else {
                    let listeners = Arc::make_mut(&mut entry.listeners);
                    connection.set_listed_at(slot, listeners.len());
                    listeners.push(connection.clone());
                }
                if !entry.ready.is_set() {
                    pending.push(entry.ready.clone());
                }
            }
            self.metrics.channels.set(registry.channels.len() as f64);
        }
        self.metrics.active.increment(1.0);
        self.metrics.total.increment(1);
        if let Some(oldest) = evicted
            && oldest.close(CloseReason::Replaced.farewell())
        {
            self.metrics.closed(CloseReason::Replaced);
        }
        Ok(Joined { membership: Membership { hub: self.clone(), connection }, pending, hold })
    }

    /// Makes a held stream an ordinary listener and queues what was held for it, behind its
    /// replay. Under the registry lock, so nothing delivered later overtakes what was held.
    /// Returns false when the stream is gone or was cut off (its hold overflowed).
    pub fn release(&self, hold: &Arc<Hold>) -> bool {
        let connection = &hold.connection;
        let (mut released, mut slow, mut gone) = (false, false, false);
        {
            let mut registry = self.write();
            for (slot, channel) in connection.channels.iter().enumerate() {
                let Some(entry) = registry.channels.get_mut(channel) else { continue };
                let Some(at) = entry.held.iter().position(|h| Arc::ptr_eq(h, hold)) else { continue };
                entry.held.swap_remove(at);
                let listeners = Arc::make_mut(&mut entry.listeners);
                connection.set_listed_at(slot, listeners.len());
                listeners.push(connection.clone());
                released = true;
            }
            let items = std::mem::take(&mut *hold.items.lock().unwrap_or_else(PoisonError::into_inner));
            if released && !hold.overflowed() {
                let (now, limit) = (Some(self.now()), self.limits.queue());
                for item in &items {
                    match connection.push(item, limit, now) {
                        Pushed::Accepted | Pushed::Closed => {}
                        Pushed::Full => slow = true,
                        Pushed::Gone => gone = true,
                    }
                    if slow || gone {
                        break;
                    }
                }
                self.metrics.sent.increment(items.len() as u64);
            }
        }
        if released && gone {
            self.detach(connection);
            self.metrics.closed(CloseReason::ClientClosed);
            return false;
        }
        if released && (slow || hold.overflowed()) {
            self.detach(connection);
            if connection.cut() {
                self.metrics.closed(CloseReason::SlowConsumer);
            }
            return false;
        }
        released
    }

    /// A push from outside the hub (a long replay's catch-up) found the client gone, which ended
    /// the stream: counts the close and lets the stream go.
    pub fn client_gone(&self, connection: &Arc<Connection>) {
        self.detach(connection);
        self.metrics.closed(CloseReason::ClientClosed);
    }

    /// Removes a stream whose body was dropped. A no-op if the hub already removed it.
    fn detach(&self, connection: &Arc<Connection>) {
        let mut registry = self.write();
        self.remove_locked(&mut registry, connection);
    }

    fn remove_locked(&self, registry: &mut Registry, connection: &Arc<Connection>) {
        let Some(list) = registry.users.get_mut(&connection.user) else { return };
        let Some(index) = list.iter().position(|c| Arc::ptr_eq(c, connection)) else { return };
        list.remove(index);
        if list.is_empty() {
            registry.users.remove(&connection.user);
        }
        registry.by_id.remove(&connection.id.0);
        registry.connections -= 1;
        self.journal().record(Change::Closed { id: connection.id, user: connection.user.clone() });
        for slot in 0..connection.channels.len() {
            self.leave_locked(registry, connection, slot);
        }
        self.metrics.channels.set(registry.channels.len() as f64);
        self.metrics.active.decrement(1.0);
        self.metrics.duration.record(connection.opened_at.elapsed().as_secs_f64());
    }

    /// Takes the stream off the lists of `channels[slot]` (held or listening); the channel's last
    /// local listener leaving unsubscribes it on the bus. A no-op for a channel it left already.
    fn leave_locked(&self, registry: &mut Registry, connection: &Arc<Connection>, slot: usize) {
        if !connection.listens_at(slot) {
            return;
        }
        let channel = &connection.channels[slot];
        let Some(entry) = registry.channels.get_mut(channel) else { return };
        if let Some(at) = entry.held.iter().position(|h| Arc::ptr_eq(&h.connection, connection)) {
            entry.held.swap_remove(at);
        } else {
            let at = connection.listed_at(slot);
            let kept = entry.listeners.get(at).is_some_and(|listed| Arc::ptr_eq(listed, connection));
            debug_assert!(kept, "{channel}: a listener's index was not kept");
            // The index is kept under this lock; the search only guards against a bug.
            let at = if kept { Some(at) } else { entry.listeners.iter().position(|c| Arc::ptr_eq(c, connection)) };
            if let Some(at) = at {
                let listeners = Arc::make_mut(&mut entry.listeners);
                listeners.swap_remove(at);
                if let Some(moved) = listeners.get(at) {
                    moved.relist(channel, listeners.len(), at);
                }
            }
        }
        if entry.listeners.is_empty() && entry.held.is_empty() {
            registry.channels.remove(channel);
            self.bus.unsubscribe(channel.clone());
        }
    }

    /// Gives the open stream `id` of `user` a renewed token: it is closed at `exp` + leeway from
    /// now on (and warned again before `exp`), and it leaves every channel `keeps` refuses (those
    /// the new token no longer grants), after which it gets `notice(left)`. Channels are never
    /// joined here: a renewal only narrows.
    ///
    /// Run by the dispatcher between two deliveries, so no fan-out is in flight: everything a
    /// channel left delivered to the stream is written before the notice, and nothing after it.
    pub fn renew(
        &self,
        id: ConnectionId,
        user: &UserId,
        exp: u64,
        keeps: impl Fn(&ChannelName) -> bool,
        notice: impl FnOnce(&[ChannelName]) -> Bytes,
    ) -> Renewal {
        let (connection, left, notice) = {
            let mut registry = self.write();
            let Some(connection) = registry.by_id.get(&id.0).filter(|c| !c.is_closed()).cloned() else {
                return Renewal::NotFound;
            };
            if connection.user != *user {
                return Renewal::OtherUser;
            }
            connection.renew_token(exp);
            // A stream whose replay is still being written is held: its notice waits in its hold,
            // behind what arrived live before it, like any event.
            let hold = connection.channels.iter().find_map(|channel| {
                let entry = registry.channels.get(channel)?;
                entry.held.iter().find(|h| Arc::ptr_eq(&h.connection, &connection)).cloned()
            });
            let mut left = Vec::new();
            for slot in 0..connection.channels.len() {
                if connection.listens_at(slot) && !keeps(&connection.channels[slot]) {
                    self.leave_locked(&mut registry, &connection, slot);
                    connection.unlist(slot);
                    left.push(connection.channels[slot].clone());
                }
            }
            self.metrics.channels.set(registry.channels.len() as f64);
            if left.is_empty() {
                return Renewal::Applied { left };
            }
            // Presence shows the topics the stream still has: written again, as on open.
            self.journal().record(Change::Opened(connection.clone()));
            let notice = Item::Raw(notice(&left).into());
            if let Some(hold) = hold {
                hold.keep(&notice, self.limits.queue());
                return Renewal::Applied { left };
            }
            (connection, left, notice)
        };
        // Written outside the registry lock, as a heartbeat is: it may be a system call.
        match connection.push(&notice, self.limits.queue(), None) {
            Pushed::Accepted | Pushed::Closed => {}
            Pushed::Full => {
                self.detach(&connection);
                if connection.cut() {
                    self.metrics.closed(CloseReason::SlowConsumer);
                }
            }
            Pushed::Gone => self.metrics.closed(CloseReason::ClientClosed),
        }
        Renewal::Applied { left }
    }

    /// Shares `plain` as this node encodes frames for gzip streams (deflated from
    /// [`Limits::compress_from`] bytes on).
    pub fn frame(&self, plain: Bytes) -> Frame {
        Frame::new(plain, self.limits.compress_from)
    }

    /// Ends a stream for `reason`: it leaves the hub now and its client reads `farewell` last.
    pub fn close(&self, connection: &Arc<Connection>, reason: CloseReason, farewell: Bytes) {
        self.detach(connection);
        if connection.close(farewell) {
            self.metrics.closed(reason);
        }
    }

    /// Fans one payload from the bus out to this node's listeners on `channel`. `id` is its
    /// history id when it was published durably. False when no local stream listens on the
    /// channel (the bus may deliver a message or two after the last listener left, and the
    /// node's canary and control channels never have one): the dispatcher looks at those, and
    /// only those, for the canary's probes and other nodes' renewals.
    pub async fn deliver(self: &Arc<Self>, channel: &str, id: Option<StreamId>, payload: &[u8]) -> bool {
        self.metrics.bus_messages.increment(1);
        let (listeners, item) = {
            let registry = self.read();
            let Some((name, entry)) = registry.channels.get_key_value(channel) else { return false };
            let framed = match envelope::parse(payload) {
                Ok(message) => {
                    let producer_id = if self.limits.history { None } else { message.id.as_deref() };
                    frame::event(message.event.as_deref(), producer_id, &message.data)
                }
                Err(refusal) => {
                    drop(registry);
                    self.metrics.refused(refusal.label());
                    if let Some(suppressed) = self.refusal_log.allow(self.now()) {
                        tracing::warn!(channel, reason = %refusal, suppressed, "refused a published payload");
                    }
                    return true;
                }
            };
            if let Some(id) = id {
                let mut last = entry.last_id.lock().unwrap_or_else(PoisonError::into_inner);
                *last = (*last).max(id);
            }
            let item = match id {
                Some(id) => Item::Event { channel: name.clone(), id, frame: self.frame(framed) },
                None => Item::Raw(self.frame(framed)),
            };
            for hold in &entry.held {
                hold.keep(&item, self.limits.queue());
            }
            (entry.listeners.clone(), item)
        };
        self.fan_out(channel, listeners, item).await;
        if let Some(id) = id {
            // Once per message, not per stream: one clock read. The id's time is Redis's clock
            // (or this node's with the embedded bus); a skew between the two shifts every value.
            let now_ms = crate::auth::unix_millis();
            self.metrics.delivery_latency.record(Duration::from_millis(now_ms.saturating_sub(id.ms)));
        }
        true
    }

    /// Tells `channel`'s streams its history was lost (`frame` is the `reset` event): their
    /// cursors continue in `epoch` from `tail`, and so does the node's own backfill position.
    pub async fn deliver_rebase(self: &Arc<Self>, channel: &str, epoch: u32, tail: StreamId, frame: Bytes) {
        let (listeners, item) = {
            let registry = self.read();
            let Some((name, entry)) = registry.channels.get_key_value(channel) else { return };
            *entry.last_id.lock().unwrap_or_else(PoisonError::into_inner) = tail;
            let item = Item::Rebase(Arc::new(Rebase { epoch, channel: name.clone(), tail, frame: self.frame(frame) }));
            for hold in &entry.held {
                hold.keep(&item, self.limits.queue());
            }
            (entry.listeners.clone(), item)
        };
        self.fan_out(channel, listeners, item).await;
    }

    /// Pushes `item` to every listener, outside the registry lock (a direct write is a system
    /// call per listener; joins and leaves must not wait for 10,000 of them). With several
    /// runtime workers a large fan-out is split over them; it completes before the next one
    /// starts, so every stream still sees events in bus order.
    async fn fan_out(self: &Arc<Self>, channel: &str, listeners: Arc<Vec<Arc<Connection>>>, item: Item) {
        let started = Instant::now();
        let parts = self.fan_out_workers.min(listeners.len() / PARALLEL_FAN_OUT_MIN).max(1);
        let share = listeners.len().div_ceil(parts);
        let mut others = Vec::with_capacity(parts - 1);
        for part in 1..parts {
            let (hub, listeners, item) = (self.clone(), listeners.clone(), item.clone());
            others.push(tokio::spawn(async move {
                let end = listeners.len().min((part + 1) * share);
                hub.push_to(&listeners[part * share..end], &item)
            }));
        }
        let (mut slow, mut gone) = self.push_to(&listeners[..share.min(listeners.len())], &item);
        // A share that panicked reached an unknown part of its listeners: none of it is counted
        // as sent. (The streams themselves are intact: a connection's lock survives a panic.)
        let mut lost = 0;
        for (part, other) in (1..parts).zip(others) {
            match other.await {
                Ok((cut, failed)) => {
                    slow += cut;
                    gone += failed;
                }
                Err(e) => {
                    lost += listeners.len().min((part + 1) * share).saturating_sub(part * share);
                    tracing::error!(channel, error = %e, "a fan-out share failed");
                }
            }
        }
        self.metrics.sent.increment(listeners.len().saturating_sub(slow + gone + lost) as u64);
        self.metrics.fan_out.record(started.elapsed());
        if slow > 0 {
            self.metrics.closed_many(CloseReason::SlowConsumer, slow as u64);
            tracing::debug!(channel, slow, "cut off slow consumers");
        }
        if gone > 0 {
            self.metrics.closed_many(CloseReason::ClientClosed, gone as u64);
        }
    }

    /// Pushes to each of `listeners`; returns how many streams this ended: cut off as slow
    /// consumers, and found gone by a failed write.
    fn push_to(&self, listeners: &[Arc<Connection>], item: &Item) -> (usize, usize) {
        let now = Some(self.now());
        let limit = self.limits.queue();
        let (mut slow, mut gone) = (0, 0);
        for listener in listeners {
            match listener.push(item, limit, now) {
                Pushed::Accepted | Pushed::Closed => {}
                Pushed::Full => slow += usize::from(listener.cut()),
                Pushed::Gone => gone += 1,
            }
        }
        (slow, gone)
    }

    /// The bus lost its connection: every channel has a gap until it is resubscribed. `epoch`
    /// is the history epoch the channels' positions are in; a channel whose gap began earlier
    /// keeps its own.
    pub fn mark_gaps(&self, epoch: u32) {
        for entry in self.read().channels.values() {
            let _ = entry.gap.compare_exchange(NO_GAP, u64::from(epoch), Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The bus lost `channel`'s subscription alone (a cluster slot moved): it has a gap until it
    /// is resubscribed.
    pub fn mark_gap(&self, channel: &str, epoch: u32) {
        if let Some(entry) = self.read().channels.get(channel) {
            let _ = entry.gap.compare_exchange(NO_GAP, u64::from(epoch), Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// After a resubscription: where to backfill `channel` from (epoch and position), if it
    /// had a gap (a channel that joined during the outage replayed on its own and has none).
    pub fn take_gap(&self, channel: &str) -> Option<(u32, StreamId)> {
        let registry = self.read();
        let (name, entry) = registry.channels.get_key_value(channel)?;
        let epoch = u32::try_from(entry.gap.swap(NO_GAP, Ordering::AcqRel)).ok()?;
        let last = *entry.last_id.lock().unwrap_or_else(PoisonError::into_inner);
        if last != StreamId::ZERO {
            return Some((epoch, last));
        }
        // Nothing arrived live since the channel's first stream joined: from the oldest position
        // its streams stand at (where each began, or what its replay reached); each skips what it
        // already has. None without history.
        let position = entry.listeners.iter().filter_map(|connection| connection.position_on(name)).min()?;
        Some((epoch, position))
    }

    /// Closes every stream (for instance when live messages were dropped: they resume from history).
    pub fn close_all(&self, reason: CloseReason) {
        let all: Vec<Arc<Connection>> = self.read().users.values().flatten().cloned().collect();
        for connection in all {
            self.close(&connection, reason, reason.farewell());
        }
    }

    /// Advances the clock; sends the heartbeat to this tick's share of the streams and the
    /// expiry warning to the streams whose token's `exp` is near; closes streams past their
    /// timeouts.
    pub fn tick(&self, heartbeat: Option<&Heartbeat>) {
        let now = self.started.elapsed().as_secs() as u32;
        self.clock.store(now, Ordering::Relaxed);
        let unix = unix_now();
        let mut expired = Vec::new();
        let mut due = Vec::new();
        let mut warn = Vec::new();
        {
            let registry = self.read();
            for connection in registry.users.values().flatten() {
                if let Some(reason) = self.overdue(connection, now, unix) {
                    expired.push((connection.clone(), reason));
                    continue;
                }
                let exp = connection.token_exp();
                if self.limits.token.warn_from(exp).is_some_and(|from| unix >= from) && !connection.warned() {
                    warn.push((connection.clone(), exp));
                }
                if heartbeat.is_some_and(|h| connection.id.0 % h.slots == h.slot) {
                    due.push(connection.clone());
                }
            }
        }
        // Written outside the registry lock: a heartbeat may be a system call per stream.
        let limit = self.limits.queue();
        for (connection, exp) in warn {
            // Not when a renewal moved `exp` since the scan: the new one is warned of in its time.
            if !connection.take_warning(exp) {
                continue;
            }
            match connection.push(&Item::Raw(self.expiry_warning(&connection, exp).into()), limit, None) {
                Pushed::Accepted | Pushed::Closed => {}
                Pushed::Full => expired.push((connection, CloseReason::SlowConsumer)),
                Pushed::Gone => self.metrics.closed(CloseReason::ClientClosed),
            }
        }
        if let Some(heartbeat) = heartbeat {
            let ping = Item::Raw(heartbeat.frame.clone());
            for connection in due {
                match connection.push(&ping, limit, None) {
                    Pushed::Accepted | Pushed::Closed => {}
                    Pushed::Full => expired.push((connection, CloseReason::SlowConsumer)),
                    Pushed::Gone => self.metrics.closed(CloseReason::ClientClosed),
                }
            }
        }
        for (connection, reason) in expired {
            if reason == CloseReason::SlowConsumer {
                self.detach(&connection);
                if connection.cut() {
                    self.metrics.closed(reason);
                }
            } else {
                self.close(&connection, reason, reason.farewell());
            }
        }
    }

    /// `event: token_expiring` for `connection`, whose token expires at `exp`.
    fn expiry_warning(&self, connection: &Connection, exp: u64) -> Bytes {
        // Written by hand for the documented field order (`json!` sorts keys).
        let id = serde_json::Value::String(self.connection_id(connection));
        frame::event(Some("token_expiring"), None, &format!(r#"{{"exp":{exp},"connection_id":{id}}}"#))
    }

    /// How clients name a stream of this node (`connected`, `token_expiring`, the renewal URL):
    /// `<node>:<n>`.
    pub fn connection_id(&self, connection: &Connection) -> String {
        connection.id.shown(&self.node_id)
    }

    fn overdue(&self, connection: &Connection, now: u32, unix: u64) -> Option<CloseReason> {
        if self.limits.token.closes_at(connection.token_exp()) <= unix {
            return Some(CloseReason::TokenExpired);
        }
        let lifetime = self.limits.max_lifetime;
        if !lifetime.is_zero() && connection.opened_at.elapsed() >= lifetime {
            return Some(CloseReason::Lifetime);
        }
        let inactivity = self.limits.inactivity_timeout.as_secs();
        if inactivity > 0 && u64::from(now.saturating_sub(connection.last_event_at())) >= inactivity {
            return Some(CloseReason::Inactive);
        }
        None
    }

    /// Refuses new streams from now on; returns every open stream, oldest first per user.
    pub fn start_draining(&self) -> Vec<Arc<Connection>> {
        let mut registry = self.write();
        registry.draining = true;
        registry.users.values().flatten().cloned().collect()
    }

    pub fn is_draining(&self) -> bool {
        self.read().draining
    }

    pub fn stats(&self) -> HubStats {
        let registry = self.read();
        HubStats { connections: registry.connections, users: registry.users.len(), channels: registry.channels.len() }
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording opens and closes for [`Hub::take_journal`]; returns every stream open
    /// now, in the same instant, so the caller misses none.
    pub fn keep_journal(&self) -> Vec<Arc<Connection>> {
        let registry = self.read();
        let mut journal = self.journal();
        *journal = Journal { kept: true, ..Journal::default() };
        registry.users.values().flatten().cloned().collect()
    }

    /// What was recorded since the last call (the journal keeps recording).
    pub fn take_journal(&self) -> Journal {
        let mut journal = self.journal();
        let taken = std::mem::take(&mut journal.changes);
        let lost = std::mem::replace(&mut journal.lost, false);
        Journal { kept: true, changes: taken, lost }
    }

    /// Every open stream of this node.
    pub fn streams(&self) -> Vec<Arc<Connection>> {
        self.read().users.values().flatten().cloned().collect()
    }

    /// This user's open streams on this node, oldest first.
    pub fn streams_of(&self, user: &UserId) -> Vec<Arc<Connection>> {
        self.read().users.get(user).cloned().unwrap_or_default()
    }

    /// Closes every stream of `user` on this node for `reason`; returns how many.
    pub fn close_user(&self, user: &UserId, reason: CloseReason) -> usize {
        let streams = self.streams_of(user);
        for connection in &streams {
            self.close(connection, reason, reason.farewell());
        }
        streams.len()
    }

    /// Ends this node's stream number `id` for `reason`, if it is open; true when it was.
    pub fn close_id(&self, id: ConnectionId, reason: CloseReason) -> bool {
        let connection = self.read().by_id.get(&id.0).cloned();
        let Some(connection) = connection else { return false };
        self.close(&connection, reason, reason.farewell());
        true
    }

    /// Streams this user holds on this node.
    pub fn connections_of(&self, user: &UserId) -> usize {
        self.read().users.get(user).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::channel::ChannelNames;
    use crate::connection::Next;
    use std::collections::VecDeque;
    use std::task::{Context, Poll, Waker};

    fn hub(per_user: usize, policy: PerUserPolicy) -> Arc<Hub> {
        hub_sized(per_user, policy, 3, 2)
    }

    fn hub_sized(per_user: usize, policy: PerUserPolicy, per_node: usize, queue_capacity: usize) -> Arc<Hub> {
        let (bus, _inbound) = MemoryBus::new(ChannelNames::new("sse"), None);
        let limits = Limits {
            per_user,
            per_user_policy: policy,
            per_node,
            queue_capacity,
            queue_max_bytes: u32::MAX,
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: false,
            compress_from: 512,
            token: TokenLife::default(),
        };
        Hub::new(bus, "n1", limits, HubMetrics::new())
    }

    fn channels(user: &str) -> Vec<ChannelName> {
        let names = ChannelNames::new("sse");
        vec![names.user(user), names.broadcast()]
    }

    fn join(hub: &Arc<Hub>, user: &str) -> Result<Joined, JoinError> {
        hub.join(UserId::new(user).expect("id"), channels(user), u64::MAX)
    }

    /// Everything the stream's task would be handed now (no history here: frames only).
    fn drain(connection: &Connection) -> Vec<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = VecDeque::new();
        while let Poll::Ready(Next::Write { .. }) = connection.poll_batch(&mut cx, &mut out) {}
        out.into()
    }

    #[tokio::test]
    async fn a_message_reaches_every_listener_of_its_channel_only() {
        let hub = hub(5, PerUserPolicy::Reject);
        let a1 = join(&hub, "a").expect("joins");
        let a2 = join(&hub, "a").expect("joins");
        let b = join(&hub, "b").expect("joins");
        hub.deliver("sse:user:a", None, br#"{"event":"e","data":"for a"}"#).await;
        hub.deliver("sse:user:nobody", None, b"ignored").await;
        let expected = Bytes::from_static(b"event: e\ndata: for a\n\n");
        assert_eq!(drain(a1.membership.connection()), std::slice::from_ref(&expected));
        assert_eq!(drain(a2.membership.connection()), [expected]);
        assert!(drain(b.membership.connection()).is_empty());
        hub.deliver("sse:broadcast", None, b"all").await;
        assert_eq!(drain(b.membership.connection()), [Bytes::from_static(b"data: all\n\n")]);
    }

    #[tokio::test]
    async fn a_refused_payload_is_not_delivered_and_the_next_one_is() {
        let hub = hub(5, PerUserPolicy::Reject);
        let a = join(&hub, "a").expect("joins");
        hub.deliver("sse:user:a", None, br#"{"event":"x\ny","data":1}"#).await;
        hub.deliver("sse:user:a", None, br#"{"data":2}"#).await;
        assert_eq!(drain(a.membership.connection()), [Bytes::from_static(b"data: 2\n\n")]);
    }

    #[test]
    fn limits_reject_or_evict() {
        let hub = hub(1, PerUserPolicy::Reject);
        let _first = join(&hub, "a").expect("joins");
        assert_eq!(join(&hub, "a").err(), Some(JoinError::UserLimit));
        let _b = join(&hub, "b").expect("joins");
        let _c = join(&hub, "c").expect("joins");
        assert_eq!(join(&hub, "d").err(), Some(JoinError::NodeFull));

        let hub = hub_evicting();
        let old = join(&hub, "a").expect("joins");
        let new = join(&hub, "a").expect("replaces");
        assert!(old.membership.connection().is_closed());
        let farewell = drain(old.membership.connection());
        assert_eq!(farewell, [CloseReason::Replaced.farewell()]);
        assert!(!new.membership.connection().is_closed());
        assert_eq!(hub.stats().connections, 1);
        drop(old);
        assert_eq!(hub.stats().connections, 1, "dropping an evicted stream leaves the new one alone");
    }

    fn hub_evicting() -> Arc<Hub> {
        hub(1, PerUserPolicy::EvictOldest)
    }

    #[test]
    fn leaving_in_any_order_keeps_every_listener_index() {
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, 4);
        let broadcast = ChannelNames::new("sse").broadcast();
        let mut joined: Vec<Option<Joined>> =
            (0..64).map(|i| Some(join(&hub, &format!("u{i}")).expect("joins"))).collect();
        for step in 0..64 {
            // A fan-out in progress holds the list: the leave below must copy it, indices intact.
            let in_flight = (step % 5 == 0).then(|| hub.read().channels[&broadcast].listeners.clone());
            drop(joined[(step * 7) % 64].take()); // 7 and 64 are coprime: every stream, scattered
            let registry = hub.read();
            for connection in joined.iter().flatten().map(|j| &j.membership.connection) {
                for (slot, channel) in connection.channels.iter().enumerate() {
                    let listed = &registry.channels[channel].listeners[connection.listed_at(slot)];
                    assert!(Arc::ptr_eq(listed, connection), "step {step}: {channel} lists another stream");
                }
            }
            let left = registry.channels.get(&broadcast).map_or(0, |e| e.listeners.len());
            assert_eq!(left, 63 - step);
            if let Some(snapshot) = in_flight {
                assert_eq!(snapshot.len(), 64 - step, "the fan-out's copy is untouched");
            }
        }
    }

    #[test]
    fn the_last_listener_leaving_removes_the_channel() {
        let hub = hub(5, PerUserPolicy::Reject);
        let a = join(&hub, "a").expect("joins");
        let b = join(&hub, "b").expect("joins");
        assert_eq!(hub.stats().channels, 3);
        drop(a);
        assert_eq!(hub.stats().channels, 2);
        drop(b);
        let stats = hub.stats();
        assert_eq!((stats.connections, stats.users, stats.channels), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_slow_consumer_off() {
        let hub = hub(5, PerUserPolicy::Reject);
        let a = join(&hub, "a").expect("joins");
        for _ in 0..3 {
            hub.deliver("sse:user:a", None, b"x").await;
        }
        assert!(a.membership.connection().is_closed());
        assert!(drain(a.membership.connection()).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fan_out_split_over_workers_keeps_every_stream_in_order() {
        let (streams, messages) = (3 * PARALLEL_FAN_OUT_MIN, 50);
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, messages);
        assert_eq!(hub.fan_out_workers, 2);
        let joined: Vec<Joined> = (0..streams).map(|i| join(&hub, &format!("u{i}")).expect("joins")).collect();
        for seq in 0..messages {
            hub.deliver("sse:broadcast", None, format!(r#"{{"data":{seq}}}"#).as_bytes()).await;
        }
        let expected: Vec<Bytes> = (0..messages).map(|seq| Bytes::from(format!("data: {seq}\n\n"))).collect();
        for stream in &joined {
            assert_eq!(drain(stream.membership.connection()), expected);
        }
    }

    /// A hub whose metrics go to a recorder of the test's own, read back with `closed`.
    fn counted_hub(queue_max_bytes: u32) -> (Arc<Hub>, metrics_exporter_prometheus::PrometheusHandle) {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = metrics::with_local_recorder(&recorder, HubMetrics::new);
        let (bus, _inbound) = MemoryBus::new(ChannelNames::new("sse"), None);
        let limits = Limits {
            per_user: 1,
            per_user_policy: PerUserPolicy::EvictOldest,
            per_node: 0,
            queue_capacity: 1024,
            queue_max_bytes,
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: false,
            compress_from: 512,
            token: TokenLife::default(),
        };
        (Hub::new(bus, "n1", limits, metrics), handle)
    }

    /// `sse_connections_closed_total` by reason, as the node would expose it.
    fn closed(handle: &metrics_exporter_prometheus::PrometheusHandle) -> Vec<(String, u64)> {
        let mut counts: Vec<(String, u64)> = handle
            .render()
            .lines()
            .filter_map(|line| line.strip_prefix("sse_connections_closed_total{reason=\""))
            .filter_map(|rest| {
                let (reason, value) = rest.split_once("\"} ")?;
                Some((reason.to_owned(), value.parse().ok()?))
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        counts.sort();
        counts
    }

    #[tokio::test]
    async fn every_way_a_stream_ends_is_counted_once_with_its_reason() {
        let (hub, metrics) = counted_hub(1000);
        let count = |expected: &[(&str, u64)]| {
            let expected: Vec<(String, u64)> = expected.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
            assert_eq!(closed(&metrics), expected);
        };
        // Replaced by a newer stream of the same user; the old one's body is dropped later.
        let old = join(&hub, "a").expect("joins");
        let _new = join(&hub, "a").expect("replaces");
        drop(old);
        count(&[("replaced", 1)]);
        // Past the byte bound: cut off, once, however many events follow.
        let slow = join(&hub, "b").expect("joins");
        for _ in 0..3 {
            hub.deliver("sse:user:b", None, "x".repeat(600).as_bytes()).await;
        }
        assert!(slow.membership.connection().is_closed());
        drop(slow);
        count(&[("replaced", 1), ("slow_consumer", 1)]);
        // The client went away (hyper dropped the body): nothing closed it before.
        drop(join(&hub, "c").expect("joins"));
        count(&[("client_closed", 1), ("replaced", 1), ("slow_consumer", 1)]);
        // The stream's task saw its socket stall, then the body went too.
        let stalled = join(&hub, "d").expect("joins");
        stalled.membership.end(CloseReason::WriteStalled);
        stalled.membership.end(CloseReason::ClientClosed);
        drop(stalled);
        count(&[("client_closed", 1), ("replaced", 1), ("slow_consumer", 1), ("write_stalled", 1)]);
        // Closed by the node (here: a drain), then its client leaves: one close, the node's.
        let drained = join(&hub, "e").expect("joins");
        hub.close(&drained.membership.connection, CloseReason::Shutdown, CloseReason::Shutdown.farewell());
        drained.membership.end(CloseReason::ClientClosed);
        drop(drained);
        // Refused before it opened: a rejection, not a close.
        join(&hub, "f").expect("joins").membership.refuse();
        count(&[("client_closed", 1), ("replaced", 1), ("shutdown", 1), ("slow_consumer", 1), ("write_stalled", 1)]);
        assert_eq!(hub.stats().connections, 1, "only the newer stream of a is left");
    }

    #[test]
    fn draining_refuses_new_streams() {
        let hub = hub(5, PerUserPolicy::Reject);
        let _a = join(&hub, "a").expect("joins");
        assert_eq!(hub.start_draining().len(), 1);
        assert_eq!(join(&hub, "b").err(), Some(JoinError::Draining));
    }

    #[test]
    fn expired_tokens_are_closed_by_the_ticker() {
        let hub = hub(5, PerUserPolicy::Reject);
        let joined = hub.join(UserId::new("a").expect("id"), channels("a"), unix_now() - 1).expect("joins");
        hub.tick(None);
        assert_eq!(drain(joined.membership.connection()), [CloseReason::TokenExpired.farewell()]);
        assert_eq!(hub.stats().connections, 0);
    }

    fn hub_with_token_life(token: TokenLife) -> Arc<Hub> {
        let (bus, _inbound) = MemoryBus::new(ChannelNames::new("sse"), None);
        let limits = Limits {
            per_user: 0,
            per_user_policy: PerUserPolicy::Reject,
            per_node: 0,
            queue_capacity: 16,
            queue_max_bytes: u32::MAX,
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: false,
            compress_from: 512,
            token,
        };
        Hub::new(bus, "n1", limits, HubMetrics::new())
    }

    fn warning_of(exp: u64, id: u64) -> Bytes {
        frame::event(Some("token_expiring"), None, &format!(r#"{{"exp":{exp},"connection_id":"n1:{id}"}}"#))
    }

    #[test]
    fn a_token_is_warned_of_once_before_its_exp_and_again_after_a_renewal() {
        let token = TokenLife { leeway: Duration::from_secs(30), warning: Duration::from_millis(60_500) };
        let hub = hub_with_token_life(token);
        let user = UserId::new("a").expect("id");
        let exp = unix_now() + 62; // the lead rounds up to 61 s: not due yet
        let joined = hub.join(user.clone(), channels("a"), exp).expect("joins");
        let stream = joined.membership.connection();
        hub.tick(None);
        assert!(drain(stream).is_empty(), "62 s before exp is earlier than the lead");
        let exp = unix_now() + 61;
        assert_eq!(hub.renew(stream.id, &user, exp, |_| true, |_| Bytes::new()), Renewal::Applied { left: vec![] });
        hub.tick(None);
        hub.tick(None);
        assert_eq!(drain(stream), [warning_of(exp, stream.id.0)], "once, however many ticks");
        // Renewed to an exp that is near too: warned again, of the new exp.
        let renewed = unix_now() + 10;
        assert_eq!(hub.renew(stream.id, &user, renewed, |_| true, |_| Bytes::new()), Renewal::Applied { left: vec![] });
        hub.tick(None);
        assert_eq!(drain(stream), [warning_of(renewed, stream.id.0)]);
        // The same exp again (a page that sent its old token back): not warned again.
        hub.renew(stream.id, &user, renewed, |_| true, |_| Bytes::new());
        hub.tick(None);
        assert!(drain(stream).is_empty());
        // Past exp but within the leeway: open, warned of it once.
        let lapsed = unix_now() - 5;
        hub.renew(stream.id, &user, lapsed, |_| true, |_| Bytes::new());
        hub.tick(None);
        assert_eq!(drain(stream), [warning_of(lapsed, stream.id.0)]);
        hub.tick(None);
        assert!(drain(stream).is_empty());
        assert!(!stream.is_closed(), "closed only at exp + leeway");
        // Without warnings configured, nothing is sent before the close.
        let quiet = hub_with_token_life(TokenLife { leeway: Duration::ZERO, warning: Duration::ZERO });
        let joined = quiet.join(user, channels("a"), unix_now() + 1).expect("joins");
        quiet.tick(None);
        assert!(drain(joined.membership.connection()).is_empty());
    }

    #[test]
    fn a_renewal_moves_the_close_to_the_new_exp_plus_the_leeway() {
        let hub = hub_with_token_life(TokenLife { leeway: Duration::from_secs(2), warning: Duration::ZERO });
        let user = UserId::new("a").expect("id");
        let joined = hub.join(user.clone(), channels("a"), unix_now() - 2).expect("joins");
        let stream = joined.membership.connection();
        hub.renew(stream.id, &user, unix_now() + 60, |_| true, |_| Bytes::new());
        hub.tick(None);
        assert!(!stream.is_closed(), "renewed before its old exp + leeway");
        hub.renew(stream.id, &user, unix_now() - 3, |_| true, |_| Bytes::new());
        hub.tick(None);
        assert_eq!(drain(stream), [CloseReason::TokenExpired.farewell()]);
    }

    #[test]
    fn a_renewal_finds_only_an_open_stream_of_the_same_user() {
        let hub = hub(5, PerUserPolicy::Reject);
        let (a, b) = (UserId::new("a").expect("id"), UserId::new("b").expect("id"));
        let joined = join(&hub, "a").expect("joins");
        let id = joined.membership.connection().id;
        assert_eq!(hub.renew(id, &b, u64::MAX, |_| true, |_| Bytes::new()), Renewal::OtherUser);
        assert_eq!(hub.renew(ConnectionId(id.0 + 100), &a, u64::MAX, |_| true, |_| Bytes::new()), Renewal::NotFound);
        assert_eq!(hub.renew(id, &a, u64::MAX, |_| true, |_| Bytes::new()), Renewal::Applied { left: vec![] });
        // Closed (the drain reached it) but its body not dropped yet: gone all the same.
        hub.close(&joined.membership.connection, CloseReason::Shutdown, CloseReason::Shutdown.farewell());
        assert_eq!(hub.renew(id, &a, u64::MAX, |_| true, |_| Bytes::new()), Renewal::NotFound);
        drop(joined);
        assert_eq!(hub.renew(id, &a, u64::MAX, |_| true, |_| Bytes::new()), Renewal::NotFound);
        assert!(hub.read().by_id.is_empty(), "a stream that left is forgotten by id");
    }

    #[tokio::test]
    async fn a_narrowing_renewal_leaves_the_revoked_channels_and_says_so_last() {
        let names = ChannelNames::new("sse");
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, 16);
        let user = UserId::new("a").expect("id");
        let (kept, dropped) = (names.topic("kept"), names.topic("dropped"));
        let mut all = channels("a");
        all.extend([kept.clone(), dropped.clone()]);
        let mine = hub.join(user.clone(), all.clone(), u64::MAX).expect("joins");
        let other = hub.join(UserId::new("b").expect("id"), all, u64::MAX).expect("joins");
        hub.deliver(dropped.as_str(), None, b"before").await;
        let notice = Bytes::from_static(b"event: topics_revoked\ndata: dropped\n\n");
        let stream = mine.membership.connection();
        let renewed = hub.renew(
            stream.id,
            &user,
            u64::MAX,
            |c| *c != dropped,
            |left| {
                assert_eq!(left, std::slice::from_ref(&dropped));
                notice.clone()
            },
        );
        assert_eq!(renewed, Renewal::Applied { left: vec![dropped.clone()] });
        for channel in [&dropped, &kept] {
            hub.deliver(channel.as_str(), None, channel.as_str().as_bytes()).await;
        }
        let frames = |data: &[&str]| data.iter().map(|d| frame::event(None, None, d)).collect::<Vec<_>>();
        let expected = [frames(&["before"]), vec![notice.clone()], frames(&["sse:topic:kept"])].concat();
        assert_eq!(drain(stream), expected, "what came before, the notice, then kept topics only");
        assert_eq!(drain(other.membership.connection()), frames(&["before", "sse:topic:dropped", "sse:topic:kept"]));
        // Renewing again with the same grants changes nothing and sends no notice.
        hub.renew(stream.id, &user, u64::MAX, |c| *c != dropped, |_| panic!("nothing left"));
        // The last listener of a channel leaving unsubscribes it; leaving later does not again.
        drop(other);
        assert!(!hub.read().channels.contains_key(&dropped), "nobody listens to the revoked topic");
        assert!(hub.read().channels.contains_key(&kept));
        drop(mine);
        let stats = hub.stats();
        assert_eq!((stats.connections, stats.channels), (0, 0));
    }

    #[tokio::test]
    async fn a_held_streams_notice_waits_behind_what_was_held_for_it() {
        let names = ChannelNames::new("sse");
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, 16);
        let user = UserId::new("h").expect("id");
        let dropped = names.topic("dropped");
        let mut all = channels("h");
        all.push(dropped.clone());
        let joined = hub.join_held(user.clone(), all, u64::MAX).expect("joins");
        let hold = joined.hold.clone().expect("held");
        hub.deliver(dropped.as_str(), None, b"held").await;
        let notice = Bytes::from_static(b"event: topics_revoked\n\n");
        let stream = joined.membership.connection();
        hub.renew(stream.id, &user, u64::MAX, |c| *c != dropped, |_| notice.clone());
        hub.deliver(dropped.as_str(), None, b"after").await;
        hub.deliver("sse:user:h", None, b"mine").await;
        assert!(drain(stream).is_empty(), "still held");
        stream.start_history(1, vec![StreamId::ZERO; 3], Vec::new());
        assert!(hub.release(&hold));
        let expected = [frame::event(None, None, "held"), notice, frame::event(None, None, "mine")];
        assert_eq!(drain(stream), expected);
        drop(joined);
        assert_eq!(hub.stats().channels, 0);
    }

    #[test]
    fn each_tick_pings_one_share_of_the_streams() {
        let hub = hub(5, PerUserPolicy::Reject);
        let streams: Vec<Joined> = ["a", "b", "c"].iter().map(|u| join(&hub, u).expect("joins")).collect();
        let frame = Bytes::from_static(b": ping\n\n");
        let mut pinged = vec![0; 3];
        for slot in 0..3 {
            hub.tick(Some(&Heartbeat { frame: frame.clone().into(), slot, slots: 3 }));
            let this_tick: Vec<usize> =
                streams.iter().map(|stream| drain(stream.membership.connection()).len()).collect();
            // Spread: each tick pings one stream of the three, not all of them at once.
            assert_eq!(this_tick.iter().sum::<usize>(), 1, "slot {slot} pinged {this_tick:?}");
            for (total, now) in pinged.iter_mut().zip(this_tick) {
                *total += now;
            }
        }
        assert_eq!(pinged, [1, 1, 1], "one ping per stream per round of slots");
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_second() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.allow(0), Some(0));
        assert_eq!(limiter.allow(0), None);
        assert_eq!(limiter.allow(0), None);
        assert_eq!(limiter.allow(1), Some(2));
    }

    #[tokio::test]
    async fn a_held_stream_gets_what_arrived_for_it_behind_its_replay_in_bus_order() {
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, 8);
        let joined = hub.join_held(UserId::new("h").expect("id"), channels("h"), u64::MAX).expect("joins");
        let hold = joined.hold.clone().expect("held");
        let other = join(&hub, "other").expect("joins");
        hub.deliver("sse:broadcast", None, b"live 1").await;
        hub.deliver("sse:user:h", None, b"live 2").await;
        let held = joined.membership.connection();
        assert!(drain(held).is_empty(), "nothing reaches a held stream");
        assert_eq!(drain(other.membership.connection()), [frame::event(None, None, "live 1")], "others get it at once");
        let replay = frame::event(None, None, "replayed");
        held.start_history(1, vec![StreamId::ZERO; 2], vec![Item::Raw(replay.clone().into())]);
        assert!(hub.release(&hold));
        hub.deliver("sse:user:h", None, b"live 3").await;
        let expected = ["live 1", "live 2", "live 3"].map(|d| frame::event(None, None, d));
        assert_eq!(drain(held), [&[replay][..], &expected[..]].concat());
    }

    #[tokio::test]
    async fn a_held_stream_that_falls_behind_is_cut_and_one_that_leaves_unsubscribes() {
        let hub = hub_sized(0, PerUserPolicy::Reject, 0, 2);
        let joined = hub.join_held(UserId::new("h").expect("id"), channels("h"), u64::MAX).expect("joins");
        let hold = joined.hold.clone().expect("held");
        for _ in 0..3 {
            hub.deliver("sse:user:h", None, b"x").await;
        }
        assert!(hold.overflowed());
        assert!(!hub.release(&hold), "cut off as a slow consumer");
        assert!(joined.membership.connection().is_closed());
        assert_eq!(hub.stats().connections, 0);

        let joined = hub.join_held(UserId::new("g").expect("id"), channels("g"), u64::MAX).expect("joins");
        assert_eq!(hub.stats().channels, 2);
        drop(joined);
        assert_eq!(hub.stats().channels, 0, "a held stream's channels are released when it leaves");
    }
}
