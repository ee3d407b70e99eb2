//! `connected` is sent only after Redis confirmed every subscription the stream needs, and a
//! stream whose subscriptions take longer than 5 s is refused with 503 `not_ready` (README,
//! "Browsers"; `SUBSCRIBE_TIMEOUT` in src/http/events.rs). Between the node and Redis sits a
//! TCP proxy written here that holds back what the node sends with a SUBSCRIBE in it, so the
//! confirmation comes as late as the test says.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// A proxy to Redis that delays every chunk the node sends containing `SUBSCRIBE` (so also
/// UNSUBSCRIBE) by the current delay before forwarding it. Whatever follows on that connection
/// waits behind it, as on a slow link: requests stay in order, and so do their replies.
struct DelayingProxy {
    port: u16,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayingProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("addr").port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                let (mut from_redis, mut to_redis) = server.into_split();
                let (mut from_node, mut to_node) = client.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_redis, &mut to_node).await;
                });
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    // The end of the previous chunk: a command cut between two reads is seen too.
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match from_node.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        tail.extend_from_slice(&buffer[..n]);
                        if tail.windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE")) {
                            tokio::time::sleep(Duration::from_millis(delay.load(Ordering::Relaxed))).await;
                        }
                        tail.drain(..tail.len().saturating_sub(8));
                        if to_redis.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, delay_ms, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for DelayingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connected_comes_after_redis_confirmed_the_subscription() {
    let redis = RedisServer::start().await;
    let proxy = DelayingProxy::start(redis.port).await;
    let node = Node::start(&[("SSE_REDIS_URL", &proxy.url())]).await;
    // Under the owner's 2 s command timeout, so the first SUBSCRIBE is the one confirmed.
    let delay = Duration::from_secs(1);
    proxy.delay(delay);
    for user in ["first", "second"] {
        let asked = Instant::now();
        let mut stream = SseClient::open(&stream_url(&node, user, &[]), &[]).await;
        assert_eq!(stream.status, 200, "{:?}", stream.body);
        stream.connected().await;
        let waited = asked.elapsed();
        // Published the instant `connected` was read, straight to Redis: the node must be
        // subscribed already (one receiver), and the stream gets it.
        let receivers = redis.publish(&format!("sse:user:{user}"), &envelope("right after connected")).await;
        assert_eq!(receivers, 1, "{user}: connected came {waited:?} after the request, before SUBSCRIBE was confirmed");
        assert!(waited >= delay, "{user}: connected after {waited:?}, sooner than Redis could confirm");
        let event = stream.next_event(WAIT).await.expect("the event published right after connected");
        assert_eq!(event.data, "right after connected");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_unconfirmed_after_5_s_is_a_503_not_ready_and_the_node_recovers() {
    let redis = RedisServer::start().await;
    let proxy = DelayingProxy::start(redis.port).await;
    let node = Node::start(&[("SSE_REDIS_URL", &proxy.url())]).await;
    // Held 8 s: the 5 s rule answers first, with 3 s to spare on a loaded machine.
    let held = Duration::from_secs(8);
    proxy.delay(held);
    let asked = Instant::now();
    let refused = SseClient::open(&stream_url(&node, "late", &[]), &[]).await;
    let answered = asked.elapsed();
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    let body: serde_json::Value = serde_json::from_str(refused.body.as_deref().unwrap_or("")).expect("JSON error");
    assert_eq!(body["error"], "not_ready", "{body}");
    assert!(answered >= Duration::from_secs(5), "refused after {answered:?}: before its 5 s were up");
    assert!(answered < held, "refused after {answered:?}: when Redis answered, not at 5 s");
    assert_eq!(node.metric("sse_connections_rejected_total", r#"reason="subscribe_timeout""#).await, 1.0);

    // Redis answers promptly again: new streams open, subscribed before `connected`.
    proxy.delay(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        let stream = SseClient::open(&stream_url(&node, "later", &[]), &[]).await;
        if stream.status == 200 {
            break stream;
        }
        assert!(Instant::now() < deadline, "the node did not recover: {} {:?}", stream.status, stream.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stream.connected().await;
    assert_eq!(redis.publish("sse:user:later", &envelope("recovered")).await, 1);
    assert_eq!(stream.next_event(WAIT).await.expect("delivered").data, "recovered");
}

/// A stream on a channel that has carried nothing yet: its node's subscription drops, and a
/// durable message is published before the node is subscribed again. The backfill after the
/// resubscription starts where the stream began (there is no delivered id to start from), so
/// the message arrives, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_published_while_a_quiet_channel_is_resubscribed_is_backfilled_once() {
    let redis = RedisServer::start().await;
    let proxy = DelayingProxy::start(redis.port).await;
    let node = Node::start(&[("SSE_REDIS_URL", &proxy.url())]).await;
    node.wait_readyz(200, WAIT).await;
    let mut stream = subscribe(&node, "quiet", &[]).await;

    // The resubscription is held 3 s; the subscriber connection is cut.
    proxy.delay(Duration::from_secs(3));
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await.expect("redis");
    assert_eq!(killed.trim(), ":1", "the node's subscriber connection");
    let (status, answer) = publish_api(&node, serde_json::json!({"users": ["quiet"], "data": "in the gap"})).await;
    assert_eq!(status, 202, "{answer}");
    let numsub = redis.command(&["PUBSUB", "NUMSUB", "sse:user:quiet"]).await.expect("redis");
    assert_eq!(resp_words(&numsub).last().map(String::as_str), Some("0"), "published while unsubscribed: {numsub}");

    let event = stream.next_event(WAIT).await.expect("backfilled after the resubscription");
    assert_eq!(event.data, "in the gap");
    assert!(event.id.is_some(), "a durable message carries its cursor: {event:?}");
    stream.assert_silent(Duration::from_secs(2)).await;
}
