//! Metric names in one place, registered once. Handles are created at startup and passed
//! down, so the hot path increments an atomic instead of looking a name up per event.

use std::sync::{Mutex, PoisonError};

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::connection::CloseReason;
use crate::history::ResetReason;

pub const ACTIVE_CONNECTIONS: &str = "sse_active_connections";
pub const TOTAL_CONNECTIONS: &str = "sse_total_connections";
pub const CONNECTION_DURATION: &str = "sse_connection_duration_seconds";
pub const MESSAGES_SENT: &str = "sse_messages_sent_total";
pub const FAN_OUT_DURATION: &str = "sse_fanout_duration_seconds";
pub const CONNECTIONS_REJECTED: &str = "sse_connections_rejected_total";
pub const CONNECTIONS_CLOSED: &str = "sse_connections_closed_total";
pub const MESSAGES_REFUSED: &str = "sse_messages_refused_total";
pub const BUS_MESSAGES: &str = "sse_bus_messages_total";
pub const BUS_INBOUND_DROPPED: &str = "sse_bus_inbound_dropped_total";
pub const BUS_READY: &str = "sse_bus_ready";
pub const BUS_SUBSCRIBE_COMMANDS: &str = "sse_bus_subscribe_commands_total";
pub const BUS_UNSUBSCRIBE_COMMANDS: &str = "sse_bus_unsubscribe_commands_total";
pub const SUBSCRIBED_CHANNELS: &str = "sse_subscribed_channels";
pub const PUBLISH_REQUESTS: &str = "sse_publish_requests_total";
pub const JWKS_REFRESHES: &str = "sse_jwks_refreshes_total";
pub const JWKS_KEYS: &str = "sse_jwks_keys";
pub const PENDING_CONNECTIONS: &str = "sse_pending_connections";
pub const CANARY_SECONDS: &str = "sse_canary_seconds";
pub const DELIVERY_LATENCY: &str = "sse_delivery_latency_seconds";
pub const RESUMES: &str = "sse_resumes_total";
pub const REPLAY_ENTRIES: &str = "sse_replay_entries";
pub const AUTH_HOOK: &str = "sse_auth_hook_total";
pub const AUTH_HOOK_DURATION: &str = "sse_auth_hook_duration_seconds";
pub const AUTH_HOOK_CACHE_HITS: &str = "sse_auth_hook_cache_hits_total";
pub const TOKEN_RENEWALS: &str = "sse_token_renewals_total";

/// Installs the Prometheus recorder the first time, before any handle is created; later calls
/// (several servers in one test process) share it.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = build_recorder()?;
    *installed = Some(handle.clone());
    Ok(handle)
}

