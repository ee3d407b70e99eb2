//! The Redis Cluster bus (`SSE_REDIS_URL=redis+cluster://host1:port1,host2:port2`): live
//! delivery over sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7+), with one subscriber
//! connection per shard that owns subscribed channels, and history on every primary.
//!
//! Naming: a channel `C` (`sse:user:42`) is `{C}` on the bus: its sharded pub/sub channel and
//! its history stream are both `{C}`, and its history's era marker is `{C}:epoch`. The braces
//! are the hash tag, so everything the durable-publish function touches is in one slot (and a
//! single Redis keeps its plain names: nothing changes there).
//!
//! One owner task keeps the wanted channels, the slot map (`CLUSTER SLOTS`, refreshed every
//! second and at once when a shard says a slot moved) and one [`shard`] connection per primary
//! holding subscribed channels. Like the single-Redis bus it batches: whatever piled up since the
//! last round goes out as one `SSUBSCRIBE` per slot (a command may only name channels of one
//! slot), all written back to back on the shard's connection, and a stream is `connected` only
//! once its shard confirmed. When a slot moves (migration: the old owner pushes `sunsubscribe`;
//! failover: the shard's connection drops) the channel gets a gap ([`Inbound::Unsubscribed`]),
//! is subscribed on the new owner, and its confirmation starts the dispatcher's backfill, which
//! reads every gapped channel's history in one concurrent round (one call per slot).
//!
//! The subscriber connections are this module's own RESP2 connections in subscribe mode rather
//! than redis-rs's cluster pub/sub: redis-rs 1.8 takes an unsolicited `sunsubscribe` push for the
//! reply of the oldest request in flight, which is exactly what a slot migration sends.
//! Commands (publish, history, functions) go through redis-rs's cluster client, which follows
//! `-MOVED` and `-ASK` itself.
//!
//! The function library is loaded on every primary with the same key (the first primary by
//! address holds the cluster's key; the others get it), checked every second, so a promoted
//! replica or an empty node gets it back within a second.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use deadpool_redis::redis::{self, RedisFuture, Value};
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::{Health, LATE_GRACE, Verdict};
use super::redis::{
    CHANNELS_PER_COMMAND, COMMAND_TIMEOUT, Command, PING_INTERVAL, SharedKey, bus_error, ensure_library,
    is_function_missing, library_code, load_library, malformed, parse_since, text,
};
use super::{Bus, BusError, BusFuture, Epoched, INBOUND_CAPACITY, Inbound, PublishReceipt, Running, SubscriptionReady};
use crate::channel::ChannelName;
use crate::history::{Library, Page, Since, StreamId, parse_epoch};
use crate::metrics::BusMetrics;
use crate::redis_tls::RedisTls;

mod resp;
mod shard;

use shard::{ShardCommand, ShardEvent};

/// `SSE_REDIS_URL` of a Redis Cluster: `redis+cluster://[user:password@]host:port,host:port`,
/// or `rediss+cluster://` for TLS to every node.
const SCHEME: &str = "redis+cluster://";
const TLS_SCHEME: &str = "rediss+cluster://";

/// Whether `url` names a Redis Cluster (with or without TLS).
pub fn is_cluster_url(url: &str) -> bool {
    url.starts_with(SCHEME) || url.starts_with(TLS_SCHEME)
}

/// What follows the scheme, and whether the nodes speak TLS.
fn after_scheme(url: &str) -> Option<(&str, bool)> {
    match url.strip_prefix(SCHEME) {
        Some(rest) => Some((rest, false)),
        None => url.strip_prefix(TLS_SCHEME).map(|rest| (rest, true)),
    }
}

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// How soon a subscription that a shard refused (moved, migrating, cluster down) is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// The seed nodes of a `redis+cluster://` URL as `redis://` URLs (`rediss://` with TLS;
/// credentials on each).
pub fn seeds(url: &str) -> Result<Vec<String>, BusError> {
    let bad = || BusError::Config(format!("{SCHEME}host:port,host:port is expected"));
    let (rest, tls) = after_scheme(url).ok_or_else(bad)?;
    let scheme = if tls { "rediss" } else { "redis" };
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    };
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host.rsplit_once(':').ok_or_else(bad)?;
        if name.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        seeds.push(match auth {
            Some(auth) => format!("{scheme}://{auth}@{name}:{port}"),
            None => format!("{scheme}://{name}:{port}"),
        });
    }
    Ok(seeds)
}

