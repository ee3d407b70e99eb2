//! The Redis bus: exactly one subscriber connection per node, shared by every local stream.
//!
//! A single task (the subscription owner) holds the subscriber connection and serialises
//! SUBSCRIBE/UNSUBSCRIBE: the hub asks for a channel on its first local listener and releases
//! it on its last, and the owner batches whatever piled up since its last round trip, so a
//! burst of 10k connects costs a handful of commands. Commands that cancel each other out
//! (a listener leaving and a new one arriving) never reach Redis.
//!
//! The connection is a RESP3 `ConnectionManager` with automatic resubscription and unlimited
//! reconnect attempts: after Redis restarts it re-subscribes exactly the live set by itself
//! (measured: with redis-rs's default budget of six retries it stayed dead after a 20 s outage
//! until some command happened to be sent on it). Readiness is what a 1 s PING says, and drops
//! at once on a disconnection push.
//!
//! Publishing from the node (the HTTP API) goes through a separate `deadpool-redis` pool, and
//! history reads through one shared multiplexed connection (pipelined, so a storm of thousands
//! of resumes never waits for a pooled connection); neither uses the subscriber connection.
//!
//! The connections go where a [`Target`] says: one Redis, or the primary the sentinels name
//! (`redis+sentinel://`). When the primary moves, the owner drops the subscriber connection
//! to the old one and subscribes every channel again on the new one, and publishing and reads
//! reconnect at their next call; to the dispatcher a failover looks like a reconnect
//! (`Disconnected`, then a confirmation per channel, each backfilled from history).
//!
//! With history on, the bus also keeps the function library loaded and holds the cluster's
//! [`LiveKey`], read from the library: a live message's history id is trusted only when its tag
//! verifies under it ([`read_live`]). Each health check asks the library for the key's
//! fingerprint, so a node learns within a second when the library was lost (it loads it again,
//! with the key it holds) or replaced; the node is not ready while it has no key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_redis::redis::{self, PushInfo, PushKind, Value, aio::ConnectionManager, aio::ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::health::{Health, LATE_GRACE, Verdict};
use super::primary::Target;
use super::sentinel::{Located, Watcher};
use super::{Bus, BusError, BusFuture, Epoched, INBOUND_CAPACITY, Inbound, PublishReceipt, Running, SubscriptionReady};
use crate::channel::ChannelName;
use crate::history::{
    Entry, LIVE_ID_MARK, Library, Live, LiveKey, Page, Since, StreamId, install_cursor_key, parse_epoch, read_live,
};
use crate::metrics::BusMetrics;

/// How long one SUBSCRIBE/UNSUBSCRIBE/PING may take before the owner retries later.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE command; keeps one reply from growing without bound.
pub(super) const CHANNELS_PER_COMMAND: usize = 1000;
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(1);

/// The cluster's live key as this node last read it from the library (`None` until then, and
/// always with history off).
#[derive(Clone, Default)]
pub(super) struct SharedKey(Arc<RwLock<Option<LiveKey>>>);

impl SharedKey {
    pub(super) fn get(&self) -> Option<LiveKey> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(super) fn fingerprint(&self) -> Option<String> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).as_ref().map(LiveKey::fingerprint)
    }

    /// Reads a live message under the key (on the push path: a read lock, nobody writes it but
    /// when the key changes).
    pub(super) fn read(&self, channel: &[u8], message: &Bytes) -> Live {
        if message.first() != Some(&LIVE_ID_MARK) {
            return Live::Plain(message.clone()); // Most messages: no lock.
        }
        read_live(channel, message, self.0.read().unwrap_or_else(PoisonError::into_inner).as_ref())
    }

    pub(super) fn adopt(&self, key: LiveKey) {
        let mut held = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if held.as_ref() != Some(&key) {
            tracing::info!(key = %key.fingerprint(), "using the history key of the function library");
            install_cursor_key(key.cursor_key());
            *held = Some(key);
        }
    }
}

pub(super) enum Command {
    Subscribe(ChannelName, Arc<SubscriptionReady>),
    Unsubscribe(ChannelName),
}

pub struct RedisBus {
    commands: mpsc::UnboundedSender<Command>,
    ready: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
    /// Where the connections go; with sentinels it moves on a failover.
    target: Target,
    /// The publish pool and the read connection to the target's current Redis, made again
    /// when it moves.
    links: RwLock<Option<Arc<Links>>>,
    /// The function library (history.rs), when history is on.
    library: Option<Arc<Library>>,
    key: SharedKey,
}

