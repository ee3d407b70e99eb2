//! `SSE_AUTH_HOOK_URL`: real nodes ask a real HTTP backend, run by the test on a port of its
//! own, whether a stream may open. What the backend receives (user, topics, claims, client
//! address), and what a client sees for each answer: allowed, denied with the backend's status
//! and reason, narrowed to fewer topics (events on a dropped topic never arrive), a backend too
//! slow (503, or the token's grants with `SSE_AUTH_HOOK_FAIL_OPEN`), down or broken (503), and
//! answers reused from the cache without a second call. The polling fallback asks it too,
//! publishing never does, and a single-use ticket the hook refuses is not spent.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::{Node, SseClient, free_port, http, publish_api, token, token_with, unix_now};
use serde_json::{Value, json};

/// What the backend answers, and after how long.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    delay: Duration,
}

impl Answer {
    fn json(status: u16, body: Value) -> Self {
        Self { status, body: body.to_string(), delay: Duration::ZERO }
    }
}

/// The backend's state: its answer, the bodies it received and how many calls came.
struct Backend {
    answer: Mutex<Answer>,
    received: Mutex<Vec<Value>>,
    calls: AtomicU64,
}

async fn authorize(State(backend): State<Arc<Backend>>, Json(body): Json<Value>) -> Response {
    backend.calls.fetch_add(1, Ordering::SeqCst);
    backend.received.lock().expect("lock").push(body);
    let answer = backend.answer.lock().expect("lock").clone();
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.status).expect("a status");
    (status, [("content-type", "application/json")], answer.body).into_response()
}

/// The authorization backend, in the test process; stops when dropped.
struct HookServer {
    port: u16,
    backend: Arc<Backend>,
    task: tokio::task::JoinHandle<()>,
}

impl HookServer {
    async fn start(answer: Answer) -> Self {
        let backend = Arc::new(Backend {
            answer: Mutex::new(answer),
            received: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        });
        let router =
            axum::Router::new().route("/authorize", axum::routing::post(authorize)).with_state(backend.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the backend");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { port, backend, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/authorize", self.port)
    }

    fn answer(&self, answer: Answer) {
        *self.backend.answer.lock().expect("lock") = answer;
    }

    fn calls(&self) -> u64 {
        self.backend.calls.load(Ordering::SeqCst)
    }

