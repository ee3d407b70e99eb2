//! History and exact resume end to end: real `redis-server`, several node processes, clients
//! that disconnect and come back with `Last-Event-ID` on another node.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = RedisServer::start().await;
    let a = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let b = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;

    let (mut stream, _) = open_resumable(&stream_url(&a, "u1", &["t1"]), None).await;
    producer.durable("sse:user:u1", &envelope("before")).await;
    let seen = stream.next_events(1, WAIT).await;
    assert_eq!(seen[0].data, "before");
    let last_id = seen[0].id.clone().expect("a cursor");
    drop(stream);

    producer.durable("sse:user:u1", &envelope("u-1")).await;
    producer.durable("sse:topic:t1", &envelope("t-1")).await;
    producer.durable("sse:broadcast", &envelope("b-1")).await;
    let (status, _) = publish_api(&a, json!({"users": ["u1"], "event": "m", "data": "u-2"})).await;
    assert_eq!(status, 202);
    producer.durable("sse:topic:t1", &envelope("t-2")).await;

    let (mut stream, _) = open_resumable(&stream_url(&b, "u1", &["t1"]), Some(&last_id)).await;
    let missed = stream.next_events(5, WAIT).await;
    let by_channel = |prefix: &str| -> Vec<String> {
        missed.iter().map(|e| e.data.clone()).filter(|d| d.starts_with(prefix)).collect()
    };
    assert_eq!(by_channel("u-"), ["u-1", "u-2"], "user channel in order");
    assert_eq!(by_channel("t-"), ["t-1", "t-2"], "topic in order");
    assert_eq!(by_channel("b-"), ["b-1"]);
    producer.durable("sse:user:u1", &envelope("live")).await;
    // Nothing replayed arrives twice: a second copy would come before this live event.
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "live");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_hundreds_of_times_while_publishing_loses_and_duplicates_nothing() {
    let redis = RedisServer::start().await;
    let settings = [("SSE_REDIS_URL", redis.url()), ("SSE_HISTORY_USER_LENGTH", "5000".to_owned())];
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Node::start(&settings).await;
    let b = Node::start(&settings).await;
    const PER_CHANNEL: usize = 1500;

    let urls = [stream_url(&a, "racer", &["race"]), stream_url(&b, "racer", &["race"])];
    // The first stream positions the client before anything is published.
    let (first, cursor) = open_resumable(&urls[1], None).await;
    drop(first);
    let mut last_id = Some(cursor);

    let mut producer = Producer::connect(&redis).await;
    let publisher = tokio::spawn(async move {
        for i in 0..PER_CHANNEL {
            producer.durable("sse:user:racer", &envelope(&format!("user:{i}"))).await;
            producer.durable("sse:topic:race", &envelope(&format!("topic:{i}"))).await;
            if i % 2 == 0 {
                // About 4 s of publishing in bursts, so reconnects land mid-burst and between.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut received: HashMap<&'static str, Vec<usize>> = HashMap::new();
    let mut reconnects = 0;
    let record = |event: &SseEvent, received: &mut HashMap<&'static str, Vec<usize>>| {
        let (channel, n) = event.data.split_once(':').expect("channel:n");
        let channel = if channel == "user" { "user" } else { "topic" };
        received.entry(channel).or_default().push(n.parse().expect("a number"));
    };
    while !publisher.is_finished() {
        let (mut stream, cursor) = open_resumable(&urls[reconnects % 2], last_id.as_deref()).await;
        last_id = Some(cursor);
        reconnects += 1;
        // Read for a few milliseconds, then drop the connection mid-flow.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2 + (reconnects as u64 * 7) % 15);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = match stream.next_event(left).await {
                Ok(event) => event,
                Err(NoEvent::Timeout) => break,
                Err(ended) => panic!("the stream ended under the client after {reconnects} reconnects: {ended:?}"),
            };
            if event.event == "reset" {
                panic!("unexpected reset after {reconnects} reconnects: {event:?}");
            }
            record(&event, &mut received);
            // What a browser would send as `Last-Event-ID` on its next connection.
            last_id = Some(event.last_event_id.clone());
        }
    }
    publisher.await.expect("publisher");
    let (mut stream, _) = open_resumable(&urls[0], last_id.as_deref()).await;
    let total = |r: &HashMap<&str, Vec<usize>>| r.values().map(Vec::len).sum::<usize>();
    while total(&received) < 2 * PER_CHANNEL {
        let Ok(event) = stream.next_event(WAIT).await else {
            for (channel, seen) in &received {
                let missing: Vec<usize> = (0..PER_CHANNEL).filter(|i| !seen.contains(i)).collect();
                eprintln!("{channel}: {} received, missing {missing:?}, after {reconnects} reconnects", seen.len());
            }
            panic!("stalled at {}; node logs:\n{}\n{}", total(&received), a.log_text(), b.log_text());
        };
        record(&event, &mut received);
    }
    // No duplicate is still on its way: a sentinel published now is the next event.
    let mut producer = Producer::connect(&redis).await;
    producer.durable("sse:user:racer", &envelope("sentinel")).await;
    assert_eq!(stream.next_event(WAIT).await.expect("the sentinel").data, "sentinel");
    assert!(reconnects >= 100, "only {reconnects} reconnects: the publisher finished too fast");
    let expected: Vec<usize> = (0..PER_CHANNEL).collect();
    assert_eq!(received["user"], expected, "user channel: exactly the published sequence");
    assert_eq!(received["topic"], expected, "topic: exactly the published sequence");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_added_on_reconnect_starts_at_its_current_end() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let (stream, cursor) = open_resumable(&stream_url(&node, "adds", &[]), None).await;
    drop(stream);
    producer.durable("sse:user:adds", &envelope("missed")).await;
    producer.durable("sse:topic:late", &envelope("before the topic was asked for")).await;

    // The cursor knows the user and broadcast channels, not the topic: those two resume, the
    // topic starts where its history ends now.
    let (mut again, _) = open_resumable(&stream_url(&node, "adds", &["late"]), Some(&cursor)).await;
    assert_eq!(again.next_events(1, WAIT).await[0].data, "missed");
    // The topic's older entry is never replayed: the next event is the live one.
    producer.durable("sse:topic:late", &envelope("live")).await;
    assert_eq!(again.next_events(1, WAIT).await[0].data, "live");
}

#[tokio::test(flavor = "multi_thread")]
async fn trimmed_history_gives_an_explicit_reset() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_HISTORY_TOPIC_LENGTH", "5")]).await;
    let mut producer = Producer::connect(&redis).await;
    let url = stream_url(&node, "trim", &["t"]);
    let (stream, cursor) = open_resumable(&url, None).await;
    drop(stream);
    for i in 0..400 {
        producer.durable("sse:topic:t", &envelope(&format!("{i}"))).await;
    }
    let (mut stream, _) = open_resumable(&url, Some(&cursor)).await;
    let reset = stream.next_event(WAIT).await.expect("reset");
    assert_eq!(reset.event, "reset");
    let data: Value = serde_json::from_str(&reset.data).expect("json");
    assert_eq!(data, json!({"channels": ["topic:t"], "reason": "window_lost"}));
    producer.durable("sse:topic:t", &envelope("after")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "after", "live delivery continues after a reset");
}

