//! `GET /events` served straight on the socket, without hyper's per-connection machinery.
//!
//! An event stream only ever writes after its request: hyper would keep an 8 KiB read
//! buffer, an 8 KiB head buffer and its dispatcher state alive for the whole life of the
//! stream (measured: 12.5 KB RSS per idle stream, 8.7 KB with jemalloc). Here the request head
//! is read once into a small buffer and dropped; the stream then costs its socket, one small
//! task and its hub entry. Once the head is out the socket moves into the stream's connection,
//! and the fan-out writes events into it directly (see [`crate::connection`]). This task
//! writes only what the socket could not take at once, in batches framed and written by
//! [`crate::wire`] (HTTP/1.1 chunks with vectored writes, sharing the hub's `Bytes` without
//! copying), and notices the client leaving. This file owns the request and the response head;
//! how body bytes are framed and sent is [`crate::wire`]'s.
//!
//! Only a connection whose *first* request is `GET /events` comes here; anything else (and
//! any later request on a kept-alive connection) is handed to hyper with the bytes already
//! read replayed in front ([`Prefixed`]). Event stream responses carry `Connection: close`,
//! so a proxy never returns such a connection to its keep-alive pool.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::content_coding;
use super::event_stream;
use super::events::{self, STREAM_HEADERS};
use crate::connection::{CloseReason, Next};
use crate::node::Node;
use crate::wire::{self, Framing, write_all};

/// Largest request head read before giving up on the fast path (hyper answers 431 then).
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed from one request.
const MAX_HEADERS: usize = 64;

/// The parts of a `GET /events` request the stream needs.
pub struct EventsRequest {
    pub headers: HeaderMap,
    pub query: Option<String>,
    /// HTTP/1.0 has no chunked encoding: the body is delimited by closing the connection.
    pub http10: bool,
}

/// Reads the first request head. Returns every byte read, and the request when it is a
/// plain `GET /events` (no body); `None` means "let hyper handle these bytes".
pub async fn read_first_request(stream: &mut TcpStream) -> io::Result<(Vec<u8>, Option<EventsRequest>)> {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::with_capacity(2048);
    loop {
        if buffer.len() == buffer.capacity() {
            if buffer.len() >= MAX_HEAD {
                return Ok((buffer, None));
            }
            buffer.reserve(buffer.len());
        }
        let read = stream.read_buf(&mut buffer).await?;
        if read == 0 {
            return Ok((buffer, None));
        }
        match parse_events_request(&buffer) {
            Parsed::Partial => continue,
            Parsed::Events(request) => return Ok((buffer, Some(request))),
            Parsed::Other => return Ok((buffer, None)),
        }
    }
}

enum Parsed {
    Partial,
    Events(EventsRequest),
    Other,
}

fn parse_events_request(buffer: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    }
    let (Some("GET"), Some(target)) = (request.method, request.path) else { return Parsed::Other };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    if path != "/events" {
        return Parsed::Other;
    }
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        else {
            return Parsed::Other;
        };
        map.append(name, value);
    }
    // A body on a GET, or an upgrade, is unusual enough to leave to hyper.
    let has_body =
        map.get("content-length").is_some_and(|v| v.as_bytes() != b"0") || map.contains_key("transfer-encoding");
    if has_body || map.contains_key("upgrade") {
        return Parsed::Other;
    }
    Parsed::Events(EventsRequest { headers: map, query, http10: request.version == Some(0) })
}

