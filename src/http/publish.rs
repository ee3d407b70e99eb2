//! `POST /api/publish`: one message to any mix of users, topics and broadcast, from a
//! publisher token. The request is checked field by field so a 400 names what is wrong; the
//! envelope is written once, with the request's `data` as it came (byte for byte, like a
//! producer's own `PUBLISH`), and published to every channel in one batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use serde::Serialize;
use serde_json::error::Category;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::{Instrument, Span};

use super::error::{ApiError, publish_failed};
use super::grant::Access;
use crate::auth::Role;
use crate::channel::{ChannelName, ChannelNames, check_name};
use crate::envelope::{Refusal, checked_event_name, checked_id};
use crate::node::Node;
use crate::telemetry;

/// Targets one request may name; a larger fan-out should publish to a topic instead.
pub const MAX_TARGETS: usize = 10_000;

/// A checked publish request.
#[derive(Debug, PartialEq)]
pub struct PublishRequest {
    pub users: Vec<String>,
    pub topics: Vec<String>,
    pub broadcast: bool,
    /// Record in history (default when history is on).
    pub durable: bool,
    /// The envelope producers would publish to Redis themselves, as JSON text.
    pub envelope: String,
}

/// The request's fields as written; only `data` stays so, the others are read as values.
type Fields<'a> = BTreeMap<String, &'a RawValue>;

/// What is published: `data` is the request's JSON text, untouched.
#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

impl PublishRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut fields: Fields<'_> = serde_json::from_slice(body).map_err(|e| match e.classify() {
            Category::Data => ApiError::bad_request("body", "expected a JSON object"),
            _ => ApiError::bad_request("body", format!("not JSON: {e}")),
        })?;
        let users = names(&mut fields, "users")?;
        let topics = names(&mut fields, "topics")?;
        let broadcast = flag(&mut fields, "broadcast", false)?;
        let durable = flag(&mut fields, "durable", true)?;
        if users.is_empty() && topics.is_empty() && !broadcast {
            return Err(ApiError::bad_request("users", "name at least one target: users, topics or broadcast"));
        }
        if users.len() + topics.len() > MAX_TARGETS {
            return Err(ApiError::bad_request("users", format!("at most {MAX_TARGETS} users and topics per request")));
        }
        let data = fields.remove("data").ok_or_else(|| ApiError::bad_request("data", "missing (any JSON value)"))?;
        // A string is delivered as its text, so it must have one: JSON's grammar lets an
        // escape name half a UTF-16 pair (`"\ud800"`), which no UTF-8 text holds.
        if data.get().starts_with('"') && serde_json::from_str::<String>(data.get()).is_err() {
            return Err(ApiError::bad_request("data", "a string must be valid Unicode (no lone surrogate escape)"));
        }
        let event = line_field(&mut fields, "event", checked_event_name)?;
        let id = line_field(&mut fields, "id", checked_id)?;
        if let Some(unknown) = fields.keys().next() {
            return Err(ApiError::bad_request(unknown.clone(), "unknown field"));
        }
        let envelope = serde_json::to_string(&Envelope { event, data, id })
            .map_err(|e| ApiError::bad_request("data", format!("cannot be published: {e}")))?;
        Ok(Self { users, topics, broadcast, durable, envelope })
    }

    pub fn channels(&self, names: &ChannelNames) -> Vec<ChannelName> {
        let mut channels: Vec<ChannelName> = self.users.iter().map(|u| names.user(u)).collect();
        channels.extend(self.topics.iter().map(|t| names.topic(t)));
        if self.broadcast {
            channels.push(names.broadcast());
        }
        channels.sort();
        channels.dedup();
        channels
    }
}

/// Takes `field` out of the request, read as a JSON value.
fn take(fields: &mut Fields<'_>, field: &'static str) -> Result<Option<Value>, ApiError> {
    let Some(raw) = fields.remove(field) else { return Ok(None) };
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(|e| ApiError::bad_request(field, format!("not a valid JSON value: {e}")))
}

