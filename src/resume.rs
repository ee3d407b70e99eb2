//! Resume, the node's side of the history protocol: where each channel of a (re)connecting
//! stream starts, what it missed while away, and what this node's channels missed while its
//! bus was disconnected (the backfill).
//!
//! [`Resumer`] owns the history epoch this node last saw and is the only part that asks the
//! bus for positions and history; `/events`, `/api/history` and the dispatcher's backfill all
//! go through it. The wire form of a position is [`crate::history::Cursor`]; the per-stream
//! bookkeeping that drops live duplicates of replayed entries is the connection's.
//!
//! The order that makes a resume exact: position every channel first, subscribe live, then
//! read history past the positions and queue it ahead of anything that arrived live meanwhile
//! (the connection drops live copies of replayed entries by id).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::auth::unix_now;
use crate::bus::{Bus, BusError, Epoched};
use crate::channel::{ChannelName, ChannelNames};
use crate::connection::{Connection, Item};
use crate::history::{Cursor, Entry, ResetReason, Since, StreamId, reset_frame};
use crate::hub::Hub;
use crate::{envelope, frame};

/// Where each channel of a stream starts, decided before subscribing.
#[derive(Debug)]
pub struct Start {
    /// The epoch the positions belong to.
    pub epoch: u32,
    pub positions: Vec<(ChannelName, StreamId)>,
    /// How long the client was away (from the cursor's issue time).
    pub away: Duration,
    /// Set when `Last-Event-ID` was not a cursor: every channel is reset.
    pub invalid_cursor: bool,
}

/// What history says a stream missed since its [`Start`].
#[derive(Debug)]
pub struct Missed {
    pub epoch: u32,
    /// Where each channel continues: the asked position (the entries follow it), or the tail
    /// after a reset.
    pub positions: Vec<StreamId>,
    pub entries: Vec<MissedEntry>,
    /// Indexes of the channels that lost continuity.
    pub reset: Vec<usize>,
    pub reason: ResetReason,
}

/// One history entry a stream missed, and which of its channels it belongs to.
#[derive(Debug)]
pub struct MissedEntry {
    /// Index into the stream's channels (the order of [`Start::positions`]).
    pub channel: usize,
    pub entry: Entry,
}

/// A channel with a gap after a bus reconnect, and the last history id it delivered.
#[derive(Debug)]
pub struct Gap {
    pub channel: ChannelName,
    pub last: StreamId,
}

/// Positions, replays and backfills through the bus; remembers the history epoch.
pub struct Resumer {
    bus: Arc<dyn Bus>,
    names: ChannelNames,
    /// The history epoch last seen from the bus. A backfill that finds another one knows the
    /// history it would continue from was lost.
    epoch: AtomicU32,
}

impl Resumer {
    pub fn new(bus: Arc<dyn Bus>, names: ChannelNames) -> Self {
        Self { bus, names, epoch: AtomicU32::new(0) }
    }

    /// Positions every channel: from the cursor where it has one, else at the current tail (a
    /// new stream, or a topic the stream did not have before).
    pub async fn position(&self, channels: &[ChannelName], last_event_id: Option<&str>) -> Result<Start, BusError> {
        let cursor = last_event_id.map(Cursor::decode);
        if let Some(Ok(cursor)) = &cursor
            && let Some(positions) = channels.iter().map(|c| Some((c.clone(), cursor.position(c)?))).collect()
        {
            // A resume that knows every channel needs no tails: the history read that follows
            // checks the epoch. In a reconnect storm that is one Redis call per stream saved.
            let away = Duration::from_secs(unix_now().saturating_sub(cursor.issued_at));
            return Ok(Start { epoch: cursor.epoch, positions, away, invalid_cursor: false });
        }
        let Epoched { epoch: current, values: tails } = self.bus.tails(channels).await?;
        self.epoch.store(current, Ordering::Release);
        let (epoch, away, invalid_cursor, cursor) = match cursor {
            None => (current, Duration::ZERO, false, None),
            Some(Err(_)) => (current, Duration::ZERO, true, None),
            Some(Ok(cursor)) => {
                (cursor.epoch, Duration::from_secs(unix_now().saturating_sub(cursor.issued_at)), false, Some(cursor))
            }
        };
        let positions = channels
            .iter()
            .zip(tails)
            .map(|(channel, tail)| (channel.clone(), cursor.as_ref().and_then(|c| c.position(channel)).unwrap_or(tail)))
            .collect();
        Ok(Start { epoch, positions, away, invalid_cursor })
    }

