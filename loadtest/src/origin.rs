//! `sse-loadtest origin`: the small backend Pushpin needs in front of it. Pushpin holds the
//! client streams itself; the origin only answers each new stream once, telling Pushpin (in
//! GRIP headers) to hold it open as an SSE stream subscribed to the broadcast channel and the
//! user's channel, then forgets it. It is kept cheap — one task per proxy connection, no
//! per-stream state — so Pushpin's own cost is what the benchmark measures.
//!
//! `GET /sub/<user>` → 200 `text/event-stream`, `Grip-Hold: stream`,
//! `Grip-Channel: broadcast, user_<user>`, a keep-alive comment every 30 s, and a first
//! `event: connected` like sse-fanout's.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::http_stream::read_head;

pub async fn serve(listen: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() {
        anyhow::bail!("the origin listens on loopback only");
    }
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    eprintln!("origin: listening on {listen}");
    loop {
        let (sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = handle(sock).await;
        });
    }
}

/// Serves requests on one kept-alive proxy connection.
async fn handle(mut sock: TcpStream) -> Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let Some(end) = read_head(&mut sock, &mut buf).await? else { return Ok(()) };
        let response = respond(&buf[..end]);
        buf.drain(..end);
        sock.write_all(response.as_bytes()).await?;
    }
}

/// The GRIP answer for one request head.
pub fn respond(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or(b"");
    let line = String::from_utf8_lossy(line);
    let path = line.split(' ').nth(1).unwrap_or("/");
    let user = path
        .strip_prefix("/sub/")
        .map(|u| u.split(['?', '/']).next().unwrap_or(""))
        .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    match user {
        Some(user) => {
            let body = format!("event: connected\ndata: {{\"user\":\"{user}\"}}\n\n");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nGrip-Hold: stream\r\n\
Grip-Channel: broadcast, user_{user}\r\nGrip-Keep-Alive: :\\n\\n; format=cstring; timeout=30\r\n\
Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grip_headers_for_a_user() {
        let r = respond(b"GET /sub/u42 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Grip-Channel: broadcast, user_u42\r\n"));
        assert!(r.ends_with("\r\n\r\nevent: connected\ndata: {\"user\":\"u42\"}\n\n"));
        let body_len = r.split("\r\n\r\n").nth(1).unwrap().len();
        assert!(r.contains(&format!("Content-Length: {body_len}\r\n")));
    }

    #[test]
    fn refuses_other_paths() {
        assert!(respond(b"GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(respond(b"GET /sub/a%0d HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}
