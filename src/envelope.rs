//! What a producer publishes: the envelope `{"event": .., "data": .., "id": ..}` or any other
//! payload, which is delivered verbatim as the data of a `message` event.
//!
//! Parsing happens once per message on the node, never per connection. Anything that could
//! break the SSE framing (a line break in an event name or id) is refused here with a reason
//! the caller counts; refused messages are never written to a stream.
//!
//! `data` is passed through as the producer wrote it: a string is sent as its text, any other
//! value as its JSON text, byte for byte (key order, number spelling, escapes and whitespace
//! kept; `123456789012345678901234567890` stays that, not `1.2345678901234568e+29`). The
//! object is scanned, not built: the fields are borrowed slices of the payload
//! ([`RawValue`]), so a message costs no allocation unless a string field holds an escape, and
//! a string `data` is decoded as it is read, never scanned twice. Measured per message with
//! its framing, in instructions against the `Value` parse and re-serialisation this replaced:
//! 0.2-0.45x for object data, 0.8-0.95x for unescaped strings, 1.0x for escaped ones.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

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
    read(text, data_looks_like_a_string(text))
}

/// Reads an envelope. A string `data` is decoded as the object is read when `string_data` is
/// guessed: taking it raw and decoding it after would scan it twice. A wrong guess costs a
/// second read (of the object up to `data`), never a different answer.
fn read(text: &str, string_data: bool) -> Result<Message<'_>, Refusal> {
    let fields = match string_data.then(|| fields(text, DataAs::Text)) {
        Some(Ok(fields)) => fields,
        _ => match fields(text, DataAs::Raw) {
            Ok(fields) => fields,
            Err(_) => return Ok(verbatim(text)),
        },
    };
    let Some(data) = fields.data else {
        return Ok(verbatim(text));
    };
    // A string field whose escapes do not decode (a lone surrogate, `"\ud800"`) makes the payload
    // no envelope, as it would for any strict JSON parser.
    let event = match fields.event.map(Json::of) {
        None | Some(Json::Null) => None,
        Some(Json::String(None)) => return Ok(verbatim(text)),
        Some(Json::String(Some(name))) if name.is_empty() => None,
        Some(Json::String(Some(name))) => Some(checked_event_name(name)?),
        Some(Json::Other(_)) => return Err(Refusal::EventNotString),
    };
    let id = match fields.id.map(Json::of) {
        None | Some(Json::Null) => None,
        Some(Json::String(None)) => return Ok(verbatim(text)),
        Some(Json::String(Some(id))) => Some(checked_id(id)?),
        // JSON has one spelling per integer (no `+`, no leading zero), so the text is the id.
        Some(Json::Other(n)) if is_integer(n) => Some(Cow::Borrowed(n)),
        Some(Json::Other(_)) => return Err(Refusal::IdNotString),
    };
    let data = match data {
        Data::Text(text) => text,
        Data::Raw(raw) => match Json::of(raw) {
            Json::String(Some(text)) => text,
            Json::String(None) => return Ok(verbatim(text)),
            Json::Null | Json::Other(_) => Cow::Borrowed(raw.get()),
        },
    };
    Ok(Message { event, data, id })
}

/// Whether the first `"data"` in the text is followed by `:` and a string: only a guess (it
/// could be inside another value), which decides how [`read`] starts, not what it answers.
fn data_looks_like_a_string(text: &str) -> bool {
    let json_space: &[char] = &[' ', '\t', '\n', '\r'];
    let Some(at) = text.find(r#""data""#) else { return false };
    let rest = text[at + 6..].trim_start_matches(json_space);
    rest.strip_prefix(':').is_some_and(|rest| rest.trim_start_matches(json_space).starts_with('"'))
}

fn verbatim(text: &str) -> Message<'_> {
    Message { event: None, data: Cow::Borrowed(text), id: None }
}

