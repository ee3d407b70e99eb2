//! TLS to Redis (`rediss://`, `rediss+cluster://`) end to end: real `redis-server`s with a TLS
//! listener (certificates from a private CA made by the test) that require client
//! certificates, and nodes that must trust that CA and show their certificate. Every Redis
//! connection of the node has to work over TLS for these to pass: the subscriber (live
//! delivery), the pool (durable publish), the reads (resume) and presence (the admin API).

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn env_of<'a>(url: &'a str, tls: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("SSE_REDIS_URL", url)];
    env.extend(tls.iter().map(|(k, v)| (*k, v.as_str())));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_on_rediss_delivers_resumes_and_answers_presence_with_a_private_ca_and_a_client_certificate() {
    let pki = TestPki::make();
    let redis = RedisServer::start_tls(&[], &pki).await;
    let url = redis.tls_url();
    let tls = pki.node_env();
    let node = Node::start(&env_of(&url, &tls)).await;

    let (mut stream, _) = open_resumable(&stream_url(&node, "ann", &["news"]), None).await;
    // Durable, through the node's pool; then live only, published by a producer on the plain
    // listener and heard on the node's TLS subscriber.
    for i in 1..=3 {
        let (status, body) = publish_api(&node, json!({"users": ["ann"], "event": "m", "data": format!("d{i}")})).await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(redis.publish("sse:topic:news", r#"{"event":"m","data":"live"}"#).await, 1, "the node subscribed");
    let events = stream.next_events(4, WAIT).await;
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["d1", "d2", "d3", "live"]);
    let first = events[0].id.clone().expect("a durable event has an id");

    // Resume after the first: history is read over the node's TLS read connection.
    let (mut resumed, _) = open_resumable(&stream_url(&node, "ann", &["news"]), Some(&first)).await;
    let replayed: Vec<String> = resumed.next_events(2, WAIT).await.into_iter().map(|e| e.data).collect();
    assert_eq!(replayed, ["d2", "d3"]);

    // Presence lives in Redis, on a connection of its own.
    let admin = token("ops", &[], Some("admin"));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = http().get(node.url("/api/presence/ann")).bearer_auth(&admin).send().await.expect("request");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == 200 && body["streams"].as_array().is_some_and(|s| s.len() == 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "presence answered {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every connection the node holds came in on the TLS listener.
    let clients = redis.command(&["CLIENT", "LIST"]).await.expect("redis reachable");
    let on_tls = clients.lines().filter(|l| l.contains(&format!("laddr=127.0.0.1:{} ", redis.tls_port()))).count();
    let on_plain = clients.lines().filter(|l| l.contains(&format!("laddr=127.0.0.1:{} ", redis.port))).count();
    assert!(on_tls >= 4, "subscriber, pool, reads and presence over TLS: {clients}");
    assert_eq!(on_plain, 1, "only this CLIENT LIST itself is plain: {clients}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_untrusted_ca_or_no_client_certificate_keeps_the_node_unready() {
    let pki = TestPki::make();
    let redis = RedisServer::start_tls(&[], &pki).await;
    let url = redis.tls_url();
    let tls = pki.node_env();
    let ca = tls[0].1.as_str();
    // The system's roots do not know the test CA; the CA alone shows no client certificate,
    // which this Redis requires.
    let no_ca = Node::launch(&[("SSE_JWT_SECRET", SECRET), ("SSE_REDIS_URL", &url)]).await;
    let no_cert =
        Node::launch(&[("SSE_JWT_SECRET", SECRET), ("SSE_REDIS_URL", &url), ("SSE_REDIS_TLS_CA_FILE", ca)]).await;
    // A node with the full settings becomes ready meanwhile: the others had the time.
    let good = Node::start(&env_of(&url, &tls)).await;
    // The reason is logged once (the connection manager retries forever and never says).
    for (node, says) in [(&no_ca, "invalid peer certificate: UnknownIssuer"), (&no_cert, "CertificateRequired")] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !node.log_text().contains(says) {
            assert!(tokio::time::Instant::now() < deadline, "no {says:?} in the log:\n{}", node.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let response = http().get(node.url("/readyz")).send().await.expect("readyz");
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 503, "{body}; log:\n{}", node.log_text());
        assert!(body.contains("bus_unavailable"), "{body}");
        assert_eq!(node.log_text().matches("PING failed").count(), 1, "logged once:\n{}", node.log_text());
    }
    good.wait_readyz(200, WAIT).await;
}

#[test]
fn unusable_tls_settings_are_a_usage_error() {
    let dir = scratch_dir("redis-tls-cli");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    let missing = dir.join("missing.pem");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("SSE_REDIS_URL", "rediss://127.0.0.1:1"), ("SSE_REDIS_TLS_CA_FILE", missing.to_str().expect("utf8"))],
            "cannot read SSE_REDIS_TLS_CA_FILE",
        ),
        (
            &[("SSE_REDIS_URL", "rediss://127.0.0.1:1"), ("SSE_REDIS_TLS_CA_FILE", junk.to_str().expect("utf8"))],
            "no certificate in PEM form",
        ),
        (
            &[("SSE_REDIS_URL", "redis://127.0.0.1:1"), ("SSE_REDIS_TLS_CA_FILE", junk.to_str().expect("utf8"))],
            "apply to TLS connections only",
        ),
        (
            &[("SSE_REDIS_URL", "rediss://127.0.0.1:1"), ("SSE_REDIS_TLS_CERT_FILE", junk.to_str().expect("utf8"))],
            "redis-tls-key-file",
        ),
    ];
    for (env, says) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .env("SSE_JWT_SECRET", SECRET)
            .envs(env.iter().copied())
            .output()
            .expect("run sse-fanout");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(says), "{env:?}: expected {says:?} in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_cluster_delivers_to_users_on_every_shard() {
    let pki = TestPki::make();
    let cluster = RedisCluster::start_tls(3, 0, &pki).await;
    let url = cluster.tls_url();
    let tls = pki.node_env();
    let node = Node::start(&env_of(&url, &tls)).await;

    let users: Vec<String> = (0..12).map(|i| format!("tls{i}")).collect();
    let mut owners = HashSet::new();
    for user in &users {
        owners.insert(cluster.owner(key_slot(&format!("{{sse:user:{user}}}"))).await);
    }
    assert_eq!(owners.len(), 3, "the users' channels are on all three primaries");
    let mut streams = Vec::new();
    for user in &users {
        streams.push(open_resumable(&stream_url(&node, user, &[]), None).await.0);
    }
    let (status, body) = publish_api(&node, json!({"users": users, "event": "m", "data": "durable"})).await;
    assert_eq!(status, 202, "{body}");
    // A producer on the plain listeners: SPUBLISH reaches the node's TLS shard subscribers.
    let mut producer = cluster.client().await;
    for user in &users {
        let receivers: i64 = redis::cmd("SPUBLISH")
            .arg(format!("{{sse:user:{user}}}"))
            .arg(r#"{"event":"m","data":"live"}"#)
            .query_async(&mut producer)
            .await
            .expect("SPUBLISH");
        assert_eq!(receivers, 1, "{user}'s shard subscriber is the node's");
    }
    for (user, stream) in users.iter().zip(streams.iter_mut()) {
        let data: Vec<String> = stream.next_events(2, WAIT).await.into_iter().map(|e| e.data).collect();
        assert_eq!(data, ["durable", "live"], "{user}");
    }
}
