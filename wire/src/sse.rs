//! The `text/event-stream` parser: the "event stream interpretation" of the WHATWG HTML spec
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>),
//! fed body bytes in any pieces.
//!
//! What it follows from the spec:
//! - a line ends at CR, LF or CRLF, and a CR at the end of one feed followed by an LF at the
//!   start of the next is one line end, not two;
//! - a UTF-8 byte order mark at the very start of the stream is skipped, once;
//! - `field` without a colon is that field with an empty value; one space after the colon is
//!   removed; unknown fields are ignored;
//! - `data` lines are joined with `\n`; an event whose data buffer is empty is not dispatched;
//! - `id` containing NUL is ignored; the last event id persists across events (it is what a
//!   client sends as `Last-Event-ID` when it reconnects);
//! - `retry` counts only when it is all ASCII digits;
//! - an event not ended by a blank line when the stream ends is discarded (the parser simply
//!   never sees its blank line).
//!
//! Where it goes beyond the spec, because its callers test and measure servers rather than
//! only consume them:
//! - comment lines (`: ping`) are surfaced as [`ItemRef::Comment`] (the spec drops them), so a
//!   heartbeat can be observed;
//! - every `retry` line is surfaced as [`ItemRef::Retry`] when it is read (that is when the
//!   spec applies it), including one in a block that dispatches nothing;
//! - each event carries what its own block had on the wire (`id`, `retry`: `None` when the
//!   block had no such line) beside the persisted last event id, so a check can tell an event
//!   without an id from one that repeats the previous id;
//! - lines and an event's data are bounded ([`DEFAULT_MAX_LINE`], [`DEFAULT_MAX_DATA`]): an
//!   endless line is an [`SseError`], not unbounded memory.
//!
//! Shaped for a load generator holding tens of thousands of streams and parsing ~100k events a
//! second on one core: [`SseParser::feed`] hands borrowed items to a callback, a complete line
//! is parsed where it lies in the caller's buffer, and the parser's few buffers are reused, so
//! steady-state parsing allocates nothing. [`SseParser::feed_into`] collects owned items for
//! callers that prefer them (the doctor, tests).

use memchr::{memchr, memchr2};

/// The longest line accepted by default. The node caps a publish at 256 KiB unless configured
/// otherwise; 1 MiB leaves room for a generous setting and still bounds a broken peer.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;
/// The most data one event may gather by default (over all its `data` lines).
pub const DEFAULT_MAX_DATA: usize = 4 * 1024 * 1024;

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Why a stream could not be parsed. The parser stays failed: feeding it more returns the same
/// error, since the line it gave up on cannot be found again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE line over {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("an SSE event's data over {limit} bytes")]
    DataTooLong { limit: usize },
}

/// One dispatched event, borrowed from the parser until the callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The event type: the block's `event` field, or `message` when it had none (or an empty one).
    pub event: &'a [u8],
    /// The block's `data` lines joined with `\n`.
    pub data: &'a [u8],
    /// The id this block itself set (its last valid `id` line); `None` when it had none.
    pub id: Option<&'a [u8]>,
    /// The reconnection time this block itself set (its last valid `retry` line), in ms.
    pub retry: Option<u64>,
    /// The stream's last event id at this event: this block's id, or the latest one before it.
    pub last_event_id: &'a [u8],
}

/// What the stream delivered, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemRef<'a> {
    Event(EventRef<'a>),
    /// A `:` line, without the colon and one following space: `: ping` gives `ping`.
    Comment(&'a [u8]),
    /// A valid `retry` line, in milliseconds, surfaced when it is read.
    Retry(u64),
}

/// [`EventRef`] owned, with the text decoded as UTF-8 (invalid sequences become U+FFFD, as the
/// spec's decoder does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
    pub last_event_id: String,
}

/// [`ItemRef`] owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    Comment(String),
    Retry(u64),
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl EventRef<'_> {
    pub fn to_owned_event(&self) -> Event {
        Event {
            event: text(self.event),
            data: text(self.data),
            id: self.id.map(text),
            retry: self.retry,
            last_event_id: text(self.last_event_id),
        }
    }
}

