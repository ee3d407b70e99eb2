//! The embedded bus: a single node needs nothing else. Publishing hands the payload straight
//! to this node's dispatcher, through the same bounded inbound queue a Redis bus uses, so the
//! delivery path is the same in both modes. History follows the same rules as the Redis
//! functions (bounded by length and age, an epoch that changes when history is lost: here,
//! at every start), so a single node resumes exactly as a cluster does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Bus, BusError, BusFuture, Epoched, INBOUND_CAPACITY, Inbound, InboundReceiver, PublishReceipt, SubscriptionReady,
};
use crate::channel::{ChannelKind, ChannelName, ChannelNames};
use crate::history::{Entry, HistoryConfig, Page, Retention, Since, StreamId};

/// How often idle histories past their age are swept out.
const SWEEP_INTERVAL_MS: u64 = 10_000;

pub struct MemoryBus {
    inbound: mpsc::Sender<Inbound>,
    subscribed: Mutex<HashSet<ChannelName>>,
    history: Option<MemoryHistory>,
    claimed: Mutex<Claimed>,
}

/// Keys recorded by `claim_once`, with when each may be recorded again. Expired keys are
/// swept when the map has doubled since the last sweep, so it holds at most about twice the
/// keys alive at once.
#[derive(Default)]
struct Claimed {
    until: HashMap<Box<str>, u64>,
    swept_at_len: usize,
}

impl Claimed {
    fn claim(&mut self, key: &str, now: u64, until: u64) -> bool {
        if self.until.len() >= (2 * self.swept_at_len).max(1024) {
            self.until.retain(|_, until| *until > now);
            self.swept_at_len = self.until.len();
        }
        match self.until.get_mut(key) {
            Some(held) if *held > now => false,
            Some(held) => {
                *held = until;
                true
            }
            None => {
                self.until.insert(key.into(), until);
                true
            }
        }
    }
}

impl MemoryBus {
    pub fn new(names: ChannelNames, history: Option<HistoryConfig>) -> (Arc<Self>, InboundReceiver) {
        let (tx, rx) = mpsc::channel(INBOUND_CAPACITY);
        let history = history.map(|config| MemoryHistory {
            config,
            names,
            epoch: rand::random::<u32>() | 1,
            store: Mutex::new(Store::default()),
        });
        let claimed = Mutex::new(Claimed::default());
        (Arc::new(Self { inbound: tx, subscribed: Mutex::new(HashSet::new()), history, claimed }), rx)
    }