/// An event name that is safe to write after `event: `.
pub fn checked_event_name<S: AsRef<str>>(name: S) -> Result<S, Refusal> {
    let text = name.as_ref();
    if text.len() > MAX_EVENT_NAME_LEN || has_line_break_or_nul(text) {
        return Err(Refusal::BadEventName);
    }
    Ok(name)
}

/// An id that is safe to write after `id: ` (the SSE spec ignores ids containing NUL).
pub fn checked_id<S: AsRef<str>>(id: S) -> Result<S, Refusal> {
    let text = id.as_ref();
    if text.len() > MAX_ID_LEN || has_line_break_or_nul(text) {
        return Err(Refusal::BadId);
    }
    Ok(id)
}

fn has_line_break_or_nul(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'\n' | b'\r' | 0))
}

/// An integer as serde_json reads one into an `i64` or a `u64` (not `1.0`, `1e3` or `-0`,
/// which it reads as floats).
fn is_integer(json: &str) -> bool {
    serde_json::from_str::<u64>(json).is_ok() || serde_json::from_str::<i64>(json).is_ok()
}

/// The envelope's fields as the producer wrote them; any other field is skipped unread. A
/// repeated field keeps its last value, as a JSON object read into a map does.
#[derive(Default)]
struct Fields<'a> {
    event: Option<&'a RawValue>,
    data: Option<Data<'a>>,
    id: Option<&'a RawValue>,
}

enum Data<'a> {
    /// The value's JSON text.
    Raw(&'a RawValue),
    /// A string's text, decoded as it was read.
    Text(Cow<'a, str>),
}

/// How [`fields`] takes `data`: as its JSON text, or as a string (any other value is then an
/// error, and the read stops there).
#[derive(Clone, Copy)]
enum DataAs {
    Raw,
    Text,
}

/// A string borrowed from the payload when it holds no escape.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// A field name, matched without allocating.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Event,
    Data,
    Id,
    #[serde(other)]
    Other,
}

/// Reads the envelope's fields from a whole text (anything after the object is an error).
fn fields(text: &str, data_as: DataAs) -> Result<Fields<'_>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let fields = deserializer.deserialize_map(FieldsVisitor(data_as))?;
    deserializer.end()?;
    Ok(fields)
}

