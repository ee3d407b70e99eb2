//! `SSE_JWT_JWKS_URL`: real nodes verify RS256 and ES256 tokens with keys from a JWKS server
//! the test runs, which can rotate its keys, fail with 503, or not listen at all, and counts its
//! fetches. A rotated-in key is fetched on its first token and a retired one refused; made-up
//! kids cause at most one fetch per `SSE_JWT_JWKS_MIN_INTERVAL`; a node with keys stays ready
//! while the server fails; a restarted node reads its keys from `SSE_JWT_JWKS_CACHE`; a node
//! without any key is not ready (`keys_unavailable`) until the server answers.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::{Node, SseClient, http, reserve_port, scratch_dir, unix_now};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A signing key made by the openssl CLI, and its public half as a JWK.
struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
    public: Value,
}

impl SigningKey {
    fn ec(kid: &str) -> Self {
        let pem = openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let key = EncodingKey::from_ec_pem(&pem).expect("an EC key");
        Self::new(kid, Algorithm::ES256, key)
    }

    fn rsa(kid: &str) -> Self {
        let pem = openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        let key = EncodingKey::from_rsa_pem(&pem).expect("an RSA key");
        Self::new(kid, Algorithm::RS256, key)
    }

    fn new(kid: &str, algorithm: Algorithm, key: EncodingKey) -> Self {
        let mut public = serde_json::to_value(Jwk::from_encoding_key(&key, algorithm).expect("a JWK")).expect("json");
        public["kid"] = json!(kid);
        public["use"] = json!("sig");
        Self { kid: kid.to_owned(), algorithm, key, public }
    }

    /// A subscriber token for `user`, with this key's kid (or another one).
    fn token_as(&self, kid: Option<&str>, user: &str) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        let claims = json!({"sub": user, "exp": unix_now() + 600, "topics": ["news"]});
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }

    fn token(&self) -> String {
        self.token_as(Some(&self.kid), "jwks-user")
    }
}

/// A private key in PKCS#8 PEM, from `openssl genpkey`.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("the openssl CLI must be installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// What the JWKS server serves, and how often it was asked.
#[derive(Default)]
struct Published {
    keys: Mutex<Vec<Value>>,
    failing: AtomicBool,
    hits: AtomicU64,
}

async fn serve_jwks(State(published): State<Arc<Published>>) -> Response {
    published.hits.fetch_add(1, Ordering::SeqCst);
    if published.failing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let keys = published.keys.lock().expect("lock").clone();
    Json(json!({ "keys": keys })).into_response()
}

/// A JWKS endpoint in the test process; stops when dropped.
struct JwksServer {
    port: u16,
    published: Arc<Published>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// On a port the system picks.
    async fn start(keys: &[&SigningKey]) -> Self {
        Self::start_on(0, keys).await
    }

