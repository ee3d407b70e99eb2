//! Publishing stamped messages at a set rate through one of four paths: Redis `PUBLISH`,
//! durable publish with `FCALL`, sse-fanout's HTTP publish API, or a generic HTTP POST from
//! URL and body templates (Nchan's and Pushpin's publish endpoints). The Redis paths speak to
//! a Redis Cluster too (`redis+cluster://` URL: `SPUBLISH` and the two-key `FCALL` on the
//! owning primary, see `cluster`).
//!
//! The pacer stamps each message when it is due, not when a connection gets round to
//! sending it, so a slow publish path shows up as latency instead of hiding in a queue
//! (no coordinated omission). Sequence numbers are consecutive per receiving stream (see
//! `tracking`), so the pacer also tells the subscribers' check what to expect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::Rng;
use serde::Serialize;
use sse_wire::{BodyDecoder, HeadReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::time::Instant;

use crate::cluster::{self, SlotMap};
use crate::jwt::Minter;
use crate::payload::{self, Stamp, now_nanos};
use crate::target::split_url;
use crate::tracking::Expect;

/// Who a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Broadcast,
    User(u64),
}

/// How messages reach the server.
#[derive(Debug, Clone)]
pub enum Via {
    /// `PUBLISH <channel> <envelope>`.
    Redis { url: String },
    /// `FCALL <function> 1 <channel> <envelope>` (durable: recorded for resume).
    Fcall { url: String, function: String },
    /// sse-fanout's `POST /api/publish` with a publisher token.
    HttpApi { url: String, secret: String },
    /// Any server's publish endpoint: `{channel}` in the URL, `{data}` and `{channel}` in
    /// the body, and extra headers.
    HttpPost { url: String, body: String, headers: Vec<String> },
}

/// Everything about publishing that does not change between steps.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub via: Via,
    /// Channel templates for broadcast and per-user messages (`{user}` in the latter).
    pub channel_broadcast: String,
    pub channel_user: String,
    pub user_prefix: String,
    pub event: String,
    pub payload_bytes: usize,
    pub payload_fill: payload::Fill,
    /// Concurrent HTTP connections (HTTP publishers) or in-flight pipelines (Redis).
    pub concurrency: usize,
}

impl PublishSpec {
    fn channel(&self, dest: Dest) -> String {
        match dest {
            Dest::Broadcast => self.channel_broadcast.clone(),
            Dest::User(u) => self.channel_user.replace("{user}", &format!("{}{}", self.user_prefix, u)),
        }
    }

    /// The producer envelope sse-fanout reads from Redis.
    fn envelope(&self, data: &str) -> String {
        serde_json::json!({ "event": self.event, "data": data }).to_string()
    }
}

/// Hands out sequence numbers, consecutive per stream, and remembers the last ones.
#[derive(Debug, Clone, Default)]
pub struct Sequencer {
    broadcast: u64,
    users: Vec<u64>,
}

impl Sequencer {
    pub fn new(users: u64) -> Self {
        Self { broadcast: 0, users: vec![0; users as usize] }
    }

    pub fn next(&mut self, dest: Dest) -> u64 {
        match dest {
            Dest::Broadcast => {
                self.broadcast += 1;
                self.broadcast
            }
            Dest::User(u) => {
                let s = &mut self.users[u as usize];
                *s += 1;
                *s
            }
        }
    }

    pub fn expect(&self) -> Expect {
        if self.broadcast > 0 {
            Expect { broadcast_last: Some(self.broadcast), user_last: None }
        } else {
            Expect { broadcast_last: None, user_last: Some(self.users.clone()) }
        }
    }

    /// Messages each subscriber of `dest` kind should have had so far, summed over `clients`
    /// clients (each user has `clients / users` streams).
    pub fn deliveries_expected(&self, clients: u64) -> u64 {
        if self.broadcast > 0 {
            self.broadcast * clients
        } else {
            let per_user = clients / self.users.len().max(1) as u64;
            self.users.iter().sum::<u64>() * per_user
        }
    }
}

/// What one paced step achieved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PublishStats {
    pub target_rate: f64,
    pub sent: u64,
    pub errors: u64,
    pub achieved_rate: f64,
}

struct Msg {
    dest: Dest,
    data: String,
}

