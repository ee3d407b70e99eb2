//! The canary makes `/readyz` prove delivery (README, Operators): with real Redis and real
//! nodes, each way the path of a client's message breaks turns `/readyz` 503 within
//! `SSE_CANARY_THRESHOLD` (plus a stated margin), and 200 again once the path is back.
//!
//! - Redis paused for writes (`CLIENT PAUSE … WRITE`): PING is still answered, so the bus looks
//!   ready, but no PUBLISH goes through. Only the canary sees it (`canary_stalled`).
//! - Redis stopped, then started again.
//! - The dispatcher far behind: a flood to a channel with 500 listeners gives it more work than
//!   it can do in real time, so every message (and the probe among them) waits in the inbound
//!   queue. Redis is fine all along. This is the real way a dispatcher stalls: it awaits
//!   nothing but Redis reads after a reconnect (which time out), so what holds it back is work.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Node, Producer, Received, RedisServer, SseClient, http, stream_url, token};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL: Duration = Duration::from_millis(200);
const THRESHOLD: Duration = Duration::from_secs(1);
/// Slack for a loaded two-core machine running the suite: readiness is polled every 50 ms, and
/// a probe, a PING and a poll each wait for a busy runtime.
const MARGIN: Duration = Duration::from_secs(3);

async fn start_node(redis: &RedisServer, extra: &[(&str, &str)]) -> Node {
    let url = redis.url();
    let mut env = vec![
        ("SSE_REDIS_URL", url.as_str()),
        ("SSE_CANARY_INTERVAL", "200ms"),
        ("SSE_CANARY_THRESHOLD", "1s"),
        ("SSE_NODE_ID", "canary-test"),
    ];
    env.extend_from_slice(extra);
    let node = Node::start(&env).await;
    wait_for_probe(&node).await;
    node
}

/// Waits until a probe has come back in time (`sse_canary_seconds` set and under the threshold).
async fn wait_for_probe(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = metrics_text(node).await;
        let lag = sample(&metrics, "sse_canary_seconds");
        if lag.is_some_and(|lag| lag > 0.0 && lag < THRESHOLD.as_secs_f64()) && readyz(node).await.0 == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "no canary probe came back in time: {lag:?}; log:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics_text(node: &Node) -> String {
    http().get(node.url("/metrics")).send().await.expect("metrics").text().await.expect("text")
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `/readyz`'s status and reason.
async fn readyz(node: &Node) -> (u16, String) {
    let Ok(response) = http().get(node.url("/readyz")).send().await else { return (0, "unreachable".into()) };
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["reason"].as_str().unwrap_or_default().to_owned())
}

