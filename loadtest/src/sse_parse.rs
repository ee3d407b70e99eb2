//! Incremental Server-Sent Events parser (the WHATWG `text/event-stream` rules) for bytes
//! arriving in arbitrary pieces.
//!
//! Shaped for a load generator holding tens of thousands of streams: the parser owns three
//! small reusable buffers and hands each complete event to a callback as borrowed slices, so
//! steady-state parsing allocates nothing per event. Lines may end in LF, CR or CRLF, and a
//! CRLF split across two reads is handled. Comments (`: ping`) and `retry:` are skipped.
//! The last event id persists across events, as the spec asks, so a client can resume with
//! `Last-Event-ID` after a reconnect.

/// One dispatched event, borrowed from the parser until the callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field, empty when absent (a browser would call it `message`).
    pub event: &'a [u8],
    /// The `data:` lines joined by `\n`.
    pub data: &'a [u8],
    /// The last event id seen on this stream so far (not only this event's).
    pub id: &'a [u8],
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// A line not yet terminated at the end of the previous feed.
    partial: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    last_id: Vec<u8>,
    /// The previous feed ended in CR: a leading LF in the next one belongs to it.
    after_cr: bool,
}

impl SseParser {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// The parser for a resumed stream: keeps the id to send as `Last-Event-ID`.
    pub fn with_last_id(id: &[u8]) -> Self {
        Self { last_id: id.to_vec(), ..Self::default() }
    }

    pub fn last_id(&self) -> &[u8] {
        &self.last_id
    }

    /// Consumes `input`, calling `on_event` for every event completed inside it.
    pub fn feed(&mut self, mut input: &[u8], mut on_event: impl FnMut(Event<'_>)) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = input.strip_prefix(b"\n") {
                input = rest;
            }
        }
        while !input.is_empty() {
            let Some(end) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.partial.extend_from_slice(input);
                return;
            };
            let line = &input[..end];
            let mut next = end + 1;
            if input[end] == b'\r' {
                if next == input.len() {
                    self.after_cr = true;
                } else if input[next] == b'\n' {
                    next += 1;
                }
            }
            if self.partial.is_empty() {
                self.line(line, &mut on_event);
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined, &mut on_event);
                joined.clear();
                self.partial = joined;
            }
            input = &input[next..];
        }
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if line.is_empty() {
            if self.has_data {
                if self.data.last() == Some(&b'\n') {
                    self.data.pop();
                }
                on_event(Event { event: &self.event, data: &self.data, id: &self.last_id });
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.last_id.clear();
                self.last_id.extend_from_slice(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (String, String, String);

    fn collect(p: &mut SseParser, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| {
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                    String::from_utf8_lossy(e.id).into_owned(),
                ))
            });
        }
        out
    }

    fn ev(e: &str, d: &str, i: &str) -> Owned {
        (e.into(), d.into(), i.into())
    }

    const STREAM: &[u8] = b"event: connected\ndata: {\"node\":\"n1\"}\n\n: ping\n\n\
id: 7-0\nevent: bench\ndata: 1:2:\n\ndata: a\ndata: b\n\n";

    #[test]
    fn parses_a_whole_stream() {
        let got = collect(&mut SseParser::new(), &[STREAM]);
        assert_eq!(
            got,
            vec![ev("connected", "{\"node\":\"n1\"}", ""), ev("bench", "1:2:", "7-0"), ev("", "a\nb", "7-0"),]
        );
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let whole = collect(&mut SseParser::new(), &[STREAM]);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let got = collect(&mut SseParser::new(), &[&STREAM[..i], &STREAM[i..j], &STREAM[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn crlf_and_cr_line_endings_including_split_crlf() {
        let s: &[u8] = b"event: x\r\ndata: 1\r\n\r\ndata: 2\r\rdata:3\n\n";
        let whole = collect(&mut SseParser::new(), &[s]);
        assert_eq!(whole, vec![ev("x", "1", ""), ev("", "2", ""), ev("", "3", "")]);
        for i in 0..=s.len() {
            let got = collect(&mut SseParser::new(), &[&s[..i], &s[i..]]);
            assert_eq!(got, whole, "split at {i}");
        }
    }

    #[test]
    fn empty_data_events_are_not_dispatched_and_event_type_resets() {
        let got = collect(&mut SseParser::new(), &[b"event: a\n\nretry: 5\nid\ndata\n\n"]);
        // A bare `data` line dispatches an event with empty data; the bare `id` clears the id.
        assert_eq!(got, vec![ev("", "", "")]);
    }

    #[test]
    fn last_id_survives_for_resume() {
        let mut p = SseParser::with_last_id(b"5-0");
        let got = collect(&mut p, &[b"data: x\n\nid: 6-0\ndata: y\n\n"]);
        assert_eq!(got, vec![ev("", "x", "5-0"), ev("", "y", "6-0")]);
        assert_eq!(p.last_id(), b"6-0");
    }
}
