//! A worker process: holds its share of the client streams on one thread and answers the
//! parent's commands (see `protocol`). The parent spreads clients over several workers
//! because one process may not have more than 20,000 open files here.
//!
//! Everything runs on a current-thread runtime with a `LocalSet`, so clients share counters
//! through `Rc<RefCell<..>>` with no atomics or locks on the per-event path.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::{AbortHandle, LocalSet, spawn_local};
use tokio::time::Instant;

use crate::client::{self, Role, Shared};
use crate::payload::now_nanos;
use crate::protocol::{Command, WorkerSetup};
use crate::server_stats;
use crate::tracking::{Expect, Track, verify};

/// Entry point of `sse-loadtest worker`: reads the setup line, then commands, from stdin.
pub fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("building worker runtime")?;
    let local = LocalSet::new();
    local.block_on(&rt, run())
}

/// Held clients' tasks, by global client number, so a storm can abort and reopen them.
type Held = Rc<RefCell<Vec<(u64, AbortHandle)>>>;

async fn run() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines.next_line().await?.context("parent closed stdin before the setup line")?;
    let setup: WorkerSetup = serde_json::from_str(&first).context("bad setup line")?;
    let shared = Rc::new(Shared::new(setup.subscribe.clone(), setup.workers));
    let poller = spawn_local({
        let shared = shared.clone();
        async move { shared.awake.run(Duration::from_millis(shared.spec.stay_awake_ms)).await }
    });
    let held: Held = Rc::default();
    // Openers run as tasks so that snapshots are answered while clients are being opened.
    let mut openers: Vec<AbortHandle> = Vec::new();
    let mut out = tokio::io::stdout();

    while let Some(line) = lines.next_line().await? {
        let cmd: Command = serde_json::from_str(&line).context("bad command line")?;
        match cmd {
            Command::Open { first, count, rate, retry } => {
                let mine: Vec<u64> = (first..first + count).filter(|&c| setup.owns(c)).collect();
                if let Some(&last) = mine.last() {
                    let need = shared.local_index(last) + 1;
                    let mut tracks = shared.tracks.borrow_mut();
                    if tracks.len() < need {
                        tracks.resize_with(need, Track::new);
                    }
                }
                let (shared, held) = (shared.clone(), held.clone());
                let rate = rate / setup.workers as f64;
                openers.push(
                    spawn_local(paced(rate, mine, move |c| {
                        let task = spawn_local(client::run(shared.clone(), c, Role::Held { retry }));
                        held.borrow_mut().push((c, task.abort_handle()));
                    }))
                    .abort_handle(),
                );
            }
            Command::Churn { first, rate, lifetime_ms, for_ms } => {
                let count = (rate * for_ms as f64 / 1000.0).ceil() as u64;
                let mine: Vec<u64> = (first..first + count).filter(|&c| setup.owns(c)).collect();
                let shared = shared.clone();
                let lifetime = Duration::from_millis(lifetime_ms);
                let rate = rate / setup.workers as f64;
                openers.push(
                    spawn_local(paced(rate, mine, move |c| {
                        spawn_local(client::run(shared.clone(), c, Role::Churn { lifetime }));
                    }))
                    .abort_handle(),
                );
            }
            Command::WatchLosses => start_storm(&shared, 0, true),
            Command::DropAll { reconnect } => {
                let old: Vec<(u64, AbortHandle)> = held.borrow_mut().drain(..).collect();
                start_storm(&shared, old.len() as u64, false);
                for (_, task) in &old {
                    task.abort();
                }
                // Let the aborted tasks drop their sockets before new ones are opened, so the
                // server sees every old stream close first.
                tokio::task::yield_now().await;
                if reconnect {
                    {
                        let mut tracks = shared.tracks.borrow_mut();
                        for (c, _) in &old {
                            if let Some(t) = tracks.get_mut(shared.local_index(*c)) {
                                t.awaiting_back = true;
                            }
                        }
                    }
                    let mut held = held.borrow_mut();
                    for (c, _) in old {
                        let task = spawn_local(client::run(shared.clone(), c, Role::Held { retry: true }));
                        held.push((c, task.abort_handle()));
                    }
                }
            }
            Command::Snapshot { reset, expect } => {
                let line = snapshot(&shared, &setup, &held, reset, expect.as_ref())?;
                out.write_all(&line).await?;
                out.flush().await?;
            }
            Command::Exit => break,
        }
    }
    poller.abort();
    for task in openers {
        task.abort();
    }
    for (_, task) in held.borrow_mut().drain(..) {
        task.abort();
    }
    Ok(())
}

/// Starts counting a storm's returns: `streams_lost` so far, none back; with `watch`, every
/// held stream that ends from now on is lost too.
fn start_storm(shared: &Shared, streams_lost: u64, watch: bool) {
    shared.watching_losses.set(watch);
    let mut c = shared.counters.borrow_mut();
    c.streams_lost = streams_lost;
    c.back = 0;
    c.reconnect.reset();
    shared.dropped_at.set(Some(now_nanos()));
}

/// Calls `start` for each client in `clients`, `rate` per second, in small bursts so a high
/// rate does not need a timer wake-up per client.
async fn paced(rate: f64, clients: Vec<u64>, mut start: impl FnMut(u64)) {
    let begin = Instant::now();
    let rate = rate.max(0.001);
    let mut started = 0usize;
    while started < clients.len() {
        let due = ((begin.elapsed().as_secs_f64() * rate) as usize + 1).min(clients.len());
        while started < due {
            start(clients[started]);
            started += 1;
        }
        if started < clients.len() {
            let next_at = begin + Duration::from_secs_f64(started as f64 / rate);
            tokio::time::sleep_until(next_at.max(Instant::now() + Duration::from_millis(1))).await;
        }
    }
}

/// This worker's counters as one JSON line; `reset` then starts a new interval.
fn snapshot(
    shared: &Shared,
    setup: &WorkerSetup,
    held: &Held,
    reset: bool,
    expect: Option<&Expect>,
) -> Result<Vec<u8>> {
    let verdict = expect.map(|e| {
        let tracks = shared.tracks.borrow();
        let held = held.borrow();
        verify(
            held.iter().filter_map(|(c, _)| {
                let t = tracks.get(shared.local_index(*c))?;
                Some((setup.subscribe.user_of(*c), t))
            }),
            e,
        )
    });
    let mut c = shared.counters.borrow_mut();
    c.verdict = verdict;
    c.cpu_ticks = server_stats::cpu_ticks(std::process::id()).unwrap_or(0);
    let mut line = serde_json::to_vec(&*c)?;
    line.push(b'\n');
    c.verdict = None;
    if reset {
        c.received = 0;
        c.wire_bytes = 0;
        c.decoded_bytes = 0;
        c.latency.reset();
        c.connect.reset();
    }
    Ok(line)
}