    fn subscribed(&self) -> MutexGuard<'_, HashSet<ChannelName>> {
        self.subscribed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn history(&self) -> Result<&MemoryHistory, BusError> {
        self.history.as_ref().ok_or(BusError::HistoryOff)
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

    fn publish<'a>(
        &'a self,
        channels: &'a [ChannelName],
        payload: Bytes,
        durable: bool,
    ) -> BusFuture<'a, PublishReceipt> {
        Box::pin(async move {
            let history = self.history.as_ref().filter(|_| durable);
            let mut receipt = PublishReceipt { channels: channels.len(), ..Default::default() };
            let mut receivers = 0;
            for channel in channels {
                let id = history.map(|h| h.append(channel, &payload));
                if let Some(id) = id {
                    receipt.ids.push(id.to_string());
                }
                if !self.subscribed().contains(channel) {
                    continue;
                }
                receivers += 1;
                // Waiting here (rather than dropping) pushes back on the publisher, like Redis would.
                self.inbound
                    .send(Inbound::Message { channel: channel.clone(), id, payload: payload.clone() })
                    .await
                    .map_err(|_| BusError::ShuttingDown)?;
            }
            if history.is_none() {
                receipt.receivers = Some(receivers);
            }
            Ok(receipt)
        })
    }

    fn tails<'a>(&'a self, channels: &'a [ChannelName]) -> BusFuture<'a, Epoched<StreamId>> {
        Box::pin(async move {
            let history = self.history()?;
            let mut store = history.store();
            let now = crate::auth::unix_millis();
            Ok(Epoched {
                epoch: history.epoch,
                values: channels.iter().map(|c| store.live(c, now).map_or(StreamId::ZERO, |s| s.last)).collect(),
            })
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
            let history = self.history()?;
            let mut budget =
                Budget { entries: page.entries as usize, bytes: page.bytes as usize, taken: 0, strict: page.strict };
            let values = positions
                .iter()
                .map(|(channel, position)| history.since(epoch, away, channel, *position, &mut budget))
                .collect();
            Ok(Epoched { epoch: history.epoch, values })
        })
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn claim_once<'a>(&'a self, key: &'a str, lifetime: Duration) -> BusFuture<'a, bool> {
        Box::pin(async move {
            let now = crate::auth::unix_millis();
            let until = now.saturating_add(u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX));
            Ok(self.claimed.lock().unwrap_or_else(PoisonError::into_inner).claim(key, now, until))
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// What is left of one page (`sse_since`'s budget), and how many entries it took so far.
struct Budget {
    entries: usize,
    bytes: usize,
    taken: usize,
    strict: bool,
}

struct MemoryHistory {
    config: HistoryConfig,
    names: ChannelNames,
    epoch: u32,
    store: Mutex<Store>,
}

#[derive(Default)]
struct Store {
    streams: HashMap<ChannelName, Stream>,
    last_sweep_ms: u64,
}

struct Stream {
    entries: VecDeque<Entry>,
    last: StreamId,
    /// The newest id ever trimmed: positions before it lost something.
    max_deleted: StreamId,
    expires_at_ms: Option<u64>,
}

impl Store {
    /// The channel's history, unless it expired (then it is gone, as in Redis).
    fn live(&mut self, channel: &ChannelName, now: u64) -> Option<&mut Stream> {
        if self.streams.get(channel).is_some_and(|s| s.expires_at_ms.is_some_and(|at| at <= now)) {
            self.streams.remove(channel);
        }
        self.streams.get_mut(channel)
    }
}

impl MemoryHistory {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retention(&self, channel: &ChannelName) -> Retention {
        self.config.retention(self.names.kind_of(channel).unwrap_or(ChannelKind::Topic))
    }

    fn append(&self, channel: &ChannelName, payload: &Bytes) -> StreamId {
        let retention = self.retention(channel);
        let now = crate::auth::unix_millis();
        let mut store = self.store();
        if now >= store.last_sweep_ms + SWEEP_INTERVAL_MS {
            store.last_sweep_ms = now;
            store.streams.retain(|_, s| s.expires_at_ms.is_none_or(|at| at > now));
        }
        if store.live(channel, now).is_none() {
            let fresh = Stream {
                entries: VecDeque::new(),
                last: StreamId::ZERO,
                max_deleted: StreamId::ZERO,
                expires_at_ms: None,
            };
            store.streams.insert(channel.clone(), fresh);
        }
        let Some(stream) = store.streams.get_mut(channel) else { unreachable!("inserted above") };
        let id = if now > stream.last.ms {
            StreamId { ms: now, seq: 0 }
        } else {
            StreamId { ms: stream.last.ms, seq: stream.last.seq + 1 }
        };
        stream.entries.push_back(Entry { id, payload: payload.clone() });
        stream.last = id;
        while stream.entries.len() > retention.length as usize {
            if let Some(Entry { id: trimmed, .. }) = stream.entries.pop_front() {
                stream.max_deleted = trimmed;
            }
        }
        let age = retention.age.as_millis() as u64;
        if age > 0 {
            while stream.entries.front().is_some_and(|first| first.id.ms + age < now) {
                if let Some(Entry { id: trimmed, .. }) = stream.entries.pop_front() {
                    stream.max_deleted = trimmed;
                }
            }
            stream.expires_at_ms = Some(now + age);
        }
        id
    }

    /// The decision of the `sse_since` Redis function (history.rs), with exact trim tracking
    /// here: a position is continuous unless something newer than it was trimmed. Entries are
    /// taken within `budget`, as the function does.
    fn since(
        &self,
        epoch: u32,
        away: Duration,
        channel: &ChannelName,
        position: StreamId,
        budget: &mut Budget,
    ) -> Since {
        let age = self.retention(channel).age.as_millis() as u64;
        let window_passed = age > 0 && away.as_millis() as u64 > age;
        let now = crate::auth::unix_millis();
        let mut store = self.store();
        let stream = store.live(channel, now);
        if epoch != self.epoch {
            return Since::Reset { tail: stream.map_or(StreamId::ZERO, |s| s.last), lost: false };
        }
        let Some(stream) = stream else {
            let expired_after_position = position != StreamId::ZERO && age > 0 && position.ms + age <= now;
            return if !window_passed && (position == StreamId::ZERO || expired_after_position) {
                Since::Entries { entries: Vec::new(), more: false }
            } else {
                Since::Reset { tail: StreamId::ZERO, lost: false }
            };
        };
        if position > stream.last || stream.max_deleted > position {
            return Since::Reset { tail: stream.last, lost: false };
        }
        if window_passed && (position == StreamId::ZERO || !stream.entries.iter().any(|entry| entry.id == position)) {
            return Since::Reset { tail: stream.last, lost: false };
        }
        let after = stream.entries.partition_point(|entry| entry.id <= position);
        let mut entries = Vec::new();
        for entry in stream.entries.range(after..) {
            // An entry larger than the page still comes, alone, unless the page is strict.
            let alone = budget.taken == 0 && !budget.strict;
            if budget.entries == 0 || (entry.payload.len() > budget.bytes && !alone) {
                return Since::Entries { entries, more: true };
            }
            budget.entries -= 1;
            budget.bytes = budget.bytes.saturating_sub(entry.payload.len());
            budget.taken += 1;
            entries.push(entry.clone());
        }
        Since::Entries { entries, more: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(length: u32) -> (Arc<MemoryBus>, InboundReceiver) {
        let retention = Retention { length, age: Duration::from_secs(3600) };
        MemoryBus::new(
            ChannelNames::new("sse"),
            Some(HistoryConfig { user: retention, topic: retention, broadcast: retention }),
        )
    }

    const PAGE: Page = Page { entries: 1000, bytes: 1 << 20, strict: false };

    #[test]
    fn a_key_is_claimed_once_until_it_expires_and_expired_keys_are_swept() {
        let mut claimed = Claimed::default();
        assert!(claimed.claim("a", 0, 100));
        assert!(!claimed.claim("a", 99, 200), "claimed again before it expired");
        assert!(claimed.claim("b", 99, 200));
        assert!(claimed.claim("a", 100, 300), "an expired key may be claimed again");
        assert!(!claimed.claim("a", 299, 400));
        // Many keys that expire: the map is swept instead of growing without bound.
        for i in 0..10_000 {
            assert!(claimed.claim(&format!("k{i}"), 1_000 + i, 1_001 + i));
        }
        assert!(claimed.until.len() <= 2048, "{} keys held", claimed.until.len());
    }

    fn entries(since: Since) -> Vec<Bytes> {
        match since {
            Since::Entries { entries, .. } => entries.into_iter().map(|entry| entry.payload).collect(),
            Since::Reset { .. } => panic!("unexpected reset"),
        }
    }

    #[tokio::test]
    async fn only_subscribed_channels_receive_live() {
        let (bus, mut inbound) = MemoryBus::new(ChannelNames::new("sse"), None);
        let a = ChannelName::from_bus("sse:user:a");
        let b = ChannelName::from_bus("sse:user:b");
        let ready = Arc::new(SubscriptionReady::default());
        bus.subscribe(a.clone(), ready.clone());
        assert!(ready.is_set());
        let receipt = bus.publish(&[a.clone(), b.clone()], Bytes::from_static(b"hi"), true).await.expect("published");
        assert_eq!(receipt, PublishReceipt { channels: 2, receivers: Some(1), ids: vec![] });
        match inbound.try_recv() {
            Ok(Inbound::Message { channel, id: None, payload }) => {
                assert_eq!(channel, a);
                assert_eq!(&payload[..], b"hi");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(inbound.try_recv().is_err());
    }

    #[tokio::test]
    async fn history_replays_what_came_after_a_position() {
        let (bus, _inbound) = bus(100);
        let c = ChannelName::from_bus("sse:topic:t");
        let Epoched { epoch, values: tails } = bus.tails(std::slice::from_ref(&c)).await.expect("tails");
        assert_eq!(tails, [StreamId::ZERO]);
        let mut ids = Vec::new();
        for i in 0..3 {
            let receipt = bus.publish(std::slice::from_ref(&c), Bytes::from(format!("m{i}")), true).await.expect("ok");
            ids.push(StreamId::parse(&receipt.ids[0]).expect("id"));
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
        let since = bus.since(epoch, Duration::ZERO, &[(c.clone(), ids[0])], PAGE).await.expect("since").values;
        assert_eq!(entries(since.into_iter().next().expect("one")), [Bytes::from("m1"), Bytes::from("m2")]);
        let since = bus.since(epoch, Duration::ZERO, &[(c.clone(), StreamId::ZERO)], PAGE).await.expect("since").values;
        assert_eq!(entries(since.into_iter().next().expect("one")).len(), 3);
    }

    #[tokio::test]
    async fn trimmed_history_another_epoch_or_a_future_position_reset() {
        let (bus, _inbound) = bus(2);
        let c = ChannelName::from_bus("sse:user:u");
        let epoch = bus.tails(std::slice::from_ref(&c)).await.expect("tails").epoch;
        let mut ids = Vec::new();
        for i in 0..4 {
            let receipt = bus.publish(std::slice::from_ref(&c), Bytes::from(format!("m{i}")), true).await.expect("ok");
            ids.push(StreamId::parse(&receipt.ids[0]).expect("id"));
        }
        let ask = |position| vec![(c.clone(), position)];
        let reset = |r: Epoched<Since>| matches!(r.values[0], Since::Reset { .. });
        assert!(reset(bus.since(epoch, Duration::ZERO, &ask(ids[0]), PAGE).await.expect("since")), "m1 was trimmed");
        assert!(
            !reset(bus.since(epoch, Duration::ZERO, &ask(ids[1]), PAGE).await.expect("since")),
            "trimmed up to m1 only"
        );
        assert!(reset(bus.since(epoch ^ 2, Duration::ZERO, &ask(ids[3]), PAGE).await.expect("since")), "other epoch");
        let future = StreamId { ms: ids[3].ms + 1000, seq: 0 };
        assert!(
            reset(bus.since(epoch, Duration::ZERO, &ask(future), PAGE).await.expect("since")),
            "a position from the future"
        );
    }

    #[tokio::test]
    async fn a_page_is_bounded_in_entries_and_bytes_over_all_its_channels() {
        let (bus, _inbound) = bus(100);
        let (a, b) = (ChannelName::from_bus("sse:topic:a"), ChannelName::from_bus("sse:topic:b"));
        let epoch = bus.tails(std::slice::from_ref(&a)).await.expect("tails").epoch;
        for i in 0..5 {
            for c in [&a, &b] {
                bus.publish(std::slice::from_ref(c), Bytes::from(format!("{i:0>100}")), true).await.expect("ok");
            }
        }
        let ask = vec![(a.clone(), StreamId::ZERO), (b.clone(), StreamId::ZERO)];
        let page = |entries, bytes| Page { entries, bytes, strict: false };
        let shape = |r: Epoched<Since>| -> Vec<(usize, bool)> {
            r.values
                .into_iter()
                .map(|s| match s {
                    Since::Entries { entries, more } => (entries.len(), more),
                    Since::Reset { .. } => panic!("unexpected reset"),
                })
                .collect()
        };
        let read = |p| bus.since(epoch, Duration::ZERO, &ask, p);
        assert_eq!(shape(read(page(3, 1 << 20)).await.expect("since")), [(3, true), (0, true)], "3 entries in all");
        assert_eq!(shape(read(page(7, 1 << 20)).await.expect("since")), [(5, false), (2, true)]);
        // 250 bytes hold two entries of 100; an entry larger than the page comes alone.
        assert_eq!(shape(read(page(100, 250)).await.expect("since")), [(2, true), (0, true)]);
        assert_eq!(shape(read(page(100, 1)).await.expect("since")), [(1, true), (0, true)], "always progress");
        // A strict page never holds more than its bytes: the large entry waits for a later page.
        let strict = |entries, bytes| Page { entries, bytes, strict: true };
        assert_eq!(shape(read(strict(100, 250)).await.expect("since")), [(2, true), (0, true)]);
        assert_eq!(shape(read(strict(100, 99)).await.expect("since")), [(0, true), (0, true)], "nothing fits");
        assert_eq!(shape(read(PAGE).await.expect("since")), [(5, false), (5, false)]);
    }
}
