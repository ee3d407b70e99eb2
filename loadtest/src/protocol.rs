//! What the parent and its worker processes say to each other, and how the parent adds up
//! what the workers report.
//!
//! Workers are this same binary re-executed with the hidden `worker` subcommand (a single
//! process cannot hold more than 20,000 sockets on this machine). The parent writes one JSON
//! `Command` per line to a worker's stdin — the first line is its `WorkerSetup` — and the
//! worker answers every `Snapshot` command with one JSON `Counters` line on stdout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::histogram::Latency;
use crate::target::SubscribeSpec;
use crate::tracking::{Expect, Verdict};

/// The first line a worker reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSetup {
    pub index: u64,
    pub workers: u64,
    pub subscribe: SubscribeSpec,
}

impl WorkerSetup {
    /// Global client numbers are dealt round-robin: this worker owns `n % workers == index`.
    pub fn owns(&self, client: u64) -> bool {
        client % self.workers == self.index
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Open this worker's share of clients `first..first + count` at `rate` per second in
    /// total (the worker paces `rate / workers`). With `retry`, a failed or closed stream is
    /// opened again after a short random pause until `Exit`; without it a failure is final.
    Open { first: u64, count: u64, rate: f64, retry: bool },
    /// Start short-lived clients at `rate` per second in total for `for_ms`, each closing
    /// itself `lifetime_ms` after its stream opened. Their events count toward latency and
    /// deliveries but they are not checked for loss.
    Churn { first: u64, rate: f64, lifetime_ms: u64, for_ms: u64 },
    /// Close every held stream at once; with `reconnect`, open each again immediately,
    /// resuming from its last event id (the reconnect storm).
    DropAll { reconnect: bool },
    /// From now on, count every held stream that ends as lost, and each one that opens again
    /// as back (a storm the server side causes, e.g. a node killed behind a load balancer).
    WatchLosses,
    /// Answer with the worker's `Counters`; `reset` starts a new interval for latency and
    /// deliveries; `expect` asks for a per-client check against what was sent.
    Snapshot { reset: bool, expect: Option<Expect> },
    /// Close everything and exit.
    Exit,
}

/// What a worker's clients count and what it answers a `Snapshot` with, one JSON line, its
/// histograms encoded (`Latency`'s serde form); the parent adds every worker's answer into
/// one of the same kind. Cumulative unless marked "interval".
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Worker processes counted here.
    pub workers: u64,
    /// Held streams that are open now (past the response head).
    pub open: u64,
    /// Streams opened successfully since start, churn included.
    pub opened: u64,
    /// Connection attempts that failed, by kind.
    pub failures: BTreeMap<String, u64>,
    /// Interval: bench events received.
    pub received: u64,
    /// Interval: publish-to-receive latency.
    pub latency: Latency,
    /// Interval: connect-to-response-head time.
    pub connect: Latency,
    /// Interval: stream body bytes as read off the sockets (compressed, with the chunk framing)
    /// and as the SSE parser got them (decoded); equal but for the framing on plain streams.
    pub wire_bytes: u64,
    pub decoded_bytes: u64,
    /// Since the last `DropAll` or `WatchLosses`: held streams lost, how many of them are open
    /// again, and the time each took.
    pub streams_lost: u64,
    pub back: u64,
    pub reconnect: Latency,
    /// Churn clients that completed their life and closed.
    pub churn_closed: u64,
    /// Present when the `Snapshot` command carried `expect`.
    pub verdict: Option<Verdict>,
    /// The workers' own CPU time in clock ticks, to see whether the load generator saturated.
    pub cpu_ticks: u64,
}

impl Counters {
    pub fn add(&mut self, s: &Counters) {
        self.workers += s.workers;
        self.open += s.open;
        self.opened += s.opened;
        for (k, v) in &s.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.received += s.received;
        self.latency.merge(&s.latency);
        self.connect.merge(&s.connect);
        self.wire_bytes += s.wire_bytes;
        self.decoded_bytes += s.decoded_bytes;
        self.streams_lost += s.streams_lost;
        self.back += s.back;
        self.reconnect.merge(&s.reconnect);
        self.churn_closed += s.churn_closed;
        if let Some(v) = &s.verdict {
            self.verdict.get_or_insert_with(Verdict::default).add(v);
        }
        self.cpu_ticks += s.cpu_ticks;
    }

    pub fn failures_total(&self) -> u64 {
        self.failures.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(open: u64, latencies: &[u64], verdict: Option<Verdict>) -> Counters {
        let mut latency = Latency::new();
        for &l in latencies {
            latency.record_micros(l);
        }
        Counters {
            workers: 1,
            open,
            opened: open,
            failures: BTreeMap::from([("connect_refused".to_string(), 2)]),
            received: latencies.len() as u64,
            latency,
            verdict,
            cpu_ticks: 10,
            ..Counters::default()
        }
    }

    #[test]
    fn aggregates_workers_through_their_json_lines() {
        let v = Verdict { clients: 2, exact: 1, missing: 3, ..Verdict::default() };
        let lines = [
            serde_json::to_string(&snap(3, &[1_000, 2_000], Some(v))).unwrap(),
            serde_json::to_string(&snap(4, &[50_000], None)).unwrap(),
            serde_json::to_string(&snap(5, &[], Some(v))).unwrap(),
        ];
        let mut agg = Counters::default();
        for l in &lines {
            agg.add(&serde_json::from_str(l).unwrap());
        }
        assert_eq!(agg.workers, 3);
        assert_eq!(agg.open, 12);
        assert_eq!(agg.failures["connect_refused"], 6);
        assert_eq!(agg.failures_total(), 6);
        assert_eq!(agg.received, 3);
        assert_eq!(agg.latency.len(), 3);
        assert!((agg.latency.summary().max_ms - 50.0).abs() < 0.1);
        let total = agg.verdict.unwrap();
        assert_eq!((total.clients, total.exact, total.missing), (4, 2, 6));
        assert_eq!(agg.cpu_ticks, 30);
    }

    #[test]
    fn commands_have_a_stable_wire_form() {
        let c: Command = serde_json::from_str(r#"{"op":"drop_all","reconnect":true}"#).unwrap();
        assert!(matches!(c, Command::DropAll { reconnect: true }));
        let line = serde_json::to_string(&Command::Snapshot { reset: true, expect: None }).unwrap();
        assert_eq!(line, r#"{"op":"snapshot","reset":true,"expect":null}"#);
    }

    #[test]
    fn ownership_is_round_robin() {
        let setup = |index| WorkerSetup { index, workers: 3, subscribe: SubscribeSpec::for_tests() };
        let owners: Vec<u64> = (0..7).map(|c| (0..3).find(|&w| setup(w).owns(c)).unwrap()).collect();
        assert_eq!(owners, vec![0, 1, 2, 0, 1, 2, 0]);
    }
}
