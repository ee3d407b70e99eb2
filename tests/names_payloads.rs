//! Names and payloads end to end, as a client and a producer see them: which user ids and
//! topics a node accepts, how a query string is decoded, and that a producer's JSON reaches the
//! browser as it was written. Real `redis-server` and node processes, real HTTP clients.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// `GET path` with a subscriber token for `user` granted every topic; status and JSON body.
/// The status is checked before the body is read: a 200 here would be an open stream.
async fn get_json(node: &Node, user: &str, path_and_query: &str) -> (u16, Value) {
    let separator = if path_and_query.contains('?') { '&' } else { '?' };
    let url = node.url(&format!("{path_and_query}{separator}access_token={}", token(user, &["*"], None)));
    let response = http().get(url).send().await.expect("request");
    let status = response.status().as_u16();
    if status == 200 && path_and_query.starts_with("/events") {
        return (status, Value::Null);
    }
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn names_with_invisible_characters_are_refused_everywhere_a_name_enters() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    node.wait_readyz(200, WAIT).await;

    // A token's `sub`: 401, the stream never opens.
    for sub in ["ad\u{200B}min", "\u{FEFF}42", "user\u{202E}gpj", "a\u{2066}b\u{2069}", "a\u{2060}b"] {
        let url = node.url(&format!("/events?access_token={}", token(sub, &["*"], None)));
        let response = http().get(url).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 401, "sub {sub:?}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"], "invalid_token", "sub {sub:?}");
    }
    // A `topic=` (percent-encoded as a browser sends it): 400 naming the field.
    for topic in ["a%E2%80%8Bb", "%EF%BB%BFnews", "a%E2%80%AEb", "a%E2%81%A6b%E2%81%A9", "a%C2%ADb"] {
        for path in ["/events", "/api/history"] {
            let (status, body) = get_json(&node, "ann", &format!("{path}?topic={topic}")).await;
            assert_eq!((status, &body["error"], &body["field"]), (400, &json!("invalid_request"), &json!("topic")));
        }
    }
    // Publish targets: 400 naming the entry.
    for (body, field) in [
        (json!({"users": ["ann", "ad\u{200B}min"], "data": 1}), "users[1]"),
        (json!({"users": ["\u{FEFF}ann"], "data": 1}), "users[0]"),
        (json!({"topics": ["news\u{202E}"], "data": 1}), "topics[0]"),
    ] {
        let (status, reply) = publish_api(&node, body.clone()).await;
        assert_eq!(
            (status, &reply["error"], &reply["field"]),
            (400, &json!("invalid_request"), &json!(field)),
            "{body}"
        );
    }
    // A producer on Redis uses the same names: no stream can listen under an invisible one,
    // so a PUBLISH there reaches no node, and the visible name is a different channel.
    let mut ann = subscribe(&node, "ann", &["news"]).await;
    assert_eq!(redis.publish("sse:topic:news\u{200B}", r#"{"data":"hidden"}"#).await, 0);
    assert_eq!(redis.publish("sse:user:ann\u{FEFF}", r#"{"data":"hidden"}"#).await, 0);
    assert_eq!(redis.publish("sse:topic:news", r#"{"data":"visible"}"#).await, 1);
    assert_eq!(ann.next_event(WAIT).await.expect("event").data, "visible");
    assert_eq!(redis.publish("sse:topic:news", r#"{"data":"sentinel"}"#).await, 1);
    assert_eq!(ann.next_event(WAIT).await.expect("the sentinel").data, "sentinel");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_percent_escape_is_a_400_and_never_another_spelling_of_a_topic() {
    let node = Node::start(&[]).await;
    node.wait_readyz(200, WAIT).await;
    for (query, field) in [
        ("topic=a%ZZ", "topic"),
        ("topic=a%", "topic"),
        ("topic=a%4", "topic"),
        ("topic=a%FF", "topic"),
        ("topic=a%FE", "topic"),
        ("topic=a%C3%28", "topic"),
        ("topic=%ED%A0%80", "topic"),
        ("topic=ok&lastEventId=%E2%82", "lastEventId"),
        ("after=%", "after"),
    ] {
        for path in ["/events", "/api/history"] {
            let (status, body) = get_json(&node, "lee", &format!("{path}?{query}")).await;
            assert_eq!(status, 400, "{path}?{query}: {body}");
            assert_eq!((&body["error"], &body["field"]), (&json!("invalid_request"), &json!(field)), "{path}?{query}");
        }
    }
    // The topic literally named `a%ZZ` is reached only by its one spelling, `a%25ZZ`.
    let mut literal = subscribe(&node, "lee", &["a%25ZZ"]).await;
    let (status, reply) = publish_api(&node, json!({"topics": ["a%ZZ"], "data": "literal"})).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(literal.next_event(WAIT).await.expect("event").data, "literal");
}

/// `POST /api/publish` with `body` sent as written: the test's JSON must not be re-serialised
/// on the way, since key order and number spelling are what is checked.
async fn publish_text(node: &Node, body: &str) -> (u16, Value) {
    let response = http()
        .post(node.url("/api/publish"))
        .bearer_auth(token("producer", &[], Some("publisher")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("publish request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// JSON whose text a parse-and-serialise round trip would change.
const FAITHFUL: [&str; 6] = [
    r#"{"id":42,"text":"hi","list":[3,1,2]}"#,
    "123456789012345678901234567890",
    r#"{"price":1.10,"qty":1e3,"big":-98765432109876543210}"#,
    r#"["caf\u00e9","a\/b","\ud83d\ude80"]"#,
    r#"{ "spaced" : [ 1 , 2 ] }"#,
    "{\n  \"pretty\": true,\n  \"lines\": [\n    1,\n    2\n  ]\n}",
];

#[tokio::test(flavor = "multi_thread")]
async fn json_data_arrives_as_the_producer_wrote_it_live_durable_resumed_and_polled() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    node.wait_readyz(200, WAIT).await;
    let token = token("max", &["*"], None);
    let url = node.url(&format!("/events?access_token={token}&topic=prices"));
    let mut stream = SseClient::open(&url, &[]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    let connected = stream.next_event(WAIT).await.expect("connected");
    let cursor = connected.id.expect("a resume cursor");

    for data in FAITHFUL {
        // A producer's plain PUBLISH, its durable FCALL, and the HTTP API, in that order.
        let envelope = format!(r#"{{"event":"tick","data":{data}}}"#);
        assert_eq!(redis.publish("sse:topic:prices", &envelope).await, 1);
        let reply = redis.command(&["FCALL", "sse_publish", "1", "sse:topic:prices", &envelope]).await;
        assert!(reply.is_some_and(|r| r.contains('-')), "FCALL answers a history id");
        let (status, reply) =
            publish_text(&node, &format!(r#"{{"topics":["prices"],"event":"tick","data":{data}}}"#)).await;
        assert_eq!(status, 202, "{reply}");
        for path in ["PUBLISH", "FCALL", "API"] {
            let e = stream.next_event(WAIT).await.unwrap_or_else(|e| panic!("{path}: an event for {data}: {e:?}"));
            assert_eq!((e.event.as_str(), e.data.as_str()), ("tick", data), "{path}");
        }
    }

    // The durable copies replay as written, on a resume and through the polling fallback.
    let mut resumed = SseClient::open(&url, &[("last-event-id", &cursor)]).await;
    assert_eq!(resumed.status, 200, "{:?}", resumed.body);
    assert_eq!(resumed.next_event(WAIT).await.expect("connected").event, "connected");
    for data in FAITHFUL.iter().flat_map(|d| [d, d]) {
        let e = resumed.next_event(WAIT).await.unwrap_or_else(|e| panic!("a replayed event for {data}: {e:?}"));
        assert_eq!((e.event.as_str(), e.data.as_str()), ("tick", *data));
    }
    let polled = http()
        .get(node.url(&format!("/api/history?access_token={token}&topic=prices&after={cursor}")))
        .send()
        .await
        .expect("history");
    assert_eq!(polled.status(), 200);
    let polled: Value = polled.json().await.expect("JSON");
    let datas: Vec<&str> =
        polled["events"].as_array().expect("events").iter().filter_map(|e| e["data"].as_str()).collect();
    let expected: Vec<&str> = FAITHFUL.iter().flat_map(|d| [*d, *d]).collect();
    assert_eq!(datas, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn string_data_keeps_its_text_and_line_breaks_become_data_lines() {
    let node = Node::start(&[]).await;
    let mut stream = subscribe(&node, "nia", &[]).await;
    let (status, reply) =
        publish_text(&node, r#"{"users":["nia"],"data":"say \"hi\"\nthen\r\nbye \u00e9\n\nevent: forged"}"#).await;
    assert_eq!(status, 202, "{reply}");
    let e = stream.next_event(WAIT).await.expect("event");
    assert_eq!((e.event.as_str(), e.data.as_str()), ("message", "say \"hi\"\nthen\nbye é\n\nevent: forged"));
    // No second (forged) event: the next one is a sentinel published after it.
    assert_eq!(publish_text(&node, r#"{"users":["nia"],"data":"sentinel"}"#).await.0, 202);
    assert_eq!(stream.next_event(WAIT).await.expect("the sentinel").data, "sentinel");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_64_kib_data_string_is_publishable_with_the_default_limit() {
    let node = Node::start(&[]).await;
    let mut stream = subscribe(&node, "ola", &[]).await;
    // 64 KiB of text, and 64 KiB of the characters JSON must escape (a body twice as large).
    for data in ["x".repeat(64 * 1024), "\"\\".repeat(32 * 1024)] {
        let (status, reply) = publish_api(&node, json!({"users": ["ola"], "event": "big", "data": data})).await;
        assert_eq!(status, 202, "{reply}");
        let e = stream.next_event(WAIT).await.expect("the 64 KiB event");
        assert_eq!((e.event.as_str(), e.data.len()), ("big", data.len()));
        assert!(e.data == data);
    }
}
