//! `sse-fanout doctor <url>`: checks one event stream end to end, through whatever proxies sit
//! between the operator and the nodes, and prints one OK/WARN/FAIL line per finding.
//!
//! It reads a raw `TcpStream` with the `sse-wire` readers (response head, body framing, SSE
//! parsing) rather than with an HTTP library, because what it must see is exactly what a proxy
//! delivers and when: a library that buffers or decompresses would hide the very faults the
//! command exists to find (proxy buffering, compression, idle cuts). Every buffer is bounded
//! and every wait has a deadline, since the peer may be any server. It speaks HTTP/1.1, over
//! plain TCP for `http://` and over TLS for `https://` ([`tls`]: trust, the socket type, and
//! the ALPN probe that reports whether the edge offers browsers HTTP/2).
//!
//! `check` runs the checks in order, one function each, over one `Session` (the stream's
//! head, its first bytes, a published probe, a heartbeat, and optionally an idle wait).
//! It does not own the node's behaviour: it only reads what `/events` and `/api/publish` answer.

mod tls;

use std::collections::VecDeque;
use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sse_wire::{BodyDecoder, Framing, HeadReader, Item, ResponseHead, SseParser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::DoctorArgs;
use tls::{Socket, Trust};

/// Largest SSE line and largest event data; the node caps publishes at 256 KiB by default.
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
    #[error("{0:?} is not an http:// or https:// URL")]
    Url(String),
    #[error("{0}")]
    Tls(String),
    #[error("the token is not a JWT with a string `sub` claim ({0})")]
    Token(&'static str),
}

/// An `http(s)://host[:port]/path?query` URL, split for a raw request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https://`: TLS to the host.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, DoctorError> {
        let bad = || DoctorError::Url(url.to_owned());
        let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            (None, None) => return Err(bad()),
        };
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
            None if tls => 443,
            None => 80,
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(bad());
        }
        Ok(Self { tls, host: host.to_owned(), port, path_and_query: path })
    }

    fn default_port(&self) -> u16 {
        if self.tls { 443 } else { 80 }
    }

    /// `http(s)://host[:port]`, for what the doctor prints.
    pub fn origin(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.authority())
    }

    /// `host[:port]` as sent in `Host` and used for the default publish URL.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == self.default_port() { host } else { format!("{host}:{}", self.port) }
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
/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    Item(Item),
    TimedOut,
    Ended(String),
}

/// An open event stream: the socket, its body framing and the SSE parser.
struct EventStream {
    socket: Socket,
    framing: Framing,
    body: BodyDecoder,
    parser: SseParser,
    /// Body bytes decoded from one read, parsed at once (kept for its capacity).
    decoded: Vec<u8>,
    items: VecDeque<Item>,
    first_body_byte: Option<Instant>,
    ended: Option<String>,
}

impl EventStream {
    /// The stream after its head; `leftover` is what came with the head.
    fn new(socket: Socket, head: &ResponseHead, leftover: &[u8]) -> Self {
        let framing = head.framing();
        let mut stream = Self {
            socket,
            framing,
            body: BodyDecoder::new(framing),
            parser: SseParser::new().with_max_line(MAX_SSE_LINE).with_max_data(MAX_SSE_DATA),
            decoded: Vec::new(),
            items: VecDeque::new(),
            first_body_byte: None,
            ended: None,
        };
        stream.absorb(leftover);
        stream
    }

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
                        Framing::Chunked => "the connection closed without the final chunk".to_owned(),
                        _ => "the connection closed".to_owned(),
                    });
                    continue;
                }
                Ok(Ok(n)) => n,
            };
            self.absorb(&buf[..n]);
        }
    }

    /// Decodes bytes read from the socket into items.
    fn absorb(&mut self, raw: &[u8]) {
        let decoded = &mut self.decoded;
        if let Err(e) = self.body.decode(raw, |body| decoded.extend_from_slice(body)) {
            self.ended = Some(format!("malformed body: {e}"));
            return;
        }
        if !self.decoded.is_empty() && self.first_body_byte.is_none() {
            self.first_body_byte = Some(Instant::now());
        }
        let items = &mut self.items;
        let parsed = self.parser.feed(&self.decoded, |item| items.push_back(item.to_owned_item()));
        self.decoded.clear();
        if let Err(e) = parsed {
            self.ended = Some(e.to_string());
        } else if self.body.is_done() {
            self.ended = Some("the server ended the response".to_owned());
        }
    }
}

