//! What a client can hold: requests (head and body) are timed out by SSE_REQUEST_TIMEOUT, and a
//! bad token is refused before its body is read. The file-exhaustion side (the
//! pending-connection bound) is in tests/limits.rs.

mod common;

use std::time::{Duration, Instant};

use common::{Node, token};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far above any delay the node adds on a loaded machine.
const WAIT: Duration = Duration::from_secs(10);

/// A raw HTTP/1.1 response: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Reads one response with a `Content-Length` body; `None` if the connection closes first or
/// nothing complete arrives within `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<Answer> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buffer = Vec::new();
    loop {
        if let Some(answer) = parse_answer(&String::from_utf8_lossy(&buffer)) {
            return Some(answer);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A complete response with a `Content-Length` body at the start of `text`.
fn parse_answer(text: &str) -> Option<Answer> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))?
        .1
        .trim()
        .parse()
        .ok()?;
    (body.len() >= length).then(|| Answer { status, body: body[..length].to_owned() })
}

/// True once the node has closed `stream` (EOF or reset), within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn connect(node: &Node) -> TcpStream {
    TcpStream::connect(("127.0.0.1", node.port)).await.expect("connect")
}

async fn rejected(node: &Node, reason: &str) -> f64 {
    node.metric("sse_connections_rejected_total", &format!("reason=\"{reason}\"")).await
}

// ------------------------------------------------------------------------------------------------
// SSE_REQUEST_TIMEOUT
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_body_sent_a_byte_at_a_time_is_cut_off_at_the_request_timeout() {
    let node = Node::start(&[("SSE_REQUEST_TIMEOUT", "1s")]).await;
    let mut client = connect(&node).await;
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{",
        token("producer", &[], Some("publisher"))
    );
    client.write_all(head.as_bytes()).await.expect("head");
    // One more byte every 200 ms: never idle long, never done. Before the fix this went on for
    // as long as the client liked (97 s in the issue).
    let started = Instant::now();
    let (mut reader, mut writer) = client.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Read as it arrives: the 408 is in before the node resets the connection over the bytes
    // still coming (an error then ends the read; what was read stays in the buffer).
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut buffer)).await;
    trickle.abort();
    assert!(read.is_ok(), "the connection was still open after {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&buffer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""error":"request_timeout""#), "{text}");
    assert!(rejected(&node, "request_timeout").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_sent_a_line_at_a_time_is_cut_off_at_the_request_timeout() {
    let node = Node::start(&[("SSE_REQUEST_TIMEOUT", "1s")]).await;
    for first_line in ["GET /events HTTP/1.1\r\n", "GET /healthz HTTP/1.1\r\n"] {
        let mut client = connect(&node).await;
        client.write_all(first_line.as_bytes()).await.expect("first line");
        let (mut reader, mut writer) = client.into_split();
        let trickle = tokio::spawn(async move {
            while writer.write_all(b"X-Slow: 1\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // The old head timeout was a fixed 10 s: 7 s tells the two apart with room to spare.
        let mut buffer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(7), reader.read_to_end(&mut buffer)).await;
        trickle.abort();
        assert!(read.is_ok(), "{first_line:?}: the connection outlived the 1 s request timeout");
    }
    assert!(rejected(&node, "request_timeout").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_time_is_answered_and_its_keep_alive_connection_serves_the_next() {
    let node = Node::start(&[("SSE_REQUEST_TIMEOUT", "1s")]).await;
    let mut client = connect(&node).await;
    let body = r#"{"users":["u1"],"data":"x"}"#;
    let publish = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        token("producer", &[], Some("publisher")),
        body.len()
    );
    for _ in 0..3 {
        client.write_all(publish.as_bytes()).await.expect("request");
        let answer = read_answer(&mut client, WAIT).await.expect("an answer");
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    // Idle past the timeout: a kept-alive connection is closed, not held.
    assert!(closed_within(&mut client, WAIT).await, "an idle kept-alive connection stays open");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_on_publish_is_refused_without_waiting_for_the_body() {
    // A minute: an answer within seconds can only be the early refusal.
    let node = Node::start(&[("SSE_REQUEST_TIMEOUT", "60s")]).await;
    for authorization in ["Bearer not-a-token", "Bearer ", ""] {
        let mut client = connect(&node).await;
        let head = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\n{}Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"users\":",
            if authorization.is_empty() { String::new() } else { format!("Authorization: {authorization}\r\n") }
        );
        client.write_all(head.as_bytes()).await.expect("head and the start of the body");
        let answer = read_answer(&mut client, WAIT).await.expect("refused before the body arrived");
        assert_eq!(answer.status, 401, "{answer:?}");
        assert!(matches!(answer.json()["error"].as_str(), Some("invalid_token" | "missing_token")), "{answer:?}");
        // The unread body is not waited for either: the connection is closed.
        assert!(closed_within(&mut client, WAIT).await, "the connection waits for a body it will never read");
    }
}
