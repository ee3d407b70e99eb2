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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::{self, PushInfo, PushKind, Value, aio::ConnectionManager, aio::ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusFuture, Epoched, INBOUND_CAPACITY, Inbound, PublishReceipt, Running, SubscriptionReady};
use crate::channel::ChannelName;
use crate::history::{Entry, Since, StreamId, parse_epoch, split_live_id};
use crate::metrics::BusMetrics;

/// How long one SUBSCRIBE/UNSUBSCRIBE/PING may take before the owner retries later.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE command; keeps one reply from growing without bound.
const CHANNELS_PER_COMMAND: usize = 1000;
const PING_INTERVAL: Duration = Duration::from_secs(1);

enum Command {
    Subscribe(ChannelName, Arc<SubscriptionReady>),
    Unsubscribe(ChannelName),
}

pub struct RedisBus {
    commands: mpsc::UnboundedSender<Command>,
    ready: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
    pool: deadpool_redis::Pool,
    reads: ConnectionManager,
    /// The function library (history.rs), when history is on.
    library: Option<Arc<str>>,
}

impl RedisBus {
    /// Starts the subscription owner, the task the bus cannot deliver without. Returns at once:
    /// Redis may still be unreachable, which `is_ready` reports until the first PING succeeds.
    pub fn start(
        url: &str,
        library: Option<String>,
        metrics: BusMetrics,
        shutdown: CancellationToken,
    ) -> Result<Running, BusError> {
        let library: Option<Arc<str>> = library.map(Arc::from);
        let subscriber_url = with_resp3(url);
        let client = redis::Client::open(subscriber_url.as_str()).map_err(|e| BusError::Config(e.to_string()))?;
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let ready = Arc::new(AtomicBool::new(false));

        let overflowed = Arc::new(AtomicBool::new(false));
        let push_ready = ready.clone();
        let push_overflowed = overflowed.clone();
        let push_metrics = metrics.clone();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(move |push: PushInfo| -> Result<(), ()> {
                on_push(push, &inbound_tx, &push_ready, &push_overflowed, &push_metrics);
                Ok(())
            })
            .set_automatic_resubscription()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(2))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| BusError::Config(e.to_string()))?;

        let mut pool_config = deadpool_redis::Config::from_url(url);
        pool_config.pool = Some(deadpool_redis::PoolConfig {
            max_size: 32,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..Default::default()
        });
        let pool = pool_config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| BusError::Config(e.to_string()))?;

        let reads_config = ConnectionManagerConfig::new()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(Duration::from_secs(2))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        // RESP3 here too: the manager then hears of a dropped connection and reconnects before
        // the next read needs it.
        let reads_client = redis::Client::open(subscriber_url.as_str()).map_err(|e| BusError::Config(e.to_string()))?;
        let reads = ConnectionManager::new_lazy_with_config(reads_client, reads_config)
            .map_err(|e| BusError::Config(e.to_string()))?;

        let (commands, command_rx) = mpsc::unbounded_channel();
        let owner = SubscriptionOwner {
            manager,
            commands: command_rx,
            ready: ready.clone(),
            metrics,
            subscribed: HashSet::new(),
            pending: HashMap::new(),
            library: library.clone(),
        };
        let owner = tokio::spawn(owner.run(shutdown));
        let bus = Arc::new(Self { commands, ready, overflowed, pool, reads, library });
        Ok(Running { bus, inbound: inbound_rx, owner: Some(owner) })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        self.pool.get().await.map_err(|e| BusError::Unavailable(e.to_string()))
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
                load_library(&mut *connection, library).await?;
                calls.query_async(&mut *connection).await.map_err(bus_error)
            }
            result => result.map_err(bus_error),
        }
    }

    /// One history function call on the shared read connection. Retried once when the
    /// connection turns out to be dead: the failure is what makes the manager reconnect.
    async fn read(&self, call: redis::Cmd) -> Result<Vec<Value>, BusError> {
        let mut pipe = redis::pipe();
        pipe.add_command(call);
        let mut reads = self.reads.clone();
        let reply = match self.call::<Vec<Value>>(&mut reads, &pipe).await {
            Err(e) if e.is_transient() => self.call::<Vec<Value>>(&mut reads, &pipe).await?,
            other => other?,
        };
        reply.into_iter().next().ok_or_else(malformed)
    }
}

/// A restarted Redis without persistence has forgotten the library. Redis says so only in its
/// error text (`ERR Function not found`), so this is the one place that reads it.
fn is_function_missing(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.starts_with("Function not found"))
}

fn bus_error(e: redis::RedisError) -> BusError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        BusError::Unavailable(e.to_string())
    } else {
        BusError::Refused(e.to_string())
    }
}