/// How the doctor connects: the TLS client configurations for `https://` URLs.
struct Connector {
    /// For the checks: ALPN `http/1.1`, the protocol they speak.
    http1: Arc<rustls::ClientConfig>,
    /// For the protocol probe: what a browser offers, HTTP/2 first.
    browser: Arc<rustls::ClientConfig>,
}

impl Connector {
    fn new(trust: &Trust) -> Result<Self, DoctorError> {
        Ok(Self {
            http1: tls::client_config(trust, &[b"http/1.1"]).map_err(DoctorError::Tls)?,
            browser: tls::client_config(trust, &[b"h2", b"http/1.1"]).map_err(DoctorError::Tls)?,
        })
    }

    /// A TCP connection to `url`, with TLS over it for `https://` (using `config`).
    async fn connect(
        &self,
        url: &HttpUrl,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<(Socket, Option<tls::Negotiated>), String> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| format!("no TCP connection to {} within {CONNECT_TIMEOUT:?}", url.authority()))?
            .map_err(|e| format!("cannot connect to {}: {e}", url.authority()))?;
        if !url.tls {
            return Ok((Socket::Plain(tcp), None));
        }
        let (socket, negotiated) = tokio::time::timeout_at(deadline, tls::handshake(tcp, &url.host, config.clone()))
            .await
            .map_err(|_| format!("no TLS handshake with {} within {CONNECT_TIMEOUT:?}", url.authority()))??;
        Ok((socket, Some(negotiated)))
    }

    /// Connects and sends one request; returns the socket.
    async fn send_request(&self, url: &HttpUrl, request: &[u8]) -> Result<Socket, String> {
        let (mut socket, _) = self.connect(url, &self.http1).await?;
        socket.write_all(request).await.map_err(|e| format!("cannot send the request: {e}"))?;
        Ok(socket)
    }
}

/// Why no response head was read.
#[derive(Debug)]
enum NoHead {
    TimedOut,
    Failed(String),
}

impl fmt::Display for NoHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoHead::TimedOut => f.write_str("no response head in time"),
            NoHead::Failed(e) => f.write_str(e),
        }
    }
}

/// Reads a response head; returns it with the body bytes that came along.
async fn read_head(socket: &mut Socket, deadline: Instant) -> Result<(ResponseHead, Vec<u8>), NoHead> {
    let mut reader = HeadReader::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut chunk))
            .await
            .map_err(|_| NoHead::TimedOut)?
            .map_err(|e| NoHead::Failed(format!("read error: {e}")))?;
        if n == 0 {
            return Err(NoHead::Failed("the connection closed before a response head".to_owned()));
        }
        if let Some(head) = reader.feed(&chunk[..n]).map_err(|e| NoHead::Failed(e.to_string()))? {
            return Ok((head, reader.body().to_vec()));
        }
    }
}

/// A stream request that got its response head.
struct Opened {
    socket: Socket,
    head: ResponseHead,
    leftover: Vec<u8>,
    /// When the request was sent; the stream's timings count from here.
    sent: Instant,
    head_after: Duration,
}

enum OpenError {
    Connect(String),
    Head(NoHead),
}

/// Sends `GET <url>` as an EventSource would, with or without `Accept-Encoding`.
async fn open_stream(
    connector: &Connector,
    url: &HttpUrl,
    token: &str,
    accept_encoding: bool,
) -> Result<Opened, OpenError> {
    let encoding = if accept_encoding { "Accept-Encoding: gzip, deflate, br\r\n" } else { "" };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{encoding}\
         Authorization: Bearer {}\r\nUser-Agent: sse-fanout-doctor\r\n\r\n",
        url.path_and_query,
        url.authority(),
        token.trim()
    );
    let sent = Instant::now();
    let mut socket = connector.send_request(url, request.as_bytes()).await.map_err(OpenError::Connect)?;
    let (head, leftover) = read_head(&mut socket, sent + HEAD_TIMEOUT).await.map_err(OpenError::Head)?;
    Ok(Opened { socket, head, leftover, sent, head_after: sent.elapsed() })
}

