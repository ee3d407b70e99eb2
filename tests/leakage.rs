//! Isolation under random load (issue 13): random users, grants, topics and messages over two
//! nodes sharing one real `redis-server`, several hundred streams. Every event a stream
//! receives is checked against what its token and its `topic=` entitle it to: none outside,
//! none missing, none twice, in the order published. The seed is printed; `LEAKAGE_SEED=<n>`
//! replays a run.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const USERS: usize = 40;
const STREAMS: usize = 300;
const MESSAGES: usize = 400;
/// The last event every stream gets (a broadcast), published after all the others.
const SENTINEL: &str = "sentinel";
/// Names that share prefixes, so a pattern or a prefix match that is off by one character
/// shows: `a:1*` grants `a:1`, `a:10` and `a:1x`, but not `a:2` or `b:1`.
const TOPICS: [&str; 9] = ["a:1", "a:10", "a:1x", "a:2", "b:1", "b:10", "c", "cc", "c:"];
const PATTERNS: [&str; 8] = ["a:*", "a:1*", "b:*", "c*", "c", "a:1", "b:10", "*"];

/// What a stream is entitled to: its user and the topics it joined (always with broadcast).
struct Entitlement {
    user: String,
    topics: Vec<String>,
}

/// One message and the channels it was published to.
struct Message {
    data: String,
    users: Vec<String>,
    topics: Vec<String>,
    broadcast: bool,
}

impl Message {
    /// Copies a stream with `entitlement` should get: one per channel of the message it is on
    /// (a message to two of its topics comes once through each).
    fn copies_for(&self, entitlement: &Entitlement) -> usize {
        self.users.iter().filter(|u| **u == entitlement.user).count()
            + self.topics.iter().filter(|t| entitlement.topics.contains(t)).count()
            + usize::from(self.broadcast)
    }

    fn envelope(&self) -> String {
        json!({"event": "m", "data": self.data}).to_string()
    }
}

fn granted(patterns: &[&str], topic: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => *p == topic,
    })
}

