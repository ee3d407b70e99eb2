//! The connections that have not yet sent a complete, authenticated request ("pending"),
//! bounded by `SSE_MAX_PENDING_CONNECTIONS` so that they can never take every file of the node.
//!
//! A connection is pending from its accept until it has shown it is wanted: an event stream once
//! its request head is complete (its token is checked right after, with nothing more to wait for
//! from the client: it is then either authenticated or answered and closed), any other
//! connection once one of its requests is complete and authenticated: its token verified
//! ([`RequestMark::authenticated`], called where tokens are checked) and its body read to the end
//! ([`MarkedBody`]), in either order. A valid token alone is not enough: whoever holds one (and
//! a subscriber's is easy to come by) could otherwise send bodies as slowly as
//! `SSE_REQUEST_TIMEOUT` allows on as many connections as there are files. A kept-alive
//! connection that only ever asks for `/healthz` stays pending, so a chain of cheap requests
//! cannot keep a file outside the bound. Each pending connection is also bounded in time by
//! `SSE_REQUEST_TIMEOUT`.
//!
//! When the set is full, the accept loop waits ([`PendingConnections::room`]) and new
//! connections wait in the kernel's accept queue, until a pending connection leaves or one can
//! be dropped: the oldest that has been pending for [`EVICTABLE_AFTER`] and whose client is
//! *silent*, i.e. has nothing in its socket that the node has not read yet. That test is what
//! tells a slow client from a busy node. In a reconnect storm thousands of connections wait with
//! their request already in their sockets for the node to get to them; they are not touched, and
//! the accept loop only slows to the pace the node opens streams at. A slowloris client, which
//! sends a byte now and then and is read at once, is silent nearly all the time. Refusing new
//! connections instead would punish the storm's clients; dropping the oldest regardless of
//! silence would too.
//!
//! Out of files altogether, the accept loop drops the oldest pending connection whatever its
//! state ([`PendingConnections::evict_oldest`]), so that the next client can be accepted at all.
//!
//! Established streams are not here: the set costs nothing once a connection has left it.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::{Notify, oneshot};

use crate::metrics::{CONNECTIONS_REJECTED, PENDING_CONNECTIONS};

/// How long a pending connection is safe from being dropped for a new one. An honest client
/// sends its request head with its first packets: a second is hundreds of round trips.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// Pending connections looked at, oldest first, for a silent one to drop: a bounded cost per
/// accept when the oldest are waiting for the node rather than for their clients.
const LOOKED_AT: usize = 32;
/// While full of connections waiting for the node, how often the accept loop looks again.
const RECHECK: Duration = Duration::from_millis(50);

/// The bound when `SSE_MAX_PENDING_CONNECTIONS` is unset: a quarter of the open-file limit,
/// leaving three quarters to established streams, Redis and the process itself.
pub fn default_bound() -> usize {
    // Capped: an unlimited (RLIM_INFINITY) limit would otherwise make the bound meaningless.
    let files = open_file_limit().unwrap_or(1024).min(1 << 20);
    (files / 4).max(16) as usize
}

/// The soft `RLIMIT_NOFILE` of this process.
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the whole call.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    // `rlim_t` is not `u64` on every target.
    #[allow(clippy::unnecessary_cast)]
    (status == 0).then_some(limit.rlim_cur as u64)
}

/// Bytes the peer sent that nobody has read yet (0 when the socket is gone).
fn unread_bytes(fd: RawFd) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `count`. The descriptor is a socket of a connection in
    // the set, which is closed only after the connection left the set; if it was closed and
    // reused meanwhile, this reads another socket's count, which costs one wrong guess, no harm.
    let status = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut count) };
    if status == 0 { usize::try_from(count).unwrap_or(0) } else { 0 }
}

/// The pending set of one node's listener.
pub struct PendingConnections {
    bound: usize,
    waiting: Mutex<Waiting>,
    /// Wakes the accept loop when a connection leaves a full set.
    left: Notify,
    /// `sse_pending_connections`.
    size: Gauge,
    /// `sse_connections_rejected_total{reason="pending_evicted"}`: dropped to make room.
    evicted: Counter,
}

