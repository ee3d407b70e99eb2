//! The scenarios, and what they share: a pool of workers holding the clients, the server's
//! processes to measure, the reporter, and a hard deadline for the whole run.
//!
//! - `conns`: open idle streams, report connect rate, failures and server RSS per connection.
//! - `delivery`: `fanout` (broadcast) and `unicast` (random users) at a list of rates.
//! - `reconnect`: drop every stream at once while publishing; who came back with exactly
//!   what they missed.
//! - `churn`: a constant connect/disconnect rate while publishing.

pub mod churn;
pub mod conns;
pub mod delivery;
pub mod reconnect;

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::cli::Common;
use crate::histogram::Summary;
use crate::pool::{Pool, workers_for};
use crate::protocol::{Command, Counters};
use crate::report::{Reporter, bar};
use crate::server_stats::{Sample, Server, ticks_per_sec};

pub struct Run {
    pub pool: Pool,
    pub server: Server,
    pub rep: Reporter,
    pub deadline: Instant,
}

/// How opening a batch of streams went.
#[derive(Debug, Clone)]
pub struct Opened {
    pub open: u64,
    pub failed: u64,
    pub secs: f64,
    pub connect: Summary,
    pub failures: Value,
}

impl Run {
    pub async fn start(
        common: &Common,
        scenario: &'static str,
        clients: u64,
        users: u64,
        resume: bool,
    ) -> Result<Self> {
        let workers = workers_for(clients, common.workers)?;
        let spec = common.subscribe(users, resume)?;
        let mut rep = Reporter::new(&common.label, scenario, common.out.as_deref())?;
        let server = common.server();
        rep.say(&format!("{clients} clients over {workers} worker process(es), target {}", spec.addr));
        if let Some(limit) = server.open_files_limit() {
            rep.say(&format!("server open-files limit {limit}: one server process cannot hold more streams than that"));
        }
        Ok(Self {
            pool: Pool::start(workers, &spec).await?,
            server,
            rep,
            deadline: Instant::now() + Duration::from_secs(common.max_secs),
        })
    }

    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Opens clients `first..first+count` and waits until each is open or has failed
    /// (without `retry`), or until every one is open (with it), bounded in time.
    pub async fn open(&mut self, first: u64, count: u64, rate: f64, retry: bool) -> Result<Opened> {
        let before = self.pool.snapshot(true, None).await?;
        let started = Instant::now();
        self.pool.send(&Command::Open { first, count, rate, retry }).await?;
        let limit = Instant::now() + Duration::from_secs_f64(count as f64 / rate + 60.0);
        let limit = limit.min(self.deadline);
        let mut last_change = Instant::now();
        let mut last_seen = 0;
        let agg = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let agg = self.pool.snapshot(false, None).await?;
            let opened = agg.opened - before.opened;
            let failed = agg.failures_total() - before.failures_total();
            self.rep.progress(&format!("opening {} {opened}/{count} open, {failed} failed", bar(opened, count, 30)));
            if opened + failed != last_seen {
                last_seen = opened + failed;
                last_change = Instant::now();
            }
            let settled = if retry { agg.open >= before.open + count } else { opened + failed >= count };
            // Stuck for 20 s with nothing new: the rest will not come.
            if settled || Instant::now() >= limit || last_change.elapsed() > Duration::from_secs(20) {
                break agg;
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let failures = failure_delta(&before, &agg);
        let failed = agg.failures_total() - before.failures_total();
        Ok(Opened { open: agg.open, failed, secs, connect: agg.connect.summary(), failures })
    }

    pub fn sample(&self) -> Sample {
        self.server.sample()
    }

    pub async fn finish(mut self) -> Result<()> {
        self.rep.say("closing clients");
        self.pool.shutdown().await
    }
}

/// Failures by kind that happened between two aggregates.
pub fn failure_delta(before: &Counters, after: &Counters) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &after.failures {
        let d = v - before.failures.get(k).copied().unwrap_or(0);
        if d > 0 {
            m.insert(k.clone(), json!(d));
        }
    }
    Value::Object(m)
}

/// CPU seconds between two samples of the server.
pub fn cpu_secs(a: &Sample, b: &Sample) -> f64 {
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_sec() as f64
}

/// Rounds for readable JSON.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
