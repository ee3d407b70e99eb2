//! A late Redis is not a gone Redis (README "Readiness"): the bus's once-a-second checks that
//! only time out keep a ready node ready for 10 s, so a host starved of CPU for a moment does
//! not make its nodes refuse the streams they should take (and nginx take them all out of its
//! pool); a Redis that answers nothing for longer is reported `bus_unavailable`. A Redis that is
//! gone is reported at once: tests/edge_node.rs. Redis is stopped with SIGSTOP, which keeps its
//! connections open and answers nothing, as a hung or starved Redis does. The canary is off, so
//! only the bus's own checks decide readiness.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The node's `LATE_GRACE`.
const GRACE: Duration = Duration::from_secs(10);
/// Longer than a check's 2 s timeout plus its 1 s interval, well inside the grace: the old
/// behaviour (unready on the first unanswered check) shows within it.
const STALL: Duration = Duration::from_secs(6);
const WAIT: Duration = Duration::from_secs(10);

/// Polls `/readyz` every 100 ms for `during`; every answer that was not 200, with when.
async fn refusals_during(node: &Node, during: Duration) -> Vec<(Duration, u16, String)> {
    let start = Instant::now();
    let mut refusals = Vec::new();
    while start.elapsed() < during {
        match http().get(node.url("/readyz")).send().await {
            Ok(response) if response.status() == 200 => {}
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                refusals.push((start.elapsed(), status, body));
            }
            Err(e) => refusals.push((start.elapsed(), 0, e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refusals
}

async fn readyz_reason(node: &Node) -> (u16, String) {
    let response = http().get(node.url("/readyz")).send().await.expect("readyz");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("JSON");
    (status, body["reason"].as_str().unwrap_or_default().to_owned())
}

/// Publishes to `user` until one arrives on `stream` (the first may go to a publish that was
/// refused while Redis caught up).
async fn delivers(node: &Node, stream: &mut SseClient, user: &str) {
    let (status, answer) = publish_api(node, json!({"users": [user], "data": "still here"})).await;
    assert_eq!(status, 202, "{answer}");
    let event = stream.next_event(WAIT).await.expect("delivered after Redis came back");
    assert_eq!(event.data, "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_answers_nothing_for_seconds_leaves_the_node_ready_and_delivering() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_CANARY_INTERVAL", "0")]).await;
    node.wait_readyz(200, WAIT).await;
    let mut stream = subscribe(&node, "patient", &[]).await;

    redis.signal("STOP");
    let refusals = refusals_during(&node, STALL).await;
    redis.signal("CONT");
    assert!(refusals.is_empty(), "/readyz refused while Redis was only late: {refusals:?}\n{}", node.log_text());
    delivers(&node, &mut stream, "patient").await;
    assert_eq!(readyz_reason(&node).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_answers_nothing_past_the_grace_is_reported_and_its_return_noticed() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_CANARY_INTERVAL", "0")]).await;
    node.wait_readyz(200, WAIT).await;
    let mut stream = subscribe(&node, "hung", &[]).await;

    redis.signal("STOP");
    let stopped = Instant::now();
    // A check that began at least the grace after the first late one, plus its own timeouts
    // (PING, then a new connection: 2 s each), plus slack for a loaded machine.
    node.wait_readyz(503, GRACE + Duration::from_secs(15)).await;
    let noticed = stopped.elapsed();
    let reason = readyz_reason(&node).await;
    redis.signal("CONT");
    assert_eq!(reason, (503, "bus_unavailable".to_owned()));
    assert!(noticed >= GRACE, "unready {noticed:?} after Redis stopped, inside the grace");
    assert!(node.log_text().contains("checks have gone unanswered"), "{}", node.log_text());

    node.wait_readyz(200, WAIT).await;
    delivers(&node, &mut stream, "hung").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_primary_that_answers_nothing_for_seconds_leaves_the_node_ready() {
    // A node timeout longer than the stall: the cluster itself does not fail the primary over.
    let cluster = RedisCluster::start_with(3, 0, &["--cluster-node-timeout", "30000"]).await;
    let node = Node::start(&[("SSE_REDIS_URL", &cluster.url()), ("SSE_CANARY_INTERVAL", "0")]).await;
    node.wait_readyz(200, WAIT).await;
    // A user on each primary, the stopped one included.
    let mut users: Vec<String> = Vec::new();
    let mut owners = std::collections::HashSet::new();
    for i in 0.. {
        let user = format!("shard-user-{i}");
        if owners.insert(cluster.owner(key_slot(&format!("{{sse:user:{user}}}"))).await) {
            users.push(user);
        }
        if owners.len() == cluster.nodes.len() {
            break;
        }
    }
    let mut streams = Vec::new();
    for user in &users {
        streams.push(subscribe(&node, user, &[]).await);
    }

    let stopped = &cluster.nodes[2];
    stopped.signal("STOP");
    let refusals = refusals_during(&node, STALL).await;
    stopped.signal("CONT");
    assert!(refusals.is_empty(), "/readyz refused while a primary was only late: {refusals:?}\n{}", node.log_text());
    for (user, stream) in users.iter().zip(&mut streams) {
        delivers(&node, stream, user).await;
    }
}
