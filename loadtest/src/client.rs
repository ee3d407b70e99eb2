//! One subscriber stream's life inside a worker process: connect from a loopback source
//! address, send the GET, read the response head, then read the SSE body until it ends,
//! recording latency and sequence accounting for every bench event.
//!
//! Built to be cheap with 10,000 streams per process on one thread: a client is one task
//! with no timer while it streams, it reads into the worker's single shared buffer (the
//! runtime is single-threaded and nothing awaits while the buffer is borrowed), and a
//! stream's only own memory is its parser state (and, for a gzip-coded stream, its inflater:
//! see `gunzip`). Counters live in `Shared`, borrowed once per read, not per event.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use sse_wire::{BodyDecoder, HeadReader, ItemRef, SseParser};

use crate::awake::Awake;
use crate::gunzip::Gunzip;
use crate::jwt::Minter;
use crate::payload::{self, now_nanos};
use crate::protocol::Counters;
use crate::target::SubscribeSpec;
use crate::tracking::Track;

/// Bytes read per wake-up; one buffer serves every stream of the worker.
const READ_BUF: usize = 64 * 1024;

/// What the clients of one worker share.
pub struct Shared {
    pub spec: SubscribeSpec,
    pub workers: u64,
    pub minter: Option<Minter>,
    pub counters: RefCell<Counters>,
    /// Tracks of held clients by local index (`client / workers`).
    pub tracks: RefCell<Vec<Track>>,
    /// When the last `DropAll` or `WatchLosses` happened; clients that open after it count as
    /// "back".
    pub dropped_at: Cell<Option<u64>>,
    /// Set by `WatchLosses`: a held stream that ends counts as lost.
    pub watching_losses: Cell<bool>,
    pub awake: Awake,
    buf: RefCell<Vec<u8>>,
    /// Where gzip-coded streams are decoded to, one read at a time.
    inflated: RefCell<Vec<u8>>,
}

impl Shared {
    pub fn new(spec: SubscribeSpec, workers: u64) -> Self {
        let minter = spec.jwt_secret.as_deref().map(Minter::new);
        Self {
            spec,
            workers,
            minter,
            counters: RefCell::new(Counters { workers: 1, ..Counters::default() }),
            tracks: RefCell::default(),
            dropped_at: Cell::new(None),
            watching_losses: Cell::new(false),
            awake: Awake::default(),
            buf: RefCell::new(vec![0; READ_BUF]),
            inflated: RefCell::new(vec![0; READ_BUF]),
        }
    }

    pub fn local_index(&self, client: u64) -> usize {
        (client / self.workers) as usize
    }

    fn fail(&self, kind: &'static str) {
        *self.counters.borrow_mut().failures.entry(kind.to_string()).or_default() += 1;
    }

    /// A held stream ended while losses are watched: it is lost until it opens again. Counted
    /// once per stream, however many attempts its return takes.
    fn on_held_stream_ended(&self, client: u64) {
        if !self.watching_losses.get() {
            return;
        }
        let mut tracks = self.tracks.borrow_mut();
        if let Some(t) = tracks.get_mut(self.local_index(client))
            && t.opened
            && !t.awaiting_back
        {
            t.awaiting_back = true;
            self.counters.borrow_mut().streams_lost += 1;
        }
    }
}

/// How a client behaves.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Held for the run and checked for loss; `retry` reopens it after any failure or close.
    Held { retry: bool },
    /// Closes itself this long after its stream opened; not checked for loss.
    Churn { lifetime: Duration },
}

/// Runs client `client` until it fails without retry, completes its churn life, or is aborted.
pub async fn run(shared: Rc<Shared>, client: u64, role: Role) {
    loop {
        let ended = stream_once(&shared, client, role).await;
        match (ended, role) {
            (Ok(()), Role::Churn { .. }) => {
                shared.counters.borrow_mut().churn_closed += 1;
                return;
            }
            (Err(kind), _) => shared.fail(kind),
            (Ok(()), _) => {}
        }
        if let Role::Held { .. } = role {
            shared.on_held_stream_ended(client);
        }
        match role {
            Role::Held { retry: true } => {
                // Jitter keeps a storm of retries from arriving in lock-step.
                let pause = rand::rng().random_range(50..500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            _ => return,
        }
    }
}

/// Decrements `open` however the stream ends, abort included.
struct OpenGuard<'a>(&'a Shared);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.counters.borrow_mut().open -= 1;
    }
}