/// `POST`s `body` as JSON and returns the status and (a bounded prefix of) the answer.
async fn post_json(connector: &Connector, url: &HttpUrl, token: &str, body: &str) -> Result<(u16, String), String> {
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nUser-Agent: sse-fanout-doctor\r\n\r\n{body}",
        url.path_and_query,
        url.authority(),
        body.len()
    );
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    let mut socket = connector.send_request(url, request.as_bytes()).await?;
    let (head, leftover) = read_head(&mut socket, deadline).await.map_err(|e| e.to_string())?;
    let mut decoder = BodyDecoder::new(head.framing());
    let mut answer = Vec::new();
    let mut keep = |raw: &[u8], answer: &mut Vec<u8>| {
        decoder
            .decode(raw, |part| answer.extend_from_slice(&part[..part.len().min(MAX_PUBLISH_BODY - answer.len())]))
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(decoder.is_done() || answer.len() >= MAX_PUBLISH_BODY)
    };
    let mut complete = keep(&leftover, &mut answer)?;
    while !complete {
        let mut chunk = [0u8; 4096];
        complete = match tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Err(e)) => return Err(format!("read error: {e}")),
            Ok(Ok(n)) => keep(&chunk[..n], &mut answer)?,
        };
    }
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

/// Where the checks point: the stream, where to publish the probe, and the token's user.
struct Target {
    url: HttpUrl,
    publish_url: HttpUrl,
    user: String,
}

impl Target {
    fn from_args(args: &DoctorArgs) -> Result<Self, DoctorError> {
        let url = HttpUrl::parse(&args.url)?;
        let publish_url = match &args.publish_url {
            Some(p) => HttpUrl::parse(p)?,
            None => HttpUrl { path_and_query: "/api/publish".to_owned(), ..url.clone() },
        };
        let user = token_subject(&args.token)?;
        Ok(Self { url, publish_url, user })
    }
}

/// The stream the checks read, what they saw on it, and when it was requested.
struct Session {
    stream: EventStream,
    seen: Seen,
    /// Marks this run's probe, so an earlier run's cannot be mistaken for it.
    nonce: String,
    sent: Instant,
}

impl Session {
    /// Reads the stream into `seen` until `done` holds, the deadline passes or the stream ends.
    async fn pump(&mut self, deadline: Instant, done: impl Fn(&Seen) -> bool) {
        let seen = &mut self.seen;
        while !done(seen) && seen.ended.is_none() {
            match self.stream.next(deadline).await {
                Next::TimedOut => return,
                Next::Ended(why) => seen.ended = Some((Instant::now(), why)),
                Next::Item(Item::Comment(_)) => {
                    // Only comments after `connected` are heartbeats; anything before is preamble.
                    if seen.connected.is_some() {
                        seen.pings += 1;
                        seen.first_ping.get_or_insert_with(Instant::now);
                    }
                }
                Next::Item(Item::Retry(_)) => {}
                Next::Item(Item::Event(event)) => match event.event.as_str() {
                    "connected" => {
                        let node = serde_json::from_str::<serde_json::Value>(&event.data)
                            .ok()
                            .and_then(|v| v.get("node_id")?.as_str().map(str::to_owned));
                        seen.connected.get_or_insert((Instant::now(), node));
                    }
                    "doctor-probe" if event.data.contains(&self.nonce) => {
                        seen.probe.get_or_insert_with(Instant::now);
                    }
                    "disconnected" => seen.disconnected = Some(event.data),
                    _ => {}
                },
            }
        }
    }

    /// Describes how the stream ended, for a FAIL line.
    fn ended(&self) -> String {
        let Some((at, why)) = &self.seen.ended else {
            return "the stream is still open".to_owned();
        };
        let farewell =
            self.seen.disconnected.as_deref().map(|d| format!(" after `disconnected` {d}")).unwrap_or_default();
        format!("the stream was cut {} after the request: {why}{farewell}", ms(at.duration_since(self.sent)))
    }
}

/// Runs the checks in order; each prints its lines as it finishes.
async fn check(args: &DoctorArgs) -> Result<Report, DoctorError> {
    let target = Target::from_args(args)?;
    let trust = match (&args.ca_file, args.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => Trust::Insecure,
        (None, false) => Trust::Platform,
    };
    let connector = Connector::new(&trust)?;
    let mut report = Report::default();
    println!("doctor: {}{} as user {:?}", target.url.origin(), target.url.path_and_query, target.user);
    if target.url.tls {
        check_protocol(&connector, &target.url, &mut report).await;
    }
    let Some(opened) = check_open(&connector, &target.url, &args.token, &mut report).await else {
        return Ok(report);
    };
    let Some(mut session) = check_head(opened, &mut report) else {
        return Ok(report);
    };
    check_first_bytes(&mut session, &mut report).await;
    check_probe(&connector, &mut session, &target, args.publisher_token.as_deref(), &mut report).await;
    check_heartbeat(&mut session, args.heartbeat_wait, &mut report).await;
    if let Some(idle) = args.idle {
        check_idle(&mut session, idle, &mut report).await;
    }
    Ok(report)
}

