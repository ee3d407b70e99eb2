//! The canary: proof that this node still delivers, for `/readyz` and `sse_canary_seconds`.
//!
//! Every `SSE_CANARY_INTERVAL` the node publishes a probe to its own canary channel
//! (`<prefix>:canary:<node id>`, see [`crate::channel::ChannelNames::canary`]) through its bus,
//! and the probe comes back the way a client's message does: Redis, this node's subscriber
//! connection, the inbound queue and the dispatcher. So a paused Redis, a dead subscriber, a
//! full inbound queue or a dispatcher that is far behind all show up as a probe that is late or
//! never returns, even while Redis answers PING. The node is *stalled* when a probe has been out
//! longer than `SSE_CANARY_THRESHOLD`, or the last one took longer than that to come back.
//!
//! What it does not own: the dispatcher hands it only messages on channels without local
//! listeners (no client stream ever listens on the canary channel), so a client message costs
//! the canary nothing; the readiness verdict's place among the other reasons is
//! [`crate::http`]'s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::Gauge;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, SubscriptionReady};
use crate::channel::ChannelName;

/// Probes remembered while they are out. A node that stays stalled keeps sending one per
/// interval; past this many the oldest are forgotten (the stall is measured from a separate
/// clock, so forgetting them changes nothing a user sees).
const MAX_OUTSTANDING: usize = 256;

/// Every probe starts with this word, so one is recognisable in `redis-cli MONITOR`.
const PROBE_WORD: &str = "sse-canary";

pub struct Canary {
    channel: ChannelName,
    /// Made up at start: only this process's probes count (another node misconfigured with the
    /// same id, or anyone who can publish to Redis, cannot make this node look healthy).
    nonce: u64,
    interval: Duration,
    threshold: Duration,
    /// Probes carry their send time as microseconds since this instant.
    origin: Instant,
    state: Mutex<State>,
    lag: Gauge,
}

struct State {
    next_seq: u64,
    /// Probes out, oldest first: `(seq, sent at)`.
    outstanding: VecDeque<(u64, Instant)>,
    /// Since when the node has been waiting for a probe: the send time of the oldest probe out,
    /// or the start until the first probe returns. `None` when nothing is out.
    waiting_since: Option<Instant>,
    /// The last probe's round trip.
    last_round_trip: Option<Duration>,
    /// Whether the last look found the node stalled (to log changes only).
    stalled: bool,
}