/// The connections publishing and history reads use, to one Redis.
struct Links {
    generation: u64,
    pool: deadpool_redis::Pool,
    reads: ConnectionManager,
}

impl Links {
    /// Lazy: nothing connects before the first call.
    fn to(target: &Target, located: &Located) -> Result<Self, BusError> {
        // Built from the client's connection info, which carries the TLS settings (deadpool's
        // own config takes only a URL).
        let pool_client = target.client(&located.url).map_err(|e| BusError::Config(e.to_string()))?;
        let pool_manager = deadpool_redis::Manager::new(pool_client.get_connection_info().clone())
            .map_err(|e| BusError::Config(e.to_string()))?;
        let pool = deadpool_redis::Pool::builder(pool_manager)
            .max_size(32)
            .wait_timeout(Some(COMMAND_TIMEOUT))
            .create_timeout(Some(COMMAND_TIMEOUT))
            .recycle_timeout(Some(COMMAND_TIMEOUT))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| BusError::Config(e.to_string()))?;

        let reads_config = ConnectionManagerConfig::new()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(2))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        // RESP3 here too: the manager then hears of a dropped connection and reconnects before
        // the next read needs it.
        let reads_client = target.client(&with_resp3(&located.url)).map_err(|e| BusError::Config(e.to_string()))?;
        let reads = ConnectionManager::new_lazy_with_config(reads_client, reads_config)
            .map_err(|e| BusError::Config(e.to_string()))?;
        Ok(Self { generation: located.generation, pool, reads })
    }
}

/// What the subscriber's push handler needs; one per subscriber connection, so that one that
/// was replaced after a failover can be silenced (`retired`) while redis-rs winds it down.
#[derive(Clone)]
struct PushContext {
    inbound: mpsc::Sender<Inbound>,
    ready: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
    metrics: BusMetrics,
    key: SharedKey,
}

/// The subscriber connection: a RESP3 manager that reconnects for ever and re-subscribes by itself.
/// Also returns the client, for a one-off connection that says why the manager cannot connect.
fn subscriber(
    target: &Target,
    located: &Located,
    context: &PushContext,
) -> Result<(ConnectionManager, Arc<AtomicBool>, redis::Client), BusError> {
    let client = target.client(&with_resp3(&located.url)).map_err(|e| BusError::Config(e.to_string()))?;
    let retired = Arc::new(AtomicBool::new(false));
    let push_retired = retired.clone();
    let context = context.clone();
    let config = ConnectionManagerConfig::new()
        .set_push_sender(move |push: PushInfo| -> Result<(), ()> {
            // A replaced connection may still reconnect to the old primary, now a replica that
            // relays every PUBLISH: what it hears would be delivered twice.
            if !push_retired.load(Ordering::Relaxed) {
                on_push(push, &context);
            }
            Ok(())
        })
        .set_automatic_resubscription()
        .set_number_of_retries(usize::MAX)
        .set_max_delay(Duration::from_secs(2))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let manager =
        ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| BusError::Config(e.to_string()))?;
    Ok((manager, retired, client))
}

impl RedisBus {
    /// Starts the subscription owner, the task the bus cannot deliver without (with sentinels,
    /// together with the `watcher` that follows them). Returns at once: Redis may still be
    /// unreachable, which `is_ready` reports until the first PING succeeds.
    pub fn start(
        target: Target,
        watcher: Option<Watcher>,
        library: Option<Library>,
        metrics: BusMetrics,
        shutdown: CancellationToken,
    ) -> Result<Running, BusError> {
        let library = library.map(Arc::new);
        let key = SharedKey::default();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let ready = Arc::new(AtomicBool::new(false));
        let overflowed = Arc::new(AtomicBool::new(false));
        let context = PushContext {
            inbound: inbound_tx,
            ready: ready.clone(),
            overflowed: overflowed.clone(),
            metrics: metrics.clone(),
            key: key.clone(),
        };
        // A fixed URL is checked now, as it always was; a primary is connected to once named.
        let (manager, probe, links) = match target.current() {
            Some(located) => {
                let (manager, retired, probe) = subscriber(&target, &located, &context)?;
                (Some((manager, retired)), Some(probe), Some(Arc::new(Links::to(&target, &located)?)))
            }
            None => (None, None, None),
        };
        let generation = links.as_ref().map_or(0, |l| l.generation);

        let (commands, command_rx) = mpsc::unbounded_channel();
        let owner = SubscriptionOwner {
            manager,
            generation,
            target: target.clone(),
            context,
            probe,
            ping_failure: None,
            health: Health::default(),
            commands: command_rx,
            ready: ready.clone(),
            metrics,
            subscribed: HashSet::new(),
            pending: HashMap::new(),
            library: library.clone(),
            key: key.clone(),
        };
        let owner = match watcher {
            None => tokio::spawn(owner.run(shutdown)),
            Some(watcher) => tokio::spawn(async move {
                // Either ending is the bus ending: the server notices it.
                tokio::select! {
                    _ = owner.run(shutdown.clone()) => {}
                    _ = watcher.run(shutdown) => {}
                }
            }),
        };
        let bus = Arc::new(Self {
            commands,
            ready,
            overflowed,
            target: target.clone(),
            links: RwLock::new(links),
            library,
            key,
        });
        Ok(Running { bus, inbound: inbound_rx, owner: Some(owner), target: Some(target) })
    }

