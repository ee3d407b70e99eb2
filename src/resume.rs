//! Resume, the node's side of the history protocol: where each channel of a (re)connecting
//! stream starts, what it missed while away, and what this node's channels missed while its
//! bus was disconnected (the backfill).
//!
//! [`Resumer`] owns the history epoch this node last saw and is the only part that asks the
//! bus for positions and history; `/events`, `/api/history` and the dispatcher's backfill all
//! go through it. The wire form of a position is [`crate::history::Cursor`]; the per-stream
//! bookkeeping that drops live duplicates of replayed entries is the connection's.
//!
//! The order that makes a resume exact: position every channel first, subscribe live (the
//! stream joins the hub *held*, so what arrives live waits), then read history past the
//! positions and queue it, then release what was held behind it (the connection drops live
//! copies of replayed entries by id).
//!
//! History is read in bounded pages ([`ReplayLimits`]), so no resume makes Redis copy a
//! channel's whole history at once, and a node has at most [`HISTORY_BYTES_IN_FLIGHT`] worth of
//! pages asked at a time: Redis runs the commands a client pipelined back to back, so without
//! that bound 50 resumes of 60 KB entries held its PING for half a second on the test machine. A replay longer than one page goes on in a [`CatchUp`]
//! task that queues each page once the stream has written the previous one, so a stream holds
//! about two pages in memory however long its replay; past `max_replay` entries, the channels
//! still behind get `reset` `window_lost` and continue from their current end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::bus::{Bus, BusError, Epoched};
use crate::channel::{ChannelName, ChannelNames};
use crate::connection::{CloseReason, Connection, Item, Pushed, QueueLimit, Rebase};
use crate::history::{Cursor, CursorError, Entry, Page, ReplayLimits, ResetReason, Since, StreamId, reset_frame};
use crate::hub::{Hold, Hub};
use crate::metrics::ResumeMetrics;
use crate::{envelope, frame};

/// Where each channel of a stream starts, decided before subscribing.
#[derive(Debug)]
pub struct Start {
    /// The epoch the positions belong to.
    pub epoch: u32,
    pub positions: Vec<(ChannelName, StreamId)>,
    /// How long the client may have been away: from the start of the second its cursor was
    /// issued in ([`away_since`]), never less than the truth.
    pub away: Duration,
    /// Set when `Last-Event-ID` cannot be used: every channel is reset, for this reason.
    pub reset_all: Option<ResetReason>,
    /// The client sent `Last-Event-ID` (counted in `sse_resumes_total`, its replay in
    /// `sse_replay_entries`); a new stream starts at the tails and replays nothing.
    pub resumed: bool,
}

/// How a stream's history continued, as [`Resumer::replay`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No `Last-Event-ID`: the stream starts at the current end of every channel.
    New,
    /// Every channel continues exactly where the client was.
    Exact,
    /// At least one channel continues without its past, for this reason.
    Reset(ResetReason),
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Exact => "exact",
            Outcome::Reset(_) => "reset",
        }
    }
}

/// What [`Resumer::replay`] queued on a held stream.
#[derive(Debug)]
pub struct Replayed {
    /// The `reset` event to send after `connected`, if any channel lost continuity.
    pub reset: Option<Bytes>,
    pub outcome: Outcome,
    /// Entries queued by the first page (a longer replay goes on in a [`CatchUp`] task).
    pub first_page: u32,
}

/// How long a client whose cursor was issued at `issued_at` (UNIX seconds: the cursor keeps
/// whole seconds) may have been away, to the millisecond and rounded up: counted from the start
/// of that second. History decides from it whether entries may have come and expired by age
/// after the client's position, so it must never be short: whole seconds on both sides made an
/// absence up to a second longer than a channel's age look within it, and a resume then skipped
/// what had expired meanwhile without a `reset`.
fn away_since(issued_at: u64) -> Duration {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(Duration::from_secs(issued_at))
}

