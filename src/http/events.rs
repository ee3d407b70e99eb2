//! `GET /events`: turns an authenticated request into a stream in the hub.
//!
//! Order matters: the stream joins the hub (so it queues everything from that moment), then
//! waits until the bus confirms every subscription it needs, and only then answers with
//! `connected`. A client that publishes right after reading `connected` therefore never loses
//! its first message to a subscription still in flight.
//!
//! With history on, each channel is positioned first (from `Last-Event-ID`, or at the current
//! tail for a new stream), and after subscribing the stream replays what history holds past
//! those positions; live copies of replayed entries are dropped by id in the connection. So a
//! message published at any moment of a (re)connect arrives exactly once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, BytesMut};
use serde_json::json;

use super::error::ApiError;
use super::event_stream::EventStream;
use crate::auth::{AuthError, Grant, token_from_request, unix_now};
use crate::bus::BusError;
use crate::channel::{ChannelName, check_name, topic_allowed};
use crate::connection::{Connection, Item};
use crate::frame;
use crate::history::{Cursor, ResetReason, Since, StreamId, reset_frame};
use crate::hub::JoinError;
use crate::node::Node;

/// Topics one stream may join; more is a client bug, and each costs a subscription.
pub const MAX_TOPICS_PER_STREAM: usize = 64;
/// How long a new stream waits for its subscriptions before giving up with 503.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The query parameters of `/events`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StreamQuery {
    pub access_token: Option<String>,
    pub topics: Vec<String>,
    pub last_event_id: Option<String>,
    /// `/api/history`'s cursor.
    pub after: Option<String>,
}

impl StreamQuery {
    pub fn parse(query: Option<&str>) -> Self {
        let mut parsed = StreamQuery::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "access_token" => parsed.access_token = Some(value.into_owned()),
                "topic" => parsed.topics.push(value.into_owned()),
                "lastEventId" => parsed.last_event_id = Some(value.into_owned()),
                "after" => parsed.after = Some(value.into_owned()),
                _ => {}
            }
        }
        parsed
    }
}

/// `GET /events` served by hyper (used when a connection's first request was something else).
pub async fn subscribe(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let opened = open(&node, &headers, query.as_deref()).await?;
    let body = EventStream::new(opened.membership, opened.preamble);
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    for (name, value) in STREAM_HEADERS {
        h.insert(*name, HeaderValue::from_static(value));
    }
    Ok(response)
}

/// Headers of every event stream response. `no-transform` keeps intermediaries from
/// compressing or buffering; `X-Accel-Buffering` turns nginx buffering off for this response.
pub const STREAM_HEADERS: &[(&str, &str)] =
    &[("content-type", "text/event-stream"), ("cache-control", "no-cache, no-transform"), ("x-accel-buffering", "no")];

/// A stream that joined the hub and is ready to be written: its preamble first.
pub struct Opened {
    pub membership: crate::hub::Membership,
    pub preamble: bytes::Bytes,
}

/// Everything `/events` decides before the first byte: origin, token, topics, readiness,
/// limits, subscriptions, and (with history) the resume. Shared by both serving paths.
pub async fn open(node: &Node, headers: &HeaderMap, query: Option<&str>) -> Result<Opened, ApiError> {
    check_origin(node, headers)?;
    let query = StreamQuery::parse(query);
    let (grant, topics, channels) = authorize(node, headers, &query)?;
    if !node.hub.bus().is_ready() {
        node.hub_metrics.rejected("not_ready");
        return Err(ApiError::unavailable("not_ready", "the node cannot reach its bus; retry shortly"));
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id)
        .filter(|id| !id.is_empty());
    let start = match node.history {
        Some(_) => Some(position(node, &channels, last_event_id.as_deref()).await.map_err(bus_unavailable)?),
        None => None,
    };

    let joined = node.hub.join(grant.user.clone(), channels.clone(), grant.expires_at).map_err(|e| {
        node.hub_metrics.rejected(e.label());
        match e {
            JoinError::UserLimit => ApiError::TooManyRequests {
                code: "user_limit",
                message: format!("user {} holds the maximum number of streams on this node", grant.user),
            },
            JoinError::NodeFull => ApiError::unavailable("node_full", "this node holds its maximum number of streams"),
            JoinError::Draining => ApiError::unavailable("draining", "this node is shutting down; reconnect elsewhere"),
        }
    })?;
    let waited = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
        for ready in &joined.pending {
            ready.wait().await;
        }
    })
    .await;
    if waited.is_err() {
        node.hub_metrics.rejected("subscribe_timeout");
        return Err(ApiError::unavailable("not_ready", "subscribing took too long; retry shortly"));
    }
    let connection = joined.membership.connection();
    let resets = match start {
        Some(start) => replay(node, connection, start).await.map_err(bus_unavailable)?,
        None => None,
    };

    let connected = json!({
        "connection_id": format!("{}:{}", node.node_id, connection.id.0),
        "node_id": node.node_id,
        "user": grant.user.as_str(),
        "topics": topics,
    });
    let mut preamble = BytesMut::new();
    preamble.put(frame::retry(node.config.retry_interval));
    let cursor = connection.cursor();
    preamble.put(frame::event(Some("connected"), cursor.as_deref(), &connected.to_string()));
    if let Some(reset) = resets {
        preamble.put(reset);
    }
    Ok(Opened { membership: joined.membership, preamble: preamble.freeze() })
}