    /// Reads what history holds past each position of `start`.
    pub async fn missed(&self, start: Start) -> Result<Missed, BusError> {
        let Epoched { epoch: current, values } = self.bus.since(start.epoch, start.away, &start.positions).await?;
        self.epoch.store(current, Ordering::Release);
        let reason = if start.invalid_cursor {
            ResetReason::InvalidCursor
        } else if start.epoch != current {
            ResetReason::HistoryLost
        } else {
            ResetReason::WindowLost
        };
        let mut missed =
            Missed { epoch: current, positions: Vec::new(), entries: Vec::new(), reset: Vec::new(), reason };
        for (index, ((_, position), since)) in start.positions.iter().zip(values).enumerate() {
            match since {
                Since::Entries(entries) if !start.invalid_cursor => {
                    missed.positions.push(*position);
                    missed.entries.extend(entries.into_iter().map(|entry| MissedEntry { channel: index, entry }));
                }
                Since::Entries(entries) => {
                    // No trustworthy position: continue from the newest entry, and say so.
                    missed.positions.push(entries.last().map_or(*position, |entry| entry.id));
                    missed.reset.push(index);
                }
                Since::Reset { tail } => {
                    missed.positions.push(tail);
                    missed.reset.push(index);
                }
            }
        }
        Ok(missed)
    }

    /// Reads history past the start positions and queues it on `connection` ahead of live
    /// messages; returns the `reset` event to send after `connected`, if any channel lost
    /// continuity.
    pub async fn replay(&self, connection: &Connection, start: Start) -> Result<Option<Bytes>, BusError> {
        let channels: Vec<ChannelName> = start.positions.iter().map(|(c, _)| c.clone()).collect();
        let missed = self.missed(start).await?;
        let mut replay = Vec::with_capacity(missed.entries.len());
        for MissedEntry { channel, entry } in missed.entries {
            let Ok(message) = envelope::parse(&entry.payload) else {
                continue; // Counted when it was published live; never written to a stream.
            };
            let frame = frame::event(message.event.as_deref(), None, &message.data);
            replay.push(Item::Event { channel: channels[channel].clone(), id: entry.id, frame });
        }
        // Positions stay where the client was: each replayed entry is newer, and the connection
        // advances as it writes them.
        connection.start_history(missed.epoch, missed.positions, replay);
        if missed.reset.is_empty() {
            return Ok(None);
        }
        let reset: Vec<&ChannelName> = missed.reset.iter().map(|&i| &channels[i]).collect();
        Ok(Some(reset_frame(&self.names, &reset, missed.reason)))
    }

    /// Delivers what channels missed while the bus was disconnected, from history, in one
    /// round trip for every gap.
    pub async fn backfill(&self, hub: &Arc<Hub>, gaps: &[Gap]) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let positions: Vec<(ChannelName, StreamId)> = gaps.iter().map(|g| (g.channel.clone(), g.last)).collect();
        let Epoched { epoch: current, values } = match self.bus.since(epoch, Duration::ZERO, &positions).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(channels = gaps.len(), error = %e, "backfill after a bus reconnect failed");
                return;
            }
        };
        let mut missed = 0;
        for (Gap { channel, .. }, since) in gaps.iter().zip(values) {
            match since {
                Since::Entries(entries) => {
                    missed += entries.len();
                    for entry in entries {
                        hub.deliver(channel.as_str(), Some(entry.id), &entry.payload).await;
                    }
                }
                Since::Reset { tail } => {
                    let reason = if current == epoch { ResetReason::WindowLost } else { ResetReason::HistoryLost };
                    tracing::warn!(%channel, reason = reason.label(), "history lost across a bus reconnect; streams are told to reset");
                    let frame = reset_frame(&self.names, &[channel], reason);
                    hub.deliver_rebase(channel.as_str(), current, tail, frame).await;
                }
            }
        }
        self.epoch.store(current, Ordering::Release);
        tracing::info!(channels = gaps.len(), missed, "backfilled after a bus reconnect");
    }
}
