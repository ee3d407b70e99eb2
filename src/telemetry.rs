//! Traces: the node's `tracing` spans, and their export over OpenTelemetry OTLP/HTTP.
//!
//! Spans exist for what an operator follows across services, never for a delivery:
//! - `connect` (one `GET /events` until its `connected` preamble is ready, or its refusal), with
//!   the children `auth` (token, hook, single-use ticket), `subscribe` (joining the hub and
//!   waiting for the bus to confirm every channel) and, with history on, `resume` (positioning
//!   and the first page of the replay);
//! - `publish` (one `POST /api/publish`);
//! - `drain` (the paced closing of every stream after SIGTERM).
//!
//! A span ends when the request is answered: an open stream is not a span (it lives for hours,
//! and a span is exported only once it ends). Attributes name the node, the connection, the user
//! (never the token), counts and outcomes; [`record_answer`] writes the status and the refusal.
//!
//! Off and free unless an OTLP endpoint is configured (see [`crate::config::Config::traces`]):
//! every span here has the target [`TARGET`], which only the exporting layer [`start`] builds
//! enables. Without it each `*_span` call finds its callsite disabled (a cached check) and
//! returns a disabled span: nothing is allocated, no field value is even computed, and the logs
//! look exactly as they do without tracing (the log layer filters this target out either way).
//!
//! An incoming W3C `traceparent` (with `tracestate`) is continued by [`continue_trace`]: the
//! request's span becomes a child of the caller's. Spans are batched on the SDK's own thread and
//! posted with a blocking HTTP client there, never on the runtime; [`Tracing::shutdown`] flushes
//! what is left when the node stops, after the drain.

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::Registry;

use crate::config::{TraceSampler, TraceSettings};
use crate::resume::Outcome;

/// The target of every span of this module. The log layer filters it out and the exporting
/// layer takes only it, so these spans cost nothing while tracing is off.
pub const TARGET: &str = "sse_fanout::trace";

/// The layer that turns the node's spans into OpenTelemetry spans, for [`crate::logging::init`].
pub type TraceLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The running exporter; flush it with [`Tracing::shutdown`] when the node stops.
pub struct Tracing {
    provider: SdkTracerProvider,
}

/// Builds the exporter for `settings` and the layer feeding it. Call outside the async runtime:
/// the blocking HTTP client is built (and later dropped) on threads of its own.
pub fn start(settings: &TraceSettings) -> anyhow::Result<(Tracing, TraceLayer)> {
    use tracing_subscriber::filter::filter_fn;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.url.as_str())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the OTLP exporter for {}: {e}", settings.url))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // The batch processor keeps its queue and its exports on its own thread: a slow or absent
    // collector costs dropped spans (its queue is bounded), never a stalled request.
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler(settings.sampler))
        .with_batch_exporter(exporter)
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sse-fanout"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_level(false)
        .with_tracked_inactivity(false)
        // Only this module's spans, and the warnings and errors logged inside them (as span
        // events). Never the SDK's own logs: one (a full queue) is logged while a span ends,
        // inside this very layer.
        .with_filter(
            filter_fn(|meta| {
                meta.target() == TARGET
                    || (meta.is_event()
                        && *meta.level() <= tracing::Level::WARN
                        && !meta.target().starts_with("opentelemetry"))
            })
            // Every span here is `info`: debug and trace callsites stay off by level alone.
            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
        )
        .boxed();
    Ok((Tracing { provider }, layer))
}

