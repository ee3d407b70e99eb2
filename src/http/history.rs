//! `GET /api/history?after=<cursor>`: the polling fallback for clients that cannot stream.
//! Same token and topic rules as `/events`; answers the events missed since the cursor as JSON
//! and the cursor to ask with next time. Without `after` it only answers the current cursor.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::error::ApiError;
use super::events::{StreamQuery, authorize, bus_unavailable, position, read_history};
use crate::auth::unix_now;
use crate::history::{Cursor, channel_hash};
use crate::node::Node;

pub async fn history(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let query = StreamQuery::parse(query.as_deref());
    let (_grant, _topics, channels) = authorize(&node, &headers, &query)?;
    if node.history.is_none() {
        return Err(ApiError::forbidden("history_off", "this node keeps no history (SSE_HISTORY=false)"));
    }
    let after = query.after.as_deref().filter(|a| !a.is_empty());
    let start = position(&node, &channels, after).await.map_err(bus_unavailable)?;
    let resume = read_history(&node, start).await.map_err(bus_unavailable)?;

    let mut positions = resume.positions.clone();
    let mut entries = resume.entries;
    entries.sort_by_key(|(_, id, _)| *id);
    let mut events = Vec::with_capacity(entries.len());
    for (index, id, payload) in entries {
        positions[index] = positions[index].max(id);
        let Ok(message) = crate::envelope::parse(&payload) else { continue };
        events.push(json!({
            "channel": node.channels.logical(&channels[index]),
            "event": message.event.as_deref().unwrap_or("message"),
            "data": message.data,
            "history_id": id.to_string(),
        }));
    }
    let cursor =
        Cursor::encode(resume.epoch, unix_now(), channels.iter().map(channel_hash).zip(positions.iter().copied()));
    let reset: Vec<&str> = resume.reset.iter().map(|&i| node.channels.logical(&channels[i])).collect();
    let mut body = json!({"events": events, "cursor": cursor});
    if !reset.is_empty() {
        body["reset"] = json!({"channels": reset, "reason": resume.reason.label()});
    }
    Ok(Json(body))
}