/// What a browser gets from a TLS edge: the TLS version and the protocol ALPN settles when HTTP/2
/// is offered first, as browsers do. The checks after it speak HTTP/1.1 on their own connection.
async fn check_protocol(connector: &Connector, url: &HttpUrl, report: &mut Report) {
    match connector.connect(url, &connector.browser).await {
        Err(e) => report.line(Verdict::Fail, "tls", e),
        Ok((_, negotiated)) => {
            let negotiated = negotiated.unwrap_or(tls::Negotiated { version: String::new(), alpn: None });
            report.line(Verdict::Ok, "tls", &negotiated.version);
            match negotiated.alpn.as_deref() {
                Some("h2") => report.line(
                    Verdict::Ok,
                    "protocol",
                    "h2 (ALPN): a browser multiplexes every stream to this origin on one connection",
                ),
                other => report.line(
                    Verdict::Warn,
                    "protocol",
                    format!(
                        "{} (ALPN, h2 offered first): HTTP/1.1 only, so a browser holds at most six streams to \
                         this origin per profile and a seventh tab waits (nginx: nginx/tls.conf.template)",
                        other.unwrap_or("none")
                    ),
                ),
            }
        }
    }
}

/// Opens the stream, first as a browser asks (`Accept-Encoding` invites a compressing proxy to
/// show itself); if the head does not come, asks again without it to tell compression apart
/// from other buffering. `None` when there is no stream to read.
async fn check_open(connector: &Connector, url: &HttpUrl, token: &str, report: &mut Report) -> Option<Opened> {
    match open_stream(connector, url, token, true).await {
        Ok(opened) => Some(opened),
        Err(OpenError::Connect(e)) => {
            report.line(Verdict::Fail, "connect", e);
            None
        }
        Err(OpenError::Head(NoHead::Failed(e))) => {
            report.line(Verdict::Fail, "status", e);
            None
        }
        Err(OpenError::Head(NoHead::TimedOut)) => {
            report.line(
                Verdict::Fail,
                "response-head",
                format!("nothing within {HEAD_TIMEOUT:?}: something holds the whole response back (buffering or compression)"),
            );
            // A compressor holds even the head until its buffer fills; without Accept-Encoding
            // it stays out of the way, which tells it apart from other buffering.
            match open_stream(connector, url, token, false).await {
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
                    Some(plain)
                }
                _ => None,
            }
        }
    }
}