fn stream_url(node: &Node, user: &str, patterns: &[&str], topics: &[String]) -> String {
    let mut url = node.url(&format!("/events?access_token={}", token(user, patterns, None)));
    for topic in topics {
        url.push_str(&format!("&topic={}", topic.replace(':', "%3A")));
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stream_receives_what_its_token_does_not_entitle_it_to() {
    let seed: u64 = std::env::var("LEAKAGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("LEAKAGE_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let redis = RedisServer::start().await;
    let nodes = [
        Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_MAX_CONNECTIONS_PER_USER", "0")]).await,
        Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_MAX_CONNECTIONS_PER_USER", "0")]).await,
    ];
    for node in &nodes {
        node.wait_readyz(200, Duration::from_secs(10)).await;
    }
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();

    // Streams: a random user, random grants, a random subset of the granted topics. Asking
    // for a topic outside the grants is refused, whatever else is asked with it.
    let mut entitlements = Vec::new();
    let mut streams = Vec::new();
    let mut refused = 0;
    for _ in 0..STREAMS {
        let user = users.choose(&mut rng).expect("users").clone();
        let count = rng.random_range(0..3);
        let patterns: Vec<&str> = PATTERNS.choose_multiple(&mut rng, count).copied().collect();
        let mut topics: Vec<String> =
            TOPICS.iter().filter(|t| granted(&patterns, t) && rng.random_bool(0.5)).map(|t| t.to_string()).collect();
        topics.shuffle(&mut rng);
        let node = &nodes[rng.random_range(0..nodes.len())];
        if let Some(outside) = TOPICS.iter().find(|t| !granted(&patterns, t))
            && rng.random_bool(0.1)
        {
            let mut asked = topics.clone();
            asked.push(outside.to_string());
            let client = SseClient::open(&stream_url(node, &user, &patterns, &asked), &[]).await;
            assert_eq!(client.status, 403, "{user} {patterns:?} asking {asked:?}: {:?}", client.body);
            let body: Value = serde_json::from_str(client.body.as_deref().unwrap_or("")).expect("a JSON body");
            assert_eq!(body["error"], "topic_not_allowed");
            refused += 1;
        }
        let mut client = SseClient::open(&stream_url(node, &user, &patterns, &topics), &[]).await;
        assert_eq!(client.status, 200, "{user} {patterns:?} {topics:?}: {:?}", client.body);
        client.connected().await;
        streams.push(client);
        entitlements.push(Entitlement { user, topics });
    }
    assert!(refused > 0, "some streams asked for a topic outside their grants");

    // Each stream's events, collected as they arrive.
    let received: Vec<Arc<Mutex<Vec<String>>>> = (0..STREAMS).map(|_| Arc::default()).collect();
    for (mut client, sink) in streams.into_iter().zip(received.iter().cloned()) {
        tokio::spawn(async move {
            loop {
                match client.next_event(Duration::from_secs(3600)).await {
                    Ok(event) => sink.lock().expect("sink").push(event.data),
                    // A stream that ends is wrong: it shows in the comparison below.
                    Err(gap) => {
                        sink.lock().expect("sink").push(format!("<stream ended: {gap:?}>"));
                        return;
                    }
                }
            }
        });
    }

    // Messages: to one or more users, topics (existing or not), broadcast, or a mix; through
    // either node's API, a durable FCALL or a plain PUBLISH. Each waits for the previous one,
    // so every stream sees them in this order.
    let mut producer = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let mut messages = Vec::new();
    for i in 0..MESSAGES {
        let mut message = Message { data: format!("m{i}"), users: Vec::new(), topics: Vec::new(), broadcast: false };
        match rng.random_range(0..10) {
            0 => message.broadcast = true,
            1..=4 => {
                let count = rng.random_range(1..4);
                message.users = users.choose_multiple(&mut rng, count).cloned().collect()
            }
            _ => {
                let mut names: Vec<&str> = TOPICS.to_vec();
                names.push("a");
                names.push("a:");
                let count = rng.random_range(1..3);
                message.topics = names.choose_multiple(&mut rng, count).map(|t| t.to_string()).collect()
            }
        }
        let via_api = message.users.len() > 1 || message.topics.len() > 1 || rng.random_bool(0.4);
        if via_api {
            let mut body = json!({"event": "m", "data": message.data, "durable": rng.random_bool(0.5)});
            if message.broadcast {
                body["broadcast"] = json!(true);
            } else if !message.users.is_empty() {
                body["users"] = json!(message.users);
            } else {
                body["topics"] = json!(message.topics);
            }
            let (status, answer) = publish_api(&nodes[i % nodes.len()], body).await;
            assert_eq!(status, 202, "{answer}");
        } else {
            let channel = if message.broadcast {
                "sse:broadcast".to_string()
            } else if let Some(user) = message.users.first() {
                format!("sse:user:{user}")
            } else {
                format!("sse:topic:{}", message.topics[0])
            };
            let command = if rng.random_bool(0.5) {
                redis::cmd("PUBLISH").arg(&channel).arg(message.envelope()).clone()
            } else {
                redis::cmd("FCALL").arg("sse_publish").arg(1).arg(&channel).arg(message.envelope()).clone()
            };
            let _: redis::Value = command.query_async(&mut producer).await.expect("publish through redis");
        }
        messages.push(message);
    }

    let expected: Vec<Vec<String>> = entitlements
        .iter()
        .map(|entitlement| {
            messages.iter().flat_map(|m| std::iter::repeat_n(m.data.clone(), m.copies_for(entitlement))).collect()
        })
        .collect();
    let total: usize = expected.iter().map(Vec::len).sum();
    assert!(total > STREAMS, "the run delivers something to most streams ({total} events)");

    // A broadcast sentinel behind everything: each node gets it from its one subscriber
    // connection after every message before it, so a stream that has it has all it will get
    // (no grace period to guess), and anything more shows as an event before it.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("sse:broadcast")
        .arg(json!({"event": "m", "data": SENTINEL}).to_string())
        .query_async(&mut producer)
        .await
        .expect("publish the sentinel");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && received.iter().any(|got| !got.lock().expect("sink").iter().any(|d| d == SENTINEL || d.starts_with('<')))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: Vec<Vec<String>> = expected
        .into_iter()
        .map(|mut want| {
            want.push(SENTINEL.to_string());
            want
        })
        .collect();
    let mut wrong = Vec::new();
    for (index, ((got, want), entitlement)) in received.iter().zip(&expected).zip(&entitlements).enumerate() {
        let got = got.lock().expect("sink");
        if *got != *want {
            let outside: Vec<&String> = got.iter().filter(|d| !want.contains(d)).collect();
            let missing: Vec<&String> = want.iter().filter(|d| !got.contains(d)).collect();
            wrong.push(format!(
                "stream {index} (user {}, topics {:?}): {} received, {} expected; outside {outside:?}, missing {missing:?}",
                entitlement.user,
                entitlement.topics,
                got.len(),
                want.len()
            ));
        }
    }
    let by_user: HashMap<&str, usize> = entitlements.iter().fold(HashMap::new(), |mut map, e| {
        *map.entry(e.user.as_str()).or_default() += 1;
        map
    });
    println!("{STREAMS} streams of {} users, {MESSAGES} messages, {total} deliveries checked", by_user.len());
    assert!(wrong.is_empty(), "seed {seed}: {} streams got the wrong events:\n{}", wrong.len(), wrong.join("\n"));
}
