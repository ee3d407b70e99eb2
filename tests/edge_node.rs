//! The stream path end to end: real `redis-server`, real node processes, real HTTP clients.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

/// Reads a raw socket until `needle` has arrived; everything read so far.
async fn read_until(socket: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tokio::time::timeout(WAIT, socket.read(&mut buf)).await.expect("in time").expect("read");
        assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_redis_reaches_its_user_topic_and_broadcast_listeners_on_any_node() {
    let redis = RedisServer::start().await;
    let a = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_NODE_ID", "node-a")]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_NODE_ID", "node-b")]).await;
    a.wait_readyz(200, WAIT).await;
    b.wait_readyz(200, WAIT).await;

    let mut alice = subscribe(&a, "alice", &["news"]).await;
    let mut bob = subscribe(&b, "bob", &[]).await;

    assert_eq!(redis.publish("sse:user:alice", r#"{"event":"notification","data":{"n":1}}"#).await, 1);
    assert_eq!(redis.publish("sse:topic:news", r#"{"event":"headline","data":"multi\nline","id":"h1"}"#).await, 1);
    assert_eq!(redis.publish("sse:broadcast", "plain text").await, 2, "both nodes hold a broadcast listener");

    let e = alice.next_event(WAIT).await.expect("user event");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("notification", r#"{"n":1}"#));
    let e = alice.next_event(WAIT).await.expect("topic event");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("headline", "multi\nline"));
    assert_ne!(e.id.as_deref(), Some("h1"), "with history on, SSE ids are resume cursors, never a producer's id");
    let e = alice.next_event(WAIT).await.expect("broadcast event");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("message", "plain text"));

    // Bob, on the other node, saw only the broadcast: never Alice's user or topic messages.
    let e = bob.next_event(WAIT).await.expect("broadcast event");
    assert_eq!(e.data, "plain text");
    // A sentinel behind them on the same Redis: had Alice's messages reached Bob, they would
    // come first (one subscriber connection delivers in order).
    assert_eq!(redis.publish("sse:broadcast", "sentinel").await, 2);
    assert_eq!(bob.next_event(WAIT).await.expect("the sentinel").data, "sentinel");
}

#[tokio::test(flavor = "multi_thread")]
async fn producer_ids_are_written_when_history_is_off() {
    let node = Node::start(&[("SSE_HISTORY", "false")]).await;
    let mut stream = subscribe(&node, "zoe", &[]).await;
    let (status, _) = publish_api(&node, json!({"users": ["zoe"], "data": 1, "id": "order-17"})).await;
    assert_eq!(status, 202);
    assert_eq!(stream.next_event(WAIT).await.expect("event").id.as_deref(), Some("order-17"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stream_of_one_user_receives_across_nodes() {
    let redis = RedisServer::start().await;
    let a = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut streams = Vec::new();
    for node in [&a, &b, &a, &b, &a] {
        streams.push(subscribe(node, "carol", &[]).await);
    }
    // Each node subscribed once to the user channel, however many streams it holds.
    assert_eq!(redis.publish("sse:user:carol", r#"{"data":"hi all"}"#).await, 2);
    for stream in &mut streams {
        assert_eq!(stream.next_event(WAIT).await.expect("event").data, "hi all");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_work_as_a_first_request_and_after_another_on_a_kept_alive_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = Node::start(&[]).await;
    let token = token("kim", &[], None);
    // Raw path: /events first, over HTTP/1.1 (chunked) and HTTP/1.0 (close-delimited).
    let mut raw = Vec::new();
    for version in ["1.1", "1.0"] {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
        let request = format!("GET /events?access_token={token} HTTP/{version}\r\nHost: x\r\n\r\n");
        socket.write_all(request.as_bytes()).await.expect("write");
        let head = read_until(&mut socket, "event: connected").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert_eq!(head.contains("transfer-encoding: chunked"), version == "1.1", "{head}");
        raw.push((version, socket));
    }
    // Hyper path: a kept-alive connection that asked for something else first.
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let health = read_until(&mut socket, "\"ok\"}").await;
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    let request = format!("GET /events?access_token={token} HTTP/1.1\r\nHost: x\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let stream = read_until(&mut socket, "event: connected").await;
    assert!(stream.contains("text/event-stream"), "{stream}");
    assert_eq!(publish_api(&node, json!({"users": ["kim"], "data": "to every path"})).await.0, 202);
    read_until(&mut socket, "to every path").await;
    // The raw path writes events itself: one chunk per event over HTTP/1.1, bare over HTTP/1.0.
    for (version, mut socket) in raw {
        let seen = read_until(&mut socket, "data: to every path\n\n").await;
        if version == "1.1" {
            let seen = read_until_more(&mut socket, seen.clone(), "\n\n\r\n").await;
            // `<size>\r\n<id: cursor>\ndata: to every path\n\n\r\n`: the size matches the content.
            let content_end = seen.len() - 2;
            let content_start = seen[..content_end].rfind("\r\n").expect("chunk-size line") + 2;
            let size_start = seen[..content_start - 2].rfind("\r\n").map_or(0, |i| i + 2);
            let size = usize::from_str_radix(&seen[size_start..content_start - 2], 16).expect("hex size");
            assert_eq!(size, content_end - content_start, "{seen:?}");
            assert!(seen[content_start..content_end].ends_with("data: to every path\n\n"), "{seen:?}");
        } else {
            assert!(!seen.contains("\r\n"), "no chunk framing over HTTP/1.0: {seen:?}");
        }
    }

    async fn read_until_more(socket: &mut tokio::net::TcpStream, seen: String, needle: &str) -> String {
        let mut seen = seen.into_bytes();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).ends_with(needle) {
            let n = tokio::time::timeout(WAIT, socket.read(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0, "closed before {needle:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connected_event_names_connection_node_user_and_topics() {
    let node = Node::start(&[("SSE_NODE_ID", "edge-7")]).await;
    let token = token("dave", &["rounds:*"], None);
    let mut stream =
        SseClient::open(&node.url(&format!("/events?topic=rounds:roulette:7&access_token={token}")), &[]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert!(stream.headers["cache-control"].to_str().expect("ascii").contains("no-cache"));
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    let (first, retries) = stream.next_event_with_retries(WAIT).await.expect("connected");
    assert_eq!(first.event, "connected");
    assert_eq!(retries, [3000], "retry is sent once, before connected");
    let data: serde_json::Value = serde_json::from_str(&first.data).expect("json");
    assert_eq!(data["node_id"], "edge-7");
    assert_eq!(data["user"], "dave");
    assert_eq!(data["topics"], json!(["rounds:roulette:7"]));
    assert!(data["connection_id"].as_str().expect("id").starts_with("edge-7:"));
}

/// Everything a stream carries, in order, until `done(items)` or the end; panics after 20 s.
async fn read_items(stream: &mut SseClient, items: &mut Vec<Received>, done: impl Fn(&[Received]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(items) && items.last() != Some(&Received::End) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left).await {
            Some(item) => items.push(item),
            None => panic!("timed out; the stream so far: {items:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_is_sent_once_per_stream_and_again_only_with_the_drain_farewell() {
    let mut node =
        Node::start(&[("SSE_HEARTBEAT_INTERVAL", "1s"), ("SSE_RETRY_INTERVAL", "2s"), ("SSE_DRAIN_PERIOD", "1s")])
            .await;
    let mut stream = SseClient::open(&stream_url(&node, "rita", &["news"]), &[]).await;
    assert_eq!(stream.status, 200);
    let mut items = Vec::new();
    // Events of every kind (durable with an `id:`, live without; user, topic, broadcast) and
    // heartbeats between them.
    let events = [
        json!({"users": ["rita"], "event": "m", "data": "durable"}),
        json!({"users": ["rita"], "event": "m", "data": "live", "durable": false}),
        json!({"topics": ["news"], "event": "m", "data": "topic"}),
        json!({"broadcast": true, "event": "m", "data": "broadcast"}),
    ];
    let is_event = |item: &Received| matches!(item, Received::Event(e) if e.event == "m");
    let pings = |items: &[Received]| items.iter().filter(|i| matches!(i, Received::Comment(c) if c == "ping")).count();
    read_items(&mut stream, &mut items, |items| items.iter().any(|i| matches!(i, Received::Event(_)))).await;
    for (n, event) in events.iter().enumerate() {
        assert_eq!(publish_api(&node, event.clone()).await.0, 202);
        read_items(&mut stream, &mut items, |items| items.iter().filter(|i| is_event(i)).count() > n).await;
        let seen = pings(&items);
        read_items(&mut stream, &mut items, |items| pings(items) > seen).await;
    }
    node.signal("TERM");
    read_items(&mut stream, &mut items, |_| false).await;
    assert_eq!(node.wait_exit(Duration::from_secs(15)).await, Some(0));

    let retries: Vec<usize> =
        items.iter().enumerate().filter(|(_, i)| matches!(i, Received::Retry(_))).map(|(at, _)| at).collect();
    let kinds: Vec<String> = items.iter().map(|i| format!("{i:?}").chars().take(60).collect()).collect();
    assert_eq!(retries.len(), 2, "retry once at the start and once with the farewell: {kinds:#?}");
    assert_eq!(items[0], Received::Retry(2000), "{kinds:#?}");
    assert!(matches!(&items[1], Received::Event(e) if e.event == "connected"), "{kinds:#?}");
    let Received::Event(farewell) = &items[retries[1] + 1] else {
        panic!("the drain's retry precedes its farewell: {kinds:#?}")
    };
    assert_eq!((farewell.event.as_str(), farewell.data.as_str()), ("disconnected", r#"{"reason":"shutdown"}"#));
    assert_eq!(&items[retries[1] + 2..], [Received::End], "the farewell is the last thing: {kinds:#?}");
    assert_eq!(items.iter().filter(|i| is_event(i)).count(), events.len(), "{kinds:#?}");
    assert!(pings(&items) >= events.len(), "{kinds:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_read_from_header_then_query_then_cookie() {
    let node = Node::start(&[]).await;
    let good = token("erin", &[], None);
    let bad = "not-a-token";
    let url = node.url("/events");
    let by_header = SseClient::open(&url, &[("authorization", &format!("Bearer {good}"))]).await;
    assert_eq!(by_header.status, 200);
    let by_cookie = SseClient::open(&url, &[("cookie", &format!("theme=dark; sse_token={good}"))]).await;
    assert_eq!(by_cookie.status, 200);
    let by_query = SseClient::open(&node.url(&format!("/events?access_token={good}")), &[]).await;
    assert_eq!(by_query.status, 200);
    // The header wins over a good query token: a bad header is a 401.
    let header_first = SseClient::open(
        &node.url(&format!("/events?access_token={good}")),
        &[("authorization", &format!("Bearer {bad}"))],
    )
    .await;
    assert_eq!(header_first.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_requests_get_their_status_and_a_short_json_error() {
    let node = Node::start(&[("SSE_CORS_ORIGINS", "https://app.example"), ("SSE_MAX_CONNECTIONS_PER_USER", "1")]).await;
    // (url, extra headers, expected status, expected error code)
    type Case<'a> = (String, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (node.url("/events"), vec![], 401, "missing_token"),
        (node.url("/events?access_token=garbage"), vec![], 401, "invalid_token"),
        (
            node.url(&format!("/events?access_token={}", token_with(json!({"sub": "x", "exp": unix_now() - 3600})))),
            vec![],
            401,
            "invalid_token",
        ),
        (
            node.url(&format!("/events?topic=secret&access_token={}", token("x", &["public:*"], None))),
            vec![],
            403,
            "topic_not_allowed",
        ),
        (
            node.url(&format!("/events?topic=bad%20name&access_token={}", token("x", &["*"], None))),
            vec![],
            400,
            "invalid_request",
        ),
        (
            node.url(&format!("/events?access_token={}", token("x", &[], None))),
            vec![("origin", "https://evil.example".to_owned())],
            403,
            "origin_not_allowed",
        ),
    ];
    for (url, headers, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = SseClient::open(&url, &headers).await;
        assert_eq!(response.status, status, "{url}: {:?}", response.body);
        let body: serde_json::Value = serde_json::from_str(response.body.as_deref().unwrap_or("")).expect("JSON body");
        assert_eq!(body["error"], code, "{url}");
        assert!(body["message"].is_string());
    }
    // An allowed origin works and gets CORS headers.
    let ok = SseClient::open(
        &node.url(&format!("/events?access_token={}", token("y", &[], None))),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["access-control-allow-origin"], "https://app.example");
    // Per-user limit 1, policy reject: the second stream is a 429.
    let second = SseClient::open(&node.url(&format!("/events?access_token={}", token("y", &[], None))), &[]).await;
    assert_eq!(second.status, 429, "{:?}", second.body);
    assert!(second.body.as_deref().unwrap_or("").contains("user_limit"));
    node.wait_metric("sse_connections_rejected_total", r#"reason="user_limit""#, 1.0).await;
    node.wait_metric("sse_connections_rejected_total", r#"reason="unauthorized""#, 3.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_stream_replaces_the_oldest_one_with_evict_oldest() {
    // A limit of 2, so the oldest stream is told apart from any other one.
    let node = Node::start(&[("SSE_MAX_CONNECTIONS_PER_USER", "2"), ("SSE_PER_USER_POLICY", "evict-oldest")]).await;
    let mut oldest = subscribe(&node, "frank", &[]).await;
    let mut middle = subscribe(&node, "frank", &[]).await;
    let mut newest = subscribe(&node, "frank", &[]).await;
    let farewell = oldest.next_event(WAIT).await.expect("disconnected");
    assert_eq!(farewell.event, "disconnected");
    assert_eq!(farewell.data, r#"{"reason":"replaced"}"#);
    assert_eq!(oldest.next(WAIT).await, Some(Received::End));
    let (status, _) = publish_api(&node, json!({"users": ["frank"], "data": "to the two left"})).await;
    assert_eq!(status, 202);
    for stream in [&mut middle, &mut newest] {
        assert_eq!(stream.next_event(WAIT).await.expect("event").data, "to the two left");
    }
    // A fourth replaces the one that is now the oldest.
    let mut fourth = subscribe(&node, "frank", &[]).await;
    assert_eq!(middle.next_event(WAIT).await.expect("disconnected").data, r#"{"reason":"replaced"}"#);
    assert_eq!(publish_api(&node, json!({"users": ["frank"], "data": "again"})).await.0, 202);
    for stream in [&mut newest, &mut fourth] {
        assert_eq!(stream.next_event(WAIT).await.expect("event").data, "again");
    }
    node.wait_metric("sse_connections_closed_total", r#"reason="replaced""#, 2.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_node_answers_503() {
    let node = Node::start(&[("SSE_MAX_CONNECTIONS", "1")]).await;
    let _only = subscribe(&node, "g1", &[]).await;
    let refused = SseClient::open(&node.url(&format!("/events?access_token={}", token("g2", &[], None))), &[]).await;
    assert_eq!(refused.status, 503);
    assert!(refused.body.as_deref().unwrap_or("").contains("node_full"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_payload_is_counted_and_the_stream_keeps_delivering() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut stream = subscribe(&node, "henry", &[]).await;
    redis.publish("sse:user:henry", r#"{"event":"x\ndata: injected","data":1}"#).await;
    redis.publish("sse:user:henry", r#"{"data":1,"id":"1\n\nevent: evil"}"#).await;
    redis.publish("sse:user:henry", "\u{fffd}not json at all {").await;
    // Bytes that are not UTF-8, in an envelope and bare: refused, not replaced by U+FFFD.
    redis.publish_bytes("sse:user:henry", b"{\"data\":\"caf\xe9\"}").await;
    redis.publish_bytes("sse:user:henry", b"\xff\xfe plain").await;
    redis.publish("sse:user:henry", r#"{"event":"ok","data":"next"}"#).await;
    let e = stream.next_event(WAIT).await.expect("verbatim");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("message", "\u{fffd}not json at all {"));
    let e = stream.next_event(WAIT).await.expect("next");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("ok", "next"));
    node.wait_metric("sse_messages_refused_total", r#"reason="bad_event_name""#, 1.0).await;
    node.wait_metric("sse_messages_refused_total", r#"reason="bad_id""#, 1.0).await;
    node.wait_metric("sse_messages_refused_total", r#"reason="not_utf8""#, 2.0).await;
    assert!(node.log_text().contains("refused a published payload"));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_turns_readyz_503_then_200_and_delivery_resumes() {
    let mut redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut stream = subscribe(&node, "ivy", &["news"]).await;

    redis.kill();
    node.wait_readyz(503, WAIT).await;
    let refused = SseClient::open(&node.url(&format!("/events?access_token={}", token("ivy2", &[], None))), &[]).await;
    assert_eq!(refused.status, 503, "no new streams while the bus is down");

    redis.restart().await;
    node.wait_readyz(200, Duration::from_secs(20)).await;
    // The node re-subscribed by itself: the old stream gets a new message without reconnecting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redis.publish("sse:topic:news", r#"{"data":"after restart"}"#).await != 1 {
        assert!(std::time::Instant::now() < deadline, "the node never re-subscribed after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // History is on: the restarted Redis lost the history the stream's channels were in.
    read_history_lost(&mut stream, &["user:ivy", "broadcast", "topic:news"]).await;
    assert_eq!(stream.next_event(WAIT).await.expect("event").data, "after restart");
    let mut fresh = subscribe(&node, "ivy3", &[]).await;
    redis.publish("sse:user:ivy3", r#"{"data":"fresh"}"#).await;
    assert_eq!(fresh.next_event(WAIT).await.expect("event").data, "fresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_bus_needs_no_redis() {
    let node = Node::start(&[]).await;
    node.wait_readyz(200, WAIT).await;
    let mut stream = subscribe(&node, "jack", &["chat:1"]).await;
    for (body, expected) in [
        (json!({"users": ["jack"], "event": "dm", "data": {"t": "hi"}}), ("dm", r#"{"t":"hi"}"#)),
        (json!({"topics": ["chat:1"], "data": "room"}), ("message", "room")),
        (json!({"broadcast": true, "event": "all", "data": 3}), ("all", "3")),
    ] {
        let (status, reply) = publish_api(&node, body).await;
        assert_eq!(status, 202, "{reply}");
        let e = stream.next_event(WAIT).await.expect("event");
        assert_eq!((e.event.as_str(), e.data.as_str()), expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_publish_api_validates_credentials_and_input() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_MAX_PUBLISH_BYTES", "1024")]).await;
    node.wait_readyz(200, WAIT).await;
    let mut stream = subscribe(&node, "kate", &[]).await;

    let plain = json!({"users": ["kate", "nobody"], "event": "n", "data": [1, 2], "durable": false});
    let (status, body) = publish_api(&node, plain).await;
    assert_eq!(status, 202);
    assert_eq!(body, json!({"channels": 2, "receivers": 1}));
    assert_eq!(stream.next_event(WAIT).await.expect("event").data, "[1,2]");
    let (status, body) = publish_api(&node, json!({"users": ["kate"], "data": "durable"})).await;
    assert_eq!(status, 202);
    assert_eq!(body["channels"], 1);
    assert!(body["ids"][0].as_str().expect("a history id").contains('-'), "{body}");
    assert_eq!(stream.next_event(WAIT).await.expect("event").data, "durable");

    for (bad, field) in [
        (json!({"data": 1}), "users"),
        (json!({"users": ["kate"]}), "data"),
        (json!({"users": [""], "data": 1}), "users[0]"),
        (json!({"users": ["kate"], "data": 1, "event": "a\nb"}), "event"),
        (json!({"users": ["kate"], "data": 1, "extra": true}), "extra"),
    ] {
        let (status, body) = publish_api(&node, bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["field"], field, "{bad}");
    }
    let url = node.url("/api/publish");
    let anonymous = http().post(&url).json(&json!({"broadcast": true, "data": 1})).send().await.expect("post");
    assert_eq!(anonymous.status(), 401);
    let subscriber = http()
        .post(&url)
        .bearer_auth(token("kate", &[], None))
        .json(&json!({"broadcast": true, "data": 1}))
        .send()
        .await;
    assert_eq!(subscriber.expect("post").status(), 403);
    let huge = json!({"broadcast": true, "data": "x".repeat(2000)});
    let too_large =
        http().post(&url).bearer_auth(token("p", &[], Some("publisher"))).json(&huge).send().await.expect("post");
    assert_eq!(too_large.status(), 413);
    let body: serde_json::Value = too_large.json().await.expect("json");
    assert_eq!(body["error"], "too_large");
    // Nothing refused was published: the next event Kate sees is a sentinel sent after them all.
    assert_eq!(publish_api(&node, json!({"users": ["kate"], "data": "sentinel"})).await.0, 202);
    assert_eq!(stream.next_event(WAIT).await.expect("the sentinel").data, "sentinel");
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_arrive_at_the_configured_interval() {
    // 3 s: a ping every tick (1 s) or every other tick (2 s) is told apart from the setting even
    // when a loaded machine delays a tick by most of a second.
    let node = Node::start(&[("SSE_HEARTBEAT_INTERVAL", "3s")]).await;
    let mut stream = subscribe(&node, "liam", &[]).await;
    let mut pings = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pings.len() < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next(left).await {
            Some(Received::Comment(c)) => {
                assert_eq!(c, "ping");
                pings.push(std::time::Instant::now());
            }
            Some(other) => panic!("expected only pings, got {other:?}"),
            None => panic!("{} pings in 15 s at a 3 s interval", pings.len()),
        }
    }
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (Duration::from_millis(2200)..=Duration::from_millis(4500)).contains(&gap),
            "a ping {gap:?} after the previous one, with a 3 s interval"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_closed_when_its_token_expires() {
    let node = Node::start(&[("SSE_JWT_LEEWAY", "0")]).await;
    let exp = unix_now() + 3;
    let token = token_with(json!({"sub": "mia", "exp": exp}));
    let mut stream = SseClient::open(&node.url(&format!("/events?access_token={token}")), &[]).await;
    assert_eq!(stream.status, 200);
    stream.connected().await;
    // Warned first: its exp is nearer than SSE_TOKEN_EXPIRY_WARNING (60 s).
    let warning = stream.next_event(Duration::from_secs(3)).await.expect("token_expiring");
    assert_eq!(warning.event, "token_expiring", "{warning:?}");
    let farewell = stream.next_event(Duration::from_secs(10)).await.expect("disconnected");
    assert_eq!(farewell.data, r#"{"reason":"token_expired"}"#);
    // Not before `exp` (same clock as the node's): a stream closed at once would fail here.
    assert!(unix_now() >= exp, "closed at {} before exp {exp}", unix_now());
    assert_eq!(stream.next(WAIT).await, Some(Received::End));
}

/// How far a timeout may run late: the node checks timeouts on a one-second tick, and a
/// loaded two-core machine delays the tick and the client.
const TICK_MARGIN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_closed_after_its_lifetime_and_not_before() {
    let node = Node::start(&[("SSE_MAX_CONNECTION_LIFETIME", "3s")]).await;
    let asked = std::time::Instant::now();
    let mut stream = subscribe(&node, "p1", &[]).await;
    let farewell = stream.next_event(Duration::from_secs(3) + TICK_MARGIN).await.expect("lifetime farewell");
    assert_eq!(farewell.data, r#"{"reason":"lifetime"}"#);
    // The lifetime is measured on the node from after the request arrived: exact lower bound.
    let lived = asked.elapsed();
    assert!(lived >= Duration::from_secs(3), "closed after {lived:?}, before its 3 s lifetime");
    node.wait_metric("sse_connections_closed_total", r#"reason="lifetime""#, 1.0).await;
}

/// `SSE_CONNECTION_TIMEOUT` in the inactivity test. The node checks timeouts on its one-second
/// tick against a whole-second clock that the tick advances: on time, a stream is closed between
/// `INACTIVITY - CLOCK_STEP` and `INACTIVITY` after its last event. A late tick closes it later
/// (by up to [`TICK_MARGIN`] here), and leaves the clock stale for events meanwhile, which can
/// close it earlier by as much (up to [`EARLY_MARGIN`] here).
const INACTIVITY: Duration = Duration::from_secs(4);
const CLOCK_STEP: Duration = Duration::from_secs(1);
const EARLY_MARGIN: Duration = Duration::from_secs(1);
/// How often the active stream gets an event: far below the soonest it could be closed
/// (`INACTIVITY - CLOCK_STEP - EARLY_MARGIN`, 2 s).
const KEEP_EVERY: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread")]
async fn an_inactive_stream_is_closed_and_events_keep_one_open() {
    let node = Node::start(&[("SSE_CONNECTION_TIMEOUT", "4s"), ("SSE_HEARTBEAT_INTERVAL", "1s")]).await;
    let asked = std::time::Instant::now();
    let mut inactive = subscribe(&node, "p2", &[]).await;
    let mut active = subscribe(&node, "p3", &[]).await;
    // The inactive stream's end is waited for beside the keep-alive below.
    let ended = tokio::spawn(async move {
        let farewell = inactive.next_event(INACTIVITY + TICK_MARGIN).await;
        (farewell, asked.elapsed(), inactive)
    });
    // An event for the active stream every KEEP_EVERY, each read back before the next is sent,
    // until the inactive one was closed and the active one has outlived the latest moment its
    // timeout could have closed it.
    let mut kept = 0;
    let mut longest_gap = Duration::ZERO;
    let mut last = std::time::Instant::now();
    while !ended.is_finished() || asked.elapsed() <= INACTIVITY + TICK_MARGIN {
        tokio::time::sleep(KEEP_EVERY).await;
        let data = format!("keep {kept}");
        assert_eq!(publish_api(&node, json!({"users": ["p3"], "data": data})).await.0, 202);
        let event = active.next_event(WAIT).await.unwrap_or_else(|e| {
            panic!(
                "the active stream ended after {:?} ({kept} events, {longest_gap:?} at most between two): {e:?}",
                asked.elapsed()
            )
        });
        assert_eq!(event.data, data, "events keep a stream active");
        longest_gap = longest_gap.max(last.elapsed());
        last = std::time::Instant::now();
        kept += 1;
    }
    let (farewell, idle, mut inactive) = ended.await.expect("the inactive stream's reader");
    let farewell = farewell.expect("inactivity farewell");
    assert_eq!(farewell.data, r#"{"reason":"inactive"}"#, "heartbeats do not count as activity");
    // Measured from before the request, so never shorter than the node's own idle time.
    let soonest = INACTIVITY - CLOCK_STEP - EARLY_MARGIN;
    assert!(idle >= soonest, "closed after {idle:?} of a {INACTIVITY:?} inactivity timeout");
    assert_eq!(inactive.next_event(WAIT).await, Err(NoEvent::End));
    node.wait_metric("sse_connections_closed_total", r#"reason="inactive""#, 1.0).await;
    assert_eq!(node.metric("sse_active_connections", "").await, 1.0, "the active stream is open");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_streams_in_paced_batches_with_a_jittered_retry_and_exits_zero() {
    let mut node = Node::start(&[("SSE_DRAIN_PERIOD", "2s"), ("SSE_RETRY_INTERVAL", "2s")]).await;
    // 20 streams over 2 s: one every 100 ms step.
    let mut streams = Vec::new();
    for i in 0..20 {
        streams.push(subscribe(&node, &format!("n{i}"), &[]).await);
    }
    let sigterm = std::time::Instant::now();
    node.signal("TERM");
    node.wait_readyz(503, WAIT).await;
    let ready = http().get(node.url("/readyz")).send().await.expect("readyz");
    let body: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("not_ready"), Some("draining")));
    let refused = SseClient::open(&node.url(&format!("/events?access_token={}", token("late", &[], None))), &[]).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.body.as_deref().unwrap_or("").contains(r#""error":"draining""#), "{:?}", refused.body);

    // Each stream waits for its own farewell, so the arrival times are the node's pacing.
    let farewells = futures_util::future::join_all(streams.iter_mut().map(|stream| async {
        let got = stream.next_event_with_retries(Duration::from_secs(15)).await;
        (got, sigterm.elapsed())
    }))
    .await;
    let mut retries = std::collections::BTreeSet::new();
    let mut arrivals = Vec::new();
    for (got, at) in farewells {
        // `subscribe` read the preamble's retry with `connected`: this one is the drain's.
        let (farewell, seen) = got.expect("disconnected");
        assert_eq!(farewell.data, r#"{"reason":"shutdown"}"#);
        let &[retry] = seen.as_slice() else { panic!("one retry before the farewell, got {seen:?}") };
        assert!((1000..=3000).contains(&retry), "{retry}");
        retries.insert(retry);
        arrivals.push(at);
    }
    // Jittered: 20 draws from 2001 values are all different but for a rare pair.
    assert!(retries.len() >= 15, "retries not jittered: {retries:?}");
    // Paced: the 20 farewells went out over about 1.9 s, not at once. The margins allow for a
    // loaded machine delaying any step (late, not early: a shorter spread is the failure).
    let (first, last) = (arrivals.iter().min().copied(), arrivals.iter().max().copied());
    let spread = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
    assert!(spread >= Duration::from_millis(1200), "farewells spread over {spread:?} of a 2 s drain: {arrivals:?}");
    assert!(last.unwrap_or_default() <= Duration::from_secs(7), "the last farewell came {last:?} after SIGTERM");
    for stream in &mut streams {
        assert_eq!(stream.next(WAIT).await, Some(Received::End));
    }
    assert_eq!(node.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_drains_too_and_a_second_signal_skips_the_rest_of_the_drain() {
    // 60 streams at one per 100 ms step: a full drain would take 6 s.
    let mut node = Node::start(&[("SSE_DRAIN_PERIOD", "60s")]).await;
    let mut streams = Vec::new();
    for i in 0..60 {
        streams.push(subscribe(&node, &format!("q{i}"), &[]).await);
    }
    node.signal("INT");
    node.wait_readyz(503, WAIT).await;
    // The drain has begun: some stream got its farewell.
    let first = futures_util::future::select_all(
        streams.iter_mut().map(|stream| Box::pin(async { stream.next_event(Duration::from_secs(10)).await })),
    )
    .await
    .0
    .expect("a first farewell");
    assert_eq!(first.data, r#"{"reason":"shutdown"}"#);
    node.signal("TERM");
    assert_eq!(node.wait_exit(Duration::from_secs(15)).await, Some(0));
    // The rest was skipped: most streams ended without a farewell.
    let mut farewells = 0;
    for stream in &mut streams {
        loop {
            match stream.next_event(WAIT).await {
                Ok(e) if e.event == "disconnected" => farewells += 1,
                Ok(e) => panic!("unexpected {e:?}"),
                Err(NoEvent::Timeout) => panic!("a stream outlived its node"),
                Err(_) => break,
            }
        }
    }
    assert!(farewells < 40, "{farewells} of 60 streams got a farewell: the drain was not cut short");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_need_an_admin_token() {
    let node = Node::start(&[("SSE_NODE_ID", "stats-node")]).await;
    let _s = subscribe(&node, "olga", &["t1"]).await;
    let url = node.url("/api/stats");
    let denied = http().get(&url).bearer_auth(token("olga", &[], None)).send().await.expect("get");
    assert_eq!(denied.status(), 403);
    let stats: serde_json::Value = http()
        .get(&url)
        .bearer_auth(token("ops", &[], Some("admin")))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["node_id"], "stats-node");
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["users"], 1);
    assert_eq!(stats["channels"], 3);
    assert!(stats["memory"]["rss_bytes"].as_u64().expect("rss") > 0);
    node.wait_metric("sse_active_connections", "", 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fan_out_is_timed() {
    let node = Node::start(&[]).await;
    let mut a = subscribe(&node, "ines", &[]).await;
    let mut b = subscribe(&node, "ines", &[]).await;
    assert_eq!(node.metric("sse_fanout_duration_seconds_count", "").await, 0.0);
    assert_eq!(publish_api(&node, json!({"users": ["ines"], "data": "both"})).await.0, 202);
    for stream in [&mut a, &mut b] {
        stream.next_event(Duration::from_secs(5)).await.expect("delivered");
    }
    // One message to two streams is one fan-out. The histogram is recorded once the fan-out
    // returns, which can be just after a client read its event: wait for it, then make sure
    // no second record follows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while node.metric("sse_fanout_duration_seconds_count", "").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the fan-out was never timed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.metric("sse_fanout_duration_seconds_count", "").await, 1.0);
    assert!(node.metric("sse_fanout_duration_seconds_bucket", r#"le="1""#).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn development_mode_prints_working_tokens_and_serves_the_demo() {
    let node = Node::start_raw(&[]).await;
    let out = node.stdout_text();
    assert!(out.contains("DEVELOPMENT MODE"), "{out}");
    let token_after = |label: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|t| t.trim().to_owned()))
            .unwrap_or_else(|| panic!("{label} in {out}"))
    };
    let subscriber = token_after("Subscriber token:");
    let publisher = token_after("Publisher token:");
    let mut stream = SseClient::open(&node.url(&format!("/events?topic=news&access_token={subscriber}")), &[]).await;
    assert_eq!(stream.status, 200);
    stream.connected().await;
    let published = http()
        .post(node.url("/api/publish"))
        .bearer_auth(&publisher)
        .json(&json!({"topics": ["news"], "data": "from dev"}))
        .send()
        .await
        .expect("post");
    assert_eq!(published.status(), 202);
    assert_eq!(stream.next_event(WAIT).await.expect("event").data, "from dev");
    let page = http().get(node.url("/")).send().await.expect("get");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("new EventSource"));

    let production = Node::start(&[]).await;
    assert_eq!(http().get(production.url("/")).send().await.expect("get").status(), 404);
    assert!(!production.stdout_text().contains("DEVELOPMENT MODE"));
}

#[tokio::test(flavor = "multi_thread")]
async fn es256_public_keys_are_accepted_and_hs256_tokens_then_refused() {
    let dir = scratch_dir("es256");
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl").args(args).status().expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = dir.join("ec.pem");
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ec.to_str().expect("path")]);
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        ec.to_str().expect("path"),
        "-out",
        private.to_str().expect("path"),
    ]);
    openssl(&["ec", "-in", ec.to_str().expect("path"), "-pubout", "-out", public.to_str().expect("path")]);

    let node = Node::start_raw(&[("SSE_JWT_PUBLIC_KEY", public.to_str().expect("path"))]).await;
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&private).expect("pem")).expect("ec key");
    let claims = json!({"sub": "pia", "exp": unix_now() + 60});
    let es256 =
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &key).expect("sign");
    let ok = SseClient::open(&node.url(&format!("/events?access_token={es256}")), &[]).await;
    assert_eq!(ok.status, 200);
    // An HS256 token signed with the public key's bytes (algorithm confusion) is refused.
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&std::fs::read(&public).expect("pem")),
    )
    .expect("sign");
    let refused = SseClient::open(&node.url(&format!("/events?access_token={confused}")), &[]).await;
    assert_eq!(refused.status, 401);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw HTTP/1.1 stream whose reading the test controls (reqwest always reads).
async fn open_raw_stream(node: &Node, user: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
    let request = format!("GET /events?access_token={} HTTP/1.1\r\nHost: test\r\n\r\n", token(user, &[], None));
    socket.write_all(request.as_bytes()).await.expect("request");
    read_raw_until(&mut socket, &mut Vec::new(), |wire| find(wire, b"event: connected").is_some()).await;
    socket
}

/// Reads into `wire` until `done(wire)` or the server closes; panics after 10 s.
async fn read_raw_until(socket: &mut tokio::net::TcpStream, wire: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(wire) {
        let mut buffer = [0u8; 65536];
        match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(n)) => wire.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("timed out after {} bytes", wire.len()),
        }
    }
    true
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_pauses_reading_gets_everything_in_order_and_one_that_never_reads_is_cut_off() {
    // Events are written straight into sockets while they have room; what a full socket cannot
    // take waits in the stream's queue, behind the rest of the write the socket cut short.
    // The frame bound is the one under test here (tests/queue_bounds.rs has the byte bound).
    let node = Node::start(&[("SSE_QUEUE_CAPACITY", "400"), ("SSE_QUEUE_MAX_BYTES", "64MiB")]).await;
    let mut paused = open_raw_stream(&node, "pauser").await;
    let events = 300;
    let padding = "p".repeat(8 * 1024);
    for seq in 0..events {
        let data = format!("e{seq}-{padding}");
        let (status, _) = publish_api(&node, json!({"users": ["pauser"], "data": data})).await;
        assert_eq!(status, 202);
    }
    // 2.4 MB waited in kernel buffers and the queue while the client did not read.
    let mut wire = Vec::new();
    let last = format!("data: e{}-", events - 1);
    assert!(read_raw_until(&mut paused, &mut wire, |w| find(w, last.as_bytes()).is_some()).await);
    let mut at = 0;
    for seq in 0..events {
        let marker = format!("data: e{seq}-");
        let found =
            find(&wire[at..], marker.as_bytes()).unwrap_or_else(|| panic!("event {seq} missing or out of order"));
        at += found + marker.len();
    }
    assert_eq!(node.metric("sse_connections_closed_total", r#"reason="slow_consumer""#).await, 0.0);

    // A client that never reads fills its socket, then its queue (400 frames), and is cut off.
    let mut sleeper = open_raw_stream(&node, "sleeper").await;
    for seq in 0..1600 {
        publish_api(&node, json!({"users": ["sleeper"], "data": format!("s{seq}-{padding}")})).await;
    }
    node.wait_metric("sse_connections_closed_total", r#"reason="slow_consumer""#, 1.0).await;
    let mut rest = Vec::new();
    assert!(!read_raw_until(&mut sleeper, &mut rest, |_| false).await, "the server closes the connection");
}

/// The CORS answers of `/events` as README's settings table promises them, on both ways a
/// stream is served: the raw path (a connection's first request) and hyper (after another).
#[tokio::test(flavor = "multi_thread")]
async fn cors_allows_last_event_id_with_credentials_mirrors_star_and_is_absent_when_unset() {
    use tokio::io::AsyncWriteExt;
    let preflight = |node: &Node, origin: &str| {
        http()
            .request(reqwest::Method::OPTIONS, node.url("/events"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "last-event-id")
            .send()
    };
    let header = |headers: &reqwest::header::HeaderMap, name: &str| {
        headers.get(name).map(|v| v.to_str().expect("ascii").to_ascii_lowercase())
    };
    // A stream served by hyper: the connection asked for /healthz first. Returns its head.
    async fn hyper_stream_head(node: &Node, origin: &str) -> String {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /events?access_token={} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\r\n",
            token("cors", &[], None)
        );
        socket.write_all(request.as_bytes()).await.expect("write");
        let seen = read_until(&mut socket, "event: connected").await;
        let second = seen.rfind("HTTP/1.1 ").expect("the stream's status line");
        seen[second..].to_ascii_lowercase()
    }
    let raw_stream = |node: &Node, origin: &str| {
        let url = node.url(&format!("/events?access_token={}", token("cors", &[], None)));
        let origin = origin.to_owned();
        async move { SseClient::open(&url, &[("origin", &origin)]).await }
    };

    // A listed origin.
    let listed = Node::start(&[("SSE_CORS_ORIGINS", "https://app.example")]).await;
    let answer = preflight(&listed, "https://app.example").await.expect("preflight");
    assert!(answer.status().is_success(), "{}", answer.status());
    let h = answer.headers();
    assert_eq!(header(h, "access-control-allow-origin").as_deref(), Some("https://app.example"));
    assert_eq!(header(h, "access-control-allow-credentials").as_deref(), Some("true"));
    let allowed = header(h, "access-control-allow-headers").unwrap_or_default();
    assert!(allowed.contains("last-event-id"), "allow-headers: {allowed}");
    assert!(header(h, "access-control-allow-methods").unwrap_or_default().contains("get"));
    let foreign = preflight(&listed, "https://evil.example").await.expect("preflight");
    assert_eq!(header(foreign.headers(), "access-control-allow-origin"), None, "a foreign origin is not allowed");
    let stream = raw_stream(&listed, "https://app.example").await;
    assert_eq!(stream.status, 200);
    assert_eq!(header(&stream.headers, "access-control-allow-origin").as_deref(), Some("https://app.example"));
    assert_eq!(header(&stream.headers, "access-control-allow-credentials").as_deref(), Some("true"));
    let head = hyper_stream_head(&listed, "https://app.example").await;
    assert!(head.contains("access-control-allow-origin: https://app.example\r\n"), "{head}");
    assert!(head.contains("access-control-allow-credentials: true\r\n"), "{head}");

    // `*`: the request's origin is mirrored (credentials cannot go with a literal `*`).
    let any = Node::start(&[("SSE_CORS_ORIGINS", "*")]).await;
    let answer = preflight(&any, "https://any.example").await.expect("preflight");
    assert_eq!(header(answer.headers(), "access-control-allow-origin").as_deref(), Some("https://any.example"));
    assert_eq!(header(answer.headers(), "access-control-allow-credentials").as_deref(), Some("true"));
    let stream = raw_stream(&any, "https://other.example").await;
    assert_eq!(stream.status, 200);
    assert_eq!(header(&stream.headers, "access-control-allow-origin").as_deref(), Some("https://other.example"));
    let head = hyper_stream_head(&any, "https://third.example").await;
    assert!(head.contains("access-control-allow-origin: https://third.example\r\n"), "{head}");

    // Unset: no CORS headers anywhere, and any origin is served (same-origin deployments).
    let unset = Node::start(&[]).await;
    let answer = preflight(&unset, "https://app.example").await.expect("preflight");
    assert!(answer.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "{:?}", answer.headers());
    let stream = raw_stream(&unset, "https://app.example").await;
    assert_eq!(stream.status, 200);
    assert!(stream.headers.keys().all(|k| !k.as_str().starts_with("access-control-")), "{:?}", stream.headers);
    let head = hyper_stream_head(&unset, "https://app.example").await;
    assert!(!head.contains("access-control-"), "{head}");
}

/// RS256 with a public key file, as README's "Tokens" recommends for production: tokens signed
/// with the private key work; one signed by another key, or an HS256 token keyed with the public
/// key's PEM (algorithm confusion), is refused.
#[tokio::test(flavor = "multi_thread")]
async fn rs256_tokens_are_verified_with_the_public_key_file() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let dir = scratch_dir("rs256");
    let keypair = |name: &str| {
        let private = dir.join(format!("{name}.pem"));
        let public = dir.join(format!("{name}.pub.pem"));
        let status = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&private)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed (scripts/test installs it)");
        assert!(status.success());
        let status = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .expect("openssl");
        assert!(status.success());
        (std::fs::read(private).expect("private key"), public)
    };
    let (private, public) = keypair("issuer");
    let (other_private, _) = keypair("other");
    let public_pem = std::fs::read(&public).expect("public key");
    let node = Node::start_raw(&[("SSE_JWT_PUBLIC_KEY", public.to_str().expect("utf8 path"))]).await;
    let claims = json!({"sub": "rsa-user", "exp": unix_now() + 600});
    let sign = |algorithm: Algorithm, key: &EncodingKey| {
        jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("sign")
    };
    let good = sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&private).expect("rsa key"));
    let mut stream = SseClient::open(&node.url(&format!("/events?access_token={good}")), &[]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    assert_eq!(stream.connected().await["user"], "rsa-user");
    let refused = [
        ("another key", sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&other_private).expect("rsa key"))),
        ("HS256 keyed with the public PEM", sign(Algorithm::HS256, &EncodingKey::from_secret(&public_pem))),
        ("HS256 with the test secret", token("rsa-user", &[], None)),
    ];
    for (what, bad) in refused {
        let answer = SseClient::open(&node.url(&format!("/events?access_token={bad}")), &[]).await;
        assert_eq!(answer.status, 401, "{what}: {:?}", answer.body);
        assert!(answer.body.as_deref().unwrap_or("").contains("invalid_token"), "{what}: {:?}", answer.body);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// README: `/readyz` follows a 1 s PING and says `bus_unavailable` when there is no answer;
/// a publish the bus cannot take is a 503 `bus_unavailable`; both come back with Redis.
#[tokio::test(flavor = "multi_thread")]
async fn without_redis_readyz_says_bus_unavailable_soon_and_publish_is_refused_with_503() {
    let mut redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    redis.kill();
    let killed = std::time::Instant::now();
    node.wait_readyz(503, Duration::from_secs(10)).await;
    // About 2 s (one PING interval and its timeout); 4 s of margin for a loaded machine.
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(6), "/readyz noticed after {took:?}");
    let body: serde_json::Value =
        http().get(node.url("/readyz")).send().await.expect("readyz").json().await.expect("JSON");
    assert_eq!((body["status"].as_str(), body["reason"].as_str()), (Some("not_ready"), Some("bus_unavailable")));
    let (status, answer) = publish_api(&node, json!({"broadcast": true, "data": "lost?"})).await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("bus_unavailable")), "{answer}");

    redis.restart().await;
    node.wait_readyz(200, Duration::from_secs(20)).await;
    let mut stream = subscribe(&node, "back", &[]).await;
    assert_eq!(publish_api(&node, json!({"broadcast": true, "data": "back"})).await.0, 202);
    assert_eq!(stream.next_event(WAIT).await.expect("delivered again").data, "back");
}
