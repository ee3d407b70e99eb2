//! Operator probes: `/healthz` (the process answers), `/readyz` (it can deliver: its dispatcher
//! and bus tasks run, the bus is reachable, it is not draining, it has keys to verify tokens
//! with, and its canary's probes come back in time) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use crate::node::Node;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let reason = if let Some(failure) = node.failure() {
        Some(failure)
    } else if node.hub.is_draining() {
        Some("draining")
    } else if !node.hub.bus().is_ready() {
        Some("bus_unavailable")
    } else if !node.auth.has_keys() {
        Some("keys_unavailable")
    } else if node.canary.as_ref().is_some_and(|canary| canary.is_stalled()) {
        // Redis may answer PING while nothing comes back through it and the dispatcher.
        Some("canary_stalled")
    } else {
        None
    };
    match reason {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reason": reason}))),
    }
}

pub async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.prometheus.render())
}
