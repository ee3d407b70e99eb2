//! `SSE_ENABLE_COMPRESSION` (README, "Compression"): a client that sends `Accept-Encoding:
//! gzip` gets a gzip stream whose decoded bytes are exactly what a plain stream carries (user,
//! topic and broadcast events, small stored and large deflated ones, heartbeats, a resume's
//! replay, the farewell), each event decodable the moment it arrives, and a valid trailer when the
//! stream ends cleanly; everyone else gets the plain stream. On both serving paths, read over a
//! raw socket so that the test sees the bytes as they come.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// Which way the node serves the stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// `GET /events` is the connection's first request.
    Raw,
    /// A kept-alive connection that asked for something else first goes to hyper.
    Hyper,
}

/// An event stream read off the socket as it arrives: the response head, the body with the
/// chunk framing removed, and (for a gzip stream) what a streaming gzip decoder made of it so
/// far.
struct Stream {
    socket: TcpStream,
    head: String,
    /// Wire bytes not yet de-chunked.
    wire: Vec<u8>,
    /// The body as sent (gzip or plain).
    body: Vec<u8>,
    /// Fed the body as it comes, for a gzip stream.
    inflater: Option<flate2::write::GzDecoder<Vec<u8>>>,
    /// Read up to here by [`Stream::until`].
    cursor: usize,
    /// The last chunk arrived, or the socket closed.
    ended: bool,
}

impl Stream {
    async fn open(node: &Node, path: Path, query: &str, headers: &[(&str, &str)]) -> Self {
        let mut socket = TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect");
        let mut wire = Vec::new();
        if path == Path::Hyper {
            socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
            loop {
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(WAIT, socket.read(&mut buf)).await.expect("in time").expect("read");
                assert!(n > 0, "closed after /healthz");
                wire.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&wire).contains("\"ok\"}") {
                    break;
                }
            }
            wire.clear();
        }
        let mut request = format!("GET /events?{query} HTTP/1.1\r\nHost: x\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).await.expect("write");
        let head_end = loop {
            if let Some(at) = wire.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, socket.read(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0, "closed before the response head: {}", String::from_utf8_lossy(&wire));
            wire.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&wire[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let wire = wire.split_off(head_end);
        let inflater = head.contains("content-encoding: gzip").then(|| flate2::write::GzDecoder::new(Vec::new()));
        let mut stream = Self { socket, head, wire, body: Vec::new(), inflater, cursor: 0, ended: false };
        stream.dechunk();
        stream
    }

    fn gzip(&self) -> bool {
        self.inflater.is_some()
    }

    /// What the stream carried so far, decoded.
    fn text(&self) -> String {
        let bytes = match &self.inflater {
            Some(inflater) => inflater.get_ref(),
            None => &self.body,
        };
        String::from_utf8(bytes.clone()).expect("UTF-8")
    }

    /// Moves whole chunks from `wire` to `body` (and the inflater).
    fn dechunk(&mut self) {
        loop {
            let Some(line_end) = self.wire.windows(2).position(|w| w == b"\r\n") else { return };
            let size = std::str::from_utf8(&self.wire[..line_end]).expect("ascii size line");
            let size = usize::from_str_radix(size, 16).expect("hex chunk size");
            if self.wire.len() < line_end + 2 + size + 2 {
                return;
            }
            let data = self.wire[line_end + 2..line_end + 2 + size].to_vec();
            self.wire.drain(..line_end + 2 + size + 2);
            if size == 0 {
                self.ended = true;
                return;
            }
            if let Some(inflater) = &mut self.inflater {
                inflater.write_all(&data).expect("the gzip stream decodes as it comes");
                inflater.flush().expect("flush");
            }
            self.body.extend_from_slice(&data);
        }
    }

    /// Reads until the decoded stream holds `needle` past what earlier calls consumed; returns
    /// the text up to and including it. Nothing is asked of the server meanwhile: an event that
    /// only decodes once more bytes follow would never be found.
    async fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text();
            if let Some(at) = text[self.cursor..].find(needle) {
                let found = text[self.cursor..self.cursor + at + needle.len()].to_owned();
                self.cursor += at + needle.len();
                return found;
            }
            assert!(!self.ended, "the stream ended without {needle:?}; it carried:\n{text}");
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(left, self.socket.read(&mut buf)).await;
            let Ok(read) = read else {
                panic!("{needle:?} did not decode within {WAIT:?} (gzip: {}); so far:\n{}", self.gzip(), tail(&text))
            };
            let n = read.expect("read");
            if n == 0 {
                self.ended = true;
            }
            self.wire.extend_from_slice(&buf[..n]);
            self.dechunk();
        }
    }