/// One connection attempt and, if it opens, the whole stream. `Err` names the failure kind.
async fn stream_once(shared: &Shared, client: u64, role: Role) -> Result<(), &'static str> {
    let spec = &shared.spec;
    let held = matches!(role, Role::Held { .. });
    let local = shared.local_index(client);
    let last_id = if held {
        shared.tracks.borrow().get(local).map(|t| t.last_id.clone()).unwrap_or_default()
    } else {
        Vec::new()
    };
    let request = spec.request(shared.minter.as_ref(), client, &last_id).map_err(|_| "token")?;
    let head_timeout = Duration::from_millis(spec.head_timeout_ms);
    let started = now_nanos();

    let mut stream = timeout(head_timeout, connect(spec.addr, spec.source_ip(client)))
        .await
        .map_err(|_| "connect_timeout")?
        .map_err(|e| classify(&e, "connect_error"))?;
    stream.write_all(&request).await.map_err(|e| classify(&e, "write_error"))?;

    // The head: accumulated in a small per-connection buffer, then dropped.
    let mut head_reader = HeadReader::new();
    let head = timeout(head_timeout, async {
        loop {
            stream.readable().await.map_err(|e| classify(&e, "read_error"))?;
            let mut buf = shared.buf.borrow_mut();
            match read_once(&stream, &mut buf[..]) {
                Ok(0) => return Err("closed_before_head"),
                Ok(n) => {
                    if let Some(h) = head_reader.feed(&buf[..n]).map_err(|_| "bad_response")? {
                        return Ok(h);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(classify(&e, "read_error")),
            }
        }
    })
    .await
    .map_err(|_| "head_timeout")??;
    if head.status != 200 {
        return Err(status_kind(head.status));
    }

    let opened = now_nanos();
    {
        let mut c = shared.counters.borrow_mut();
        c.open += 1;
        c.opened += 1;
        c.connect.record_span(started, opened);
        if held {
            let mut tracks = shared.tracks.borrow_mut();
            if let Some(t) = tracks.get_mut(local) {
                t.opened = true;
            }
            if let Some(t) = tracks.get_mut(local)
                && t.awaiting_back
            {
                t.awaiting_back = false;
                c.back += 1;
                if let Some(at) = shared.dropped_at.get() {
                    c.reconnect.record_span(at, opened);
                }
            }
        }
    }
    let _open = OpenGuard(shared);

    let gunzip = match head.header("content-encoding").map(str::trim) {
        None => None,
        Some(coding) if coding.eq_ignore_ascii_case("identity") => None,
        Some(coding) if coding.eq_ignore_ascii_case("gzip") => Some(Gunzip::default()),
        Some(_) => return Err("unknown_content_coding"),
    };
    let mut body = Body {
        decoder: BodyDecoder::new(head.framing()),
        gunzip,
        parser: SseParser::new().with_last_event_id(&last_id),
    };
    if body.process(shared, held.then_some(local), head_reader.body())? {
        return if held { Err("closed_by_server") } else { Ok(()) };
    }
    drop(head_reader);

    let deadline = match role {
        Role::Churn { lifetime } => Some(Instant::now() + lifetime),
        Role::Held { .. } => None,
    };
    loop {
        let ready = match deadline {
            Some(d) => match tokio::time::timeout_at(d, stream.readable()).await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            },
            None => stream.readable().await,
        };
        ready.map_err(|e| classify(&e, "read_error"))?;
        let mut buf = shared.buf.borrow_mut();
        match read_once(&stream, &mut buf[..]) {
            Ok(0) => return if held { Err("closed_by_server") } else { Ok(()) },
            Ok(n) => {
                shared.awake.on_read();
                if body.process(shared, held.then_some(local), &buf[..n])? {
                    return if held { Err("closed_by_server") } else { Ok(()) };
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(classify(&e, "read_error")),
        }
    }
}

/// The body side of an open stream.
struct Body {
    decoder: BodyDecoder,
    /// Present when the body is gzip-coded.
    gunzip: Option<Gunzip>,
    parser: SseParser,
}

impl Body {
    /// Feeds bytes read from the socket; `Ok(true)` when the body has ended.
    fn process(&mut self, shared: &Shared, held: Option<usize>, input: &[u8]) -> Result<bool, &'static str> {
        if input.is_empty() {
            return Ok(false);
        }
        let now = now_nanos();
        let mut counters = shared.counters.borrow_mut();
        counters.wire_bytes += input.len() as u64;
        let mut decoded = 0u64;
        let mut tracks = shared.tracks.borrow_mut();
        let mut track = held.and_then(|i| tracks.get_mut(i));
        let mut on_item = |item: ItemRef<'_>| {
            if let ItemRef::Event(ev) = item
                && let Some(stamp) = payload::decode(ev.data)
            {
                counters.received += 1;
                counters.latency.record_span(stamp.sent_nanos, now);
                if let Some(t) = track.as_deref_mut() {
                    t.on_seq(stamp.seq);
                }
            }
        };
        // Body bytes go straight from the socket buffer to the parser, chunk by chunk (through
        // the inflater if gzip-coded); the first error stops all (the decoder cannot return it
        // from inside its callback).
        let (parser, gunzip) = (&mut self.parser, &mut self.gunzip);
        let mut scratch = shared.inflated.borrow_mut();
        let mut parsed: Result<(), &'static str> = Ok(());
        self.decoder
            .decode(input, |body| {
                if parsed.is_err() {
                    return;
                }
                let mut parse = |plain: &[u8]| {
                    decoded += plain.len() as u64;
                    parser.feed(plain, &mut on_item).map_err(|_| "bad_sse")
                };
                parsed = match gunzip {
                    None => parse(body),
                    Some(gunzip) => {
                        let mut sse = Ok(());
                        let coded = gunzip.feed(body, &mut scratch, |plain| {
                            if sse.is_ok() {
                                sse = parse(plain);
                            }
                        });
                        coded.and(sse)
                    }
                };
            })
            .map_err(|_| "bad_chunking")?;
        parsed?;
        counters.decoded_bytes += decoded;
        if let Some(t) = track
            && t.last_id != parser.last_event_id()
        {
            t.last_id.clear();
            t.last_id.extend_from_slice(parser.last_event_id());
        }
        Ok(self.decoder.is_done())
    }
}