/// Opens the stream and writes it until it ends or the client goes away. `peer` is the
/// connection's TCP peer.
pub async fn serve(node: Arc<Node>, stream: TcpStream, request: EventsRequest, peer: IpAddr) {
    let stall = node.config.write_stall_timeout;
    let cors = node.origins.stream_headers(request.headers.get("origin"));
    // Boxed: a future is as large as its largest state, and opening (auth, history round trips)
    // is far larger than writing; the box is freed once the stream is open.
    let opened = match Box::pin(events::open(&node, &request.headers, request.query.as_deref(), peer, None)).await {
        Ok(opened) => opened,
        Err(error) => {
            let _ = write_response(&stream, error.into_response(), &cors, stall).await;
            return;
        }
    };
    // The address's place (SSE_IP_MAX_STREAMS) is given back when this task ends with the stream.
    let _ip_slot = opened.ip_slot;
    let framing = Framing::for_request(request.http10);
    drop(request);
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, value) in
        STREAM_HEADERS.iter().chain(content_coding::headers(node.config.enable_compression, opened.gzip))
    {
        put_header(&mut head, name.as_bytes(), value.as_bytes());
    }
    for (name, value) in &cors {
        put_header(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(&mut head, b"date", httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    put_header(&mut head, b"connection", b"close");
    if framing == Framing::Chunked {
        put_header(&mut head, b"transfer-encoding", b"chunked");
    }
    head.extend_from_slice(b"\r\n");
    let mut pieces = VecDeque::from([Bytes::from(head), opened.preamble]);
    let membership = opened.membership;
    framing.frame_batch(&mut pieces, 1);
    if let Err(error) = write_all(&stream, &mut pieces, stall).await {
        membership.end(write_failure(&error));
        return;
    }
    // From here on the dispatcher and the ticker write events straight into the socket; this
    // task writes only what they could not (a full socket) and watches for the client leaving.
    let connection = membership.connection();
    connection.attach(stream, framing);
    let Some(stream) = connection.socket() else { return };
    loop {
        tokio::select! {
            next = std::future::poll_fn(|cx| connection.poll_batch(cx, &mut pieces)) => {
                let Next::Write { events } = next else { break };
                framing.frame_batch(&mut pieces, events);
                if let Err(error) = write_all(stream, &mut pieces, stall).await {
                    membership.end(write_failure(&error));
                    return;
                }
            }
            readable = stream.readable() => {
                if readable.is_err() || client_left(stream) {
                    membership.end(CloseReason::ClientClosed);
                    return;
                }
            }
        }
    }
    // Ended: whatever closed the stream counted it; this only keeps direct writes out.
    let _ = connection.release();
    // A gzip stream that ended cleanly ends its member, then the body ends.
    pieces.extend(connection.take_trailer());
    framing.frame_batch(&mut pieces, 0);
    pieces.extend(framing.end_of_body());
    let _ = write_all(stream, &mut pieces, stall).await;
    // The socket itself closes when the connection is dropped, once the hub has let go of it.
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// Why a stream whose write failed ended: its client stopped reading, or went away.
fn write_failure(error: &io::Error) -> CloseReason {
    if wire::is_stall(error) { CloseReason::WriteStalled } else { CloseReason::ClientClosed }
}

/// The client sent more bytes (ignored) or closed its side: true when it is gone.
fn client_left(stream: &TcpStream) -> bool {
    let mut scratch = [0u8; 64];
    match stream.try_read(&mut scratch) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

async fn write_response(
    stream: &TcpStream,
    response: axum::response::Response,
    extra: &[(HeaderName, HeaderValue)],
    stall: std::time::Duration,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let mut head = Vec::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    head.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).as_bytes());
    for (name, value) in parts.headers.iter().chain(extra.iter().map(|(n, v)| (n, v))) {
        put_header(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(&mut head, b"content-length", body.len().to_string().as_bytes());
    put_header(&mut head, b"date", httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    put_header(&mut head, b"connection", b"close");
    head.extend_from_slice(b"\r\n");
    let mut pieces = VecDeque::from([Bytes::from(head), body]);
    // A TcpStream has no write buffer: once written, it is on its way.
    write_all(stream, &mut pieces, stall).await
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A socket whose first bytes were already read: replays them, then reads on. Its writes fail
/// once the socket has taken no byte for the write stall timeout, as the raw path's do, so a
/// client that stops reading a response served by hyper cannot hold its connection forever.
pub struct Prefixed {
    prefix: BytesMut,
    inner: TcpStream,
    stall: Duration,
    /// Armed when a write finds the socket full, disarmed by the next write that goes through.
    stalled_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: TcpStream, stall: Duration) -> Self {
        Self { prefix: BytesMut::from(&prefix[..]), inner, stall, stalled_at: None }
    }

    /// Follows a write's outcome: a pending write waits at most the stall timeout, counted
    /// from the first write that found the socket full.
    fn watch<T>(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.stalled_at = None;
            return written;
        }
        let stall = self.stall;
        let timer = self.stalled_at.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        std::task::ready!(timer.as_mut().poll(cx));
        event_stream::write_stalled();
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, wire::Stalled(stall))))
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = BytesMut::new(); // free the head buffer
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(head: &str) -> Option<EventsRequest> {
        match parse_events_request(head.as_bytes()) {
            Parsed::Events(request) => Some(request),
            _ => None,
        }
    }

    #[test]
    fn only_a_plain_get_of_events_takes_the_fast_path() {
        let request = events("GET /events?topic=a&access_token=t HTTP/1.1\r\nHost: x\r\nLast-Event-ID: c\r\n\r\n")
            .expect("an events request");
        assert_eq!(request.query.as_deref(), Some("topic=a&access_token=t"));
        assert_eq!(request.headers["last-event-id"], "c");
        assert!(!request.http10);
        assert!(events("GET /events HTTP/1.0\r\n\r\n").expect("1.0").http10);
        assert!(events("GET /eventsx HTTP/1.1\r\n\r\n").is_none());
        assert!(events("POST /events HTTP/1.1\r\n\r\n").is_none());
        assert!(events("GET /healthz HTTP/1.1\r\n\r\n").is_none());
        assert!(events("GET /events HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").is_none());
        assert!(events("GET /events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").is_none());
        assert!(matches!(parse_events_request(b"GET /events HTTP/1.1\r\nHost"), Parsed::Partial));
        assert!(matches!(parse_events_request(b"\x00\x01garbage\r\n\r\n"), Parsed::Other));
    }
}
