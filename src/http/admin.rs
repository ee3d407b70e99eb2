//! Operator endpoints behind an admin token: `/api/stats` for this node.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use super::grant::Access;
use crate::auth::Role;
use crate::node::Node;

pub async fn stats(State(node): State<Arc<Node>>, access: Access) -> Result<Json<Value>, ApiError> {
    access.require(Role::Admin)?;
    let hub = node.hub.stats();
    Ok(Json(json!({
        "node_id": node.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": node.started.elapsed().as_secs(),
        "bus": {"kind": node.hub.bus().kind(), "ready": node.hub.bus().is_ready()},
        "draining": node.hub.is_draining(),
        "connections": hub.connections,
        "users": hub.users,
        "channels": hub.channels,
        "memory": {"rss_bytes": resident_memory_bytes()},
    })))
}

/// Resident set size from /proc (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * 4096)
}
