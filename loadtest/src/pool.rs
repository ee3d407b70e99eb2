//! The parent's side of the worker processes: start them (this binary, `worker`
//! subcommand), send every one the same command, and gather their snapshots into one
//! `Counters`. Workers are killed on drop, by the PIDs this pool started.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use crate::protocol::{Command, Counters, WorkerSetup};
use crate::target::SubscribeSpec;
use crate::tracking::Expect;

/// A worker may hold at most this many sockets: the hard open-files limit here is 20,000 and
/// a worker needs a few descriptors of its own.
pub const MAX_PER_WORKER: u64 = 19_000;

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

pub struct Pool {
    workers: Vec<WorkerProc>,
}

/// Workers needed for `clients` streams when the user asked for `requested` (0 = automatic).
pub fn workers_for(clients: u64, requested: u64) -> Result<u64> {
    let needed = clients.div_ceil(MAX_PER_WORKER).max(1);
    if requested == 0 {
        return Ok(needed);
    }
    if requested < needed {
        bail!("{clients} clients need at least {needed} workers ({MAX_PER_WORKER} sockets each)");
    }
    Ok(requested)
}

impl Pool {
    pub async fn start(count: u64, subscribe: &SubscribeSpec) -> Result<Self> {
        raise_nofile_limit();
        let exe = std::env::current_exe().context("locating sse-loadtest")?;
        let mut workers = Vec::new();
        for index in 0..count {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let setup = WorkerSetup { index, workers: count, subscribe: subscribe.clone() };
            let mut line = serde_json::to_vec(&setup)?;
            line.push(b'\n');
            stdin.write_all(&line).await?;
            workers.push(WorkerProc { child, stdin, stdout: BufReader::new(stdout).lines() });
        }
        Ok(Self { workers })
    }

    pub async fn send(&mut self, cmd: &Command) -> Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        for w in &mut self.workers {
            w.stdin.write_all(&line).await.context("a worker process has exited")?;
        }
        Ok(())
    }

    /// Asks every worker for its counters and adds them up.
    pub async fn snapshot(&mut self, reset: bool, expect: Option<Expect>) -> Result<Counters> {
        self.send(&Command::Snapshot { reset, expect }).await?;
        let mut agg = Counters::default();
        for w in &mut self.workers {
            let line = w.stdout.next_line().await?.context("a worker process exited without answering")?;
            let snap: Counters = serde_json::from_str(&line).context("bad worker snapshot")?;
            agg.add(&snap);
        }
        Ok(agg)
    }

    /// Tells workers to close everything and waits for them to exit.
    pub async fn shutdown(mut self) -> Result<()> {
        self.send(&Command::Exit).await.ok();
        for w in &mut self.workers {
            let wait = tokio::time::timeout(std::time::Duration::from_secs(10), w.child.wait());
            if wait.await.is_err() {
                w.child.start_kill().ok();
            }
        }
        Ok(())
    }
}

/// Raises this process's soft open-files limit to the hard one; workers inherit it.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_clients_under_the_open_files_limit() {
        assert_eq!(workers_for(1, 0).unwrap(), 1);
        assert_eq!(workers_for(19_000, 0).unwrap(), 1);
        assert_eq!(workers_for(19_001, 0).unwrap(), 2);
        assert_eq!(workers_for(10_000, 3).unwrap(), 3);
        assert!(workers_for(40_000, 2).is_err());
    }
}
