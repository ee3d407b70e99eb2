//! The node's own channels: messages that arrive on a channel no stream listens on and are
//! meant for the node itself, not for a client. Three kinds, each owned elsewhere and routed
//! here by name so the dispatcher has one call for all of them:
//!
//! - `<prefix>:control`, commands every node obeys (a revoke: [`crate::presence::obey`]);
//! - `<prefix>:node:<node id>`, what other nodes send this one (token renewals and their
//!   answers: [`Renewals::on_message`]);
//! - `<prefix>:canary:<node id>`, this node's delivery probes ([`Canary::arrived`]).
//!
//! The first two are subscribed here for the node's whole life; the canary subscribes its own
//! channel, because it times its probes from the confirmation. The hub never unsubscribes any
//! of them (no stream listens on them).

use std::sync::Arc;

use crate::bus::{Bus, SubscriptionReady};
use crate::canary::Canary;
use crate::channel::{ChannelName, ChannelNames};
use crate::hub::Hub;
use crate::renewal::Renewals;

pub struct NodeChannels {
    cluster: ChannelName,
    renewals: Arc<Renewals>,
    canary: Option<Arc<Canary>>,
}

impl NodeChannels {
    pub fn new(names: &ChannelNames, renewals: Arc<Renewals>, canary: Option<Arc<Canary>>) -> Self {
        Self { cluster: names.control(), renewals, canary }
    }

    /// Subscribes the channels the node listens on for its whole life.
    pub fn subscribe(&self, bus: &dyn Bus) {
        for channel in [&self.cluster, self.renewals.node_channel()] {
            bus.subscribe(channel.clone(), Arc::new(SubscriptionReady::default()));
        }
    }

    /// Carries out a message that reached no stream. A client's channel that lost its last
    /// stream a moment ago ends here too and matches nothing: it is dropped.
    pub fn route(&self, hub: &Hub, channel: &ChannelName, payload: &[u8]) {
        if *channel == self.cluster {
            crate::presence::obey(hub, payload);
        } else if channel == self.renewals.node_channel() {
            self.renewals.on_message(payload);
        } else if let Some(canary) = &self.canary {
            canary.arrived(channel.as_str(), payload);
        }
    }
}
