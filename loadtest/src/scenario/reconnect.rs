//! `reconnect`: N resumable streams, a steady durable publish, then every stream dropped at
//! once by the clients — a storm of N reconnects, each carrying `Last-Event-ID` — while
//! publishing goes on. Reports how long until all were back, the reconnect-time percentiles,
//! failures by kind (429/503 shedding included), and whether each client ended with exactly
//! the messages sent, none lost and none twice.
//!
//! With `--kill-pid`, the storm is a node failure instead: the tool SIGKILLs that process
//! (a node behind the load balancer the clients connect through) and the clients it held
//! reconnect on their own, through the same URL, to the nodes left; the report counts the
//! streams lost and how long until each is back and resumed.
//!
//! Clients retry with 50–500 ms of jitter after a failure, as a browser's EventSource would
//! (with a smaller `retry:`).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use super::{Run, failure_delta, r3};
use crate::cli::{Common, Publish, PublisherKind};
use crate::protocol::Command;
use crate::publisher::{Dest, Publisher, Sequencer};

#[derive(Debug, Clone, Args)]
pub struct ReconnectArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: Publish,
    #[arg(long, default_value_t = 15_000)]
    pub conns: u64,
    /// Broadcast publish rate during the whole test, messages per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Publishing time before the drop.
    #[arg(long, default_value_t = 5)]
    pub before_secs: u64,
    /// Publishing time after the drop (the storm happens inside it).
    #[arg(long, default_value_t = 20)]
    pub after_secs: u64,
    /// Longest wait after publishing for clients to catch up.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
    /// Make the storm a node failure: SIGKILL this process (one the caller started, e.g. a
    /// node behind the load balancer in --url) instead of dropping every client's stream.
    #[arg(long)]
    pub kill_pid: Option<u32>,
}

pub async fn run(mut a: ReconnectArgs) -> Result<()> {
    // Resume needs a durable publish on our node; peers keep their own buffers.
    if a.publish.publisher.is_none() && a.common.target == crate::cli::Preset::Ours {
        a.publish.publisher = Some(PublisherKind::Fcall);
    }
    let publish = a.publish.spec(&a.common)?;
    let mut run = Run::start(&a.common, "reconnect", a.conns, a.conns, true).await?;
    let publisher = Publisher::start(publish).await?;
    let o = run.open(0, a.conns, a.common.connect_rate, true).await?;
    run.rep.say(&format!("{} streams open in {:.1} s (failures while opening: {})", o.open, o.secs, o.failures));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = run.pool.snapshot(true, None).await?;

    let mut seq = Sequencer::new(1);
    let total_secs = (a.before_secs + a.after_secs) as f64;
    let publishing = publisher.run_step(&mut seq, a.rate, total_secs, || Dest::Broadcast);
    let storm = async {
        tokio::time::sleep(Duration::from_secs(a.before_secs)).await;
        if a.kill_pid.is_some() {
            run.pool.send(&Command::WatchLosses).await?;
            // Every worker answers in order, so all of them watch before the kill.
            run.pool.snapshot(false, None).await?;
        }
        let at = Instant::now();
        let at_unix_ms = crate::payload::now_nanos() / 1_000_000;
        match a.kill_pid {
            Some(pid) => kill(pid)?,
            None => run.pool.send(&Command::DropAll { reconnect: true }).await?,
        }
        let limit = at + Duration::from_secs(a.after_secs + a.settle_secs);
        let mut all_back = None;
        let mut last = None;
        while Instant::now() < limit.min(run.deadline) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let agg = run.pool.snapshot(false, None).await?;
            run.rep.progress(&format!(
                "storm {} {}/{} back after {:.1} s",
                crate::report::bar(agg.back, agg.streams_lost, 30),
                agg.back,
                agg.streams_lost,
                at.elapsed().as_secs_f64()
            ));
            let done = agg.streams_lost > 0 && agg.back >= agg.streams_lost && agg.open >= o.open;
            last = Some(agg);
            if done {
                all_back = Some(at.elapsed().as_secs_f64());
                break;
            }
        }
        anyhow::Ok((all_back, last, at_unix_ms))
    };
    let (stats, storm) = tokio::join!(publishing, storm);
    let stats = stats?;
    let (all_back, at_back, storm_unix_ms) = storm?;

    // Let every client catch up, then check each one against what was sent.
    let expect = seq.expect();
    let settle_end = Instant::now() + Duration::from_secs(a.settle_secs);
    let agg = loop {
        let agg = run.pool.snapshot(false, Some(expect.clone())).await?;
        let v = agg.verdict.unwrap_or_default();
        if v.exact == v.clients || Instant::now() >= settle_end.min(run.deadline) {
            break agg;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let v = agg.verdict.unwrap_or_default();
    let reconnect = at_back.as_ref().map(|x| x.reconnect.summary()).unwrap_or_default();
    run.rep.emit(
        "storm",
        json!({
            "conns": o.open,
            "storm": if a.kill_pid.is_some() { "node_killed" } else { "clients_dropped" },
            "streams_lost": agg.streams_lost,
            "rate": a.rate,
            "published": stats.sent,
            "publish_errors": stats.errors,
            "all_back_after_s": all_back.map(r3),
            // When the streams were dropped (or the node killed), to line the storm up with
            // samples taken outside the tool (scripts/bench-presence).
            "storm_unix_ms": storm_unix_ms,
            "back": agg.back,
            "reconnect_ms": reconnect,
            "clients_checked": v.clients,
            "clients_exact": v.exact,
            "missing_total": v.missing,
            "duplicates_total": v.dups,
            "reordered_total": v.reordered,
            "never_opened": v.never_opened,
            "failures_during_storm": failure_delta(&before, &agg),
            "latency_ms": agg.latency.summary(),
        }),
    )?;
    run.rep.say(&format!(
        "{} of {} lost streams back {}; {} of {} clients exact (missing {}, duplicates {}, reordered {}, never opened {}); reconnect p50 {:.0} p99 {:.0} max {:.0} ms; failures {}",
        agg.back,
        agg.streams_lost,
        all_back.map_or("NOT ALL".to_string(), |s| format!("after {s:.2} s")),
        v.exact,
        v.clients,
        v.missing,
        v.dups,
        v.reordered,
        v.never_opened,
        reconnect.p50_ms,
        reconnect.p99_ms,
        reconnect.max_ms,
        failure_delta(&before, &agg)
    ));
    run.finish().await
}

/// Sends SIGKILL to `pid`: a node dies without closing anything itself.
fn kill(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| anyhow::anyhow!("--kill-pid {pid} is not a process id"))?;
    // SAFETY: kill(2) with a plain signal number has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        anyhow::bail!("--kill-pid {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
