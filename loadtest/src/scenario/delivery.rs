//! `fanout` and `unicast`: hold N streams, publish at each rate of a list for a fixed time,
//! and report deliveries per second, loss, publish-to-receive latency percentiles and the
//! server's CPU — then the highest rate that met the latency objective with zero loss.
//!
//! Fanout publishes to the broadcast channel every stream has; unicast publishes to a random
//! user each time (one stream per user). A step ends when its publishing ends; a drain period
//! then lets in-flight events arrive before loss is counted, so a slow server shows up as
//! latency and only a dropped event as loss.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use super::{Run, cpu_secs, failure_delta, r3};
use crate::cli::{Common, Publish, parse_rates};
use crate::publisher::{Dest, Publisher, Sequencer, random_user};
use crate::server_stats::ticks_per_sec;

#[derive(Debug, Clone, Args)]
pub struct DeliveryArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: Publish,
    /// Subscribers (fanout) or users with one stream each (unicast).
    #[arg(long, default_value_t = 10_000)]
    pub conns: u64,
    /// Publish rates to try, messages per second, comma-separated.
    #[arg(long, default_value = "10,20,50,100")]
    pub rates: String,
    /// Publishing time per rate.
    #[arg(long, default_value_t = 10)]
    pub step_secs: u64,
    /// Longest wait after a step for in-flight events.
    #[arg(long, default_value_t = 5)]
    pub drain_secs: u64,
    /// The latency objective: the summary names the highest rate with p99 at or under it and
    /// zero loss.
    #[arg(long, default_value_t = 50.0)]
    pub slo_p99_ms: f64,
    /// Stop after this many consecutive steps that missed the objective.
    #[arg(long, default_value_t = 2)]
    pub stop_after_misses: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fanout,
    Unicast,
}

