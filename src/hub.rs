//! The hub: this node's connections by user and by channel, fan-out of shared frames, and the
//! limits that decide whether a new stream may join.
//!
//! One `RwLock` guards the registry. Joins and leaves take it for writing, briefly; fan-out
//! takes it for reading and, per message, frames once and pushes the same `Bytes` into every
//! listener's queue. A channel's first listener asks the bus to subscribe and its last one to
//! unsubscribe, both under the lock so the bus sees them in the registry's order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{UserId, unix_now};
use crate::bus::{Bus, SubscriptionReady};
use crate::channel::ChannelName;
use crate::config::PerUserPolicy;
use crate::connection::{CloseReason, Connection, ConnectionId, Item, Pushed, Rebase};
use crate::envelope;
use crate::frame;
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
    /// Zero: off.
    pub inactivity_timeout: Duration,
    /// Zero: off.
    pub max_lifetime: Duration,
    /// History is on: `id:` lines are resume cursors, so a producer's own envelope `id` is not written.
    pub history: bool,
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
    pub frame: Bytes,
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
}

/// Listeners per worker below which a fan-out is not worth splitting.
const PARALLEL_FAN_OUT_MIN: usize = 1024;

#[derive(Default)]
struct Registry {
    channels: HashMap<ChannelName, ChannelEntry>,
    /// Each user's streams, oldest first.
    users: HashMap<UserId, Vec<Arc<Connection>>>,
    connections: usize,
    draining: bool,
}

struct ChannelEntry {
    /// Shared with fan-outs in progress, which write outside the registry lock; a join or leave
    /// during one copies the list (`Arc::make_mut`) instead of waiting for it. Unordered: a
    /// leave swaps the last listener into the gap, and every listener knows its index
    /// ([`Connection::listed_at`]).
    listeners: Arc<Vec<Arc<Connection>>>,
    ready: Arc<SubscriptionReady>,
    /// The newest history id delivered on this channel, where a backfill starts after a gap.
    last_id: Mutex<StreamId>,
    /// Set when the bus disconnected; cleared when the channel is resubscribed and backfilled.
    gap: AtomicBool,
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
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.connection.release();
        self.hub.detach(&self.connection);
    }
}

/// A stream that joined: its membership and the subscriptions it must wait for before
/// telling the client it is connected.
pub struct Joined {
    pub membership: Membership,
    pub pending: Vec<Arc<SubscriptionReady>>,
}

