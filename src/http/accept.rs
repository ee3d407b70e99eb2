//! The accept loop. A connection whose first request is `GET /events` is served on the raw
//! path ([`super::raw_stream`]); every other connection by hyper's HTTP/1 connection directly
//! (not `axum::serve`, which measured twice the memory per idle connection: 19.7 against 10.9 KiB).
//! On shutdown the loop stops accepting and asks every connection to finish its current
//! response; event streams finish when the drain closes them.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::event_stream;
use super::raw_stream::{self, Prefixed};
use crate::log_limit::LogLimiter;
use crate::node::Node;

/// A request head must arrive within this long; slowloris clients are dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(
    listener: TcpListener,
    router: Router,
    node: Arc<Node>,
    stop_accepting: CancellationToken,
    connections: TaskTracker,
) {
    let started = std::time::Instant::now();
    let accept_failures = LogLimiter::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop_accepting.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; existing streams go on. Out
                // of files, this repeats ten times a second: one line a second says how often.
                if let Some(suppressed) = accept_failures.allow(started.elapsed().as_secs() as u32) {
                    tracing::warn!(error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let node = node.clone();
        let stop = stop_accepting.clone();
        connections.spawn(async move {
            let mut stream = stream;
            let first = tokio::time::timeout(HEADER_READ_TIMEOUT, raw_stream::read_first_request(&mut stream)).await;
            let Ok(Ok((buffered, request))) = first else { return };
            if buffered.is_empty() {
                return;
            }
            match request {
                Some(request) => raw_stream::serve(node, stream, request).await,
                // Boxed so that the long-lived event stream tasks are not sized for hyper's state.
                None => {
                    let io = Prefixed::new(buffered, stream, node.config.write_stall_timeout);
                    Box::pin(event_stream::watching_stalls(serve_with_hyper(io, router, stop))).await
                }
            }
        });
    }
}

async fn serve_with_hyper(io: Prefixed, router: Router, stop: CancellationToken) {
    let service = TowerToHyperService::new(router);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
