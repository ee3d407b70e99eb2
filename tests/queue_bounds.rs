//! What a stream may cost the node, and how every stream's end is counted: a client that stops
//! reading is cut off once its queue holds `SSE_QUEUE_MAX_BYTES`, on either serving path, and
//! the node's memory stays small; a stalled socket and a client that leaves are counted in
//! `sse_connections_closed_total` with their reasons, each stream once.

mod common;

use std::time::{Duration, Instant};

use common::{Node, SseClient, publish_api, subscribe, token};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A deadline, not a measurement: the replays here are megabytes, and an overloaded two-core
/// machine once took longer than 10 s for one.
const WAIT: Duration = Duration::from_secs(30);

/// A client that sends `request` and reads only until `connected`, then never again. Its
/// receive buffer is small, so what the node writes piles up on the node's side.
async fn non_reading_client(node: &Node, request: String) -> TcpStream {
    non_reading_client_with_wire(node, request).await.0
}

/// [`non_reading_client`], with what it read (the response up to `connected`, and whatever
/// came in the same reads after it).
async fn non_reading_client_with_wire(node: &Node, request: String) -> (TcpStream, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(([127, 0, 0, 1], node.port).into()).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut wire = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !wire.windows(16).any(|w| w == b"event: connected") {
        let mut buffer = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => wire.extend_from_slice(&buffer[..n]),
            other => panic!("no connected event ({other:?}): {}", String::from_utf8_lossy(&wire)),
        }
    }
    (stream, wire)
}

/// `GET /events` as the first request: served on the raw path.
fn raw_path_request(user: &str) -> String {
    format!("GET /events?access_token={} HTTP/1.1\r\nHost: test\r\n\r\n", token(user, &[], None))
}

/// `GET /events` after another request on the same connection: served by hyper.
fn hyper_path_request(user: &str) -> String {
    format!("GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n{}", raw_path_request(user))
}

async fn closed(node: &Node, reason: &str) -> f64 {
    node.metric("sse_connections_closed_total", &format!("reason=\"{reason}\"")).await
}

