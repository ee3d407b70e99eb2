//! The dispatcher: the one task that drains the bus's inbound queue into the hub, in bus
//! order, starts the backfill of every channel that had a gap when the bus reconnects, and
//! runs the hub work that must fall between two deliveries (token renewals).
//!
//! It is also where the node's own messages arrive ([`crate::control`]): commands, renewals
//! and the canary's probes travel the same queue as client messages, so a dispatcher that is
//! behind makes the probes late.
//!
//! Nothing here awaits a client socket: delivering is pushing shared frames into streams
//! (see [`crate::hub`]). The task ends only when its input ends (the bus is gone), which the
//! server treats as a failure of the node.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bus::{Inbound, InboundReceiver};
use crate::connection::CloseReason;
use crate::control::NodeChannels;
use crate::hub::{Hub, HubWork};
use crate::resume::{Gap, Resumer};

/// Messages one wake-up of the dispatcher takes at most.
const BATCH: usize = 256;

/// Drains the bus into the hub until the bus's side of the queue is dropped. Batches
/// wake-ups; runs in order, so a backfill after a bus reconnect is delivered before what
/// follows it. `resumer` is `None` when history is off (nothing to backfill from); `canary`
/// when the canary is off.
///
/// `work` (renewals) runs between two batches, never during a fan-out: what a renewal takes a
/// stream off is then delivered to it entirely before the renewal's notice, or not at all.
/// A message on a channel no stream listens on goes to `node_channels` (commands, renewals,
/// canary probes).
pub async fn dispatch(
    mut inbound: InboundReceiver,
    mut work: mpsc::Receiver<HubWork>,
    hub: Arc<Hub>,
    resumer: Option<Arc<Resumer>>,
    node_channels: NodeChannels,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            // First: renewals are rare, and the bus may keep the queue busy for long.
            biased;
            Some(job) = work.recv() => {
                job(&hub);
                continue;
            }
            taken = inbound.recv_many(&mut batch, BATCH) => if taken == 0 { return },
        }
        // Set once the rest of the batch's confirmations were looked at: the later ones have
        // nothing left to backfill (a storm of streams brings a confirmation each).
        let mut rest_backfilled = false;
        for (index, message) in batch.iter().enumerate() {
            match message {
                Inbound::Message { channel, id, payload } => {
                    // Only a channel without streams goes further: no cost per delivered message.
                    if !hub.deliver(channel.as_str(), *id, payload).await {
                        node_channels.route(&hub, channel, payload);
                    }
                }
                Inbound::Disconnected => {
                    hub.mark_gaps(resumer.as_ref().map_or(0, |resumer| resumer.epoch()));
                    rest_backfilled = false;
                }
                Inbound::Unsubscribed(channel) => {
                    hub.mark_gap(channel.as_str(), resumer.as_ref().map_or(0, |resumer| resumer.epoch()));
                    rest_backfilled = false;
                }
                Inbound::Subscribed(_) => {
                    let Some(resumer) = resumer.as_ref().filter(|_| !rest_backfilled) else { continue };
                    rest_backfilled = true;
                    // After a reconnect the confirmations arrive together: backfill every gapped
                    // channel confirmed from here to the end of the batch in one round trip. No
                    // message of a channel precedes its own confirmation, so order holds.
                    let gaps: Vec<Gap> =
                        batch[index..]
                            .iter()
                            .filter_map(|m| match m {
                                Inbound::Subscribed(channel) => hub
                                    .take_gap(channel.as_str())
                                    .map(|(epoch, last)| Gap { channel: channel.clone(), epoch, last }),
                                _ => None,
                            })
                            .collect();
                    if !gaps.is_empty() {
                        resumer.backfill(&hub, &gaps).await;
                    }
                }
            }
        }
        batch.clear();
        if hub.bus().take_overflow() {
            tracing::warn!("the bus outran the dispatcher and live messages were dropped; streams resume from history");
            hub.close_all(CloseReason::Overflow);
        }
    }
}
