//! `sse-loadtest floor`: the cheapest SSE fan-out there can be, measured beside the real
//! servers to show what this machine and the load generator allow. It answers every request
//! with an event-stream head, subscribes to one Redis channel, and writes each message to
//! every stream with one non-blocking `send` — no authentication, ids, queues, heartbeats or
//! task per stream. Whatever latency and CPU per delivery it shows, no server can go below
//! here; a target under it is a target for the machine, not for the server.
//!
//! It keeps no queue: a stream whose socket cannot take a whole event is closed and counted,
//! so a slow reader shows up as loss in the load generator instead of being hidden.

use std::borrow::Cow;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::http_stream::read_head;

const RESPONSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";

/// The open streams, in no particular order; the fan-out locks it once per message.
type Streams = Arc<Mutex<Vec<StdStream>>>;

pub async fn serve(listen: SocketAddr, redis_url: &str, channel: &str) -> Result<()> {
    if !listen.ip().is_loopback() {
        bail!("the floor server listens on loopback only");
    }
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let client = redis::Client::open(redis_url).with_context(|| format!("redis url {redis_url}"))?;
    let mut pubsub = client.get_async_pubsub().await.with_context(|| format!("connecting to {redis_url}"))?;
    pubsub.subscribe(channel).await.with_context(|| format!("subscribing to {channel}"))?;
    eprintln!("floor: listening on {listen}, fanning out Redis channel {channel}");

    let streams = Streams::default();
    tokio::spawn(accept_loop(listener, streams.clone()));
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let frame = frame(msg.get_payload_bytes());
        let mut open = streams.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = fan_out(&mut open, &frame);
        if closed > 0 {
            eprintln!("floor: closed {closed} stream(s) that could not take a whole event; {} open", open.len());
        }
    }
    bail!("the Redis subscription ended")
}

async fn accept_loop(listener: TcpListener, streams: Streams) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let streams = streams.clone();
                tokio::spawn(async move {
                    if let Ok(sock) = admit(sock).await {
                        streams.lock().unwrap_or_else(PoisonError::into_inner).push(sock);
                    }
                });
            }
            // Out of descriptors: the load generator sees the failures; wait for some to close.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads one request head, whatever it asks for, and answers with the stream's head. The
/// socket leaves the runtime: from here on only the fan-out's `send`s touch it.
async fn admit(mut sock: TcpStream) -> Result<StdStream> {
    sock.set_nodelay(true)?;
    let mut head = Vec::with_capacity(512);
    if read_head(&mut sock, &mut head).await?.is_none() {
        bail!("closed or too large before the end of its request head");
    }
    sock.write_all(RESPONSE_HEAD).await?;
    Ok(sock.into_std()?)
}

/// What the load generator's Redis publisher sends: `{"event": …, "data": …}`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    data: Cow<'a, str>,
}

/// The SSE event for one published payload: the envelope's `data` if it is one, the payload
/// as it is otherwise, one `data:` line per line.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let data: Cow<'_, [u8]> = match serde_json::from_slice::<Envelope>(payload) {
        Ok(Envelope { data: Cow::Borrowed(s) }) => Cow::Borrowed(s.as_bytes()),
        Ok(Envelope { data: Cow::Owned(s) }) => Cow::Owned(s.into_bytes()),
        Err(_) => Cow::Borrowed(payload),
    };
    let mut out = Vec::with_capacity(data.len() + 16);
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// Writes `frame` to every stream with one `send` each; a stream that fails or takes only
/// part of it is closed. Returns how many were closed.
pub fn fan_out(streams: &mut Vec<StdStream>, frame: &[u8]) -> usize {
    let before = streams.len();
    let mut i = 0;
    while i < streams.len() {
        let taken = loop {
            match (&streams[i]).write(frame) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        if matches!(taken, Ok(n) if n == frame.len()) {
            i += 1;
        } else {
            streams.swap_remove(i);
        }
    }
    before - streams.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{Shutdown, TcpListener as StdListener};
    use std::process::{Child, Command, Stdio};
    use tokio::io::AsyncReadExt;

    #[test]
    fn frames_the_envelope_data_or_the_raw_payload() {
        assert_eq!(frame(br#"{"event":"bench","data":"7:123:xx"}"#), b"data: 7:123:xx\n\n");
        assert_eq!(frame(br#"{"data":"a\nb"}"#), b"data: a\ndata: b\n\n", "escaped newlines split lines");
        assert_eq!(frame(b"raw\r\nline"), b"data: raw\ndata: line\n\n");
        assert_eq!(frame(b""), b"data: \n\n");
    }

    fn pair(listener: &StdListener) -> (StdStream, StdStream) {
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    #[test]
    fn fan_out_writes_every_stream_and_drops_closed_ones() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let (mut a, sa) = pair(&listener);
        let (b, sb) = pair(&listener);
        let (mut c, sc) = pair(&listener);
        drop(b);
        sb.shutdown(Shutdown::Write).unwrap();
        let mut streams = vec![sa, sb, sc];
        assert_eq!(fan_out(&mut streams, b"data: 1\n\n"), 1, "the shut-down stream is closed");
        assert_eq!(streams.len(), 2);
        for reader in [&mut a, &mut c] {
            let mut got = [0u8; 9];
            reader.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"data: 1\n\n");
        }
    }

    #[test]
    fn a_stream_that_cannot_take_a_whole_event_is_closed() {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let (_reader, server) = pair(&listener);
        let mut streams = vec![server];
        let big = vec![b'x'; 1 << 20];
        let mut closed = 0;
        // The reader never reads: the socket fills within a few megabytes.
        for _ in 0..64 {
            closed += fan_out(&mut streams, &big);
            if closed > 0 {
                break;
            }
        }
        assert_eq!(closed, 1);
        assert!(streams.is_empty());
    }

    struct Redis(Child);
    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Through a real redis-server: a stream opened on the floor gets what is published.
    #[tokio::test]
    async fn delivers_what_is_published_to_its_channel() {
        let redis_port = free_port();
        let _redis = Redis(
            Command::new("redis-server")
                .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server is installed by scripts/test"),
        );
        let url = format!("redis://127.0.0.1:{redis_port}");
        let client = redis::Client::open(url.clone()).unwrap();
        // Bounded waits: a server that never comes up fails the test instead of hanging it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut redis = loop {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "redis-server did not start: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        };
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let server = tokio::spawn(async move { serve(listen, &url, "floor-test").await });
        let mut sock = loop {
            assert!(!server.is_finished(), "the floor server stopped");
            match TcpStream::connect(listen).await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "the floor server did not start: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        };
        sock.write_all(b"GET /sub/u1 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout_at(deadline, sock.read(&mut buf)).await.expect("the head in time").unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, RESPONSE_HEAD);

        // The stream joins the fan-out right after its head is written: publish until the
        // floor's subscription counts and the event arrives.
        let payload = r#"{"event":"bench","data":"1:42:x"}"#;
        got.clear();
        for _ in 0..100 {
            let _: i64 = redis::cmd("PUBLISH").arg("floor-test").arg(payload).query_async(&mut redis).await.unwrap();
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), sock.read(&mut buf)).await {
                got.extend_from_slice(&buf[..n]);
                break;
            }
        }
        assert!(got.starts_with(b"data: 1:42:x\n\n"), "{:?}", String::from_utf8_lossy(&got));
        server.abort();
    }
}