/// Waits until `sse_connections_closed_total{reason}` reaches `count`; panics after `WAIT`.
async fn wait_closed(node: &Node, reason: &str, count: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = closed(node, reason).await;
        if now == count {
            return;
        }
        assert!(Instant::now() < deadline, "{reason}: {now} closes counted, expected {count}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process's resident memory now and at its peak, in bytes (`VmRSS`, `VmHWM`).
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).expect("field");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("kB value");
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Publishes `count` live events of about `size` bytes to `users`, letting `reader` (one of
/// them) keep up: a reader on a busy machine must not be taken for a slow consumer itself.
async fn publish_large(node: &Node, users: &[&str], count: usize, size: usize, reader: &mut SseClient) {
    let data = "d".repeat(size);
    for seq in 0..count {
        let body = json!({"users": users, "data": format!("{seq}:{data}"), "durable": false});
        assert_eq!(publish_api(node, body).await.0, 202);
        let event =
            reader.next_event(WAIT).await.unwrap_or_else(|gap| panic!("the reader missed event {seq}: {gap:?}"));
        assert!(event.data.starts_with(&format!("{seq}:")), "event {seq} out of order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_at_its_byte_bound_and_the_node_stays_small() {
    let node = Node::start(&[("SSE_QUEUE_MAX_BYTES", "256KiB")]).await;
    let sleeper = non_reading_client(&node, raw_path_request("sleeper")).await;
    let mut reader = subscribe(&node, "reader", &[]).await;
    let (before, _) = rss(node.pid());
    // 800 events of 200 KB: 160 MB that a queue bounded in frames only (1024) would hold.
    let (events, size) = (800, 200_000);
    publish_large(&node, &["sleeper", "reader"], events, size, &mut reader).await;
    let (after, peak) = rss(node.pid());
    eprintln!("node RSS: {} MB before, {} MB after, {} MB at its peak", before >> 20, after >> 20, peak >> 20);
    assert!(peak < before + (64 << 20), "the node's peak RSS grew from {before} to {peak} bytes");
    // Cut as soon as its queue held two of them, long before its socket's write stall.
    assert_eq!(closed(&node, "slow_consumer").await, 1.0);
    assert_eq!(closed(&node, "write_stalled").await, 0.0);
    // The cut shut the socket down: the node lets go of the stream at once, not after the
    // socket's write stall timeout (30 s), and the client reads what its buffers held, then the end.
    let deadline = Instant::now() + WAIT;
    while node.metric("sse_active_connections", "").await != 1.0 {
        assert!(Instant::now() < deadline, "the node still holds the cut stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sleeper = sleeper;
    let mut sink = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sleeper.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the node kept the cut client's connection open"),
        }
    }
    // The other stream still gets every event.
    assert_eq!(publish_api(&node, json!({"users": ["reader"], "data": "after", "durable": false})).await.0, 202);
    assert_eq!(reader.next_event(WAIT).await.expect("still open").data, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_served_by_hyper_is_bounded_in_bytes_too() {
    let node = Node::start(&[("SSE_QUEUE_MAX_BYTES", "256KiB")]).await;
    let _sleeper = non_reading_client(&node, hyper_path_request("sleeper")).await;
    let mut reader = subscribe(&node, "reader", &[]).await;
    // Hyper buffers some of the body itself; the queue takes the rest up to its bound.
    publish_large(&node, &["sleeper", "reader"], 100, 200_000, &mut reader).await;
    wait_closed(&node, "slow_consumer", 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_stall_ends_the_stream_on_either_path_and_is_counted_once_as_write_stalled() {
    let node = Node::start(&[("SSE_WRITE_STALL_TIMEOUT", "1s"), ("SSE_QUEUE_MAX_BYTES", "64MiB")]).await;
    let raw = non_reading_client(&node, raw_path_request("sleeper")).await;
    let hyper = non_reading_client(&node, hyper_path_request("sleeper")).await;
    let mut reader = subscribe(&node, "reader", &[]).await;
    // 8 MB: more than the kernel's socket buffers hold (its send buffer grows to 4 MB at most),
    // well within the queue's bound: nothing is cut, the sockets just take nothing more.
    publish_large(&node, &["sleeper", "reader"], 40, 200_000, &mut reader).await;
    wait_closed(&node, "write_stalled", 2.0).await;
    // The node let go of both; the clients leaving afterwards is not a second close.
    drop((raw, hyper));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(closed(&node, "client_closed").await, 0.0);
    assert_eq!(closed(&node, "slow_consumer").await, 0.0);
    assert_eq!(closed(&node, "write_stalled").await, 2.0);
    assert_eq!(node.metric("sse_active_connections", "").await, 1.0, "the reader is left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_is_counted_as_client_closed_on_either_path() {
    let node = Node::start(&[]).await;
    let raw = non_reading_client(&node, raw_path_request("leaver")).await;
    let hyper = non_reading_client(&node, hyper_path_request("leaver")).await;
    let reader = subscribe(&node, "leaver", &[]).await;
    drop(raw);
    wait_closed(&node, "client_closed", 1.0).await;
    drop(hyper);
    wait_closed(&node, "client_closed", 2.0).await;
    drop(reader);
    wait_closed(&node, "client_closed", 3.0).await;
    assert_eq!(node.metric("sse_active_connections", "").await, 0.0);
}

/// `GET /events` with `Last-Event-ID` after another request on the same connection: served by hyper.
fn hyper_path_resume(user: &str, last_event_id: &str) -> String {
    format!(
        "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\nGET /events?access_token={} HTTP/1.1\r\nHost: test\r\nLast-Event-ID: {last_event_id}\r\n\r\n",
        token(user, &[], None)
    )
}

/// Reads from `client` into `wire` until `done(wire)`; panics after `WAIT` or at the end.
async fn read_until(client: &mut TcpStream, wire: &mut Vec<u8>, what: &str, done: impl Fn(&[u8]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buffer = vec![0u8; 1 << 16];
    while !done(wire) {
        match tokio::time::timeout_at(deadline, client.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => wire.extend_from_slice(&buffer[..n]),
            other => panic!("no {what} ({other:?}) after {} bytes", wire.len()),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Publishes a live event to `user`, then one to the reader, and waits for the reader's: the
/// dispatcher delivers in bus order, so the first one was pushed to `user`'s stream by then.
async fn push_to(node: &Node, user: &str, data: &str, reader: &mut SseClient) {
    assert_eq!(publish_api(node, json!({"users": [user], "data": data, "durable": false})).await.0, 202);
    let mark = format!("after {}", &data[..data.len().min(20)]);
    assert_eq!(publish_api(node, json!({"users": ["reader"], "data": mark, "durable": false})).await.0, 202);
    assert_eq!(reader.next_event(WAIT).await.expect("the reader's mark").data, mark);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_hyper_path_a_queue_at_its_capacity_is_kept_one_more_frame_cuts_it_and_no_farewell_is_written() {
    const CAPACITY: usize = 16;
    let node = Node::start(&[
        ("SSE_QUEUE_CAPACITY", "16"),
        // The frame bound is the one under test.
        ("SSE_QUEUE_MAX_BYTES", "64MiB"),
        // No ping may join the queue behind the test's back.
        ("SSE_HEARTBEAT_INTERVAL", "0"),
        ("SSE_MAX_PUBLISH_BYTES", "16777216"),
    ])
    .await;
    let mut sleeper = non_reading_client(&node, hyper_path_request("sleeper")).await;
    let mut reader = subscribe(&node, "reader", &[]).await;
    // One event of 8 MiB, more than the socket's buffers (its send buffer grows to 4 MiB at
    // most) and hyper's own (about 400 KB) hold: hyper takes it from the queue whole, and,
    // unable to write the rest, takes nothing more. From then on, the queue holds exactly what
    // is pushed to it.
    let big = "B".repeat(8 << 20);
    push_to(&node, "sleeper", &big, &mut reader).await;
    let mut wire = Vec::new();
    read_until(&mut sleeper, &mut wire, "the big event's start", |w| find(w, b"data: BBBB").is_some()).await;

    for i in 0..CAPACITY {
        push_to(&node, "sleeper", &format!("queued {i}"), &mut reader).await;
    }
    assert_eq!(closed(&node, "slow_consumer").await, 0.0, "cut with {CAPACITY} frames queued, its capacity");
    assert_eq!(node.metric("sse_active_connections", "").await, 2.0);
    push_to(&node, "sleeper", "one too many", &mut reader).await;
    wait_closed(&node, "slow_consumer", 1.0).await;

    // The client reads on: the rest of the big event, then the body's end. What waited in the
    // queue was dropped, and no farewell was written.
    read_until(&mut sleeper, &mut wire, "end of the body", |w| w.ends_with(b"\r\n0\r\n\r\n")).await;
    let first_b = find(&wire, b"data: B").expect("the big event") + b"data: ".len();
    let end = first_b + big.len();
    assert!(wire[first_b..end].iter().all(|&b| b == b'B'), "the big event whole");
    assert_eq!(
        String::from_utf8_lossy(&wire[end..]),
        "\n\n\r\n0\r\n\r\n",
        "after the big event, only the end of the body"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_hyper_path_a_replay_larger_than_the_queue_is_not_cut() {
    let node = Node::start(&[
        ("SSE_QUEUE_CAPACITY", "16"),
        ("SSE_QUEUE_MAX_BYTES", "64KiB"),
        ("SSE_HEARTBEAT_INTERVAL", "0"),
        // The whole replay in one page: it is in the queue at once.
        ("SSE_HISTORY_PAGE_BYTES", "16777216"),
        ("SSE_HISTORY_USER_LENGTH", "1000"),
    ])
    .await;
    let mut reader = subscribe(&node, "reader", &[]).await;
    let url = common::stream_url(&node, "returner", &[]);
    let (stream, cursor) = common::open_resumable(&url, None).await;
    drop(stream);
    // 200 events of 40 KB: 8 MB, more than the socket's buffers (4 MiB at most) and hyper's
    // (about 400 KB) take, so most of the replay waits in the queue: far over its 16 frames
    // and 64 KiB.
    let padding = "p".repeat(40_000);
    for i in 0..200 {
        let body = json!({"users": ["returner"], "data": format!("r{i}-{padding}")});
        assert_eq!(publish_api(&node, body).await.0, 202);
    }
    // The client does not read while the replay waits in the queue, and a live event joins it.
    let (mut returner, mut wire) = non_reading_client_with_wire(&node, hyper_path_resume("returner", &cursor)).await;
    push_to(&node, "returner", "live", &mut reader).await;
    assert_eq!(closed(&node, "slow_consumer").await, 0.0, "the replay was cut by the queue's bounds");
    read_until(&mut returner, &mut wire, "the live event", |w| find(w, b"data: live").is_some()).await;
    let mut at = 0;
    for i in 0..200 {
        let marker = format!("data: r{i}-");
        at += find(&wire[at..], marker.as_bytes()).unwrap_or_else(|| {
            panic!(
                "replayed event {i} missing or out of order: {}",
                String::from_utf8_lossy(&wire[..wire.len().min(3000)])
            )
        });
    }
    assert!(find(&wire[at..], b"data: live").is_some(), "the live event after the replay");
    assert_eq!(closed(&node, "slow_consumer").await, 0.0);
}

#[test]
fn a_queue_byte_bound_that_is_not_bytes_kib_or_mib_is_refused_at_startup() {
    for (value, accepted) in [("1MB", false), ("1.5MiB", false), ("lots", false), ("100", false), ("64KiB", true)] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_QUEUE_MAX_BYTES", value)
            // An address of no host here: the node fails only after its settings were accepted.
            .env("SSE_LISTEN", "192.0.2.1:1")
            .output()
            .expect("run sse-fanout");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if accepted {
            assert!(
                !stderr.contains("SSE_QUEUE_MAX_BYTES") && !stderr.contains("queue-max-bytes"),
                "{value}: {stderr}"
            );
        } else {
            assert_eq!(output.status.code(), Some(2), "{value}: a bad setting is a usage error: {stderr}");
            assert!(stderr.contains("queue-max-bytes"), "{value}: the error names the setting: {stderr}");
        }
    }
}
