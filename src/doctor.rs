//! `sse-fanout doctor <url>`: checks one event stream end to end, through whatever proxies sit
//! between the operator and the nodes, and prints one OK/WARN/FAIL line per finding.
//!
//! It owns a deliberately small HTTP/1.1 client over a raw `TcpStream` (response head, chunked
//! decoding, SSE line parsing) rather than using an HTTP library, because what it must see is
//! exactly what a proxy delivers and when: a library that buffers or decompresses would hide
//! the very faults the command exists to find (proxy buffering, compression, idle cuts).
//! Every buffer is bounded and every wait has a deadline, since the peer may be any server.
//! It speaks plain `http://` only; point it at the proxy's plain-HTTP side or a node.
//!
//! It does not own the node's behaviour: it only reads what `/events` and `/api/publish` answer.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::DoctorArgs;

/// Largest response head accepted; real ones are well under 2 KB.
const MAX_HEAD: usize = 16 * 1024;
/// Largest chunk-size or trailer line; a longer one is not HTTP we understand.
const MAX_CHUNK_LINE: usize = 1024;
/// Largest SSE line and largest event data; the node caps publishes at 64 KiB by default.
const MAX_SSE_LINE: usize = 256 * 1024;
const MAX_SSE_DATA: usize = 1024 * 1024;
/// Largest publish answer kept (only shown in a FAIL line).
const MAX_PUBLISH_BODY: usize = 64 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A node answers once the stream's subscriptions are confirmed, normally in milliseconds.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A node writes `retry:` and `connected` as soon as the subscriptions are confirmed (tens of
/// milliseconds); nothing within 2 s means something in between holds the bytes back.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(2);
/// Publish→receive is a few milliseconds through Redis; 3 s without it is buffering.
const PROBE_WAIT: Duration = Duration::from_secs(3);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the doctor could not run at all (exit 2), as opposed to a finding (exit 1).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DoctorError {
    #[error("{0:?} is not an http:// URL (https is not spoken; use the proxy's plain-HTTP side or a node)")]
    Url(String),
    #[error("the token is not a JWT with a string `sub` claim ({0})")]
    Token(&'static str),
}

/// An `http://host[:port]/path?query` URL, split for a raw request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, DoctorError> {
        let bad = || DoctorError::Url(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        // An IPv6 literal keeps its brackets for the Host header and loses them to connect.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 80,
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(bad());
        }
        Ok(Self { host: host.to_owned(), port, path_and_query: path })
    }

    /// `host[:port]` as sent in `Host` and used for the default publish URL.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 { host } else { format!("{host}:{}", self.port) }
    }
}

/// The `sub` claim of a JWT, read without checking the signature: the doctor only needs to know
/// where to publish the probe; the node is the one that verifies.
pub fn token_subject(token: &str) -> Result<String, DoctorError> {
    let mut parts = token.trim().split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(DoctorError::Token("not three dot-separated parts"));
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| DoctorError::Token("the payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|_| DoctorError::Token("the payload is not JSON"))?;
    match claims.get("sub") {
        Some(serde_json::Value::String(sub)) if !sub.is_empty() => Ok(sub.clone()),
        _ => Err(DoctorError::Token("no `sub`")),
    }
}

/// Status and headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// How the body is delimited (RFC 9112 §6.3, for a response to GET or POST).
    pub fn framing(&self) -> Framing {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|te| te.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked")));
        if chunked {
            Framing::Chunked(ChunkedDecoder::default())
        } else if let Some(length) = self.header("content-length").and_then(|l| l.trim().parse().ok()) {
            Framing::Length(length)
        } else {
            Framing::UntilClose
        }
    }
}

/// Parses a response head from the start of `buf`: `Ok(None)` while incomplete, else the head
/// and how many bytes it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let head = ResponseHead {
                status: response.code.unwrap_or(0),
                headers: response
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).trim().to_owned()))
                    .collect(),
            };
            Ok(Some((head, len)))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(format!("response head over {MAX_HEAD} bytes")),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed response head: {e}")),
    }
}

/// How a response body ends.
#[derive(Debug)]
pub enum Framing {
    Chunked(ChunkedDecoder),
    Length(u64),
    UntilClose,
}

