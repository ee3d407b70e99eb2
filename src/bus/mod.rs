//! The bus: how a node hears what producers publish and how it publishes itself.
//!
//! One trait, two implementations: [`memory::MemoryBus`] (embedded, a single node, the
//! default) and [`redis::RedisBus`] (one subscriber connection per node, shared by every
//! local stream). The hub tells the bus which channels have local listeners; the bus sends
//! what arrives on them as [`Inbound`] events into one bounded queue that the node's
//! dispatcher drains. Nothing here knows about connections.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use crate::channel::ChannelName;

/// Room for bursts between the bus and the dispatcher. Beyond it messages are dropped and
/// counted rather than buffered without bound (the subscriber must never block).
pub const INBOUND_CAPACITY: usize = 65_536;

/// What the bus hands to the dispatcher.
#[derive(Debug)]
pub enum Inbound {
    /// A payload published on a channel this node subscribed to.
    Message { channel: ChannelName, payload: Bytes },
    /// The bus lost its connection: messages published meanwhile are not delivered live.
    Disconnected,
}

pub type InboundReceiver = mpsc::Receiver<Inbound>;

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("redis refused the command: {0}")]
    Refused(String),
}

pub type PublishFuture<'a> = Pin<Box<dyn Future<Output = Result<PublishReceipt, BusError>> + Send + 'a>>;

/// What a publish reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReceipt {
    /// Channels published to.
    pub channels: usize,
    /// Subscribers that received it: nodes holding a listener (Redis), or local channels with listeners.
    pub receivers: usize,
}

/// A node-wide pub/sub transport.
pub trait Bus: Send + Sync + 'static {
    /// Starts live delivery of `channel`; `ready` is set once messages published from now on
    /// are certain to arrive. Must not block: the hub calls it under its lock.
    fn subscribe(&self, channel: ChannelName, ready: Arc<SubscriptionReady>);

    /// Stops live delivery of `channel`. Must not block.
    fn unsubscribe(&self, channel: ChannelName);

    /// Publishes one payload to every channel given, as one batch.
    fn publish<'a>(&'a self, channels: &'a [ChannelName], payload: Bytes) -> PublishFuture<'a>;

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