struct FieldsVisitor(DataAs);

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Event => fields.event = Some(map.next_value()?),
                Key::Id => fields.id = Some(map.next_value()?),
                Key::Data => {
                    fields.data = Some(match self.0 {
                        DataAs::Raw => Data::Raw(map.next_value()?),
                        DataAs::Text => Data::Text(map.next_value::<Text<'de>>()?.0),
                    })
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// One field's JSON value, classified by its text.
enum Json<'a> {
    Null,
    /// A string's decoded text: borrowed when it holds no escape; `None` when its escapes do not
    /// decode to UTF-8 (a lone surrogate).
    String(Option<Cow<'a, str>>),
    /// Any other value's JSON text.
    Other(&'a str),
}

impl<'a> Json<'a> {
    fn of(raw: &'a RawValue) -> Self {
        let json = raw.get();
        if json == "null" {
            return Json::Null;
        }
        // A raw value is valid JSON with no surrounding whitespace: a string is `"..."`.
        let Some(inner) = json.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
            return Json::Other(json);
        };
        if !inner.contains('\\') {
            return Json::String(Some(Cow::Borrowed(inner)));
        }
        Json::String(serde_json::from_str::<String>(json).ok().map(Cow::Owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, spec};
    use proptest::prelude::*;
    use serde_json::Value;

    fn owned(m: Message<'_>) -> (Option<String>, String, Option<String>) {
        (m.event.map(Cow::into_owned), m.data.into_owned(), m.id.map(Cow::into_owned))
    }

    /// The data of `payload`, after checking that both ways [`read`] can start agree.
    fn data_of(payload: &str) -> String {
        let message = parse(payload.as_bytes()).expect("valid");
        assert_eq!(read(payload, true), read(payload, false), "{payload}");
        message.data.into_owned()
    }

    #[test]
    fn envelope_fields_are_read() {
        let m = parse(br#"{"event":"notification","data":{"a":1, "b": [1, 2]},"id":"7"}"#).expect("valid");
        assert_eq!(owned(m), (Some("notification".into()), r#"{"a":1, "b": [1, 2]}"#.into(), Some("7".into())));
    }

    #[test]
    fn json_data_is_passed_through_as_written() {
        for data in [
            r#"{"id":42,"text":"hi","list":[3,1,2]}"#,
            r#"{"z":1,"a":{"y":2,"b":3}}"#,
            "123456789012345678901234567890",
            "1.0",
            "1e3",
            "-0",
            "1e400",
            r#"["caf\u00e9","\/","\ud83d\ude80"]"#,
            "{\n  \"pretty\": [\n    1,\n    2\n  ]\n}",
            "{ }",
            "true",
            "null",
        ] {
            assert_eq!(data_of(&format!(r#"{{"event":"e","data":{data},"id":"1"}}"#)), data, "{data}");
            assert_eq!(data_of(&format!("{{ \"data\" :\t{data}\n}}")), data, "{data}");
        }
    }

    #[test]
    fn a_wrong_guess_at_the_kind_of_data_changes_nothing() {
        for (payload, guess, data) in [
            (r#"{"data":"text"}"#, true, "text"),
            (r#"{ "data" :  "spaced"}"#, true, "spaced"),
            (r#"{"data":{"a":1}}"#, false, r#"{"a":1}"#),
            (r#"{"event":"data","data":{"a":1}}"#, false, r#"{"a":1}"#),
            (r#"{"x":{"data":"inner"},"data":{"a":1}}"#, true, r#"{"a":1}"#),
            (r#"{"data":{"a":1},"data":"last"}"#, false, "last"),
            (r#"{"data":"first","data":[2]}"#, true, "[2]"),
            (r#"{"d\u0061ta":"escaped key"}"#, false, "escaped key"),
        ] {
            assert_eq!(data_looks_like_a_string(payload), guess, "{payload}");
            assert_eq!(data_of(payload), data, "{payload}");
        }
    }

    #[test]
    fn string_data_is_sent_as_its_text() {
        let m = parse(br#"{"data":"hello \"world\"\nline two \u00e9"}"#).expect("valid");
        assert_eq!(owned(m), (None, "hello \"world\"\nline two é".into(), None));
    }

    #[test]
    fn fields_are_borrowed_from_the_payload_unless_escaped() {
        let m = parse(br#"{"event":"e","data":{"k":"\n"},"id":"7"}"#).expect("valid");
        assert!(matches!(
            (&m.event, &m.data, &m.id),
            (Some(Cow::Borrowed(_)), Cow::Borrowed(_), Some(Cow::Borrowed(_)))
        ));
        let m = parse(br#"{"data":"plain"}"#).expect("valid");
        assert!(matches!(m.data, Cow::Borrowed("plain")));
        let m = parse(br#"{"event":"\u0065","data":"a\tb"}"#).expect("valid");
        assert_eq!(owned(m), (Some("e".into()), "a\tb".into(), None));
    }

    #[test]
    fn numeric_ids_and_null_fields_are_accepted() {
        let m = parse(br#"{"event":null,"data":null,"id":12}"#).expect("valid");
        assert_eq!(owned(m), (None, "null".into(), Some("12".into())));
        let m = parse(br#"{"data":1,"id":-18446744073709551615}"#);
        assert_eq!(m, Err(Refusal::IdNotString), "below i64: a float to JSON readers");
        let m = parse(br#"{"data":1,"id":18446744073709551615}"#).expect("valid");
        assert_eq!(m.id.as_deref(), Some("18446744073709551615"));
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value_and_other_fields_are_skipped() {
        let m = parse(br#"{"event":"a","data":1,"event":"b","data":{"x":[2]},"extra":{"data":3}}"#).expect("valid");
        assert_eq!(owned(m), (Some("b".into()), r#"{"x":[2]}"#.into(), None));
        let m = parse(br#"{"d\u0061ta":"escaped key"}"#).expect("valid");
        assert_eq!(owned(m), (None, "escaped key".into(), None));
    }

    #[test]
    fn anything_else_is_delivered_verbatim() {
        for payload in [
            "plain text",
            "[1,2]",
            "42",
            r#"{"no_data":1}"#,
            "{not json",
            "  {\"event\":\"x\"}",
            r#"{"data":1} trailing"#,
            r#"{"data":"\ud800"}"#,
            r#"{"event":"\udc00","data":1}"#,
            r#"{"data":1,"id":"\ud800"}"#,
            r#"{"data":"a","x":"\q"}"#,
        ] {
            let m = parse(payload.as_bytes()).expect("verbatim");
            assert_eq!(owned(m), (None, payload.to_owned(), None), "{payload}");
        }
    }

    #[test]
    fn deep_nesting_is_data_like_any_other() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(data_of(&format!(r#"{{"data":{deep}}}"#)).len(), deep.len());
    }

    #[test]
    fn injection_attempts_are_refused() {
        assert_eq!(parse(br#"{"event":"a\nb","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"event":"a\rdata: x","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"event":"a\u0000","data":1}"#), Err(Refusal::BadEventName));
        assert_eq!(parse(br#"{"data":1,"id":"1\n\nevent: evil"}"#), Err(Refusal::BadId));
        assert_eq!(parse(br#"{"event":5,"data":1}"#), Err(Refusal::EventNotString));
        assert_eq!(parse(br#"{"data":1,"id":1.5}"#), Err(Refusal::IdNotString));
        assert_eq!(parse(br#"{"data":1,"id":1e3}"#), Err(Refusal::IdNotString));
        assert_eq!(parse(br#"{"data":1,"id":[1]}"#), Err(Refusal::IdNotString));
        assert_eq!(parse(b"\xff\xfe"), Err(Refusal::NotUtf8));
        let long = format!(r#"{{"event":"{}","data":1}}"#, "e".repeat(MAX_EVENT_NAME_LEN + 1));
        assert_eq!(parse(long.as_bytes()), Err(Refusal::BadEventName));
        let long = format!(r#"{{"id":"{}","data":1}}"#, "1".repeat(MAX_ID_LEN + 1));
        assert_eq!(parse(long.as_bytes()), Err(Refusal::BadId));
    }

    /// Any JSON value, numbers of every kind included.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// An `event` or `id` field: a likely name, anything at all, or another kind of value.
    fn line_field() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => "[a-z0-9:._-]{0,12}".prop_map(Value::from),
            2 => any::<String>().prop_map(Value::from),
            1 => Just(Value::Null),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => json_value(),
        ]
    }

    /// JSON text of `value`, compact or pretty (line breaks and indentation inside).
    fn written(value: &Value, pretty: bool) -> String {
        if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) }.expect("serialisable")
    }

    /// What the rules say a message with these fields becomes: (event, data, id) or a refusal.
    fn expected(
        event: Option<&Value>,
        data: (&Value, &str),
        id: Option<&Value>,
    ) -> Result<(Option<String>, String, Option<String>), Refusal> {
        let line_ok = |s: &str, max: usize| s.len() <= max && !s.contains(['\n', '\r', '\0']);
        let event = match event {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if line_ok(s, MAX_EVENT_NAME_LEN) => Some(s.clone()),
            Some(Value::String(_)) => return Err(Refusal::BadEventName),
            Some(_) => return Err(Refusal::EventNotString),
        };
        let id = match id {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if line_ok(s, MAX_ID_LEN) => Some(s.clone()),
            Some(Value::String(_)) => return Err(Refusal::BadId),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            Some(_) => return Err(Refusal::IdNotString),
        };
        let data = match data {
            (Value::String(s), _) => s.clone(),
            (_, text) => text.to_owned(),
        };
        Ok((event, data, id))
    }

    proptest! {
        /// Against serde_json's own decoding of every string JSON's grammar allows, escapes of
        /// half a UTF-16 pair included.
        #[test]
        fn any_json_string_decodes_as_serde_json_decodes_it(
            inner in r#"([^"\\\u{0}-\u{1f}]|\\["\\/bfnrt]|\\u(d[89ab]|D[89AB]|d[c-f]|D[C-F]|[0-9a-fA-F]{2})[0-9a-fA-F]{2}){0,24}"#,
        ) {
            let json = format!("\"{inner}\"");
            let payload = format!(r#"{{"data":{json}}}"#);
            let expected = serde_json::from_str::<String>(&json).unwrap_or_else(|_| payload.clone());
            for string_data in [true, false] {
                let message = read(&payload, string_data).expect("an envelope or verbatim");
                prop_assert_eq!(&*message.data, expected.as_str(), "a string that does not decode leaves the payload verbatim");
            }
            for field in ["event", "id"] {
                let payload = format!(r#"{{"{field}":{json},"data":1}}"#);
                let verbatim = serde_json::from_str::<String>(&json).is_err();
                prop_assert_eq!(parse(payload.as_bytes()).is_ok_and(|m| m.data == payload), verbatim, "{}", payload);
            }
        }

        #[test]
        fn any_bytes_are_delivered_or_refused_without_panicking(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&payload);
        }

        #[test]
        fn anything_shaped_like_an_envelope_parses_without_panicking(
            payload in r#"\{(\s*"(event|data|id|x|d\\u0061ta)"\s*:\s*("([^"\\]|\\.)*"|-?[0-9.eE+-]+|null|true|\[|\{|\]|\})\s*,?)*\}?"#,
        ) {
            if let Ok(message) = parse(payload.as_bytes()) {
                let _ = frame::event(message.event.as_deref(), message.id.as_deref(), &message.data);
            }
            prop_assert_eq!(read(&payload, true).map(owned), read(&payload, false).map(owned));
        }

        /// A valid envelope, written in any field order, compact or pretty, with or without other
        /// fields, becomes the message the rules say, and a browser reads back its data exactly:
        /// a string's text, any other value's JSON as the producer wrote it.
        #[test]
        fn envelopes_round_trip_to_the_frames_expected(
            event in proptest::option::of(line_field()),
            data in json_value(),
            id in proptest::option::of(line_field()),
            extra in proptest::option::of(json_value()),
            pretty in any::<bool>(),
            order in Just([0usize, 1, 2, 3]).prop_shuffle(),
        ) {
            let data_text = written(&data, pretty);
            let mut fields = Vec::new();
            for field in order {
                match field {
                    0 => fields.extend(event.as_ref().map(|e| format!(r#""event":{}"#, written(e, pretty)))),
                    1 => fields.push(format!(r#""data":{data_text}"#)),
                    2 => fields.extend(id.as_ref().map(|i| format!(r#""id":{}"#, written(i, pretty)))),
                    _ => fields.extend(extra.as_ref().map(|x| format!(r#""extra":{}"#, written(x, pretty)))),
                }
            }
            let payload = format!("{{{}}}", fields.join(if pretty { ",\n  " } else { "," }));
            let rules = expected(event.as_ref(), (&data, &data_text), id.as_ref());
            let parsed = parse(payload.as_bytes()).map(owned);
            prop_assert_eq!(&parsed, &rules, "{}", payload);
            prop_assert_eq!(&read(&payload, !data.is_string()).map(owned), &rules, "the other read: {}", payload);
            if let Ok((event, data, id)) = parsed {
                let framed = frame::event(event.as_deref(), id.as_deref(), &data);
                let read = spec::read(std::str::from_utf8(&framed).expect("UTF-8"));
                let name = event.unwrap_or_else(|| "message".to_owned());
                prop_assert_eq!(read, [spec::Event { event: name, data: spec::normalised(&data), id }]);
            }
        }
    }
}