impl Framing {
    /// Moves body bytes from `input` (raw socket bytes) to `out`; true once the body is complete.
    fn decode(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<bool, String> {
        match self {
            Framing::Chunked(decoder) => {
                decoder.decode(input, out)?;
                Ok(decoder.is_done())
            }
            Framing::Length(left) => {
                let take = input.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend(input.drain(..take));
                *left -= take as u64;
                Ok(*left == 0)
            }
            Framing::UntilClose => {
                out.append(input);
                Ok(false)
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// An incremental `Transfer-Encoding: chunked` decoder. It keeps no data of its own: what it
/// cannot decode yet stays in the caller's input, which therefore never holds more than one
/// partial size or trailer line (bounded by [`MAX_CHUNK_LINE`]).
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl ChunkedDecoder {
    /// True after the last (zero-size) chunk and its trailer.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes what `input` holds, removes what it consumed, and appends chunk data to `out`.
    pub fn decode(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        let mut pos = 0;
        let result = loop {
            let available = &input[pos..];
            match self.state {
                ChunkState::Done => break Ok(()),
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(nl) = available.iter().position(|&b| b == b'\n') else {
                        if available.len() > MAX_CHUNK_LINE {
                            break Err("chunk-size line too long".to_owned());
                        }
                        break Ok(());
                    };
                    if nl > MAX_CHUNK_LINE {
                        break Err("chunk-size line too long".to_owned());
                    }
                    let line = available[..nl].strip_suffix(b"\r").unwrap_or(&available[..nl]);
                    pos += nl + 1;
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    // Chunk extensions (`;name=value`) carry nothing we need.
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size).map(str::trim).unwrap_or_default();
                    match u64::from_str_radix(size, 16) {
                        Ok(0) if !size.is_empty() => self.state = ChunkState::Trailer,
                        Ok(n) if !size.is_empty() && size.len() <= 16 => self.state = ChunkState::Data(n),
                        _ => break Err(format!("bad chunk size {:?}", String::from_utf8_lossy(line))),
                    }
                }
                ChunkState::Data(left) => {
                    if available.is_empty() {
                        break Ok(());
                    }
                    let take = available.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&available[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                }
                ChunkState::DataEnd => match available {
                    [] | [b'\r'] => break Ok(()),
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.state = ChunkState::Size;
                    }
                    [b'\n', ..] => {
                        pos += 1;
                        self.state = ChunkState::Size;
                    }
                    _ => break Err("chunk data not followed by CRLF".to_owned()),
                },
            }
        };
        input.drain(..pos);
        result
    }
}

/// One event as an EventSource would dispatch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// What the stream delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    /// A `:` line, such as the node's `: ping` heartbeat.
    Comment(String),
}

/// An incremental parser following the WHATWG rules: lines end with LF, CRLF or CR; a blank
/// line dispatches; `data` lines join with LF; `id` persists across events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was CR, so an LF right after it ends nothing.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
}

impl SseParser {
    /// Feeds body bytes; appends what they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) -> Result<(), String> {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.line_ended(&line, out)?;
                }
                _ if self.line.len() >= MAX_SSE_LINE => return Err(format!("an SSE line over {MAX_SSE_LINE} bytes")),
                _ => self.line.push(b),
            }
        }
        Ok(())
    }

    fn line_ended(&mut self, line: &[u8], out: &mut Vec<SseItem>) -> Result<(), String> {
        let line = String::from_utf8_lossy(line);
        if line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                let mut data = std::mem::take(&mut self.data);
                data.pop();
                let event = std::mem::take(&mut self.event);
                let event = if event.is_empty() { "message".to_owned() } else { event };
                out.push(SseItem::Event(SseEvent { event, data, id: self.last_id.clone() }));
            }
            self.event.clear();
            self.data.clear();
            return Ok(());
        }
        if let Some(comment) = line.strip_prefix(':') {
            out.push(SseItem::Comment(comment.strip_prefix(' ').unwrap_or(comment).to_owned()));
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.data.len() + value.len() >= MAX_SSE_DATA {
                    return Err(format!("an event's data over {MAX_SSE_DATA} bytes"));
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {}
        }
        Ok(())
    }
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    Item(SseItem),
    TimedOut,
    Ended(String),
}