    /// The connections to the current Redis, made again when it moved.
    fn links(&self) -> Result<Arc<Links>, BusError> {
        let located = self.target.current().ok_or_else(|| BusError::Unavailable("no primary known yet".into()))?;
        if let Some(links) = self.links.read().unwrap_or_else(PoisonError::into_inner).as_ref()
            && links.generation == located.generation
        {
            return Ok(links.clone());
        }
        let mut held = self.links.write().unwrap_or_else(PoisonError::into_inner);
        match held.as_ref() {
            // Another caller made them meanwhile.
            Some(links) if links.generation == located.generation => Ok(links.clone()),
            _ => {
                let links = Arc::new(Links::to(&self.target, &located)?);
                *held = Some(links.clone());
                Ok(links)
            }
        }
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        let pool = self.links()?.pool.clone();
        pool.get().await.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    /// Runs function calls in one round trip, loading the library first if Redis lost it (a
    /// restart without persistence forgets functions; Redis then answers "Function not found").
    async fn call<T: redis::FromRedisValue>(
        &self,
        connection: &mut (impl redis::aio::ConnectionLike + Send),
        calls: &redis::Pipeline,
    ) -> Result<Vec<T>, BusError> {
        let attempt = tokio::time::timeout(COMMAND_TIMEOUT, calls.query_async::<Vec<T>>(&mut *connection)).await;
        match attempt.map_err(|_| BusError::Timeout)? {
            Err(e) if is_function_missing(&e) => {
                let library = self.library.as_deref().ok_or(BusError::HistoryOff)?;
                ensure_library(&mut *connection, library, &self.key).await?;
                calls.query_async(&mut *connection).await.map_err(bus_error)
            }
            Err(e) => {
                // A replica now (`READONLY`) or gone: with sentinels, where is the primary?
                self.target.recheck_after(&e);
                Err(bus_error(e))
            }
            result => result.map_err(bus_error),
        }
    }

    /// One history function call on the shared read connection. Retried once when the
    /// connection turns out to be dead: the failure is what makes the manager reconnect.
    async fn read(&self, call: redis::Cmd) -> Result<Vec<Value>, BusError> {
        let mut pipe = redis::pipe();
        pipe.add_command(call);
        let mut reads = self.links()?.reads.clone();
        let reply = match self.call::<Vec<Value>>(&mut reads, &pipe).await {
            Err(e) if e.is_transient() => self.call::<Vec<Value>>(&mut reads, &pipe).await?,
            other => other?,
        };
        reply.into_iter().next().ok_or_else(malformed)
    }
}

/// A restarted Redis without persistence has forgotten the library. Redis says so only in its
/// error text (`ERR Function not found`), so this is the one place that reads it.
pub(super) fn is_function_missing(e: &redis::RedisError) -> bool {
    // Every call goes through a pipeline, whose failure lists each failed command's error (and
    // has no code or detail of its own); a single command's error is a list of one.
    e.clone().into_server_errors().is_some_and(|errors| {
        errors.iter().any(|(_, error)| {
            error.code() == "ERR" && error.details().is_some_and(|d| d.starts_with("Function not found"))
        })
    })
}

pub(super) fn bus_error(e: redis::RedisError) -> BusError {
    if e.is_timeout() {
        BusError::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        BusError::Unavailable(e.to_string())
    } else {
        BusError::Refused(e.to_string())
    }
}

pub(super) async fn load_library(
    connection: &mut impl redis::aio::ConnectionLike,
    code: &str,
    replace: bool,
) -> Result<(), BusError> {
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD");
    if replace {
        load.arg("REPLACE");
    }
    load.arg(code).query_async::<String>(connection).await.map_err(bus_error)?;
    tracing::info!("loaded the history function library into redis");
    Ok(())
}

/// The code of the library Redis holds, if any.
pub(super) async fn library_code(connection: &mut impl redis::aio::ConnectionLike) -> Result<Option<String>, BusError> {
    let reply: Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("sse_fanout")
        .arg("WITHCODE")
        .query_async(connection)
        .await
        .map_err(bus_error)?;
    Ok(field_of(reply, "library_code"))
}

/// The value after the name `field` anywhere in a reply (a RESP3 map or a RESP2 flat array).
fn field_of(reply: Value, field: &str) -> Option<String> {
    match reply {
        Value::Map(pairs) => pairs.into_iter().find_map(|(name, value)| {
            if text(&name).as_deref() == Some(field) { text(&value) } else { field_of(value, field) }
        }),
        Value::Array(items) => {
            let mut items = items.into_iter();
            while let Some(item) = items.next() {
                if text(&item).as_deref() == Some(field) {
                    return items.next().and_then(|value| text(&value));
                }
                if let Some(found) = field_of(item, field) {
                    return Some(found);
                }
            }
            None
        }
        _ => None,
    }
}

/// Makes sure Redis holds this node's library and adopts the key in it. The key is the
/// cluster's: one already in Redis is kept (a node with other settings or a newer version
/// replaces the code, never the key). Only a Redis without the library gets a key from a node,
/// the one that node holds if it has one, so a Redis restart under running nodes changes
/// nothing; nodes racing to load it all adopt whichever load won, since each reads it back.
pub(super) async fn ensure_library(
    connection: &mut impl redis::aio::ConnectionLike,
    library: &Library,
    key: &SharedKey,
) -> Result<(), BusError> {
    for _ in 0..3 {
        match library_code(connection).await? {
            Some(code) => match LiveKey::in_library(&code) {
                Some(cluster_key) => {
                    let wanted = library.render(&cluster_key);
                    if code == wanted {
                        key.adopt(cluster_key);
                        return Ok(());
                    }
                    load_library(connection, &wanted, true).await?;
                }
                None => {
                    // A library from before keys: ours replaces it.
                    let fresh = key.get().unwrap_or_else(LiveKey::generate);
                    load_library(connection, &library.render(&fresh), true).await?;
                }
            },
            None => {
                let fresh = key.get().unwrap_or_else(LiveKey::generate);
                // Refused when another node loaded it first: the next round reads theirs.
                match load_library(connection, &library.render(&fresh), false).await {
                    Err(e) if e.is_transient() => return Err(e),
                    _ => {}
                }
            }
        }
    }
    Err(BusError::Refused("the history function library keeps changing (nodes with different settings?)".into()))
}

/// Logs a forged id at most once a second (a flood must not become a flood of log lines).
pub(super) fn log_forged(channel: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::auth::unix_now();
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(channel, "refused a live message whose history id is not the functions' (forged or altered)");
    }
}