/// One page of what history says a stream missed since its [`Start`].
#[derive(Debug)]
pub struct Missed {
    pub epoch: u32,
    /// Where each channel starts: the asked position (the entries follow it), or the tail
    /// after a reset.
    pub from: Vec<StreamId>,
    /// Where each channel continues after this page: its last entry here, else `from`.
    pub next: Vec<StreamId>,
    pub entries: Vec<MissedEntry>,
    /// Indexes of the channels that lost continuity.
    pub reset: Vec<usize>,
    pub reason: ResetReason,
    /// Indexes of the channels whose page filled up: there may be more after `next`.
    pub more: Vec<usize>,
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
    /// The history epoch `last` is in: the node's when the gap began.
    pub epoch: u32,
    pub last: StreamId,
}

/// Pages of history a node asks Redis for at once, in bytes: how long other clients may wait
/// behind them. At 2 MiB, PING stayed under 40 ms while 50 streams resumed 60 MB each on the
/// loaded 2-core test machine.
pub const HISTORY_BYTES_IN_FLIGHT: u32 = 2 << 20;

/// The first page a resume asks for when the node's reads are busy: a storm of resumes that
/// each missed a few messages then keeps 2,048 reads in flight rather than 8 full pages (which
/// made a 15,000-stream reconnect storm 1.9x slower). The page is strict, so the reads in flight
/// hold the node's bound exactly (2,048 pages that each took one large entry alone would be
/// gigabytes); a resume that missed more, or a larger entry, goes on with full pages.
const BUSY_FIRST_PAGE_BYTES: u32 = 1 << 10;

/// Read budgets are counted in KiB, so the semaphore's permits fit in a `u32` at any setting.
const PERMIT_BYTES: u32 = 1 << 10;

fn permits(bytes: u32) -> u32 {
    bytes.div_ceil(PERMIT_BYTES).clamp(1, HISTORY_BYTES_IN_FLIGHT / PERMIT_BYTES)
}

/// Positions, replays and backfills through the bus; remembers the history epoch.
pub struct Resumer {
    bus: Arc<dyn Bus>,
    names: ChannelNames,
    limits: ReplayLimits,
    /// One permit per KiB of page budget in flight (see [`HISTORY_BYTES_IN_FLIGHT`]).
    reads: tokio::sync::Semaphore,
    /// The history epoch last seen from the bus. A backfill that finds another one knows the
    /// history it would continue from was lost.
    epoch: AtomicU32,
    metrics: ResumeMetrics,
}

impl Resumer {
    pub fn new(bus: Arc<dyn Bus>, names: ChannelNames, limits: ReplayLimits) -> Self {
        let reads = tokio::sync::Semaphore::new((HISTORY_BYTES_IN_FLIGHT / PERMIT_BYTES) as usize);
        Self { bus, names, limits, reads, epoch: AtomicU32::new(0), metrics: ResumeMetrics::new() }
    }

    /// One page of history, once the node's reads in flight leave room for its byte budget.
    async fn since(
        &self,
        epoch: u32,
        away: Duration,
        positions: &[(ChannelName, StreamId)],
        page: Page,
    ) -> Result<Epoched<Since>, BusError> {
        // The semaphore is never closed; without a permit the read would only be unbounded.
        let _permits = self.reads.acquire_many(permits(page.bytes)).await.ok();
        self.bus.since(epoch, away, positions, page).await
    }

    /// A replay's first page: the full page when the node's reads leave room for it at once,
    /// else a small one (most resumes of a storm missed little; the rest go on page by page).
    async fn first_since(&self, start: &Start, page: Page) -> Result<Epoched<Since>, BusError> {
        let full = self.reads.try_acquire_many(permits(page.bytes));
        let (_permits, page) = match full {
            Ok(permits) => (Some(permits), page),
            Err(_) => {
                let small = Page { bytes: page.bytes.min(BUSY_FIRST_PAGE_BYTES), strict: true, ..page };
                (self.reads.acquire_many(permits(small.bytes)).await.ok(), small)
            }
        };
        self.bus.since(start.epoch, start.away, &start.positions, page).await
    }

    /// One page as configured, holding no more than `left` entries.
    fn page(&self, left: u32) -> Page {
        Page { entries: self.limits.page.entries.min(left), bytes: self.limits.page.bytes, strict: false }
    }

