//! Keeps a worker process polling its sockets, instead of sleeping in `epoll_wait`, while
//! events stream in.
//!
//! On loopback, unless receive processing is steered to another core, the kernel runs a
//! receiver's wake-up inside the sender's system call: each event that finds the worker asleep
//! costs the server under test an inter-processor interrupt (a VM exit on this machine). A
//! worker that stays awake through a burst is never woken. Off by default (`--stay-awake-ms`);
//! `docs/benchmarks.md` has both measured.

use std::cell::Cell;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Counts reads and wakes the poller when the first read after a quiet spell arrives.
#[derive(Default)]
pub struct Awake {
    reads: Cell<u64>,
    asleep: Cell<bool>,
    wake: Notify,
}

impl Awake {
    /// Called by every client after a read that returned data.
    pub fn on_read(&self) {
        self.reads.set(self.reads.get().wrapping_add(1));
        if self.asleep.replace(false) {
            self.wake.notify_one();
        }
    }

    /// Runs for the worker's life: after each read, yields to the runtime (which then polls
    /// epoll with a zero timeout) until `window` has passed without one. A zero `window`
    /// returns at once, and the worker sleeps whenever nothing is ready.
    pub async fn run(&self, window: Duration) {
        if window.is_zero() {
            return;
        }
        loop {
            self.asleep.set(true);
            self.wake.notified().await;
            let mut seen = self.reads.get();
            let mut last_read = Instant::now();
            loop {
                tokio::task::yield_now().await;
                let reads = self.reads.get();
                if reads != seen {
                    seen = reads;
                    last_read = Instant::now();
                } else if last_read.elapsed() >= window {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn polls_while_reads_arrive_and_sleeps_after_the_window() {
        let awake = std::rc::Rc::new(Awake::default());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let poller = tokio::task::spawn_local({
                    let awake = awake.clone();
                    async move { awake.run(Duration::from_millis(300)).await }
                });
                tokio::task::yield_now().await;
                assert!(awake.asleep.get(), "no read yet: the poller sleeps");
                awake.on_read();
                assert!(!awake.asleep.get());
                // Reads keep it awake past the window...
                for _ in 0..8 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    awake.on_read();
                    assert!(!awake.asleep.get());
                }
                // ...and a quiet window puts it back to sleep.
                tokio::time::sleep(Duration::from_millis(900)).await;
                assert!(awake.asleep.get());
                poller.abort();
            })
            .await;
    }
}