/// The credentials of a `redis+cluster://` URL: (user, password).
fn credentials(url: &str) -> Option<(Option<String>, String)> {
    let rest = after_scheme(url)?.0.split(['/', '?']).next()?;
    let (auth, _) = rest.rsplit_once('@')?;
    match auth.split_once(':') {
        Some(("", password)) => Some((None, password.to_owned())),
        Some((user, password)) => Some((Some(user.to_owned()), password.to_owned())),
        None => Some((None, auth.to_owned())),
    }
}

/// A channel's name on a cluster: its stream key and sharded pub/sub channel (`{<channel>}`).
pub fn bus_name(channel: &str) -> String {
    format!("{{{channel}}}")
}

/// The channel a cluster name stands for (the name itself if it is not one).
fn channel_of(name: &str) -> &str {
    name.strip_prefix('{').and_then(|n| n.strip_suffix('}')).unwrap_or(name)
}

/// The cluster slot of a key or shard channel (CRC16-XMODEM of its hash tag, or of all of it).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&len| len > 0).map(|len| &rest[..len])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Which primary (`host:port`) serves each slot range, from `CLUSTER SLOTS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SlotMap {
    /// Start of each range → (end, primary), ascending.
    ranges: BTreeMap<u16, (u16, String)>,
}

impl SlotMap {
    fn parse(reply: &Value) -> Option<Self> {
        let Value::Array(ranges) = reply else { return None };
        let mut map = SlotMap::default();
        for range in ranges {
            let Value::Array(parts) = range else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = primary.first().and_then(text)?;
            let Some(Value::Int(port)) = primary.get(1) else { return None };
            map.ranges.insert(u16::try_from(*start).ok()?, (u16::try_from(*end).ok()?, format!("{host}:{port}")));
        }
        Some(map)
    }

    fn owner(&self, slot: u16) -> Option<&str> {
        let (_, (end, owner)) = self.ranges.range(..=slot).next_back()?;
        (slot <= *end).then_some(owner.as_str())
    }

    /// Moves one slot to `owner` (what a `-MOVED` says), splitting its range.
    fn assign(&mut self, slot: u16, owner: &str) {
        if let Some((&start, (end, _))) = self.ranges.range(..=slot).next_back()
            && slot <= *end
        {
            let (end, old) = self.ranges.remove(&start).unwrap_or_default();
            if start < slot {
                self.ranges.insert(start, (slot - 1, old.clone()));
            }
            if slot < end {
                self.ranges.insert(slot + 1, (end, old));
            }
        }
        self.ranges.insert(slot, (slot, owner.to_owned()));
    }

    fn covers_all(&self) -> bool {
        let mut next: u32 = 0;
        for (&start, (end, _)) in &self.ranges {
            if u32::from(start) != next {
                return false;
            }
            next = u32::from(*end) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// Every primary, sorted: the first holds the cluster's library key.
    fn primaries(&self) -> Vec<String> {
        let mut all: Vec<String> = self.ranges.values().map(|(_, owner)| owner.clone()).collect();
        all.sort();
        all.dedup();
        all
    }
}

/// One primary, addressed through the cluster client (for the function library, which every
/// primary must hold).
#[derive(Clone)]
struct NodeConnection {
    connection: ClusterConnection,
    routing: RoutingInfo,
}

impl NodeConnection {
    fn new(connection: ClusterConnection, address: &str) -> Option<Self> {
        let (host, port) = address.rsplit_once(':')?;
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port: port.parse().ok()?,
        });
        Some(Self { connection, routing })
    }
}

impl redis::aio::ConnectionLike for NodeConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.connection.route_command(cmd.clone(), self.routing.clone()))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut replies = Vec::new();
            for cmd in pipeline.cmd_iter().skip(offset).take(count) {
                replies.push(self.connection.route_command(cmd.clone(), self.routing.clone()).await?);
            }
            Ok(replies)
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The command connection, once the owner made it (the seeds may be down at startup).
#[derive(Clone, Default)]
struct SharedConnection(Arc<RwLock<Option<ClusterConnection>>>);

impl SharedConnection {
    fn get(&self) -> Result<ClusterConnection, BusError> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| BusError::Unavailable("not connected to the redis cluster yet".into()))
    }

    fn set(&self, connection: ClusterConnection) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(connection);
    }
}

pub struct ClusterBus {
    commands: mpsc::UnboundedSender<Command>,
    ready: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
    connection: SharedConnection,
    library: Option<Arc<Library>>,
    key: SharedKey,
    /// Asks the owner to check every primary's library now (a call found one without it).
    check_library: Arc<tokio::sync::Notify>,
}

