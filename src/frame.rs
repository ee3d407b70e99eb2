//! SSE framing: one message becomes one shared `Bytes` that every connection on the channel
//! writes as it is. Framing is the only place that writes field names, so it is the only
//! place that must get line breaks right: data is split on `\r\n`, `\r` and `\n` into
//! `data:` lines, and event names and ids have been checked by [`crate::envelope`] to hold none.
//!
//! A [`Frame`] is what the hub shares between streams: the framed bytes, and, made on first use
//! by a stream that asked for gzip and then shared by all such streams, their gzip
//! [`Piece`] (see [`crate::gzip`]). Nothing is compressed per stream.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use crate::gzip::Piece;

/// One framed message as streams share it (cloning is a reference count).
#[derive(Clone)]
pub struct Frame(Arc<Shared>);

struct Shared {
    plain: Bytes,
    /// Whether gzip streams get it deflated (it is at least `SSE_COMPRESSION_MIN_SIZE` bytes)
    /// rather than stored.
    deflate: bool,
    gzip: OnceLock<Piece>,
}

impl Frame {
    /// `plain` framed bytes, deflated for gzip streams if they are at least `deflate_from` bytes.
    pub fn new(plain: Bytes, deflate_from: usize) -> Self {
        let deflate = !plain.is_empty() && plain.len() >= deflate_from;
        Self(Arc::new(Shared { plain, deflate, gzip: OnceLock::new() }))
    }

    /// The bytes a plain stream writes.
    #[inline]
    pub fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// What a gzip stream writes: made by the first stream that needs it (compressing once per
    /// message), shared by the others.
    #[inline]
    pub fn gzip(&self) -> &Piece {
        self.0
            .gzip
            .get_or_init(|| if self.0.deflate { Piece::deflated(&self.0.plain) } else { Piece::stored(&self.0.plain) })
    }
}

/// A frame of one stream's own (a farewell, a notice): small, so gzip streams get it stored.
impl From<Bytes> for Frame {
    fn from(plain: Bytes) -> Self {
        Frame::new(plain, usize::MAX)
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.plain() == other.plain()
    }
}

impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.plain().fmt(f)
    }
}

/// Frames one event. `event` and `id` must hold no line break (see `envelope::checked_*`).
pub fn event(event: Option<&str>, id: Option<&str>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + event.map_or(0, str::len) + id.map_or(0, str::len) + 32);
    if let Some(event) = event {
        put_field(&mut out, b"event: ", event);
    }
    if let Some(id) = id {
        put_field(&mut out, b"id: ", id);
    }
    put_data(&mut out, data);
    out.put_u8(b'\n');
    out.freeze()
}

/// A comment line, ignored by EventSource and used as a heartbeat.
pub fn comment(text: &str) -> Bytes {
    debug_assert!(!text.contains(['\r', '\n']));
    Bytes::from(format!(": {text}\n\n"))
}

/// Tells the client how long to wait before reconnecting.
pub fn retry(after: std::time::Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", after.as_millis()))
}

fn put_field(out: &mut BytesMut, name: &[u8], value: &str) {
    debug_assert!(!value.contains(['\r', '\n']));
    out.put_slice(name);
    out.put_slice(value.as_bytes());
    out.put_u8(b'\n');
}

fn put_data(out: &mut BytesMut, data: &str) {
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                put_data_line(out, &bytes[start..i]);
                start = i + 1;
            }
            b'\r' => {
                put_data_line(out, &bytes[start..i]);
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    put_data_line(out, &bytes[start..]);
}

fn put_data_line(out: &mut BytesMut, line: &[u8]) {
    out.put_slice(b"data: ");
    out.put_slice(line);
    out.put_u8(b'\n');
}