fn build_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    // Buckets rather than summaries, so durations aggregate across nodes.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CONNECTION_DURATION.to_owned()),
            &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full(FAN_OUT_DURATION.to_owned()),
            &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
        )?
        // From the first millisecond (a node and Redis on one machine) to the 30 s of a backfill
        // after a Redis outage.
        .set_buckets_for_metric(
            Matcher::Full(DELIVERY_LATENCY.to_owned()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )?
        // Up to the default SSE_HISTORY_MAX_REPLAY (10,000).
        .set_buckets_for_metric(
            Matcher::Full(REPLAY_ENTRIES.to_owned()),
            &[0.0, 1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0],
        )?
        // Up to the longest SSE_AUTH_HOOK_TIMEOUT a node takes.
        .set_buckets_for_metric(
            Matcher::Full(AUTH_HOOK_DURATION.to_owned()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(ACTIVE_CONNECTIONS, "Open event streams on this node");
    describe_counter!(TOTAL_CONNECTIONS, "Event streams opened since start");
    describe_histogram!(CONNECTION_DURATION, metrics::Unit::Seconds, "How long streams stayed open");
    describe_counter!(MESSAGES_SENT, "Events queued to streams (one per stream per event)");
    describe_histogram!(
        FAN_OUT_DURATION,
        metrics::Unit::Seconds,
        "Time to hand one message to every local stream of its channel (written or queued)"
    );
    describe_counter!(CONNECTIONS_REJECTED, "Stream requests and connections refused or dropped, by reason");
    describe_counter!(CONNECTIONS_CLOSED, "Streams ended, by reason (each stream once, by the node or its client)");
    describe_counter!(
        MESSAGES_REFUSED,
        "Published payloads not delivered because they could break framing or carry a forged history id, by reason"
    );
    describe_counter!(BUS_MESSAGES, "Payloads received from the bus");
    describe_counter!(BUS_INBOUND_DROPPED, "Payloads dropped because the dispatcher queue was full");
    describe_gauge!(BUS_READY, "1 when the bus answers, 0 otherwise");
    describe_counter!(BUS_SUBSCRIBE_COMMANDS, "SUBSCRIBE commands sent (each may carry many channels)");
    describe_counter!(BUS_UNSUBSCRIBE_COMMANDS, "UNSUBSCRIBE commands sent (each may carry many channels)");
    describe_gauge!(SUBSCRIBED_CHANNELS, "Channels with at least one local listener");
    describe_counter!(PUBLISH_REQUESTS, "POST /api/publish requests accepted");
    describe_counter!(JWKS_REFRESHES, "Fetches of SSE_JWT_JWKS_URL, by outcome (ok, failed)");
    describe_gauge!(JWKS_KEYS, "Usable keys held from SSE_JWT_JWKS_URL");
    describe_gauge!(PENDING_CONNECTIONS, "Connections without a complete, authenticated request yet");
    describe_gauge!(
        CANARY_SECONDS,
        metrics::Unit::Seconds,
        "Delivery lag the canary sees: the last probe's round trip through bus, subscriber and dispatcher, or how long the oldest probe out has waited when that is longer"
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        metrics::Unit::Seconds,
        "From a durable publish (its history id's time) to its hand-off to this node's streams; once per message"
    );
    describe_counter!(
        RESUMES,
        "Streams opened with Last-Event-ID, by outcome: exact, or the reason of the reset (window_lost, history_lost, invalid_cursor)"
    );
    describe_histogram!(REPLAY_ENTRIES, "History entries replayed to one resuming stream");
    describe_counter!(
        AUTH_HOOK,
        "Calls to SSE_AUTH_HOOK_URL, by outcome (allowed, narrowed, denied, timeout, unreachable, bad_status, malformed)"
    );
    describe_histogram!(AUTH_HOOK_DURATION, metrics::Unit::Seconds, "How long calls to SSE_AUTH_HOOK_URL took");
    describe_counter!(AUTH_HOOK_CACHE_HITS, "Stream opens answered from the authorization hook's cache");
    describe_counter!(
        TOKEN_RENEWALS,
        "Token renewals of open streams this node took (POST /api/connections/<id>/token), by outcome"
    );
}

/// Counts connections and deliveries; owned by the hub.
#[derive(Clone)]
pub struct HubMetrics {
    pub active: Gauge,
    pub total: Counter,
    pub duration: Histogram,
    pub sent: Counter,
    pub fan_out: Histogram,
    pub channels: Gauge,
    pub bus_messages: Counter,
    /// Publish to hand-off of durable messages, recorded once per message.
    pub delivery_latency: Histogram,
    /// `sse_connections_closed_total` per reason, resolved once: a storm closes thousands.
    closed: [Counter; CLOSE_REASONS.len()],
}

/// Every reason a stream is closed for, in declaration order: `HubMetrics::closed` is indexed
/// by `reason as usize`.
const CLOSE_REASONS: [CloseReason; 10] = [
    CloseReason::Replaced,
    CloseReason::SlowConsumer,
    CloseReason::Inactive,
    CloseReason::Lifetime,
    CloseReason::TokenExpired,
    CloseReason::Shutdown,
    CloseReason::Overflow,
    CloseReason::ClientClosed,
    CloseReason::WriteStalled,
    CloseReason::Revoked,
];

impl HubMetrics {
    pub fn new() -> Self {
        Self {
            active: gauge!(ACTIVE_CONNECTIONS),
            total: counter!(TOTAL_CONNECTIONS),
            duration: histogram!(CONNECTION_DURATION),
            sent: counter!(MESSAGES_SENT),
            fan_out: histogram!(FAN_OUT_DURATION),
            channels: gauge!(SUBSCRIBED_CHANNELS),
            bus_messages: counter!(BUS_MESSAGES),
            delivery_latency: histogram!(DELIVERY_LATENCY),
            closed: CLOSE_REASONS.map(|reason| counter!(CONNECTIONS_CLOSED, "reason" => reason.label())),
        }
    }

    pub fn rejected(&self, reason: &'static str) {
        counter!(CONNECTIONS_REJECTED, "reason" => reason).increment(1);
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].increment(1);
    }

    /// `count` streams closed for the same reason at once.
    pub fn closed_many(&self, reason: CloseReason, count: u64) {
        self.closed[reason as usize].increment(count);
    }

    pub fn refused(&self, reason: &'static str) {
        counter!(MESSAGES_REFUSED, "reason" => reason).increment(1);
    }
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts resumes; owned by the resumer.
pub struct ResumeMetrics {
    exact: Counter,
    /// Per [`ResetReason`], in declaration order (indexed by `reason as usize`).
    reset: [Counter; RESET_REASONS.len()],
    pub replayed: Histogram,
}

const RESET_REASONS: [ResetReason; 3] = [ResetReason::WindowLost, ResetReason::HistoryLost, ResetReason::InvalidCursor];

impl ResumeMetrics {
    pub fn new() -> Self {
        Self {
            exact: counter!(RESUMES, "outcome" => "exact"),
            reset: RESET_REASONS.map(|reason| counter!(RESUMES, "outcome" => reason.label())),
            replayed: histogram!(REPLAY_ENTRIES),
        }
    }

    /// One resume: exact, or reset for `reason` (on any of its channels).
    pub fn resumed(&self, reset: Option<ResetReason>) {
        match reset {
            None => self.exact.increment(1),
            Some(reason) => self.reset[reason as usize].increment(1),
        }
    }
}

impl Default for ResumeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `sse_messages_refused_total` reason of a live message whose history id did not verify.
pub const FORGED_HISTORY_ID: &str = "forged_history_id";

/// Counts what the bus does; owned by the bus.
#[derive(Clone)]
pub struct BusMetrics {
    pub ready: Gauge,
    pub inbound_dropped: Counter,
    pub subscribe_commands: Counter,
    pub unsubscribe_commands: Counter,
    /// Live messages refused because their history id's tag did not verify.
    pub forged_ids: Counter,
}

impl BusMetrics {
    pub fn new() -> Self {
        Self {
            ready: gauge!(BUS_READY),
            inbound_dropped: counter!(BUS_INBOUND_DROPPED),
            subscribe_commands: counter!(BUS_SUBSCRIBE_COMMANDS),
            unsubscribe_commands: counter!(BUS_UNSUBSCRIBE_COMMANDS),
            forged_ids: counter!(MESSAGES_REFUSED, "reason" => FORGED_HISTORY_ID),
        }
    }
}

impl Default for BusMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_reason_has_its_own_counter() {
        for (index, reason) in CLOSE_REASONS.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.label());
        }
    }

    #[test]
    fn every_reset_reason_has_its_own_counter() {
        for (index, reason) in RESET_REASONS.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.label());
        }
    }
}
