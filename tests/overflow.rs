//! `overflow` (README, "Browsers" and the close reasons): when the node falls behind Redis and
//! drops live messages, it closes every stream with `disconnected` `overflow`, and the clients,
//! reconnecting as EventSource does, resume exactly: every durable message once, in order.
//!
//! The node falls behind for real: it is stopped (SIGSTOP, as a paused VM or a throttled
//! container would be) while 200,000 messages are published on a topic 103 streams listen to,
//! then let go. Its subscriber reads the backlog far faster than the dispatcher can push each
//! message into 103 streams, so the bus's inbound queue (65,536 messages) overflows.

mod common;

use std::time::{Duration, Instant};

use common::*;

const LOAD_STREAMS: usize = 100;
const OBSERVERS: usize = 3;
/// More than the inbound queue holds (65,536), three times over.
const MESSAGES: usize = 200_000;
/// Every 100th message is durable (`sse_publish`); the rest are plain `PUBLISH`es, live only.
const DURABLE_EVERY: usize = 100;
const DURABLE: usize = MESSAGES / DURABLE_EVERY;
const WAIT: Duration = Duration::from_secs(60);

/// Sends the whole flood to `sse:topic:flood` in pipelines: `d<n>` durable, `p<i>` plain.
async fn flood(producer: &mut Producer) {
    let mut durable = 0;
    for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            if i % DURABLE_EVERY == 0 {
                pipe.cmd("FCALL")
                    .arg("sse_publish")
                    .arg(1)
                    .arg("sse:topic:flood")
                    .arg(envelope(&format!("d{durable}")));
                durable += 1;
            } else {
                pipe.cmd("PUBLISH").arg("sse:topic:flood").arg(envelope(&format!("p{i}")));
            }
            pipe.ignore();
        }
        let () = pipe.query_async(&mut producer.0).await.expect("the flood is published");
    }
}

/// The number after `prefix` in `data`, for the flood's events.
fn number(data: &str, prefix: char) -> Option<usize> {
    data.strip_prefix(prefix)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_fell_behind_closes_every_stream_with_overflow_and_they_resume_exactly() {
    let redis = RedisServer::start().await;
    // Redis would otherwise drop a subscriber whose backlog passes 32 MB: that is a
    // disconnection (and a backfill), not the overflow under test.
    let set = redis.command(&["CONFIG", "SET", "client-output-buffer-limit", "normal 0 0 0 pubsub 0 0 0"]).await;
    assert_eq!(set.as_deref(), Some("+OK\r\n"));
    let node = Node::start(&[
        ("SSE_REDIS_URL", &redis.url()),
        ("SSE_HISTORY_TOPIC_LENGTH", "10000"),
        // No stream may be cut as a slow consumer while the dispatcher pushes what it can.
        ("SSE_QUEUE_CAPACITY", "200000"),
        ("SSE_QUEUE_MAX_BYTES", "64MiB"),
        ("SSE_RETRY_INTERVAL", "500ms"),
    ])
    .await;
    let url = stream_url(&node, "watcher", &["flood"]);
    let mut load = Vec::new();
    for i in 0..LOAD_STREAMS {
        load.push(subscribe(&node, &format!("load{i}"), &["flood"]).await);
    }
    let observers: Vec<EventSource> = (0..OBSERVERS).map(|_| EventSource::open(url.clone())).collect();
    for observer in &observers {
        assert!(observer.wait_for(WAIT, |seen| !seen.connections.is_empty()).await, "an observer did not connect");
    }
    let mut producer = Producer::connect(&redis).await;

    node.signal("STOP");
    flood(&mut producer).await;
    node.signal("CONT");

    // Every stream was closed with overflow (a reconnected observer may be closed again).
    let everyone = (LOAD_STREAMS + OBSERVERS) as f64;
    let deadline = Instant::now() + WAIT;
    loop {
        let closed = node.metric("sse_connections_closed_total", r#"reason="overflow""#).await;
        if closed >= everyone {
            break;
        }
        assert!(Instant::now() < deadline, "{closed} streams closed with overflow, expected {everyone}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.log_text().contains("live messages were dropped"), "{}", node.log_text());
    for (i, stream) in load.iter_mut().enumerate() {
        let mut delivered = 0;
        let farewell = loop {
            let event = stream.next_event(WAIT).await.unwrap_or_else(|e| panic!("load{i}: {e:?} after {delivered}"));
            if event.event != "m" {
                break event;
            }
            delivered += 1;
        };
        assert_eq!(
            (farewell.event.as_str(), farewell.data.as_str()),
            ("disconnected", r#"{"reason":"overflow"}"#),
            "load{i} after {delivered} events"
        );
        assert_eq!(stream.next_event(WAIT).await, Err(NoEvent::End), "load{i} ends after its farewell");
        assert!(delivered < MESSAGES, "load{i} got everything: nothing overflowed");
    }

    // The observers reconnect by themselves and resume: every durable message exactly once
    // and in order; the plain ones (live only) may be lost, never duplicated or reordered.
    producer.durable("sse:topic:flood", &envelope("end")).await;
    for (i, observer) in observers.iter().enumerate() {
        let ended = observer.wait_for(WAIT, |seen| seen.events.iter().any(|e| e.data == "end")).await;
        let seen = observer.seen();
        assert!(ended, "observer {i} did not get to the end: {} events, refused {:?}", seen.events.len(), seen.refused);
        assert!(seen.data_of("disconnected").contains(&r#"{"reason":"overflow"}"#), "observer {i} was not closed");
        assert!(seen.data_of("reset").is_empty(), "observer {i} was reset: {:?}", seen.data_of("reset"));
        // A browser would give up on any status but 200; only a node not ready yet (its Redis
        // PING timed out while it was stopped) may have answered otherwise, with 503.
        assert!(seen.refused.iter().all(|&status| status == 503), "observer {i} refused: {:?}", seen.refused);
        let durable: Vec<usize> = seen.data_of("m").iter().filter_map(|d| number(d, 'd')).collect();
        assert_eq!(durable, (0..DURABLE).collect::<Vec<_>>(), "observer {i}: durable messages exactly once, in order");
        let plain: Vec<usize> = seen.data_of("m").iter().filter_map(|d| number(d, 'p')).collect();
        assert!(plain.windows(2).all(|w| w[0] < w[1]), "observer {i}: plain messages twice or out of order");
        assert!(plain.len() < MESSAGES - DURABLE, "observer {i} got every plain message: nothing overflowed");
    }
}