impl Tracing {
    /// Exports every span still queued and stops the exporter (at most the SDK's 5 s when the
    /// collector does not answer). Call after the last span ended: the drain's.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

fn sampler(sampler: TraceSampler) -> Sampler {
    match sampler {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::Ratio(ratio) => Sampler::TraceIdRatioBased(ratio),
        TraceSampler::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentBasedRatio(ratio) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
    }
}

/// `connect`: one stream request. `connection.id`, `enduser.id`, `topics.count` and the resume
/// outcome are recorded as they become known; the answer by [`record_answer`].
pub fn connect_span(node_id: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "connect",
        otel.kind = "server",
        node.id = node_id,
        connection.id = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
        topics.count = tracing::field::Empty,
        resume.outcome = tracing::field::Empty,
        resume.reset_reason = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        refusal.reason = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// `auth` (inside `connect`): token, connect hook, single-use ticket. `auth.hook` says whether a
/// connect authorization hook is configured (it is asked once the token verified).
pub fn auth_span(hook: bool) -> Span {
    tracing::info_span!(target: TARGET, "auth", auth.hook = hook)
}

/// `subscribe` (inside `connect`): joining the hub until the bus confirmed every channel.
pub fn subscribe_span(channels: usize) -> Span {
    tracing::info_span!(target: TARGET, "subscribe", channels.count = channels)
}

/// `resume` (inside `connect`): from positioning each channel (from `Last-Event-ID`, before
/// subscribing) to queuing the replay's first page (after): `subscribe` runs within its time.
pub fn resume_span() -> Span {
    tracing::info_span!(
        target: TARGET,
        "resume",
        resume.outcome = tracing::field::Empty,
        resume.reset_reason = tracing::field::Empty,
        resume.replayed = tracing::field::Empty,
    )
}

/// Records how the stream's history continued (`new`, `exact`, or `reset` with its reason) on
/// the `resume` span and its `connect`, and the entries the first page replayed.
pub fn record_resume(resume: &Span, connect: &Span, outcome: Outcome, first_page: u32) {
    for span in [resume, connect] {
        span.record("resume.outcome", outcome.label());
        if let Outcome::Reset(reason) = outcome {
            span.record("resume.reset_reason", reason.label());
        }
    }
    resume.record("resume.replayed", first_page);
}

/// `publish`: one publish request. What it names is recorded once the body is parsed.
pub fn publish_span(node_id: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "publish",
        otel.kind = "server",
        node.id = node_id,
        enduser.id = tracing::field::Empty,
        publish.users = tracing::field::Empty,
        publish.topics = tracing::field::Empty,
        publish.broadcast = tracing::field::Empty,
        publish.durable = tracing::field::Empty,
        channels.count = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        refusal.reason = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// `drain`: closing every stream over the drain period. `drain.outcome` is `completed`, or
/// `hurried` when a second signal cut it short.
pub fn drain_span(node_id: &str, period_ms: u64) -> Span {
    tracing::info_span!(
        target: TARGET,
        "drain",
        node.id = node_id,
        drain.period_ms = period_ms,
        drain.streams = tracing::field::Empty,
        drain.outcome = tracing::field::Empty,
    )
}

/// Records a request's answer: its status and, for a refusal, the error code clients see. Only
/// a 5xx marks the span failed (a refused token is the server working as meant).
pub fn record_answer(span: &Span, status: u16, refusal: Option<&'static str>) {
    span.record("http.response.status_code", status);
    if let Some(code) = refusal {
        span.record("refusal.reason", code);
    }
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// Makes `span` continue the trace of the request's W3C `traceparent` (and `tracestate`), when
/// it carries a valid one. Free when tracing is off (the span is disabled).
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract_with_context(&opentelemetry::Context::new(), &Headers(headers));
    if parent.span().span_context().is_valid() {
        // Fails only for a span no layer records, which `is_disabled` already ruled out.
        let _ = span.set_parent(parent);
    }
}

/// Request headers as the propagator reads them (the first value of a repeated header).
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn without_the_exporting_layer_no_span_is_built() {
        // The node's logging without tracing: these spans must be disabled, not just unexported.
        let subscriber = Registry::default()
            .with(crate::logging::layers(crate::config::LogFormat::Text, "trace", None).expect("layers"));
        tracing::subscriber::with_default(subscriber, || {
            assert!(connect_span("n").is_disabled());
            assert!(publish_span("n").is_disabled());
            assert!(drain_span("n", 1).is_disabled());
            assert!(auth_span(true).is_disabled() && subscribe_span(1).is_disabled() && resume_span().is_disabled());
            // A log span of another target still works: the filter is on this module's target.
            assert!(!tracing::info_span!("other").is_disabled());
        });
    }

    #[test]
    fn a_traceparent_is_read_from_the_headers() {
        let mut headers = HeaderMap::new();
        headers
            .insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().expect("value"));
        let cx = TraceContextPropagator::new().extract_with_context(&opentelemetry::Context::new(), &Headers(&headers));
        let span = cx.span();
        let context = span.span_context();
        assert!(context.is_valid() && context.is_remote() && context.is_sampled());
        assert_eq!(context.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        headers
            .insert("traceparent", "00-00000000000000000000000000000000-b7ad6b7169203331-01".parse().expect("value"));
        let cx = TraceContextPropagator::new().extract_with_context(&opentelemetry::Context::new(), &Headers(&headers));
        assert!(!cx.span().span_context().is_valid(), "an all-zero trace id is no parent");
    }
}