impl ClusterBus {
    /// Starts the owner task. Returns at once: the cluster may still be unreachable, which
    /// `is_ready` reports until the slot map is known and every primary holds the library.
    pub fn start(
        url: &str,
        tls: RedisTls,
        library: Option<Library>,
        metrics: BusMetrics,
        shutdown: CancellationToken,
    ) -> Result<Running, BusError> {
        let mut builder = ClusterClientBuilder::new(seeds(url)?)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(COMMAND_TIMEOUT);
        if let Some(certificates) = tls.certificates() {
            builder = builder.certs(certificates);
        }
        let client = builder.build().map_err(|e| BusError::Config(e.to_string()))?;
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let overflowed = Arc::new(AtomicBool::new(false));
        let library = library.map(Arc::new);
        let key = SharedKey::default();
        let connection = SharedConnection::default();
        let check_library = Arc::new(tokio::sync::Notify::new());
        let owner = Owner {
            client,
            connection: connection.clone(),
            credentials: credentials(url),
            tls,
            commands: command_rx,
            events: events_rx,
            events_tx,
            shared: shard::Shared {
                inbound: inbound_tx,
                overflowed: overflowed.clone(),
                metrics: metrics.clone(),
                key: key.clone(),
            },
            ready: ready.clone(),
            metrics,
            library: library.clone(),
            key: key.clone(),
            check_library: check_library.clone(),
            slots: SlotMap::default(),
            states: HashMap::new(),
            pending: HashSet::new(),
            leaving: HashMap::new(),
            shards: HashMap::new(),
            sequence: 0,
            retry_at: None,
            refresh: false,
            health: Health::default(),
        };
        let owner = tokio::spawn(owner.run(shutdown));
        let bus = Arc::new(Self { commands, ready, overflowed, connection, library, key, check_library });
        Ok(Running { bus, inbound: inbound_rx, owner: Some(owner), target: None })
    }

    /// Runs `calls` concurrently (each is routed to its slot's primary; the client pipelines
    /// what goes to one node), loading the library everywhere first if a primary lost it.
    async fn calls(&self, calls: &[redis::Cmd]) -> Result<Vec<Value>, BusError> {
        let connection = self.connection.get()?;
        let run = || {
            join_all(calls.iter().map(|call| {
                let mut connection = connection.clone();
                async move { tokio::time::timeout(COMMAND_TIMEOUT, call.query_async::<Value>(&mut connection)).await }
            }))
        };
        let mut replies = Vec::with_capacity(calls.len());
        let mut missing = false;
        for reply in run().await {
            match reply.map_err(|_| BusError::Timeout)? {
                Err(e) if is_function_missing(&e) => missing = true,
                Err(e) => return Err(bus_error(e)),
                Ok(value) => replies.push(value),
            }
        }
        if !missing {
            return Ok(replies);
        }
        let library = self.library.as_deref().ok_or(BusError::HistoryOff)?;
        ensure_everywhere(&connection, library, &self.key).await?;
        self.check_library.notify_one();
        let mut replies = Vec::with_capacity(calls.len());
        for reply in run().await {
            replies.push(reply.map_err(|_| BusError::Timeout)?.map_err(bus_error)?);
        }
        Ok(replies)
    }
}

/// Loads the library on every primary with the cluster's key: the first primary by address
/// decides it ([`ensure_library`] adopts whatever it holds), the others get exactly that code.
async fn ensure_everywhere(connection: &ClusterConnection, library: &Library, key: &SharedKey) -> Result<(), BusError> {
    let mut slots = connection.clone();
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut slots).await.map_err(bus_error)?;
    let map = SlotMap::parse(&reply).ok_or_else(malformed)?;
    ensure_on(connection, &map.primaries(), library, key).await
}

async fn ensure_on(
    connection: &ClusterConnection,
    primaries: &[String],
    library: &Library,
    key: &SharedKey,
) -> Result<(), BusError> {
    let Some((first, rest)) = primaries.split_first() else { return Err(malformed()) };
    let mut node = NodeConnection::new(connection.clone(), first).ok_or_else(malformed)?;
    ensure_library(&mut node, library, key).await?;
    let wanted = library.render(&key.get().ok_or_else(malformed)?);
    for primary in rest {
        let mut node = NodeConnection::new(connection.clone(), primary).ok_or_else(malformed)?;
        if library_code(&mut node).await?.as_deref() != Some(wanted.as_str()) {
            load_library(&mut node, &wanted, true).await?;
        }
    }
    Ok(())
}

