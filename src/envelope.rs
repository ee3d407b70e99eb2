//! What a producer publishes: the envelope `{"event": .., "data": .., "id": ..}` or any other
//! payload, which is delivered verbatim as the data of a `message` event.
//!
//! Parsing happens once per message on the node, never per connection. Anything that could
//! break the SSE framing (a line break in an event name or id) is refused here with a reason
//! the caller counts; refused messages are never written to a stream.

use std::borrow::Cow;

use serde_json::Value;

/// Longest event name accepted; browsers accept more, but a name this long is a producer bug.
pub const MAX_EVENT_NAME_LEN: usize = 256;
/// Longest producer id accepted.
pub const MAX_ID_LEN: usize = 256;

/// A message ready to be framed: borrowed from the payload where it can be.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub event: Option<Cow<'a, str>>,
    pub data: Cow<'a, str>,
    pub id: Option<Cow<'a, str>>,
}

/// Why a payload was not delivered. The label names the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("event name is not a string")]
    EventNotString,
    #[error("event name contains a line break, NUL, or is too long")]
    BadEventName,
    #[error("id is not a string or an integer")]
    IdNotString,
    #[error("id contains a line break, NUL, or is too long")]
    BadId,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotUtf8 => "not_utf8",
            Refusal::EventNotString => "event_not_string",
            Refusal::BadEventName => "bad_event_name",
            Refusal::IdNotString => "id_not_string",
            Refusal::BadId => "bad_id",
        }
    }
}

/// Reads a payload as published to a channel.
pub fn parse(payload: &[u8]) -> Result<Message<'_>, Refusal> {
    let text = std::str::from_utf8(payload).map_err(|_| Refusal::NotUtf8)?;
    // Only something that looks like a JSON object can be an envelope; skip the parse otherwise.
    if !text.trim_start().starts_with('{') {
        return Ok(verbatim(text));
    }
    let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text) else {
        return Ok(verbatim(text));
    };
    let Some(data) = object.remove("data") else {
        return Ok(verbatim(text));
    };
    let event = match object.remove("event") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if name.is_empty() => None,
        Some(Value::String(name)) => Some(Cow::Owned(checked_event_name(name)?)),
        Some(_) => return Err(Refusal::EventNotString),
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(Cow::Owned(checked_id(id)?)),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Cow::Owned(n.to_string())),
        Some(_) => return Err(Refusal::IdNotString),
    };
    let data = match data {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Ok(Message { event, data: Cow::Owned(data), id })
}

fn verbatim(text: &str) -> Message<'_> {
    Message { event: None, data: Cow::Borrowed(text), id: None }
}

/// An event name that is safe to write after `event: `.
pub fn checked_event_name(name: String) -> Result<String, Refusal> {
    if name.len() > MAX_EVENT_NAME_LEN || has_line_break_or_nul(&name) {
        return Err(Refusal::BadEventName);
    }
    Ok(name)
}

/// An id that is safe to write after `id: ` (the SSE spec ignores ids containing NUL).
pub fn checked_id(id: String) -> Result<String, Refusal> {
    if id.len() > MAX_ID_LEN || has_line_break_or_nul(&id) {
        return Err(Refusal::BadId);
    }
    Ok(id)
}

fn has_line_break_or_nul(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'\n' | b'\r' | 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(m: Message<'_>) -> (Option<String>, String, Option<String>) {
        (m.event.map(Cow::into_owned), m.data.into_owned(), m.id.map(Cow::into_owned))
    }

    #[test]
    fn envelope_fields_are_read() {
        let m = parse(br#"{"event":"notification","data":{"a":1, "b": [1, 2]},"id":"7"}"#).expect("valid");
        assert_eq!(owned(m), (Some("notification".into()), r#"{"a":1,"b":[1,2]}"#.into(), Some("7".into())));
    }

    #[test]
    fn string_data_is_sent_as_it_is() {
        let m = parse(br#"{"data":"hello \"world\"\nline two"}"#).expect("valid");
        assert_eq!(owned(m), (None, "hello \"world\"\nline two".into(), None));
    }

    #[test]
    fn numeric_ids_and_null_fields_are_accepted() {
        let m = parse(br#"{"event":null,"data":null,"id":12}"#).expect("valid");
        assert_eq!(owned(m), (None, "null".into(), Some("12".into())));
    }

    #[test]
    fn anything_else_is_delivered_verbatim() {
        for payload in ["plain text", "[1,2]", "42", r#"{"no_data":1}"#, "{not json", "  {\"event\":\"x\"}"] {
            let m = parse(payload.as_bytes()).expect("verbatim");
            assert_eq!(owned(m), (None, payload.to_owned(), None), "{payload}");
        }
    }

    #[test]
    fn injection_attempts_are_refused() {
        assert_eq!(parse(br#"{"event":"a\nb","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"event":"a\rdata: x","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"event":"a\u0000","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"data":1,"id":"1\n\nevent: evil"}"#), Err(Refusal::BadId));
        assert_eq!(parse(br#"{"event":5,"data":1}"#), Err(Refusal::EventNotString));
        assert_eq!(parse(br#"{"data":1,"id":1.5}"#), Err(Refusal::IdNotString));
        assert_eq!(parse(b"\xff\xfe"), Err(Refusal::NotUtf8));
        let long = format!(r#"{{"event":"{}","data":1}}"#, "e".repeat(MAX_EVENT_NAME_LEN + 1));
        assert_eq!(parse(long.as_bytes()), Err(Refusal::BadEventName));
    }
}
