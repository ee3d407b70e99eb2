//! An HTTP/1.x response head: the status line and headers, read incrementally from the bytes a
//! socket gives, and where the body starts.
//!
//! The syntax is httparse's (the parser hyper uses); this module adds what a client of a
//! streaming server needs around it: a bound on the head's size (a peer that never ends its
//! head gets an error, not our memory), case-insensitive header lookup, and the two answers
//! every caller needs next: how the body is delimited ([`ResponseHead::framing`]) and whether
//! the connection can carry another request ([`ResponseHead::closes`]).
//!
//! It does not read request heads; [`head_len`] only finds where one ends, for the tools' own
//! small servers.

use memchr::memchr_iter;

use crate::body::Framing;

/// The largest head accepted by default; real ones are well under 2 KB.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
/// Headers beyond this many make the head malformed (httparse needs a fixed table).
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("response head over {limit} bytes")]
    TooLarge { limit: usize },
    #[error("malformed response head: {0}")]
    Malformed(String),
}

/// Status and headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub status: u16,
    /// In the order received; values trimmed and decoded as UTF-8 (lossily).
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_named(name).next()
    }

    /// Every header of that name (case-insensitive), in order.
    pub fn headers_named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// How the body is delimited (RFC 9112 §6.3), for a response to a GET or POST.
    /// [`parse_response_head`] refuses an unusable `Content-Length`; in a head built by hand
    /// one counts as absent.
    pub fn framing(&self) -> Framing {
        if (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Framing::Length(0);
        }
        if let Some(codings) = self.transfer_codings() {
            // Chunked must be the final coding; any other final coding is read until close.
            return if codings.last().is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
        }
        match self.content_length() {
            Some(Ok(length)) => Framing::Length(length),
            Some(Err(())) | None => Framing::UntilClose,
        }
    }

    /// The server closes the connection after this response: `Connection: close`, or HTTP/1.0
    /// without `keep-alive`. A client must not send another request on it.
    pub fn closes(&self) -> bool {
        let tokens =
            || self.headers_named("connection").flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty());
        if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
            return true;
        }
        self.version == 0 && !tokens().any(|t| t.eq_ignore_ascii_case("keep-alive"))
    }

    /// The transfer codings of every `Transfer-Encoding` header, in order; `None` without one.
    fn transfer_codings(&self) -> Option<Vec<&str>> {
        let mut headers = self.headers_named("transfer-encoding").peekable();
        headers.peek()?;
        Some(headers.flat_map(|v| v.split(',')).map(str::trim).filter(|c| !c.is_empty()).collect())
    }

    /// The `Content-Length`: `None` without one, `Err` if the values are not one decimal number
    /// (several headers, or a list, must all agree: RFC 9110 §8.6).
    fn content_length(&self) -> Option<Result<u64, ()>> {
        let mut length = None;
        for value in self.headers_named("content-length").flat_map(|v| v.split(',')) {
            let value = value.trim();
            let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                value.parse::<u64>().map_err(|_| ())
            } else {
                Err(())
            };
            match (parsed, length) {
                (Err(()), _) => return Some(Err(())),
                (Ok(n), Some(previous)) if n != previous => return Some(Err(())),
                (Ok(n), _) => length = Some(n),
            }
        }
        length.map(Ok)
    }
}

/// Parses a response head from the start of `buf`: `Ok(None)` while it is incomplete, else the
/// head and how many bytes of `buf` it took (the body starts there). Refuses a head longer
/// than `max`, one that is not HTTP/1.x, and one whose `Content-Length` is unusable (the
/// body's end could not be found).
pub fn parse_response_head(buf: &[u8], max: usize) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max => return Err(HeadError::TooLarge { limit: max }),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooLarge { limit: max }),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err(HeadError::Malformed("no status line".to_owned()));
    };
    let head = ResponseHead {
        version,
        status,
        headers: response
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).trim().to_owned()))
            .collect(),
    };
    if head.transfer_codings().is_none() && matches!(head.content_length(), Some(Err(()))) {
        return Err(HeadError::Malformed("unusable Content-Length".to_owned()));
    }
    Ok(Some((head, len)))
}

/// Where a request or response head ends in `buf`: the length up to and including its blank
/// line (CRLF or bare LF line ends), or `None` while it has not ended.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    memchr_iter(b'\n', buf).find_map(|nl| {
        let before = &buf[..nl];
        let before = before.strip_suffix(b"\r").unwrap_or(before);
        // The line that ends here is empty, and is not the first line.
        (before.last() == Some(&b'\n')).then_some(nl + 1)
    })
}