/// An optional boolean field.
fn flag(fields: &mut Fields<'_>, field: &'static str, default: bool) -> Result<bool, ApiError> {
    match take(fields, field)? {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(ApiError::bad_request(field, "expected true or false")),
    }
}

/// An optional string field that will be written on an SSE line (`event:`, `id:`).
fn line_field(
    fields: &mut Fields<'_>,
    field: &'static str,
    check: fn(String) -> Result<String, Refusal>,
) -> Result<Option<String>, ApiError> {
    match take(fields, field)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => check(value)
            .map(Some)
            .map_err(|_| ApiError::bad_request(field, "must not contain line breaks or NUL, at most 256 bytes")),
        Some(_) => Err(ApiError::bad_request(field, "expected a string")),
    }
}

fn names(fields: &mut Fields<'_>, field: &'static str) -> Result<Vec<String>, ApiError> {
    match take(fields, field)? {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let name = match item {
                    Value::String(s) => s,
                    Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
                    _ => return Err(ApiError::bad_request(format!("{field}[{i}]"), "expected a string")),
                };
                check_name(&name).map_err(|e| ApiError::bad_request(format!("{field}[{i}]"), e.to_string()))?;
                Ok(name)
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(field, "expected an array of strings")),
    }
}

/// Everything the headers can tell is checked before the body is read: the token (by the
/// [`Access`] extractor), where it came from, its role and the content type. A client that
/// may not publish is answered at once instead of being waited for while it sends a body (up
/// to `SSE_REQUEST_TIMEOUT`). Only a Bearer token and a JSON body are taken: a form a page on
/// another site could send without CORS asking first (`text/plain`, a cookie) never publishes.
///
/// Traced as `publish`, continuing the request's `traceparent` ([`telemetry`]); the token's
/// refusal is taken here rather than by the extractor so that it is traced too.
pub async fn publish(
    State(node): State<Arc<Node>>,
    access: Result<Access, ApiError>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let span = telemetry::publish_span(&node.node_id);
    telemetry::continue_trace(&span, &headers);
    let answer = publish_traced(&node, access, &headers, request, &span).instrument(span.clone()).await;
    match &answer {
        Ok((status, _)) => telemetry::record_answer(&span, status.as_u16(), None),
        Err(e) => telemetry::record_answer(&span, e.status().as_u16(), Some(e.code())),
    }
    answer
}