async fn load_library(connection: &mut impl redis::aio::ConnectionLike, library: &str) -> Result<(), BusError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library)
        .query_async::<String>(connection)
        .await
        .map_err(bus_error)?;
    tracing::info!("loaded the history function library into redis");
    Ok(())
}

/// Runs inside redis-rs's relay task: must never block, so the inbound queue is bounded and
/// a full queue drops (counted) instead of waiting.
fn on_push(
    push: PushInfo,
    inbound: &mpsc::Sender<Inbound>,
    ready: &AtomicBool,
    overflowed: &AtomicBool,
    metrics: &BusMetrics,
) {
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
            let (id, payload) = split_live_id(&Bytes::from(payload));
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

fn malformed() -> BusError {
    BusError::MalformedReply
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `{epoch, per channel {'ok', {{id, {'d', payload}}...}} or {'reset', tail}}`
fn parse_since(reply: Vec<Value>, expected: usize) -> Result<Epoched<Since>, BusError> {
    let mut values = reply.into_iter();
    let epoch = values.next().and_then(|v| text(&v)).and_then(|e| parse_epoch(&e)).ok_or_else(malformed)?;
    let mut results = Vec::with_capacity(expected);
    for value in values {
        let Value::Array(parts) = value else { return Err(malformed()) };
        let mut parts = parts.into_iter();
        let status = parts.next().and_then(|v| text(&v)).ok_or_else(malformed)?;
        let body = parts.next();
        results.push(match (status.as_str(), body) {
            ("reset", Some(tail)) => {
                Since::Reset { tail: text(&tail).and_then(|t| StreamId::parse(&t)).ok_or_else(malformed)? }
            }
            ("ok", None) => Since::Entries(Vec::new()),
            ("ok", Some(Value::Array(entries))) => {
                Since::Entries(entries.into_iter().map(parse_entry).collect::<Result<_, _>>()?)
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
    // Fields are [name, value, ...]; the function writes only `d`.
    let payload = fields
        .chunks(2)
        .find_map(|pair| match pair {
            [name, Value::BulkString(payload)] if text(name).as_deref() == Some("d") => {
                Some(Bytes::from(payload.clone()))
            }
            _ => None,
        })
        .ok_or_else(malformed)?;
    Ok(Entry { id, payload })
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
    manager: ConnectionManager,
    commands: mpsc::UnboundedReceiver<Command>,
    ready: Arc<AtomicBool>,
    metrics: BusMetrics,
    /// Channels Redis has confirmed (and that the manager re-subscribes after a reconnect).
    subscribed: HashSet<ChannelName>,
    pending: HashMap<ChannelName, Pending>,
    library: Option<Arc<str>>,
}

impl SubscriptionOwner {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = self.commands.recv() => {
                    let Some(command) = command else { return };
                    self.note(command);
                    while let Ok(command) = self.commands.try_recv() {
                        self.note(command);
                    }
                }
                _ = ping.tick() => self.ping().await,
            }
            if !self.pending.is_empty() && self.ready.load(Ordering::Acquire) {
                self.flush().await;
            }
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

    async fn ping(&mut self) {
        let alive = matches!(
            tokio::time::timeout(COMMAND_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut self.manager)).await,
            Ok(Ok(_))
        );
        let was = self.ready.swap(alive, Ordering::AcqRel);
        self.metrics.ready.set(if alive { 1.0 } else { 0.0 });
        match (was, alive) {
            (false, true) => {
                tracing::info!(channels = self.subscribed.len(), "redis bus ready");
                // A restarted Redis has forgotten the functions producers call: load them now.
                if let Some(library) = self.library.clone()
                    && let Err(e) = load_library(&mut self.manager, &library).await
                {
                    tracing::warn!(error = %e, "cannot load the history function library");
                }
            }
            (true, false) => tracing::warn!("redis bus not answering PING"),
            _ => {}
        }
    }

    /// Sends what is pending, in batches. What fails stays pending for the next round.
    async fn flush(&mut self) {
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
            match tokio::time::timeout(COMMAND_TIMEOUT, self.manager.subscribe(&names)).await {
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
            match tokio::time::timeout(COMMAND_TIMEOUT, self.manager.unsubscribe(&names)).await {
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
            let counts: Vec<usize> = pipe.query_async(&mut *connection).await.map_err(bus_error)?;
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
    ) -> BusFuture<'a, Epoched<Since>> {
        Box::pin(async move {
            let mut fcall = redis::cmd("FCALL");
            fcall.arg("sse_since").arg(positions.len());
            for (channel, _) in positions {
                fcall.arg(channel.as_str());
            }
            fcall.arg(epoch.to_string()).arg(away.as_millis() as u64);
            for (_, position) in positions {
                fcall.arg(position.to_string());
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

    fn kind(&self) -> &'static str {
        "redis"
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
}
