//! History kept by age (`SSE_HISTORY_*_AGE`), end to end on both buses (Redis and embedded):
//! a resume from a position whose later entries expired is told so with `reset` `window_lost`,
//! never left with a silent gap; and a client whose position is its channel's last entry, with
//! a cursor younger than the age, resumes without a reset after that idle history expired.
//!
//! A cursor carries its issue time in whole seconds and the history's age is checked against
//! it, so each case starts just after a whole second: the moment where a resume right after
//! the expiry is most easily taken for a short absence.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
/// Topics keep their history for a second (`SSE_HISTORY_TOPIC_AGE`, the setting).
const TOPIC_AGE: Duration = Duration::from_secs(1);
/// User channels keep theirs for 4 s: long enough for a stream to open in the middle of it
/// with a second to spare on a loaded machine, and to resume after it with three.
const USER_AGE: Duration = Duration::from_secs(4);

fn settings(redis: Option<&RedisServer>) -> Vec<(&'static str, String)> {
    let mut env = vec![("SSE_HISTORY_TOPIC_AGE", "1s".to_owned()), ("SSE_HISTORY_USER_AGE", "4s".to_owned())];
    if let Some(redis) = redis {
        env.push(("SSE_REDIS_URL", redis.url()));
    }
    env
}

async fn start(redis: Option<&RedisServer>) -> Node {
    let env = settings(redis);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::start(&env).await
}

fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock")
}

/// Sleeps until just after the next whole second of the clock (the nodes' clock too).
async fn start_of_a_second() {
    let into = Duration::from_nanos(u64::from(since_epoch().subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(20)).await;
}

/// Publishes one durable event and returns the time it was published by (the bus stamps the
/// entry before the API answers).
async fn publish(node: &Node, target: Value, data: &str) -> Duration {
    let mut body = json!({"event": "m", "data": data});
    body.as_object_mut().expect("object").extend(target.as_object().expect("object").clone());
    assert_eq!(publish_api(node, body).await.0, 202);
    since_epoch()
}

/// Waits until the history of `key` expired, `age` after its last entry (published by
/// `last`): on Redis until the key is gone, on the embedded bus until the clock says so.
async fn wait_expired(redis: Option<&RedisServer>, key: &str, last: Duration, age: Duration) {
    match redis {
        Some(redis) => {
            let deadline = std::time::Instant::now() + WAIT;
            while redis.command(&["EXISTS", key]).await.as_deref() != Some(":0\r\n") {
                assert!(std::time::Instant::now() < deadline, "{key} did not expire");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        None => {
            let expired = last + age + Duration::from_millis(50);
            tokio::time::sleep(expired.saturating_sub(since_epoch())).await;
        }
    }
}

/// A client read `seen` (its cursor is that event's), left, and `missed` was published and
/// expired with the history: its resume must say `window_lost` for that topic, not replay
/// nothing silently, and live delivery goes on.
async fn a_position_whose_later_entries_expired_is_reset(redis: Option<&RedisServer>) {
    let node = start(redis).await;
    let url = stream_url(&node, "reader", &["news"]);
    start_of_a_second().await;
    let (mut stream, _) = open_resumable(&url, None).await;
    publish(&node, json!({"topics": ["news"]}), "seen").await;
    let seen = stream.next_event(WAIT).await.expect("seen");
    assert_eq!(seen.data, "seen");
    let cursor = seen.id.expect("a durable event carries a cursor");
    drop(stream);
    let missed = publish(&node, json!({"topics": ["news"]}), "missed").await;
    // Resume as soon as it expired: about 1.2 s after the cursor was written, within the
    // second after the one it names.
    wait_expired(redis, "sse:topic:news", missed, TOPIC_AGE).await;
    let (mut again, _) = open_resumable(&url, Some(&cursor)).await;
    let reset = again.next_event(WAIT).await.expect("a reset");
    assert_eq!(reset.event, "reset", "the expired entry was skipped without a word: {reset:?}");
    let data: Value = serde_json::from_str(&reset.data).expect("json");
    assert_eq!(data, json!({"channels": ["topic:news"], "reason": "window_lost"}));
    publish(&node, json!({"topics": ["news"]}), "after").await;
    assert_eq!(again.next_event(WAIT).await.expect("live after the reset").data, "after");
}

/// The user channel's last entry was published, a stream opened while it was still there
/// (so its cursor sits on it), and the idle history expired: nothing was missed, so the resume
/// has no reset and nothing replayed; the next event is the next one published.
async fn an_idle_history_that_expired_under_the_last_position_resumes_without_reset(redis: Option<&RedisServer>) {
    let node = start(redis).await;
    let url = stream_url(&node, "idler", &[]);
    start_of_a_second().await;
    let last = publish(&node, json!({"users": ["idler"]}), "last").await;
    // Open 1.5 s before the history expires: the cursor names the last entry.
    let open_at = last + USER_AGE - Duration::from_millis(1500);
    tokio::time::sleep(open_at.saturating_sub(since_epoch())).await;
    let (stream, cursor) = open_resumable(&url, None).await;
    drop(stream);
    wait_expired(redis, "sse:user:idler", last, USER_AGE).await;
    let (mut again, _) = open_resumable(&url, Some(&cursor)).await;
    publish(&node, json!({"users": ["idler"]}), "next").await;
    let next = again.next_event(WAIT).await.expect("the next event");
    assert_eq!((next.event.as_str(), next.data.as_str()), ("m", "next"), "a spurious reset or replay: {next:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_a_position_whose_later_entries_expired_is_reset_as_window_lost() {
    let redis = RedisServer::start().await;
    a_position_whose_later_entries_expired_is_reset(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_a_position_whose_later_entries_expired_is_reset_as_window_lost() {
    a_position_whose_later_entries_expired_is_reset(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_an_idle_history_that_expired_under_the_last_position_gives_no_reset() {
    let redis = RedisServer::start().await;
    an_idle_history_that_expired_under_the_last_position_resumes_without_reset(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_an_idle_history_that_expired_under_the_last_position_gives_no_reset() {
    an_idle_history_that_expired_under_the_last_position_resumes_without_reset(None).await;
}