/// Checks the token and the asked topics; returns the grant, the topics and every channel of
/// the stream (user, broadcast, then topics).
pub fn authorize(
    node: &Node,
    headers: &HeaderMap,
    query: &StreamQuery,
) -> Result<(Grant, Vec<String>, Vec<ChannelName>), ApiError> {
    let grant = token_from_request(headers, query.access_token.as_deref())
        .ok_or(AuthError::Missing)
        .and_then(|token| node.auth.verify(token))
        .inspect_err(|_| node.hub_metrics.rejected("unauthorized"))?;
    let topics = granted_topics(&grant, query.topics.clone())?;
    let mut channels: Vec<ChannelName> = Vec::with_capacity(topics.len() + 2);
    channels.push(node.channels.user(grant.user.as_str()));
    channels.push(node.channels.broadcast());
    channels.extend(topics.iter().map(|t| node.channels.topic(t)));
    Ok((grant, topics, channels))
}

pub fn bus_unavailable(e: BusError) -> ApiError {
    ApiError::unavailable("not_ready", format!("history is unavailable: {e}"))
}

/// Where each channel of a stream starts, decided before subscribing.
pub struct Start {
    /// The epoch the positions belong to.
    pub epoch: u32,
    pub positions: Vec<(ChannelName, StreamId)>,
    /// How long the client was away (from the cursor's issue time).
    pub away: Duration,
    /// Set when `Last-Event-ID` was not a cursor: every channel is reset.
    pub invalid_cursor: bool,
}

/// Positions every channel: from the cursor where it has one, else at the current tail (a new
/// stream, or a topic the stream did not have before).
pub async fn position(node: &Node, channels: &[ChannelName], last_event_id: Option<&str>) -> Result<Start, BusError> {
    let cursor = last_event_id.map(Cursor::decode);
    if let Some(Ok(cursor)) = &cursor
        && let Some(positions) = channels.iter().map(|c| Some((c.clone(), cursor.position(c)?))).collect()
    {
        // A resume that knows every channel needs no tails: the history read that follows
        // checks the epoch. In a reconnect storm that is one Redis call per stream saved.
        let away = Duration::from_secs(unix_now().saturating_sub(cursor.issued_at));
        return Ok(Start { epoch: cursor.epoch, positions, away, invalid_cursor: false });
    }
    let (current, tails) = node.hub.bus().tails(channels).await?;
    node.epoch.store(current, Ordering::Release);
    let (epoch, away, invalid_cursor, cursor) = match cursor {
        None => (current, Duration::ZERO, false, None),
        Some(Err(_)) => (current, Duration::ZERO, true, None),
        Some(Ok(cursor)) => {
            (cursor.epoch, Duration::from_secs(unix_now().saturating_sub(cursor.issued_at)), false, Some(cursor))
        }
    };
    let positions = channels
        .iter()
        .zip(tails)
        .map(|(channel, tail)| (channel.clone(), cursor.as_ref().and_then(|c| c.position(channel)).unwrap_or(tail)))
        .collect();
    Ok(Start { epoch, positions, away, invalid_cursor })
}

/// What history says past each position: the entries to replay and the channels to reset.
pub struct Resume {
    pub epoch: u32,
    /// Where each channel continues: the asked position (the entries follow it), or the tail
    /// after a reset.
    pub positions: Vec<StreamId>,
    pub entries: Vec<(usize, StreamId, bytes::Bytes)>,
    pub reset: Vec<usize>,
    pub reason: ResetReason,
}