#[tokio::test(flavor = "multi_thread")]
async fn flushall_gives_an_explicit_reset_on_every_channel() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let url = stream_url(&node, "flush", &["t"]);
    let (mut stream, _) = open_resumable(&url, None).await;
    producer.durable("sse:user:flush", &envelope("one")).await;
    let cursor = stream.next_events(1, WAIT).await[0].id.clone().expect("cursor");
    drop(stream);
    redis.command(&["FLUSHALL"]).await.expect("flushall");
    producer.durable("sse:user:flush", &envelope("after flush")).await;
    let (mut stream, _) = open_resumable(&url, Some(&cursor)).await;
    let reset = stream.next_event(WAIT).await.expect("reset");
    assert_eq!(reset.event, "reset");
    let data: Value = serde_json::from_str(&reset.data).expect("json");
    assert_eq!(data, json!({"channels": ["user:flush", "broadcast", "topic:t"], "reason": "history_lost"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn history_lost_under_an_open_stream_resets_it_once() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let url = stream_url(&node, "lost", &[]);
    let (mut stream, _) = open_resumable(&url, None).await;
    producer.durable("sse:user:lost", &envelope("before")).await;
    let before = stream.next_events(1, WAIT).await.remove(0);

    // Redis loses everything while the node is cut off: the backfill finds a new history.
    redis.command(&["FLUSHALL"]).await.expect("flushall");
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await.expect("reply");
    assert!(killed.trim() != ":0", "the node's subscriber connection was killed: {killed}");
    // Every channel the stream follows is reset once, the quiet broadcast channel too: its
    // position was in the history that is gone.
    let reset = read_history_lost(&mut stream, &["user:lost", "broadcast"]).await;
    let at_reset = reset.id.expect("a last event id");
    assert_ne!(Some(&at_reset), before.id.as_ref(), "the reset carries a new cursor, in the new history");

    producer.durable("sse:user:lost", &envelope("after")).await;
    let after = stream.next_events(1, WAIT).await.remove(0);
    assert_eq!(after.data, "after");
    drop(stream);

    // Coming back from the reset's own cursor, or from a later one: no second reset, and
    // exactly what was missed. (The node turns ready again at its next bus health check.)
    node.wait_readyz(200, WAIT).await;
    for (cursor, expected) in [(at_reset, vec!["after", "later"]), (after.id.expect("cursor"), vec!["later"])] {
        if expected.len() == 2 {
            producer.durable("sse:user:lost", &envelope("later")).await;
        }
        let (mut again, _) = open_resumable(&url, Some(&cursor)).await;
        let data: Vec<String> = again.next_events(expected.len(), WAIT).await.into_iter().map(|e| e.data).collect();
        assert_eq!(data, expected);
        again.assert_silent(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_or_garbage_cursor_gives_nothing_it_should_not() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let (mut alice, _) = open_resumable(&stream_url(&node, "alice", &[]), None).await;
    producer.durable("sse:user:alice", &envelope("alice secret 1")).await;
    let alice_cursor = alice.next_events(1, WAIT).await[0].id.clone().expect("cursor");
    producer.durable("sse:user:alice", &envelope("alice secret 2")).await;
    producer.durable("sse:user:mallory", &envelope("mallory own")).await;

    // Mallory presents Alice's cursor: it positions only channels Mallory's token grants.
    let (mut mallory, _) = open_resumable(&stream_url(&node, "mallory", &[]), Some(&alice_cursor)).await;
    // Nothing of Alice's, nor Mallory's own earlier entry: the next event is a live one.
    producer.durable("sse:user:mallory", &envelope("mallory live")).await;
    assert_eq!(mallory.next_events(1, WAIT).await[0].data, "mallory live");

    let (mut garbage, _) = open_resumable(&stream_url(&node, "mallory", &["x"]), Some("not-a-cursor")).await;
    let reset = garbage.next_event(WAIT).await.expect("reset");
    assert_eq!(reset.event, "reset");
    let data: Value = serde_json::from_str(&reset.data).expect("json");
    assert_eq!(data["reason"], "invalid_cursor");
    assert_eq!(data["channels"], json!(["user:mallory", "broadcast", "topic:x"]));
    // After the reset, live from the current end: nothing older is replayed.
    producer.durable("sse:user:mallory", &envelope("sentinel")).await;
    assert_eq!(garbage.next_events(1, WAIT).await[0].data, "sentinel");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_function_library_is_loaded_on_a_fresh_redis_and_after_a_restart() {
    let mut redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let version = redis.command(&["FCALL", "sse_version", "0"]).await.expect("reply");
    assert_eq!(version.trim(), ":2", "loaded at startup on a fresh redis");

    redis.kill();
    node.wait_readyz(503, WAIT).await;
    // Empty (no persistence, a new directory): the library is there again only if the node
    // loads it. (Checking it is missing first would race with the node reconnecting.)
    redis.restart().await;
    node.wait_readyz(200, Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reloaded = redis.command(&["FCALL", "sse_version", "0"]).await.expect("reply");
        if reloaded.trim() == ":2" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the node never reloaded the library: {reloaded}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut producer = Producer::connect(&redis).await;
    assert!(producer.durable("sse:broadcast", &envelope("x")).await.contains('-'));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_tells_open_streams_their_history_is_lost() {
    let mut redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let (mut stream, _) = open_resumable(&stream_url(&node, "rr", &["t"]), None).await;
    let mut producer = Producer::connect(&redis).await;
    producer.durable("sse:user:rr", &envelope("before")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "before");

    redis.kill();
    node.wait_readyz(503, WAIT).await;
    redis.restart().await;
    node.wait_readyz(200, Duration::from_secs(20)).await;
    // The history the stream followed is gone, on every channel (the quiet ones too: their
    // positions were in it): it is told so once per channel, with a cursor in the new history,
    // before anything new, on the same connection.
    let reset = read_history_lost(&mut stream, &["user:rr", "broadcast", "topic:t"]).await;
    assert!(reset.id.is_some(), "the reset carries a cursor in the new history");
    let mut producer = Producer::connect(&redis).await;
    producer.durable("sse:user:rr", &envelope("after")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_subscriber_connection_is_backfilled_from_history() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let (mut stream, _) = open_resumable(&stream_url(&node, "bf", &[]), None).await;
    producer.durable("sse:user:bf", &envelope("0")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "0");
    // Redis takes no new connection while the messages are published, so the node's
    // subscriber cannot be back before they are all in history: every one of them must come
    // from the backfill, none from live delivery.
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut producer.0).await.expect("CLIENT LIST");
    // One fewer than now: the slot the killed subscriber frees is not free.
    let connected = clients.lines().count() - 1;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(connected.to_string())
        .query_async(&mut producer.0)
        .await
        .expect("CONFIG SET maxclients");
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut producer.0).await.expect("kill");
    assert!(killed > 0, "the node's subscriber connection was killed");
    for i in 1..=20 {
        producer.durable("sse:user:bf", &envelope(&i.to_string())).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg("10000")
        .query_async(&mut producer.0)
        .await
        .expect("CONFIG SET maxclients");
    let data: Vec<String> = stream.next_events(20, WAIT).await.into_iter().map(|e| e.data).collect();
    let expected: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    assert_eq!(data, expected, "every message published while reconnecting, once, in order");
    producer.durable("sse:user:bf", &envelope("sentinel")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "sentinel", "no copy of a backfilled message follows");
    // The node's own count: all 20 came from history.
    let backfilled: u64 = node
        .log_text()
        .lines()
        .filter(|l| l.contains("backfilled after a bus reconnect"))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("missed="))?.parse::<u64>().ok())
        .sum();
    assert_eq!(backfilled, 20, "log:\n{}", node.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_bus_resumes_too() {
    let node = Node::start(&[]).await;
    let url = stream_url(&node, "solo", &["news"]);
    let (mut stream, _) = open_resumable(&url, None).await;
    publish_api(&node, json!({"users": ["solo"], "data": "seen"})).await;
    let cursor = stream.next_events(1, WAIT).await[0].id.clone().expect("cursor");
    drop(stream);
    for body in [
        json!({"users": ["solo"], "data": "a"}),
        json!({"topics": ["news"], "data": "b"}),
        json!({"broadcast": true, "data": "c"}),
    ] {
        assert_eq!(publish_api(&node, body).await.0, 202);
    }
    let (mut stream, _) = open_resumable(&url, Some(&cursor)).await;
    let mut data: Vec<String> = stream.next_events(3, WAIT).await.into_iter().map(|e| e.data).collect();
    data.sort();
    assert_eq!(data, ["a", "b", "c"]);
    assert_eq!(publish_api(&node, json!({"users": ["solo"], "data": "sentinel"})).await.0, 202);
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "sentinel", "nothing replayed twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_returns_missed_events_and_the_next_cursor() {
    let node = Node::start(&[]).await;
    let token = token("poller", &["*"], None);
    let get = |after: Option<String>| {
        let mut url = node.url(&format!("/api/history?topic=news&access_token={token}"));
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        async move { http().get(url).send().await.expect("get").json::<Value>().await.expect("json") }
    };
    let first = get(None).await;
    assert_eq!(first["events"], json!([]));
    let cursor = first["cursor"].as_str().expect("cursor").to_owned();
    publish_api(&node, json!({"users": ["poller"], "event": "dm", "data": {"x": 1}})).await;
    publish_api(&node, json!({"topics": ["news"], "data": "headline"})).await;
    let second = get(Some(cursor)).await;
    let events = second["events"].as_array().expect("events");
    assert_eq!(events.len(), 2, "{second}");
    assert_eq!(
        (events[0]["channel"].as_str(), events[0]["event"].as_str(), events[0]["data"].as_str()),
        (Some("user:poller"), Some("dm"), Some(r#"{"x":1}"#))
    );
    assert_eq!((events[1]["channel"].as_str(), events[1]["data"].as_str()), (Some("topic:news"), Some("headline")));
    let third = get(second["cursor"].as_str().map(str::to_owned)).await;
    assert_eq!(third["events"], json!([]));
    let unauthorized = http().get(node.url("/api/history")).send().await.expect("get");
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_publish_has_no_id_and_is_not_replayed_and_the_query_resumes_like_the_header() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let url = stream_url(&node, "pl", &[]);
    let (mut stream, _) = open_resumable(&url, None).await;
    producer.durable("sse:user:pl", &envelope("durable 1")).await;
    let first = stream.next_events(1, WAIT).await.remove(0);
    let cursor = first.id.clone().expect("a durable message carries a cursor");
    // Live only: the block has no `id:` line, so a browser's last event id stays the cursor.
    assert_eq!(redis.publish("sse:user:pl", &envelope("plain")).await, 1);
    let plain = stream.next_events(1, WAIT).await.remove(0);
    assert_eq!((plain.data.as_str(), plain.id.as_deref()), ("plain", None), "{plain:?}");
    assert_eq!(plain.last_event_id, cursor);
    producer.durable("sse:user:pl", &envelope("durable 2")).await;
    assert_eq!(stream.next_events(1, WAIT).await[0].data, "durable 2");
    drop(stream);

    // Resumed after `durable 1`, by header and by `?lastEventId=`: `durable 2` only (the plain
    // message between them is not in history), then live.
    for (n, by_query) in [false, true].into_iter().enumerate() {
        let (mut again, _) = if by_query {
            open_resumable(&format!("{url}&lastEventId={cursor}"), None).await
        } else {
            open_resumable(&url, Some(&cursor)).await
        };
        let replayed = again.next_events(1, WAIT).await.remove(0);
        assert_eq!(replayed.data, "durable 2", "by query: {by_query}");
        assert!(replayed.id.is_some(), "a replayed entry carries its cursor");
        // A plain sentinel: live, and never replayed to the next round either.
        let sentinel = format!("sentinel {n}");
        assert_eq!(redis.publish("sse:user:pl", &envelope(&sentinel)).await, 1);
        assert_eq!(again.next_events(1, WAIT).await[0].data, sentinel, "by query: {by_query}");
    }
}

/// A write Redis acknowledged and then lost (a failover to a replica that had not received it
/// yet; `XDEL` stands in for that here): a stream positioned on it is told `history_lost`, not
/// `window_lost`, since its position is gone from a history that goes on past it.
#[tokio::test(flavor = "multi_thread")]
async fn a_position_missing_from_a_history_that_goes_on_resets_as_history_lost() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", &redis.url())]).await;
    let mut producer = Producer::connect(&redis).await;
    let url = stream_url(&node, "promoted", &[]);
    let (mut stream, _) = open_resumable(&url, None).await;
    producer.durable("sse:user:promoted", &envelope("kept")).await;
    let lost = producer.durable("sse:user:promoted", &envelope("lost")).await;
    let seen = stream.next_events(2, WAIT).await;
    let cursor = seen[1].id.clone().expect("a cursor");
    drop(stream);

    redis.command(&["XDEL", "sse:user:promoted", &lost]).await.expect("xdel");
    producer.durable("sse:user:promoted", &envelope("after")).await;
    let (mut resumed, _) = open_resumable(&url, Some(&cursor)).await;
    let reset = resumed.next_event(WAIT).await.expect("reset");
    assert_eq!(reset.event, "reset", "{reset:?}");
    let data: Value = serde_json::from_str(&reset.data).expect("json");
    assert_eq!(data, json!({"channels": ["user:promoted"], "reason": "history_lost"}));
    producer.durable("sse:user:promoted", &envelope("later")).await;
    assert_eq!(resumed.next_events(1, WAIT).await[0].data, "later");
}
