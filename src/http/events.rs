//! `GET /events`: turns an authenticated request into a stream in the hub.
//!
//! Order matters: the stream joins the hub (so it queues everything from that moment), then
//! waits until the bus confirms every subscription it needs, and only then answers with
//! `connected`. A client that publishes right after reading `connected` therefore never loses
//! its first message to a subscription still in flight.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, BytesMut};
use serde_json::json;

use super::error::ApiError;
use crate::auth::{AuthError, Grant, token_from_request};
use crate::channel::{ChannelName, check_name, topic_allowed};
use crate::connection::EventStream;
use crate::frame;
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
}

impl StreamQuery {
    pub fn parse(query: Option<&str>) -> Self {
        let mut parsed = StreamQuery::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "access_token" => parsed.access_token = Some(value.into_owned()),
                "topic" => parsed.topics.push(value.into_owned()),
                "lastEventId" => parsed.last_event_id = Some(value.into_owned()),
                _ => {}
            }
        }
        parsed
    }
}

pub async fn subscribe(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_origin(&node, &headers)?;
    let query = StreamQuery::parse(query.as_deref());
    let grant = token_from_request(&headers, query.access_token.as_deref())
        .ok_or(AuthError::Missing)
        .and_then(|token| node.auth.verify(token))
        .inspect_err(|_| node.hub_metrics.rejected("unauthorized"))?;
    let topics = granted_topics(&grant, query.topics)?;

    if !node.hub.bus().is_ready() {
        node.hub_metrics.rejected("not_ready");
        return Err(ApiError::unavailable("not_ready", "the node cannot reach its bus; retry shortly"));
    }
    let mut channels: Vec<ChannelName> = Vec::with_capacity(topics.len() + 2);
    channels.push(node.channels.user(grant.user.as_str()));
    channels.push(node.channels.broadcast());
    channels.extend(topics.iter().map(|t| node.channels.topic(t)));

    let joined = node.hub.join(grant.user.clone(), channels, grant.expires_at).map_err(|e| {
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
    let connected = json!({
        "connection_id": format!("{}:{}", node.node_id, connection.id.0),
        "node_id": node.node_id,
        "user": grant.user.as_str(),
        "topics": topics,
    });
    let mut preamble = BytesMut::new();
    preamble.put(frame::retry(node.config.retry_interval));
    preamble.put(frame::event(Some("connected"), None, &connected.to_string()));
    let body = EventStream::new(joined.membership, preamble.freeze());

    let mut response = Response::new(Body::new(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // no-transform keeps intermediaries from compressing or buffering the stream.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
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
