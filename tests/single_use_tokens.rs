//! `SSE_SINGLE_USE_QUERY_TOKENS`: a query token carries a `jti` and is accepted once across
//! the cluster (two nodes on one Redis, and the embedded bus), a replay is 401
//! `token_replayed`; tokens in a header or a cookie are unaffected; with the setting off a
//! query token opens any number of streams; while Redis is gone a ticket is refused, not
//! accepted unspent.

mod common;

use std::time::Duration;

use common::{Node, RedisServer, SseClient, http, token_with, unix_now};
use serde_json::{Value, json};

fn ticket(user: &str, jti: Option<&str>) -> String {
    let mut claims = json!({"sub": user, "exp": unix_now() + 300, "topics": ["news"]});
    if let Some(jti) = jti {
        claims["jti"] = json!(jti);
    }
    token_with(claims)
}

async fn single_use_node(redis: &RedisServer) -> Node {
    let node = Node::start(&[("SSE_REDIS_URL", redis.url().as_str()), ("SSE_SINGLE_USE_QUERY_TOKENS", "true")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    node
}

/// Opens a stream with `token` in the query; the status, and the error code of a refusal.
async fn open_with_query(node: &Node, token: &str) -> (u16, Option<String>) {
    let mut client = SseClient::open(&node.url(&format!("/events?access_token={token}&topic=news")), &[]).await;
    if client.status == 200 {
        client.connected().await;
        return (200, None);
    }
    let body: Value = client.body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (client.status, body["error"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_ticket_opens_one_stream_on_one_node_of_the_cluster() {
    let redis = RedisServer::start().await;
    let (a, b) = (single_use_node(&redis).await, single_use_node(&redis).await);
    let once = ticket("ticket-user", Some("jti-1"));
    assert_eq!(open_with_query(&a, &once).await, (200, None));
    // The same URL again, as EventSource would reconnect, on the other node and on the same one.
    assert_eq!(open_with_query(&b, &once).await, (401, Some("token_replayed".into())));
    assert_eq!(open_with_query(&a, &once).await, (401, Some("token_replayed".into())));
    assert_eq!(a.metric("sse_connections_rejected_total", "reason=\"token_replayed\"").await, 1.0);
    assert_eq!(b.metric("sse_connections_rejected_total", "reason=\"token_replayed\"").await, 1.0);
    // A fresh ticket opens a stream on the other node.
    assert_eq!(open_with_query(&b, &ticket("ticket-user", Some("jti-2"))).await, (200, None));
    // Spent in Redis for the token's remaining lifetime (about 300 s plus the 30 s leeway).
    let reply = redis.command(&["PTTL", "sse:jti:jti-1"]).await.expect("redis reachable");
    let ttl: i64 = reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("PTTL reply {reply:?}"));
    assert!((300_000..=331_000).contains(&ttl), "the spent ticket is kept {ttl} ms");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_token_without_jti_is_refused_and_headers_and_cookies_are_not_spent() {
    let redis = RedisServer::start().await;
    let node = single_use_node(&redis).await;
    let (status, code) = open_with_query(&node, &ticket("ticket-user", None)).await;
    assert_eq!((status, code.as_deref()), (401, Some("invalid_token")));

    let reusable = ticket("ticket-user", Some("jti-header"));
    let url = node.url("/events?topic=news");
    for _ in 0..3 {
        let bearer = format!("Bearer {reusable}");
        let mut stream = SseClient::open(&url, &[("Authorization", bearer.as_str())]).await;
        assert_eq!(stream.status, 200, "{:?}", stream.body);
        stream.connected().await;
        let cookie = format!("sse_token={reusable}");
        let mut stream = SseClient::open(&url, &[("Cookie", cookie.as_str())]).await;
        assert_eq!(stream.status, 200, "{:?}", stream.body);
        stream.connected().await;
    }
    // The header uses did not spend it: the first use in the query is accepted.
    assert_eq!(open_with_query(&node, &reusable).await, (200, None));
    assert_eq!(open_with_query(&node, &reusable).await.0, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_ticket_polls_history_once() {
    let redis = RedisServer::start().await;
    let node = single_use_node(&redis).await;
    let once = ticket("ticket-user", Some("jti-poll"));
    let poll = || http().get(node.url(&format!("/api/history?access_token={once}&topic=news"))).send();
    assert_eq!(poll().await.expect("GET /api/history").status(), 200);
    let replay = poll().await.expect("GET /api/history");
    assert_eq!(replay.status(), 401);
    let body: Value = replay.json().await.expect("JSON body");
    assert_eq!(body["error"], "token_replayed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_bus_spends_tickets_too_and_the_default_does_not() {
    let single = Node::start(&[("SSE_SINGLE_USE_QUERY_TOKENS", "true")]).await;
    let once = ticket("ticket-user", Some("jti-memory"));
    assert_eq!(open_with_query(&single, &once).await, (200, None));
    assert_eq!(open_with_query(&single, &once).await, (401, Some("token_replayed".into())));

    let default = Node::start(&[]).await;
    for _ in 0..3 {
        assert_eq!(open_with_query(&default, &once).await, (200, None), "query tokens are reusable by default");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_a_ticket_is_refused_not_accepted_unspent() {
    let mut redis = RedisServer::start().await;
    let node = single_use_node(&redis).await;
    redis.kill();
    let (status, _) = open_with_query(&node, &ticket("ticket-user", Some("jti-down"))).await;
    assert_eq!(status, 503, "a ticket that cannot be spent must not open a stream");
}
