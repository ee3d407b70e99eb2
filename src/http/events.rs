//! `GET /events`: turns an authenticated request into a stream in the hub.
//!
//! Order matters: the stream joins the hub (so it queues everything from that moment), then
//! waits until the bus confirms every subscription it needs, and only then answers with
//! `connected`. A client that publishes right after reading `connected` therefore never loses
//! its first message to a subscription still in flight.
//!
//! Before any of that, with `SSE_AUTH_HOOK_URL` set, the operator's backend is asked whether the
//! stream may open and with which topics ([`crate::auth_hook`]); the topics it keeps are joined
//! exactly as if the token had granted only those.
//!
//! With history on, each channel is positioned first (from `Last-Event-ID`, or at the current
//! tail for a new stream), and after subscribing the stream replays what history holds past
//! those positions; live copies of replayed entries are dropped by id in the connection. So a
//! message published at any moment of a (re)connect arrives exactly once. The history side of
//! that is [`crate::resume`]'s.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{BufMut, BytesMut};
use serde_json::json;
use serde_json::value::RawValue;
use tracing::{Instrument, Span};

use super::client_ip::{Peer, client_address};
use super::content_coding;
use super::error::{ApiError, history_unavailable};
use super::event_stream::EventStream;
use super::grant::{Access, check_origin, grant};
use super::ip_limits::StreamSlot;
use super::pending::RequestMark;
use super::query;
use crate::auth::Grant;
use crate::auth_hook::{AuthHook, Decision, HookRequest};
use crate::channel::{ChannelName, check_name, topic_allowed};
use crate::frame;
use crate::hub::{JoinError, Joined};
use crate::node::Node;
use crate::telemetry;
use crate::user_limit::Seat;

/// Topics one stream may join; more is a client bug, and each costs a subscription.
pub const MAX_TOPICS_PER_STREAM: usize = 64;
/// How long a new stream waits for its subscriptions before giving up with 503.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The query parameters of `/events` and of its polling twin `/api/history` (the token is
/// [`grant`]'s).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StreamQuery {
    pub topics: Vec<String>,
    pub last_event_id: Option<String>,
    /// `/api/history`'s cursor.
    pub after: Option<String>,
}