/// A running publisher: connections opened once, used by every step.
pub struct Publisher {
    spec: Arc<PublishSpec>,
    tx: mpsc::Sender<Vec<Msg>>,
    errors: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
}

impl Publisher {
    pub async fn start(spec: PublishSpec) -> Result<Self> {
        let spec = Arc::new(spec);
        let (tx, rx) = mpsc::channel::<Vec<Msg>>(4096);
        let rx = Arc::new(Mutex::new(rx));
        let errors = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        match &spec.via {
            Via::Redis { url } | Via::Fcall { url, .. } => {
                let shards = Shards::connect(url).await?;
                tokio::spawn(redis_loop(spec.clone(), shards, rx, errors.clone(), done.clone()));
            }
            Via::HttpApi { url, .. } | Via::HttpPost { url, .. } => {
                split_url(url)?;
                for _ in 0..spec.concurrency.max(1) {
                    tokio::spawn(http_loop(spec.clone(), rx.clone(), errors.clone(), done.clone()));
                }
            }
        }
        Ok(Self { spec, tx, errors, done })
    }

    /// Publishes `rate` messages per second for `secs`, to destinations from `pick`.
    pub async fn run_step(
        &self,
        seq: &mut Sequencer,
        rate: f64,
        secs: f64,
        mut pick: impl FnMut() -> Dest,
    ) -> Result<PublishStats> {
        let total = (rate * secs).round() as u64;
        let begin = Instant::now();
        let errors_before = self.errors.load(Ordering::Relaxed);
        let done_before = self.done.load(Ordering::Relaxed);
        let mut sent = 0u64;
        while sent < total {
            let due = ((begin.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            if due > sent {
                let now = now_nanos();
                let batch: Vec<Msg> = (sent..due)
                    .map(|_| {
                        let dest = pick();
                        let stamp = Stamp { seq: seq.next(dest), sent_nanos: now };
                        Msg { dest, data: payload::encode(stamp, self.spec.payload_bytes, self.spec.payload_fill) }
                    })
                    .collect();
                sent = due;
                self.tx.send(batch).await.context("publisher stopped")?;
            }
            if sent < total {
                let next_at = begin + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(next_at.max(Instant::now() + Duration::from_millis(1))).await;
            }
        }
        // Wait (bounded) until every message of the step has been handed to the server.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.done.load(Ordering::Relaxed) - done_before < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = begin.elapsed().as_secs_f64();
        Ok(PublishStats {
            target_rate: rate,
            sent,
            errors: self.errors.load(Ordering::Relaxed) - errors_before,
            achieved_rate: sent as f64 / elapsed.max(1e-9),
        })
    }
}

/// Picks a uniformly random user for unicast.
pub fn random_user(users: u64) -> impl FnMut() -> Dest {
    let mut rng = rand::rng();
    move || Dest::User(rng.random_range(0..users.max(1)))
}

/// How long a publish pipeline may wait for Redis's answer before it counts as failed. Not
/// redis-rs's 500 ms: on a saturated machine a pipeline Redis did run can take longer, and that
/// is latency (the messages are stamped when due, so it shows in the percentiles), not loss.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Redis commands go: one Redis, or a cluster's primaries, each message to the one that
/// owns its channel's slot (`cluster`).
struct Shards {
    conns: Vec<redis::aio::MultiplexedConnection>,
    /// `None` for a single Redis.
    map: Option<SlotMap>,
}

impl Shards {
    async fn connect(url: &str) -> Result<Self> {
        let Some(seeds) = cluster::seeds(url) else {
            let client = redis::Client::open(url).context("bad Redis URL")?;
            let mut conn = client.get_multiplexed_async_connection().await.context("connecting to Redis")?;
            conn.set_response_timeout(PUBLISH_TIMEOUT);
            return Ok(Self { conns: vec![conn], map: None });
        };
        let map = cluster::slot_map(&seeds).await.context("reading the cluster's slot map")?;
        let mut conns = Vec::new();
        for primary in &map.primaries {
            let client = redis::Client::open(format!("redis://{primary}")).context("bad primary address")?;
            let mut conn =
                client.get_multiplexed_async_connection().await.with_context(|| format!("connecting to {primary}"))?;
            conn.set_response_timeout(PUBLISH_TIMEOUT);
            conns.push(conn);
        }
        Ok(Self { conns, map: Some(map) })
    }

    /// The command that publishes `body` to `channel`, and the connection it goes out on.
    fn command(&self, via: &Via, channel: &str, body: String) -> (usize, redis::Cmd) {
        let mut cmd;
        let Some(map) = &self.map else {
            match via {
                Via::Fcall { function, .. } => {
                    cmd = redis::cmd("FCALL");
                    cmd.arg(function).arg(1).arg(channel).arg(body);
                }
                _ => {
                    cmd = redis::cmd("PUBLISH");
                    cmd.arg(channel).arg(body);
                }
            }
            return (0, cmd);
        };
        let name = cluster::cluster_name(channel);
        match via {
            Via::Fcall { function, .. } => {
                cmd = redis::cmd("FCALL");
                cmd.arg(function).arg(2).arg(&name).arg(format!("{name}:epoch")).arg(body);
            }
            _ => {
                cmd = redis::cmd("SPUBLISH");
                cmd.arg(&name).arg(body);
            }
        }
        (map.owner_of(name.as_bytes()), cmd)
    }
}

async fn redis_loop(
    spec: Arc<PublishSpec>,
    shards: Shards,
    rx: Arc<Mutex<mpsc::Receiver<Vec<Msg>>>>,
    errors: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) {
    let inflight = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    loop {
        let Some(batch) = rx.lock().await.recv().await else {
            return;
        };
        // One pipeline per connection the batch needs (a cluster's primaries).
        let mut pipes: Vec<(redis::Pipeline, u64)> = (0..shards.conns.len()).map(|_| (redis::pipe(), 0)).collect();
        for m in &batch {
            let (shard, cmd) = shards.command(&spec.via, &spec.channel(m.dest), spec.envelope(&m.data));
            let (pipe, n) = &mut pipes[shard];
            pipe.add_command(cmd).ignore();
            *n += 1;
        }
        for (shard, (pipe, n)) in pipes.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                return;
            };
            let mut conn = shards.conns[shard].clone();
            let (errors, done) = (errors.clone(), done.clone());
            tokio::spawn(async move {
                let r: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
                if let Err(e) = r {
                    errors.fetch_add(n, Ordering::Relaxed);
                    eprintln!("publish: {e}");
                }
                done.fetch_add(n, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
}

async fn http_loop(
    spec: Arc<PublishSpec>,
    rx: Arc<Mutex<mpsc::Receiver<Vec<Msg>>>>,
    errors: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) {
    let publisher_token = match &spec.via {
        Via::HttpApi { secret, .. } => Minter::new(secret).mint("sse-loadtest", &[], Some("publisher")).ok(),
        _ => None,
    };
    let mut conn = HttpConn::default();
    loop {
        let Some(batch) = rx.lock().await.recv().await else {
            return;
        };
        for m in batch {
            let ok = match build_request(&spec, publisher_token.as_deref(), &m) {
                Ok((addr, req)) => {
                    // A kept-alive connection the server closed fails once; retry on a new one.
                    match conn.post(addr, &req).await {
                        Ok(s) => (200..300).contains(&s),
                        Err(_) => matches!(conn.post(addr, &req).await, Ok(s) if (200..300).contains(&s)),
                    }
                }
                Err(_) => false,
            };
            if !ok {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn build_request(spec: &PublishSpec, token: Option<&str>, m: &Msg) -> Result<(std::net::SocketAddr, Vec<u8>)> {
    let channel = spec.channel(m.dest);
    let (url, body, headers): (String, String, &[String]) = match &spec.via {
        Via::HttpApi { url, .. } => {
            let body = match m.dest {
                Dest::Broadcast => serde_json::json!({
                    "broadcast": true, "event": spec.event, "data": m.data
                }),
                Dest::User(u) => serde_json::json!({
                    "users": [format!("{}{}", spec.user_prefix, u)], "event": spec.event, "data": m.data
                }),
            };
            (url.clone(), body.to_string(), &[])
        }
        Via::HttpPost { url, body, headers } => (
            url.replace("{channel}", &channel),
            body.replace("{channel}", &channel).replace("{data}", &m.data),
            headers,
        ),
        _ => bail!("not an HTTP publisher"),
    };
    let (addr, host, path) = split_url(&url)?;
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n", body.len());
    if matches!(spec.via, Via::HttpApi { .. }) {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for h in headers {
        req.push_str(&h.replace("{channel}", &channel));
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    Ok((addr, req.into_bytes()))
}

/// A kept-alive HTTP/1.1 connection for publishing, one request at a time.
#[derive(Default)]
struct HttpConn {
    stream: Option<TcpStream>,
    /// Reused for every response, so its buffer is allocated once.
    head: HeadReader,
}

impl HttpConn {
    /// Sends one request and reads the whole response; returns the status.
    async fn post(&mut self, addr: std::net::SocketAddr, req: &[u8]) -> Result<u16> {
        if self.stream.is_none() {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let result = self.exchange(req).await;
        if !matches!(result, Ok((_, true))) {
            self.stream = None;
        }
        result.map(|(status, _)| status)
    }

    /// `(status, connection reusable)`.
    async fn exchange(&mut self, req: &[u8]) -> Result<(u16, bool)> {
        let stream = self.stream.as_mut().context("no connection")?;
        stream.write_all(req).await?;
        self.head.reset();
        let mut chunk = [0u8; 4096];
        let head = loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before response");
            }
            if let Some(h) = self.head.feed(&chunk[..n])? {
                break h;
            }
        };
        // The body is read to its end and dropped: only the status matters here.
        let mut body = BodyDecoder::new(head.framing());
        let mut used = body.decode(self.head.body(), |_| {})?;
        let mut unread = self.head.body().len() - used;
        while !body.is_done() {
            let k = stream.read(&mut chunk).await?;
            if k == 0 {
                body.at_close().context("connection closed in response body")?;
                return Ok((head.status, false));
            }
            used = body.decode(&chunk[..k], |_| {})?;
            unread = k - used;
        }
        // Bytes after the response would be a second response nobody asked for.
        let reusable = !head.closes() && unread == 0;
        Ok((head.status, reusable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_per_stream() {
        let mut s = Sequencer::new(3);
        assert_eq!(s.next(Dest::User(1)), 1);
        assert_eq!(s.next(Dest::User(1)), 2);
        assert_eq!(s.next(Dest::User(2)), 1);
        assert_eq!(s.expect().user_last, Some(vec![0, 2, 1]));
        assert_eq!(s.deliveries_expected(6), 6);
        let mut b = Sequencer::new(3);
        b.next(Dest::Broadcast);
        b.next(Dest::Broadcast);
        assert_eq!(b.expect().broadcast_last, Some(2));
        assert_eq!(b.deliveries_expected(10), 20);
    }

    #[test]
    fn renders_generic_posts() {
        let spec = PublishSpec {
            via: Via::HttpPost {
                url: "http://127.0.0.1:8091/pub/{channel}".into(),
                body: "{data}".into(),
                headers: vec!["X-Channel: {channel}".into()],
            },
            channel_broadcast: "broadcast".into(),
            channel_user: "user_{user}".into(),
            user_prefix: "u".into(),
            event: "bench".into(),
            payload_bytes: 0,
            payload_fill: payload::Fill::X,
            concurrency: 1,
        };
        let m = Msg { dest: Dest::User(7), data: "1:2:".into() };
        let (addr, req) = build_request(&spec, None, &m).unwrap();
        assert_eq!(addr.port(), 8091);
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("POST /pub/user_u7 HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("X-Channel: user_u7\r\n"));
        assert!(req.ends_with("Content-Length: 4\r\nX-Channel: user_u7\r\n\r\n1:2:"));
    }

    #[test]
    fn envelope_is_what_the_node_reads() {
        let spec = PublishSpec {
            via: Via::Redis { url: String::new() },
            channel_broadcast: "sse:broadcast".into(),
            channel_user: "sse:user:{user}".into(),
            user_prefix: "u".into(),
            event: "bench".into(),
            payload_bytes: 0,
            payload_fill: payload::Fill::X,
            concurrency: 1,
        };
        assert_eq!(spec.envelope("1:2:"), r#"{"data":"1:2:","event":"bench"}"#);
        assert_eq!(spec.channel(Dest::User(3)), "sse:user:u3");
    }
}