/// Where a channel's subscription is.
enum State {
    /// Not asked for yet (new, or moved off its shard): waiters of streams being connected.
    Pending(Vec<Arc<SubscriptionReady>>),
    /// `SSUBSCRIBE` sent to this primary, not confirmed yet.
    Requested(String, Vec<Arc<SubscriptionReady>>),
    Subscribed(String),
}

struct Owner {
    client: ClusterClient,
    connection: SharedConnection,
    credentials: Option<(Option<String>, String)>,
    /// For the shard subscribers' own connections (`rediss+cluster://`).
    tls: RedisTls,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedReceiver<ShardEvent>,
    events_tx: mpsc::UnboundedSender<ShardEvent>,
    shared: shard::Shared,
    ready: Arc<AtomicBool>,
    metrics: BusMetrics,
    library: Option<Arc<Library>>,
    key: SharedKey,
    check_library: Arc<tokio::sync::Notify>,
    slots: SlotMap,
    /// Every wanted channel, by cluster name (`{<channel>}`).
    states: HashMap<String, State>,
    /// The names in `states` that are `Pending`.
    pending: HashSet<String>,
    /// Channels released since the last round, by the primary that has them.
    leaving: HashMap<String, Vec<String>>,
    /// One subscriber connection per primary that was asked for a channel.
    shards: HashMap<String, mpsc::UnboundedSender<ShardCommand>>,
    sequence: u64,
    /// Pending subscriptions wait until then (a shard refused them a moment ago).
    retry_at: Option<Instant>,
    /// Read the slot map again before the next round (a shard said a slot moved).
    refresh: bool,
    health: Health,
}

