//! What a node does at the edge of its resources: out of files, it keeps its log readable.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SECRET, free_port};

#[tokio::test(flavor = "multi_thread")]
async fn out_of_files_the_accept_failure_is_logged_once_a_second_with_a_count() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("sse-fanout-tests/limits-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let log = dir.join("stderr.log");
    // 64 files: a few dozen idle connections use up the rest, and every accept then fails.
    let mut node = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\"", env!("CARGO_BIN_EXE_sse-fanout")])
        .env_clear()
        .env("SSE_LISTEN", format!("127.0.0.1:{port}"))
        .env("SSE_JWT_SECRET", SECRET)
        .env("SSE_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start sse-fanout");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the node did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle connections that never send a request head hold a file each for the head timeout.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(socket);
        }
    }
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    let _ = node.kill();
    let _ = node.wait();
    let text = std::fs::read_to_string(&log).expect("read the log");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("accept failed")).collect();
    assert!(!lines.is_empty(), "the node never ran out of files; log:\n{text}");
    // The node retries every 100 ms: 30 failures in 3 s, logged in at most one line a second.
    assert!(lines.len() <= 5, "{} accept-failure lines in {watched:?}:\n{}", lines.len(), lines.join("\n"));
    assert!(lines.iter().skip(1).any(|l| l.contains("suppressed=") && !l.contains("suppressed=0")), "{lines:?}");
    drop(held);
}
