//! Traces end to end: a small OTLP/HTTP receiver started by the test (`POST /v1/traces`,
//! protobuf bodies decoded with `opentelemetry-proto`), a real node on real Redis exporting to
//! it, and what arrives: span names, attributes, parent/child relations, a continued
//! `traceparent`, and the flush at shutdown. Without an endpoint nothing is sent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// One exported span, flattened: the resource's service name beside the span.
#[derive(Debug, Clone)]
struct Exported {
    service: Option<String>,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Exported {
    fn name(&self) -> &str {
        &self.span.name
    }

    fn attr(&self, key: &str) -> Option<String> {
        let value = self.span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
        Some(match value {
            Any::StringValue(s) => s.clone(),
            Any::IntValue(i) => i.to_string(),
            Any::BoolValue(b) => b.to_string(),
            Any::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }

    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// Every attribute value as text (for "no secret anywhere").
    fn all_values(&self) -> Vec<String> {
        self.span.attributes.iter().filter_map(|kv| self.attr(&kv.key)).collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The receiver: every request it got (path, content type) and every span decoded from them.
#[derive(Default)]
struct Received {
    requests: Vec<(String, String)>,
    spans: Vec<Exported>,
}

struct Collector {
    port: u16,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// An OTLP/HTTP receiver on `port` (0: a free one). Answers any POST; decodes `/v1/traces`.
    async fn start_on(port: u16) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new().fallback(receive).with_state(received.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, received, task })
    }

    async fn start() -> Self {
        Self::start_on(0).await.expect("bind the receiver")
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Exported> {
        self.received.lock().expect("lock").spans.clone()
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.received.lock().expect("lock").requests.clone()
    }

    /// Waits until `done` holds for the spans received; panics with them after [`WAIT`].
    async fn wait_for(&self, what: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let deadline = Instant::now() + WAIT;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "{what}: not received; spans: {:#?}", summary(&spans));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(received): State<Arc<Mutex<Received>>>, request: axum::extract::Request) -> (StatusCode, Bytes) {
    let path = request.uri().path().to_owned();
    let content_type =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 64 << 20).await.unwrap_or_default();
    let mut received = received.lock().expect("lock");
    received.requests.push((path.clone(), content_type));
    if path != "/v1/traces" {
        return (StatusCode::NOT_FOUND, Bytes::new());
    }
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Bytes::new());
    };
    for resource_spans in export.resource_spans {
        let service = resource_spans.resource.as_ref().and_then(|r| {
            r.attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| {
                match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                }
            })
        });
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.spans.push(Exported { service: service.clone(), span });
            }
        }
    }
    (StatusCode::OK, Bytes::from(ExportTraceServiceResponse::default().encode_to_vec()))
}

/// Name, ids and attributes of a span, for failure messages.
fn one(s: &Exported) -> String {
    let attrs: Vec<String> = s.span.attributes.iter().map(|kv| format!("{}={:?}", kv.key, s.attr(&kv.key))).collect();
    format!("{} trace={} id={} parent={} [{}]", s.name(), s.trace_id(), s.span_id(), s.parent_id(), attrs.join(" "))
}

fn summary(spans: &[Exported]) -> Vec<String> {
    spans.iter().map(one).collect()
}

fn named<'a>(spans: &'a [Exported], name: &str) -> Vec<&'a Exported> {
    spans.iter().filter(|s| s.name() == name).collect()
}

fn children<'a>(spans: &'a [Exported], parent: &Exported) -> Vec<&'a Exported> {
    spans.iter().filter(|s| s.parent_id() == parent.span_id() && s.trace_id() == parent.trace_id()).collect()
}