impl Owner {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(PING_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let check_library = self.check_library.clone();
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = self.commands.recv() => {
                    let Some(command) = command else { return };
                    self.note(command);
                    while let Ok(command) = self.commands.try_recv() {
                        self.note(command);
                    }
                }
                Some(event) = self.events.recv() => {
                    self.on_event(event);
                    while let Ok(event) = self.events.try_recv() {
                        self.on_event(event);
                    }
                }
                _ = tick.tick() => self.health().await,
                _ = check_library.notified() => self.health().await,
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry_at = None;
                }
            }
            if self.refresh {
                self.refresh_slots().await;
            }
            self.flush();
        }
    }

    fn note(&mut self, command: Command) {
        match command {
            Command::Subscribe(channel, ready) => {
                let name = bus_name(channel.as_str());
                match self.states.get_mut(&name) {
                    Some(State::Subscribed(_)) => ready.set(),
                    Some(State::Pending(waiters) | State::Requested(_, waiters)) => waiters.push(ready),
                    None => {
                        self.states.insert(name.clone(), State::Pending(vec![ready]));
                        self.pending.insert(name);
                    }
                }
            }
            Command::Unsubscribe(channel) => {
                let name = bus_name(channel.as_str());
                match self.states.remove(&name) {
                    Some(State::Requested(shard, _) | State::Subscribed(shard)) => {
                        self.leaving.entry(shard).or_default().push(name);
                    }
                    Some(State::Pending(_)) => {
                        self.pending.remove(&name);
                    }
                    None => {}
                }
            }
        }
    }

    fn on_event(&mut self, event: ShardEvent) {
        match event {
            ShardEvent::Confirmed(shard, name) => {
                if let Some(state) = self.states.get_mut(&name)
                    && matches!(state, State::Requested(at, _) if *at == shard)
                    && let State::Requested(_, waiters) = std::mem::replace(state, State::Subscribed(shard))
                {
                    waiters.iter().for_each(|w| w.set());
                }
            }
            ShardEvent::Lost(shard, name) => {
                tracing::info!(
                    channel = channel_of(&name),
                    shard,
                    "a cluster slot moved; subscribing on its new owner"
                );
                self.repend(&shard, std::iter::once(name));
                self.refresh = true;
            }
            ShardEvent::Refused(shard, names, error) => {
                match moved_to(&error) {
                    Some((slot, owner)) => self.slots.assign(slot, &owner),
                    None => {
                        tracing::debug!(shard, error, "SSUBSCRIBE refused; retrying");
                        self.refresh = true;
                        self.retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
                self.repend(&shard, names.into_iter());
            }
            ShardEvent::Down(shard) => {
                tracing::warn!(shard, "lost the subscriber connection to a cluster shard; resubscribing");
                self.shards.remove(&shard);
                let on_shard: Vec<String> = self
                    .states
                    .iter()
                    .filter(
                        |(_, state)| matches!(state, State::Requested(at, _) | State::Subscribed(at) if *at == shard),
                    )
                    .map(|(name, _)| name.clone())
                    .collect();
                self.repend(&shard, on_shard.into_iter());
                self.leaving.remove(&shard);
                self.refresh = true;
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }

    /// Makes the channels that `shard` had (or was asked for) pending again, keeping waiters.
    fn repend(&mut self, shard: &str, names: impl Iterator<Item = String>) {
        for name in names {
            if let Some(state) = self.states.get_mut(&name) {
                let waiters = match std::mem::replace(state, State::Pending(Vec::new())) {
                    State::Requested(at, waiters) if at == shard => waiters,
                    State::Subscribed(at) if at == shard => Vec::new(),
                    other => {
                        *state = other;
                        continue;
                    }
                };
                *state = State::Pending(waiters);
                self.pending.insert(name);
            }
        }
    }

    /// Sends what piled up: releases first, then one `SSUBSCRIBE` per slot on its primary's
    /// connection. Channels whose slot has no known owner stay pending.
    fn flush(&mut self) {
        for (shard, names) in std::mem::take(&mut self.leaving) {
            if let Some(connection) = self.shards.get(&shard) {
                for batch in by_slot(names) {
                    self.sequence += 1;
                    let _ = connection.send(ShardCommand::Unsubscribe(self.sequence, batch));
                    self.metrics.unsubscribe_commands.increment(1);
                }
            }
        }
        if self.pending.is_empty() || self.retry_at.is_some() || self.slots.ranges.is_empty() {
            return;
        }
        let mut by_shard: HashMap<String, Vec<String>> = HashMap::new();
        for name in std::mem::take(&mut self.pending) {
            match self.slots.owner(slot(name.as_bytes())) {
                Some(owner) => by_shard.entry(owner.to_owned()).or_default().push(name),
                None => {
                    self.pending.insert(name);
                }
            }
        }
        for (shard, names) in by_shard {
            let connection = self.shard(&shard);
            for name in &names {
                if let Some(state) = self.states.get_mut(name)
                    && let State::Pending(waiters) = std::mem::replace(state, State::Subscribed(String::new()))
                {
                    *state = State::Requested(shard.clone(), waiters);
                }
            }
            for batch in by_slot(names) {
                self.sequence += 1;
                let _ = connection.send(ShardCommand::Subscribe(self.sequence, batch));
                self.metrics.subscribe_commands.increment(1);
            }
        }
    }

    /// The subscriber connection to `shard`, started if there is none.
    fn shard(&mut self, shard: &str) -> mpsc::UnboundedSender<ShardCommand> {
        if let Some(connection) = self.shards.get(shard)
            && !connection.is_closed()
        {
            return connection.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = shard::Shard::new(
            shard.to_owned(),
            self.credentials.clone(),
            self.tls.clone(),
            rx,
            self.events_tx.clone(),
            self.shared.clone(),
        );
        tokio::spawn(task.run());
        self.shards.insert(shard.to_owned(), tx.clone());
        tx
    }

    /// Connects if needed, reads the slot map, and checks the library on every primary; see
    /// [`Health`] for what a late answer does.
    async fn health(&mut self) {
        let began = std::time::Instant::now();
        let verdict = self.check().await;
        let was = self.ready.load(Ordering::Acquire);
        let alive = self.health.ready_after(verdict, began, was);
        self.ready.store(alive, Ordering::Release);
        self.metrics.ready.set(if alive { 1.0 } else { 0.0 });
        match (was, alive) {
            (false, true) => tracing::info!(channels = self.states.len(), "redis cluster bus ready"),
            (true, false) if verdict == Verdict::Late => {
                tracing::warn!("redis cluster bus not ready: its checks have gone unanswered for {LATE_GRACE:?}")
            }
            (true, false) => tracing::warn!(
                "redis cluster bus not ready (unreachable, slots uncovered, or a primary without the library)"
            ),
            _ => {}
        }
    }

    async fn check(&mut self) -> Verdict {
        if self.connection.get().is_err() {
            match tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_connection()).await {
                Ok(Ok(connection)) => self.connection.set(connection),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot connect to the redis cluster");
                    return Verdict::of(&e);
                }
                Err(_) => return Verdict::Late,
            }
        }
        match self.refresh_slots().await {
            Verdict::Healthy if !self.slots.covers_all() => return Verdict::Failed,
            Verdict::Healthy => {}
            other => return other,
        }
        let Some(library) = self.library.clone() else { return Verdict::Healthy };
        let Ok(connection) = self.connection.get() else { return Verdict::Failed };
        let primaries = self.slots.primaries();
        match self.library_current(&connection, &primaries).await {
            Verdict::Failed => {}
            // Not loading it again on a late answer: that is more work for shards (or a node)
            // already behind, and the library is most likely still there.
            current_or_late => return current_or_late,
        }
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, ensure_on(&connection, &primaries, &library, &self.key)).await {
            Ok(Ok(())) => Verdict::Healthy,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot load the history function library on every primary");
                Verdict::of_bus(&e)
            }
            Err(_) => Verdict::Late,
        }
    }

    /// Whether every primary answers with the fingerprint of the key this node holds: failed
    /// when one answers otherwise (or refuses), late when one does not answer in time.
    async fn library_current(&self, connection: &ClusterConnection, primaries: &[String]) -> Verdict {
        let Some(held) = self.key.fingerprint() else { return Verdict::Failed };
        let asks = primaries.iter().map(|primary| {
            let node = NodeConnection::new(connection.clone(), primary);
            let held = held.as_str();
            async move {
                let Some(mut node) = node else { return Verdict::Failed };
                let mut ask = redis::cmd("FCALL");
                ask.arg("sse_key_id").arg(0);
                match tokio::time::timeout(COMMAND_TIMEOUT, ask.query_async::<String>(&mut node)).await {
                    Ok(Ok(id)) if id == held => Verdict::Healthy,
                    Ok(Ok(_)) => Verdict::Failed,
                    Ok(Err(e)) if is_function_missing(&e) => Verdict::Failed,
                    Ok(Err(e)) => Verdict::of(&e),
                    Err(_) => Verdict::Late,
                }
            }
        });
        join_all(asks).await.into_iter().fold(Verdict::Healthy, Verdict::and)
    }

    /// Reads `CLUSTER SLOTS`; a channel whose slot changed owner is released from the old one,
    /// gets a gap, and is subscribed on the new one. Healthy when the cluster answered.
    async fn refresh_slots(&mut self) -> Verdict {
        self.refresh = false;
        let Ok(mut connection) = self.connection.get() else { return Verdict::Failed };
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let ask = slots.query_async::<Value>(&mut connection);
        let map = match tokio::time::timeout(COMMAND_TIMEOUT, ask).await {
            Ok(Ok(reply)) => SlotMap::parse(&reply),
            Ok(Err(e)) => return Verdict::of(&e),
            Err(_) => return Verdict::Late,
        };
        let Some(map) = map else { return Verdict::Failed };
        if map == self.slots {
            return Verdict::Healthy;
        }
        self.slots = map;
        let mut moved = Vec::new();
        for (name, state) in &self.states {
            let at = match state {
                State::Requested(at, _) | State::Subscribed(at) => at,
                State::Pending(_) => continue,
            };
            if self.slots.owner(slot(name.as_bytes())) != Some(at.as_str()) {
                moved.push((at.clone(), name.clone()));
            }
        }
        for (shard, name) in moved {
            // Messages on the new owner until the new subscription are read back from history.
            if self.shared.inbound.try_send(Inbound::Unsubscribed(ChannelName::from_bus(channel_of(&name)))).is_err() {
                self.shared.overflowed.store(true, Ordering::Release);
            }
            self.leaving.entry(shard.clone()).or_default().push(name.clone());
            self.repend(&shard, std::iter::once(name));
        }
        Verdict::Healthy
    }
}