pub async fn read_history(node: &Node, start: Start) -> Result<Resume, BusError> {
    let (current, results) = node.hub.bus().since(start.epoch, start.away, &start.positions).await?;
    node.epoch.store(current, Ordering::Release);
    let reason = if start.invalid_cursor {
        ResetReason::InvalidCursor
    } else if start.epoch != current {
        ResetReason::HistoryLost
    } else {
        ResetReason::WindowLost
    };
    let mut resume = Resume { epoch: current, positions: Vec::new(), entries: Vec::new(), reset: Vec::new(), reason };
    for (index, ((_, position), since)) in start.positions.iter().zip(results).enumerate() {
        match since {
            Since::Entries(entries) if !start.invalid_cursor => {
                resume.positions.push(*position);
                resume.entries.extend(entries.into_iter().map(|(id, payload)| (index, id, payload)));
            }
            Since::Entries(entries) => {
                // No trustworthy position: continue from the newest entry, and say so.
                resume.positions.push(entries.last().map_or(*position, |(id, _)| *id));
                resume.reset.push(index);
            }
            Since::Reset { tail } => {
                resume.positions.push(tail);
                resume.reset.push(index);
            }
        }
    }
    Ok(resume)
}

/// Reads history past the start positions and queues it ahead of live messages; returns the
/// `reset` event to send after `connected`, if any channel lost continuity.
async fn replay(node: &Node, connection: &Connection, start: Start) -> Result<Option<bytes::Bytes>, BusError> {
    let channels: Vec<ChannelName> = start.positions.iter().map(|(c, _)| c.clone()).collect();
    let resume = read_history(node, start).await?;
    let mut replay = Vec::with_capacity(resume.entries.len());
    for (index, id, payload) in resume.entries {
        let Ok(message) = crate::envelope::parse(&payload) else {
            continue; // Counted when it was published live; never written to a stream.
        };
        let frame = frame::event(message.event.as_deref(), None, &message.data);
        replay.push(Item::Event { channel: channels[index].clone(), id, frame });
    }
    // Positions stay where the client was: each replayed entry is newer, and the connection
    // advances as it writes them.
    connection.start_history(resume.epoch, resume.positions, replay);
    if resume.reset.is_empty() {
        return Ok(None);
    }
    let reset: Vec<&ChannelName> = resume.reset.iter().map(|&i| &channels[i]).collect();
    Ok(Some(reset_frame(&node.channels, &reset, resume.reason)))
}

/// Checks each asked topic and that the token grants it; removes duplicates.
fn granted_topics(grant: &Grant, asked: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut topics: Vec<String> = Vec::with_capacity(asked.len());
    for topic in asked {
        check_name(&topic).map_err(|e| ApiError::bad_request("topic", format!("topic {topic:?} {e}")))?;
        if !topic_allowed(&grant.topics, &topic) {
            return Err(ApiError::forbidden("topic_not_allowed", format!("the token does not grant topic {topic:?}")));
        }
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    if topics.len() > MAX_TOPICS_PER_STREAM {
        return Err(ApiError::bad_request("topic", format!("at most {MAX_TOPICS_PER_STREAM} topics per stream")));
    }
    Ok(topics)
}

/// With an allow-list configured, a browser request from another origin is refused outright
/// (CORS alone would still open the stream and only hide it from the page).
fn check_origin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return Ok(());
    };
    let mut allowed = node.config.cors_origins().peekable();
    if allowed.peek().is_none() {
        return Ok(());
    }
    if allowed.any(|o| o == "*" || o == origin) {
        return Ok(());
    }
    node.hub_metrics.rejected("origin_not_allowed");
    Err(ApiError::forbidden("origin_not_allowed", format!("origin {origin} is not allowed")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, UserId};
    use crate::channel::TopicPattern;

    fn grant(patterns: &[&str]) -> Grant {
        Grant {
            user: UserId::new("u").expect("id"),
            topics: patterns.iter().map(|p| TopicPattern::new(*p)).collect(),
            role: Role::Subscriber,
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_topics_repeat() {
        let q = StreamQuery::parse(Some("topic=a&topic=b%3A1&access_token=t.k.n&lastEventId=x%20y&other=1"));
        assert_eq!(q.topics, ["a", "b:1"]);
        assert_eq!(q.access_token.as_deref(), Some("t.k.n"));
        assert_eq!(q.last_event_id.as_deref(), Some("x y"));
        assert_eq!(StreamQuery::parse(None), StreamQuery::default());
    }

    #[test]
    fn topics_must_be_granted_valid_and_few() {
        let g = grant(&["news:*"]);
        assert_eq!(granted_topics(&g, vec!["news:1".into(), "news:1".into()]).expect("granted"), ["news:1"]);
        assert!(matches!(granted_topics(&g, vec!["sports".into()]), Err(ApiError::Forbidden { .. })));
        assert!(matches!(granted_topics(&g, vec!["news:*".into()]), Err(ApiError::BadRequest { .. })));
        let many: Vec<String> = (0..=MAX_TOPICS_PER_STREAM).map(|i| format!("news:{i}")).collect();
        assert!(matches!(granted_topics(&g, many), Err(ApiError::BadRequest { .. })));
    }
}