/// Runs inside redis-rs's relay task: must never block, so the inbound queue is bounded and
/// a full queue drops (counted) instead of waiting.
fn on_push(push: PushInfo, context: &PushContext) {
    let PushContext { inbound, ready, overflowed, metrics, key } = context;
    match push.kind {
        PushKind::Message => {
            let mut data = push.data.into_iter();
            let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next())
            else {
                return;
            };
            let Ok(channel) = std::str::from_utf8(&channel) else {
                return;
            };
            let (id, payload) = match key.read(channel.as_bytes(), &Bytes::from(payload)) {
                Live::Plain(payload) => (None, payload),
                Live::Durable { id, payload } => (Some(id), payload),
                Live::Forged => {
                    metrics.forged_ids.increment(1);
                    log_forged(channel);
                    return;
                }
            };
            let message = Inbound::Message { channel: ChannelName::from_bus(channel), id, payload };
            if inbound.try_send(message).is_err() {
                metrics.inbound_dropped.increment(1);
                overflowed.store(true, Ordering::Release);
            }
        }
        PushKind::Subscribe => {
            if let Some(Value::BulkString(channel)) = push.data.first()
                && let Ok(channel) = std::str::from_utf8(channel)
                && inbound.try_send(Inbound::Subscribed(ChannelName::from_bus(channel))).is_err()
            {
                overflowed.store(true, Ordering::Release);
            }
        }
        PushKind::Disconnection => {
            if ready.swap(false, Ordering::AcqRel) {
                tracing::warn!("redis bus disconnected; reconnecting");
            }
            metrics.ready.set(0.0);
            let _ = inbound.try_send(Inbound::Disconnected);
        }
        _ => {}
    }
}