/// An open event stream: the socket, its framing and the SSE parser.
struct EventStream {
    socket: TcpStream,
    raw: Vec<u8>,
    framing: Framing,
    body: Vec<u8>,
    parser: SseParser,
    items: std::collections::VecDeque<SseItem>,
    first_body_byte: Option<Instant>,
    ended: Option<String>,
}

impl EventStream {
    /// The next item, or why none came before `deadline`.
    async fn next(&mut self, deadline: Instant) -> Next {
        loop {
            if let Some(item) = self.items.pop_front() {
                return Next::Item(item);
            }
            if let Some(why) = &self.ended {
                return Next::Ended(why.clone());
            }
            let mut buf = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return Next::TimedOut,
                Ok(Err(e)) => {
                    self.ended = Some(format!("read error: {e}"));
                    continue;
                }
                Ok(Ok(0)) => {
                    self.ended = Some(match self.framing {
                        Framing::Chunked(_) => "the connection closed without the final chunk".to_owned(),
                        _ => "the connection closed".to_owned(),
                    });
                    continue;
                }
                Ok(Ok(n)) => n,
            };
            self.raw.extend_from_slice(&buf[..n]);
            self.absorb();
        }
    }

    /// Decodes what `raw` holds into items.
    fn absorb(&mut self) {
        let complete = match self.framing.decode(&mut self.raw, &mut self.body) {
            Ok(complete) => complete,
            Err(e) => {
                self.ended = Some(format!("malformed body: {e}"));
                return;
            }
        };
        if !self.body.is_empty() && self.first_body_byte.is_none() {
            self.first_body_byte = Some(Instant::now());
        }
        let mut items = Vec::new();
        let parsed = self.parser.feed(&self.body, &mut items);
        self.body.clear();
        self.items.extend(items);
        if let Err(e) = parsed {
            self.ended = Some(e);
        } else if complete {
            self.ended = Some("the server ended the response".to_owned());
        }
    }
}

/// Connects and sends one request; returns the socket.
async fn send_request(url: &HttpUrl, request: &[u8]) -> Result<TcpStream, String> {
    let mut socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((url.host.as_str(), url.port)))
        .await
        .map_err(|_| format!("no TCP connection to {} within {CONNECT_TIMEOUT:?}", url.authority()))?
        .map_err(|e| format!("cannot connect to {}: {e}", url.authority()))?;
    socket.write_all(request).await.map_err(|e| format!("cannot send the request: {e}"))?;
    Ok(socket)
}

/// Why no response head was read.
#[derive(Debug)]
enum HeadError {
    TimedOut,
    Failed(String),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TimedOut => f.write_str("no response head in time"),
            HeadError::Failed(e) => f.write_str(e),
        }
    }
}

/// Reads a response head; returns it with the body bytes that came along.
async fn read_head(socket: &mut TcpStream, deadline: Instant) -> Result<(ResponseHead, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut chunk))
            .await
            .map_err(|_| HeadError::TimedOut)?
            .map_err(|e| HeadError::Failed(format!("read error: {e}")))?;
        if n == 0 {
            return Err(HeadError::Failed("the connection closed before a response head".to_owned()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((head, len)) = parse_head(&buf).map_err(HeadError::Failed)? {
            return Ok((head, buf.split_off(len)));
        }
    }
}

/// A stream request that got its response head.
struct Opened {
    socket: TcpStream,
    head: ResponseHead,
    leftover: Vec<u8>,
    /// When the request was sent; the stream's timings count from here.
    sent: Instant,
    head_after: Duration,
}

enum OpenError {
    Connect(String),
    Head(HeadError),
}

/// Sends `GET <url>` as an EventSource would, with or without `Accept-Encoding`.
async fn open_stream(url: &HttpUrl, token: &str, accept_encoding: bool) -> Result<Opened, OpenError> {
    let encoding = if accept_encoding { "Accept-Encoding: gzip, deflate, br\r\n" } else { "" };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{encoding}\
         Authorization: Bearer {}\r\nUser-Agent: sse-fanout-doctor\r\n\r\n",
        url.path_and_query,
        url.authority(),
        token.trim()
    );
    let sent = Instant::now();
    let mut socket = send_request(url, request.as_bytes()).await.map_err(OpenError::Connect)?;
    let (head, leftover) = read_head(&mut socket, sent + HEAD_TIMEOUT).await.map_err(OpenError::Head)?;
    Ok(Opened { socket, head, leftover, sent, head_after: sent.elapsed() })
}