/// Reads a response head from bytes fed in any pieces: bytes are kept (up to the limit) until
/// the head is complete; what came after it is the start of the body.
#[derive(Debug)]
pub struct HeadReader {
    buf: Vec<u8>,
    max: usize,
    /// Length of the head, once complete.
    head_len: Option<usize>,
}

impl Default for HeadReader {
    fn default() -> Self {
        Self::new()
    }
}

impl HeadReader {
    pub fn new() -> Self {
        Self::with_max(DEFAULT_MAX_HEAD)
    }

    /// A reader that refuses heads longer than `max` bytes.
    pub fn with_max(max: usize) -> Self {
        Self { buf: Vec::new(), max, head_len: None }
    }

    /// Adds `bytes`; returns the head once they complete it, `Ok(None)` before. After the head,
    /// further bytes are body: they are kept and [`body`](Self::body) returns them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
        self.buf.extend_from_slice(bytes);
        if self.head_len.is_some() {
            return Ok(None);
        }
        // The blank line is searched first, from just before the new bytes: httparse is only
        // asked once the head can be complete (or too long), so a head arriving byte by byte
        // costs linear time.
        let from = (self.buf.len() - bytes.len()).saturating_sub(3);
        if head_len(&self.buf[from..]).is_none() && self.buf.len() < self.max {
            // Refuse what cannot become a status line at once, rather than at the limit.
            if !b"HTTP/".starts_with(&self.buf[..self.buf.len().min(5)]) {
                return Err(HeadError::Malformed("not an HTTP/1.x response".to_owned()));
            }
            return Ok(None);
        }
        match parse_response_head(&self.buf, self.max)? {
            Some((head, len)) => {
                self.head_len = Some(len);
                Ok(Some(head))
            }
            None => Ok(None),
        }
    }

    /// The bytes after the head (empty before it is complete).
    pub fn body(&self) -> &[u8] {
        self.head_len.map_or(&[][..], |len| &self.buf[len..])
    }

    /// Forgets everything, keeping the buffer's capacity, for the next response.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.head_len = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(raw: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_response_head(raw, DEFAULT_MAX_HEAD)
    }

    fn head(raw: &[u8]) -> ResponseHead {
        parse(raw).expect("valid").expect("complete").0
    }

    #[test]
    fn heads_parse_incrementally_and_say_where_the_body_starts() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello";
        assert_eq!(parse(&raw[..20]), Ok(None));
        let (head, len) = parse(raw).expect("valid").expect("complete");
        assert_eq!(&raw[len..], b"5\r\nhello");
        assert_eq!((head.version, head.status), (1, 200));
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(head.header("CONTENT-TYPE"), Some("text/event-stream"));
        assert_eq!(head.header("x-missing"), None);
        assert_eq!(head.framing(), Framing::Chunked);
    }

    #[test]
    fn the_reader_takes_any_pieces_and_keeps_the_body() {
        let raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nbody";
        for split in 0..=raw.len() {
            let mut reader = HeadReader::new();
            let first = reader.feed(&raw[..split]).expect("valid");
            let second = reader.feed(&raw[split..]).expect("valid");
            let head = first.or(second).expect("complete");
            assert_eq!(head.header("x-a"), Some("1"), "split at {split}");
            assert_eq!(reader.body(), b"body", "split at {split}");
        }
        let mut reader = HeadReader::new();
        for &b in raw.iter() {
            reader.feed(&[b]).expect("valid");
        }
        assert_eq!(reader.body(), b"body");
        assert_eq!(reader.feed(b"+more").expect("valid"), None, "after the head, bytes are body");
        assert_eq!(reader.body(), b"body+more");
        reader.reset();
        assert_eq!(reader.body(), b"");
        assert!(reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n").expect("valid").is_some());
    }

    #[test]
    fn bare_lf_heads_are_read_too() {
        let (head, len) = parse(b"HTTP/1.1 200 OK\nA: b\n\nrest").expect("valid").expect("complete");
        assert_eq!((head.header("a"), len), (Some("b"), 22));
        let mut reader = HeadReader::new();
        assert!(reader.feed(b"HTTP/1.1 200 OK\nA: b\n\nrest").expect("valid").is_some());
        assert_eq!(reader.body(), b"rest");
    }

    #[test]
    fn the_framing_follows_rfc_9112() {
        assert_eq!(head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\n\r\n").framing(), Framing::Length(12));
        assert_eq!(head(b"HTTP/1.0 200 OK\r\n\r\n").framing(), Framing::UntilClose);
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").framing(), Framing::Chunked);
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").framing(), Framing::UntilClose);
        // Transfer-Encoding wins over Content-Length.
        let both = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.framing(), Framing::Chunked);
        // Responses that never have a body.
        for status in ["204 No Content", "304 Not Modified", "101 Switching Protocols"] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n");
            assert_eq!(head(raw.as_bytes()).framing(), Framing::Length(0), "{status}");
        }
        // Repeated but equal lengths are one length.
        assert_eq!(head(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n").framing(), Framing::Length(4));
        for bad in ["x", "-1", "4, 5", "", "99999999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(parse(raw.as_bytes()).is_err(), "Content-Length {bad:?}");
        }
    }

    #[test]
    fn who_closes_the_connection() {
        assert!(!head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").closes());
        assert!(head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").closes());
        assert!(head(b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\n\r\n").closes());
        assert!(head(b"HTTP/1.0 200 OK\r\n\r\n").closes());
        assert!(!head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").closes());
    }

    #[test]
    fn what_is_not_an_http_1_response_is_refused() {
        assert!(parse(b"SMTP nonsense\r\n\r\n").is_err());
        assert!(parse(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(HeadReader::new().feed(b"SSH-2.0-OpenSSH").is_err(), "refused before a blank line comes");
        assert_eq!(HeadReader::new().feed(b"HTT").expect("may still be HTTP"), None);
    }

    #[test]
    fn an_endless_head_is_refused_not_buffered() {
        assert!(parse(&vec![b'a'; DEFAULT_MAX_HEAD]).is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(DEFAULT_MAX_HEAD + 10, b'y');
        assert_eq!(parse(&long), Err(HeadError::TooLarge { limit: DEFAULT_MAX_HEAD }));
        let mut reader = HeadReader::with_max(64);
        assert_eq!(reader.feed(b"HTTP/1.1 200 OK\r\n").expect("fine so far"), None);
        let filler = [b'y'; 16];
        let refused = (0..8).map(|_| reader.feed(&filler)).find(Result::is_err);
        assert_eq!(refused, Some(Err(HeadError::TooLarge { limit: 64 })));
        // A complete head longer than the limit is refused too.
        let mut complete = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        complete.extend_from_slice(&[b'y'; 64]);
        complete.extend_from_slice(b"\r\n\r\n");
        assert!(parse_response_head(&complete, 64).is_err());
    }

    #[test]
    fn head_len_finds_the_blank_line() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nnext"), Some(27));
        assert_eq!(head_len(b"GET / HTTP/1.1\nHost: x\n\nnext"), Some(24));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_len(b"\r\n"), None, "a leading empty line is not a head");
    }

    fn header_name() -> impl Strategy<Value = String> {
        "[A-Za-z][A-Za-z0-9-]{0,11}"
    }

    proptest! {
        #[test]
        fn written_heads_read_back_in_any_pieces(
            status in 200u16..600,
            headers in proptest::collection::vec((header_name(), "[ -~]{0,20}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..16),
            split in any::<prop::sample::Index>(),
        ) {
            // Names that change the framing are left to the unit tests.
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("content-length") && !n.eq_ignore_ascii_case("transfer-encoding"))
                .map(|(n, v)| (n, v.trim().to_owned()))
                .collect();
            let mut raw = format!("HTTP/1.1 {status} Whatever\r\n");
            for (n, v) in &headers {
                raw.push_str(&format!("{n}: {v}\r\n"));
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(&body);
            let split = split.index(raw.len() + 1);
            let mut reader = HeadReader::new();
            let first = reader.feed(&raw[..split]).expect("valid");
            let second = reader.feed(&raw[split..]).expect("valid");
            prop_assert!(first.is_none() || second.is_none(), "the head is returned once");
            let head = first.or(second).expect("complete");
            prop_assert_eq!(head.status, status);
            prop_assert_eq!(&head.headers, &headers);
            prop_assert_eq!(reader.body(), &body[..]);
        }

        #[test]
        fn any_bytes_are_a_head_an_error_or_a_wait_within_the_limit(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut reader = HeadReader::with_max(128);
            let mut outcome = Ok(None);
            for piece in raw.chunks(7) {
                outcome = reader.feed(piece);
                if !matches!(outcome, Ok(None)) {
                    break;
                }
            }
            if let Ok(None) = outcome {
                prop_assert!(reader.buf.len() < 128 + 7, "waiting holds at most the limit");
            }
        }
    }
}
