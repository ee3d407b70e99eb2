//! `churn`: a steady population of held streams plus short-lived clients connecting and
//! leaving at a constant rate, while broadcasts flow. Reports latency under churn, loss on
//! the held streams, and the churning clients' connect times and failures.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use super::{Run, cpu_secs, failure_delta, r3};
use crate::cli::{Common, Publish};
use crate::protocol::Command;
use crate::publisher::{Dest, Publisher, Sequencer};
use crate::server_stats::ticks_per_sec;

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: Publish,
    /// Held streams.
    #[arg(long, default_value_t = 5_000)]
    pub conns: u64,
    /// New short-lived streams per second (each also leaves, so this is the churn rate).
    #[arg(long, default_value_t = 200.0)]
    pub churn_rate: f64,
    /// Life of a churning stream after it opened.
    #[arg(long, default_value_t = 2_000)]
    pub lifetime_ms: u64,
    /// Broadcast rate while churning.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
}

pub async fn run(a: ChurnArgs) -> Result<()> {
    let publish = a.publish.spec(&a.common)?;
    let users = a.conns;
    let churners = (a.churn_rate * a.secs as f64).ceil() as u64;
    let mut run = Run::start(&a.common, "churn", a.conns + churners, users, false).await?;
    let publisher = Publisher::start(publish).await?;
    let o = run.open(0, a.conns, a.common.connect_rate, false).await?;
    run.rep.say(&format!("{} held streams open ({} failed)", o.open, o.failed));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut seq = Sequencer::new(users);
    let before = run.pool.snapshot(true, Some(seq.expect())).await?;
    let s0 = run.sample();
    run.pool
        .send(&Command::Churn { first: a.conns, rate: a.churn_rate, lifetime_ms: a.lifetime_ms, for_ms: a.secs * 1000 })
        .await?;
    let t0 = Instant::now();
    let stats = publisher.run_step(&mut seq, a.rate, a.secs as f64, || Dest::Broadcast).await?;
    let secs = t0.elapsed().as_secs_f64();
    let s1 = run.sample();
    // Wait for the last churners to finish their lives and for in-flight events.
    tokio::time::sleep(Duration::from_millis(a.lifetime_ms + 2_000).min(run.time_left())).await;
    let agg = run.pool.snapshot(true, Some(seq.expect())).await?;
    let v = agg.verdict.unwrap_or_default();
    let lat = agg.latency.summary();
    let connect = agg.connect.summary();
    let churn_opened = agg.opened - before.opened;
    run.rep.emit(
        "churn",
        json!({
            "held": o.open,
            "open_at_end": agg.open,
            "churn_rate": a.churn_rate,
            "churn_opened": churn_opened,
            "churn_opened_per_s": r3(churn_opened as f64 / secs),
            "churn_closed": agg.churn_closed - before.churn_closed,
            "failures": failure_delta(&before, &agg),
            "connect_ms": connect,
            "rate": a.rate,
            "published": stats.sent,
            "publish_errors": stats.errors,
            "held_lost": v.missing,
            "held_duplicates": v.dups,
            "held_reordered": v.reordered,
            "held_never_opened": v.never_opened,
            "held_exact": v.exact,
            "latency_ms": lat,
            "server_cpu_pct": r3(cpu_secs(&s0, &s1) / secs * 100.0),
            "loadgen_worker_cpu_pct": r3(
                (agg.cpu_ticks - before.cpu_ticks) as f64 / ticks_per_sec() as f64 / secs * 100.0
            ),
        }),
    )?;
    run.rep.say(&format!(
        "{churn_opened} churning streams opened ({:.0}/s), connect p99 {:.1} ms, failures {}; held: lost {}, exact {}/{}; event p99 {:.2} ms",
        churn_opened as f64 / secs,
        connect.p99_ms,
        failure_delta(&before, &agg),
        v.missing,
        v.exact,
        v.clients,
        lat.p99_ms
    ));
    run.finish().await
}