/// Judges the response head and how soon it came; `None` when the body cannot be read as events
/// (refused, mistyped or compressed).
fn check_head(opened: Opened, report: &mut Report) -> Option<Session> {
    let Opened { socket, head, leftover, sent, head_after } = opened;
    let judged = judge_head(&head);
    let readable = judged.iter().all(|(verdict, _, _)| *verdict != Verdict::Fail);
    for (verdict, check, detail) in judged {
        report.line(verdict, check, detail);
    }
    if !readable {
        return None;
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
    Some(Session {
        stream: EventStream::new(socket, &head, &leftover),
        seen: Seen::default(),
        nonce: format!("{:016x}", rand::random::<u64>()),
        sent,
    })
}

/// The first body bytes and the `connected` event arrive promptly.
async fn check_first_bytes(session: &mut Session, report: &mut Report) {
    let sent = session.sent;
    session.pump(sent + FIRST_BYTES_WAIT, |s| s.connected.is_some()).await;
    match (&session.seen.connected, session.stream.first_body_byte) {
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
}

/// A probe published to the token's own user arrives on the stream, and how fast.
async fn check_probe(
    connector: &Connector,
    session: &mut Session,
    target: &Target,
    publisher: Option<&str>,
    report: &mut Report,
) {
    let Some(publisher) = publisher else {
        report.line(Verdict::Warn, "probe", "not run: no --publisher-token");
        return;
    };
    if session.seen.ended.is_some() {
        report.line(Verdict::Fail, "probe", session.ended());
        return;
    }
    let body = serde_json::json!({
        "users": [target.user],
        "event": "doctor-probe",
        "data": {"nonce": session.nonce},
    })
    .to_string();
    let published = Instant::now();
    match post_json(connector, &target.publish_url, publisher.trim(), &body).await {
        Ok((202, _)) => {
            session.pump(published + PROBE_WAIT, |s| s.probe.is_some()).await;
            match (session.seen.probe, &session.seen.ended) {
                (Some(at), _) => {
                    report.line(Verdict::Ok, "probe", format!("publish→receive {}", ms(at.duration_since(published))))
                }
                (None, Some(_)) => report.line(Verdict::Fail, "probe", session.ended()),
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
                "POST {}{} answered {status}: {}",
                target.publish_url.origin(),
                target.publish_url.path_and_query,
                answer.trim()
            ),
        ),
        Err(e) => report.line(Verdict::Fail, "probe", format!("publish failed: {e}")),
    }
}

/// A heartbeat comes within the wait, counted from `connected` (or the request).
async fn check_heartbeat(session: &mut Session, wait: Duration, report: &mut Report) {
    if wait.is_zero() {
        report.line(Verdict::Warn, "heartbeat", "not checked (--heartbeat-wait 0)");
        return;
    }
    let from = session.seen.connected.as_ref().map_or(session.sent, |(at, _)| *at);
    session.pump(from + wait, |s| s.first_ping.is_some()).await;
    match (session.seen.first_ping, &session.seen.ended) {
        (Some(at), _) => report.line(
            Verdict::Ok,
            "heartbeat",
            format!("first comment {} after `connected`", ms(at.saturating_duration_since(from))),
        ),
        (None, Some(_)) => report.line(Verdict::Fail, "heartbeat", session.ended()),
        (None, None) => report.line(
            Verdict::Fail,
            "heartbeat",
            format!(
                "no `: ping` within {wait:?}: heartbeats are off or held back, and idle timeouts will cut quiet streams"
            ),
        ),
    }
}

/// The stream survives `idle` (from the request) without being cut.
async fn check_idle(session: &mut Session, idle: Duration, report: &mut Report) {
    session.pump(session.sent + idle, |_| false).await;
    match &session.seen.ended {
        Some(_) => report.line(Verdict::Fail, "idle", format!("{} (wanted {idle:?})", session.ended())),
        None => {
            report.line(Verdict::Ok, "idle", format!("open for {idle:?}, {} heartbeat(s) received", session.seen.pings))
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_for_a_raw_request() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/events?topic=a").expect("valid");
        assert_eq!((url.host.as_str(), url.port, url.path_and_query.as_str()), ("127.0.0.1", 8080, "/events?topic=a"));
        assert_eq!(url.authority(), "127.0.0.1:8080");
        let url = HttpUrl::parse("http://edge.example?x=1").expect("valid");
        assert_eq!((url.port, url.path_and_query.as_str(), url.authority().as_str()), (80, "/?x=1", "edge.example"));
        let url = HttpUrl::parse("http://[::1]:9000/events").expect("valid");
        assert_eq!((url.host.as_str(), url.authority().as_str()), ("::1", "[::1]:9000"));
        let url = HttpUrl::parse("https://edge.example/events").expect("valid");
        assert_eq!((url.tls, url.port, url.authority().as_str()), (true, 443, "edge.example"));
        assert_eq!(url.origin(), "https://edge.example");
        let url = HttpUrl::parse("https://127.0.0.1:8443/events").expect("valid");
        assert_eq!((url.tls, url.origin().as_str()), (true, "https://127.0.0.1:8443"));
        assert!(!HttpUrl::parse("http://a/").expect("valid").tls);
        for bad in [
            "ftp://a/events",
            "a:80/events",
            "http://",
            "https://",
            "http://a:x/",
            "http://u@a/",
            "http://a/ b",
            "http://[::1/",
        ] {
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
    fn heads_are_judged_for_what_breaks_streaming() {
        let head = |headers: &[(&str, &str)]| ResponseHead {
            version: 1,
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
        let refused = ResponseHead { version: 1, status: 401, headers: vec![] };
        assert_eq!(verdicts(&refused), [("status", Verdict::Fail)]);
    }
}