/// The `connect` span whose `connection.id` is `id`.
fn connect_of<'a>(spans: &'a [Exported], id: &str) -> &'a Exported {
    named(spans, "connect")
        .into_iter()
        .find(|s| s.attr("connection.id").as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no connect span for {id}: {:#?}", summary(spans)))
}

/// Checks the children of a successful `connect`: `auth`, `subscribe` and `resume`, each once.
fn assert_connect_children(spans: &[Exported], connect: &Exported) {
    let mut names: Vec<&str> = children(spans, connect).iter().map(|s| s.name()).collect();
    names.sort();
    assert_eq!(names, ["auth", "resume", "subscribe"], "children of {:?}", one(connect));
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const PUBLISHER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PUBLISHER_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread")]
async fn connect_publish_and_drain_are_exported_with_their_attributes_and_parents() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let endpoint = collector.endpoint();
    let mut node = Node::start(&[
        ("SSE_REDIS_URL", &redis.url()),
        ("SSE_NODE_ID", "trace-node"),
        ("SSE_DRAIN_PERIOD", "300ms"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_SERVICE_NAME", "sse-under-test"),
        // Spans of the running node go out every 200 ms; what is left at the end only by the
        // flush at shutdown (the node exits well within this delay of its last export).
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ])
    .await;

    // A new stream whose request carries the caller's trace.
    let url = stream_url(&node, "u1", &["t1"]);
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let mut first = SseClient::open(&url, &[("traceparent", &traceparent)]).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let connected = first.connected().await;
    let first_id = connected["connection_id"].as_str().expect("connection_id").to_owned();

    // A publish with its own trace, delivered to the stream: its id is the resume point.
    let response = http()
        .post(node.url("/api/publish"))
        .bearer_auth(token("producer", &[], Some("publisher")))
        .header("traceparent", format!("00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"))
        .json(&json!({"users": ["u1"], "event": "m", "data": "one"}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 202);
    let event = first.next_event(WAIT).await.expect("the published event");
    let last_id = event.id.expect("a cursor");
    drop(first);

    // Missed while away, then an exact resume; then a resume from a cursor no node wrote.
    let (status, _) = publish_api(&node, json!({"users": ["u1"], "event": "m", "data": "two"})).await;
    assert_eq!(status, 202);
    let mut resumed = SseClient::open(&url, &[("last-event-id", &last_id)]).await;
    let resumed_id = resumed.connected().await["connection_id"].as_str().expect("id").to_owned();
    assert_eq!(resumed.next_event(WAIT).await.expect("replayed").data, "two");
    let mut reset = SseClient::open(&url, &[("last-event-id", "not-a-cursor")]).await;
    let reset_id = reset.connected().await["connection_id"].as_str().expect("id").to_owned();

    // A refused stream: a token that does not verify.
    let forged = format!("{}x", token("u2", &["*"], None));
    let refused = SseClient::open(&node.url(&format!("/events?access_token={forged}")), &[]).await;
    assert_eq!(refused.status, 401);

    // Spans of the running node arrive while it runs (the batch exporter).
    let spans = collector
        .wait_for("the connect spans", |s| {
            named(s, "connect").len() >= 4 && named(s, "publish").len() >= 2 && named(s, "resume").len() >= 3
        })
        .await;
    assert!(spans.iter().all(|s| s.service.as_deref() == Some("sse-under-test")), "OTEL_SERVICE_NAME");

    // The first stream continues the caller's trace; its children are auth, subscribe, resume.
    let connect = connect_of(&spans, &first_id);
    assert_eq!((connect.trace_id().as_str(), connect.parent_id().as_str()), (CALLER_TRACE, CALLER_SPAN));
    assert_eq!(connect.span.kind, SpanKind::Server as i32);
    for (key, value) in [
        ("node.id", "trace-node"),
        ("enduser.id", "u1"),
        ("topics.count", "1"),
        ("resume.outcome", "new"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(connect.attr(key).as_deref(), Some(value), "{key} of {:?}", one(connect));
    }
    assert_eq!(connect.attr("refusal.reason"), None);
    assert_connect_children(&spans, connect);
    let subscribe = children(&spans, connect).into_iter().find(|s| s.name() == "subscribe").expect("subscribe");
    // The user's channel, broadcast and the topic.
    assert_eq!(subscribe.attr("channels.count").as_deref(), Some("3"));
    let auth = children(&spans, connect).into_iter().find(|s| s.name() == "auth").expect("auth");
    assert_eq!(auth.attr("auth.hook").as_deref(), Some("false"));

    // The exact resume: a new trace (no traceparent), outcome on connect and on its resume span.
    let connect = connect_of(&spans, &resumed_id);
    assert_ne!(connect.trace_id(), CALLER_TRACE);
    assert_eq!(connect.parent_id(), "", "a root span");
    assert_eq!(connect.attr("resume.outcome").as_deref(), Some("exact"));
    assert_connect_children(&spans, connect);
    let resume = children(&spans, connect).into_iter().find(|s| s.name() == "resume").expect("resume");
    assert_eq!(resume.attr("resume.outcome").as_deref(), Some("exact"));
    assert_eq!(resume.attr("resume.replayed").as_deref(), Some("1"));
    assert_eq!(resume.attr("resume.reset_reason"), None);

    // The reset resume names its reason.
    let connect = connect_of(&spans, &reset_id);
    assert_eq!(connect.attr("resume.outcome").as_deref(), Some("reset"));
    assert_eq!(connect.attr("resume.reset_reason").as_deref(), Some("invalid_cursor"));

    // The refusal: status and reason, no user, no children past auth, and never the token.
    let refusals: Vec<&Exported> = named(&spans, "connect")
        .into_iter()
        .filter(|s| s.attr("http.response.status_code").as_deref() == Some("401"))
        .collect();
    assert_eq!(refusals.len(), 1, "{:#?}", summary(&spans));
    assert_eq!(refusals[0].attr("refusal.reason").as_deref(), Some("invalid_token"));
    assert_eq!(refusals[0].attr("enduser.id"), None);
    let names: Vec<&str> = children(&spans, refusals[0]).iter().map(|s| s.name()).collect();
    assert_eq!(names, ["auth"]);
    let secrets = [forged.as_str(), SECRET];
    for span in &spans {
        for value in span.all_values() {
            assert!(
                !secrets.iter().any(|secret| value.contains(secret)) && !value.contains("eyJ"),
                "a secret in {value:?}"
            );
        }
    }

    // The publish continues the publisher's trace.
    let publish = named(&spans, "publish")
        .into_iter()
        .find(|s| s.trace_id() == PUBLISHER_TRACE)
        .unwrap_or_else(|| panic!("no publish in the publisher's trace: {:#?}", summary(&spans)));
    assert_eq!(publish.parent_id(), PUBLISHER_SPAN);
    assert_eq!(publish.span.kind, SpanKind::Server as i32);
    for (key, value) in [
        ("node.id", "trace-node"),
        ("enduser.id", "producer"),
        ("publish.users", "1"),
        ("publish.topics", "0"),
        ("publish.broadcast", "false"),
        ("publish.durable", "true"),
        ("channels.count", "1"),
        ("http.response.status_code", "202"),
    ] {
        assert_eq!(publish.attr(key).as_deref(), Some(value), "{key} of {:?}", one(publish));
    }
    assert_eq!(named(&spans, "drain").len(), 0, "no drain before SIGTERM");

    // SIGTERM with two streams open (the first one is gone): the drain span reaches the
    // receiver before the exit.
    drop(resumed);
    node.wait_metric("sse_active_connections", "", 1.0).await;
    let mut third = SseClient::open(&url, &[]).await;
    third.connected().await;
    let exported_before = collector.requests().len();
    node.signal("TERM");
    assert_eq!(node.wait_exit(WAIT).await, Some(0), "log:\n{}", node.log_text());
    let spans = collector.spans();
    let drains = named(&spans, "drain");
    assert_eq!(drains.len(), 1, "the drain span, flushed at shutdown: {:#?}", summary(&spans));
    assert!(collector.requests().len() > exported_before);
    for (key, value) in
        [("node.id", "trace-node"), ("drain.streams", "2"), ("drain.period_ms", "300"), ("drain.outcome", "completed")]
    {
        assert_eq!(drains[0].attr(key).as_deref(), Some(value), "{key} of {:?}", one(drains[0]));
    }
    assert!(collector.requests().iter().all(|(path, kind)| path == "/v1/traces" && kind == "application/x-protobuf"));
    // The log is as without tracing: no span prefixes on its lines.
    let log = node.log_text();
    assert!(log.contains("exporting traces"), "{log}");
    assert!(!log.contains("connect{") && !log.contains("drain{"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_shutdown_flush_spans_arrive_even_when_the_batch_would_wait() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let mut node = Node::start(&[
        ("SSE_DRAIN_PERIOD", "100ms"),
        ("SSE_HISTORY", "false"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &format!("{endpoint}/v1/traces")),
        // Longer than the test: only the flush at shutdown sends anything.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ])
    .await;
    let mut stream = subscribe(&node, "u1", &[]).await;
    stream.assert_silent(Duration::from_millis(500)).await;
    assert!(collector.requests().is_empty(), "the batch waits for its delay");
    node.signal("TERM");
    assert_eq!(node.wait_exit(WAIT).await, Some(0));
    let spans = collector.spans();
    assert_eq!(named(&spans, "connect").len(), 1, "{:#?}", summary(&spans));
    assert_eq!(named(&spans, "drain").len(), 1, "{:#?}", summary(&spans));
    // Default service name; no history here, so no resume span.
    assert_eq!(spans[0].service.as_deref(), Some("sse-fanout"));
    let connect = named(&spans, "connect")[0];
    let mut names: Vec<&str> = children(&spans, connect).iter().map(|s| s.name()).collect();
    names.sort();
    assert_eq!(names, ["auth", "subscribe"]);
    assert_eq!(connect.attr("resume.outcome"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_endpoint_nothing_is_sent_and_the_node_runs_as_before() {
    // The OTLP default endpoint: a node that built an exporter without being asked would post
    // here. Another process may hold the port; the test then checks what it can elsewhere.
    let default_port = Collector::start_on(4318).await.ok();
    let disabled = Collector::start().await;
    let redis = RedisServer::start().await;
    let off = Node::start(&[
        ("SSE_REDIS_URL", &redis.url()),
        ("OTEL_SERVICE_NAME", "unused"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_TRACES_SAMPLER", "not-checked-while-off"),
    ])
    .await;
    let endpoint = disabled.endpoint();
    let sdk_off = Node::start(&[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_SDK_DISABLED", "true")]).await;
    for node in [off, sdk_off] {
        let mut node = node;
        let mut stream = subscribe(&node, "u1", &["t1"]).await;
        let (status, _) = publish_api(&node, json!({"users": ["u1"], "data": 1})).await;
        assert_eq!(status, 202);
        assert_eq!(stream.next_event(WAIT).await.expect("delivered").data, "1");
        node.signal("TERM");
        assert_eq!(node.wait_exit(WAIT).await, Some(0));
        assert!(!node.log_text().contains("exporting traces"), "{}", node.log_text());
    }
    // The batch processor would have sent within its 5 s delay or at the exit, which is past.
    assert!(disabled.requests().is_empty(), "OTEL_SDK_DISABLED=true sent {:?}", disabled.requests());
    if let Some(default_port) = default_port {
        assert!(default_port.requests().is_empty(), "sent to localhost:4318: {:?}", default_port.requests());
    } else {
        eprintln!("port 4318 is taken: not checked that nothing goes to the default endpoint");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_with_a_protocol_other_than_http_protobuf_is_a_configuration_error() {
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
        .env_clear()
        .env("SSE_LISTEN", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let status = node.wait().expect("exit");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && stderr.contains("http/protobuf"), "{stderr}");
}
