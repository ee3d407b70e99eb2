//! One hostile client address cannot move the others' delivery. While 127.0.0.2 holds slow
//! request heads and slow publish bodies, opens streams with forged cursors over and over and
//! leaves streams unread under large messages, the well-behaved streams on 127.0.0.1 get every
//! event, in order, about as fast as before the flood; a newcomer is served and the node stays
//! ready.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Node, SseClient, http, publish_api, subscribe, token};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const GOOD_STREAMS: usize = 20;
const TICK: Duration = Duration::from_millis(50);
const CALM: Duration = Duration::from_secs(3);
const FLOOD: Duration = Duration::from_secs(6);
/// How much the flood may add to the good streams' 99th-percentile delivery latency: generous,
/// as the test's own hostile tasks share the machine's two cores with the node.
const P99_ALLOWANCE: Duration = Duration::from_millis(300);
const WORST_BOUND: Duration = Duration::from_secs(2);
const NON_READERS: usize = 20;

fn micros_now() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    u64::try_from(since.as_micros()).expect("micros fit u64")
}

/// A connection from the hostile address (any 127/8 address is this machine's loopback).
async fn connect_hostile(node: &Node) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).ok()?;
    // Small buffers, so what the node writes to a stream that is not read piles up on its side.
    socket.set_recv_buffer_size(4096).ok()?;
    socket.connect(SocketAddr::from(([127, 0, 0, 1], node.port))).await.ok()
}

/// Sends `prefix` at once and then `trickle` one byte every 500 ms until the node closes the
/// connection or the flood ends; then does it again on a new connection.
async fn trickler(node: Arc<Node>, prefix: String, trickle: Vec<u8>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(mut connection) = connect_hostile(&node).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if connection.write_all(prefix.as_bytes()).await.is_err() {
            continue;
        }
        for byte in trickle.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            if connection.write_all(&[*byte]).await.is_err() {
                break;
            }
        }
    }
}

/// Opens streams with cursors the node never issued, reads the first bytes and leaves, again
/// and again. The node answers each with a reset (or refuses the address's rate), reading no history.
async fn cursor_forger(node: Arc<Node>, stop: Arc<AtomicBool>) -> u64 {
    let mut opened = 0;
    let mut attempt = 0u64;
    while !stop.load(Ordering::Relaxed) {
        attempt += 1;
        let Some(mut connection) = connect_hostile(&node).await else { continue };
        let request = format!(
            "GET /events?access_token={}&topic=big HTTP/1.1\r\nHost: flood\r\nLast-Event-ID: v1.{attempt:x}.forged.0-0\r\n\r\n",
            token("forger", &["big"], None)
        );
        if connection.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut head = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), connection.read(&mut head)).await
            && head[..n].starts_with(b"HTTP/1.1 200")
        {
            opened += 1;
        }
    }
    opened
}

/// A stream on topic `big` that reads its `connected` event and then nothing.
async fn non_reader(node: &Node, index: usize) -> TcpStream {
    let mut connection = connect_hostile(node).await.expect("connect from 127.0.0.2");
    let request = format!(
        "GET /events?access_token={}&topic=big HTTP/1.1\r\nHost: flood\r\n\r\n",
        token(&format!("sleeper-{index}"), &["big"], None)
    );
    connection.write_all(request.as_bytes()).await.expect("request");
    let mut wire = Vec::new();
    while !wire.windows(16).any(|w| w == b"event: connected") {
        let mut buffer = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), connection.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => wire.extend_from_slice(&buffer[..n]),
            other => panic!("no connected event ({other:?}): {}", String::from_utf8_lossy(&wire)),
        }
    }
    connection
}