pub(super) fn malformed() -> BusError {
    BusError::MalformedReply
}

pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `{epoch, per channel {'ok', {{id, {'d', payload}}...}} or {'reset', tail}}`
pub(super) fn parse_since(reply: Vec<Value>, expected: usize) -> Result<Epoched<Since>, BusError> {
    let mut values = reply.into_iter();
    let epoch = values.next().and_then(|v| text(&v)).and_then(|e| parse_epoch(&e)).ok_or_else(malformed)?;
    let mut results = Vec::with_capacity(expected);
    for value in values {
        let Value::Array(parts) = value else { return Err(malformed()) };
        let mut parts = parts.into_iter();
        let status = parts.next().and_then(|v| text(&v)).ok_or_else(malformed)?;
        let body = parts.next();
        // `more` after entries; after a reset, `lost` when the functions found history lost.
        let third = parts.next();
        let more = matches!(third, Some(Value::Int(1)));
        results.push(match (status.as_str(), body) {
            ("reset", Some(tail)) => Since::Reset {
                tail: text(&tail).and_then(|t| StreamId::parse(&t)).ok_or_else(malformed)?,
                lost: third.as_ref().and_then(text).as_deref() == Some("lost"),
            },
            ("ok", None) => Since::Entries { entries: Vec::new(), more },
            ("ok", Some(Value::Array(entries))) => {
                Since::Entries { entries: entries.into_iter().map(parse_entry).collect::<Result<_, _>>()?, more }
            }
            _ => return Err(malformed()),
        });
    }
    if results.len() != expected {
        return Err(malformed());
    }
    Ok(Epoched { epoch, values: results })
}

fn parse_entry(entry: Value) -> Result<Entry, BusError> {
    let Value::Array(parts) = entry else { return Err(malformed()) };
    let mut parts = parts.into_iter();
    let id = parts.next().and_then(|v| text(&v)).and_then(|t| StreamId::parse(&t)).ok_or_else(malformed)?;
    let Some(Value::Array(fields)) = parts.next() else { return Err(malformed()) };
    // Fields are [name, value, ...]; the function writes only `d`. The payload is moved, not
    // copied: a page may hold a megabyte of them.
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if let Value::BulkString(payload) = value
            && text(&name).as_deref() == Some("d")
        {
            return Ok(Entry { id, payload: Bytes::from(payload) });
        }
    }
    Err(malformed())
}

fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// The last word on a channel since the previous flush.
enum Pending {
    Subscribe(Vec<Arc<SubscriptionReady>>),
    Unsubscribe,
}

struct SubscriptionOwner {
    /// The subscriber connection and its `retired` switch; `None` until the sentinels named a
    /// primary.
    manager: Option<(ConnectionManager, Arc<AtomicBool>)>,
    /// The [`Located`] generation `manager` connects to.
    generation: u64,
    target: Target,
    context: PushContext,
    commands: mpsc::UnboundedReceiver<Command>,
    ready: Arc<AtomicBool>,
    metrics: BusMetrics,
    /// Channels Redis has confirmed (and that the manager re-subscribes after a reconnect).
    subscribed: HashSet<ChannelName>,
    pending: HashMap<ChannelName, Pending>,
    library: Option<Arc<Library>>,
    key: SharedKey,
    /// Why the last PING failed, logged when it changes: an operator learns that the
    /// certificate is not trusted or the password is wrong, once, not every second.
    ping_failure: Option<String>,
    health: Health,
    /// For a one-off connection that says why the manager cannot connect: it retries forever
    /// and so never returns the error itself (a refused connection, an untrusted certificate).
    probe: Option<redis::Client>,
}