pub async fn run(a: DeliveryArgs, mode: Mode) -> Result<()> {
    let scenario = match mode {
        Mode::Fanout => "fanout",
        Mode::Unicast => "unicast",
    };
    let rates = parse_rates(&a.rates)?;
    let publish = a.publish.spec(&a.common)?;
    let users = a.conns;
    let mut run = Run::start(&a.common, scenario, a.conns, users, false).await?;
    let publisher = Publisher::start(publish.clone()).await?;
    let o = run.open(0, a.conns, a.common.connect_rate, false).await?;
    run.rep.say(&format!("{} streams open ({} failed {}) in {:.1} s", o.open, o.failed, o.failures, o.secs));
    if o.open == 0 {
        run.rep.say("no stream opened; nothing to measure");
        return run.finish().await;
    }
    // Let the server settle (heartbeat timers, first pings) before the first step.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut seq = Sequencer::new(users);
    let mut unicast = random_user(users);
    let mut prev = run.pool.snapshot(true, Some(seq.expect())).await?;
    let mut best: Option<f64> = None;
    let mut misses = 0;
    let mut lg_ticks = prev.cpu_ticks;
    let redis = a.common.redis();
    for (i, &rate) in rates.iter().enumerate() {
        let needed = Duration::from_secs(a.step_secs + a.drain_secs + 5);
        if run.time_left() < needed {
            run.rep.say("time limit reached: remaining rates skipped");
            break;
        }
        run.rep.progress(&format!(
            "step {}/{} {} publishing {rate}/s for {} s",
            i + 1,
            rates.len(),
            crate::report::bar(i as u64, rates.len() as u64, 20),
            a.step_secs
        ));
        let s0 = run.sample();
        let r0 = redis.sample();
        let t0 = Instant::now();
        let t0_unix_ms = crate::payload::now_nanos() / 1_000_000;
        let stats = publisher
            .run_step(&mut seq, rate, a.step_secs as f64, || match mode {
                Mode::Fanout => Dest::Broadcast,
                Mode::Unicast => unicast(),
            })
            .await?;
        let publish_secs = t0.elapsed().as_secs_f64();
        let s1 = run.sample();
        let r1 = redis.sample();
        // Drain: wait until everything sent has arrived, or the drain time is up.
        let expected_total = seq.deliveries_expected(prev_open(&prev, o.open));
        let drain_end = Instant::now() + Duration::from_secs(a.drain_secs);
        loop {
            let v = run.pool.snapshot(false, Some(seq.expect())).await?;
            let missing = v.verdict.map(|x| x.missing).unwrap_or(0);
            if missing == 0 || Instant::now() >= drain_end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let agg = run.pool.snapshot(true, Some(seq.expect())).await?;
        let v = agg.verdict.unwrap_or_default();
        let pv = prev.verdict.unwrap_or_default();
        let lost = v.missing.saturating_sub(pv.missing);
        let dups = v.dups.saturating_sub(pv.dups);
        let lat = agg.latency.summary();
        let server_cpu = cpu_secs(&s0, &s1);
        let deliveries_per_s = agg.received as f64 / publish_secs;
        let cpu_per_million = if agg.received > 0 { server_cpu / agg.received as f64 * 1e6 } else { 0.0 };
        // Everything the streams carried in the step (heartbeats too) over the bench events.
        let per_delivery = |bytes: u64| if agg.received > 0 { bytes as f64 / agg.received as f64 } else { 0.0 };
        // Redis's CPU over the same publishing time, when its processes were named.
        let redis_cpu = redis.is_known().then(|| cpu_secs(&r0, &r1));
        let redis_per_million =
            redis_cpu.map(|c| if agg.received > 0 { r3(c / agg.received as f64 * 1e6) } else { 0.0 });
        let lg_cpu = (agg.cpu_ticks - lg_ticks) as f64 / ticks_per_sec() as f64;
        lg_ticks = agg.cpu_ticks;
        let behind = stats.achieved_rate < rate * 0.97;
        let met = lat.p99_ms <= a.slo_p99_ms && lost == 0 && stats.errors == 0 && !behind && agg.open == o.open;
        run.rep.emit(
            "step",
            json!({
                "rate": rate,
                "conns": agg.open,
                "published": stats.sent,
                "publish_errors": stats.errors,
                // When publishing ran, to line the step up with samples taken outside the tool
                // (scripts/bench-scale's CPU by process group).
                "publish_unix_ms": [t0_unix_ms, t0_unix_ms + (publish_secs * 1000.0) as u64],
                "achieved_publish_rate": r3(stats.achieved_rate),
                "publisher_fell_behind": behind,
                "deliveries": agg.received,
                "deliveries_per_s": r3(deliveries_per_s),
                "expected_deliveries_total": expected_total,
                "lost": lost,
                "duplicates_or_reordered": dups,
                "latency_ms": lat,
                "server_cpu_s": r3(server_cpu),
                "server_cpu_pct": r3(server_cpu / publish_secs * 100.0),
                "server_cpu_s_per_million_deliveries": r3(cpu_per_million),
                "server_rss_kib": s1.rss_kib,
                "wire_bytes": agg.wire_bytes,
                "decoded_bytes": agg.decoded_bytes,
                "wire_bytes_per_delivery": r3(per_delivery(agg.wire_bytes)),
                "decoded_bytes_per_delivery": r3(per_delivery(agg.decoded_bytes)),
                "redis_cpu_pct": redis_cpu.map(|c| r3(c / publish_secs * 100.0)),
                "redis_cpu_s_per_million_deliveries": redis_per_million,
                "loadgen_worker_cpu_pct": r3(lg_cpu / publish_secs * 100.0),
                "stream_failures": failure_delta(&prev, &agg),
                "slo_p99_ms": a.slo_p99_ms,
                "met_slo": met,
            }),
        )?;
        run.rep.say(&format!(
            "{rate:>8}/s: {:>10.0} deliv/s, lost {lost}, p50 {:.2} p99 {:.2} p999 {:.2} max {:.2} ms, server CPU {:.0}% ({:.2} s/M deliv), {:.0} B/deliv on the wire ({:.0} decoded), loadgen {:.0}% {}",
            deliveries_per_s,
            lat.p50_ms,
            lat.p99_ms,
            lat.p999_ms,
            lat.max_ms,
            server_cpu / publish_secs * 100.0,
            cpu_per_million,
            per_delivery(agg.wire_bytes),
            per_delivery(agg.decoded_bytes),
            lg_cpu / publish_secs * 100.0,
            if met { "ok" } else { "MISSED" }
        ));
        prev = agg;
        if met {
            best = Some(best.map_or(rate, |b: f64| b.max(rate)));
            misses = 0;
        } else {
            misses += 1;
            if misses >= a.stop_after_misses {
                run.rep.say("stopping: objective missed on consecutive steps");
                break;
            }
        }
    }
    run.rep.emit(
        "summary",
        json!({
            "conns": o.open,
            "slo_p99_ms": a.slo_p99_ms,
            "best_rate_meeting_slo": best,
        }),
    )?;
    run.rep.say(&format!(
        "highest rate with p99 ≤ {} ms and zero loss: {}",
        a.slo_p99_ms,
        best.map_or("none".to_string(), |b| format!("{b}/s"))
    ));
    run.finish().await
}

fn prev_open(prev: &crate::protocol::Counters, opened: u64) -> u64 {
    if prev.open > 0 { prev.open } else { opened }
}