/// Groups cluster names by slot, in commands of at most [`CHANNELS_PER_COMMAND`].
fn by_slot(names: Vec<String>) -> Vec<Vec<String>> {
    let mut groups: HashMap<u16, Vec<String>> = HashMap::new();
    for name in names {
        groups.entry(slot(name.as_bytes())).or_default().push(name);
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(CHANNELS_PER_COMMAND).map(<[String]>::to_vec).collect::<Vec<_>>())
        .collect()
}

/// `MOVED <slot> <host:port>` → where the slot is now.
fn moved_to(error: &str) -> Option<(u16, String)> {
    let mut words = error.split_whitespace();
    (words.next()? == "MOVED").then_some(())?;
    let slot = words.next()?.parse().ok()?;
    Some((slot, words.next()?.to_owned()))
}

impl Bus for ClusterBus {
    fn subscribe(&self, channel: ChannelName, ready: Arc<SubscriptionReady>) {
        let _ = self.commands.send(Command::Subscribe(channel, ready));
    }

    fn unsubscribe(&self, channel: ChannelName) {
        let _ = self.commands.send(Command::Unsubscribe(channel));
    }

    fn publish<'a>(
        &'a self,
        channels: &'a [ChannelName],
        payload: Bytes,
        durable: bool,
    ) -> BusFuture<'a, PublishReceipt> {
        Box::pin(async move {
            let mut receipt = PublishReceipt { channels: channels.len(), ..Default::default() };
            let durable = durable && self.library.is_some();
            let calls: Vec<redis::Cmd> = channels
                .iter()
                .map(|channel| {
                    let name = bus_name(channel.as_str());
                    if durable {
                        let mut call = redis::cmd("FCALL");
                        call.arg("sse_publish").arg(2).arg(&name).arg(format!("{name}:epoch")).arg(payload.as_ref());
                        call
                    } else {
                        let mut call = redis::cmd("SPUBLISH");
                        call.arg(name).arg(payload.as_ref());
                        call
                    }
                })
                .collect();
            let replies = self.calls(&calls).await?;
            if durable {
                receipt.ids = replies.iter().map(|v| text(v).ok_or_else(malformed)).collect::<Result<_, _>>()?;
            } else {
                let counts = replies.iter().map(|v| if let Value::Int(n) = v { *n as usize } else { 0 });
                receipt.receivers = Some(counts.sum());
            }
            Ok(receipt)
        })
    }

    fn tails<'a>(&'a self, channels: &'a [ChannelName]) -> BusFuture<'a, Epoched<StreamId>> {
        Box::pin(async move {
            let calls: Vec<redis::Cmd> = channels
                .iter()
                .map(|channel| {
                    let mut call = redis::cmd("FCALL");
                    call.arg("sse_tail").arg(1).arg(bus_name(channel.as_str()));
                    call
                })
                .collect();
            let mut epoch = None;
            let mut tails = Vec::with_capacity(channels.len());
            for reply in self.calls(&calls).await? {
                let Value::Array(values) = reply else { return Err(malformed()) };
                let mut values = values.iter();
                let this = values.next().and_then(text).and_then(|e| parse_epoch(&e)).ok_or_else(malformed)?;
                epoch.get_or_insert(this);
                tails.push(values.next().and_then(text).and_then(|t| StreamId::parse(&t)).ok_or_else(malformed)?);
            }
            Ok(Epoched { epoch: epoch.unwrap_or_else(|| self.epoch()), values: tails })
        })
    }

    fn since<'a>(
        &'a self,
        epoch: u32,
        away: Duration,
        positions: &'a [(ChannelName, StreamId)],
        page: Page,
    ) -> BusFuture<'a, Epoched<Since>> {
        Box::pin(async move {
            // A call may only touch one slot: one call per slot, all at once, sharing the page.
            let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
            for (index, (channel, _)) in positions.iter().enumerate() {
                let at = slot(bus_name(channel.as_str()).as_bytes());
                match groups.iter_mut().find(|(s, _)| *s == at) {
                    Some((_, members)) => members.push(index),
                    None => groups.push((at, vec![index])),
                }
            }
            let share = |total: u32| (total / groups.len().max(1) as u32).max(1);
            let calls: Vec<redis::Cmd> = groups
                .iter()
                .map(|(_, members)| {
                    let mut call = redis::cmd("FCALL");
                    // The channels, then their era markers (every key the call reads, declared).
                    call.arg("sse_since").arg(members.len() * 2);
                    for &i in members {
                        call.arg(bus_name(positions[i].0.as_str()));
                    }
                    for &i in members {
                        call.arg(format!("{}:epoch", bus_name(positions[i].0.as_str())));
                    }
                    call.arg(epoch.to_string())
                        .arg(away.as_millis() as u64)
                        .arg(share(page.entries))
                        .arg(share(page.bytes));
                    for &i in members {
                        call.arg(positions[i].1.to_string());
                    }
                    if page.strict {
                        call.arg("strict");
                    }
                    call
                })
                .collect();
            let mut values: Vec<Option<Since>> = (0..positions.len()).map(|_| None).collect();
            let mut current = None;
            for ((_, members), reply) in groups.iter().zip(self.calls(&calls).await?) {
                let Value::Array(reply) = reply else { return Err(malformed()) };
                let answer = parse_since(reply, members.len())?;
                current.get_or_insert(answer.epoch);
                for (&i, since) in members.iter().zip(answer.values) {
                    values[i] = Some(since);
                }
            }
            let values = values.into_iter().collect::<Option<Vec<_>>>().ok_or_else(malformed)?;
            Ok(Epoched { epoch: current.unwrap_or_else(|| self.epoch()), values })
        })
    }

    fn claim_once<'a>(&'a self, key: &'a str, lifetime: Duration) -> BusFuture<'a, bool> {
        Box::pin(async move {
            let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut set = redis::cmd("SET");
            set.arg(key).arg(1).arg("NX").arg("PX").arg(lifetime_ms);
            let mut connection = self.connection.get()?;
            let reply = tokio::time::timeout(COMMAND_TIMEOUT, set.query_async::<Option<String>>(&mut connection))
                .await
                .map_err(|_| BusError::Timeout)?
                .map_err(bus_error)?;
            Ok(reply.is_some())
        })
    }

    fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }
}