/// Reads `client`'s events until `end`, returning each tick's latency (now minus the micros
/// it carries) with its phase; a missing or reordered tick fails the test.
async fn good_reader(mut client: SseClient, name: String) -> Vec<(bool, u64)> {
    let mut latencies = Vec::new();
    let mut expected = 0u64;
    loop {
        let event = client
            .next_event(Duration::from_secs(10))
            .await
            .unwrap_or_else(|why| panic!("{name}: tick {expected} did not arrive: {why:?}"));
        if event.data == "end" {
            return latencies;
        }
        let mut fields = event.data.split(':');
        let (Some(phase), Some(seq), Some(sent)) = (fields.next(), fields.next(), fields.next()) else {
            panic!("{name}: unexpected event {event:?}");
        };
        let seq: u64 = seq.parse().expect("seq");
        assert_eq!(seq, expected, "{name}: ticks out of order or missing");
        expected += 1;
        let sent: u64 = sent.parse().expect("micros");
        latencies.push((phase == "flood", micros_now().saturating_sub(sent)));
    }
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(sorted[index])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_does_not_move_the_other_clients_delivery() {
    let node = Arc::new(
        Node::start(&[
            ("SSE_REQUEST_TIMEOUT", "2s"),
            ("SSE_QUEUE_MAX_BYTES", "256KiB"),
            ("SSE_MAX_CONNECTIONS_PER_USER", "0"),
        ])
        .await,
    );
    let users: Vec<String> = (0..GOOD_STREAMS).map(|i| format!("good-{i}")).collect();
    let mut readers = JoinSet::new();
    for user in &users {
        let client = subscribe(&node, user, &[]).await;
        readers.spawn(good_reader(client, user.clone()));
    }

    // The ticker: one event to every good stream per tick, stamped with when it was sent.
    let ticking = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (node, users, ticking, flooding) = (node.clone(), users.clone(), ticking.clone(), flooding.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !ticking.load(Ordering::Relaxed) {
                let phase = if flooding.load(Ordering::Relaxed) { "flood" } else { "calm" };
                let data = format!("{phase}:{seq}:{}", micros_now());
                let (status, body) = publish_api(&node, json!({"users": users, "data": data, "durable": false})).await;
                assert_eq!(status, 202, "tick {seq}: {body}");
                seq += 1;
                tokio::time::sleep(TICK).await;
            }
            assert_eq!(publish_api(&node, json!({"users": users, "data": "end", "durable": false})).await.0, 202);
            seq
        })
    };
    tokio::time::sleep(CALM).await;

    // The flood, all from 127.0.0.2. The non-reading streams first, before the forgers spend
    // the address's stream-open allowance (SSE_IP_OPEN_BURST).
    let mut sleepers = Vec::new();
    for index in 0..NON_READERS {
        sleepers.push(non_reader(&node, index).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut hostile = JoinSet::new();
    let stream_head = format!("GET /events?access_token={} HTTP/1.1\r\n", token("slow-head", &[], None));
    for _ in 0..200 {
        hostile.spawn(trickler(node.clone(), stream_head.clone(), b"X-Slow: 1\r\n".to_vec(), stop.clone()));
    }
    let publish_head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: flood\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n",
        token("slow-producer", &[], Some("publisher"))
    );
    for _ in 0..200 {
        hostile.spawn(trickler(
            node.clone(),
            publish_head.clone(),
            b"{\"users\":[\"x\"],\"data\":1}".to_vec(),
            stop.clone(),
        ));
    }
    let mut forgers = JoinSet::new();
    for _ in 0..4 {
        forgers.spawn(cursor_forger(node.clone(), stop.clone()));
    }
    // 32 KiB to every non-reading stream every 20 ms: each is cut once 256 KiB are queued.
    let big = {
        let (node, stop) = (node.clone(), stop.clone());
        tokio::spawn(async move {
            let data = "b".repeat(32 * 1024);
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = publish_api(&node, json!({"topics": ["big"], "data": data, "durable": false})).await;
                assert_eq!(status, 202);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    flooding.store(true, Ordering::Relaxed);

    // In the middle of it, a newcomer is served and the node is ready.
    tokio::time::sleep(FLOOD / 2).await;
    let newcomer = subscribe(&node, "newcomer", &[]).await;
    assert_eq!(newcomer.status, 200);
    let ready = http().get(node.url("/readyz")).send().await.expect("GET /readyz");
    assert_eq!(ready.status(), 200, "the node is not ready during the flood");
    tokio::time::sleep(FLOOD / 2).await;

    ticking.store(true, Ordering::Relaxed);
    let ticks = ticker.await.expect("ticker");
    stop.store(true, Ordering::Relaxed);
    big.await.expect("big publisher");
    hostile.abort_all();
    let mut forged_opens = 0;
    while let Some(opened) = forgers.join_next().await {
        forged_opens += opened.expect("forger");
    }
    drop(sleepers);

    let (mut calm, mut flood) = (Vec::new(), Vec::new());
    while let Some(latencies) = readers.join_next().await {
        let latencies = latencies.expect("good reader");
        assert_eq!(latencies.len() as u64, ticks, "a good stream missed ticks");
        for (during_flood, micros) in latencies {
            if during_flood { flood.push(micros) } else { calm.push(micros) }
        }
    }
    calm.sort_unstable();
    flood.sort_unstable();
    let (calm_p99, flood_p99) = (percentile(&calm, 0.99), percentile(&flood, 0.99));
    let flood_worst = percentile(&flood, 1.0);
    let slow_consumers = node.metric("sse_connections_closed_total", "reason=\"slow_consumer\"").await;
    let timed_out = node.metric("sse_connections_rejected_total", "reason=\"request_timeout\"").await;
    eprintln!(
        "good streams: calm p50 {:?} p99 {calm_p99:?}; flood p50 {:?} p99 {flood_p99:?} worst {flood_worst:?}; \
         {ticks} ticks; {slow_consumers} non-readers cut; {forged_opens} forged-cursor streams opened; {timed_out} requests timed out",
        percentile(&calm, 0.5),
        percentile(&flood, 0.5),
    );
    assert!(flood_p99 <= calm_p99 + P99_ALLOWANCE, "the flood moved the p99 from {calm_p99:?} to {flood_p99:?}");
    assert!(flood_worst <= WORST_BOUND, "a good stream waited {flood_worst:?} for a tick");
    assert!(slow_consumers >= NON_READERS as f64, "only {slow_consumers} of {NON_READERS} non-readers were cut");
    assert!(timed_out > 0.0, "no slow request was timed out");
}
