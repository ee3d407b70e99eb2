//! Operator endpoints behind an admin token: `/api/stats` and `/api/connections` for this
//! node; presence (`/api/presence`), the cluster's nodes (`/api/cluster`) and disconnecting a
//! user everywhere (`DELETE /api/users/<user>/connections`) for the whole cluster. What they
//! answer is [`crate::presence`]'s; here are only the HTTP shapes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::{ApiError, presence_unavailable, publish_failed};
use super::grant::Access;
use super::query;
use crate::auth::{Role, UserId};
use crate::node::Node;
use crate::presence::MAX_BATCH_USERS;

/// Streams one `/api/connections` page shows unless asked otherwise, and at most.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

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

fn user_id(user: &str, field: &str) -> Result<UserId, ApiError> {
    UserId::new(user).map_err(|e| ApiError::bad_request(field, format!("{user:?}: {e}")))
}

/// `GET /api/presence/<user>`: the user's streams on every node.
pub async fn presence_of(
    State(node): State<Arc<Node>>,
    access: Access,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    access.require(Role::Admin)?;
    let user = user_id(&user, "user")?;
    let streams = node.presence.streams_of(&user).await.map_err(presence_unavailable)?;
    Ok(Json(json!({"user": user.as_str(), "online": !streams.is_empty(), "streams": streams})))
}

/// `GET /api/presence?users=a,b,c`: whether each user is online anywhere (a batch
/// `hasConnection`), as `{"users": {"a": true, ...}}`.
pub async fn presence_many(
    State(node): State<Arc<Node>>,
    access: Access,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    access.require(Role::Admin)?;
    let mut users = Vec::new();
    for pair in query::pairs(raw.as_deref().unwrap_or("")) {
        let (name, value) = pair?;
        if name == "users" {
            for user in value.split(',').filter(|u| !u.is_empty()) {
                users.push(user_id(user, "users")?);
            }
        }
    }
    if users.is_empty() {
        return Err(ApiError::bad_request("users", "name at least one user: ?users=a,b,c"));
    }
    if users.len() > MAX_BATCH_USERS {
        return Err(ApiError::bad_request("users", format!("at most {MAX_BATCH_USERS} users per call")));
    }
    let online = node.presence.online(&users).await.map_err(presence_unavailable)?;
    let answer: serde_json::Map<String, Value> =
        users.iter().zip(online).map(|(u, on)| (u.as_str().to_owned(), Value::Bool(on))).collect();
    Ok(Json(json!({ "users": answer })))
}

/// `GET /api/connections?limit=&after=`: this node's streams in connection order, a page at a
/// time; `next` is the `after` of the next page.
pub async fn connections(
    State(node): State<Arc<Node>>,
    access: Access,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    access.require(Role::Admin)?;
    let (mut limit, mut after) = (PAGE_DEFAULT, 0);
    for pair in query::pairs(raw.as_deref().unwrap_or("")) {
        let (name, value) = pair?;
        match name.as_ref() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=PAGE_MAX).contains(l))
                    .ok_or_else(|| ApiError::bad_request("limit", format!("a number from 1 to {PAGE_MAX}")))?;
            }
            // The `connection_id` last seen (`<node>:<n>`) or its number alone.
            "after" => {
                let number = value.rsplit(':').next().unwrap_or_default();
                after = number
                    .parse()
                    .map_err(|_| ApiError::bad_request("after", "a connection_id from the previous page"))?;
            }
            _ => {}
        }
    }
    let (streams, next) = node.presence.local(after, limit);
    let streams: Vec<Value> = streams
        .into_iter()
        .map(|(user, s)| {
            json!({"user": user.as_str(), "connection_id": s.connection_id, "since": s.since, "topics": s.topics})
        })
        .collect();
    let next = next.map(|n| format!("{}:{n}", node.node_id));
    Ok(Json(json!({"node": node.node_id, "connections": streams, "next": next})))
}

/// `GET /api/cluster`: the nodes alive, their streams and versions.
pub async fn cluster(State(node): State<Arc<Node>>, access: Access) -> Result<Json<Value>, ApiError> {
    access.require(Role::Admin)?;
    let nodes = node.presence.cluster().await.map_err(presence_unavailable)?;
    Ok(Json(json!({ "nodes": nodes })))
}

/// `DELETE /api/users/<user>/connections`: every node closes the user's streams with
/// `disconnected: revoked`. Answers 202 with the streams presence knew of when asked.
pub async fn revoke(
    State(node): State<Arc<Node>>,
    access: Access,
    Path(user): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    access.bearer_only()?.require(Role::Admin)?;
    let user = user_id(&user, "user")?;
    let streams = node.presence.streams_of(&user).await.map(|s| s.len()).ok();
    node.presence.revoke(&user).await.map_err(publish_failed)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"user": user.as_str(), "revoked": true, "streams": streams}))))
}

/// Resident set size from /proc (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * 4096)
}