impl StreamQuery {
    /// A query that is not validly percent-encoded UTF-8 is a 400 naming the parameter, never
    /// guessed at: two different raw topic names must not become one ([`query`]).
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = StreamQuery::default();
        for pair in query::pairs(query.unwrap_or_default()) {
            let (key, value) = pair?;
            match &*key {
                "topic" => parsed.topics.push(value.into_owned()),
                "lastEventId" => parsed.last_event_id = Some(value.into_owned()),
                "after" => parsed.after = Some(value.into_owned()),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// `GET /events` served by hyper (used when a connection's first request was something else).
pub async fn subscribe(
    State(node): State<Arc<Node>>,
    peer: Option<Extension<Peer>>,
    pending: Option<Extension<RequestMark>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    // Only a router driven without a socket (in-process tests) has no peer.
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |Extension(Peer(address))| address);
    let pending = pending.as_ref().map(|Extension(pending)| pending);
    let opened = open(&node, &headers, query.as_deref(), peer, pending).await?;
    let body = EventStream::new(opened.membership, opened.preamble, opened.ip_slot);
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    for (name, value) in
        STREAM_HEADERS.iter().chain(content_coding::headers(node.config.enable_compression, opened.gzip))
    {
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
    /// What the body starts with: for a gzip stream, the gzip header and the preamble, coded.
    pub preamble: bytes::Bytes,
    /// The stream is gzip-coded (`SSE_ENABLE_COMPRESSION` and the client accepts gzip).
    pub gzip: bool,
    /// The stream's place among its client address's (`SSE_IP_MAX_STREAMS`); held as long as
    /// the stream.
    pub ip_slot: Option<StreamSlot>,
}

/// Everything `/events` decides before the first byte: per-address limits, origin, token,
/// topics, readiness, limits, subscriptions, and (with history) the resume. Shared by both
/// serving paths; `peer` is the connection's TCP peer, and `pending` the request's mark when its
/// connection is still pending (hyper's path). A stream request has no body to wait for, so the
/// connection leaves the pending set as soon as the token verifies: waiting for the bus is no
/// reason to be dropped as a slow client.
///
/// Traced as `connect` (continuing the request's `traceparent`), with `auth`, `subscribe` and
/// `resume` inside ([`telemetry`]).
pub async fn open(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    pending: Option<&RequestMark>,
) -> Result<Opened, ApiError> {
    let span = telemetry::connect_span(&node.node_id);
    telemetry::continue_trace(&span, headers);
    let opened = open_stream(node, headers, query, peer, pending, &span).instrument(span.clone()).await;
    match &opened {
        Ok(_) => telemetry::record_answer(&span, 200, None),
        Err(e) => telemetry::record_answer(&span, e.status().as_u16(), Some(e.code())),
    }
    opened
}

/// [`open`] inside its `connect` span.
async fn open_stream(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
    pending: Option<&RequestMark>,
    span: &Span,
) -> Result<Opened, ApiError> {
    // First and cheapest: an address over its rate is refused before its token costs a verify.
    let client = client_address(peer, headers, &node.config.trusted_proxies);
    let ip_slot = node.ip_limits.admit(client).map_err(|refusal| {
        node.hub_metrics.rejected(refusal.label());
        ApiError::from(refusal)
    })?;
    // Stricter than for other routes: with an allow-list, a stream is refused to any foreign
    // page, whatever carries its token (CORS alone would open it and only hide it).
    check_origin(node, headers).inspect_err(|_| node.hub_metrics.rejected("origin_not_allowed"))?;
    let Authorized { grant, topics, channels, query } = authorize(node, headers, query, client, pending)
        .instrument(telemetry::auth_span(node.auth_hook.is_some()))
        .await?;
    span.record("enduser.id", grant.user.as_str());
    span.record("topics.count", topics.len());
    if let Some(pending) = pending {
        pending.authenticated();
    }
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
    // Disabled (and never entered) when history is off.
    let resume_span = if node.resume.is_some() { telemetry::resume_span() } else { Span::none() };
    let start = match &node.resume {
        Some(resume) => Some(
            resume
                .position(&channels, last_event_id.as_deref())
                .instrument(resume_span.clone())
                .await
                .map_err(history_unavailable)?,
        ),
        None => None,
    };

    let subscribe = telemetry::subscribe_span(channels.len());
    let joined = subscribe_stream(node, &grant, channels).instrument(subscribe).await?;
    let connection = joined.membership.connection();
    let connection_id = node.hub.connection_id(connection);
    span.record("connection.id", connection_id.as_str());
    let resets = match (&node.resume, start, &joined.hold) {
        (Some(resume), Some(start), Some(hold)) => {
            match resume.replay(&node.hub, hold, start).instrument(resume_span.clone()).await {
                Ok(replayed) => {
                    telemetry::record_resume(&resume_span, span, replayed.outcome, replayed.first_page);
                    replayed.reset
                }
                Err(error) => {
                    joined.membership.refuse();
                    return Err(history_unavailable(error));
                }
            }
        }
        _ => None,
    };
    drop(resume_span);

    let connected = json!({
        "connection_id": connection_id,
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
    // Decided last, once nothing can refuse the stream any more; nothing was taken from its
    // queue yet (its writer starts after this), so everything it writes is in the member.
    let gzip = node.config.enable_compression && content_coding::accepts_gzip(headers);
    let preamble = if gzip { connection.start_gzip(&preamble) } else { preamble.freeze() };
    Ok(Opened { membership: joined.membership, preamble, ip_slot, gzip })
}

/// Joins the hub (held, with history: what arrives live waits until the replay is queued) and
/// waits until the bus confirmed every channel, or refuses the stream.
async fn subscribe_stream(node: &Node, grant: &Grant, channels: Vec<ChannelName>) -> Result<Joined, ApiError> {
    // The hub closes the stream at `exp` + leeway: its token was accepted with the leeway, so
    // closing it at once with `token_expired` would be a contradiction.
    // With history, the stream joins held: what arrives live waits until its replay is queued.
    // With Redis the per-user limit counts the user's streams on every node: the stream takes
    // its seat there first (and falls back to this node's count when Redis does not answer).
    let held = node.resume.is_some();
    let (joined, evicted) = match &node.seats {
        Some(seats) => {
            let id = node.hub.reserve_id();
            match seats.take(&grant.user, id).await {
                Seat::Taken { evicted } => {
                    (node.hub.join_seated(id, grant.user.clone(), channels, grant.expires_at, held), evicted)
                }
                Seat::Full => (Err(JoinError::UserLimit), Vec::new()),
                Seat::Unknown => (join_here(node, grant, channels, held), Vec::new()),
            }
        }
        None => (join_here(node, grant, channels, held), Vec::new()),
    };
    let joined = joined.map_err(|e| {
        node.hub_metrics.rejected(e.label());
        match e {
            JoinError::UserLimit => ApiError::TooManyRequests {
                code: "user_limit",
                message: format!("user {} holds the maximum number of streams", grant.user),
                retry_after: None,
            },
            JoinError::NodeFull => ApiError::unavailable("node_full", "this node holds its maximum number of streams"),
            JoinError::Draining => ApiError::unavailable("draining", "this node is shutting down; reconnect elsewhere"),
        }
    })?;
    if let Some(seats) = node.seats.as_ref().filter(|_| !evicted.is_empty()) {
        seats.evict(&node.hub, &evicted).await;
    }
    let waited = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
        for ready in &joined.pending {
            ready.wait().await;
        }
    })
    .await;
    if waited.is_err() {
        node.hub_metrics.rejected("subscribe_timeout");
        joined.membership.refuse();
        return Err(ApiError::unavailable("not_ready", "subscribing took too long; retry shortly"));
    }
    Ok(joined)
}

/// Joins the hub with this node's own per-user limit.
fn join_here(node: &Node, grant: &Grant, channels: Vec<ChannelName>, held: bool) -> Result<Joined, JoinError> {
    if held {
        node.hub.join_held(grant.user.clone(), channels, grant.expires_at)
    } else {
        node.hub.join(grant.user.clone(), channels, grant.expires_at)
    }
}

/// A stream request whose token and topics were checked (and, with a hook, allowed by it).
pub struct Authorized {
    pub grant: Grant,
    /// The granted topics, without duplicates; with a hook, those it allowed.
    pub topics: Vec<String>,
    /// Every channel of the stream: user, broadcast, then topics.
    pub channels: Vec<ChannelName>,
    /// The rest of the query (`lastEventId`, `after`), decoded once.
    pub query: StreamQuery,
}

/// Checks the token, then the query and the asked topics, then asks the connect authorization
/// hook when there is one. `client` is the request's address (for the hook); `pending` the
/// request's mark while its connection is pending (hyper's path).
pub async fn authorize(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
    client: IpAddr,
    pending: Option<&RequestMark>,
) -> Result<Authorized, ApiError> {
    let Access { grant, source } =
        grant(node, headers, query).await.inspect_err(|e| node.hub_metrics.rejected(rejection(e)))?;
    let mut query = StreamQuery::parse(query)?;
    let mut topics = granted_topics(&grant, std::mem::take(&mut query.topics))?;
    if let Some(hook) = &node.auth_hook {
        // The token verified: waiting for the backend is no reason to be dropped as a slow client.
        if let Some(pending) = pending {
            pending.authenticated();
        }
        topics = ask_hook(node, hook, &grant, topics, client).await?;
    }
    let mut channels: Vec<ChannelName> = Vec::with_capacity(topics.len() + 2);
    channels.push(node.channels.user(grant.user.as_str()));
    channels.push(node.channels.broadcast());
    channels.extend(topics.iter().map(|t| node.channels.topic(t)));
    // Last: a single-use token is spent only by a request that would otherwise be served.
    super::ticket::spend(node, &grant, source).await?;
    Ok(Authorized { grant, topics, channels, query })
}

/// The topics the connect authorization hook lets the stream join, or its refusal. Before the
/// ticket is spent: a stream the backend refuses has not used up its single-use token.
async fn ask_hook(
    node: &Node,
    hook: &AuthHook,
    grant: &Grant,
    topics: Vec<String>,
    client: IpAddr,
) -> Result<Vec<String>, ApiError> {
    // Always kept when a hook is configured (`auth`); `null` would tell the backend it was not.
    let claims = grant.claims.as_deref().unwrap_or(RawValue::NULL);
    let request = HookRequest { user: grant.user.as_str(), topics: &topics, claims, ip: client };
    match hook.decide(&request).await {
        Decision::Allow(allowed) => Ok(allowed),
        Decision::Deny { status, reason } => {
            node.hub_metrics.rejected("auth_hook_denied");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            Err(ApiError::Denied { status, code: "auth_hook_denied", message: reason })
        }
        Decision::Unavailable(failure) => {
            node.hub_metrics.rejected("auth_hook_unavailable");
            Err(ApiError::unavailable("auth_hook_unavailable", failure.to_string()))
        }
    }
}

/// The `sse_connections_rejected_total` reason of a refused token.
fn rejection(error: &ApiError) -> &'static str {
    match error {
        ApiError::Unavailable { code, .. } => code,
        _ => "unauthorized",
    }
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
            jti: None,
            claims: None,
        }
    }