#[derive(Default)]
struct Waiting {
    next_id: u64,
    /// Ids grow with admission, so the first entry is the oldest.
    by_age: BTreeMap<u64, Entry>,
}

struct Entry {
    since: Instant,
    socket: RawFd,
    /// Sending tells the connection to close; dropping it (the connection left the set) does not.
    evict: oneshot::Sender<()>,
}

impl PendingConnections {
    /// A set holding at most `bound` connections (at least one).
    pub fn new(bound: usize) -> Arc<Self> {
        Arc::new(Self {
            bound: bound.max(1),
            waiting: Mutex::default(),
            left: Notify::new(),
            size: gauge!(PENDING_CONNECTIONS),
            evicted: counter!(CONNECTIONS_REJECTED, "reason" => "pending_evicted"),
        })
    }

    /// Resolves once a connection may be accepted: the set has room, or its oldest silent
    /// connection past [`EVICTABLE_AFTER`] was dropped to make some.
    pub async fn room(&self) {
        loop {
            // Created before looking, so a connection leaving in between still wakes us.
            let left = self.left.notified();
            let wait = {
                let mut waiting = self.lock();
                if waiting.by_age.len() < self.bound {
                    return;
                }
                match self.evict_silent(&mut waiting) {
                    None => return,
                    Some(wait) => wait,
                }
            };
            tokio::select! {
                () = left => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops the oldest silent connection past the grace; otherwise says how long to wait
    /// before looking again.
    fn evict_silent(&self, waiting: &mut Waiting) -> Option<Duration> {
        let now = Instant::now();
        let mut oldest_age = None;
        let mut silent = None;
        for (&id, entry) in waiting.by_age.iter().take(LOOKED_AT) {
            let age = now.saturating_duration_since(entry.since);
            oldest_age.get_or_insert(age);
            if age < EVICTABLE_AFTER {
                break; // and the rest are younger still
            }
            if unread_bytes(entry.socket) == 0 {
                silent = Some(id);
                break;
            }
        }
        if let Some(entry) = silent.and_then(|id| self.remove(waiting, id)) {
            self.dropped(entry);
            return None;
        }
        // Look again when the oldest comes of age, or soon if the old ones wait for the node.
        Some(match oldest_age {
            Some(age) if age < EVICTABLE_AFTER => EVICTABLE_AFTER - age,
            _ => RECHECK,
        })
    }

    /// Admits a just-accepted connection (the caller waited for [`Self::room`]).
    pub fn admit(self: &Arc<Self>, socket: RawFd) -> Pending {
        let mut waiting = self.lock();
        let id = waiting.next_id;
        waiting.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        waiting.by_age.insert(id, Entry { since: Instant::now(), socket, evict });
        self.size.set(waiting.by_age.len() as f64);
        Pending { set: self.clone(), id, evicted: Some(evicted) }
    }

    /// Drops the oldest pending connection whatever its state (the node is out of files); false
    /// when none is pending.
    pub fn evict_oldest(&self) -> bool {
        let mut waiting = self.lock();
        let Some(oldest) = waiting.by_age.keys().next().copied() else { return false };
        let Some(entry) = self.remove(&mut waiting, oldest) else { return false };
        self.dropped(entry);
        true
    }

    fn remove(&self, waiting: &mut Waiting, id: u64) -> Option<Entry> {
        let entry = waiting.by_age.remove(&id)?;
        self.size.set(waiting.by_age.len() as f64);
        Some(entry)
    }

    fn dropped(&self, entry: Entry) {
        // The connection may have ended on its own meanwhile; then there is nothing to close.
        let _ = entry.evict.send(());
        self.evicted.increment(1);
    }

    fn leave(&self, id: u64) {
        let mut waiting = self.lock();
        if self.remove(&mut waiting, id).is_some() {
            drop(waiting);
            self.left.notify_one();
        }
    }

    /// Connections pending now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_age.len()
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // The map is consistent after every statement: a panic elsewhere leaves it usable.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in the pending set, held by its task; leaving the set when dropped.
/// Drop it before the socket, so that the set never looks at a closed descriptor.
pub struct Pending {
    set: Arc<PendingConnections>,
    id: u64,
    /// `None` once it has resolved (a oneshot must not be polled again).
    evicted: Option<oneshot::Receiver<()>>,
}

impl Pending {
    /// Resolves when the connection was dropped from the set to make room; never once it has
    /// left the set otherwise.
    pub async fn evicted(&mut self) {
        if let Some(receiver) = &mut self.evicted {
            let evicted = receiver.await.is_ok();
            self.evicted = None;
            if evicted {
                return;
            }
        }
        std::future::pending().await
    }

    /// A handle the connection keeps for its requests, to leave the set by one of them.
    pub fn mark(&self) -> PendingMark {
        PendingMark { set: self.set.clone(), id: self.id }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set.leave(self.id);
    }
}

/// A pending hyper connection's place in the set, kept for its requests.
#[derive(Clone)]
pub struct PendingMark {
    set: Arc<PendingConnections>,
    id: u64,
}

impl PendingMark {
    /// The mark of one request of this connection; `body_read` when it has no body to wait for.
    pub fn request(&self, body_read: bool) -> RequestMark {
        let progress = if body_read { BODY_READ } else { 0 };
        RequestMark { connection: self.clone(), progress: Arc::new(AtomicU8::new(progress)) }
    }
}

const AUTHENTICATED: u8 = 1;
const BODY_READ: u8 = 2;

/// Carried in the extensions of each request of a pending hyper connection: the connection
/// leaves the set once this request is both authenticated and read to its end.
#[derive(Clone)]
pub struct RequestMark {
    connection: PendingMark,
    progress: Arc<AtomicU8>,
}

impl RequestMark {
    /// The request carries a valid token.
    pub fn authenticated(&self) {
        self.record(AUTHENTICATED);
    }

    /// The request's body was read to its end.
    fn body_read(&self) {
        self.record(BODY_READ);
    }

    fn record(&self, step: u8) {
        // Whichever of the two comes second takes the connection out (leaving is idempotent).
        if self.progress.fetch_or(step, Ordering::AcqRel) | step == AUTHENTICATED | BODY_READ {
            self.connection.set.leave(self.connection.id);
        }
    }
}

/// A request body that tells its [`RequestMark`] when it has been read to its end. An error
/// (a late or broken body) is not an end.
pub struct MarkedBody<B> {
    inner: B,
    /// Taken when the end is reported; `None` from the start when nothing is to be reported.
    mark: Option<RequestMark>,
}

impl<B> MarkedBody<B> {
    pub fn new(inner: B, mark: Option<RequestMark>) -> Self {
        Self { inner, mark }
    }
}

impl<B: Body + Unpin> Body for MarkedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        // After the last data frame a sized body already says it has ended; a reader that
        // stops there (as `collect` may not) still counts as having read it all.
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        if ended && let Some(mark) = this.mark.take() {
            mark.body_read();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::AsRawFd;
    use std::task::Waker;

    use bytes::Bytes;

    use super::*;

    /// A connected pair of sockets: the node's side and the client's.
    struct Socket {
        node: std::net::TcpStream,
        client: std::net::TcpStream,
    }

    fn socket() -> Socket {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (node, _) = listener.accept().expect("accept");
        Socket { node, client }
    }

    /// Makes every pending connection look older than [`EVICTABLE_AFTER`].
    fn age(set: &PendingConnections) {
        for entry in set.lock().by_age.values_mut() {
            entry.since -= EVICTABLE_AFTER;
        }
    }

    fn ready<F: Future>(future: F) -> bool {
        let mut future = std::pin::pin!(future);
        future.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    fn is_evicted(pending: &mut Pending) -> bool {
        ready(pending.evicted())
    }

    #[tokio::test]
    async fn a_full_set_of_young_connections_makes_the_accept_loop_wait() {
        let set = PendingConnections::new(2);
        let sockets = [socket(), socket()];
        let mut pending: Vec<Pending> = sockets.iter().map(|s| set.admit(s.node.as_raw_fd())).collect();
        assert!(!ready(set.room()), "both are younger than a second");
        assert!(!pending.iter_mut().any(is_evicted));
        pending.pop();
        assert!(ready(set.room()), "one left: there is room");
    }

    #[tokio::test]
    async fn the_oldest_silent_connection_makes_room_and_one_with_unread_bytes_is_spared() {
        use std::io::Write;
        let set = PendingConnections::new(2);
        let mut sockets = [socket(), socket()];
        let mut busy = set.admit(sockets[0].node.as_raw_fd());
        let mut silent = set.admit(sockets[1].node.as_raw_fd());
        // The oldest has its request in its socket: the node is behind, not the client.
        sockets[0].client.write_all(b"GET /events HTTP/1.1\r\n\r\n").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        age(&set);
        assert!(ready(set.room()));
        assert!(is_evicted(&mut silent) && !is_evicted(&mut busy));
        assert_eq!(set.len(), 1);
    }

    #[tokio::test]
    async fn a_full_set_of_connections_waiting_for_the_node_makes_the_accept_loop_wait() {
        use std::io::Write;
        let set = PendingConnections::new(1);
        let mut socket = socket();
        let mut busy = set.admit(socket.node.as_raw_fd());
        socket.client.write_all(b"GET").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        age(&set);
        assert!(!ready(set.room()));
        assert!(!is_evicted(&mut busy));
    }

    #[test]
    fn an_authenticated_or_closed_connection_leaves_and_is_never_evicted() {
        let set = PendingConnections::new(2);
        let sockets = [socket(), socket()];
        let mut authenticated = set.admit(sockets[0].node.as_raw_fd());
        let closed = set.admit(sockets[1].node.as_raw_fd());
        let request = authenticated.mark().request(true);
        request.authenticated();
        request.authenticated();
        drop(closed);
        assert_eq!(set.len(), 0);
        age(&set);
        assert!(!set.evict_oldest(), "nothing is pending");
        assert!(!is_evicted(&mut authenticated));
    }

    #[tokio::test]
    async fn a_request_takes_its_connection_out_once_authenticated_and_read_in_either_order() {
        use http_body_util::{BodyExt, Full};
        let set = PendingConnections::new(8);
        let sockets = [socket(), socket(), socket()];
        let token_first = set.admit(sockets[0].node.as_raw_fd());
        let body_first = set.admit(sockets[1].node.as_raw_fd());
        let never_authenticated = set.admit(sockets[2].node.as_raw_fd());

        let request = token_first.mark().request(false);
        request.authenticated();
        assert_eq!(set.len(), 3, "a valid token with its body still to come is still pending");
        let body = MarkedBody::new(Full::new(Bytes::from_static(b"{}")), Some(request));
        assert_eq!(body.collect().await.expect("body").to_bytes(), "{}");
        assert_eq!(set.len(), 2);

        let request = body_first.mark().request(false);
        let _ = MarkedBody::new(Full::new(Bytes::from_static(b"{}")), Some(request.clone())).collect().await;
        assert_eq!(set.len(), 2, "a whole body without a token is still pending");
        request.authenticated();
        assert_eq!(set.len(), 1);

        // A request without a body (`/healthz`), never authenticated.
        let _ = never_authenticated.mark().request(true);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn out_of_files_the_oldest_goes_whatever_its_age() {
        let set = PendingConnections::new(8);
        let sockets = [socket(), socket()];
        let mut oldest = set.admit(sockets[0].node.as_raw_fd());
        let mut young = set.admit(sockets[1].node.as_raw_fd());
        assert!(set.evict_oldest());
        assert!(is_evicted(&mut oldest) && !is_evicted(&mut young));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn the_default_bound_is_a_quarter_of_the_open_file_limit() {
        let files = open_file_limit().expect("getrlimit works");
        assert_eq!(default_bound() as u64, (files.min(1 << 20) / 4).max(16));
    }
}
