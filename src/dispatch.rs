//! The dispatcher: the one task that drains the bus's inbound queue into the hub, in bus
//! order, and starts the backfill of every channel that had a gap when the bus reconnects.
//!
//! It is also where the canary's probes come back ([`crate::canary`]): they travel the same
//! queue as client messages, so a dispatcher that is behind makes them late.
//!
//! Nothing here awaits a client socket: delivering is pushing shared frames into streams
//! (see [`crate::hub`]). The task ends only when its input ends (the bus is gone), which the
//! server treats as a failure of the node.

use std::sync::Arc;

use crate::bus::{Inbound, InboundReceiver};
use crate::canary::Canary;
use crate::channel::ChannelName;
use crate::connection::CloseReason;
use crate::hub::Hub;
use crate::resume::{Gap, Resumer};

/// Messages one wake-up of the dispatcher takes at most.
const BATCH: usize = 256;

/// Drains the bus into the hub until the bus's side of the queue is dropped. Batches
/// wake-ups; runs in order, so a backfill after a bus reconnect is delivered before what
/// follows it. `resumer` is `None` when history is off (nothing to backfill from); `canary`
/// when the canary is off. What arrives on `control` is an operator's command
/// ([`crate::presence::obey`]), not an event.
pub async fn dispatch(
    mut inbound: InboundReceiver,
    hub: Arc<Hub>,
    resumer: Option<Arc<Resumer>>,
    canary: Option<Arc<Canary>>,
    control: ChannelName,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while inbound.recv_many(&mut batch, BATCH).await > 0 {
        // Set once the rest of the batch's confirmations were looked at: the later ones have
        // nothing left to backfill (a storm of streams brings a confirmation each).
        let mut rest_backfilled = false;
        for (index, message) in batch.iter().enumerate() {
            match message {
                Inbound::Message { channel, id, payload } => {
                    // Only a message no stream listens to can be a probe or a command: a
                    // client's costs nothing more.
                    if !hub.deliver(channel.as_str(), *id, payload).await {
                        if *channel == control {
                            crate::presence::obey(&hub, payload);
                        } else if let Some(canary) = &canary {
                            canary.arrived(channel.as_str(), payload);
                        }
                    }
                }
                Inbound::Disconnected => {
                    hub.mark_gaps();
                    rest_backfilled = false;
                }
                Inbound::Subscribed(_) => {
                    let Some(resumer) = resumer.as_ref().filter(|_| !rest_backfilled) else { continue };
                    rest_backfilled = true;
                    // After a reconnect the confirmations arrive together: backfill every gapped
                    // channel confirmed from here to the end of the batch in one round trip. No
                    // message of a channel precedes its own confirmation, so order holds.
                    let gaps: Vec<Gap> = batch[index..]
                        .iter()
                        .filter_map(|m| match m {
                            Inbound::Subscribed(channel) => {
                                hub.take_gap(channel.as_str()).map(|last| Gap { channel: channel.clone(), last })
                            }
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