impl SubscriptionOwner {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut target = self.target.clone();
        loop {
            let moved = tokio::select! {
                // A move first: until the owner follows it, nothing is delivered.
                biased;
                _ = shutdown.cancelled() => return,
                _ = target.changed() => true,
                command = self.commands.recv() => {
                    let Some(command) = command else { return };
                    self.note(command);
                    while let Ok(command) = self.commands.try_recv() {
                        self.note(command);
                    }
                    false
                }
                // A PING to a primary that died waits out its timeout (the manager is
                // reconnecting): the move that ends the wait must not queue behind it.
                _ = ping.tick() => tokio::select! {
                    biased;
                    _ = target.changed() => true,
                    _ = self.ping() => false,
                },
            };
            if moved {
                self.switch();
                self.ping().await;
            }
            if !self.pending.is_empty() && self.ready.load(Ordering::Acquire) {
                self.flush().await;
            }
        }
    }

    /// The sentinels named another primary: the connection to the old one is dropped (and
    /// silenced: it would reconnect to it as a replica, which relays every PUBLISH), one to the
    /// new one made, and every channel subscribed again there. Until each is confirmed it has a
    /// gap, which the dispatcher backfills from the new primary's history, as after a restart.
    fn switch(&mut self) {
        let Some(located) = self.target.current() else { return };
        if located.generation == self.generation && self.manager.is_some() {
            return;
        }
        if let Some((_, retired)) = self.manager.take() {
            retired.store(true, Ordering::Relaxed);
        }
        self.generation = located.generation;
        match subscriber(&self.target, &located, &self.context) {
            Ok((manager, retired, probe)) => {
                self.manager = Some((manager, retired));
                self.probe = Some(probe);
                self.ping_failure = None;
            }
            Err(e) => tracing::warn!(error = %e, "cannot use the primary the sentinels name"),
        }
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::warn!("the redis primary moved; subscribing again on the new one");
        }
        self.metrics.ready.set(0.0);
        if self.context.inbound.try_send(Inbound::Disconnected).is_err() {
            // The dispatcher cannot learn of the gap: streams are closed and resume instead.
            self.context.overflowed.store(true, Ordering::Release);
        }
        for channel in self.subscribed.drain() {
            // A leave noted meanwhile stays a leave (and costs nothing: it is not subscribed).
            self.pending.entry(channel).or_insert_with(|| Pending::Subscribe(Vec::new()));
        }
    }

    fn note(&mut self, command: Command) {
        match command {
            Command::Subscribe(channel, ready) => match self.pending.get_mut(&channel) {
                Some(Pending::Subscribe(waiters)) => waiters.push(ready),
                _ => {
                    self.pending.insert(channel, Pending::Subscribe(vec![ready]));
                }
            },
            Command::Unsubscribe(channel) => {
                self.pending.insert(channel, Pending::Unsubscribe);
            }
        }
    }

    /// The health check: Redis answers, and (with history) holds the library with the key
    /// this node verifies with. Ready when both hold; see [`Health`] for what a late answer does.
    async fn ping(&mut self) {
        let began = Instant::now();
        let (mut verdict, failure) = match self.manager.as_mut() {
            None => (Verdict::Failed, Some("no primary known yet".to_owned())),
            Some((manager, _)) => {
                match tokio::time::timeout(COMMAND_TIMEOUT, redis::cmd("PING").query_async::<String>(manager)).await {
                    Ok(Ok(_)) => (Verdict::Healthy, None),
                    Ok(Err(e)) => (Verdict::of(&e), Some(e.to_string())),
                    Err(_) => {
                        let (verdict, why) = self.why_unreachable().await;
                        (verdict, Some(why))
                    }
                }
            }
        };
        if failure.is_some() && failure != self.ping_failure {
            tracing::warn!(error = failure.as_deref().unwrap_or_default(), "redis bus: PING failed");
        }
        self.ping_failure = failure;
        if verdict != Verdict::Healthy {
            // With sentinels: the primary may have failed over.
            self.target.recheck();
        }
        if verdict == Verdict::Healthy
            && let Some(library) = self.library.clone()
        {
            verdict = self.check_library(&library).await;
        }
        let was = self.ready.load(Ordering::Acquire);
        let alive = self.health.ready_after(verdict, began, was);
        self.ready.store(alive, Ordering::Release);
        self.metrics.ready.set(if alive { 1.0 } else { 0.0 });
        match (was, alive) {
            (false, true) => tracing::info!(channels = self.subscribed.len(), "redis bus ready"),
            (true, false) if verdict == Verdict::Late => {
                tracing::warn!("redis bus not ready: its checks have gone unanswered for {LATE_GRACE:?}")
            }
            (true, false) => tracing::warn!("redis bus not answering PING, or without the history library"),
            (true, true) if verdict == Verdict::Late => {
                tracing::debug!("redis bus check unanswered in time; still ready for up to {LATE_GRACE:?}")
            }
            _ => {}
        }
    }

    /// What a new connection says when PING gets no answer: a connection that fails outright
    /// means Redis is gone; one that connects, or is only slow, means the answer was late.
    async fn why_unreachable(&self) -> (Verdict, String) {
        let Some(probe) = &self.probe else { return (Verdict::Failed, "no primary known yet".to_owned()) };
        let attempt = probe.get_multiplexed_async_connection();
        match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(Err(e)) if !e.is_timeout() => {
                (Verdict::Failed, format!("no answer within {COMMAND_TIMEOUT:?}; a new connection fails: {e}"))
            }
            _ => (Verdict::Late, format!("no answer within {COMMAND_TIMEOUT:?}")),
        }
    }

    /// Asks the library for its key's fingerprint; loads the library again when Redis lost it
    /// (a restart forgets functions) and re-reads the key when it is not the one this node holds.
    async fn check_library(&mut self, library: &Library) -> Verdict {
        let Some(held) = self.key.fingerprint() else {
            // No key yet (starting): nothing to compare, read it at once.
            return self.ensure(library).await;
        };
        let Some((manager, _)) = self.manager.as_mut() else { return Verdict::Failed };
        let mut ask = redis::cmd("FCALL");
        ask.arg("sse_key_id").arg(0);
        match tokio::time::timeout(COMMAND_TIMEOUT, ask.query_async::<String>(manager)).await {
            Ok(Ok(id)) if id == held => return Verdict::Healthy,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if is_function_missing(&e) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the history function library does not answer");
                return Verdict::of(&e);
            }
            // Not loading it again on a late answer: that is more work for a Redis (or a
            // node) already behind, and the library is most likely still there.
            Err(_) => return Verdict::Late,
        }
        self.ensure(library).await
    }

    async fn ensure(&mut self, library: &Library) -> Verdict {
        let Some((manager, _)) = self.manager.as_mut() else { return Verdict::Failed };
        let ensured = tokio::time::timeout(COMMAND_TIMEOUT, ensure_library(manager, library, &self.key)).await;
        match ensured {
            Ok(Ok(())) => Verdict::Healthy,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot load the history function library");
                Verdict::of_bus(&e)
            }
            Err(_) => Verdict::Late,
        }
    }

    /// Sends what is pending, in batches. What fails stays pending for the next round.
    async fn flush(&mut self) {
        let Some((manager, _)) = self.manager.as_mut() else { return };
        let mut to_subscribe = Vec::new();
        let mut to_unsubscribe = Vec::new();
        for (channel, pending) in self.pending.drain() {
            match pending {
                // Still subscribed (a leave and a join cancelled out): nothing to ask Redis.
                Pending::Subscribe(waiters) if self.subscribed.contains(&channel) => {
                    waiters.iter().for_each(|w| w.set());
                }
                Pending::Subscribe(waiters) => to_subscribe.push((channel, waiters)),
                Pending::Unsubscribe if self.subscribed.contains(&channel) => to_unsubscribe.push(channel),
                Pending::Unsubscribe => {}
            }
        }
        while !to_subscribe.is_empty() {
            let batch: Vec<_> = to_subscribe.drain(..to_subscribe.len().min(CHANNELS_PER_COMMAND)).collect();
            let names: Vec<&str> = batch.iter().map(|(c, _)| c.as_str()).collect();
            match tokio::time::timeout(COMMAND_TIMEOUT, manager.subscribe(&names)).await {
                Ok(Ok(())) => {
                    self.metrics.subscribe_commands.increment(1);
                    for (channel, waiters) in batch {
                        waiters.iter().for_each(|w| w.set());
                        self.subscribed.insert(channel);
                    }
                }
                failure => {
                    tracing::warn!(channels = batch.len(), error = ?failure.map(|r| r.err()), "SUBSCRIBE failed; will retry");
                    for (channel, waiters) in batch.into_iter().chain(to_subscribe.drain(..)) {
                        self.pending.insert(channel, Pending::Subscribe(waiters));
                    }
                }
            }
        }
        for batch in to_unsubscribe.chunks(CHANNELS_PER_COMMAND) {
            let names: Vec<&str> = batch.iter().map(|c| c.as_str()).collect();
            match tokio::time::timeout(COMMAND_TIMEOUT, manager.unsubscribe(&names)).await {
                Ok(Ok(())) => {
                    self.metrics.unsubscribe_commands.increment(1);
                    batch.iter().for_each(|c| {
                        self.subscribed.remove(c);
                    });
                }
                failure => {
                    tracing::warn!(channels = batch.len(), error = ?failure.map(|r| r.err()), "UNSUBSCRIBE failed; will retry");
                    for channel in batch {
                        // A join that arrived meanwhile wins over this stale leave.
                        self.pending.entry(channel.clone()).or_insert(Pending::Unsubscribe);
                    }
                }
            }
        }
    }
}

