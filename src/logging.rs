//! Log output: text for people, JSON lines for collectors, filtered by `SSE_LOG_LEVEL`. With
//! tracing on, the exporting layer of [`crate::telemetry`] runs beside it on the same registry.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use crate::telemetry::{self, TraceLayer};

/// Installs the node's logger, and the trace layer when tracing is on.
pub fn init(format: LogFormat, filter: &str, traces: Option<TraceLayer>) -> anyhow::Result<()> {
    Registry::default()
        .with(layers(format, filter, traces)?)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

/// The logger's layer and, when given, the trace layer. Each has its own filter, so a span is
/// built only when one of them wants it: the log layer never takes the trace spans (they would
/// prefix every log line inside a request), so with tracing off they are disabled outright.
pub fn layers(format: LogFormat, filter: &str, traces: Option<TraceLayer>) -> anyhow::Result<Vec<TraceLayer>> {
    let filter = EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("SSE_LOG_LEVEL {filter:?}: {e}"))?;
    // The hint keeps the level filter's: without one, `And` would lose the fast level check.
    let not_traces = filter_fn(|meta| meta.target() != telemetry::TARGET).with_max_level_hint(LevelFilter::TRACE);
    let filter = filter.and(not_traces);
    // Colours only on a terminal: log files and collectors get plain text.
    let builder =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Text => builder.with_filter(filter).boxed(),
        LogFormat::Json => builder.json().flatten_event(true).with_filter(filter).boxed(),
    };
    Ok(std::iter::once(logs).chain(traces).collect())
}
