//! The embedded bus: a single node needs nothing else. Publishing hands the payload straight
//! to this node's dispatcher, through the same bounded inbound queue a Redis bus uses, so the
//! delivery path is the same in both modes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Bus, BusError, INBOUND_CAPACITY, Inbound, InboundReceiver, PublishFuture, PublishReceipt, SubscriptionReady,
};
use crate::channel::ChannelName;

pub struct MemoryBus {
    inbound: mpsc::Sender<Inbound>,
    subscribed: Mutex<HashSet<ChannelName>>,
}

impl MemoryBus {
    pub fn new() -> (Arc<Self>, InboundReceiver) {
        let (tx, rx) = mpsc::channel(INBOUND_CAPACITY);
        (Arc::new(Self { inbound: tx, subscribed: Mutex::new(HashSet::new()) }), rx)
    }

    fn subscribed(&self) -> std::sync::MutexGuard<'_, HashSet<ChannelName>> {
        self.subscribed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Bus for MemoryBus {
    fn subscribe(&self, channel: ChannelName, ready: Arc<SubscriptionReady>) {
        self.subscribed().insert(channel);
        ready.set();
    }

    fn unsubscribe(&self, channel: ChannelName) {
        self.subscribed().remove(&channel);
    }

    fn publish<'a>(&'a self, channels: &'a [ChannelName], payload: Bytes) -> PublishFuture<'a> {
        Box::pin(async move {
            let mut receipt = PublishReceipt { channels: channels.len(), receivers: 0 };
            for channel in channels {
                if !self.subscribed().contains(channel) {
                    continue;
                }
                receipt.receivers += 1;
                // Waiting here (rather than dropping) pushes back on the publisher, like Redis would.
                self.inbound
                    .send(Inbound::Message { channel: channel.clone(), payload: payload.clone() })
                    .await
                    .map_err(|_| BusError::Unavailable("node is shutting down".into()))?;
            }
            Ok(receipt)
        })
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_subscribed_channels_receive() {
        let (bus, mut inbound) = MemoryBus::new();
        let a = ChannelName::from_bus("sse:user:a");
        let b = ChannelName::from_bus("sse:user:b");
        let ready = Arc::new(SubscriptionReady::default());
        bus.subscribe(a.clone(), ready.clone());
        assert!(ready.is_set());
        let receipt = bus.publish(&[a.clone(), b.clone()], Bytes::from_static(b"hi")).await.expect("published");
        assert_eq!(receipt, PublishReceipt { channels: 2, receivers: 1 });
        match inbound.try_recv() {
            Ok(Inbound::Message { channel, payload }) => {
                assert_eq!(channel, a);
                assert_eq!(&payload[..], b"hi");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(inbound.try_recv().is_err());
        bus.unsubscribe(a.clone());
        assert_eq!(bus.publish(&[a], Bytes::new()).await.expect("ok").receivers, 0);
    }
}