impl ClusterBus {
    /// The cluster's epoch when no call answered with it (no channels asked about).
    fn epoch(&self) -> u32 {
        self.key.get().map_or(0, |key| key.cluster_epoch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_key_slots() {
        // `CLUSTER KEYSLOT` of the same keys on redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS, "an empty tag hashes the whole key");
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_channel_its_stream_and_its_era_marker_share_a_slot() {
        for channel in ["sse:user:42", "sse:topic:a}b", "sse:topic:{x}", "sse:broadcast"] {
            let name = bus_name(channel);
            assert_eq!(channel_of(&name), channel);
            assert_eq!(slot(name.as_bytes()), slot(format!("{name}:epoch").as_bytes()), "{channel}");
        }
        assert_eq!(channel_of("sse:user:1"), "sse:user:1");
    }

    #[test]
    fn seed_urls_are_read() {
        assert_eq!(
            seeds("redis+cluster://a:1,b:2").expect("seeds"),
            ["redis://a:1", "redis://b:2"].map(String::from).to_vec()
        );
        assert_eq!(seeds("redis+cluster://u:p@a:1,b:2/").expect("seeds")[1], "redis://u:p@b:2");
        assert_eq!(credentials("redis+cluster://u:p@a:1,b:2"), Some((Some("u".into()), "p".into())));
        assert_eq!(credentials("redis+cluster://:p@a:1"), Some((None, "p".into())));
        assert_eq!(credentials("redis+cluster://a:1"), None);
        assert_eq!(seeds("rediss+cluster://u:p@a:1,b:2").expect("tls seeds")[0], "rediss://u:p@a:1");
        assert_eq!(credentials("rediss+cluster://:p@a:1"), Some((None, "p".into())));
        assert!(is_cluster_url("rediss+cluster://a:1") && is_cluster_url("redis+cluster://a:1"));
        assert!(!is_cluster_url("rediss://a:1"));
        for bad in
            ["redis+cluster://", "redis+cluster://a", "redis+cluster://a:1,", "redis+cluster://a:x", "redis://a:1"]
        {
            assert!(seeds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_slot_map_finds_owners_and_follows_a_moved_slot() {
        let int = |n: i64| Value::Int(n);
        let node = |port: i64| Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), int(port)]);
        let reply = Value::Array(vec![
            Value::Array(vec![int(0), int(5460), node(7000)]),
            Value::Array(vec![int(5461), int(10922), node(7001), node(7004)]),
            Value::Array(vec![int(10923), int(16383), node(7002)]),
        ]);
        let mut map = SlotMap::parse(&reply).expect("parsed");
        assert!(map.covers_all());
        assert_eq!(map.owner(0), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5461), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(16383), Some("127.0.0.1:7002"));
        assert_eq!(map.primaries().len(), 3);
        map.assign(6000, "127.0.0.1:7002");
        assert_eq!(map.owner(6000), Some("127.0.0.1:7002"));
        assert_eq!((map.owner(5999), map.owner(6001)), (Some("127.0.0.1:7001"), Some("127.0.0.1:7001")));
        assert!(map.covers_all());
        assert_eq!(moved_to("MOVED 6000 127.0.0.1:7002"), Some((6000, "127.0.0.1:7002".into())));
        assert_eq!(moved_to("ASK 6000 127.0.0.1:7002"), None);
        let partial = Value::Array(vec![Value::Array(vec![int(0), int(5460), node(7000)])]);
        assert!(!SlotMap::parse(&partial).expect("parsed").covers_all());
    }

    #[test]
    fn channels_are_sent_one_slot_per_command() {
        let names: Vec<String> = (0..50).map(|i| bus_name(&format!("sse:user:{i}"))).collect();
        let batches = by_slot(names);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 50);
        for batch in batches {
            assert!(batch.iter().all(|n| slot(n.as_bytes()) == slot(batch[0].as_bytes())));
        }
    }
}