/// One `recv` per wake-up. A read shorter than `buf` drained the socket, so its readiness is
/// cleared now rather than by a second `recv` that would only return `EAGAIN`. Tokio clears
/// readiness only if no new edge arrived since it was observed, so data that lands after the
/// `recv` still wakes the stream.
fn read_once(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let mut got = 0usize;
    let outcome = stream.try_io(Interest::READABLE, || {
        // SAFETY: `fd` is the stream's open socket and `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
    });
    match outcome {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        Err(e) => Err(e),
        Ok(()) => Ok(got),
    }
}

async fn connect(addr: SocketAddr, source: std::net::IpAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Let the kernel pick the port at connect() time, per destination, instead of at bind():
    // without this every bound socket holds a port exclusively and 28k ports run out sooner.
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    if addr.is_ipv4() {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.connect(addr).await
}

/// Names an I/O failure for the report.
pub fn classify(e: &io::Error, other: &'static str) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "too_many_open_files",
        Some(libc::EADDRNOTAVAIL) => return "no_local_port",
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect_refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::TimedOut => "timeout",
        _ => other,
    }
}

fn status_kind(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        401 => "http_401",
        403 => "http_403",
        404 => "http_404",
        429 => "http_429",
        500 => "http_500",
        502 => "http_502",
        503 => "http_503",
        504 => "http_504",
        s if s < 400 => "http_other_non_200",
        s if s < 500 => "http_other_4xx",
        _ => "http_other_5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds() {
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EMFILE), "x"), "too_many_open_files");
        assert_eq!(classify(&io::Error::from(io::ErrorKind::ConnectionRefused), "x"), "connect_refused");
        assert_eq!(classify(&io::Error::other("boom"), "x"), "x");
        assert_eq!(status_kind(429), "http_429");
        assert_eq!(status_kind(418), "http_other_4xx");
    }
}