    /// Positions every channel: from the cursor where it has one, else at the current tail (a
    /// new stream, or a topic the stream did not have before). A cursor whose MAC fails gives
    /// no position at all.
    pub async fn position(&self, channels: &[ChannelName], last_event_id: Option<&str>) -> Result<Start, BusError> {
        let cursor = last_event_id.map(Cursor::decode);
        if let Some(Ok(cursor)) = &cursor
            && let Some(positions) = channels.iter().map(|c| Some((c.clone(), cursor.position(c)?))).collect()
        {
            // A resume that knows every channel needs no tails: the history read that follows
            // checks the epoch. In a reconnect storm that is one Redis call per stream saved.
            let away = away_since(cursor.issued_at);
            return Ok(Start { epoch: cursor.epoch, positions, away, reset_all: None, resumed: true });
        }
        let Epoched { epoch: current, values: tails } = self.bus.tails(channels).await?;
        self.epoch.store(current, Ordering::Release);
        let (epoch, away, reset_all, cursor) = match cursor {
            None => (current, Duration::ZERO, None, None),
            // Written under a key that is gone with its history (a restarted single node, or a
            // cluster that lost Redis and every node): the history it named is lost either way.
            // A forger choosing another epoch gains nothing: every channel starts at its tail.
            Some(Err(CursorError::Forged { epoch })) if epoch != current => {
                (current, Duration::ZERO, Some(ResetReason::HistoryLost), None)
            }
            Some(Err(_)) => (current, Duration::ZERO, Some(ResetReason::InvalidCursor), None),
            Some(Ok(cursor)) => (cursor.epoch, away_since(cursor.issued_at), None, Some(cursor)),
        };
        let positions = channels
            .iter()
            .zip(tails)
            .map(|(channel, tail)| (channel.clone(), cursor.as_ref().and_then(|c| c.position(channel)).unwrap_or(tail)))
            .collect();
        Ok(Start { epoch, positions, away, reset_all, resumed: last_event_id.is_some() })
    }

    /// Reads the first page of what history holds past each position of `start` (one page as
    /// configured: what `/api/history` answers).
    pub async fn missed(&self, start: Start) -> Result<Missed, BusError> {
        let page = self.since(start.epoch, start.away, &start.positions, self.page(u32::MAX)).await?;
        Ok(self.missed_from(start, page))
    }

    /// What history's answer to a read from `start` says the stream missed.
    fn missed_from(&self, start: Start, page: Epoched<Since>) -> Missed {
        let Epoched { epoch: current, values } = page;
        self.epoch.store(current, Ordering::Release);
        let reason = start.reset_all.unwrap_or(if start.epoch != current {
            ResetReason::HistoryLost
        } else {
            ResetReason::WindowLost
        });
        let mut missed = Missed {
            epoch: current,
            from: Vec::new(),
            next: Vec::new(),
            entries: Vec::new(),
            reset: Vec::new(),
            reason,
            more: Vec::new(),
        };
        for (index, ((_, position), since)) in start.positions.iter().zip(values).enumerate() {
            match since {
                Since::Entries { entries, more } if start.reset_all.is_none() => {
                    missed.from.push(*position);
                    missed.next.push(entries.last().map_or(*position, |entry| entry.id));
                    if more {
                        missed.more.push(index);
                    }
                    missed.entries.extend(entries.into_iter().map(|entry| MissedEntry { channel: index, entry }));
                }
                Since::Entries { entries, .. } => {
                    // No trustworthy position: continue from the newest entry, and say so.
                    let at = entries.last().map_or(*position, |entry| entry.id);
                    missed.from.push(at);
                    missed.next.push(at);
                    missed.reset.push(index);
                }
                Since::Reset { tail, lost } => {
                    if lost && start.reset_all.is_none() {
                        // One channel's history lost is said of the whole reset.
                        missed.reason = ResetReason::HistoryLost;
                    }
                    missed.from.push(tail);
                    missed.next.push(tail);
                    missed.reset.push(index);
                }
            }
        }
        missed
    }