    fn bad_field(query: &str) -> String {
        match StreamQuery::parse(Some(query)) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected a 400 for {query}, got {other:?}"),
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_topics_repeat() {
        let q = StreamQuery::parse(Some("topic=a&topic=b%3A1&access_token=t.k.n&lastEventId=x%20y&other=1"))
            .expect("valid");
        assert_eq!(q.topics, ["a", "b:1"]);
        assert_eq!(q.last_event_id.as_deref(), Some("x y"));
        assert_eq!(StreamQuery::parse(None).expect("valid"), StreamQuery::default());
        assert_eq!(StreamQuery::parse(Some("topic=a%25ZZ")).expect("valid").topics, ["a%ZZ"]);
    }

    #[test]
    fn an_invalid_escape_is_a_400_not_another_topic() {
        assert_eq!(bad_field("topic=a%ZZ"), "topic");
        assert_eq!(bad_field("topic=ok&topic=a%"), "topic");
        assert_eq!(bad_field("topic=a%FF"), "topic");
        assert_eq!(bad_field("topic=a%C3%28"), "topic");
        assert_eq!(bad_field("lastEventId=%E2%82"), "lastEventId");
        assert_eq!(bad_field("after=%G0"), "after");
        assert_eq!(bad_field("to%pic=a"), "query");
    }

    proptest::proptest! {
        #[test]
        fn any_query_parses_or_is_a_400(query in proptest::prelude::any::<String>()) {
            match StreamQuery::parse(Some(&query)) {
                Ok(_) | Err(ApiError::BadRequest { .. }) => {}
                Err(other) => proptest::prop_assert!(false, "{other:?}"),
            }
        }
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
