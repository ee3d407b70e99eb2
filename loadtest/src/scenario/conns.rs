//! `conns`: open N idle streams at a given rate, hold them, and report the connect rate,
//! failures by kind and the server's resident memory per connection — at each checkpoint
//! (e.g. 10k and 19k) so one run gives the curve.
//!
//! RSS per connection is (RSS after − RSS before opening any) / open streams, after holding
//! them idle so lazily allocated buffers are counted. Kernel socket buffers are not in RSS;
//! the change in the kernel's TCP memory is reported beside it for both ends together.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{Run, cpu_secs, r3};
use crate::cli::Common;

#[derive(Debug, Clone, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Streams to open in total.
    #[arg(long, default_value_t = 10_000)]
    pub conns: u64,
    /// Also measure when this many are open (comma-separated, ascending).
    #[arg(long, value_delimiter = ',')]
    pub checkpoints: Vec<u64>,
    /// Hold the streams idle this long before measuring.
    #[arg(long, default_value_t = 10)]
    pub hold_secs: u64,
    /// Users the streams belong to (default: one user per stream).
    #[arg(long)]
    pub users: Option<u64>,
}

pub async fn run(a: ConnsArgs) -> Result<()> {
    let users = a.users.unwrap_or(a.conns);
    let mut run = Run::start(&a.common, "conns", a.conns, users, false).await?;
    let base = run.sample();
    let mut stops: Vec<u64> = a.checkpoints.iter().copied().filter(|&c| c > 0 && c < a.conns).collect();
    stops.push(a.conns);
    stops.dedup();
    let mut opened_so_far = 0;
    for stop in stops {
        if run.time_left().is_zero() {
            run.rep.say("time limit reached");
            break;
        }
        let o = run.open(opened_so_far, stop - opened_so_far, a.common.connect_rate, false).await?;
        let rate = (stop - opened_so_far) as f64 / o.secs;
        opened_so_far = stop;
        tokio::time::sleep(Duration::from_secs(a.hold_secs).min(run.time_left())).await;
        let check = run.pool.snapshot(false, None).await?;
        let s = run.sample();
        let per_conn_bytes = if check.open > 0 && run.server.is_known() {
            (s.rss_kib.saturating_sub(base.rss_kib) * 1024) as f64 / check.open as f64
        } else {
            0.0
        };
        let kernel_per_conn = if check.open > 0 {
            (s.tcp_kernel_kib.saturating_sub(base.tcp_kernel_kib) * 1024) as f64 / check.open as f64
        } else {
            0.0
        };
        run.rep.emit(
            "checkpoint",
            json!({
                "target_conns": stop,
                "open": check.open,
                "failed_in_batch": o.failed,
                "failures": o.failures,
                "connect_rate_per_s": r3(rate),
                "connect_ms": o.connect,
                "server_rss_kib_before": base.rss_kib,
                "server_rss_kib": s.rss_kib,
                "server_rss_bytes_per_conn": r3(per_conn_bytes),
                "kernel_tcp_bytes_per_conn_both_ends": r3(kernel_per_conn),
                "server_cpu_s": r3(cpu_secs(&base, &s)),
                "server_pids": s.pids,
                "server_open_files_limit": run.server.open_files_limit(),
                "hold_secs": a.hold_secs,
            }),
        )?;
        run.rep.say(&format!(
            "{} open ({} failed {}), {:.0} conn/s, connect p99 {:.1} ms, server RSS {} KiB → {:.0} B/conn",
            check.open, o.failed, o.failures, rate, o.connect.p99_ms, s.rss_kib, per_conn_bytes
        ));
    }
    run.finish().await
}
