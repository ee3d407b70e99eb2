//! The bus: how a node hears what producers publish and how it publishes itself.
//!
//! One trait, three implementations: [`memory::MemoryBus`] (embedded, a single node, the
//! default), [`redis::RedisBus`] (one subscriber connection per node, shared by every
//! local stream; to one Redis, or to the primary Redis Sentinel names, see [`sentinel`] and
//! [`primary`]) and [`cluster::ClusterBus`] (Redis Cluster: one subscriber connection per
//! shard, sharded pub/sub). The hub tells the bus which channels have local listeners; the bus sends
//! what arrives on them as [`Inbound`] events into one bounded queue that the node's
//! dispatcher drains. Nothing here knows about connections.

pub mod cluster;
mod health;
pub mod memory;
pub mod primary;
pub mod redis;
pub mod sentinel;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::channel::{ChannelName, ChannelNames};
use crate::history::{HistoryConfig, Library, Page, Since, StreamId};
use crate::metrics::BusMetrics;
use crate::redis_tls::RedisTls;

/// Room for bursts between the bus and the dispatcher. Beyond it messages are dropped and
/// counted rather than buffered without bound (the subscriber must never block).
pub const INBOUND_CAPACITY: usize = 65_536;

/// What the bus hands to the dispatcher.
#[derive(Debug)]
pub enum Inbound {
    /// A payload published on a channel this node subscribed to; `id` when it is in history.
    Message { channel: ChannelName, id: Option<StreamId>, payload: Bytes },
    /// A subscription was confirmed; after a `Disconnected`, this is where a gap ends.
    Subscribed(ChannelName),
    /// The bus lost its connection: messages published meanwhile are not delivered live.
    Disconnected,
    /// The bus lost one channel's subscription (a Redis Cluster slot moved, or the connection
    /// to its shard dropped): until it is `Subscribed` again, like `Disconnected` for it alone.
    Unsubscribed(ChannelName),
}

pub type InboundReceiver = mpsc::Receiver<Inbound>;

/// A started bus: the bus, the queue its messages arrive on, and the task it cannot deliver
/// without (Redis's subscription owner; none for the embedded bus).
pub struct Running {
    pub bus: Arc<dyn Bus>,
    pub inbound: InboundReceiver,
    pub owner: Option<tokio::task::JoinHandle<()>>,
    /// Where the node's other Redis users (presence, the per-user limit) connect: the bus's
    /// own target, so that they follow the same primary. `None` without a single logical Redis.
    pub target: Option<primary::Target>,
}

/// Starts the bus the configuration asks for: Redis when `redis_url` is set (a Redis Cluster
/// when it is `redis+cluster://`, the primary Redis Sentinel names when `redis+sentinel://`),
/// else embedded. `tls` applies to `rediss` URLs.
pub fn start(
    redis_url: Option<&str>,
    tls: &RedisTls,
    names: &ChannelNames,
    history: Option<HistoryConfig>,
    shutdown: CancellationToken,
) -> Result<Running, BusError> {
    match redis_url {
        Some(url) if cluster::is_cluster_url(url) => {
            let library = history.map(|h| Library::new(names.prefix(), h).for_cluster());
            cluster::ClusterBus::start(url, tls.clone(), library, BusMetrics::new(), shutdown)
        }
        Some(url) => {
            let library = history.map(|h| Library::new(names.prefix(), h));
            let (target, watcher) = primary::target_of(url, tls)?;
            redis::RedisBus::start(target, watcher, library, BusMetrics::new(), shutdown)
        }
        None => {
            let (bus, inbound) = memory::MemoryBus::new(names.clone(), history);
            Ok(Running { bus, inbound, owner: None, target: None })
        }
    }
}

