//! What the README promises of the node's Redis subscriptions: many streams connecting at once
//! share a handful of SUBSCRIBE commands (the subscription owner batches them), and once every
//! stream is gone the node holds no stream's subscription (`PUBSUB NUMSUB` back to 0): only its
//! own channels (`sse:node:<id>`, `sse:canary:<id>`, `sse:control`), held for its whole life.

mod common;

use std::time::{Duration, Instant};

use common::{Node, RedisServer, SseClient, token};
use futures_util::future::join_all;

const STREAMS: usize = 500;

/// Subscribers Redis counts on `channel`, from `PUBSUB NUMSUB`.
async fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let reply = redis.command(&["PUBSUB", "NUMSUB", channel]).await.expect("redis reachable");
    // RESP: *2 $len channel :count
    let count =
        reply.lines().find_map(|line| line.strip_prefix(':')).unwrap_or_else(|| panic!("NUMSUB reply {reply:?}"));
    count.trim().parse().unwrap_or_else(|_| panic!("NUMSUB reply {reply:?}"))
}

/// Channels of streams (`sse:user:*`, `sse:topic:*`, `sse:broadcast`) that this Redis has any
/// subscriber on (`PUBSUB CHANNELS`): all but the nodes' own channels (`sse:node:<node>`,
/// `sse:canary:<node>` and the cluster's `sse:control`), held as long as a node runs.
async fn subscribed_channels(redis: &RedisServer) -> usize {
    channels_matching(redis, "sse:*").await
        - channels_matching(redis, "sse:node:*").await
        - channels_matching(redis, "sse:canary:*").await
        - channels_matching(redis, "sse:control").await
}

async fn channels_matching(redis: &RedisServer, pattern: &str) -> usize {
    let reply = redis.command(&["PUBSUB", "CHANNELS", pattern]).await.expect("redis reachable");
    let header = reply.lines().next().unwrap_or_default();
    header.strip_prefix('*').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("PUBSUB CHANNELS reply {reply:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_connects_share_subscribe_commands_and_the_last_close_unsubscribes() {
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", redis.url().as_str()), ("SSE_IP_OPEN_BURST", "1000")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    let before = node.metric("sse_bus_subscribe_commands_total", "").await;

    // 500 users at once: 500 user channels to subscribe (the broadcast channel is one more).
    let opens = (0..STREAMS).map(|i| {
        let url = node.url(&format!("/events?access_token={}", token(&format!("batch-{i}"), &[], None)));
        async move {
            let mut client = SseClient::open(&url, &[]).await;
            assert_eq!(client.status, 200, "{:?}", client.body);
            client.connected().await;
            client
        }
    });
    let streams = join_all(opens).await;
    let commands = node.metric("sse_bus_subscribe_commands_total", "").await - before;
    eprintln!("{STREAMS} concurrent connects took {commands} SUBSCRIBE commands");
    assert!(commands >= 1.0, "no SUBSCRIBE was counted");
    // Unbatched, it would be 501. Here 7 to 25 (a loaded machine spreads the connects out, so
    // the bound is generous): a quarter of that still shows the commands are shared.
    assert!(commands <= 125.0, "{STREAMS} connects sent {commands} SUBSCRIBE commands: they are not batched");
    assert_eq!(numsub(&redis, "sse:user:batch-0").await, 1);
    assert_eq!(numsub(&redis, "sse:user:batch-499").await, 1);
    assert_eq!(subscribed_channels(&redis).await, STREAMS + 1, "every user channel and the broadcast");

    // A dropped client's reader lets go of its connection when the next item arrives for it.
    drop(streams);
    redis.publish("sse:broadcast", r#"{"event":"bye","data":1}"#).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while subscribed_channels(&redis).await > 0 {
        assert!(Instant::now() < deadline, "the node still holds subscriptions after every stream closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(numsub(&redis, "sse:user:batch-0").await, 0);
    assert_eq!(numsub(&redis, "sse:broadcast").await, 0);
    assert_eq!(channels_matching(&redis, "sse:node:*").await, 1, "the node's control channel stays");
}
