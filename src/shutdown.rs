//! Signals and the paced drain. On SIGTERM the node refuses new streams (so `/readyz` and new
//! requests answer 503 and the load balancer moves on) and closes open streams in batches
//! spread over the drain period, each with a jittered `retry:`, so that N clients do not
//! reconnect to the remaining nodes in the same second.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rand::Rng;

use crate::connection::CloseReason;
use crate::frame;
use crate::hub::Hub;

/// How often a drain closes a batch.
const DRAIN_STEP: Duration = Duration::from_millis(100);

/// Resolves on SIGTERM or SIGINT and says which.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// How many streams to close at each step so that `total` are closed within `period`.
pub fn batch_size(total: usize, period: Duration) -> usize {
    let steps = (period.as_millis() / DRAIN_STEP.as_millis()).max(1) as usize;
    total.div_ceil(steps).max(1)
}

/// Closes every stream of the hub over `period`. New streams are refused from the first moment.
pub async fn drain(hub: &Arc<Hub>, period: Duration, retry: Duration) {
    let connections = hub.start_draining();
    let total = connections.len();
    // On the `drain` span the caller runs this in (crate::telemetry), when tracing is on.
    tracing::Span::current().record("drain.streams", total as u64);
    tracing::info!(streams = total, period_ms = period.as_millis() as u64, "draining");
    let per_step = batch_size(total, period);
    let mut ticker = tokio::time::interval(DRAIN_STEP);
    for batch in connections.chunks(per_step) {
        ticker.tick().await;
        for connection in batch {
            hub.close(connection, CloseReason::Shutdown, farewell(retry));
        }
    }
    tracing::info!(streams = total, "drained");
}

/// `retry:` between half and one and a half times the configured delay, then `disconnected`.
fn farewell(retry: Duration) -> bytes::Bytes {
    let base = retry.as_millis().max(2) as u64;
    let jittered = rand::rng().random_range(base / 2..=base + base / 2);
    let mut out = BytesMut::new();
    out.put(frame::retry(Duration::from_millis(jittered)));
    out.put(CloseReason::Shutdown.farewell());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_spread_streams_over_the_period() {
        assert_eq!(batch_size(50_000, Duration::from_secs(10)), 500);
        assert_eq!(batch_size(10, Duration::from_secs(10)), 1);
        assert_eq!(batch_size(0, Duration::from_secs(10)), 1);
        assert_eq!(batch_size(7, Duration::ZERO), 7);
    }

    #[test]
    fn the_farewell_retry_is_jittered_around_the_setting() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let text = String::from_utf8(farewell(Duration::from_secs(2)).to_vec()).expect("utf8");
            let ms: u64 = text
                .strip_prefix("retry: ")
                .and_then(|rest| rest.split('\n').next())
                .and_then(|n| n.parse().ok())
                .expect("a retry line first");
            assert!((1000..=3000).contains(&ms), "{ms}");
            assert!(text.ends_with("event: disconnected\ndata: {\"reason\":\"shutdown\"}\n\n"));
            seen.insert(ms);
        }
        // Jittered over the whole range: 200 uniform draws from 2001 values give about 190
        // distinct ones, and miss the lowest or highest tenth with odds of about 1e-9. A
        // constant, or a much narrower jitter, fails.
        assert!(seen.len() >= 150, "only {} distinct retries in 200 farewells", seen.len());
        let (low, high) = (seen.first().copied().unwrap_or(0), seen.last().copied().unwrap_or(0));
        assert!(low < 1200 && high > 2800, "retries from {low} to {high} ms");
    }
}