    /// Reads the first page past the start positions and queues it on the held stream; a
    /// longer replay goes on in a [`CatchUp`] task, and the stream is released (what arrived
    /// live is queued behind the replay) once its last page is queued. Returns the `reset`
    /// event to send after `connected`, if any channel lost continuity, and the outcome.
    pub async fn replay(
        self: &Arc<Self>,
        hub: &Arc<Hub>,
        hold: &Arc<Hold>,
        start: Start,
    ) -> Result<Replayed, BusError> {
        let channels: Vec<ChannelName> = start.positions.iter().map(|(c, _)| c.clone()).collect();
        let resumed = start.resumed;
        let first = self.first_since(&start, self.page(self.limits.max_replay)).await?;
        let missed = self.missed_from(start, first);
        if resumed {
            self.metrics.resumed((!missed.reset.is_empty()).then_some(missed.reason));
        }
        let outcome = if !missed.reset.is_empty() {
            Outcome::Reset(missed.reason)
        } else if resumed {
            Outcome::Exact
        } else {
            Outcome::New
        };
        let replayed = missed.entries.len() as u32;
        let replay = items(hub, &channels, missed.entries.into_iter().map(|m| (m.channel, m.entry)));
        let queued = written_after(&channels, (missed.epoch, missed.from.clone()), &replay);
        // Positions stay where the client was: each replayed entry is newer, and the connection
        // advances as it writes them.
        hold.connection().start_history(missed.epoch, missed.from, replay);
        let reset = (!missed.reset.is_empty()).then(|| {
            let reset: Vec<&ChannelName> = missed.reset.iter().map(|&i| &channels[i]).collect();
            reset_frame(&self.names, &reset, missed.reason)
        });
        if missed.more.is_empty() {
            if resumed {
                self.metrics.replayed.record(f64::from(replayed));
            }
            hub.release(hold);
        } else {
            let catch_up = CatchUp {
                resumer: self.clone(),
                hub: hub.clone(),
                hold: hold.clone(),
                channels,
                epoch: missed.epoch,
                next: missed.next,
                more: missed.more,
                queued,
                replayed,
                resumed,
                finished: false,
            };
            tokio::spawn(catch_up.run());
        }
        Ok(Replayed { reset, outcome, first_page: replayed })
    }