/// Polls `/readyz` every 50 ms until `wanted` answers or `within` passes; when and what it said.
async fn wait_readyz(node: &Node, wanted: u16, within: Duration) -> (Instant, String) {
    let deadline = Instant::now() + within;
    loop {
        let (status, reason) = readyz(node).await;
        if status == wanted {
            return (Instant::now(), reason);
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} {reason:?} for {within:?}, expected {wanted}; log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_paused_for_writes_answers_ping_but_the_canary_fails_readyz_until_it_ends() {
    let redis = RedisServer::start().await;
    // History off: the node's health check is then a bare PING, which a WRITE pause lets through
    // (with history on, the check's FCALL is held too, and readiness fails on that 2 s later).
    let node = start_node(&redis, &[("SSE_HISTORY", "false")]).await;

    const PAUSE: Duration = Duration::from_secs(6);
    let paused = Instant::now();
    let reply = redis.command(&["CLIENT", "PAUSE", &PAUSE.as_millis().to_string(), "WRITE"]).await;
    assert_eq!(reply.as_deref().map(str::trim), Some("+OK"));

    let (failed, reason) = wait_readyz(&node, 503, THRESHOLD + MARGIN).await;
    assert_eq!(reason, "canary_stalled");
    // Not at once: a probe must have been out for the threshold (less the interval: the probe
    // sent just before the pause may have been held too).
    assert!(failed - paused >= THRESHOLD - INTERVAL, "503 after {:?}, before the threshold", failed - paused);
    let metrics = metrics_text(&node).await;
    assert_eq!(sample(&metrics, "sse_bus_ready"), Some(1.0), "Redis still answers PING: only the canary saw it");
    let lag = sample(&metrics, "sse_canary_seconds").expect("the canary gauge");
    assert!(lag >= THRESHOLD.as_secs_f64() - INTERVAL.as_secs_f64(), "the gauge shows the wait: {lag}");

    // 503 for as long as the pause lasts, then 200 once a probe is back in time.
    let (back, _) = wait_readyz(&node, 200, PAUSE + INTERVAL + MARGIN).await;
    assert!(back - paused >= PAUSE - INTERVAL, "/readyz was 200 after {:?}, while Redis was paused", back - paused);
    let lag = sample(&metrics_text(&node).await, "sse_canary_seconds").expect("the canary gauge");
    assert!(lag < THRESHOLD.as_secs_f64(), "the gauge is back under the threshold: {lag}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_redis_fails_readyz_within_the_threshold_and_a_restarted_one_brings_it_back() {
    let mut redis = RedisServer::start().await;
    let node = start_node(&redis, &[]).await;

    let stopped = Instant::now();
    redis.kill();
    let (failed, reason) = wait_readyz(&node, 503, THRESHOLD + MARGIN).await;
    eprintln!("503 {reason} {:?} after Redis stopped", failed - stopped);
    assert!(["bus_unavailable", "canary_stalled"].contains(&reason.as_str()), "{reason}");
    // However long it is down, the node stays unready (the canary finds nothing either).
    tokio::time::sleep(THRESHOLD * 3).await;
    assert_eq!(readyz(&node).await.0, 503);

    redis.restart().await;
    let restarted = Instant::now();
    // The subscriber reconnects within its 2 s backoff, resubscribes, and the next probe returns.
    let (back, _) = wait_readyz(&node, 200, Duration::from_secs(2) + INTERVAL + MARGIN + Duration::from_secs(5)).await;
    eprintln!("200 {:?} after Redis restarted", back - restarted);
    wait_for_probe(&node).await;
}

/// A stream read by a task that throws everything away, as fast as it comes.
async fn open_discarding(node: &Node, user: &str, topic: &str) -> tokio::task::JoinHandle<()> {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
    let request = format!(
        "GET /events?access_token={}&topic={topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        token(user, &["*"], None)
    );
    socket.write_all(request.as_bytes()).await.expect("request");
    let mut seen = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while !String::from_utf8_lossy(&seen).contains("event: connected") {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buffer))
            .await
            .expect("connected in time")
            .expect("read");
        assert!(n > 0, "the stream ended before connected: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    tokio::spawn(async move { while matches!(socket.read(&mut buffer).await, Ok(n) if n > 0) {} })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatcher_held_back_by_a_flood_fails_readyz_while_redis_is_fine_and_recovers_after() {
    const LISTENERS: usize = 500;
    const CHUNK: usize = 200;
    /// Messages waiting at most: under the inbound queue's 65,536.
    const MAX_BACKLOG: usize = 50_000;
    /// Messages sent at most before the test gives up on holding the dispatcher back.
    const MAX_FLOOD: usize = 500_000;
    let redis = RedisServer::start().await;
    let node = start_node(
        &redis,
        &[
            ("SSE_HISTORY", "false"),
            ("SSE_IP_OPEN_BURST", "1000"),
            // The listeners read as fast as they can; they must not be cut off as slow consumers
            // (which would shrink the fan-out and end the flood's hold on the dispatcher).
            ("SSE_QUEUE_CAPACITY", "50000"),
            ("SSE_QUEUE_MAX_BYTES", "32MiB"),
        ],
    )
    .await;
    let mut readers = Vec::new();
    for i in 0..LISTENERS {
        readers.push(open_discarding(&node, &format!("flood-{i}"), "flood").await);
    }
    let mut watcher = SseClient::open(&stream_url(&node, "watcher", &["flood"]), &[]).await;
    assert_eq!(watcher.status, 200);
    watcher.connected().await;

    // Record readiness every 50 ms from here on.
    let seen: Arc<Mutex<Vec<(Instant, u16, String)>>> = Arc::default();
    let poller = tokio::spawn({
        let (seen, url) = (seen.clone(), node.url("/readyz"));
        async move {
            loop {
                let (status, reason) = match http().get(&url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        (status, body["reason"].as_str().unwrap_or_default().to_owned())
                    }
                    Err(_) => (0, "unreachable".to_owned()),
                };
                seen.lock().expect("lock").push((Instant::now(), status, reason));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // Flood until the watcher sees its messages arrive more than the threshold late (the
    // dispatcher is that far behind), then a little longer: how many messages that takes
    // depends on the machine.
    let mut producer = Producer::connect(&redis).await;
    let flood_started = Instant::now();
    let filler = "x".repeat(200);
    let (mut sent, mut received, mut lag, mut behind_since) = (0, 0, Duration::ZERO, None);
    while lag < INTERVAL + THRESHOLD + MARGIN {
        // A backlog of a few seconds of the dispatcher's work: enough for a lag over the
        // target, little enough to drain in seconds (how much that is depends on the machine,
        // so it is measured: the dispatcher is busy throughout, so what it delivered so far is
        // its rate). Under the inbound queue's bound: a dispatcher behind, not one dropping.
        let rate = received as f64 / flood_started.elapsed().as_secs_f64().max(0.1);
        let wanted = ((rate * (INTERVAL + THRESHOLD + MARGIN * 2).as_secs_f64()) as usize).clamp(CHUNK, MAX_BACKLOG);
        if sent - received < wanted {
            assert!(sent < MAX_FLOOD, "{sent} messages kept the dispatcher only {lag:?} behind: add listeners");
            let at = (Instant::now() - flood_started).as_millis();
            let mut pipe = redis::pipe();
            for _ in 0..CHUNK {
                let data = format!("{at} {filler}");
                pipe.cmd("PUBLISH").arg("sse:topic:flood").arg(json!({"data": data}).to_string()).ignore();
            }
            let () = pipe.query_async(&mut producer.0).await.expect("PUBLISH");
            sent += CHUNK;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(Received::Event(event)) = watcher.next(Duration::from_millis(1)).await {
            let at: u64 = event.data.split(' ').next().and_then(|at| at.parse().ok()).expect("a flood message");
            lag = lag.max(flood_started.elapsed().saturating_sub(Duration::from_millis(at)));
            received += 1;
        }
        if lag > INTERVAL + THRESHOLD && behind_since.is_none() {
            behind_since = Some(Instant::now());
        }
    }
    let behind_since = behind_since.expect("behind");
    let flood_sent = Instant::now();
    let bus_ready_during = sample(&metrics_text(&node).await, "sse_bus_ready");
    redis.publish("sse:topic:flood", r#"{"data":"last"}"#).await;

    // The watcher sees the flood's last message once the dispatcher has worked through it all.
    loop {
        let event = watcher.next_event(Duration::from_secs(120)).await.expect("the flood arrives");
        if event.data == "last" {
            break;
        }
    }
    let drained = Instant::now();
    eprintln!(
        "{sent} messages to {LISTENERS} listeners in {:?} ({received} read meanwhile); the dispatcher was {lag:?} behind; drained {:?} later",
        flood_sent - flood_started,
        drained - flood_sent
    );

    // Readiness after the backlog drained: back to 200 once a probe sent then returns.
    let (back, _) = wait_readyz(&node, 200, INTERVAL + THRESHOLD + MARGIN).await;
    poller.abort();
    let seen = seen.lock().expect("lock").clone();
    let first_failure = seen.iter().find(|(at, status, _)| *at >= flood_started && *status == 503);
    let Some((failed, _, reason)) = first_failure else {
        let statuses: std::collections::BTreeSet<u16> = seen.iter().map(|(_, status, _)| *status).collect();
        panic!("/readyz never failed while the dispatcher was {lag:?} behind: {} polls, {statuses:?}", seen.len())
    };
    assert_eq!(reason, "canary_stalled");
    assert_eq!(bus_ready_during, Some(1.0), "Redis was fine: PING alone saw nothing");
    // A probe sent when a message that was delivered more than interval + threshold late was
    // published waited at least as long: by the time the watcher saw that, it was out for the
    // threshold.
    assert!(
        *failed <= behind_since + MARGIN,
        "503 came {:?} after the watcher saw messages {:?} late",
        failed.saturating_duration_since(behind_since),
        INTERVAL + THRESHOLD
    );
    // Unready for as long as it was behind (no 200 between the first failure and the drain,
    // less the threshold: the probes queued last come back faster than it).
    let flapped = seen.iter().find(|(at, status, _)| at > failed && *at + THRESHOLD < drained && *status == 200);
    assert!(flapped.is_none(), "/readyz was 200 while the dispatcher was behind: {flapped:?}");
    eprintln!(
        "503 canary_stalled {:?} after the watcher saw the lag; 200 again {:?} after the drain",
        failed.saturating_duration_since(behind_since),
        back.saturating_duration_since(drained)
    );
    for reader in readers {
        reader.abort();
    }
}
