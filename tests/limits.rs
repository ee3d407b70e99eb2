//! What a node does at the edge of its resources: out of files, it keeps its log readable, and
//! slow clients that never finish a request cannot take the files established streams and new
//! clients need (SSE_MAX_PENDING_CONNECTIONS).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{SECRET, SseClient, listen_address, scratch_dir, token};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// A node whose process may open only `files` files, stopped by PID on drop.
struct LimitedNode {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl LimitedNode {
    async fn start(files: u32, env: &[(&str, &str)]) -> Self {
        let log = scratch_dir("limits").join("stderr.log");
        let child = Command::new("sh")
            .args(["-c", &format!("ulimit -n {files} && exec \"$0\""), env!("CARGO_BIN_EXE_sse-fanout")])
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .env("SSE_JWT_SECRET", SECRET)
            // Warnings, and the line naming the port the node bound.
            .env("SSE_LOG_LEVEL", "warn,sse_fanout::server=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start sse-fanout");
        // Built first, so that the process is stopped if it never says where it listens.
        let mut node = Self { port: 0, child, log };
        node.port = listen_address(&mut node.child, &node.log, Duration::from_secs(20)).await.port();
        node
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter of `sse_connections_rejected_total` by reason.
    async fn rejected(&self, reason: &str) -> f64 {
        let text = common::http().get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        let prefix = format!("sse_connections_rejected_total{{reason=\"{reason}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).unwrap_or(0.0)
    }

    /// Stops the process and returns its log.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }
}

impl Drop for LimitedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stream opened by a new client, `connected` read, within `within` (a failure shows the log).
async fn new_stream_within(url: &str, within: Duration, log: impl Fn() -> String) -> SseClient {
    let mut stream = tokio::time::timeout(within, SseClient::open(url, &[]))
        .await
        .unwrap_or_else(|_| panic!("a new client could not open a stream in {within:?}:\n{}", log()));
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    stream.connected().await;
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_files_the_accept_failure_is_logged_once_a_second_with_a_count() {
    // 64 files: a few dozen idle connections use up the rest, and every accept then fails. No
    // bound on pending connections, so that they do (the bound is tested below).
    let node = LimitedNode::start(64, &[("SSE_MAX_PENDING_CONNECTIONS", "0")]).await;
    // Idle connections that never send a request head hold a file each for the request timeout.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(socket) = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await {
            held.push(socket);
        }
    }
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    let text = node.stop();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("accept failed")).collect();
    assert!(!lines.is_empty(), "the node never ran out of files; log:\n{text}");
    // The node retries every 100 ms: 30 failures in 3 s, logged in at most one line a second.
    assert!(lines.len() <= 5, "{} accept-failure lines in {watched:?}:\n{}", lines.len(), lines.join("\n"));
    assert!(lines.iter().skip(1).any(|l| l.contains("suppressed=") && !l.contains("suppressed=0")), "{lines:?}");
    drop(held);
}

/// 300 clients that start a request and never finish it, against a node with 256 files and a
/// request timeout (a minute) that will not come to the rescue: a stream opened before them
/// keeps receiving, and a client arriving after them gets its stream and its events.
async fn slow_clients_do_not_keep_a_good_one_out(max_pending: &str) -> LimitedNode {
    let node =
        LimitedNode::start(256, &[("SSE_MAX_PENDING_CONNECTIONS", max_pending), ("SSE_REQUEST_TIMEOUT", "60s")]).await;
    let stream_url = |user: &str| node.url(&format!("/events?access_token={}", token(user, &[], None)));
    let mut before = SseClient::open(&stream_url("before"), &[]).await;
    assert_eq!(before.status, 200, "{:?}", before.body);
    before.connected().await;

    let mut slow = Vec::new();
    for _ in 0..300 {
        if let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await {
            let _ = socket.write_all(b"GET /events?access_token=").await;
            slow.push(socket);
        }
    }
    // The new client waits behind them in the accept queue, while the node drops a bound's worth
    // of the slow ones every second (or one per failed accept, out of files).
    let within = Duration::from_secs(30);
    let mut after = new_stream_within(&stream_url("after"), within, || node.log_text()).await;
    let publish = common::http()
        .post(node.url("/api/publish"))
        .bearer_auth(token("producer", &[], Some("publisher")))
        .json(&json!({"broadcast": true, "data": "still here"}))
        .send()
        .await
        .expect("a publisher gets in too");
    assert_eq!(publish.status(), 202);
    for stream in [&mut before, &mut after] {
        let event = stream.next_event(Duration::from_secs(10)).await.expect("the broadcast");
        assert_eq!(event.data, "still here");
    }
    drop(slow);
    node
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_bound_keeps_slow_clients_from_taking_every_file() {
    let node = slow_clients_do_not_keep_a_good_one_out("64").await;
    // The slow clients made room for the good ones, a bound's worth at a time.
    assert!(node.rejected("pending_evicted").await >= 1.0);
    assert!(!node.stop().contains("accept failed"), "the files ran out all the same");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_files_the_oldest_pending_connection_makes_room() {
    // A bound above the files: the slow clients do exhaust them, and the accept loop then drops
    // the oldest pending connection for each new one.
    let node = slow_clients_do_not_keep_a_good_one_out("1000").await;
    assert!(node.rejected("pending_evicted").await >= 1.0);
    assert!(node.stop().contains("accept failed"), "the files were never exhausted");
}

/// The scenario: a node limited to 1,024 files, and more clients than that, each with a
/// publisher's token, sending a publish body a byte at a time, against a request timeout (a
/// minute) that will not come to the rescue. A valid token does not take a connection out of the
/// pending bound (default: a quarter of the files) until its request is complete, so the slow
/// bodies never hold more than the bound: a new client opens its stream and publishes, and an
/// established stream keeps receiving.
#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_beyond_the_pending_bound_do_not_keep_a_new_client_out() {
    let node = LimitedNode::start(1024, &[("SSE_REQUEST_TIMEOUT", "60s")]).await;
    let stream_url = |user: &str| node.url(&format!("/events?access_token={}", token(user, &[], None)));
    let mut before = SseClient::open(&stream_url("before"), &[]).await;
    assert_eq!(before.status, 200, "{:?}", before.body);
    before.connected().await;

    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        token("slow", &[], Some("publisher"))
    );
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..1100 {
        let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await else { continue };
        if socket.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        // A byte every two seconds: the body is never done and the client never idle for long.
        slow.spawn(async move {
            while socket.write_all(b" ").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
    assert!(slow.len() > 1024, "only {} slow clients connected", slow.len());

    let within = Duration::from_secs(30);
    let mut after = new_stream_within(&stream_url("after"), within, || node.log_text()).await;
    let publish = tokio::time::timeout(
        within,
        common::http()
            .post(node.url("/api/publish"))
            .bearer_auth(token("producer", &[], Some("publisher")))
            .json(&json!({"broadcast": true, "data": "still here"}))
            .send(),
    )
    .await
    .expect("a publisher gets in too")
    .expect("publish");
    assert_eq!(publish.status(), 202);
    for stream in [&mut before, &mut after] {
        let event = stream.next_event(Duration::from_secs(10)).await.expect("the broadcast");
        assert_eq!(event.data, "still here");
    }
    assert!(node.rejected("pending_evicted").await >= 1.0);
    slow.abort_all();
    assert!(!node.stop().contains("accept failed"), "the files ran out all the same");
}