impl Bus for RedisBus {
    fn subscribe(&self, channel: ChannelName, ready: Arc<SubscriptionReady>) {
        // The owner outlives every hub caller except at shutdown, when nobody waits any more.
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
            if durable && self.library.is_some() {
                let mut calls = redis::pipe();
                for channel in channels {
                    calls.cmd("FCALL").arg("sse_publish").arg(1).arg(channel.as_str()).arg(payload.as_ref());
                }
                let mut connection = self.connection().await?;
                receipt.ids = self.call::<String>(&mut *connection, &calls).await?;
                return Ok(receipt);
            }
            let mut connection = self.connection().await?;
            let mut pipe = redis::pipe();
            for channel in channels {
                pipe.cmd("PUBLISH").arg(channel.as_str()).arg(payload.as_ref());
            }
            let counts: Vec<usize> = pipe.query_async(&mut *connection).await.map_err(|e| {
                self.target.recheck_after(&e);
                bus_error(e)
            })?;
            receipt.receivers = Some(counts.iter().sum());
            Ok(receipt)
        })
    }

    fn tails<'a>(&'a self, channels: &'a [ChannelName]) -> BusFuture<'a, Epoched<StreamId>> {
        Box::pin(async move {
            let mut fcall = redis::cmd("FCALL");
            fcall.arg("sse_tail").arg(channels.len());
            for channel in channels {
                fcall.arg(channel.as_str());
            }
            let reply = self.read(fcall).await?;
            let mut values = reply.into_iter();
            let epoch = values.next().and_then(|v| text(&v)).and_then(|e| parse_epoch(&e)).ok_or_else(malformed)?;
            let tails = values
                .map(|v| text(&v).and_then(|t| StreamId::parse(&t)).ok_or_else(malformed))
                .collect::<Result<Vec<_>, _>>()?;
            if tails.len() != channels.len() {
                return Err(malformed());
            }
            Ok(Epoched { epoch, values: tails })
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
            let mut fcall = redis::cmd("FCALL");
            fcall.arg("sse_since").arg(positions.len());
            for (channel, _) in positions {
                fcall.arg(channel.as_str());
            }
            fcall.arg(epoch.to_string()).arg(away.as_millis() as u64).arg(page.entries).arg(page.bytes);
            for (_, position) in positions {
                fcall.arg(position.to_string());
            }
            if page.strict {
                fcall.arg("strict");
            }
            parse_since(self.read(fcall).await?, positions.len())
        })
    }

    fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn claim_once<'a>(&'a self, key: &'a str, lifetime: Duration) -> BusFuture<'a, bool> {
        Box::pin(async move {
            let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut set = redis::pipe();
            set.cmd("SET").arg(key).arg(1).arg("NX").arg("PX").arg(lifetime_ms);
            let mut connection = self.connection().await?;
            // `OK` when set, nil when the key was there already.
            let reply = self.call::<Option<String>>(&mut *connection, &set).await?;
            Ok(matches!(reply.first(), Some(Some(_))))
        })
    }

    fn kind(&self) -> &'static str {
        if self.target.follows_sentinels() { "redis-sentinel" } else { "redis" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_always_speaks_resp3() {
        assert_eq!(with_resp3("redis://r:6379"), "redis://r:6379?protocol=resp3");
        assert_eq!(with_resp3("redis://r:6379/0?x=1"), "redis://r:6379/0?x=1&protocol=resp3");
        assert_eq!(with_resp3("redis://r?protocol=resp3"), "redis://r?protocol=resp3");
    }

    #[test]
    fn the_library_code_is_found_in_either_protocol() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("library_name"),
            bulk("sse_fanout"),
            bulk("functions"),
            Value::Array(vec![Value::Array(vec![bulk("name"), bulk("sse_publish")])]),
            bulk("library_code"),
            bulk("#!lua name=sse_fanout"),
        ])]);
        assert_eq!(field_of(resp2, "library_code").as_deref(), Some("#!lua name=sse_fanout"));
        let resp3 = Value::Array(vec![Value::Map(vec![
            (bulk("library_name"), bulk("sse_fanout")),
            (bulk("library_code"), bulk("code")),
        ])]);
        assert_eq!(field_of(resp3, "library_code").as_deref(), Some("code"));
        assert_eq!(field_of(Value::Array(vec![]), "library_code"), None);
    }
}