    /// Reads to the end of the body (its last chunk); the node closes the connection after it.
    async fn read_to_end_of_stream(&mut self) {
        while !self.ended {
            let mut buf = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(WAIT, self.socket.read(&mut buf)).await.expect("the body ends").expect("read");
            assert!(n > 0, "the connection closed without the last chunk");
            self.wire.extend_from_slice(&buf[..n]);
            self.dechunk();
        }
    }

    /// The whole body decoded in one go, checking the gzip trailer (CRC32 and length).
    fn gunzip_whole(&self) -> std::io::Result<String> {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&self.body[..]).read_to_string(&mut out)?;
        Ok(out)
    }
}

fn tail(text: &str) -> &str {
    let from = text.len().saturating_sub(600);
    let from = (from..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    &text[from..]
}

/// JSON of about `size` bytes, as producers send it.
fn json_of(size: usize, tag: &str) -> String {
    let mut items = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while text.len() < size {
        items.push(json!({"id": i, "tag": tag, "name": format!("item {i}"), "price": i * 7 % 100, "ok": i % 3 == 0}));
        text = json!({"items": items}).to_string();
        i += 1;
    }
    text
}

/// The stream without what differs between two streams of one user: its `connected` event
/// (which names the connection), heartbeats (each stream's come at its own moment among the
/// events) and `retry:` (the drain's is jittered per stream).
fn comparable(text: &str) -> String {
    text.split_inclusive("\n\n")
        .filter(|block| {
            !block.starts_with("event: connected\n") && *block != ": ping\n\n" && !block.starts_with("retry: ")
        })
        .collect()
}

fn query(topics: &[&str], token: &str) -> String {
    let mut query = format!("access_token={token}");
    for topic in topics {
        query.push_str(&format!("&topic={topic}"));
    }
    query
}

const GZIP: &[(&str, &str)] = &[("accept-encoding", "gzip, deflate, br")];

/// The events both paths' tests publish: to the user, a topic and broadcast; a small one
/// (stored), a 4 KB and a 32 KB one and one just above the default threshold (deflated).
async fn publish_mix(node: &Node, user: &str, streams: &mut [&mut Stream]) -> Vec<String> {
    let payloads = [
        (json!({"users": [user], "event": "small", "data": {"n": 1}}), "event: small\n".to_owned()),
        (json!({"topics": ["t"], "event": "large", "data": json_of(4096, "topic")}), "\"tag\":\"topic\"".to_owned()),
        (
            json!({"broadcast": true, "event": "huge", "data": json_of(32768, "broadcast")}),
            "\"tag\":\"broadcast\"".to_owned(),
        ),
        (json!({"users": [user], "data": "x".repeat(600)}), "x".repeat(600)),
    ];
    let mut seen = Vec::new();
    for (body, needle) in payloads {
        assert_eq!(publish_api(node, body).await.0, 202);
        // Each event is decoded from what arrived before the next one is published.
        for stream in streams.iter_mut() {
            stream.until(&needle).await;
            stream.until("\n\n").await;
        }
        seen.push(needle);
    }
    seen
}

async fn a_gzip_stream_is_the_plain_stream_compressed(path: Path) {
    let node = Node::start(&[
        ("SSE_ENABLE_COMPRESSION", "true"),
        ("SSE_HISTORY", "false"),
        ("SSE_HEARTBEAT_INTERVAL", "1s"),
        ("SSE_DRAIN_PERIOD", "1s"),
    ])
    .await;
    let token = token("gz", &["*"], None);
    let q = query(&["t"], &token);
    let mut plain = Stream::open(&node, path, &q, &[]).await;
    let mut gzip = Stream::open(&node, path, &q, GZIP).await;
    assert!(!plain.gzip() && gzip.gzip(), "plain: {}\ngzip: {}", plain.head, gzip.head);
    assert!(gzip.head.contains("vary: accept-encoding"), "{}", gzip.head);
    assert!(plain.head.contains("vary: accept-encoding"), "{}", plain.head);
    assert!(gzip.body.starts_with(&[0x1f, 0x8b, 8]), "a gzip header first");
    gzip.until("event: connected\n").await;
    plain.until("event: connected\n").await;

    publish_mix(&node, "gz", &mut [&mut plain, &mut gzip]).await;
    gzip.until(": ping\n\n").await;
    plain.until(": ping\n\n").await;
    // A clean end: the drain's farewell, then (gzip) the trailer and the last chunk.
    node.signal("TERM");
    for stream in [&mut plain, &mut gzip] {
        stream.until("event: disconnected\ndata: {\"reason\":\"shutdown\"}\n\n").await;
        stream.read_to_end_of_stream().await;
    }
    let whole = gzip.gunzip_whole().expect("the whole body is a valid gzip member (CRC and length checked)");
    assert_eq!(whole, gzip.text());
    assert!(
        comparable(&whole) == comparable(&plain.text()),
        "gzip:\n{}\nplain:\n{}",
        tail(&whole),
        tail(&plain.text())
    );
    assert!(whole.starts_with("retry: "), "{}", &whole[..40]);
    // It was worth it: the large events were deflated, not stored.
    assert!(gzip.body.len() * 3 < plain.body.len(), "{} gzip bytes for {} plain", gzip.body.len(), plain.body.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_raw_path_a_gzip_stream_is_the_plain_stream_compressed() {
    a_gzip_stream_is_the_plain_stream_compressed(Path::Raw).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_hyper_path_a_gzip_stream_is_the_plain_stream_compressed() {
    a_gzip_stream_is_the_plain_stream_compressed(Path::Hyper).await;
}

/// A stream whose token runs out ends cleanly too (`token_expired`), with a valid trailer.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_at_its_tokens_exp_ends_its_gzip_member() {
    let node =
        Node::start(&[("SSE_ENABLE_COMPRESSION", "true"), ("SSE_JWT_LEEWAY", "0"), ("SSE_HISTORY", "false")]).await;
    for path in [Path::Raw, Path::Hyper] {
        let token = token_with(json!({"sub": "exp", "exp": unix_now() + 3, "topics": ["*"]}));
        let mut stream = Stream::open(&node, path, &query(&[], &token), GZIP).await;
        assert!(stream.gzip());
        assert_eq!(publish_api(&node, json!({"users": ["exp"], "data": json_of(2000, "x")})).await.0, 202);
        stream.until("\"tag\":\"x\"").await;
        stream.until("event: disconnected\ndata: {\"reason\":\"token_expired\"}\n\n").await;
        stream.read_to_end_of_stream().await;
        let whole = stream.gunzip_whole().unwrap_or_else(|e| panic!("{path:?}: not a valid gzip member: {e}"));
        assert_eq!(whole, stream.text());
    }
}

/// A resume replays through the same encoder: what a gzip stream resuming from a cursor decodes
/// to is what a plain one resuming from it reads (history on, with Redis: `id:` cursors are the
/// stream's own, stored blocks around shared deflated frames).
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_gzip_stream_replays_what_a_plain_one_does() {
    let redis = RedisServer::start().await;
    let node =
        Node::start(&[("SSE_REDIS_URL", &redis.url()), ("SSE_ENABLE_COMPRESSION", "true"), ("SSE_DRAIN_PERIOD", "1s")])
            .await;
    let token = token("re", &["*"], None);
    let q = query(&["t"], &token);
    let mut first = Stream::open(&node, Path::Raw, &q, GZIP).await;
    first.until("event: connected\n").await;
    let block = first.until("\n\n").await;
    let cursor = block.lines().find_map(|l| l.strip_prefix("id: ")).expect("connected carries a cursor").to_owned();
    drop(first);
    // Missed while away: small and large, on every channel kind.
    let mut producer = Producer::connect(&redis).await;
    producer.durable("sse:user:re", &json!({"data": "missed small"}).to_string()).await;
    producer.durable("sse:topic:t", &json!({"data": json_of(4096, "missed-topic")}).to_string()).await;
    let broadcast = json!({"event": "b", "data": json_of(32768, "missed-broadcast")}).to_string();
    producer.durable("sse:broadcast", &broadcast).await;
    let resume = [("last-event-id", cursor.as_str())];
    let mut plain = Stream::open(&node, Path::Raw, &q, &resume).await;
    let mut gzip = Stream::open(&node, Path::Raw, &q, &[resume[0], GZIP[0]]).await;
    assert!(gzip.gzip() && !plain.gzip());
    // And live after the replay (which goes channel by channel, in the cursor's order).
    assert_eq!(publish_api(&node, json!({"users": ["re"], "data": json_of(1000, "live")})).await.0, 202);
    for stream in [&mut plain, &mut gzip] {
        let replayed = stream.until("\"tag\":\"live\"").await;
        for missed in ["missed small", "missed-topic", "missed-broadcast"] {
            assert!(replayed.contains(missed), "gzip {}: {missed} was not replayed", stream.gzip());
        }
    }
    node.signal("TERM");
    for stream in [&mut plain, &mut gzip] {
        stream.until("event: disconnected\n").await;
        stream.read_to_end_of_stream().await;
    }
    let whole = gzip.gunzip_whole().expect("a valid gzip member");
    // Cursors carry the second they were made: compare the events, not the `id:` lines.
    let events = |text: &str| -> String {
        comparable(text).lines().filter(|l| !l.starts_with("id: ")).collect::<Vec<_>>().join("\n")
    };
    assert!(events(&whole) == events(&plain.text()), "gzip:\n{}\nplain:\n{}", tail(&whole), tail(&plain.text()));
    assert_eq!(whole.matches("id: ").count(), plain.text().matches("id: ").count(), "every event carries its cursor");
}

/// Without `Accept-Encoding: gzip` (absent, refused with `q=0`, or other codings only), or with
/// compression off, the stream is plain.
#[tokio::test(flavor = "multi_thread")]
async fn streams_are_plain_unless_compression_is_on_and_the_client_takes_gzip() {
    let on = Node::start(&[("SSE_ENABLE_COMPRESSION", "true"), ("SSE_HISTORY", "false")]).await;
    let off = Node::start(&[("SSE_HISTORY", "false")]).await;
    let token = token("p", &["*"], None);
    let q = query(&[], &token);
    for (node, headers, gzip) in [
        (&on, vec![], false),
        (&on, vec![("accept-encoding", "gzip;q=0, deflate")], false),
        (&on, vec![("accept-encoding", "br, identity")], false),
        (&on, vec![("accept-encoding", "*;q=0.5")], true),
        (&off, GZIP.to_vec(), false),
    ] {
        for path in [Path::Raw, Path::Hyper] {
            let mut stream = Stream::open(node, path, &q, &headers).await;
            assert_eq!(stream.gzip(), gzip, "{path:?} {headers:?}: {}", stream.head);
            assert_eq!(stream.head.contains("vary: accept-encoding"), std::ptr::eq(node, &on), "{}", stream.head);
            let text = stream.until("event: connected\n").await;
            assert!(text.starts_with("retry: "), "{text}");
        }
    }
}