impl Hub {
    pub fn new(bus: Arc<dyn Bus>, limits: Limits, metrics: HubMetrics) -> Arc<Self> {
        Arc::new(Self {
            registry: RwLock::new(Registry::default()),
            bus,
            limits,
            metrics,
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            clock: AtomicU32::new(0),
            refusal_log: LogLimiter::default(),
            fan_out_workers: tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()),
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
    pub fn join(
        self: &Arc<Self>,
        user: UserId,
        channels: Vec<ChannelName>,
        token_expires_at: u64,
    ) -> Result<Joined, JoinError> {
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut evicted = None;
        let mut pending = Vec::new();
        let connection;
        {
            let mut registry = self.write();
            // Share the registry's name of each channel that already has listeners: events carry
            // that name, and a stream finds its channel by pointer instead of comparing strings.
            let channels: Box<[ChannelName]> = channels
                .into_iter()
                .map(|c| registry.channels.get_key_value(&c).map_or(c, |(known, _)| known.clone()))
                .collect();
            connection = Arc::new(Connection::new(id, user.clone(), channels, token_expires_at, self.now()));
            if registry.draining {
                return Err(JoinError::Draining);
            }
            if self.limits.per_node > 0 && registry.connections >= self.limits.per_node {
                return Err(JoinError::NodeFull);
            }
            let held = registry.users.get(&user).map_or(0, Vec::len);
            if self.limits.per_user > 0 && held >= self.limits.per_user {
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
            registry.connections += 1;
            for (slot, channel) in connection.channels.iter().enumerate() {
                let entry = registry.channels.entry(channel.clone()).or_insert_with(|| {
                    let ready = Arc::new(SubscriptionReady::default());
                    self.bus.subscribe(channel.clone(), ready.clone());
                    ChannelEntry {
                        listeners: Arc::default(),
                        ready,
                        last_id: Mutex::new(StreamId::ZERO),
                        gap: AtomicBool::new(false),
                    }
                });
                let listeners = Arc::make_mut(&mut entry.listeners);
                connection.set_listed_at(slot, listeners.len());
                listeners.push(connection.clone());
                if !entry.ready.is_set() {
                    pending.push(entry.ready.clone());
                }
            }
            self.metrics.channels.set(registry.channels.len() as f64);
        }
        self.metrics.active.increment(1.0);
        self.metrics.total.increment(1);
        if let Some(oldest) = evicted {
            self.metrics.closed(CloseReason::Replaced);
            oldest.close(CloseReason::Replaced.farewell());
        }
        Ok(Joined { membership: Membership { hub: self.clone(), connection }, pending })
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
        registry.connections -= 1;
        for (slot, channel) in connection.channels.iter().enumerate() {
            let Some(entry) = registry.channels.get_mut(channel) else { continue };
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
            if entry.listeners.is_empty() {
                registry.channels.remove(channel);
                self.bus.unsubscribe(channel.clone());
            }
        }
        self.metrics.channels.set(registry.channels.len() as f64);
        self.metrics.active.decrement(1.0);
        self.metrics.duration.record(connection.opened_at.elapsed().as_secs_f64());
    }

    /// Ends a stream for `reason`: it leaves the hub now and its client reads `farewell` last.
    pub fn close(&self, connection: &Arc<Connection>, reason: CloseReason, farewell: Bytes) {
        self.detach(connection);
        if connection.close(farewell) {
            self.metrics.closed(reason);
        }
    }

    /// Fans one payload from the bus out to this node's listeners on `channel`. `id` is its
    /// history id when it was published durably.
    pub async fn deliver(self: &Arc<Self>, channel: &str, id: Option<StreamId>, payload: &[u8]) {
        self.metrics.bus_messages.increment(1);
        let (listeners, item) = {
            let registry = self.read();
            let Some((name, entry)) = registry.channels.get_key_value(channel) else { return };
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
                    return;
                }
            };
            if let Some(id) = id {
                let mut last = entry.last_id.lock().unwrap_or_else(PoisonError::into_inner);
                *last = (*last).max(id);
            }
            let item = match id {
                Some(id) => Item::Event { channel: name.clone(), id, frame: framed },
                None => Item::Raw(framed),
            };
            (entry.listeners.clone(), item)
        };
        self.fan_out(channel, listeners, item).await;
    }

    /// Tells `channel`'s streams its history was lost (`frame` is the `reset` event): their
    /// cursors continue in `epoch` from `tail`, and so does the node's own backfill position.
    pub async fn deliver_rebase(self: &Arc<Self>, channel: &str, epoch: u32, tail: StreamId, frame: Bytes) {
        let (listeners, item) = {
            let registry = self.read();
            let Some((name, entry)) = registry.channels.get_key_value(channel) else { return };
            *entry.last_id.lock().unwrap_or_else(PoisonError::into_inner) = tail;
            let rebase = Rebase { epoch, channel: name.clone(), tail, frame };
            (entry.listeners.clone(), Item::Rebase(Arc::new(rebase)))
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
        let mut slow = self.push_to(&listeners[..share.min(listeners.len())], &item);
        // A share that panicked reached an unknown part of its listeners: none of it is counted
        // as sent. (The streams themselves are intact: a connection's lock survives a panic.)
        let mut lost = 0;
        for (part, other) in (1..parts).zip(others) {
            match other.await {
                Ok(cut) => slow += cut,
                Err(e) => {
                    lost += listeners.len().min((part + 1) * share).saturating_sub(part * share);
                    tracing::error!(channel, error = %e, "a fan-out share failed");
                }
            }
        }
        self.metrics.sent.increment(listeners.len().saturating_sub(slow + lost) as u64);
        self.metrics.fan_out.record(started.elapsed());
        if slow > 0 {
            self.metrics.closed_many(CloseReason::SlowConsumer, slow as u64);
            tracing::debug!(channel, slow, "cut off slow consumers");
        }
    }

    /// Pushes to each of `listeners`; returns how many were cut off as slow consumers.
    fn push_to(&self, listeners: &[Arc<Connection>], item: &Item) -> usize {
        let now = Some(self.now());
        let mut slow = 0;
        for listener in listeners {
            if listener.push(item, self.limits.queue_capacity, now) == Pushed::Full && listener.cut() {
                slow += 1;
            }
        }
        slow
    }

    /// The bus lost its connection: every channel has a gap until it is resubscribed.
    pub fn mark_gaps(&self) {
        for entry in self.read().channels.values() {
            entry.gap.store(true, Ordering::Release);
        }
    }

    /// After a resubscription: where to backfill `channel` from, if it had a gap and has
    /// delivered history before (a channel that joined during the outage replayed on its own).
    pub fn take_gap(&self, channel: &str) -> Option<StreamId> {
        let registry = self.read();
        let entry = registry.channels.get(channel)?;
        if !entry.gap.swap(false, Ordering::AcqRel) {
            return None;
        }
        let last = *entry.last_id.lock().unwrap_or_else(PoisonError::into_inner);
        (last != StreamId::ZERO).then_some(last)
    }

    /// Closes every stream (for instance when live messages were dropped: they resume from history).
    pub fn close_all(&self, reason: CloseReason) {
        let all: Vec<Arc<Connection>> = self.read().users.values().flatten().cloned().collect();
        for connection in all {
            self.close(&connection, reason, reason.farewell());
        }
    }

    /// Advances the clock; sends the heartbeat to this tick's share of the streams; closes
    /// streams past their timeouts.
    pub fn tick(&self, heartbeat: Option<&Heartbeat>) {
        let now = self.started.elapsed().as_secs() as u32;
        self.clock.store(now, Ordering::Relaxed);
        let unix = unix_now();
        let mut expired = Vec::new();
        let mut due = Vec::new();
        {
            let registry = self.read();
            for connection in registry.users.values().flatten() {
                if let Some(reason) = self.overdue(connection, now, unix) {
                    expired.push((connection.clone(), reason));
                } else if heartbeat.is_some_and(|h| connection.id.0 % h.slots == h.slot) {
                    due.push(connection.clone());
                }
            }
        }
        // Written outside the registry lock: a heartbeat may be a system call per stream.
        if let Some(heartbeat) = heartbeat {
            let ping = Item::Raw(heartbeat.frame.clone());
            for connection in due {
                if connection.push(&ping, self.limits.queue_capacity, None) == Pushed::Full {
                    expired.push((connection, CloseReason::SlowConsumer));
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

    fn overdue(&self, connection: &Connection, now: u32, unix: u64) -> Option<CloseReason> {
        if connection.token_expires_at <= unix {
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
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: false,
        };
        Hub::new(bus, limits, HubMetrics::new())
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

    #[test]
    fn each_tick_pings_one_share_of_the_streams() {
        let hub = hub(5, PerUserPolicy::Reject);
        let streams: Vec<Joined> = ["a", "b", "c"].iter().map(|u| join(&hub, u).expect("joins")).collect();
        let frame = Bytes::from_static(b": ping\n\n");
        let mut pinged = vec![0; 3];
        for slot in 0..3 {
            hub.tick(Some(&Heartbeat { frame: frame.clone(), slot, slots: 3 }));
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
}
