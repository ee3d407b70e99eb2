//! Redis Sentinel mode end to end (`SSE_REDIS_URL=redis+sentinel://.../mymaster`): a primary,
//! its replica and three `redis-server --sentinel` processes started by each test; nodes that
//! find the primary through the sentinels, and follow it when it is killed and the replica is
//! promoted.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(10);

/// Durably publishes `m-<n>` to `users` through `node`'s API every few milliseconds until
/// `stop`; returns the payloads the node acknowledged (202). A refused one (the node between
/// primaries) is not retried: the next one is another payload.
fn publish_until(node_url: String, users: Vec<String>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = http();
        let mut acknowledged = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Acquire) {
            let payload = format!("m-{n}");
            let sent = client
                .post(format!("{node_url}/api/publish"))
                .bearer_auth(token("backend", &[], Some("publisher")))
                .json(&json!({"users": users, "event": "m", "data": payload}))
                .send()
                .await;
            if sent.is_ok_and(|r| r.status() == 202) {
                acknowledged.push(payload);
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acknowledged
    })
}

/// Collects every event of a stream into `seen` until it ends.
fn collect(mut stream: SseClient, seen: Arc<Mutex<Vec<SseEvent>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(event) = stream.next_event(Duration::from_secs(60)).await {
            seen.lock().await.push(event);
        }
    })
}

/// Waits until every acknowledged payload arrived, in order and once; or, when there was a
/// `reset` (the stream is told it lost history and continues from the history's end), until
/// nothing more arrives, and then only payloads at a reset may be missing: after the last one
/// delivered before it and before the first one delivered after it. Never a gap without a
/// reset. True when there was a reset.
async fn exact_or_reset(seen: &Mutex<Vec<SseEvent>>, acknowledged: &[String], what: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let settled = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let events = seen.lock().await.clone();
        let reset = events.iter().any(|e| e.event == "reset");
        let got: HashSet<&str> = events.iter().filter(|e| e.event == "m").map(|e| e.data.as_str()).collect();
        let missing: Vec<&String> = acknowledged.iter().filter(|p| !got.contains(p.as_str())).collect();
        let order: Vec<usize> =
            events.iter().filter(|e| e.event == "m").filter_map(|e| e.data.strip_prefix("m-")?.parse().ok()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{what}: out of order or twice: {order:?}");
        if missing.is_empty() {
            return reset;
        }
        if reset && tokio::time::Instant::now() > settled {
            let index = |e: &SseEvent| e.data.strip_prefix("m-").and_then(|n| n.parse::<usize>().ok());
            let gaps: Vec<(Option<usize>, Option<usize>)> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.event == "reset")
                .map(|(at, _)| {
                    let before = events[..at].iter().filter_map(index).max();
                    let after = events[at..].iter().filter_map(index).min();
                    (before, after)
                })
                .collect();
            for payload in &missing {
                let n = payload.strip_prefix("m-").and_then(|n| n.parse::<usize>().ok()).expect("m-<n>");
                assert!(
                    gaps.iter().any(|&(before, after)| before.is_none_or(|b| b < n) && after.is_none_or(|a| n < a)),
                    "{what}: {payload} is missing away from any reset {gaps:?}\n{events:?}"
                );
            }
            eprintln!("{what}: reset {gaps:?}; missing there: {} ({missing:?})", missing.len());
            return true;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {} acknowledged never arrived and no reset said so: {missing:?}\n{events:?}",
            missing.len(),
            acknowledged.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_primary_is_killed_delivery_resumes_on_the_promoted_replica_exactly_or_with_a_reset() {
    let mut redis = RedisSentinels::start(3, 2).await;
    let url = redis.url();
    let a = Node::start(&[("SSE_REDIS_URL", &url)]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &url)]).await;
    let live_user = "watcher";
    let away_user = "traveller";

    // Live through node a the whole time; the other stream on node b is closed before the
    // failover and resumes after it with its Last-Event-ID.
    let (live, _) = open_resumable(&stream_url(&a, live_user, &[]), None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = collect(live, seen.clone());
    let (mut away, _) = open_resumable(&stream_url(&b, away_user, &[]), None).await;
    let (status, body) =
        publish_api(&b, json!({"users": [live_user, away_user], "event": "m", "data": "before"})).await;
    assert_eq!(status, 202, "{body}");
    let before = away.next_event(WAIT).await.expect("delivered before the failover");
    assert_eq!(before.data, "before");
    let last_event_id = before.id.expect("a durable event carries a cursor");
    drop(away);

    let stop = Arc::new(AtomicBool::new(false));
    let users = vec![live_user.to_owned(), away_user.to_owned()];
    let publisher = publish_until(a.url(""), users, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.primary.kill();
    redis.wait_promoted().await;
    // Delivery resumes through the same nodes, on the promoted replica.
    let count = || async { seen.lock().await.iter().filter(|e| e.event == "m").count() };
    let promoted_at = count().await;
    wait_for("delivery after the failover", || async { count().await >= promoted_at + 20 }).await;
    stop.store(true, Ordering::Release);
    let acknowledged = publisher.await.expect("publisher");
    let reset = exact_or_reset(&seen, &acknowledged, "live stream").await;
    eprintln!("live stream: {} acknowledged, reset: {reset}", acknowledged.len());
    let subscribers = redis.replica.command(&["PUBSUB", "NUMSUB", &format!("sse:user:{live_user}")]).await;
    assert!(subscribers.is_some_and(|r| r.ends_with(":1\r\n")), "node a subscribes on the new primary");

    // The stream that was away resumes on node b: exactly what it missed, or a reset.
    let (resumed, _) = open_resumable(&stream_url(&b, away_user, &[]), Some(&last_event_id)).await;
    let resumed_seen = Arc::new(Mutex::new(Vec::new()));
    let resumed_reader = collect(resumed, resumed_seen.clone());
    let reset = exact_or_reset(&resumed_seen, &acknowledged, "resumed stream").await;
    eprintln!("resumed stream: reset: {reset}");

    // Both nodes publish on the new primary and their presence is there.
    let (status, body) = publish_api(&b, json!({"users": [live_user], "event": "m", "data": "after"})).await;
    assert_eq!(status, 202, "{body}");
    wait_for("a publish through node b after the failover", || async {
        seen.lock().await.last().is_some_and(|e| e.data == "after")
    })
    .await;
    // Presence reads the new primary too (the old one is gone: it would answer 503).
    wait_for("node b to see node a's stream in presence", || async {
        let answer = http()
            .get(b.url(&format!("/api/presence/{live_user}")))
            .bearer_auth(token("ops", &[], Some("admin")))
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status() == 200 => {
                answer.json::<serde_json::Value>().await.is_ok_and(|p| p["online"] == json!(true))
            }
            _ => false,
        }
    })
    .await;
    reader.abort();
    resumed_reader.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_starts_when_the_first_sentinel_in_its_url_is_down() {
    let mut redis = RedisSentinels::start(2, 1).await;
    let url = redis.url();
    redis.sentinels[0].kill();
    // Node::start waits for /readyz: the primary was found through the second sentinel.
    let node = Node::start(&[("SSE_REDIS_URL", &url)]).await;
    let (mut stream, _) = open_resumable(&stream_url(&node, "early", &[]), None).await;
    let (status, body) = publish_api(&node, json!({"users": ["early"], "event": "m", "data": "found"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(stream.next_event(WAIT).await.expect("delivered").data, "found");
    let listed = redis.primary.command(&["PUBSUB", "NUMSUB", "sse:user:early"]).await.unwrap_or_default();
    assert!(listed.ends_with(":1\r\n"), "subscribed on the primary: {listed:?}");
}