/// What a browser's EventSource makes of a stream, read by the tools' spec-conformant parser
/// (`sse-wire`), for tests of what this module writes.
#[cfg(test)]
pub(crate) mod spec {
    /// One dispatched event; `id` is what its own block set.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Event {
        pub event: String,
        pub data: String,
        pub id: Option<String>,
    }

    impl Event {
        pub fn new(event: &str, data: &str, id: Option<&str>) -> Self {
            Self { event: event.to_owned(), data: data.to_owned(), id: id.map(str::to_owned) }
        }
    }

    /// The events a whole stream dispatches, in order.
    pub fn read(stream: &str) -> Vec<Event> {
        let mut items = Vec::new();
        sse_wire::SseParser::new().feed_into(stream.as_bytes(), &mut items).expect("a well-formed stream");
        items
            .into_iter()
            .filter_map(|item| match item {
                sse_wire::Item::Event(e) => Some(Event { event: e.event, data: e.data, id: e.id }),
                _ => None,
            })
            .collect()
    }

    /// What a string sent as data reads back as: SSE has no way to carry a CR, every line
    /// break arrives as LF.
    pub fn normalised(data: &str) -> String {
        data.replace("\r\n", "\n").replace('\r', "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::spec::{Event, normalised, read};
    use super::*;
    use proptest::prelude::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).expect("frames are UTF-8")
    }

    #[test]
    fn every_line_break_kind_starts_a_new_data_line() {
        let frame = text(event(Some("e"), Some("1"), "a\nb\r\nc\rd"));
        assert_eq!(frame, "event: e\nid: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }

    #[test]
    fn empty_data_still_dispatches_an_event() {
        assert_eq!(text(event(None, None, "")), "data: \n\n");
        assert_eq!(read(&text(event(None, None, ""))), [Event::new("message", "", None)]);
    }

    #[test]
    fn trailing_and_doubled_line_breaks_keep_empty_lines() {
        assert_eq!(text(event(None, None, "a\n")), "data: a\ndata: \n\n");
        assert_eq!(text(event(None, None, "\r\n\r\n")), "data: \ndata: \ndata: \n\n");
    }

    #[test]
    fn an_injection_in_data_stays_data() {
        let frame = text(event(Some("safe"), None, "x\n\nevent: evil\ndata: owned\r\rid: 9"));
        let events = read(&frame);
        assert_eq!(events, [Event::new("safe", "x\n\nevent: evil\ndata: owned\n\nid: 9", None)], "{frame}");
    }

    #[test]
    fn unicode_and_leading_spaces_survive() {
        let frame = text(event(None, None, " ünïcode ✓ 🚀"));
        assert_eq!(read(&frame)[0].data, " ünïcode ✓ 🚀");
    }

    #[test]
    fn control_frames() {
        assert_eq!(text(comment("ping")), ": ping\n\n");
        assert_eq!(text(retry(std::time::Duration::from_millis(2500))), "retry: 2500\n\n");
        assert_eq!(read(&format!("{}{}", text(comment("ping")), text(retry(std::time::Duration::ZERO)))), []);
    }

    /// Names and ids as [`crate::envelope`] lets them through: no CR, LF or NUL.
    fn line_value() -> impl Strategy<Value = String> {
        "[^\r\n\u{0}]{0,24}"
    }

    proptest! {
        /// For any data, what a browser reads back is exactly the data, with its line breaks
        /// as SSE carries them (LF).
        #[test]
        fn any_data_reads_back_exactly(
            data in any::<String>(),
            name in proptest::option::of(line_value()),
            id in proptest::option::of(line_value()),
        ) {
            let frame = text(event(name.as_deref(), id.as_deref(), &data));
            let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| "message".to_owned());
            prop_assert_eq!(read(&frame), [Event { event: name, data: normalised(&data), id }]);
        }

        /// Frames are self-contained: a stream of them reads back as the same sequence, whatever
        /// one frame's data ends with.
        #[test]
        fn a_stream_of_frames_reads_back_in_order(datas in proptest::collection::vec(any::<String>(), 1..8)) {
            let stream: String = datas.iter().map(|d| text(event(Some("e"), None, d))).collect();
            let expected: Vec<Event> = datas.iter().map(|d| Event::new("e", &normalised(d), None)).collect();
            prop_assert_eq!(read(&stream), expected);
        }
    }
}
