//! What the README promises of the per-user limit with Redis: it counts the user's streams on
//! every node, atomically (a burst of connects through two nodes admits exactly the limit),
//! `reject` refuses the one beyond it on any node with 429 `user_limit` until a stream closes,
//! `evict-oldest` closes the oldest stream wherever it is with `disconnected: replaced`, and
//! while Redis cannot seat a stream each node counts its own streams (and logs it).

mod common;

use std::time::{Duration, Instant};

use common::{Node, RedisServer, SseClient, token};
use futures_util::future::join_all;
use serde_json::Value;

async fn nodes(redis: &RedisServer, policy: &str) -> (Node, Node) {
    let url = redis.url();
    let settings = |id: &'static str| {
        vec![
            ("SSE_REDIS_URL", url.clone()),
            ("SSE_NODE_ID", id.to_owned()),
            ("SSE_MAX_CONNECTIONS_PER_USER", "2".to_owned()),
            ("SSE_PER_USER_POLICY", policy.to_owned()),
            ("SSE_IP_OPEN_BURST", "1000".to_owned()),
            // The fallback test pauses Redis' writes: history lookups are not what it is about.
            ("SSE_HISTORY", "false".to_owned()),
        ]
    };
    let a = settings("node-a");
    let b = settings("node-b");
    let a = Node::start(&a.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).await;
    let b = Node::start(&b.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>()).await;
    (a, b)
}

async fn open(node: &Node, user: &str) -> SseClient {
    SseClient::open(&node.url(&format!("/events?access_token={}", token(user, &[], None))), &[]).await
}

/// A stream that must be admitted: its `connected` event's data.
async fn admitted(node: &Node, user: &str) -> (SseClient, Value) {
    let mut stream = open(node, user).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    let connected = stream.connected().await;
    (stream, connected)
}

fn refused_for_the_limit(stream: &SseClient) {
    assert_eq!(stream.status, 429, "{:?}", stream.body);
    let body: Value = serde_json::from_str(stream.body.as_deref().unwrap_or("")).expect("a JSON error");
    assert_eq!(body["error"], "user_limit", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_counts_the_users_streams_on_every_node_and_a_close_frees_a_seat() {
    let redis = RedisServer::start().await;
    let (a, b) = nodes(&redis, "reject").await;
    let (first, _) = admitted(&a, "alice").await;
    let (_second, _) = admitted(&b, "alice").await;
    // Each node holds one of alice's streams: only the cluster's count refuses a third.
    refused_for_the_limit(&open(&a, "alice").await);
    refused_for_the_limit(&open(&b, "alice").await);
    let (_bob, _) = admitted(&a, "bob").await;
    a.wait_metric("sse_user_limit_checks_total", r#"outcome="full""#, 1.0).await;

    // The seat is given back with the close (written with presence, within 200 ms).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let third = open(&b, "alice").await;
        if third.status == 200 {
            break;
        }
        refused_for_the_limit(&third);
        assert!(Instant::now() < deadline, "the closed stream's seat was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_through_two_nodes_admits_exactly_the_limit() {
    let redis = RedisServer::start().await;
    let (a, b) = nodes(&redis, "reject").await;
    let opens = (0..12).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        open(node, "burst")
    });
    let streams = join_all(opens).await;
    let admitted = streams.iter().filter(|s| s.status == 200).count();
    assert_eq!(admitted, 2, "statuses: {:?}", streams.iter().map(|s| s.status).collect::<Vec<_>>());
    streams.iter().filter(|s| s.status != 200).for_each(refused_for_the_limit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_oldest_closes_the_oldest_stream_wherever_it_is() {
    let redis = RedisServer::start().await;
    let (a, b) = nodes(&redis, "evict-oldest").await;
    let (mut oldest, _) = admitted(&a, "carol").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut middle, _) = admitted(&b, "carol").await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The third, on node-b, takes the place of the oldest, on node-a.
    let (mut newest, _) = admitted(&b, "carol").await;
    let farewell = oldest.next_event(Duration::from_secs(5)).await.expect("the oldest is told why it ends");
    assert_eq!((farewell.event.as_str(), farewell.data.as_str()), ("disconnected", r#"{"reason":"replaced"}"#));
    middle.assert_silent(Duration::from_millis(300)).await;
    b.wait_metric("sse_user_limit_checks_total", r#"outcome="evicted""#, 1.0).await;
    a.wait_metric("sse_connections_closed_total", r#"reason="replaced""#, 1.0).await;

    // A fourth on node-a: now the oldest is `middle`, on node-b.
    let (mut fourth, _) = admitted(&a, "carol").await;
    let farewell = middle.next_event(Duration::from_secs(5)).await.expect("the oldest is told why it ends");
    assert_eq!(farewell.data, r#"{"reason":"replaced"}"#);
    newest.assert_silent(Duration::from_millis(300)).await;
    fourth.assert_silent(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_cannot_seat_a_stream_each_node_counts_its_own() {
    let redis = RedisServer::start().await;
    let (a, b) = nodes(&redis, "reject").await;
    let (_one, _) = admitted(&b, "dave").await;
    let (_two, _) = admitted(&b, "dave").await;
    refused_for_the_limit(&open(&a, "dave").await);

    // Writes paused: the seat script cannot run, node-a waits a second and decides alone.
    redis.command(&["CLIENT", "PAUSE", "4000", "WRITE"]).await.expect("redis");
    let (_three, _) = admitted(&a, "dave").await;
    let (_four, _) = admitted(&a, "dave").await;
    refused_for_the_limit(&open(&a, "dave").await);
    a.wait_metric("sse_user_limit_checks_total", r#"outcome="fallback""#, 3.0).await;
    assert!(a.log_text().contains("the per-user limit counts this node's streams only"), "{}", a.log_text());
}