/// `POST`s `body` as JSON and returns the status and (a bounded prefix of) the answer.
async fn post_json(url: &HttpUrl, token: &str, body: &str) -> Result<(u16, String), String> {
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nUser-Agent: sse-fanout-doctor\r\n\r\n{body}",
        url.path_and_query,
        url.authority(),
        body.len()
    );
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    let mut socket = send_request(url, request.as_bytes()).await?;
    let (head, mut raw) = read_head(&mut socket, deadline).await.map_err(|e| e.to_string())?;
    let mut framing = head.framing();
    let mut answer = Vec::new();
    loop {
        if framing.decode(&mut raw, &mut answer)? || answer.len() >= MAX_PUBLISH_BODY {
            break;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Err(e)) => return Err(format!("read error: {e}")),
            Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    answer.truncate(MAX_PUBLISH_BODY);
    Ok((head.status, String::from_utf8_lossy(&answer).into_owned()))
}

/// The verdict of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        })
    }
}

/// Prints findings as they are made, so an operator watching a 35 s heartbeat wait sees the
/// earlier lines at once, and counts the failures for the exit code.
#[derive(Debug, Default)]
struct Report {
    fails: usize,
    warns: usize,
}

impl Report {
    fn line(&mut self, verdict: Verdict, check: &str, detail: impl fmt::Display) {
        match verdict {
            Verdict::Fail => self.fails += 1,
            Verdict::Warn => self.warns += 1,
            Verdict::Ok => {}
        }
        println!("{verdict:<4}  {check:<18} {detail}");
    }
}

/// The verdicts about a response head, one per header that matters.
pub fn judge_head(head: &ResponseHead) -> Vec<(Verdict, &'static str, String)> {
    let mut lines = Vec::new();
    let status = match head.status {
        200 => (Verdict::Ok, "200".to_owned()),
        s => (Verdict::Fail, format!("{s} (expected 200)")),
    };
    lines.push((status.0, "status", status.1));
    if head.status != 200 {
        return lines;
    }
    let content_type = head.header("content-type").unwrap_or("");
    lines.push(if content_type.to_ascii_lowercase().starts_with("text/event-stream") {
        (Verdict::Ok, "content-type", content_type.to_owned())
    } else {
        (Verdict::Fail, "content-type", format!("{content_type:?} (expected text/event-stream)"))
    });
    lines.push(match head.header("content-encoding") {
        None => (Verdict::Ok, "compression", "none".to_owned()),
        Some(e) if e.eq_ignore_ascii_case("identity") => (Verdict::Ok, "compression", "none".to_owned()),
        Some(e) => (
            Verdict::Fail,
            "compression",
            format!("Content-Encoding: {e}: a compressor holds events back until its buffer fills; turn it off for text/event-stream"),
        ),
    });
    lines.push(match head.header("x-accel-buffering") {
        Some(v) if v.eq_ignore_ascii_case("no") => (Verdict::Ok, "x-accel-buffering", "no".to_owned()),
        // nginx consumes the header (it is in proxy_hide_header by default), so its absence
        // behind nginx is normal; the timing checks below measure buffering itself.
        None => (Verdict::Ok, "x-accel-buffering", "absent (normal behind nginx, which consumes it)".to_owned()),
        Some(v) => (Verdict::Warn, "x-accel-buffering", format!("{v:?}: asks nginx to buffer")),
    });
    let cache_control = head.header("cache-control").unwrap_or("");
    lines.push(if cache_control.to_ascii_lowercase().contains("no-cache") {
        (Verdict::Ok, "cache-control", cache_control.to_owned())
    } else {
        (Verdict::Warn, "cache-control", format!("{cache_control:?}: without no-cache a cache may hold the stream"))
    });
    lines
}

