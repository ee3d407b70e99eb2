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
    ann.assert_silent(Duration::from_millis(300)).await;
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