/// [`publish`] inside its span.
async fn publish_traced(
    node: &Arc<Node>,
    access: Result<Access, ApiError>,
    headers: &HeaderMap,
    request: Request,
    span: &Span,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let grant = access?.bearer_only()?.require(Role::Publisher)?;
    span.record("enduser.id", grant.user.as_str());
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType { expected: "application/json" });
    }
    // Within the route's DefaultBodyLimit, which the request carries.
    let body = Bytes::from_request(request, node).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: node.config.max_publish_bytes as usize }
        } else {
            ApiError::bad_request("body", rejection.body_text())
        }
    })?;
    let request = PublishRequest::parse(&body)?;
    let channels = request.channels(&node.channels);
    span.record("publish.users", request.users.len());
    span.record("publish.topics", request.topics.len());
    span.record("publish.broadcast", request.broadcast);
    span.record("channels.count", channels.len());
    let payload = Bytes::from(request.envelope);
    let durable = request.durable && node.resume.is_some();
    span.record("publish.durable", durable);
    let receipt = node.hub.bus().publish(&channels, payload, durable).await.map_err(publish_failed)?;
    node.publish_requests.increment(1);
    let body = serde_json::to_value(&receipt).unwrap_or_else(|_| json!({"channels": receipt.channels}));
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// `Content-Type: application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    value.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match PublishRequest::parse(body.as_bytes()) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_becomes_one_envelope_and_deduplicated_channels() {
        let request = PublishRequest::parse(
            br#"{"users":["42","43",44,"42"],"topics":["rounds:roulette:7"],"broadcast":true,"event":"notification","data":{"x":1},"id":"9"}"#,
        )
        .expect("valid");
        assert_eq!(request.envelope, r#"{"event":"notification","data":{"x":1},"id":"9"}"#);
        let channels: Vec<String> =
            request.channels(&ChannelNames::new("sse")).iter().map(|c| c.as_str().to_owned()).collect();
        assert_eq!(
            channels,
            ["sse:broadcast", "sse:topic:rounds:roulette:7", "sse:user:42", "sse:user:43", "sse:user:44"]
        );
    }

    #[test]
    fn only_json_bodies_are_taken() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static(value));
            is_json(&headers)
        };
        assert!(with("application/json") && with("Application/JSON; charset=utf-8"));
        assert!(!with("text/plain") && !with("application/x-www-form-urlencoded") && !with("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn a_400_names_the_bad_field() {
        assert_eq!(field_of("not json"), "body");
        assert_eq!(field_of("[1]"), "body");
        assert_eq!(field_of(r#"{"data":1}"#), "users");
        assert_eq!(field_of(r#"{"broadcast":true}"#), "data");
        assert_eq!(field_of(r#"{"users":"42","data":1}"#), "users");
        assert_eq!(field_of(r#"{"users":["ok","bad id"],"data":1}"#), "users[1]");
        assert_eq!(field_of(r#"{"topics":[true],"data":1}"#), "topics[0]");
        assert_eq!(field_of(r#"{"broadcast":"yes","data":1}"#), "broadcast");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"durable":"no"}"#), "durable");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"event":"a\nb"}"#), "event");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"event":3}"#), "event");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"id":"a\rb"}"#), "id");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"colour":"red"}"#), "colour");
        assert_eq!(field_of(r#"{"broadcast":true,"data":"\ud800"}"#), "data");
        assert_eq!(field_of(r#"{"broadcast":true,"data":1,"event":"\udc00"}"#), "event");
    }

    #[test]
    fn data_is_published_as_written() {
        for (body, envelope, delivered) in [
            (
                r#"{"broadcast":true,"data":{"id":42,"text":"x","list":[1]},"event":"e"}"#,
                r#"{"event":"e","data":{"id":42,"text":"x","list":[1]}}"#,
                r#"{"id":42,"text":"x","list":[1]}"#,
            ),
            (
                r#"{"data": 123456789012345678901234567890 ,"topics":["t"]}"#,
                r#"{"data":123456789012345678901234567890}"#,
                "123456789012345678901234567890",
            ),
            ("{\"data\":{\n  \"a\": 1.0\n},\"users\":[\"u\"]}", "{\"data\":{\n  \"a\": 1.0\n}}", "{\n  \"a\": 1.0\n}"),
            (
                r#"{"data":"caf\u00e9 \"q\"","users":["u"],"id":"7"}"#,
                r#"{"data":"caf\u00e9 \"q\"","id":"7"}"#,
                "café \"q\"",
            ),
            (r#"{"data":{"n":"\ud800"},"users":["u"]}"#, r#"{"data":{"n":"\ud800"}}"#, r#"{"n":"\ud800"}"#),
        ] {
            let request = PublishRequest::parse(body.as_bytes()).expect("valid");
            assert_eq!(request.envelope, envelope);
            let message = crate::envelope::parse(request.envelope.as_bytes()).expect("deliverable");
            assert_eq!(message.data, delivered);
        }
    }

    #[test]
    fn invisible_characters_in_targets_are_refused() {
        assert_eq!(field_of(r#"{"users":["42","ad\u200bmin"],"data":1}"#), "users[1]");
        assert_eq!(field_of("{\"users\":[\"42\u{202E}\"],\"data\":1}"), "users[0]");
        assert_eq!(field_of(r#"{"topics":["\ufeffnews"],"data":1}"#), "topics[0]");
        assert_eq!(field_of(r#"{"topics":["a\u2066b\u2069"],"data":1}"#), "topics[0]");
    }
}