impl ItemRef<'_> {
    pub fn to_owned_item(&self) -> Item {
        match *self {
            ItemRef::Event(event) => Item::Event(event.to_owned_event()),
            ItemRef::Comment(comment) => Item::Comment(text(comment)),
            ItemRef::Retry(ms) => Item::Retry(ms),
        }
    }
}

/// Where the parser is in the stream's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// This many bytes of a byte order mark have been seen (and held back) so far.
    Bom(usize),
    /// Past any byte order mark: everything is lines.
    Lines,
}

/// An incremental `text/event-stream` parser for one stream.
#[derive(Debug)]
pub struct SseParser {
    start: Start,
    /// The previous feed ended in CR: an LF starting the next one ends nothing.
    after_cr: bool,
    /// A line not yet ended at the end of the previous feed.
    partial: Vec<u8>,
    /// The block's event type, data (joined, without a trailing `\n`) and whether any `data`
    /// line came (a single empty `data` line still dispatches an event with empty data).
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The block's own id; valid only while `has_block_id`.
    block_id: Vec<u8>,
    has_block_id: bool,
    block_retry: Option<u64>,
    last_event_id: Vec<u8>,
    reconnection_time: Option<u64>,
    max_line: usize,
    max_data: usize,
    failed: Option<SseError>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self {
            start: Start::Bom(0),
            after_cr: false,
            partial: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            block_id: Vec::new(),
            has_block_id: false,
            block_retry: None,
            last_event_id: Vec::new(),
            reconnection_time: None,
            max_line: DEFAULT_MAX_LINE,
            max_data: DEFAULT_MAX_DATA,
            failed: None,
        }
    }

    /// Starts with a last event id, as a client resuming with `Last-Event-ID` does: events
    /// without an `id` line then report it as theirs.
    pub fn with_last_event_id(mut self, id: &[u8]) -> Self {
        self.last_event_id = id.to_vec();
        self
    }

    /// The longest line accepted, its line end excluded.
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    /// The most data one event may gather over all its `data` lines.
    pub fn with_max_data(mut self, bytes: usize) -> Self {
        self.max_data = bytes;
        self
    }

    /// The stream's last event id so far: what to send as `Last-Event-ID` on a reconnect.
    /// Updated when a block ends, as the spec's "last event ID string" is.
    pub fn last_event_id(&self) -> &[u8] {
        &self.last_event_id
    }

    /// The latest valid `retry` the stream sent, in milliseconds.
    pub fn reconnection_time(&self) -> Option<u64> {
        self.reconnection_time
    }

    /// Consumes `input`, calling `on_item` for every item completed inside it. Bytes of a line
    /// not yet ended are kept for the next feed.
    pub fn feed(&mut self, mut input: &[u8], mut on_item: impl FnMut(ItemRef<'_>)) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if let Start::Bom(_) = self.start {
            input = self.skip_bom(input);
        }
        if std::mem::take(&mut self.after_cr)
            && let Some(rest) = input.strip_prefix(b"\n")
        {
            input = rest;
        }
        while !input.is_empty() {
            let Some(end) = memchr2(b'\n', b'\r', input) else {
                if self.partial.len() + input.len() > self.max_line {
                    return Err(self.fail(SseError::LineTooLong { limit: self.max_line }));
                }
                self.partial.extend_from_slice(input);
                return Ok(());
            };
            let mut next = end + 1;
            if input[end] == b'\r' {
                match input.get(next) {
                    None => self.after_cr = true,
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                }
            }
            let line = &input[..end];
            if self.partial.len() + line.len() > self.max_line {
                return Err(self.fail(SseError::LineTooLong { limit: self.max_line }));
            }
            let result = if self.partial.is_empty() {
                self.line(line, &mut on_item)
            } else {
                // The line began in an earlier feed: join it in the partial buffer, which is
                // handed back (emptied, capacity kept) for the next one.
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                let result = self.line(&joined, &mut on_item);
                joined.clear();
                self.partial = joined;
                result
            };
            if let Err(e) = result {
                return Err(self.fail(e));
            }
            input = &input[next..];
        }
        Ok(())
    }

    /// Like [`feed`](Self::feed), appending owned items to `out`.
    pub fn feed_into(&mut self, input: &[u8], out: &mut Vec<Item>) -> Result<(), SseError> {
        self.feed(input, |item| out.push(item.to_owned_item()))
    }

    fn fail(&mut self, e: SseError) -> SseError {
        self.failed = Some(e.clone());
        e
    }

    /// Holds back what may be a byte order mark; returns the input after it. Bytes that turn
    /// out not to be one become the start of the first line.
    fn skip_bom<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let Start::Bom(mut seen) = self.start else { return input };
        let mut used = 0;
        while seen < BOM.len() {
            let Some(&b) = input.get(used) else {
                self.start = Start::Bom(seen);
                return &[];
            };
            if b != BOM[seen] {
                self.partial.extend_from_slice(&BOM[..seen]);
                self.start = Start::Lines;
                return &input[used..];
            }
            seen += 1;
            used += 1;
        }
        self.start = Start::Lines;
        &input[used..]
    }

    fn line(&mut self, line: &[u8], on_item: &mut impl FnMut(ItemRef<'_>)) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(on_item);
            return Ok(());
        }
        // The colon ends a field name of a few bytes: a plain scan beats memchr's set-up here.
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => {
                let comment = &line[1..];
                on_item(ItemRef::Comment(comment.strip_prefix(b" ").unwrap_or(comment)));
                return Ok(());
            }
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                let joined = self.data.len() + usize::from(self.has_data) + value.len();
                if joined > self.max_data {
                    return Err(SseError::DataTooLong { limit: self.max_data });
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if memchr(0, value).is_none() => {
                self.block_id.clear();
                self.block_id.extend_from_slice(value);
                self.has_block_id = true;
            }
            b"retry" => {
                if let Some(ms) = retry_ms(value) {
                    self.block_retry = Some(ms);
                    self.reconnection_time = Some(ms);
                    on_item(ItemRef::Retry(ms));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A blank line: the block ends, and an event is dispatched if it gathered data.
    fn dispatch(&mut self, on_item: &mut impl FnMut(ItemRef<'_>)) {
        if self.has_block_id {
            // The block's id becomes the stream's; swapping keeps both buffers' capacity.
            std::mem::swap(&mut self.last_event_id, &mut self.block_id);
        }
        if self.has_data {
            let event: &[u8] = if self.event.is_empty() { b"message" } else { &self.event };
            on_item(ItemRef::Event(EventRef {
                event,
                data: &self.data,
                id: self.has_block_id.then_some(&self.last_event_id[..]),
                retry: self.block_retry,
                last_event_id: &self.last_event_id,
            }));
        }
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        self.has_block_id = false;
        self.block_retry = None;
    }
}

/// A `retry` value: ASCII digits only, and one that fits (a larger one is ignored, like any
/// other value the spec does not accept).
fn retry_ms(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |ms, &d| ms.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(parser: &mut SseParser, input: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        parser.feed_into(input, &mut out).expect("valid SSE");
        out
    }

    fn parse_all(input: &[u8]) -> Vec<Item> {
        parse(&mut SseParser::new(), input)
    }

    /// An event as the spec would dispatch it, with what its own block carried.
    fn ev(event: &str, data: &str, id: Option<&str>, retry: Option<u64>, last_event_id: &str) -> Item {
        Item::Event(Event {
            event: event.into(),
            data: data.into(),
            id: id.map(Into::into),
            retry,
            last_event_id: last_event_id.into(),
        })
    }

    fn comment(text: &str) -> Item {
        Item::Comment(text.into())
    }

    #[test]
    fn lf_cr_and_crlf_all_end_lines() {
        let expected = [ev("e", "a\nb", None, None, ""), ev("message", "c", None, None, "")];
        for end in ["\n", "\r", "\r\n"] {
            let stream = format!("event: e{end}data: a{end}data: b{end}{end}data: c{end}{end}");
            assert_eq!(parse_all(stream.as_bytes()), expected, "line end {end:?}");
        }
        // Mixed within one stream.
        assert_eq!(parse_all(b"event: e\rdata: a\r\ndata: b\n\r\ndata: c\r\r"), expected);
    }

    #[test]
    fn a_cr_and_lf_split_across_feeds_are_one_line_end() {
        let mut parser = SseParser::new();
        let mut items = parse(&mut parser, b"data: a\r");
        items.extend(parse(&mut parser, b"\ndata: b\r"));
        items.extend(parse(&mut parser, b"\n\r"));
        items.extend(parse(&mut parser, b"\n"));
        assert_eq!(items, [ev("message", "a\nb", None, None, "")]);
        // A CR then a feed not starting with LF: the CR alone ended the line.
        let mut parser = SseParser::new();
        let mut items = parse(&mut parser, b"data: a\r");
        items.extend(parse(&mut parser, b"\r"));
        assert_eq!(items, [ev("message", "a", None, None, "")]);
    }

    #[test]
    fn a_leading_bom_is_skipped_once() {
        assert_eq!(parse_all(b"\xEF\xBB\xBFdata: x\n\n"), [ev("message", "x", None, None, "")]);
        // Split inside the BOM.
        let mut parser = SseParser::new();
        assert!(parse(&mut parser, b"\xEF").is_empty());
        assert!(parse(&mut parser, b"\xBB").is_empty());
        assert_eq!(parse(&mut parser, b"\xBFdata: x\n\n"), [ev("message", "x", None, None, "")]);
        // A second BOM is part of the first line, which then names no known field.
        assert_eq!(parse_all(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n"), [ev("message", "y", None, None, "")]);
        // A BOM later in the stream is not skipped either.
        assert_eq!(parse_all(b"data: x\n\n\xEF\xBB\xBFdata: y\n\n"), [ev("message", "x", None, None, "")]);
        // The start of a BOM that is not one is text.
        assert_eq!(parse_all(b"\xEF\xBBdata: x\n\n:\xEF\n"), [comment("\u{FFFD}")]);
    }

    #[test]
    fn comments_are_surfaced_and_dispatch_nothing() {
        assert_eq!(
            parse_all(b": ping\n:\n:  two spaces\n:no space\n\n"),
            [comment("ping"), comment(""), comment(" two spaces"), comment("no space")]
        );
        // A comment inside a block leaves the block as it is.
        assert_eq!(
            parse_all(b"data: a\n: ping\ndata: b\n\n"),
            [comment("ping"), ev("message", "a\nb", None, None, "")]
        );
    }

    #[test]
    fn retry_needs_only_digits_and_is_seen_inside_and_outside_blocks() {
        assert_eq!(
            parse_all(b"retry: 3000\n\nretry: 25\ndata: x\n\nretry: 1.5\nretry: -1\nretry:\nretry: 7 \ndata: y\n\n"),
            [
                Item::Retry(3000),
                Item::Retry(25),
                ev("message", "x", None, Some(25), ""),
                ev("message", "y", None, None, "")
            ]
        );
        let mut parser = SseParser::new();
        parse(&mut parser, b"retry: 99999999999999999999999\nretry:12\n\n");
        assert_eq!(parser.reconnection_time(), Some(12), "an overflowing retry is ignored");
    }

    #[test]
    fn a_field_without_colon_has_an_empty_value() {
        // `data` alone dispatches an event with empty data; `event` alone resets the type;
        // `id` alone resets the last event id.
        assert_eq!(
            parse_all(b"id: 1\nevent: e\nevent\ndata\n\nid\ndata: x\n\n"),
            [ev("message", "", Some("1"), None, "1"), ev("message", "x", Some(""), None, "")]
        );
    }

    #[test]
    fn one_space_after_the_colon_is_removed() {
        assert_eq!(
            parse_all(b"data:x\n\ndata:  y \n\n"),
            [ev("message", "x", None, None, ""), ev("message", " y ", None, None, "")]
        );
    }

    #[test]
    fn an_id_with_nul_is_ignored() {
        assert_eq!(
            parse_all(b"id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\nid: 3\nid: 4\0\ndata: c\n\n"),
            [
                ev("message", "a", Some("1"), None, "1"),
                ev("message", "b", None, None, "1"),
                ev("message", "c", Some("3"), None, "3")
            ]
        );
    }

    #[test]
    fn the_last_event_id_persists_but_each_event_says_whether_it_had_one() {
        let mut parser = SseParser::new().with_last_event_id(b"5-0");
        assert_eq!(
            parse(&mut parser, b"data: x\n\nid: 6-0\ndata: y\n\ndata: z\n\nid: 7-0\n\n"),
            [
                ev("message", "x", None, None, "5-0"),
                ev("message", "y", Some("6-0"), None, "6-0"),
                ev("message", "z", None, None, "6-0")
            ]
        );
        // A block without data still moves the last event id (spec: dispatch, step 1).
        assert_eq!(parser.last_event_id(), b"7-0");
        // An id in an unfinished block is not the stream's yet.
        parse(&mut parser, b"id: 8-0\n");
        assert_eq!(parser.last_event_id(), b"7-0");
    }

    #[test]
    fn data_lines_join_with_lf_and_empty_blocks_dispatch_nothing() {
        assert_eq!(
            parse_all(b"data: a\ndata:\ndata: b\n\n\n\nevent: lonely\n\ndata\ndata\n\n"),
            [ev("message", "a\n\nb", None, None, ""), ev("message", "\n", None, None, "")]
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_the_event_type_resets_per_block() {
        assert_eq!(
            parse_all(b"event: a\nfoo: bar\nData: no\ndata: 1\n\ndata: 2\n\n"),
            [ev("a", "1", None, None, ""), ev("message", "2", None, None, "")]
        );
    }

    #[test]
    fn an_unfinished_last_event_is_discarded() {
        assert_eq!(parse_all(b"data: a\n\ndata: b\n"), [ev("message", "a", None, None, "")]);
        assert_eq!(parse_all(b"data: a\n\ndata: b"), [ev("message", "a", None, None, "")]);
    }

    #[test]
    fn endless_lines_and_data_are_errors_not_memory() {
        let mut parser = SseParser::new().with_max_line(16);
        assert!(parser.feed(b"data: 0123456789", |_| {}).is_ok(), "16 bytes fit");
        assert_eq!(parser.feed(b"x", |_| {}), Err(SseError::LineTooLong { limit: 16 }));
        assert_eq!(parser.feed(b"\n\n", |_| {}), Err(SseError::LineTooLong { limit: 16 }), "stays failed");
        // In one feed, with its end in sight.
        let mut parser = SseParser::new().with_max_line(16);
        assert!(parser.feed(b"data: 0123456789a\n", |_| {}).is_err());
        // Many short lines into one event.
        let mut parser = SseParser::new().with_max_data(8);
        assert!(parser.feed(b"data: 1234\ndata: 123\n", |_| {}).is_ok(), "4 + \\n + 3 fit");
        assert_eq!(parser.feed(b"data:\n", |_| {}), Err(SseError::DataTooLong { limit: 8 }));
        // The default bound.
        let mut parser = SseParser::new();
        assert!(parser.feed(&vec![b'x'; DEFAULT_MAX_LINE + 1], |_| {}).is_err());
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        assert_eq!(parse_all(b"data: a\xFFb\n\n"), [ev("message", "a\u{FFFD}b", None, None, "")]);
    }

    #[test]
    fn the_borrowed_api_sees_what_the_owned_one_does() {
        let mut parser = SseParser::new();
        let mut seen = Vec::new();
        parser
            .feed(b"retry: 5\nid: 9\nevent: e\ndata: d\n\n: c\n", |item| match item {
                ItemRef::Event(e) => seen.push(format!("{:?}", (e.event, e.data, e.id, e.retry, e.last_event_id))),
                ItemRef::Comment(c) => seen.push(format!("comment {c:?}")),
                ItemRef::Retry(ms) => seen.push(format!("retry {ms}")),
            })
            .expect("valid");
        assert_eq!(
            seen,
            [
                "retry 5".to_owned(),
                format!("{:?}", (&b"e"[..], &b"d"[..], Some(&b"9"[..]), Some(5u64), &b"9"[..])),
                format!("comment {:?}", &b"c"[..]),
            ]
        );
    }

    /// The spec's algorithm written plainly over the whole stream at once: decode, strip one
    /// BOM, split lines, process them. The streaming parser must agree with it on any input.
    fn reference(input: &[u8]) -> Vec<Item> {
        let text = String::from_utf8_lossy(input);
        let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
        let mut lines = Vec::new();
        let mut rest = text;
        while let Some(end) = rest.find(['\r', '\n']) {
            lines.push(&rest[..end]);
            rest = if rest[end..].starts_with("\r\n") { &rest[end + 2..] } else { &rest[end + 1..] };
        }
        let (mut out, mut event, mut data, mut has_data) = (Vec::new(), String::new(), String::new(), false);
        let (mut block_id, mut last_id, mut block_retry) = (None::<String>, String::new(), None);
        for line in lines {
            if line.is_empty() {
                if let Some(id) = block_id.take() {
                    last_id = id.clone();
                    block_id = Some(id);
                }
                if has_data {
                    let event = if event.is_empty() { "message".to_owned() } else { event.clone() };
                    out.push(ev(&event, &data, block_id.as_deref(), block_retry, &last_id));
                }
                (event, data, has_data, block_id, block_retry) = (String::new(), String::new(), false, None, None);
                continue;
            }
            if let Some(c) = line.strip_prefix(':') {
                out.push(comment(c.strip_prefix(' ').unwrap_or(c)));
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(value);
                    has_data = true;
                }
                "event" => event = value.to_owned(),
                "id" if !value.contains('\0') => block_id = Some(value.to_owned()),
                "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    if let Ok(ms) = value.parse() {
                        block_retry = Some(ms);
                        out.push(Item::Retry(ms));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Byte strings made of the pieces SSE is made of, so random input hits every rule.
    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(&b"data"[..]),
            Just(&b"event"[..]),
            Just(&b"id"[..]),
            Just(&b"retry"[..]),
            Just(&b":"[..]),
            Just(&b" "[..]),
            Just(&b"\n"[..]),
            Just(&b"\r"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"\0"[..]),
            Just(&b"42"[..]),
            Just(&b"x"[..]),
            Just(&b"\xEF\xBB\xBF"[..]),
            Just(&b"\xEF"[..]),
            Just("é".as_bytes()),
        ];
        (any::<bool>(), proptest::collection::vec(piece, 0..80)).prop_map(|(bom, pieces)| {
            let mut out = if bom { BOM.to_vec() } else { Vec::new() };
            for p in pieces {
                out.extend_from_slice(p);
            }
            out
        })
    }

    /// Feeds `input` cut at `cuts` (sorted, deduplicated positions).
    fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> Vec<Item> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            parser.feed_into(&input[from..cut], &mut out).expect("valid");
            from = cut;
        }
        out
    }

    proptest! {
        #[test]
        fn agrees_with_the_spec_written_plainly(input in sse_bytes()) {
            prop_assert_eq!(parse_all(&input), reference(&input));
        }

        #[test]
        fn any_chunking_gives_the_same_items(input in sse_bytes(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            prop_assert_eq!(parse_in_pieces(&input, &cuts), parse_all(&input));
        }

        #[test]
        fn byte_by_byte_gives_the_same_items(input in sse_bytes()) {
            let cuts: Vec<usize> = (1..input.len()).collect();
            prop_assert_eq!(parse_in_pieces(&input, &cuts), parse_all(&input));
        }

        #[test]
        fn events_written_with_any_line_ends_read_back(
            events in proptest::collection::vec(("[a-z]{0,6}", proptest::collection::vec("[^\r\n]{0,12}", 1..4), proptest::option::of("[0-9a-z-]{0,6}")), 0..6),
            ends in proptest::collection::vec(0..3usize, 64),
        ) {
            let mut ends = ends.into_iter().cycle().map(|i| ["\n", "\r", "\r\n"][i]);
            let mut stream = String::new();
            let mut previous_cr = false;
            let mut end_line = |stream: &mut String, blank: bool| {
                // CR then a blank line ended by LF reads as one CRLF: avoid writing that.
                let mut end = ends.next().unwrap_or("\n");
                if blank && previous_cr && end == "\n" {
                    end = "\r\n";
                }
                previous_cr = end == "\r";
                stream.push_str(end);
            };
            let mut expected = Vec::new();
            let mut last_id = String::new();
            for (event, data, id) in &events {
                if !event.is_empty() {
                    stream.push_str(&format!("event: {event}"));
                    end_line(&mut stream, false);
                }
                if let Some(id) = id {
                    stream.push_str(&format!("id: {id}"));
                    end_line(&mut stream, false);
                    last_id = id.clone();
                }
                for line in data {
                    stream.push_str(&format!("data: {line}"));
                    end_line(&mut stream, false);
                }
                end_line(&mut stream, true);
                let event = if event.is_empty() { "message" } else { event };
                expected.push(ev(event, &data.join("\n"), id.as_deref(), None, &last_id));
            }
            prop_assert_eq!(parse_all(stream.as_bytes()), expected);
        }
    }
}
