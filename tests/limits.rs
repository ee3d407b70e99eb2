//! What a node does at the edge of its resources: out of files, it keeps its log readable.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{SECRET, listen_address, scratch_dir};

#[tokio::test(flavor = "multi_thread")]
async fn out_of_files_the_accept_failure_is_logged_once_a_second_with_a_count() {
    let dir = scratch_dir("limits");
    let log = dir.join("stderr.log");
    // 64 files: a few dozen idle connections use up the rest, and every accept then fails.
    let node = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\"", env!("CARGO_BIN_EXE_sse-fanout")])
        .env_clear()
        .env("SSE_LISTEN", "127.0.0.1:0")
        .env("SSE_JWT_SECRET", SECRET)
        // Warnings, and the line naming the port the node bound.
        .env("SSE_LOG_LEVEL", "warn,sse_fanout::server=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start sse-fanout");
    let mut node = KillOnDrop(node);
    let port = listen_address(&mut node.0, &log, Duration::from_secs(20)).await.port();
    // Idle connections that never send a request head hold a file each for the head timeout.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(socket);
        }
    }
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    drop(node);
    let text = std::fs::read_to_string(&log).expect("read the log");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("accept failed")).collect();
    assert!(!lines.is_empty(), "the node never ran out of files; log:\n{text}");
    // The node retries every 100 ms: 30 failures in 3 s, logged in at most one line a second.
    assert!(lines.len() <= 5, "{} accept-failure lines in {watched:?}:\n{}", lines.len(), lines.join("\n"));
    assert!(lines.iter().skip(1).any(|l| l.contains("suppressed=") && !l.contains("suppressed=0")), "{lines:?}");
    drop(held);
}

/// Stops the node by PID however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
