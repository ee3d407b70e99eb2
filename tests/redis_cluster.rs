//! Redis Cluster mode end to end (`SSE_REDIS_URL=redis+cluster://...`): real clusters of
//! `redis-server --cluster-enabled yes` built by each test, nodes on sharded pub/sub, and the
//! things a cluster does under a running node: a slot migrated while messages flow, a primary
//! killed and replaced by its replica.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(10);

/// `FCALL sse_publish 2 {<channel>} {<channel>}:epoch <payload>` on the cluster, as the README
/// tells producers to.
async fn durable(
    cluster: &mut redis::cluster_async::ClusterConnection,
    channel: &str,
    payload: &str,
) -> redis::RedisResult<String> {
    let key = format!("{{{channel}}}");
    redis::cmd("FCALL")
        .arg("sse_publish")
        .arg(2)
        .arg(&key)
        .arg(format!("{key}:epoch"))
        .arg(payload)
        .query_async(cluster)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn users_on_every_shard_receive_through_two_nodes_and_resume_exactly() {
    let cluster = RedisCluster::start(3, 0).await;
    let url = cluster.url();
    let a = Node::start(&[("SSE_REDIS_URL", &url)]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &url)]).await;

    // Users whose channels land on every primary.
    let users: Vec<String> = (0..24).map(|i| format!("spread{i}")).collect();
    let mut owners = HashSet::new();
    for user in &users {
        owners.insert(cluster.owner(key_slot(&format!("{{sse:user:{user}}}"))).await);
    }
    assert_eq!(owners.len(), 3, "the users' channels are on all three primaries");

    let mut streams = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        streams.push(open_resumable(&stream_url(node, user, &["news"]), None).await);
    }

    // Durable through node b's API, plain (live only) through node a's, a topic, and straight
    // from a producer: FCALL and SPUBLISH on `{<channel>}`.
    let (status, body) = publish_api(&b, json!({"users": users, "event": "m", "data": "durable"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(users.len()), "{body}");
    let (status, body) =
        publish_api(&a, json!({"users": users, "event": "m", "data": "plain", "durable": false})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["receivers"], json!(users.len()), "one sharded subscriber per channel: {body}");
    let (status, _) = publish_api(&a, json!({"topics": ["news"], "event": "m", "data": "topic"})).await;
    assert_eq!(status, 202);
    let mut producer = cluster.client().await;
    for user in &users {
        // The one-key form.
        let id: String = redis::cmd("FCALL")
            .arg("sse_publish")
            .arg(1)
            .arg(format!("{{sse:user:{user}}}"))
            .arg(envelope("fcall"))
            .query_async(&mut producer)
            .await
            .expect("FCALL");
        assert!(id.contains('-'), "{id}");
        let receivers: i64 = redis::cmd("SPUBLISH")
            .arg(format!("{{sse:user:{user}}}"))
            .arg(envelope("spublish"))
            .query_async(&mut producer)
            .await
            .expect("SPUBLISH");
        assert_eq!(receivers, 1);
    }
    for ((stream, _), user) in streams.iter_mut().zip(&users) {
        let got: Vec<String> = stream.next_events(5, WAIT).await.into_iter().map(|e| e.data).collect();
        assert_eq!(got, ["durable", "plain", "topic", "fcall", "spublish"], "{user}");
    }
    // A classic PUBLISH reaches no node in cluster mode (the README says so and why).
    let classic = cluster.nodes[0].publish(&format!("sse:user:{}", users[0]), &envelope("classic")).await;
    assert_eq!(classic, 0);

    // A primary that lost the function library gets it back: at the first durable publish that
    // needs it, and from the nodes' health check.
    let emptied = cluster.owner(key_slot(&format!("{{sse:user:{}}}", users[1]))).await;
    let flushed = cluster.node(emptied).command(&["FUNCTION", "FLUSH"]).await;
    assert_eq!(flushed.as_deref(), Some("+OK\r\n"));
    let (status, body) = publish_api(&a, json!({"users": [users[1]], "event": "m", "data": "reloaded"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(streams[1].0.next_events(1, WAIT).await[0].data, "reloaded");
    for node in &cluster.nodes {
        let listed = node.command(&["FUNCTION", "LIST", "LIBRARYNAME", "sse_fanout"]).await.unwrap_or_default();
        assert!(listed.contains("sse_publish"), "every primary holds the library: {listed}");
    }

    // The nodes' control channel is sharded too: a revoke asked of node a ends a stream on b.
    let revoked = http()
        .delete(a.url(&format!("/api/users/{}/connections", users[1])))
        .bearer_auth(token("ops", &[], Some("admin")))
        .send()
        .await
        .expect("revoke");
    assert!(revoked.status().is_success(), "{}", revoked.status());
    let event = streams[1].0.next_event(WAIT).await.expect("a disconnected event");
    assert_eq!((event.event.as_str(), event.data.as_str()), ("disconnected", r#"{"reason":"revoked"}"#));

    // Exact resume on the other node: what a user missed on every shard, in order, once.
    let mut cursors = Vec::new();
    for (i, (mut stream, _)) in streams.drain(..).enumerate().filter(|(i, _)| i % 4 == 0) {
        durable(&mut producer, &format!("sse:user:{}", users[i]), &envelope("last-seen")).await.expect("FCALL");
        let seen = stream.next_events(1, WAIT).await;
        assert_eq!(seen[0].data, "last-seen");
        cursors.push((i, seen[0].id.clone().expect("a cursor")));
    }
    for (i, _) in &cursors {
        for n in 0..3 {
            durable(&mut producer, &format!("sse:user:{}", users[*i]), &envelope(&format!("missed-{n}")))
                .await
                .expect("FCALL");
        }
    }
    let (status, _) = publish_api(&a, json!({"topics": ["news"], "event": "m", "data": "topic-missed"})).await;
    assert_eq!(status, 202);
    for (i, cursor) in &cursors {
        let node = if i % 2 == 0 { &b } else { &a };
        let (mut stream, _) = open_resumable(&stream_url(node, &users[*i], &["news"]), Some(cursor)).await;
        let mut got: Vec<String> = stream.next_events(4, WAIT).await.into_iter().map(|e| e.data).collect();
        got.sort();
        assert_eq!(got, ["missed-0", "missed-1", "missed-2", "topic-missed"], "{}", users[*i]);
        durable(&mut producer, &format!("sse:user:{}", users[*i]), &envelope("live")).await.expect("FCALL");
        assert_eq!(stream.next_events(1, WAIT).await[0].data, "live", "nothing replayed twice");
    }
}

/// Publishes `<tag>-<n>` durably to `channel` every few milliseconds until `stop`, retrying a
/// refused publish (a slot moving, a primary failing over); returns what Redis acknowledged.
fn publish_until(
    mut producer: redis::cluster_async::ClusterConnection,
    channel: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Acquire) {
            let payload = format!("m-{n}");
            match tokio::time::timeout(Duration::from_secs(2), durable(&mut producer, &channel, &envelope(&payload)))
                .await
            {
                Ok(Ok(_)) => {
                    acknowledged.push(payload);
                    n += 1;
                }
                // Not acknowledged: it may or may not be in history; the next one is another.
                _ => n += 1,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acknowledged
    })
}

/// Collects every event of a stream into `seen` until the stream ends.
fn collect(mut stream: SseClient, seen: Arc<Mutex<Vec<SseEvent>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(event) = stream.next_event(Duration::from_secs(60)).await {
            seen.lock().await.push(event);
        }
    })
}

/// Waits until every acknowledged payload arrived, or (when `reset_allowed`) a `reset` said
/// that the stream lost history; panics with what is missing. True when it was a reset.
async fn all_arrived(seen: &Mutex<Vec<SseEvent>>, acknowledged: &[String], reset_allowed: bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // After a reset, what is still missing once nothing arrives for a while was lost with it.
    let settled = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let events = seen.lock().await.clone();
        let reset = events.iter().any(|e| e.event == "reset");
        assert!(reset_allowed || !reset, "a reset where nothing may be lost: {events:?}");
        let got: HashSet<&str> = events.iter().filter(|e| e.event == "m").map(|e| e.data.as_str()).collect();
        let missing: Vec<&String> = acknowledged.iter().filter(|p| !got.contains(p.as_str())).collect();
        if missing.is_empty() {
            if reset {
                let at = events.iter().position(|e| e.event == "reset").unwrap_or_default();
                eprintln!("around the reset: {:?}", &events[at.saturating_sub(2)..(at + 3).min(events.len())]);
            }
            // In order: each payload after the one before it.
            let order: Vec<usize> = events
                .iter()
                .filter(|e| e.event == "m")
                .filter_map(|e| e.data.strip_prefix("m-")?.parse().ok())
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order or twice: {order:?}");
            return reset;
        }
        if reset && tokio::time::Instant::now() > settled {
            // Replication is asynchronous: only what the primary acknowledged in its last moments
            // can be missing from its replica.
            assert!(missing.len() <= 3, "more lost than a replica can lag: {missing:?}");
            eprintln!("lost with the failed primary, and reset: {missing:?}");
            return true;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acknowledged never arrived: {missing:?}",
            missing.len(),
            acknowledged.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_migrated_under_load_loses_nothing() {
    let cluster = RedisCluster::start(3, 0).await;
    let node = Node::start(&[("SSE_REDIS_URL", &cluster.url())]).await;
    let user = "migrant";
    let slot = key_slot(&format!("{{sse:user:{user}}}"));
    let from = cluster.owner(slot).await;
    let to = cluster.nodes.iter().map(|n| n.port).find(|&p| p != from).expect("another primary");

    let (stream, _) = open_resumable(&stream_url(&node, user, &[]), None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = collect(stream, seen.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_until(cluster.client().await, format!("sse:user:{user}"), stop.clone());

    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.migrate_slot(slot, from, to).await;
    // The node follows the channel to its new owner.
    let channel = format!("{{sse:user:{user}}}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = cluster.node(to).command(&["PUBSUB", "SHARDNUMSUB", &channel]).await.unwrap_or_default();
        if count.trim_end().ends_with(":1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not subscribed on the new owner: {count:?}\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Release);
    let acknowledged = publisher.await.expect("publisher");
    assert!(acknowledged.len() > 100, "published under load: {}", acknowledged.len());
    all_arrived(&seen, &acknowledged, false).await;
    reader.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_primary_fails_over_durable_delivery_resumes_with_nothing_lost() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let node = Node::start(&[("SSE_REDIS_URL", &cluster.url())]).await;
    let user = "survivor";
    let slot = key_slot(&format!("{{sse:user:{user}}}"));
    let primary = cluster.owner(slot).await;

    let (stream, _) = open_resumable(&stream_url(&node, user, &[]), None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = collect(stream, seen.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_until(cluster.client().await, format!("sse:user:{user}"), stop.clone());

    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.node_mut(primary).kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while cluster.owner(slot).await == primary {
        assert!(tokio::time::Instant::now() < deadline, "the replica was not promoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_ok(6).await;
    // Delivery resumes on the promoted replica.
    let before = seen.lock().await.len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.lock().await.len() < before + 20 {
        assert!(tokio::time::Instant::now() < deadline, "no delivery after the failover\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Release);
    let acknowledged = publisher.await.expect("publisher");
    let reset = all_arrived(&seen, &acknowledged, true).await;
    eprintln!("failover: {} acknowledged, reset: {reset}", acknowledged.len());
    reader.abort();
}
