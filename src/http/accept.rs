//! The accept loop. A connection whose first request is `GET /events` is served on the raw
//! path ([`super::raw_stream`]); every other connection by hyper's HTTP/1 connection directly
//! (not `axum::serve`, which measured twice the memory per idle connection: 19.7 against 10.9 KiB).
//! On shutdown the loop stops accepting and asks every connection to finish its current
//! response; event streams finish when the drain closes them.
//!
//! It also bounds what a client can hold without proving itself. Every request must arrive,
//! head and body, within `SSE_REQUEST_TIMEOUT`: the first one counted from the accept (its head
//! read here, its body through [`DeadlineBody`]); on a kept-alive connection each further head
//! within the timeout of the previous response (hyper's header timeout, which also ends idle
//! connections) and its body within the timeout of its head. And the connections that have not
//! yet sent a complete, authenticated request are bounded by [`PendingConnections`]: a slow
//! client ties up at most a file for at most a timeout, and all of them together at most the
//! bound, so established streams and new clients keep their files.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client_ip::Peer;
use super::deadline::DeadlineBody;
use super::error::ApiError;
use super::event_stream;
use super::pending::{self, MarkedBody, Pending, PendingConnections, PendingMark};
use super::raw_stream::{self, EventsRequest, Prefixed};
use crate::log_limit::LogLimiter;
use crate::node::Node;

/// Out of files, after dropping a pending connection: long enough for its task to close it.
const RETRY_AFTER_EVICTING: Duration = Duration::from_millis(5);
/// Out of files with nothing to drop: back off instead of spinning.
const RETRY_AFTER_FAILING: Duration = Duration::from_millis(100);

pub async fn serve(
    listener: TcpListener,
    router: Router,
    node: Arc<Node>,
    stop_accepting: CancellationToken,
    connections: TaskTracker,
) {
    let started = std::time::Instant::now();
    let accept_failures = LogLimiter::default();
    let bound = node.config.max_pending_connections.unwrap_or_else(pending::default_bound);
    let pending = (bound > 0).then(|| PendingConnections::new(bound));
    tracing::debug!(bound, "connections without a complete, authenticated request are bounded (0: no bound)");
    loop {
        if let Some(set) = &pending {
            // Full: new connections wait in the kernel's accept queue (see `pending`).
            tokio::select! {
                () = set.room() => {}
                _ = stop_accepting.cancelled() => break,
            }
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop_accepting.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of files: the oldest pending connection makes room for the next client.
                let evicted = is_out_of_files(&e) && pending.as_ref().is_some_and(|set| set.evict_oldest());
                // This repeats ten times a second while out of files: one line a second says how often.
                if let Some(suppressed) = accept_failures.allow(started.elapsed().as_secs() as u32) {
                    tracing::warn!(error = %e, suppressed, evicted, "accept failed");
                }
                tokio::time::sleep(if evicted { RETRY_AFTER_EVICTING } else { RETRY_AFTER_FAILING }).await;
                continue;
            }
        };
        let deadline = Instant::now() + node.config.request_timeout;
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            peer: peer.ip().to_canonical(),
            deadline,
            router: router.clone(),
            node: node.clone(),
            stop: stop_accepting.clone(),
            pending: pending.as_ref().map(|set| set.admit(stream.as_raw_fd())),
            stream,
        };
        connections.spawn(connection(Box::new(accepted)));
    }
}