    /// Delivers what channels missed while the bus was disconnected, from history, a page per
    /// round trip for every gap together, up to `max_replay` entries.
    pub async fn backfill(&self, hub: &Arc<Hub>, gaps: &[Gap]) {
        // Gaps that began in another epoch than the node's now (a stream that connected after a
        // Redis restart moved it on) are asked in their own, so that history lost under them is
        // seen: one round of reads per epoch, almost always one.
        let mut epochs: Vec<u32> = gaps.iter().map(|gap| gap.epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let mut missed: u32 = 0;
        for epoch in epochs {
            let positions = gaps.iter().filter(|g| g.epoch == epoch).map(|g| (g.channel.clone(), g.last)).collect();
            missed = self.backfill_from(hub, epoch, positions, missed).await;
        }
        tracing::info!(channels = gaps.len(), missed, "backfilled after a bus reconnect");
    }

    /// [`Resumer::backfill`] for the gaps of one epoch; `missed` entries were delivered before
    /// (they count toward `max_replay`). Returns the count with this round's.
    async fn backfill_from(
        &self,
        hub: &Arc<Hub>,
        epoch: u32,
        mut positions: Vec<(ChannelName, StreamId)>,
        mut missed: u32,
    ) -> u32 {
        let mut current = epoch;
        while !positions.is_empty() {
            let left = self.limits.max_replay.saturating_sub(missed);
            if left == 0 {
                self.cut_backfill(hub, &positions).await;
                break;
            }
            let Epoched { epoch: now, values } =
                match self.since(epoch, Duration::ZERO, &positions, self.page(left)).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        tracing::warn!(channels = positions.len(), error = %e, "backfill after a bus reconnect failed");
                        return missed;
                    }
                };
            current = now;
            let mut behind = Vec::new();
            for ((channel, position), since) in positions.iter().zip(values) {
                match since {
                    Since::Entries { entries, more } => {
                        missed += entries.len() as u32;
                        let last = entries.last().map_or(*position, |entry| entry.id);
                        for entry in entries {
                            hub.deliver(channel.as_str(), Some(entry.id), &entry.payload).await;
                        }
                        if more {
                            behind.push((channel.clone(), last));
                        }
                    }
                    Since::Reset { tail, lost } => {
                        let reason =
                            if current == epoch && !lost { ResetReason::WindowLost } else { ResetReason::HistoryLost };
                        tracing::warn!(%channel, reason = reason.label(), "history lost across a bus reconnect; streams are told to reset");
                        let frame = reset_frame(&self.names, &[channel], reason);
                        hub.deliver_rebase(channel.as_str(), current, tail, frame).await;
                    }
                }
            }
            positions = behind;
        }
        self.epoch.store(current, Ordering::Release);
        missed
    }

    /// The history epoch this node last saw: the one live ids and stream positions are in.
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Past `max_replay`, a backfill's channels still behind continue from their tails.
    async fn cut_backfill(&self, hub: &Arc<Hub>, behind: &[(ChannelName, StreamId)]) {
        let channels: Vec<ChannelName> = behind.iter().map(|(c, _)| c.clone()).collect();
        match self.bus.tails(&channels).await {
            Ok(Epoched { epoch, values }) => {
                for (channel, tail) in channels.iter().zip(values) {
                    tracing::warn!(%channel, "a backfill reached SSE_HISTORY_MAX_REPLAY; streams are told to reset");
                    let frame = reset_frame(&self.names, &[channel], ResetReason::WindowLost);
                    hub.deliver_rebase(channel.as_str(), epoch, tail, frame).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot end a backfill at SSE_HISTORY_MAX_REPLAY"),
        }
    }
}

/// Where a stream's cursor is (epoch, per-channel positions) once it has written `items`,
/// starting from `from`. An entry skipped as unreadable leaves no item, so it moves nothing.
fn written_after(channels: &[ChannelName], from: (u32, Vec<StreamId>), items: &[Item]) -> (u32, Vec<StreamId>) {
    let (mut epoch, mut positions) = from;
    for item in items {
        let (channel, position) = match item {
            Item::Event { channel, id, .. } => (channel, *id),
            Item::Rebase(rebase) => {
                epoch = rebase.epoch;
                (&rebase.channel, rebase.tail)
            }
            Item::Raw(_) => continue,
        };
        if let Some(slot) = channels.iter().position(|c| c == channel) {
            positions[slot] = position;
        }
    }
    (epoch, positions)
}

/// Queue items of history entries (`(channel index, entry)`), framed for one stream. An entry
/// whose payload the envelope refuses is skipped: it was counted when it was published live.
fn items(hub: &Hub, channels: &[ChannelName], entries: impl Iterator<Item = (usize, Entry)>) -> Vec<Item> {
    entries
        .filter_map(|(channel, entry)| {
            let message = envelope::parse(&entry.payload).ok()?;
            let frame = frame::event(message.event.as_deref(), None, &message.data);
            Some(Item::Event { channel: channels[channel].clone(), id: entry.id, frame: hub.frame(frame) })
        })
        .collect()
}

/// The rest of a replay longer than one page: queues each page once the stream has written
/// the previous one, then releases the stream. If it cannot finish (Redis failed, the task
/// panicked), the stream is closed so that its client resumes from the cursor it has, rather
/// than being left held without live delivery.
struct CatchUp {
    resumer: Arc<Resumer>,
    hub: Arc<Hub>,
    hold: Arc<Hold>,
    channels: Vec<ChannelName>,
    /// The epoch history is read in (a reset under the replay moves it).
    epoch: u32,
    /// Where each channel's next page starts.
    next: Vec<StreamId>,
    /// Channels that may have more history after `next`.
    more: Vec<usize>,
    /// The stream's cursor (epoch, positions) once it has written everything queued so far.
    queued: (u32, Vec<StreamId>),
    replayed: u32,
    /// A resume (its depth is recorded when the replay ends).
    resumed: bool,
    finished: bool,
}

/// How often a catch-up looks whether the stream took its page (the connection has no signal
/// for it, which would cost every stream memory; a look is one lock and a comparison, and a page
/// takes far longer than this to write when it matters).
const WRITTEN_POLL: Duration = Duration::from_millis(5);

impl CatchUp {
    async fn run(mut self) {
        if let Err(e) = self.pages().await {
            tracing::warn!(error = %e, "a long replay could not go on; the stream resumes on reconnect");
            self.abandon();
        }
        if self.resumed {
            self.resumer.metrics.replayed.record(f64::from(self.replayed));
        }
        self.finished = true;
    }

    async fn pages(&mut self) -> Result<(), BusError> {
        let connection = self.hold.connection().clone();
        while !self.more.is_empty() {
            let page = self.read_page().await?;
            let (epoch, positions) = self.queued.clone();
            if !self.written(&connection, epoch, &positions).await {
                return Ok(()); // The stream ended (or was cut off) meanwhile.
            }
            self.queued = written_after(&self.channels, (epoch, positions.clone()), &page);
            connection.start_history(epoch, positions, page);
            // Queuing history does not wake a stream that is waiting for events; a comment
            // behind the page does (and readers ignore it).
            let unbounded = QueueLimit { frames: usize::MAX / 2, bytes: u32::MAX };
            if connection.push(&Item::Raw(frame::comment("history").into()), unbounded, None) == Pushed::Gone {
                self.hub.client_gone(&connection);
                return Ok(());
            }
        }
        self.hub.release(&self.hold);
        Ok(())
    }

    /// The next page's items (read ahead, while the stream writes the previous page), or the
    /// resets that end the replay at `max_replay`. Advances `next`, `more` and `epoch`.
    async fn read_page(&mut self) -> Result<Vec<Item>, BusError> {
        let resumer = &self.resumer;
        let left = resumer.limits.max_replay.saturating_sub(self.replayed);
        let asked: Vec<usize> = std::mem::take(&mut self.more);
        let mut page = Vec::new();
        if left == 0 {
            let channels: Vec<ChannelName> = asked.iter().map(|&i| self.channels[i].clone()).collect();
            let Epoched { epoch, values } = resumer.bus.tails(&channels).await?;
            for (&i, tail) in asked.iter().zip(values) {
                // A page that filled up exactly at the end leaves nothing behind: no reset.
                if epoch != self.epoch || tail != self.next[i] {
                    page.push(self.rebase(i, epoch, tail, ResetReason::WindowLost));
                }
            }
            return Ok(page);
        }
        let positions: Vec<(ChannelName, StreamId)> =
            asked.iter().map(|&i| (self.channels[i].clone(), self.next[i])).collect();
        let Epoched { epoch: current, values } =
            resumer.since(self.epoch, Duration::ZERO, &positions, resumer.page(left)).await?;
        let reason = if current == self.epoch { ResetReason::WindowLost } else { ResetReason::HistoryLost };
        let mut entries = Vec::new();
        for (&i, since) in asked.iter().zip(values) {
            match since {
                Since::Entries { entries: mut got, more } => {
                    // What the stream already holds live is not replayed: that keeps live-only
                    // messages published during a long replay in their place among the rest.
                    let live_from = self.hold.first_held(&self.channels[i]);
                    let reached_live = live_from.is_some_and(|from| got.last().is_some_and(|last| last.id >= from));
                    got.retain(|entry| live_from.is_none_or(|from| entry.id < from));
                    if let Some(last) = got.last() {
                        self.next[i] = last.id;
                    }
                    self.replayed += got.len() as u32;
                    entries.extend(got.into_iter().map(|entry| (i, entry)));
                    if more && !reached_live {
                        self.more.push(i);
                    }
                }
                // Trimmed (or lost) under the replay: say so where the replay stops.
                Since::Reset { tail, lost } => {
                    let reason = if lost { ResetReason::HistoryLost } else { reason };
                    page.push(self.rebase(i, current, tail, reason))
                }
            }
        }
        page.splice(0..0, items(&self.hub, &self.channels, entries.into_iter()));
        Ok(page)
    }

    /// A `reset` of channel `i` that moves its position to `tail` in `epoch` where it is written.
    fn rebase(&mut self, i: usize, epoch: u32, tail: StreamId, reason: ResetReason) -> Item {
        self.next[i] = tail;
        self.epoch = epoch;
        let channel = self.channels[i].clone();
        let frame = reset_frame(&self.resumer.names, &[&channel], reason);
        Item::Rebase(Arc::new(Rebase { epoch, channel, tail, frame: frame.into() }))
    }

    /// Waits until the stream has written everything queued so far (its cursor reached
    /// `epoch`/`next`); false when the stream ended first or its hold overflowed.
    async fn written(&self, connection: &Arc<Connection>, epoch: u32, next: &[StreamId]) -> bool {
        loop {
            if connection.is_closed() {
                return false;
            }
            if self.hold.overflowed() {
                self.hub.release(&self.hold); // Cuts it off as a slow consumer.
                return false;
            }
            if connection.is_at(epoch, next) {
                return true;
            }
            tokio::time::sleep(WRITTEN_POLL).await;
        }
    }

    fn abandon(&self) {
        let connection = self.hold.connection();
        if !connection.is_closed() {
            self.hub.close(connection, CloseReason::Overflow, CloseReason::Overflow.farewell());
        }
    }
}

impl Drop for CatchUp {
    fn drop(&mut self) {
        if !self.finished {
            self.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::history::{HistoryConfig, Retention};

    #[test]
    fn a_read_reserves_its_page_budget_in_kib_within_the_node_bound() {
        assert_eq!(permits(0), 1);
        assert_eq!(permits(1), 1);
        assert_eq!(permits(1025), 2);
        assert_eq!(permits(256 << 10), 256);
        assert_eq!(permits(u32::MAX), HISTORY_BYTES_IN_FLIGHT / PERMIT_BYTES);
    }

    async fn resumer_with_history(entries: usize, size: usize) -> (Arc<Resumer>, Start) {
        let retention = Retention { length: 10_000, age: Duration::from_secs(3600) };
        let names = ChannelNames::new("sse");
        let config = HistoryConfig { user: retention, topic: retention, broadcast: retention };
        let (bus, _inbound) = MemoryBus::new(names.clone(), Some(config));
        let channel = ChannelName::from_bus("sse:topic:t");
        let limits = ReplayLimits { page: Page { entries: 1000, bytes: 256 << 10, strict: false }, max_replay: 10_000 };
        let resumer = Arc::new(Resumer::new(bus.clone(), names, limits));
        let start = resumer.position(std::slice::from_ref(&channel), None).await.expect("positioned");
        for _ in 0..entries {
            bus.publish(std::slice::from_ref(&channel), Bytes::from(vec![b'x'; size]), true).await.expect("published");
        }
        (resumer, start)
    }

    fn shape(page: &Epoched<Since>) -> (usize, bool) {
        match &page.values[0] {
            Since::Entries { entries, more } => (entries.len(), *more),
            Since::Reset { .. } => panic!("unexpected reset"),
        }
    }

    #[tokio::test]
    async fn a_first_page_is_full_when_the_reads_have_room_and_small_when_they_are_busy() {
        let (resumer, start) = resumer_with_history(40, 256).await;
        let page = resumer.page(u32::MAX);
        let free = resumer.first_since(&start, page).await.expect("read");
        assert_eq!(shape(&free), (40, false), "a free node reads the whole 10 KiB in one page");

        // Seven full pages in flight leave less than an eighth: the resume asks for 1 KiB.
        let busy = resumer.reads.acquire_many(permits(page.bytes) * 7 + 1).await.expect("open semaphore");
        let small = resumer.first_since(&start, page).await.expect("read");
        assert_eq!(shape(&small), (4, true), "1 KiB of 256-byte entries, and more to read");
        drop(busy);
        let full = resumer.first_since(&start, page).await.expect("read");
        assert_eq!(shape(&full), (40, false));
    }

    #[tokio::test]
    async fn a_busy_first_page_leaves_an_entry_larger_than_itself_for_a_full_page() {
        let (resumer, start) = resumer_with_history(3, 4 << 10).await;
        let page = resumer.page(u32::MAX);
        let busy = resumer.reads.acquire_many(permits(page.bytes) * 7 + 1).await.expect("open semaphore");
        let small = resumer.first_since(&start, page).await.expect("read");
        assert_eq!(shape(&small), (0, true), "a 4 KiB entry does not fit 1 KiB: nothing read, more to come");
        drop(busy);
        let positions = start.positions.clone();
        let next = resumer.since(start.epoch, start.away, &positions, page).await.expect("read");
        assert_eq!(shape(&next), (3, false), "the next (full) page takes them");
    }
}