/// Why a bus call failed. Callers decide by variant ([`BusError::is_transient`]), never by text.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis cannot be reached now (refused, dropped, no pooled connection): worth a retry.
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// Redis did not answer within the command timeout: worth a retry.
    #[error("redis did not answer in time")]
    Timeout,
    /// The node is shutting down: its dispatcher takes no more messages.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Redis answered with an error.
    #[error("redis refused the command: {0}")]
    Refused(String),
    /// A history function answered in a shape this node does not know.
    #[error("unexpected reply from a history function (is the library current?)")]
    MalformedReply,
    /// History was asked of a node that keeps none.
    #[error("history is off")]
    HistoryOff,
    /// The Redis URL or client settings cannot be used (fatal at startup).
    #[error("cannot use the redis settings: {0}")]
    Config(String),
}

impl BusError {
    /// True when the same call may succeed later without anything being changed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Unavailable(_) | BusError::Timeout | BusError::ShuttingDown)
    }
}

pub type BusFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send + 'a>>;

/// What a publish reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReceipt {
    /// Channels published to.
    pub channels: usize,
    /// Plain publish: subscribers that received it (nodes holding a listener with Redis, local
    /// channels with listeners with the embedded bus).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receivers: Option<usize>,
    /// Durable publish: the history id given to each channel, in request order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

/// One value per channel asked about, read in one history `epoch` (it changes whenever
/// history is lost, and a cursor of another epoch cannot be trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoched<T> {
    pub epoch: u32,
    pub values: Vec<T>,
}

/// A node-wide pub/sub transport.
pub trait Bus: Send + Sync + 'static {
    /// Starts live delivery of `channel`; `ready` is set once messages published from now on
    /// are certain to arrive. Must not block: the hub calls it under its lock.
    fn subscribe(&self, channel: ChannelName, ready: Arc<SubscriptionReady>);

    /// Stops live delivery of `channel`. Must not block.
    fn unsubscribe(&self, channel: ChannelName);

    /// Publishes one payload to every channel given, as one batch. `durable` records it in
    /// history first (ignored when history is off).
    fn publish<'a>(
        &'a self,
        channels: &'a [ChannelName],
        payload: Bytes,
        durable: bool,
    ) -> BusFuture<'a, PublishReceipt>;

    /// The last history id of each channel (`StreamId::ZERO` when empty).
    fn tails<'a>(&'a self, channels: &'a [ChannelName]) -> BusFuture<'a, Epoched<StreamId>>;

    /// One `page` of what the channels' histories hold after their positions (the page's
    /// bounds apply to all channels together, in order). A cursor from another epoch, or one
    /// that cannot be proven continuous, gets `Since::Reset`.
    fn since<'a>(
        &'a self,
        epoch: u32,
        away: Duration,
        positions: &'a [(ChannelName, StreamId)],
        page: Page,
    ) -> BusFuture<'a, Epoched<Since>>;

    /// Records `key` for `lifetime` unless it is recorded already, cluster-wide; true when this
    /// call recorded it. Single-use query tokens are spent with it (`http/ticket.rs`).
    fn claim_once<'a>(&'a self, key: &'a str, lifetime: Duration) -> BusFuture<'a, bool>;

    /// True once after the inbound queue overflowed and live messages were dropped.
    fn take_overflow(&self) -> bool {
        false
    }

    /// Whether the bus can deliver right now (for `/readyz` and for refusing new streams).
    fn is_ready(&self) -> bool;

    /// A short name for logs and stats.
    fn kind(&self) -> &'static str;
}

/// Set once a subscription is confirmed; waited on by the streams that need it.
#[derive(Debug, Default)]
pub struct SubscriptionReady {
    ready: AtomicBool,
    notify: Notify,
}

impl SubscriptionReady {
    pub fn set(&self) {
        self.ready.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Resolves once [`set`](Self::set) has been called.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Register before checking, so a `set` between the check and the await is not missed.
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiting_resolves_after_set_and_immediately_when_already_set() {
        let ready = Arc::new(SubscriptionReady::default());
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        ready.set();
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("woken").expect("no panic");
        tokio::time::timeout(Duration::from_millis(10), ready.wait()).await.expect("already set");
    }
}
