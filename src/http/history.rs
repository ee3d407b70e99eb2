//! `GET /api/history?after=<cursor>`: the polling fallback for clients that cannot stream.
//! Same token, topic and connect authorization hook rules as `/events`; answers one page of the events missed since the
//! cursor as JSON (bounded like every history read, `SSE_HISTORY_PAGE_*`), the cursor to ask
//! with next time, and `more` when the page filled up (ask again at once). Without `after` it
//! only answers the current cursor.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::client_ip::{Peer, client_address};
use super::error::{ApiError, history_unavailable};
use super::events::{Authorized, authorize};
use super::pending::RequestMark;
use crate::auth::unix_now;
use crate::history::{Cursor, channel_hash};
use crate::node::Node;
use crate::resume::MissedEntry;

pub async fn history(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<Peer>>,
    pending: Option<Extension<RequestMark>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    // Only a router driven without a socket (in-process tests) has no peer.
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |Extension(Peer(address))| address);
    let client = client_address(peer, &headers, &node.config.trusted_proxies);
    // The connect authorization hook is asked here too: a page is what a stream would replay.
    let Authorized { channels, query, .. } =
        authorize(&node, &headers, query.as_deref(), client, pending.as_ref().map(|Extension(mark)| mark)).await?;
    let Some(resume) = &node.resume else {
        return Err(ApiError::forbidden("history_off", "this node keeps no history (SSE_HISTORY=false)"));
    };
    // As for `/events`: a node that cannot reach its bus (or, on Redis, has not read the
    // cluster's key yet) cannot check a cursor.
    if !node.hub.bus().is_ready() {
        return Err(ApiError::unavailable("not_ready", "the node cannot reach its bus; retry shortly"));
    }
    let after = query.after.as_deref().filter(|a| !a.is_empty());
    let start = resume.position(&channels, after).await.map_err(history_unavailable)?;
    let missed = resume.missed(start).await.map_err(history_unavailable)?;

    let positions = missed.next;
    let mut entries = missed.entries;
    entries.sort_by_key(|missed| missed.entry.id);
    let mut events = Vec::with_capacity(entries.len());
    for MissedEntry { channel, entry } in entries {
        let Ok(message) = crate::envelope::parse(&entry.payload) else { continue };
        events.push(json!({
            "channel": node.channels.logical(&channels[channel]),
            "event": message.event.as_deref().unwrap_or("message"),
            "data": message.data,
            "history_id": entry.id.to_string(),
        }));
    }
    let cursor =
        Cursor::encode(missed.epoch, unix_now(), channels.iter().map(channel_hash).zip(positions.iter().copied()));
    let reset: Vec<&str> = missed.reset.iter().map(|&i| node.channels.logical(&channels[i])).collect();
    let mut body = json!({"events": events, "cursor": cursor, "more": !missed.more.is_empty()});
    if !reset.is_empty() {
        body["reset"] = json!({"channels": reset, "reason": missed.reason.label()});
    }
    Ok(Json(body))
}