fn is_out_of_files(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A connection just accepted, with all it needs until its first request is read. Boxed and
/// consumed by [`first_request`], so that an established stream's task does not carry it.
struct Accepted {
    /// First, so that it leaves the set before the socket closes (fields drop in order).
    pending: Option<Pending>,
    stream: TcpStream,
    peer: IpAddr,
    /// When the first request must have arrived, head and body.
    deadline: Instant,
    router: Router,
    node: Arc<Node>,
    stop: CancellationToken,
}

/// What a connection becomes once its first request head is in.
enum Next {
    Stream {
        node: Arc<Node>,
        stream: TcpStream,
        request: EventsRequest,
        peer: IpAddr,
    },
    /// Boxed so that the long-lived event stream tasks are not sized for hyper's state.
    Hyper(Pin<Box<dyn Future<Output = ()> + Send>>),
}

async fn connection(accepted: Box<Accepted>) {
    match Box::pin(first_request(accepted)).await {
        Some(Next::Stream { node, stream, request, peer }) => raw_stream::serve(node, stream, request, peer).await,
        Some(Next::Hyper(connection)) => connection.await,
        None => {}
    }
}

async fn first_request(accepted: Box<Accepted>) -> Option<Next> {
    // Bindings drop in reverse: `pending` leaves the set before the socket closes.
    let Accepted { mut stream, peer, deadline, router, node, stop, mut pending } = *accepted;
    let first = tokio::select! {
        first = tokio::time::timeout_at(deadline, raw_stream::read_first_request(&mut stream)) => first,
        () = evicted(&mut pending) => return None,
    };
    let (buffered, request) = match first {
        Ok(Ok(first)) => first,
        Ok(Err(_)) => return None,
        Err(_) => {
            node.hub_metrics.rejected("request_timeout");
            return None;
        }
    };
    if buffered.is_empty() {
        return None;
    }
    match request {
        // The head is complete and its token is checked right away, with nothing more to wait
        // for from the client: the connection is no longer pending.
        Some(request) => {
            drop(pending);
            Some(Next::Stream { node, stream, request, peer })
        }
        None => {
            let io = Prefixed::new(buffered, stream, node.config.write_stall_timeout);
            let requests = Requests {
                router,
                timeout: node.config.request_timeout,
                node,
                peer,
                mark: pending.as_ref().map(Pending::mark),
                first_deadline: Cell::new(Some(deadline)),
            };
            let connection = serve_with_hyper(io, requests, stop, pending);
            Some(Next::Hyper(Box::pin(event_stream::watching_stalls(connection))))
        }
    }
}

/// Resolves when a pending connection is dropped to make room; never for one that is not pending.
async fn evicted(pending: &mut Option<Pending>) {
    match pending {
        Some(pending) => pending.evicted().await,
        None => std::future::pending().await,
    }
}

async fn serve_with_hyper(io: Prefixed, requests: Requests, stop: CancellationToken, mut pending: Option<Pending>) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(requests.timeout);
    let connection = builder.serve_connection(TokioIo::new(io), requests);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        // Dropping the connection closes it.
        () = evicted(&mut pending) => {}
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.as_mut().await;
        }
    }
    // Out of the set before the connection (and its socket) is dropped.
    drop(pending);
}

/// The router as hyper calls it for each request of one connection: with the connection's peer
/// and pending mark in the request's extensions, and the body due by the request's deadline.
struct Requests {
    router: Router,
    node: Arc<Node>,
    timeout: Duration,
    peer: IpAddr,
    mark: Option<PendingMark>,
    /// The first request's deadline counts from the accept; later ones from their head.
    first_deadline: Cell<Option<Instant>>,
}

impl hyper::service::Service<Request<Incoming>> for Requests {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let deadline = self.first_deadline.take().unwrap_or_else(|| Instant::now() + self.timeout);
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(Peer(self.peer));
        // Pending, the connection leaves the set by a request that is authenticated and read.
        let request_mark = self.mark.as_ref().map(|mark| mark.request(body.is_end_stream()));
        if let Some(mark) = &request_mark {
            parts.extensions.insert(mark.clone());
        }
        let body = MarkedBody::new(body, request_mark);
        let (body, expired) = DeadlineBody::new(body, deadline);
        let request = Request::from_parts(parts, Body::new(body));
        let (router, node, timeout) = (self.router.clone(), self.node.clone(), self.timeout);
        Box::pin(async move {
            let response = tower::ServiceExt::oneshot(router, request).await?;
            if expired.get() {
                // Whatever the route made of its failed body read, the client was too slow; the
                // response closes the connection (hyper would not reuse it anyway: its body was
                // left unread).
                node.hub_metrics.rejected("request_timeout");
                return Ok(ApiError::RequestTimeout { after: timeout }.into_response());
            }
            Ok(response)
        })
    }
}
