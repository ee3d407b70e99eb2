//! What the README promises of presence events (`SSE_PRESENCE_EVENTS`): the cluster writes a
//! user's `online` and `offline` transitions to the Redis stream `sse:presence:events`, per user
//! and not per stream (a second tab on another node, or closing one of two, writes nothing), an
//! `offline` only after the user stayed away `SSE_PRESENCE_EVENTS_DELAY` (a reload writes
//! nothing), a killed node's clients that come back elsewhere before its lease lapses write
//! nothing while the others go `offline`, the stream is bounded by `SSE_PRESENCE_EVENTS_MAXLEN`,
//! and nothing is written with the setting off.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Node, RedisServer, SseClient, subscribe};

const EVENTS: &str = "sse:presence:events";

/// One entry of the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transition {
    event: String,
    user: String,
    at: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

async fn transitions(redis: &RedisServer) -> Vec<Transition> {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("redis reachable");
    let entries: Vec<(String, Vec<String>)> =
        redis::cmd("XRANGE").arg(EVENTS).arg("-").arg("+").query_async(&mut connection).await.expect("XRANGE");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let field = |name: &str| {
                let at =
                    fields.iter().position(|f| f == name).unwrap_or_else(|| panic!("{id}: no {name} in {fields:?}"));
                fields[at + 1].clone()
            };
            Transition { event: field("event"), user: field("user"), at: field("at").parse().expect("at is a number") }
        })
        .collect()
}

/// Waits until the stream holds `count` entries (failing on more), for up to `within`.
async fn until_count(redis: &RedisServer, count: usize, within: Duration) -> Vec<Transition> {
    let deadline = Instant::now() + within;
    loop {
        let all = transitions(redis).await;
        assert!(all.len() <= count, "expected {count} transitions, got {all:?}");
        if all.len() == count {
            return all;
        }
        assert!(Instant::now() < deadline, "{count} transitions expected within {within:?}, got {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settings<'a>(url: &'a str, id: &'a str, lease: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("SSE_REDIS_URL", url),
        ("SSE_NODE_ID", id),
        ("SSE_PRESENCE_LEASE", lease),
        ("SSE_PRESENCE_EVENTS", "true"),
        ("SSE_PRESENCE_EVENTS_DELAY", "1s"),
        ("SSE_IP_OPEN_BURST", "1000"),
    ]
}

/// Longer than a presence flush (200 ms) and a sweep (1 s) together, with room for a loaded
/// machine: a transition that should not be written would be by then.
const SETTLE: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_are_the_users_across_nodes_and_a_quick_return_writes_nothing() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = Node::start(&settings(&url, "node-a", "30s")).await;
    let b = Node::start(&settings(&url, "node-b", "30s")).await;

    let first_tab = subscribe(&a, "alice", &[]).await;
    let online = until_count(&redis, 1, Duration::from_secs(5)).await;
    assert_eq!((online[0].event.as_str(), online[0].user.as_str()), ("online", "alice"));

    // A second tab on the other node, then the first closes: alice never left.
    let second_tab = subscribe(&b, "alice", &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(first_tab);
    tokio::time::sleep(SETTLE).await;
    assert_eq!(transitions(&redis).await.len(), 1, "a tab more or less is no transition");

    // A reload: the last stream closes and a new one opens within the delay.
    drop(second_tab);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloaded = subscribe(&a, "alice", &[]).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(transitions(&redis).await.len(), 1, "a reload is no transition");

    let left = now_ms();
    drop(reloaded);
    let all = until_count(&redis, 2, Duration::from_secs(6)).await;
    let seen = now_ms();
    let offline = &all[1];
    assert_eq!((offline.event.as_str(), offline.user.as_str()), ("offline", "alice"));
    // `at` is when alice left (the node notices within a flush), and the event waited the delay.
    assert!(offline.at >= left && offline.at <= left + 1500, "left at {left}, written {offline:?}");
    assert!(seen >= offline.at + 1000, "written before the delay passed: seen at {seen}, {offline:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_users_back_elsewhere_write_nothing_and_the_others_go_offline() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut a = Node::start(&settings(&url, "node-a", "2s")).await;
    let b = Node::start(&settings(&url, "node-b", "2s")).await;
    let users: Vec<String> = (0..20).map(|i| format!("u{i:02}")).collect();
    let mut streams = Vec::new();
    for user in &users {
        streams.push(subscribe(&a, user, &[]).await);
    }
    let online = until_count(&redis, users.len(), Duration::from_secs(5)).await;
    assert!(online.iter().all(|t| t.event == "online"), "{online:?}");
    assert_eq!(online.iter().map(|t| t.user.clone()).collect::<BTreeSet<_>>(), users.iter().cloned().collect());

    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    drop(streams);
    // Three quarters come back on the other node before the dead node's lease lapses.
    let mut back = Vec::new();
    for user in &users[..15] {
        back.push(subscribe(&b, user, &[]).await);
    }
    // The lease (2 s) lapses, a renewal tick of node-b (every 2/3 s) cleans, the delay passes.
    let all = until_count(&redis, users.len() + 5, Duration::from_secs(10)).await;
    tokio::time::sleep(SETTLE).await;
    let all_later = transitions(&redis).await;
    assert_eq!(all_later.len(), all.len(), "nothing more: {all_later:?}");
    let offline: BTreeSet<String> = all[users.len()..]
        .iter()
        .inspect(|t| assert_eq!(t.event, "offline", "{t:?}"))
        .map(|t| t.user.clone())
        .collect();
    assert_eq!(offline, users[15..].iter().cloned().collect());
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_bounded_and_nothing_is_written_with_events_off() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let off = Node::start(&[("SSE_REDIS_URL", url.as_str()), ("SSE_NODE_ID", "quiet")]).await;
    let mut quiet = subscribe(&off, "nobody-listens", &[]).await;
    // Presence is written (the user shows up cluster-wide), but no transition.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !redis.command(&["HLEN", "sse:presence:user:nobody-listens"]).await.expect("redis").contains(":1") {
        assert!(Instant::now() < deadline, "presence never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    quiet.assert_silent(Duration::from_millis(300)).await;
    assert_eq!(redis.command(&["EXISTS", EVENTS]).await.expect("redis").trim(), ":0");

    let mut bounded = settings(&url, "bounded", "30s");
    bounded.push(("SSE_PRESENCE_EVENTS_MAXLEN", "5"));
    let on = Node::start(&bounded).await;
    let mut streams: Vec<SseClient> = Vec::new();
    for i in 0..12 {
        streams.push(subscribe(&on, &format!("many-{i:02}"), &[]).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let written = redis.command(&["HLEN", "sse:presence:streams:bounded"]).await.expect("redis");
        if written.trim() == ":12" {
            break;
        }
        assert!(Instant::now() < deadline, "presence of 12 streams never written: {written:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = transitions(&redis).await;
    assert_eq!(kept.len(), 5, "trimmed to SSE_PRESENCE_EVENTS_MAXLEN: {kept:?}");
    assert!(kept.iter().any(|t| t.user == "many-11"), "the newest are kept: {kept:?}");
}
