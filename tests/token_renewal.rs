//! A stream's token over its whole life: the `token_expiring` warning before `exp`, renewal with
//! `POST /api/connections/<id>/token` on any node (routed over Redis to the node holding the
//! stream), narrowing on renewal, renewal while the holding node drains, and expiry without a
//! renewal, resumed exactly with a fresh token.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{NoEvent, Node, RedisServer, SseClient, SseEvent, http, publish_api, token, token_with, unix_now};
use serde_json::{Value, json};

/// Seconds since the UNIX epoch, with the fraction: the node's clock, to the millisecond.
fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// A token for `sub` granting `topics`, expiring at `exp`.
fn expiring(sub: &str, topics: &[&str], exp: u64) -> String {
    token_with(json!({"sub": sub, "exp": exp, "topics": topics}))
}

/// `POST /api/connections/<id>/token` on `node` with `token` as Bearer: status and JSON body.
async fn renew(node: &Node, connection_id: &str, token: &str) -> (u16, Value) {
    let response = http()
        .post(node.url(&format!("/api/connections/{connection_id}/token")))
        .bearer_auth(token)
        .send()
        .await
        .expect("renewal request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Opens a stream for `token` with `topics`; returns it and the `connection_id` of `connected`.
async fn open(node: &Node, token: &str, topics: &[&str]) -> (SseClient, String) {
    let mut url = node.url(&format!("/events?access_token={token}"));
    for topic in topics {
        url.push_str(&format!("&topic={topic}"));
    }
    let mut stream = SseClient::open(&url, &[]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    let connected = stream.connected().await;
    let id = connected["connection_id"].as_str().expect("connection_id").to_owned();
    (stream, id)
}

/// The next event that is not `event`, or why there is none.
async fn next_except(stream: &mut SseClient, skipped: &str, within: Duration) -> Result<SseEvent, NoEvent> {
    let deadline = Instant::now() + within;
    loop {
        let event = stream.next_event(deadline.saturating_duration_since(Instant::now())).await?;
        if event.event != skipped {
            return Ok(event);
        }
    }
}

fn data(event: &SseEvent) -> Value {
    serde_json::from_str(&event.data).unwrap_or_else(|_| panic!("JSON data: {event:?}"))
}

/// Two nodes on one Redis, with `env` for both.
async fn cluster(env: &[(&str, &str)]) -> (RedisServer, Node, Node) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut a = vec![("SSE_REDIS_URL", url.as_str()), ("SSE_NODE_ID", "node-a")];
    a.extend_from_slice(env);
    let mut b = vec![("SSE_REDIS_URL", url.as_str()), ("SSE_NODE_ID", "node-b")];
    b.extend_from_slice(env);
    let (a, b) = tokio::join!(Node::start(&a), Node::start(&b));
    (redis, a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_warning_comes_once_no_earlier_than_the_lead_before_exp() {
    let node = Node::start(&[("SSE_TOKEN_EXPIRY_WARNING", "3s"), ("SSE_JWT_LEEWAY", "1s")]).await;
    let exp = unix_now() + 7;
    let (mut stream, id) = open(&node, &expiring("warned", &[], exp), &[]).await;
    let warning = stream.next_event(Duration::from_secs(10)).await.expect("token_expiring");
    let at = now();
    assert_eq!(warning.event, "token_expiring", "{warning:?}");
    assert_eq!(warning.data, format!(r#"{{"exp":{exp},"connection_id":"{id}"}}"#));
    // The ticker runs every second: the warning is due at exp - 3 s, and arrives within about a
    // second after (2.5 s allowed for a loaded machine), so still before exp.
    let due = exp as f64 - 3.0;
    assert!(at >= due - 0.1, "warned {:.2} s before it was due", due - at);
    assert!(at <= due + 2.5, "warned {:.2} s after it was due", at - due);
    // Exactly one: the next event is the close, at exp + leeway.
    let farewell = stream.next_event(Duration::from_secs(10)).await.expect("disconnected");
    assert_eq!((farewell.event.as_str(), farewell.data.as_str()), ("disconnected", r#"{"reason":"token_expired"}"#));
    assert!(now() >= (exp + 1) as f64, "closed before exp + leeway");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_warning_off_a_stream_only_closes_at_expiry() {
    let node = Node::start(&[("SSE_TOKEN_EXPIRY_WARNING", "off"), ("SSE_JWT_LEEWAY", "2s")]).await;
    let exp = unix_now() + 3;
    let (mut stream, _) = open(&node, &expiring("quiet", &[], exp), &[]).await;
    let first = stream.next_event(Duration::from_secs(10)).await.expect("disconnected");
    assert_eq!((first.event.as_str(), first.data.as_str()), ("disconnected", r#"{"reason":"token_expired"}"#));
    assert!(now() >= (exp + 2) as f64, "closed before exp + leeway");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_through_another_node_keeps_the_stream_past_its_old_exp() {
    let (_redis, a, b) = cluster(&[("SSE_TOKEN_EXPIRY_WARNING", "3s"), ("SSE_JWT_LEEWAY", "1s")]).await;
    let exp = unix_now() + 5;
    let (mut stream, id) = open(&a, &expiring("renewer", &["t"], exp), &["t"]).await;
    assert!(id.starts_with("node-a:"), "{id}");
    let warning = stream.next_event(Duration::from_secs(8)).await.expect("token_expiring");
    assert_eq!((warning.event.as_str(), data(&warning)["exp"].as_u64()), ("token_expiring", Some(exp)));

    // Renewed on node B for a stream on node A: routed over Redis.
    let second = unix_now() + 6;
    assert_eq!(renew(&b, &id, &expiring("renewer", &["t"], second)).await, (204, Value::Null));
    // The new exp is warned of in its turn.
    let warning = stream.next_event(Duration::from_secs(8)).await.expect("a second token_expiring");
    assert_eq!((warning.event.as_str(), data(&warning)["exp"].as_u64()), ("token_expiring", Some(second)));
    assert!(now() >= second as f64 - 3.1, "the second warning came early");
    assert_eq!(renew(&b, &id, &expiring("renewer", &["t"], unix_now() + 3600)).await.0, 204);

    // Past the old exp + leeway and the second one: still open, still delivering, nothing lost.
    while unix_now() < second + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = publish_api(&b, json!({"users": ["renewer"], "event": "m", "data": "after"})).await;
    assert_eq!(status, 202);
    let (status, _) = publish_api(&b, json!({"topics": ["t"], "event": "m", "data": "topic"})).await;
    assert_eq!(status, 202);
    for expected in ["after", "topic"] {
        let event = stream.next_event(Duration::from_secs(5)).await.expect("still delivering");
        assert_eq!((event.event.as_str(), event.data.as_str()), ("m", expected));
    }
    b.wait_metric("sse_token_renewals_total", r#"outcome="renewed""#, 2.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn renewals_racing_publishes_lose_and_duplicate_nothing_and_a_revoked_topic_stops_at_its_notice() {
    let (_redis, a, b) = cluster(&[]).await;
    let exp = unix_now() + 3600;
    let (mut stream, id) = open(&a, &expiring("racer", &["kept", "gone"], exp), &["kept", "gone"]).await;
    let total = 300;
    let producer = {
        let b_url = b.url("");
        tokio::spawn(async move {
            let http = http();
            for seq in 0..total {
                let target = match seq % 3 {
                    0 => json!({"users": ["racer"]}),
                    1 => json!({"topics": ["kept"]}),
                    _ => json!({"topics": ["gone"]}),
                };
                let mut body = target;
                body["event"] = json!("m");
                body["data"] = json!(seq);
                let response = http
                    .post(format!("{b_url}/api/publish"))
                    .bearer_auth(token("producer", &[], Some("publisher")))
                    .json(&body)
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(response.status(), 202);
                // About 2 s in all: the renewals below fall in the middle of it.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Twenty renewals on both nodes while the producer runs; the eleventh drops `gone`.
    for round in 0..20u64 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let topics: &[&str] = if round < 10 { &["kept", "gone"] } else { &["kept"] };
        let via = if round % 2 == 0 { &a } else { &b };
        let (status, body) = renew(via, &id, &expiring("racer", topics, exp + round)).await;
        assert_eq!(status, 204, "round {round}: {body}");
    }
    producer.await.expect("the producer published everything");

    let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut revoked_at = None;
    let mut events = 0;
    // Every message of the user and of `kept` (two thirds), some of `gone`, one notice.
    while seen.get(&0).map_or(0, Vec::len) + seen.get(&1).map_or(0, Vec::len) < 200 {
        let event = stream.next_event(Duration::from_secs(10)).await.unwrap_or_else(|gap| {
            panic!("{gap:?} after {events} events: {seen:?}");
        });
        events += 1;
        match event.event.as_str() {
            "topics_revoked" => {
                assert_eq!(event.data, r#"{"topics":["gone"]}"#);
                assert!(revoked_at.replace(events).is_none(), "one notice");
            }
            "m" => {
                let seq: u64 = event.data.parse().expect("a number");
                if seq % 3 == 2 {
                    assert!(revoked_at.is_none(), "`gone` {seq} arrived after its topics_revoked");
                }
                seen.entry(seq % 3).or_default().push(seq);
            }
            other => panic!("unexpected {other}: {event:?}"),
        }
    }
    let revoked_at = revoked_at.expect("topics_revoked arrived");
    assert!(revoked_at < events - 10, "the renewal fell in the middle of the publishes ({revoked_at} of {events})");
    for class in [0, 1] {
        let expected: Vec<u64> = (0..total).filter(|s| s % 3 == class).collect();
        assert_eq!(seen.get(&class), Some(&expected), "class {class}: every message once, in order");
    }
    // `gone` was delivered exactly, in order, up to the renewal that revoked it.
    let gone = seen.remove(&2).unwrap_or_default();
    let prefix: Vec<u64> = (0..total).filter(|s| s % 3 == 2).take(gone.len()).collect();
    assert_eq!(gone, prefix);
    assert!(!gone.is_empty() && gone.len() < 100, "{} of 100 `gone` messages before the notice", gone.len());
    stream.assert_silent(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_narrowing_renewal_leaves_the_revoked_topic_and_keeps_the_rest() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", redis.url().as_str())]).await;
    let exp = unix_now() + 3600;
    let (mut stream, id) = open(&node, &expiring("narrow", &["keep", "drop"], exp), &["keep", "drop"]).await;
    // Another user's stream on the same node shares the `drop` subscription.
    let (mut other, other_id) = open(&node, &expiring("other", &["drop"], exp), &["drop"]).await;
    let numsub = |channel: &'static str| {
        let redis = &redis;
        async move { redis.command(&["PUBSUB", "NUMSUB", channel]).await.expect("redis").contains(":1\r\n") }
    };
    assert!(numsub("sse:topic:drop").await);

    // The new token grants `keep` and `new`: `drop` is left, `new` is not joined.
    assert_eq!(renew(&node, &id, &expiring("narrow", &["keep", "new"], exp)).await.0, 204);
    let notice = stream.next_event(Duration::from_secs(5)).await.expect("topics_revoked");
    assert_eq!((notice.event.as_str(), notice.data.as_str()), ("topics_revoked", r#"{"topics":["drop"]}"#));
    for (target, seq) in [("drop", 1), ("new", 2), ("keep", 3)] {
        let (status, _) = publish_api(&node, json!({"topics": [target], "event": target, "data": seq})).await;
        assert_eq!(status, 202);
    }
    let (status, _) = publish_api(&node, json!({"users": ["narrow"], "event": "mine", "data": 4})).await;
    assert_eq!(status, 202);
    for expected in [("keep", "3"), ("mine", "4")] {
        let event = stream.next_event(Duration::from_secs(5)).await.expect("kept channels deliver");
        assert_eq!((event.event.as_str(), event.data.as_str()), expected, "nothing of `drop` or `new`");
    }
    stream.assert_silent(Duration::from_millis(300)).await;
    // The other stream still listens: the node keeps its subscription until its last listener goes.
    let event = other.next_event(Duration::from_secs(5)).await.expect("drop still reaches the other stream");
    assert_eq!((event.event.as_str(), event.data.as_str()), ("drop", "1"));
    assert!(numsub("sse:topic:drop").await, "still subscribed for the other stream");
    // The other stream's renewal takes the last local listener off `drop`: unsubscribed.
    assert_eq!(renew(&node, &other_id, &expiring("other", &[], exp)).await.0, 204);
    let notice = other.next_event(Duration::from_secs(5)).await.expect("topics_revoked");
    assert_eq!((notice.event.as_str(), notice.data.as_str()), ("topics_revoked", r#"{"topics":["drop"]}"#));
    let deadline = Instant::now() + Duration::from_secs(10);
    while numsub("sse:topic:drop").await {
        assert!(Instant::now() < deadline, "the last local listener left: unsubscribed in Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(numsub("sse:topic:keep").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_on_a_draining_node_is_renewed_until_the_drain_closes_it() {
    // 40 streams over a 30 s drain: one closed every 100 ms, oldest first (one user).
    let (_redis, mut a, b) = cluster(&[("SSE_DRAIN_PERIOD", "30s")]).await;
    let exp = unix_now() + 3600;
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(open(&a, &expiring("drained", &[], exp), &[]).await);
    }
    a.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = expiring("drained", &[], exp + 60);
    // The first stream was closed by the drain's first batch: gone.
    let (status, body) = renew(&b, &streams[0].1, &fresh).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("connection_not_found")));
    // The last one is still open (closed about 4 s in): renewed, and then drained as usual.
    assert_eq!(renew(&b, &streams[39].1, &fresh).await.0, 204);
    let (last, last_id) = streams.last_mut().expect("40 streams");
    let farewell = next_except(last, "token_expiring", Duration::from_secs(15)).await.expect("drained");
    assert_eq!((farewell.event.as_str(), farewell.data.as_str()), ("disconnected", r#"{"reason":"shutdown"}"#));
    let last_id = last_id.clone();
    assert_eq!(a.wait_exit(Duration::from_secs(20)).await, Some(0));
    // Node A is gone: nobody holds the stream.
    let (status, body) = renew(&b, &last_id, &fresh).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("connection_not_found")));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_renewal_the_stream_ends_at_expiry_and_a_fresh_token_resumes_it_exactly() {
    let (_redis, a, b) = cluster(&[("SSE_JWT_LEEWAY", "1s")]).await;
    let exp = unix_now() + 3;
    let (mut stream, _) = open(&a, &expiring("expiring", &[], exp), &[]).await;
    let total = 150;
    let producer = {
        let b_url = b.url("");
        tokio::spawn(async move {
            let http = http();
            for seq in 0..total {
                let response = http
                    .post(format!("{b_url}/api/publish"))
                    .bearer_auth(token("producer", &[], Some("publisher")))
                    .json(&json!({"users": ["expiring"], "event": "m", "data": seq}))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(response.status(), 202);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let mut received = Vec::new();
    // What a browser would send as Last-Event-ID: the stream's last id when it ended.
    let last_id = loop {
        let event = next_except(&mut stream, "token_expiring", Duration::from_secs(10)).await.expect("an event");
        if event.event == "disconnected" {
            assert_eq!(event.data, r#"{"reason":"token_expired"}"#);
            break event.last_event_id;
        }
        received.push(event.data.parse::<u64>().expect("a number"));
    };
    assert!(now() >= (exp + 1) as f64, "closed at exp + leeway, not before");
    assert!(!received.is_empty() && received.len() < total as usize, "the close came while messages flowed");
    // A fresh token on the other node, from where the old stream stopped.
    assert!(!last_id.is_empty(), "the events carried cursors");
    let url = b.url(&format!("/events?access_token={}", expiring("expiring", &[], unix_now() + 3600)));
    let mut resumed = SseClient::open(&url, &[("last-event-id", last_id.as_str())]).await;
    assert_eq!(resumed.status, 200, "{:?}", resumed.body);
    resumed.connected().await;
    while received.len() < total as usize {
        let event = next_except(&mut resumed, "token_expiring", Duration::from_secs(10))
            .await
            .unwrap_or_else(|gap| panic!("{gap:?} after {} events", received.len()));
        assert_eq!(event.event, "m", "{event:?}");
        received.push(event.data.parse().expect("a number"));
    }
    producer.await.expect("published");
    assert_eq!(received, (0..total).collect::<Vec<u64>>(), "every message once, in order, across the expiry");
    resumed.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_is_refused_for_an_unknown_stream_another_users_stream_and_a_bad_token() {
    let (_redis, a, b) = cluster(&[]).await;
    let exp = unix_now() + 3600;
    let (mut stream, id) = open(&a, &expiring("owner", &[], exp), &[]).await;
    let own = expiring("owner", &[], exp + 60);
    let error = |answer: (u16, Value)| (answer.0, answer.1["error"].as_str().map(str::to_owned));
    let not_found = (404, Some("connection_not_found".to_owned()));
    // No such stream: on a node that runs, on one that does not, and no stream id at all.
    assert_eq!(error(renew(&b, "node-a:999999", &own).await), not_found);
    assert_eq!(error(renew(&a, "node-a:999999", &own).await), not_found);
    assert_eq!(error(renew(&b, "node-z:1", &own).await), not_found);
    assert_eq!(error(renew(&b, "not-an-id", &own).await), not_found);
    // Another user's stream, asked of either node.
    let thief = expiring("thief", &["*"], exp + 60);
    for node in [&a, &b] {
        assert_eq!(error(renew(node, &id, &thief).await), (403, Some("not_your_connection".to_owned())));
    }
    // Tokens that do not verify, or not in the header.
    let unauthorized = (401, Some("invalid_token".to_owned()));
    assert_eq!(error(renew(&b, &id, "not.a.token").await), unauthorized);
    assert_eq!(error(renew(&b, &id, &expiring("owner", &[], unix_now() - 120)).await), unauthorized);
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "owner", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
    )
    .expect("sign");
    assert_eq!(error(renew(&b, &id, &forged).await), unauthorized);
    let bare = http().post(b.url(&format!("/api/connections/{id}/token"))).send().await.expect("request");
    assert_eq!(bare.status().as_u16(), 401);
    let query =
        http().post(b.url(&format!("/api/connections/{id}/token?access_token={own}"))).send().await.expect("request");
    assert_eq!(query.status().as_u16(), 401);
    assert_eq!(query.json::<Value>().await.expect("json")["error"], "bearer_required");
    // None of it touched the stream; its own user renews it.
    stream.assert_silent(Duration::from_millis(300)).await;
    assert_eq!(renew(&b, &id, &own).await.0, 204);
}