    fn last_received(&self) -> Value {
        self.backend.received.lock().expect("lock").last().cloned().expect("the backend was called")
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node asking `url`, without the cache unless `env` sets it, plus `env`.
async fn node_with_hook(url: &str, env: &[(&str, &str)]) -> Node {
    let mut full = vec![("SSE_AUTH_HOOK_URL", url), ("SSE_AUTH_HOOK_CACHE", "0")];
    full.extend_from_slice(env);
    Node::start(&full).await
}

fn events_url(node: &Node, token: &str, topics: &[&str]) -> String {
    let mut url = node.url(&format!("/events?access_token={token}"));
    for topic in topics {
        url.push_str(&format!("&topic={topic}"));
    }
    url
}

/// Opens a stream and returns it with its status and (refused) JSON body.
async fn open(node: &Node, token: &str, topics: &[&str]) -> SseClient {
    SseClient::open(&events_url(node, token, topics), &[]).await
}

fn body_of(client: &SseClient) -> Value {
    serde_json::from_str(client.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null)
}

async fn publish(node: &Node, target: Value, text: &str) {
    let mut body = target;
    body["event"] = json!("m");
    body["data"] = json!(text);
    let (status, answer) = publish_api(node, body).await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test]
async fn the_backend_receives_user_topics_claims_and_the_client_address() {
    let hook = HookServer::start(Answer { status: 200, body: String::new(), delay: Duration::ZERO }).await;
    let node = node_with_hook(&hook.url(), &[("SSE_TRUSTED_PROXIES", "127.0.0.1")]).await;
    let exp = unix_now() + 600;
    let alice =
        token_with(json!({"sub": "alice", "exp": exp, "topics": ["news:*", "sports"], "plan": {"tier": "gold"}}));

    let url = events_url(&node, &alice, &["news:1", "sports", "news:1"]);
    let mut stream = SseClient::open(&url, &[("x-forwarded-for", "198.51.100.1, 203.0.113.9")]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    assert_eq!(stream.connected().await["topics"], json!(["news:1", "sports"]));
    assert_eq!(
        hook.last_received(),
        json!({
            "user": "alice",
            "topics": ["news:1", "sports"],
            "claims": {"sub": "alice", "exp": exp, "topics": ["news:*", "sports"], "plan": {"tier": "gold"}},
            // The proxy (a trusted peer) names the client; what the client wrote itself is not read.
            "ip": "203.0.113.9",
        })
    );
    publish(&node, json!({"topics": ["sports"]}), "goal").await;
    assert_eq!(stream.next_event(Duration::from_secs(5)).await.expect("the event").data, "goal");

    // Without a proxy header the TCP peer is the client.
    let mut direct = open(&node, &alice, &["sports"]).await;
    assert_eq!(direct.status, 200, "{:?}", direct.body);
    direct.connected().await;
    assert_eq!(hook.last_received()["ip"], "127.0.0.1");
    assert_eq!(hook.calls(), 2);
    node.wait_metric("sse_auth_hook_total", r#"outcome="allowed""#, 2.0).await;
    assert!(node.metric("sse_auth_hook_duration_seconds_count", "").await >= 2.0);
}

#[tokio::test]
async fn a_denial_reaches_the_client_with_the_backends_status_and_reason() {
    let hook =
        HookServer::start(Answer::json(200, json!({"allow": false, "status": 402, "reason": "subscription expired"})))
            .await;
    let node = node_with_hook(&hook.url(), &[]).await;
    let bob = token("bob", &["*"], None);

    let refused = open(&node, &bob, &["premium"]).await;
    assert_eq!(refused.status, 402);
    assert_eq!(body_of(&refused), json!({"error": "auth_hook_denied", "message": "subscription expired"}));

    // A 4xx status is a denial whatever the body says; its reason is read when it is JSON.
    hook.answer(Answer::json(451, json!({"allow": true, "reason": "not available in your country"})));
    let refused = open(&node, &bob, &["premium"]).await;
    assert_eq!((refused.status, body_of(&refused)["message"].as_str()), (451, Some("not available in your country")));
    hook.answer(Answer { status: 403, body: "<html>Forbidden</html>".into(), delay: Duration::ZERO });
    let refused = open(&node, &bob, &[]).await;
    assert_eq!((refused.status, body_of(&refused)["error"].as_str()), (403, Some("auth_hook_denied")));

    // A user refused never got a stream: nothing was joined, nothing is delivered.
    node.wait_metric("sse_auth_hook_total", r#"outcome="denied""#, 3.0).await;
    node.wait_metric("sse_connections_rejected_total", r#"reason="auth_hook_denied""#, 3.0).await;
    assert_eq!(node.metric("sse_total_connections", "").await, 0.0);
}

#[tokio::test]
async fn a_narrowed_stream_never_receives_a_dropped_topic() {
    // `elsewhere` was not asked for: the answer is cut down to what was, never widened.
    let hook = HookServer::start(Answer::json(200, json!({"allow": true, "topics": ["kept", "elsewhere"]}))).await;
    let node = node_with_hook(&hook.url(), &[]).await;
    let carol = token("carol", &["*"], None);

    let mut stream = open(&node, &carol, &["kept", "dropped"]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    assert_eq!(stream.connected().await["topics"], json!(["kept"]));
    publish(&node, json!({"topics": ["dropped"]}), "not for carol").await;
    publish(&node, json!({"topics": ["elsewhere"]}), "not for carol either").await;
    publish(&node, json!({"topics": ["kept"]}), "for carol").await;
    // In order on one node: had a dropped topic been joined, its event would come first.
    assert_eq!(stream.next_event(Duration::from_secs(5)).await.expect("the kept topic").data, "for carol");
    // The user's own channel and broadcast stay: the hook governs topics.
    publish(&node, json!({"users": ["carol"]}), "direct").await;
    assert_eq!(stream.next_event(Duration::from_secs(5)).await.expect("the user channel").data, "direct");
    publish(&node, json!({"broadcast": true}), "everyone").await;
    assert_eq!(stream.next_event(Duration::from_secs(5)).await.expect("broadcast").data, "everyone");
    publish(&node, json!({"topics": ["dropped"]}), "still not").await;
    stream.assert_silent(Duration::from_millis(500)).await;

    node.wait_metric("sse_auth_hook_total", r#"outcome="narrowed""#, 1.0).await;
    assert!(node.log_text().contains("did not ask for"), "the widening answer is logged:\n{}", node.log_text());

    // Narrowed to nothing: the stream opens with its user and broadcast channels only.
    hook.answer(Answer::json(200, json!({"allow": true, "topics": []})));
    let mut bare = open(&node, &carol, &["kept"]).await;
    assert_eq!(bare.status, 200, "{:?}", bare.body);
    assert_eq!(bare.connected().await["topics"], json!([]));
}

#[tokio::test]
async fn a_backend_slower_than_the_timeout_is_a_503_unless_failing_open() {
    let slow = Answer { status: 200, body: String::new(), delay: Duration::from_secs(3) };
    let hook = HookServer::start(slow).await;
    let timeout = [("SSE_AUTH_HOOK_TIMEOUT", "300ms")];
    let closed = node_with_hook(&hook.url(), &timeout).await;
    let dave = token("dave", &["*"], None);

    let started = Instant::now();
    let refused = open(&closed, &dave, &["t"]).await;
    assert_eq!((refused.status, body_of(&refused)["error"].as_str()), (503, Some("auth_hook_unavailable")));
    assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}, not at the timeout", started.elapsed());
    closed.wait_metric("sse_auth_hook_total", r#"outcome="timeout""#, 1.0).await;
    closed.wait_metric("sse_connections_rejected_total", r#"reason="auth_hook_unavailable""#, 1.0).await;

    let open_node = node_with_hook(&hook.url(), &[timeout[0], ("SSE_AUTH_HOOK_FAIL_OPEN", "true")]).await;
    let started = Instant::now();
    let mut allowed = open(&open_node, &dave, &["t"]).await;
    assert_eq!(allowed.status, 200, "{:?}", allowed.body);
    assert_eq!(allowed.connected().await["topics"], json!(["t"]), "the token's grants");
    assert!(started.elapsed() < Duration::from_secs(2));
    publish(&open_node, json!({"topics": ["t"]}), "through").await;
    assert_eq!(allowed.next_event(Duration::from_secs(5)).await.expect("the event").data, "through");
    assert!(open_node.log_text().contains("opened with its token's grants"), "{}", open_node.log_text());
}

#[tokio::test]
async fn a_backend_that_is_down_or_broken_is_a_503() {
    // Nothing listens there: connection refused.
    let down = node_with_hook(&format!("http://127.0.0.1:{}/authorize", free_port()), &[]).await;
    let erin = token("erin", &["*"], None);
    let refused = open(&down, &erin, &[]).await;
    assert_eq!((refused.status, body_of(&refused)["error"].as_str()), (503, Some("auth_hook_unavailable")));
    down.wait_metric("sse_auth_hook_total", r#"outcome="unreachable""#, 1.0).await;

    let hook = HookServer::start(Answer::json(500, json!({"allow": true}))).await;
    let node = node_with_hook(&hook.url(), &[]).await;
    let refused = open(&node, &erin, &[]).await;
    assert_eq!((refused.status, body_of(&refused)["error"].as_str()), (503, Some("auth_hook_unavailable")));
    node.wait_metric("sse_auth_hook_total", r#"outcome="bad_status""#, 1.0).await;
    // A 2xx that does not say `allow` is not an answer: fail closed, never open.
    hook.answer(Answer::json(200, json!({"allowed": true})));
    let refused = open(&node, &erin, &[]).await;
    assert_eq!((refused.status, body_of(&refused)["error"].as_str()), (503, Some("auth_hook_unavailable")));
    node.wait_metric("sse_auth_hook_total", r#"outcome="malformed""#, 1.0).await;
}

#[tokio::test]
async fn answers_are_reused_within_the_cache_window_for_the_same_inputs() {
    let hook = HookServer::start(Answer::json(200, json!({"allow": true}))).await;
    let node = node_with_hook(&hook.url(), &[("SSE_AUTH_HOOK_CACHE", "30s")]).await;
    let frank = token("frank", &["*"], None);

    let opened = |token: String, topics: &'static [&'static str]| {
        let node = &node;
        async move {
            let mut stream = open(node, &token, topics).await;
            assert_eq!(stream.status, 200, "{:?}", stream.body);
            stream.connected().await;
        }
    };
    opened(frank.clone(), &["a", "b"]).await;
    assert_eq!(hook.calls(), 1);
    // The same stream again (an EventSource reconnecting), topics in another order, a token minted
    // later with the same claims: the answer is reused.
    opened(frank.clone(), &["a", "b"]).await;
    opened(frank.clone(), &["b", "a"]).await;
    let later =
        token_with(json!({"sub": "frank", "exp": unix_now() + 7200, "iat": unix_now(), "topics": ["*"], "role": null}));
    opened(later, &["a", "b"]).await;
    assert_eq!(hook.calls(), 1, "no second call within the window");
    node.wait_metric("sse_auth_hook_cache_hits_total", "", 3.0).await;

    // Other topics, another user, other claims: asked again.
    opened(frank.clone(), &["a"]).await;
    assert_eq!(hook.calls(), 2);
    opened(token("grace", &["*"], None), &["a", "b"]).await;
    assert_eq!(hook.calls(), 3);
    opened(token("frank", &["*"], Some("publisher")), &["a", "b"]).await;
    assert_eq!(hook.calls(), 4);

    // Denials are answers too, and cached like them.
    hook.answer(Answer::json(200, json!({"allow": false, "reason": "banned"})));
    let henry = token("henry", &["*"], None);
    assert_eq!(open(&node, &henry, &["a"]).await.status, 403);
    assert_eq!(open(&node, &henry, &["a"]).await.status, 403);
    assert_eq!(hook.calls(), 5);
}

#[tokio::test]
async fn answers_expire_after_the_cache_window() {
    let hook = HookServer::start(Answer::json(200, json!({"allow": true}))).await;
    let node = node_with_hook(&hook.url(), &[("SSE_AUTH_HOOK_CACHE", "1s")]).await;
    let ivy = token("ivy", &["*"], None);
    for expected in [1, 1] {
        let mut stream = open(&node, &ivy, &["a"]).await;
        assert_eq!(stream.status, 200, "{:?}", stream.body);
        stream.connected().await;
        assert_eq!(hook.calls(), expected);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut stream = open(&node, &ivy, &["a"]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    stream.connected().await;
    assert_eq!(hook.calls(), 2, "asked again once the answer expired");
}

#[tokio::test]
async fn the_polling_fallback_asks_the_hook_too() {
    let hook = HookServer::start(Answer::json(200, json!({"allow": false, "status": 402, "reason": "pay"}))).await;
    let node = node_with_hook(&hook.url(), &[]).await;
    let jack = token("jack", &["*"], None);
    let poll = || http().get(node.url(&format!("/api/history?topic=premium&access_token={jack}"))).send();
    let response = poll().await.expect("history");
    assert_eq!(response.status().as_u16(), 402);
    assert_eq!(response.json::<Value>().await.expect("json")["message"], "pay");
    assert_eq!(hook.last_received()["topics"], json!(["premium"]));

    hook.answer(Answer::json(200, json!({"allow": true})));
    assert_eq!(poll().await.expect("history").status().as_u16(), 200);
}

#[tokio::test]
async fn publishing_does_not_ask_the_hook() {
    let hook = HookServer::start(Answer::json(200, json!({"allow": false}))).await;
    let node = node_with_hook(&hook.url(), &[]).await;
    publish(&node, json!({"topics": ["anything"]}), "from a producer").await;
    assert_eq!(hook.calls(), 0);
}

#[tokio::test]
async fn a_single_use_ticket_refused_by_the_hook_is_not_spent() {
    let hook = HookServer::start(Answer::json(200, json!({"allow": false, "reason": "not yet"}))).await;
    let node = node_with_hook(&hook.url(), &[("SSE_SINGLE_USE_QUERY_TOKENS", "true")]).await;
    let ticket = token_with(json!({"sub": "kim", "exp": unix_now() + 600, "jti": "ticket-1", "topics": ["*"]}));
    assert_eq!(open(&node, &ticket, &["a"]).await.status, 403);

    hook.answer(Answer::json(200, json!({"allow": true})));
    let mut stream = open(&node, &ticket, &["a"]).await;
    assert_eq!(stream.status, 200, "the refused open did not spend the ticket: {:?}", stream.body);
    stream.connected().await;
    let replay = open(&node, &ticket, &["a"]).await;
    assert_eq!((replay.status, body_of(&replay)["error"].as_str()), (401, Some("token_replayed")));
}