/// Runs every check against `args.url`; exit 0 when nothing failed, 1 when something did, 2 when
/// the check could not start (bad URL or token).
pub async fn run(args: DoctorArgs) -> ExitCode {
    match check(&args).await {
        Ok(report) => {
            println!("doctor: {} FAIL, {} WARN", report.fails, report.warns);
            if report.fails == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// What was seen on the stream so far.
#[derive(Debug, Default)]
struct Seen {
    connected: Option<(Instant, Option<String>)>,
    probe: Option<Instant>,
    first_ping: Option<Instant>,
    pings: u32,
    disconnected: Option<String>,
    ended: Option<(Instant, String)>,
}

async fn check(args: &DoctorArgs) -> Result<Report, DoctorError> {
    let url = HttpUrl::parse(&args.url)?;
    let publish_url = match &args.publish_url {
        Some(p) => HttpUrl::parse(p)?,
        None => HttpUrl { path_and_query: "/api/publish".to_owned(), ..url.clone() },
    };
    let user = token_subject(&args.token)?;
    let mut report = Report::default();
    println!("doctor: http://{}{} as user {user:?}", url.authority(), url.path_and_query);

    // First as a browser asks (Accept-Encoding invites a compressing proxy to show itself).
    let opened = match open_stream(&url, &args.token, true).await {
        Ok(opened) => opened,
        Err(OpenError::Connect(e)) => {
            report.line(Verdict::Fail, "connect", e);
            return Ok(report);
        }
        Err(OpenError::Head(HeadError::Failed(e))) => {
            report.line(Verdict::Fail, "status", e);
            return Ok(report);
        }
        Err(OpenError::Head(HeadError::TimedOut)) => {
            report.line(
                Verdict::Fail,
                "response-head",
                format!("nothing within {HEAD_TIMEOUT:?}: something holds the whole response back (buffering or compression)"),
            );
            // A compressor holds even the head until its buffer fills; without Accept-Encoding
            // it stays out of the way, which tells it apart from other buffering.
            match open_stream(&url, &args.token, false).await {
                Ok(plain) if plain.head.status == 200 && plain.head_after < FIRST_BYTES_WAIT => {
                    report.line(
                        Verdict::Fail,
                        "compression",
                        format!(
                            "without Accept-Encoding the head came after {}: a proxy compresses text/event-stream \
                             (nginx: gzip off for the stream location); the checks below ran uncompressed",
                            ms(plain.head_after)
                        ),
                    );
                    plain
                }
                _ => return Ok(report),
            }
        }
    };
    let Opened { socket, head, leftover, sent, head_after } = opened;
    let judged = judge_head(&head);
    // A refused, mistyped or compressed response cannot be read as events: stop at the head.
    let readable = judged.iter().all(|(verdict, _, _)| *verdict != Verdict::Fail);
    for (verdict, check, detail) in judged {
        report.line(verdict, check, detail);
    }
    if !readable {
        return Ok(report);
    }
    if head_after < FIRST_BYTES_WAIT {
        report.line(Verdict::Ok, "response-head", format!("after {}", ms(head_after)));
    } else {
        report.line(
            Verdict::Fail,
            "response-head",
            format!("after {}: something between here and the node holds responses back", ms(head_after)),
        );
    }

    let mut stream = EventStream {
        socket,
        raw: leftover,
        framing: head.framing(),
        body: Vec::new(),
        parser: SseParser::default(),
        items: Default::default(),
        first_body_byte: None,
        ended: None,
    };
    stream.absorb();
    let nonce = format!("{:016x}", rand::random::<u64>());
    let mut seen = Seen::default();

    // 1. First bytes and `connected`.
    pump(&mut stream, &mut seen, &nonce, sent + FIRST_BYTES_WAIT, |s| s.connected.is_some()).await;
    match (&seen.connected, stream.first_body_byte) {
        (Some((at, node)), _) => report.line(
            Verdict::Ok,
            "first-bytes",
            format!(
                "`connected` after {} (node {})",
                ms(at.duration_since(sent)),
                node.as_deref().unwrap_or("unknown")
            ),
        ),
        (None, Some(first)) => report.line(
            Verdict::Fail,
            "first-bytes",
            format!(
                "first bytes after {} but no `connected` within {FIRST_BYTES_WAIT:?}: something buffers the stream",
                ms(first.duration_since(sent))
            ),
        ),
        (None, None) => report.line(
            Verdict::Fail,
            "first-bytes",
            format!(
                "no body bytes within {FIRST_BYTES_WAIT:?}: a proxy buffers the stream (nginx: proxy_buffering off)"
            ),
        ),
    }

    // 2. The probe: publish to the token's own user and time its arrival.
    match &args.publisher_token {
        None => report.line(Verdict::Warn, "probe", "not run: no --publisher-token"),
        Some(_) if seen.ended.is_some() => report.line(Verdict::Fail, "probe", ended(&seen, sent)),
        Some(publisher) => {
            let body = serde_json::json!({
                "users": [user],
                "event": "doctor-probe",
                "data": {"nonce": nonce},
            })
            .to_string();
            let published = Instant::now();
            match post_json(&publish_url, publisher.trim(), &body).await {
                Ok((202, _)) => {
                    pump(&mut stream, &mut seen, &nonce, published + PROBE_WAIT, |s| s.probe.is_some()).await;
                    match (seen.probe, &seen.ended) {
                        (Some(at), _) => report.line(
                            Verdict::Ok,
                            "probe",
                            format!("publish→receive {}", ms(at.duration_since(published))),
                        ),
                        (None, Some(_)) => report.line(Verdict::Fail, "probe", ended(&seen, sent)),
                        (None, None) => report.line(
                            Verdict::Fail,
                            "probe",
                            format!(
                                "published but not received within {PROBE_WAIT:?} while the stream is open: \
                                 something buffers the stream"
                            ),
                        ),
                    }
                }
                Ok((status, answer)) => report.line(
                    Verdict::Fail,
                    "probe",
                    format!(
                        "POST http://{}{} answered {status}: {}",
                        publish_url.authority(),
                        publish_url.path_and_query,
                        answer.trim()
                    ),
                ),
                Err(e) => report.line(Verdict::Fail, "probe", format!("publish failed: {e}")),
            }
        }
    }

    // 3. A heartbeat within the wait, counted from `connected` (or the head).
    if args.heartbeat_wait.is_zero() {
        report.line(Verdict::Warn, "heartbeat", "not checked (--heartbeat-wait 0)");
    } else {
        let from = seen.connected.as_ref().map_or(sent, |(at, _)| *at);
        pump(&mut stream, &mut seen, &nonce, from + args.heartbeat_wait, |s| s.first_ping.is_some()).await;
        match (seen.first_ping, &seen.ended) {
            (Some(at), _) => report.line(
                Verdict::Ok,
                "heartbeat",
                format!("first comment {} after `connected`", ms(at.saturating_duration_since(from))),
            ),
            (None, Some(_)) => report.line(Verdict::Fail, "heartbeat", ended(&seen, sent)),
            (None, None) => report.line(
                Verdict::Fail,
                "heartbeat",
                format!(
                    "no `: ping` within {:?}: heartbeats are off or held back, and idle timeouts will cut quiet streams",
                    args.heartbeat_wait
                ),
            ),
        }
    }

    // 4. How long an idle stream survives.
    if let Some(idle) = args.idle {
        pump(&mut stream, &mut seen, &nonce, sent + idle, |_| false).await;
        match &seen.ended {
            Some(_) => report.line(Verdict::Fail, "idle", format!("{} (wanted {idle:?})", ended(&seen, sent))),
            None => {
                report.line(Verdict::Ok, "idle", format!("open for {idle:?}, {} heartbeat(s) received", seen.pings))
            }
        }
    }
    Ok(report)
}

/// Reads the stream into `seen` until `done` holds, the deadline passes or the stream ends.
async fn pump(stream: &mut EventStream, seen: &mut Seen, nonce: &str, deadline: Instant, done: impl Fn(&Seen) -> bool) {
    while !done(seen) && seen.ended.is_none() {
        match stream.next(deadline).await {
            Next::TimedOut => return,
            Next::Ended(why) => seen.ended = Some((Instant::now(), why)),
            Next::Item(SseItem::Comment(_)) => {
                // Only comments after `connected` are heartbeats; anything before is preamble.
                if seen.connected.is_some() {
                    seen.pings += 1;
                    seen.first_ping.get_or_insert_with(Instant::now);
                }
            }
            Next::Item(SseItem::Event(event)) => match event.event.as_str() {
                "connected" => {
                    let node = serde_json::from_str::<serde_json::Value>(&event.data)
                        .ok()
                        .and_then(|v| v.get("node_id")?.as_str().map(str::to_owned));
                    seen.connected.get_or_insert((Instant::now(), node));
                }
                "doctor-probe" if event.data.contains(nonce) => {
                    seen.probe.get_or_insert_with(Instant::now);
                }
                "disconnected" => seen.disconnected = Some(event.data),
                _ => {}
            },
        }
    }
}

/// Describes how the stream ended, for a FAIL line.
fn ended(seen: &Seen, sent: Instant) -> String {
    let Some((at, why)) = &seen.ended else {
        return "the stream is still open".to_owned();
    };
    let farewell = seen.disconnected.as_deref().map(|d| format!(" after `disconnected` {d}")).unwrap_or_default();
    format!("the stream was cut {} after the request: {why}{farewell}", ms(at.duration_since(sent)))
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(parser: &mut SseParser, input: &[u8]) -> Vec<SseItem> {
        let mut out = Vec::new();
        parser.feed(input, &mut out).expect("valid SSE");
        out
    }

    fn event(event: &str, data: &str, id: Option<&str>) -> SseItem {
        SseItem::Event(SseEvent { event: event.into(), data: data.into(), id: id.map(Into::into) })
    }

    #[test]
    fn urls_are_split_for_a_raw_request() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/events?topic=a").expect("valid");
        assert_eq!((url.host.as_str(), url.port, url.path_and_query.as_str()), ("127.0.0.1", 8080, "/events?topic=a"));
        assert_eq!(url.authority(), "127.0.0.1:8080");
        let url = HttpUrl::parse("http://edge.example?x=1").expect("valid");
        assert_eq!((url.port, url.path_and_query.as_str(), url.authority().as_str()), (80, "/?x=1", "edge.example"));
        let url = HttpUrl::parse("http://[::1]:9000/events").expect("valid");
        assert_eq!((url.host.as_str(), url.authority().as_str()), ("::1", "[::1]:9000"));
        for bad in
            ["https://a/events", "a:80/events", "http://", "http://a:x/", "http://u@a/", "http://a/ b", "http://[::1/"]
        {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_subject_is_read_from_the_unverified_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"user-42","exp":1}"#);
        assert_eq!(token_subject(&format!("h.{payload}.s")), Ok("user-42".to_owned()));
        assert_eq!(token_subject(&format!(" h.{payload}==.s\n")), Ok("user-42".to_owned()));
        let no_sub = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":7}"#);
        assert!(token_subject(&format!("h.{no_sub}.s")).is_err());
        assert!(token_subject("h.!!!.s").is_err());
        assert!(token_subject("only.two").is_err());
        assert!(token_subject("a.b.c.d").is_err());
    }

    #[test]
    fn response_heads_parse_incrementally_and_pick_the_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello";
        assert_eq!(parse_head(&raw[..20]), Ok(None));
        let (head, len) = parse_head(raw).expect("valid").expect("complete");
        assert_eq!(&raw[len..], b"5\r\nhello");
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert!(matches!(head.framing(), Framing::Chunked(_)));
        let (head, _) =
            parse_head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\n\r\n").expect("ok").expect("complete");
        assert!(matches!(head.framing(), Framing::Length(12)));
        let (head, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").expect("ok").expect("complete");
        assert!(matches!(head.framing(), Framing::UntilClose));
        assert!(parse_head(b"SMTP nonsense\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD]).is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(MAX_HEAD + 10, b'y');
        assert!(parse_head(&long).is_err(), "an endless head is refused, not buffered");
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let raw = b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..raw.len() {
            let mut decoder = ChunkedDecoder::default();
            let mut input = raw[..split].to_vec();
            let mut out = Vec::new();
            decoder.decode(&mut input, &mut out).expect("valid");
            input.extend_from_slice(&raw[split..]);
            decoder.decode(&mut input, &mut out).expect("valid");
            assert_eq!(out, b"hello world!", "split at {split}");
            assert!(decoder.is_done(), "split at {split}");
            assert!(input.is_empty());
        }
        // Byte by byte, as a slow proxy might deliver it.
        let mut decoder = ChunkedDecoder::default();
        let (mut input, mut out) = (Vec::new(), Vec::new());
        for &b in raw.iter() {
            input.push(b);
            decoder.decode(&mut input, &mut out).expect("valid");
        }
        assert_eq!(out, b"hello world!");
        assert!(decoder.is_done());
    }

    #[test]
    fn malformed_chunks_are_errors_not_buffers() {
        for bad in [&b"zz\r\n"[..], b"\r\n", b"3\r\nabcX", b"11111111111111111\r\n"] {
            let mut input = bad.to_vec();
            assert!(ChunkedDecoder::default().decode(&mut input, &mut Vec::new()).is_err(), "{bad:?}");
        }
        let mut input = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(ChunkedDecoder::default().decode(&mut input, &mut Vec::new()).is_err());
    }

    #[test]
    fn sse_lines_follow_the_eventsource_rules() {
        let mut parser = SseParser::default();
        let items = parse_all(
            &mut parser,
            b"retry: 3000\nevent: connected\nid: c1\ndata: {\"a\":1}\n\n: ping\n\ndata: x\r\ndata:y\r\n\r\nevent: e\rdata: z\r\r",
        );
        assert_eq!(
            items,
            [
                event("connected", "{\"a\":1}", Some("c1")),
                SseItem::Comment("ping".into()),
                event("message", "x\ny", Some("c1")),
                event("e", "z", Some("c1")),
            ]
        );
    }

    #[test]
    fn sse_parsing_does_not_depend_on_how_bytes_are_split() {
        let raw = b"event: a\r\ndata: 1\r\n\r\n: ping\r\n\r\nid: 9\r\ndata: 2\r\n\r\n";
        let whole = parse_all(&mut SseParser::default(), raw);
        for split in 0..raw.len() {
            let mut parser = SseParser::default();
            let mut items = parse_all(&mut parser, &raw[..split]);
            items.extend(parse_all(&mut parser, &raw[split..]));
            assert_eq!(items, whole, "split at {split}");
        }
        assert_eq!(whole.len(), 3);
    }

    #[test]
    fn endless_sse_lines_are_refused() {
        let mut parser = SseParser::default();
        let long = vec![b'x'; MAX_SSE_LINE + 1];
        assert!(parser.feed(&long, &mut Vec::new()).is_err());
    }

    #[test]
    fn heads_are_judged_for_what_breaks_streaming() {
        let head = |headers: &[(&str, &str)]| ResponseHead {
            status: 200,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        };
        let verdicts = |h: &ResponseHead| judge_head(h).into_iter().map(|(v, c, _)| (c, v)).collect::<Vec<_>>();
        let ours = head(&[
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache, no-transform"),
            ("X-Accel-Buffering", "no"),
        ]);
        assert!(verdicts(&ours).iter().all(|(_, v)| *v == Verdict::Ok));
        let gzipped =
            head(&[("content-type", "text/event-stream"), ("content-encoding", "gzip"), ("cache-control", "no-cache")]);
        assert!(verdicts(&gzipped).contains(&("compression", Verdict::Fail)));
        let html = head(&[("content-type", "text/html")]);
        assert!(verdicts(&html).contains(&("content-type", Verdict::Fail)));
        assert!(verdicts(&html).contains(&("cache-control", Verdict::Warn)));
        let refused = ResponseHead { status: 401, headers: vec![] };
        assert_eq!(verdicts(&refused), [("status", Verdict::Fail)]);
    }
}