impl Canary {
    pub fn new(channel: ChannelName, interval: Duration, threshold: Duration) -> Self {
        let origin = Instant::now();
        Self {
            channel,
            nonce: rand::random(),
            interval,
            threshold,
            origin,
            state: Mutex::new(State {
                next_seq: 0,
                outstanding: VecDeque::new(),
                // Until the first probe is back the node is waiting for one: a canary that never
                // completes a round trip is stalled `threshold` after the start.
                waiting_since: Some(origin),
                last_round_trip: None,
                stalled: false,
            }),
            lag: metrics::gauge!(crate::metrics::CANARY_SECONDS),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when a probe has been out longer than the threshold, or the last one took longer.
    pub fn is_stalled(&self) -> bool {
        self.stalled_at(Instant::now())
    }

    fn stalled_at(&self, now: Instant) -> bool {
        let state = self.state();
        let waiting = state.waiting_since.is_some_and(|since| now.saturating_duration_since(since) > self.threshold);
        waiting || state.last_round_trip.is_some_and(|took| took > self.threshold)
    }

    /// The delivery lag as the canary sees it now: how long the oldest probe out has waited, or
    /// the last round trip when that is longer (what `sse_canary_seconds` shows).
    fn lag_at(&self, now: Instant) -> Duration {
        let state = self.state();
        let waiting = state.waiting_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        waiting.max(state.last_round_trip.unwrap_or_default())
    }

    /// Records a probe as sent now and returns its payload.
    fn send(&self, now: Instant) -> Bytes {
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.outstanding.push_back((seq, now));
        if state.outstanding.len() > MAX_OUTSTANDING {
            state.outstanding.pop_front();
        }
        state.waiting_since.get_or_insert(now);
        let sent_us = now.saturating_duration_since(self.origin).as_micros();
        Bytes::from(format!("{PROBE_WORD} {:016x} {seq} {sent_us}", self.nonce))
    }

    /// Offered by the dispatcher every message that found no local listener. True when it was
    /// one of this node's probes (then its round trip is recorded).
    pub fn arrived(&self, channel: &str, payload: &[u8]) -> bool {
        if channel != self.channel.as_str() {
            return false;
        }
        let Some((seq, sent_us)) = self.read_probe(payload) else {
            return false;
        };
        let now = Instant::now();
        let sent = self.origin + Duration::from_micros(sent_us);
        let took = now.saturating_duration_since(sent);
        let mut state = self.state();
        // Probes travel in order: everything sent up to this one is answered (one lost on the
        // way, e.g. while the subscriber reconnected, is superseded by a later one that came).
        while state.outstanding.front().is_some_and(|&(out, _)| out <= seq) {
            state.outstanding.pop_front();
        }
        state.waiting_since = state.outstanding.front().map(|&(_, at)| at);
        state.last_round_trip = Some(took);
        drop(state);
        self.lag.set(took.as_secs_f64());
        true
    }

    /// `(seq, sent µs)` of a probe of this process; `None` for anything else.
    fn read_probe(&self, payload: &[u8]) -> Option<(u64, u64)> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut words = text.split(' ');
        let (word, nonce, seq, sent) = (words.next()?, words.next()?, words.next()?, words.next()?);
        if word != PROBE_WORD || u64::from_str_radix(nonce, 16).ok()? != self.nonce || words.next().is_some() {
            return None;
        }
        Some((seq.parse().ok()?, sent.parse().ok()?))
    }

    /// Subscribes to the canary channel, then sends a probe every interval until `stop`. A
    /// publish that hangs (a paused Redis) is given up after one interval: the probe stays out
    /// and the next one goes on time.
    pub async fn run(self: Arc<Self>, bus: Arc<dyn Bus>, stop: CancellationToken) {
        let subscribed = Arc::new(SubscriptionReady::default());
        bus.subscribe(self.channel.clone(), subscribed.clone());
        // A probe published before the subscription is confirmed would be lost; the start counts
        // as waiting meanwhile, so a subscription that never comes is a stall too.
        tokio::select! {
            () = subscribed.wait() => {}
            () = stop.cancelled() => return,
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = Instant::now();
            self.look(now);
            let probe = self.send(now);
            let publish = bus.publish(std::slice::from_ref(&self.channel), probe, false);
            match tokio::time::timeout(self.interval, publish).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "the canary probe could not be published"),
                Err(_) => tracing::debug!("the canary probe's publish did not return within an interval"),
            }
        }
    }

    /// Updates `sse_canary_seconds` and logs when the verdict changes.
    fn look(&self, now: Instant) {
        let lag = self.lag_at(now);
        self.lag.set(lag.as_secs_f64());
        let stalled = self.stalled_at(now);
        let was = std::mem::replace(&mut self.state().stalled, stalled);
        match (was, stalled) {
            (false, true) => tracing::warn!(
                lag_ms = lag.as_millis() as u64,
                threshold_ms = self.threshold.as_millis() as u64,
                "canary: messages are not coming back through the bus and dispatcher in time; /readyz fails"
            ),
            (true, false) => tracing::info!(lag_ms = lag.as_millis() as u64, "canary: delivery is back in time"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{Inbound, InboundReceiver};
    use crate::channel::ChannelNames;

    const THRESHOLD: Duration = Duration::from_millis(500);

    fn canary() -> Canary {
        Canary::new(ChannelNames::new("sse").canary("n1"), Duration::from_millis(100), THRESHOLD)
    }

    #[test]
    fn only_this_processs_probes_on_its_channel_count() {
        let canary = canary();
        let probe = canary.send(Instant::now());
        assert!(!canary.arrived("sse:canary:n2", &probe), "another channel");
        assert!(!canary.arrived("sse:canary:n1", b"sse-canary 0000000000000000 0 0"), "another nonce");
        let forged = format!("{} 7", String::from_utf8_lossy(&probe));
        assert!(!canary.arrived("sse:canary:n1", forged.as_bytes()), "trailing words");
        assert!(!canary.arrived("sse:canary:n1", br#"{"data":1}"#));
        assert!(canary.arrived("sse:canary:n1", &probe));
    }

    #[test]
    fn a_probe_out_past_the_threshold_stalls_and_the_next_one_back_in_time_clears_it() {
        let canary = canary();
        let start = canary.origin;
        assert!(!canary.stalled_at(start + THRESHOLD / 2), "the start is not a stall yet");
        assert!(canary.stalled_at(start + THRESHOLD * 2), "no probe back within the threshold since the start");

        let first = canary.send(Instant::now());
        assert!(canary.arrived("sse:canary:n1", &first));
        let now = Instant::now();
        assert!(!canary.stalled_at(now));
        // A probe that never comes back (lost, or the path is broken).
        let lost = canary.send(now);
        assert!(!canary.stalled_at(now + THRESHOLD / 2));
        assert!(canary.stalled_at(now + THRESHOLD * 2));
        assert!(canary.lag_at(now + THRESHOLD * 2) >= THRESHOLD * 2, "the gauge climbs while it waits");
        // A later probe that comes back answers for the lost one too.
        let later = canary.send(now + THRESHOLD);
        drop(lost);
        assert!(canary.arrived("sse:canary:n1", &later));
        assert!(!canary.stalled_at(Instant::now()));
    }

    #[test]
    fn a_round_trip_slower_than_the_threshold_stalls_until_a_fast_one() {
        let canary = canary();
        let slow = canary.send(Instant::now());
        std::thread::sleep(THRESHOLD + Duration::from_millis(50));
        assert!(canary.arrived("sse:canary:n1", &slow));
        assert!(canary.stalled_at(Instant::now()), "the last round trip took longer than the threshold");
        let fast = canary.send(Instant::now());
        assert!(canary.arrived("sse:canary:n1", &fast));
        assert!(!canary.stalled_at(Instant::now()));
    }

    /// The dispatcher's side, with the embedded bus: a probe published through the bus arrives
    /// on the inbound queue like any message.
    #[tokio::test]
    async fn probes_go_through_the_bus_into_the_inbound_queue() {
        let names = ChannelNames::new("sse");
        let (bus, mut inbound): (_, InboundReceiver) = MemoryBus::new(names.clone(), None);
        let canary = Arc::new(Canary::new(names.canary("n1"), Duration::from_millis(20), THRESHOLD));
        let stop = CancellationToken::new();
        let task = tokio::spawn(canary.clone().run(bus, stop.clone()));
        let message = tokio::time::timeout(Duration::from_secs(2), inbound.recv()).await.expect("a probe");
        let Some(Inbound::Message { channel, id: None, payload }) = message else { panic!("{message:?}") };
        assert!(canary.arrived(channel.as_str(), &payload));
        assert!(!canary.is_stalled());
        stop.cancel();
        task.await.expect("stops");
    }
}