    async fn start_on(port: u16, keys: &[&SigningKey]) -> Self {
        let published = Arc::new(Published::default());
        let router = axum::Router::new()
            .route("/.well-known/jwks.json", axum::routing::get(serve_jwks))
            .with_state(published.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the JWKS port");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let server = Self { port, published, task };
        server.publish(keys);
        server
    }

    fn url(&self) -> String {
        jwks_url(self.port)
    }

    fn publish(&self, keys: &[&SigningKey]) {
        *self.published.keys.lock().expect("lock") = keys.iter().map(|k| k.public.clone()).collect();
    }

    fn fail(&self, failing: bool) {
        self.published.failing.store(failing, Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.published.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn jwks_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/.well-known/jwks.json")
}

/// A node verifying with the key set at `url`, plus `env`.
async fn jwks_node(url: &str, env: &[(&str, &str)]) -> Node {
    let mut full = vec![("SSE_JWT_JWKS_URL", url)];
    full.extend_from_slice(env);
    Node::start_raw(&full).await
}

/// Opens a stream with `token`: its status and the error code of a refusal.
async fn open(node: &Node, token: &str) -> (u16, Option<String>) {
    let bearer = format!("Bearer {token}");
    let mut client = SseClient::open(&node.url("/events?topic=news"), &[("Authorization", bearer.as_str())]).await;
    if client.status == 200 {
        client.connected().await;
        return (200, None);
    }
    let body: Value = client.body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (client.status, body["error"].as_str().map(str::to_owned))
}

/// `/readyz`'s status and reason.
async fn readyz(node: &Node) -> (u16, Option<String>) {
    let response = http().get(node.url("/readyz")).send().await.expect("readyz");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["reason"].as_str().map(str::to_owned))
}

const OK: (u16, Option<String>) = (200, None);

fn refused() -> (u16, Option<String>) {
    (401, Some("invalid_token".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_in_key_is_fetched_on_its_first_token_and_a_retired_one_refused() {
    let (ec, rsa) = (SigningKey::ec("ec-2026-01"), SigningKey::rsa("rsa-2026-02"));
    let server = JwksServer::start(&[&ec]).await;
    let node = jwks_node(&server.url(), &[("SSE_JWT_JWKS_MIN_INTERVAL", "1s")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    assert_eq!(open(&node, &ec.token()).await, OK, "ES256 with the published key");
    // Unpublished yet: refused, and the fetch it caused finds nothing new.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(open(&node, &rsa.token()).await, refused());
    assert_eq!(server.hits(), 2, "the start's fetch and one for the unknown kid");

    // The provider rotates: the new key replaces the old one.
    server.publish(&[&rsa]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(open(&node, &rsa.token()).await, OK, "RS256 with the rotated-in key, fetched on its first token");
    assert_eq!(server.hits(), 3);
    assert_eq!(open(&node, &rsa.token()).await, OK);
    assert_eq!(server.hits(), 3, "a known kid is not fetched again");
    assert_eq!(open(&node, &ec.token()).await, refused(), "the retired key is no longer accepted");

    // A key's kid does not let another algorithm or key through.
    assert_eq!(open(&node, &ec.token_as(Some(&rsa.kid), "forger")).await, refused());
    assert!(node.metric("sse_jwks_refreshes_total", "outcome=\"ok\"").await >= 3.0);
    assert_eq!(node.metric("sse_jwks_keys", "").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_kids_cause_at_most_one_fetch_per_interval() {
    let (published, stranger) = (SigningKey::ec("published"), SigningKey::ec("stranger"));
    let server = JwksServer::start(&[&published]).await;
    let node = jwks_node(&server.url(), &[("SSE_JWT_JWKS_MIN_INTERVAL", "3s")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    assert_eq!(server.hits(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 60 tokens with random kids within about a second, 20 at a time.
    for round in 0..3 {
        let requests = (0..20).map(|i| {
            let token = stranger.token_as(Some(&format!("random-{round}-{i}-{}", rand_suffix())), "flooder");
            let node = &node;
            async move { open(node, &token).await }
        });
        for answer in futures_util::future::join_all(requests).await {
            assert_eq!(answer, refused());
        }
    }
    assert_eq!(server.hits(), 2, "one fetch for the whole flood");
    // A token without kid, while the set holds one key, is checked with that key.
    assert_eq!(open(&node, &published.token_as(None, "no-kid")).await, OK);
    assert_eq!(open(&node, &published.token()).await, OK, "the published key still verifies");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos().into())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_set_is_fetched_again_on_schedule() {
    let (current, next) = (SigningKey::ec("current"), SigningKey::rsa("next"));
    let server = JwksServer::start(&[&current]).await;
    let node = jwks_node(&server.url(), &[("SSE_JWT_JWKS_REFRESH", "1s")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    server.publish(&[&current, &next]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fetched = server.hits();
    assert!(fetched >= 3, "fetched {fetched} times in 2.5 s with a 1 s refresh");
    assert_eq!(open(&node, &next.token()).await, OK);
    assert_eq!(server.hits(), fetched, "the new key was already held: its token caused no fetch");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_keys_stays_ready_and_accepting_while_the_key_server_fails() {
    let (key, unknown) = (SigningKey::rsa("steady"), SigningKey::ec("unknown"));
    let server = JwksServer::start(&[&key]).await;
    let node = jwks_node(&server.url(), &[("SSE_JWT_JWKS_MIN_INTERVAL", "1s")]).await;
    node.wait_readyz(200, Duration::from_secs(10)).await;
    server.fail(true);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // An unknown kid makes the node fetch, which fails: the keys it has stay.
        assert_eq!(open(&node, &unknown.token()).await, refused());
        assert_eq!(readyz(&node).await, OK);
        assert_eq!(open(&node, &key.token()).await, OK);
    }
    assert_eq!(server.hits(), 4, "the start's fetch and one per unknown kid");
    assert_eq!(node.metric("sse_jwks_refreshes_total", "outcome=\"failed\"").await, 3.0);
    // Down altogether (connection refused), not just failing.
    drop(server);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(open(&node, &unknown.token()).await, refused());
    assert_eq!(node.metric("sse_jwks_refreshes_total", "outcome=\"failed\"").await, 4.0);
    assert_eq!(readyz(&node).await, OK);
    assert_eq!(open(&node, &key.token()).await, OK);
    let log = node.log_text();
    assert_eq!(log.matches("cannot fetch the JWKS").count(), 1, "one warning per refresh interval (5m); log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_while_the_key_server_is_down_verifies_with_its_cache() {
    let key = SigningKey::ec("cached");
    let cache_dir = scratch_dir("jwks-cache");
    let cache = cache_dir.join("jwks.json");
    let cache_path = cache.to_str().expect("utf8 path");
    let server = JwksServer::start(&[&key]).await;
    let url = server.url();
    let first = jwks_node(&url, &[("SSE_JWT_JWKS_CACHE", cache_path)]).await;
    first.wait_readyz(200, Duration::from_secs(10)).await;
    let written = std::fs::read_to_string(&cache).expect("the fetched set is written to the cache");
    assert!(written.contains("\"cached\""), "{written}");
    drop(first);
    drop(server);

    let second = jwks_node(&url, &[("SSE_JWT_JWKS_CACHE", cache_path)]).await;
    assert_eq!(readyz(&second).await, OK, "ready from the start, with the cached keys");
    assert_eq!(open(&second, &key.token()).await, OK);
    assert!(second.log_text().contains("JWKS read from the cache"), "{}", second.log_text());
    let _ = std::fs::remove_dir_all(&cache_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_keys_is_not_ready_until_the_key_server_answers() {
    let key = SigningKey::rsa("late");
    // Held until the server starts there, so no other test takes the port meanwhile.
    let reserved = reserve_port();
    let port = reserved.port;
    let node = jwks_node(&jwks_url(port), &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readyz(&node).await, (503, Some("keys_unavailable".into())));
    assert_eq!(open(&node, &key.token()).await, (503, Some("keys_unavailable".into())));
    let server = JwksServer::start_on(port, &[&key]).await;
    // The node retries within a second or two of the server coming up.
    node.wait_readyz(200, Duration::from_secs(5)).await;
    assert_eq!(open(&node, &key.token()).await, OK);
    assert!(server.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_url_with_a_secret_or_a_bad_url_does_not_start() {
    for env in [
        vec![("SSE_JWT_JWKS_URL", "http://127.0.0.1:9/jwks"), ("SSE_JWT_SECRET", "s")],
        vec![("SSE_JWT_JWKS_URL", "http://127.0.0.1:9/jwks"), ("SSE_JWT_PUBLIC_KEY", "/nonexistent.pem")],
        vec![("SSE_JWT_JWKS_URL", "127.0.0.1:9/jwks")],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{env:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
