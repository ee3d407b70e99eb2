//! What the README promises of presence and the admin API: any node answers for the whole
//! cluster (a user with streams on two nodes shows both), many users are asked about in one
//! call, a node lists its own streams a page at a time, `/api/cluster` lists the live nodes,
//! a revoke ends the user's streams on every node with `disconnected: revoked`, a node killed
//! with SIGKILL drops out once its lease lapses, a renewal that drops a topic drops it from
//! presence too, and only an admin token gets any of it.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Node, RedisServer, SseClient, http, subscribe, token};
use serde_json::{Value, json};

fn admin() -> String {
    token("ops", &[], Some("admin"))
}

async fn get(node: &Node, path: &str) -> (u16, Value) {
    let response = http().get(node.url(path)).bearer_auth(admin()).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asks `path` until `done` holds for its answer, for up to `within`; returns the last answer.
async fn until(node: &Node, path: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get(node, path).await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} answered {status} {body} for {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn nodes_of(presence: &Value) -> BTreeSet<String> {
    presence["streams"].as_array().map_or_else(BTreeSet::new, |streams| {
        streams.iter().filter_map(|s| s["node"].as_str().map(str::to_owned)).collect()
    })
}

async fn expect_revoked(client: &mut SseClient) {
    let event = client.next_event(Duration::from_secs(5)).await.expect("a disconnected event");
    assert_eq!(event.event, "disconnected", "{event:?}");
    assert_eq!(serde_json::from_str::<Value>(&event.data).expect("json"), json!({"reason": "revoked"}));
}

async fn two_nodes(redis: &RedisServer, lease: &str) -> (Node, Node) {
    let url = redis.url();
    let a = Node::start(&[("SSE_REDIS_URL", &url), ("SSE_NODE_ID", "node-a"), ("SSE_PRESENCE_LEASE", lease)]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &url), ("SSE_NODE_ID", "node-b"), ("SSE_PRESENCE_LEASE", lease)]).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_for_the_cluster_and_a_revoke_ends_the_users_streams_everywhere() {
    let redis = RedisServer::start().await;
    let (a, b) = two_nodes(&redis, "30s").await;
    let mut alice_a = subscribe(&a, "alice", &["news"]).await;
    let mut alice_b = subscribe(&b, "alice", &[]).await;
    let mut bob = subscribe(&a, "bob", &[]).await;

    let alice = until(&b, "/api/presence/alice", Duration::from_secs(5), |p| nodes_of(p).len() == 2).await;
    assert_eq!(alice["user"], "alice");
    assert_eq!(alice["online"], true);
    assert_eq!(nodes_of(&alice), BTreeSet::from(["node-a".to_owned(), "node-b".to_owned()]));
    let on_a = alice["streams"].as_array().expect("streams").iter().find(|s| s["node"] == "node-a").expect("on a");
    assert_eq!(on_a["topics"], json!(["news"]));
    assert!(on_a["connection_id"].as_str().is_some_and(|id| id.starts_with("node-a:")), "{on_a}");
    assert!(on_a["since"].as_u64().is_some_and(|since| since > 1_700_000_000), "{on_a}");

    let (status, batch) = get(&a, "/api/presence?users=alice,bob,carol").await;
    assert_eq!((status, batch), (200, json!({"users": {"alice": true, "bob": true, "carol": false}})));
    let too_many = (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>().join(",");
    assert_eq!(get(&a, &format!("/api/presence?users={too_many}")).await.0, 400, "the batch is bounded");

    let cluster = until(&b, "/api/cluster", Duration::from_secs(5), |c| c["nodes"][0]["streams"] == 2).await;
    let nodes = cluster["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "{cluster}");
    assert_eq!((nodes[0]["node"].as_str(), nodes[1]["node"].as_str()), (Some("node-a"), Some("node-b")));
    assert_eq!((nodes[0]["streams"].as_u64(), nodes[1]["streams"].as_u64()), (Some(2), Some(1)));
    assert_eq!(nodes[0]["version"], env!("CARGO_PKG_VERSION"));

    let revoke =
        http().delete(b.url("/api/users/alice/connections")).bearer_auth(admin()).send().await.expect("request");
    assert_eq!(revoke.status().as_u16(), 202);
    expect_revoked(&mut alice_a).await;
    expect_revoked(&mut alice_b).await;
    bob.assert_silent(Duration::from_millis(500)).await;
    let alice = until(&a, "/api/presence/alice", Duration::from_secs(5), |p| p["online"] == false).await;
    assert_eq!(alice["streams"], json!([]));
    let (_, batch) = get(&b, "/api/presence?users=alice,bob").await;
    assert_eq!(batch, json!({"users": {"alice": false, "bob": true}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_streams_vanish_once_its_lease_lapses() {
    let redis = RedisServer::start().await;
    let (a, mut b) = two_nodes(&redis, "2s").await;
    let _kim = subscribe(&b, "kim", &[]).await;
    until(&a, "/api/presence/kim", Duration::from_secs(5), |p| p["online"] == true).await;

    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5)).await;
    let killed = Instant::now();
    // Lease 2 s; a survivor looks every 2/3 s: gone from answers by 2 s, from Redis soon after.
    let kim = until(&a, "/api/presence/kim", Duration::from_secs(4), |p| p["online"] == false).await;
    assert_eq!(kim["streams"], json!([]));
    let cluster = until(&a, "/api/cluster", Duration::from_secs(1), |c| c["nodes"].as_array().is_some()).await;
    assert_eq!(cluster["nodes"].as_array().map(Vec::len), Some(1), "{cluster}");
    assert_eq!(cluster["nodes"][0]["node"], "node-a");
    let deadline = killed + Duration::from_secs(5);
    loop {
        let left = redis.command(&["EXISTS", "sse:presence:streams:node-b", "sse:presence:user:kim"]).await;
        if left.as_deref().map(str::trim) == Some(":0") {
            break;
        }
        assert!(Instant::now() < deadline, "node-b's entries are still in redis: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("node-b's presence was gone from redis {:?} after the kill", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_redis_answers_from_its_own_streams_and_pages_them() {
    let node = Node::start(&[("SSE_NODE_ID", "solo")]).await;
    let mut streams = Vec::new();
    for user in ["u1", "u2", "u1"] {
        streams.push(subscribe(&node, user, &["t"]).await);
    }
    let (status, u1) = get(&node, "/api/presence/u1").await;
    assert_eq!((status, u1["online"].as_bool(), nodes_of(&u1)), (200, Some(true), BTreeSet::from(["solo".into()])));
    assert_eq!(u1["streams"].as_array().map(Vec::len), Some(2));
    let (_, cluster) = get(&node, "/api/cluster").await;
    assert_eq!(
        (cluster["nodes"][0]["node"].as_str(), cluster["nodes"][0]["streams"].as_u64()),
        (Some("solo"), Some(3))
    );

    let (status, page) = get(&node, "/api/connections?limit=2").await;
    assert_eq!(status, 200);
    let users: Vec<&str> =
        page["connections"].as_array().expect("page").iter().filter_map(|c| c["user"].as_str()).collect();
    assert_eq!(users, ["u1", "u2"]);
    let next = page["next"].as_str().expect("a next page").to_owned();
    let (_, page) = get(&node, &format!("/api/connections?limit=2&after={next}")).await;
    assert_eq!(page["connections"].as_array().map(Vec::len), Some(1));
    assert_eq!((page["connections"][0]["user"].as_str(), &page["next"]), (Some("u1"), &Value::Null));
    assert_eq!(page["connections"][0]["topics"], json!(["t"]));

    let revoke = http().delete(node.url("/api/users/u1/connections")).bearer_auth(admin()).send().await.expect("req");
    assert_eq!(revoke.status().as_u16(), 202);
    expect_revoked(&mut streams[0]).await;
    expect_revoked(&mut streams[2]).await;
    streams[1].assert_silent(Duration::from_millis(300)).await;
    until(&node, "/api/presence?users=u1,u2", Duration::from_secs(2), |b| {
        b == &json!({"users": {"u1": false, "u2": true}})
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_an_admin_token() {
    let node = Node::start(&[]).await;
    let paths = ["/api/presence/u1", "/api/presence?users=u1", "/api/connections", "/api/cluster"];
    let tokens = [(None, 401), (Some("not.a.token".to_owned()), 401), (Some(token("u1", &[], Some("publisher"))), 403)];
    for (token, status) in &tokens {
        for path in paths {
            let mut request = http().get(node.url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            assert_eq!(request.send().await.expect("request").status().as_u16(), *status, "GET {path}");
        }
        let mut request = http().delete(node.url("/api/users/u1/connections"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.expect("request").status().as_u16(), *status, "DELETE");
    }
    assert_eq!(get(&node, "/api/cluster").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_drops_a_topic_shows_in_presence() {
    let redis = RedisServer::start().await;
    let (a, b) = two_nodes(&redis, "30s").await;
    let exp = common::unix_now() + 3600;
    let first = common::token_with(json!({"sub": "dana", "exp": exp, "topics": ["keep", "drop"]}));
    let mut stream = SseClient::open(&a.url(&format!("/events?access_token={first}&topic=keep&topic=drop")), &[]).await;
    let id = stream.connected().await["connection_id"].as_str().expect("connection_id").to_owned();
    let topics_of = |p: &Value| p["streams"][0]["topics"].clone();
    until(&b, "/api/presence/dana", Duration::from_secs(5), |p| topics_of(p) == json!(["keep", "drop"])).await;

    let narrower = common::token_with(json!({"sub": "dana", "exp": exp, "topics": ["keep"]}));
    let response = http()
        .post(b.url(&format!("/api/connections/{id}/token")))
        .bearer_auth(narrower)
        .send()
        .await
        .expect("renewal request");
    assert_eq!(response.status().as_u16(), 204);
    let notice = stream.next_event(Duration::from_secs(5)).await.expect("topics_revoked");
    assert_eq!(notice.event, "topics_revoked");
    until(&b, "/api/presence/dana", Duration::from_secs(5), |p| topics_of(p) == json!(["keep"])).await;
}
