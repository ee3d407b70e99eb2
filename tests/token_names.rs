//! Drop-in for the hand-written modules this node replaces (issue 14, items 5 and 6): their
//! clients send `?token=` and the `access_token` cookie, and their users open many tabs. The
//! token names are configurable, in a documented order; a user's many tabs all get every event
//! with the defaults.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn open(node: &Node, query: &str, headers: &[(&str, &str)]) -> SseClient {
    SseClient::open(&node.url(&format!("/events?{query}")), headers).await
}

fn error_of(client: &SseClient) -> String {
    let body: Value = serde_json::from_str(client.body.as_deref().unwrap_or("null")).expect("a JSON error body");
    body["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seeds_token_names_work_by_default_in_the_documented_order() {
    let node = Node::start(&[("SSE_CORS_ORIGINS", "https://app.example")]).await;
    let good = token("seed-user", &[], None);

    // `?token=` and the `access_token` cookie, as the seeds' clients send them.
    let mut by_token = open(&node, &format!("token={good}"), &[]).await;
    assert_eq!(by_token.status, 200, "{:?}", by_token.body);
    assert_eq!(by_token.connected().await["user"], "seed-user");
    let cookie = format!("other=1; access_token={good}");
    let mut by_cookie = open(&node, "", &[("cookie", &cookie)]).await;
    assert_eq!(by_cookie.status, 200, "{:?}", by_cookie.body);
    by_cookie.connected().await;

    // Order: the header, then `access_token`, then `token`; then `sse_token`, then `access_token`.
    let header = format!("Bearer {good}");
    let over_header = open(&node, "access_token=bad&token=bad", &[("authorization", &header)]).await;
    assert_eq!(over_header.status, 200, "the header wins: {:?}", over_header.body);
    let first_query = open(&node, &format!("token={good}&access_token=bad"), &[]).await;
    assert_eq!((first_query.status, error_of(&first_query)), (401, "invalid_token".into()), "access_token comes first");
    let both_cookies = format!("access_token={good}; sse_token=bad");
    let first_cookie = open(&node, "", &[("cookie", &both_cookies)]).await;
    assert_eq!((first_cookie.status, error_of(&first_cookie)), (401, "invalid_token".into()), "sse_token comes first");
    let query_over_cookie = open(&node, &format!("token={good}"), &[("cookie", "sse_token=bad")]).await;
    assert_eq!(query_over_cookie.status, 200, "a query token comes before any cookie");

    // The cookie rules hold for every cookie name: a foreign origin is refused, and a cookie
    // never authorizes a publish.
    let foreign = open(&node, "", &[("cookie", &cookie), ("origin", "https://evil.example")]).await;
    assert_eq!((foreign.status, error_of(&foreign)), (403, "origin_not_allowed".into()));
    let publisher = token("producer", &[], Some("publisher"));
    let publish = http()
        .post(node.url(&format!("/api/publish?token={publisher}")))
        .header("cookie", format!("access_token={publisher}"))
        .json(&json!({"broadcast": true, "event": "x", "data": 1}))
        .send()
        .await
        .expect("publish");
    assert_eq!(publish.status(), 401);
    assert_eq!(publish.json::<Value>().await.expect("JSON")["error"], "bearer_required");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_names_are_configurable_and_an_empty_list_turns_a_source_off() {
    let node = Node::start(&[("SSE_TOKEN_QUERY_PARAMS", "jwt"), ("SSE_TOKEN_COOKIES", "")]).await;
    let good = token("configured", &[], None);
    let mut by_jwt = open(&node, &format!("jwt={good}"), &[]).await;
    assert_eq!(by_jwt.status, 200, "{:?}", by_jwt.body);
    by_jwt.connected().await;
    for (query, cookie) in [
        (format!("access_token={good}"), String::new()),
        (format!("token={good}"), String::new()),
        (String::new(), format!("sse_token={good}")),
        (String::new(), format!("access_token={good}")),
    ] {
        let headers: Vec<(&str, &str)> = if cookie.is_empty() { Vec::new() } else { vec![("cookie", cookie.as_str())] };
        let refused = open(&node, &query, &headers).await;
        assert_eq!((refused.status, error_of(&refused)), (401, "missing_token".into()), "{query} {cookie}");
    }
}

#[test]
fn a_token_name_that_is_not_a_plain_name_is_a_usage_error() {
    for (setting, value) in [("SSE_TOKEN_QUERY_PARAMS", "access_token,a&b"), ("SSE_TOKEN_COOKIES", "sse token")] {
        let output = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .env(setting, value)
            .output()
            .expect("run sse-fanout");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{setting}={value}: {stderr}");
        assert!(stderr.contains(setting), "the error names the setting: {stderr}");
    }
}

/// A user with 8 tabs in each of two browser profiles, spread over two nodes: with the default
/// per-user limit every tab opens and gets every event (a browser never retries a 429, so a tab
/// refused would silently receive nothing).
#[tokio::test(flavor = "multi_thread")]
async fn many_tabs_of_one_user_all_get_every_event_with_the_defaults() {
    let redis = RedisServer::start().await;
    let nodes =
        [Node::start(&[("SSE_REDIS_URL", &redis.url())]).await, Node::start(&[("SSE_REDIS_URL", &redis.url())]).await];
    for node in &nodes {
        node.wait_readyz(200, Duration::from_secs(10)).await;
    }
    let mut tabs = Vec::new();
    for tab in 0..16 {
        let node = &nodes[tab % 2];
        let mut client = open(node, &format!("access_token={}", token("many-tabs", &[], None)), &[]).await;
        assert_eq!(client.status, 200, "tab {tab}: {:?}", client.body);
        client.connected().await;
        tabs.push(client);
    }
    for n in 0..5 {
        let (status, body) = publish_api(&nodes[n % 2], json!({"users": ["many-tabs"], "event": "n", "data": n})).await;
        assert_eq!(status, 202, "{body}");
    }
    for (tab, client) in tabs.iter_mut().enumerate() {
        for n in 0..5 {
            let event = client.next_event(Duration::from_secs(5)).await;
            assert_eq!(event.map(|e| e.data), Ok(n.to_string()), "tab {tab}, event {n}");
        }
    }
}

/// docs/migrating.md's rewrite, from `nginx/legacy-paths.conf` as shipped, in a real nginx in
/// front of a node: an old path-style stream URL with `?token=` reaches its topic.
#[tokio::test(flavor = "multi_thread")]
async fn the_migration_guides_nginx_rewrite_serves_old_stream_urls() {
    let snippet =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/legacy-paths.conf")).expect("read");
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/migrating.md")).expect("read");
    let location = &snippet[snippet.find("location ").expect("a location block")..];
    assert!(guide.contains(location.trim_end()), "docs/migrating.md shows nginx/legacy-paths.conf as shipped");

    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    let include = format!("include {}/nginx/legacy-paths.conf;", env!("CARGO_MANIFEST_DIR"));
    let nginx = Nginx::start_with(&[node.port], |conf| {
        let at = conf.find("backlog=4096;").expect("the server's listen line") + "backlog=4096;".len();
        format!("{}\n        {include}\n{}", &conf[..at], &conf[at..])
    })
    .await;

    let jwt = token("player", &["rounds:*"], None);
    let mut stream = SseClient::open(&nginx.url(&format!("/stream/rounds/roulette/7/live?token={jwt}")), &[]).await;
    assert_eq!(stream.status, 200, "{:?}\n{}", stream.body, nginx.error_log());
    let connected = stream.connected().await;
    assert_eq!(connected["topics"], json!(["rounds:roulette:7"]), "{connected}");
    assert!(redis.publish("sse:topic:rounds:roulette:7", r#"{"event":"round","data":{"result":17}}"#).await >= 1);
    let event = stream.next_event(Duration::from_secs(5)).await.expect("the round's event");
    assert_eq!((event.event.as_str(), event.data.as_str()), ("round", r#"{"result":17}"#));
    // A topic outside the token's grants is refused through the rewrite too.
    let other = token("player", &["lobby"], None);
    let refused = SseClient::open(&nginx.url(&format!("/stream/rounds/roulette/7/live?token={other}")), &[]).await;
    assert_eq!(refused.status, 403);
}
