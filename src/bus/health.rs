//! How a Redis bus's once-a-second check becomes its readiness.
//!
//! A check ends one of three ways: Redis answered as it should; Redis said no (an error reply,
//! a refused or reset connection, slots without an owner, a library that could not be loaded);
//! or nothing came back in time. The first two decide at once. A late answer alone proves
//! little: on a host starved of CPU (a reconnect storm after a node died) the node's own task
//! may be what is late, and a node that turns unready then refuses the very reconnects it
//! should take, and the load balancer counts each refusal as a failed node and takes it out of
//! its pool. So late checks make the bus unready only when they have gone on for
//! [`LATE_GRACE`]: a Redis that hangs for good is still reported, a few seconds later (the
//! canary, when on, reports it sooner as `canary_stalled`).

use std::time::{Duration, Instant};

use deadpool_redis::redis::RedisError;

use super::BusError;

/// How long checks may go unanswered before the bus is reported unavailable.
pub(super) const LATE_GRACE: Duration = Duration::from_secs(10);

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Healthy,
    Failed,
    Late,
}

impl Verdict {
    /// A Redis error is late when the reply did not come in time, a failure otherwise.
    pub(super) fn of(error: &RedisError) -> Self {
        if error.is_timeout() { Self::Late } else { Self::Failed }
    }

    /// A bus call's error: late when it timed out, a failure otherwise.
    pub(super) fn of_bus(error: &BusError) -> Self {
        if matches!(error, BusError::Timeout) { Self::Late } else { Self::Failed }
    }

    /// The worse of two parts of one check.
    pub(super) fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::Failed, _) | (_, Self::Failed) => Self::Failed,
            (Self::Late, _) | (_, Self::Late) => Self::Late,
            _ => Self::Healthy,
        }
    }
}

/// The run of late checks so far.
#[derive(Default)]
pub(super) struct Health {
    /// When the first of the current run of late checks began.
    late_since: Option<Instant>,
}

impl Health {
    /// Whether the bus is ready after a check that began at `began` and ended as `verdict`.
    /// A bus that was not ready becomes ready only on an answer, never on a late check.
    pub(super) fn ready_after(&mut self, verdict: Verdict, began: Instant, was_ready: bool) -> bool {
        match verdict {
            Verdict::Healthy => {
                self.late_since = None;
                true
            }
            Verdict::Failed => {
                self.late_since = None;
                false
            }
            Verdict::Late => {
                let since = *self.late_since.get_or_insert(began);
                was_ready && began.saturating_duration_since(since) < LATE_GRACE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_checks_keep_a_ready_bus_ready_until_the_grace_has_passed() {
        let start = Instant::now();
        let mut health = Health::default();
        assert!(health.ready_after(Verdict::Healthy, start, false));
        assert!(health.ready_after(Verdict::Late, start + Duration::from_secs(1), true));
        assert!(health.ready_after(Verdict::Late, start + Duration::from_secs(9), true));
        // The grace counts from the first late check, not from the last answer.
        assert!(!health.ready_after(Verdict::Late, start + Duration::from_secs(11), true));
        // Once unready, late checks do not make it ready again; an answer does.
        assert!(!health.ready_after(Verdict::Late, start + Duration::from_secs(12), false));
        assert!(health.ready_after(Verdict::Healthy, start + Duration::from_secs(13), false));
        // A new run of late checks gets the whole grace again.
        assert!(health.ready_after(Verdict::Late, start + Duration::from_secs(14), true));
        assert!(health.ready_after(Verdict::Late, start + Duration::from_secs(23), true));
    }

    #[test]
    fn a_failed_check_makes_the_bus_unready_at_once_and_ends_a_run_of_late_ones() {
        let start = Instant::now();
        let mut health = Health::default();
        assert!(health.ready_after(Verdict::Late, start, true));
        assert!(!health.ready_after(Verdict::Failed, start + Duration::from_secs(1), true));
        // The failure ended the run: a late check past the first one's grace starts a new one.
        assert!(health.ready_after(Verdict::Late, start + Duration::from_secs(15), true));
        let mut health = Health::default();
        assert!(!health.ready_after(Verdict::Failed, start, true));
        // Late while unready (starting, or after a failure) stays unready.
        assert!(!health.ready_after(Verdict::Late, start + Duration::from_secs(2), false));
        assert!(!health.ready_after(Verdict::Failed, start, false));
    }

    #[test]
    fn a_check_is_as_bad_as_its_worst_part() {
        use Verdict::*;
        assert_eq!(Healthy.and(Healthy), Healthy);
        assert_eq!(Healthy.and(Late), Late);
        assert_eq!(Late.and(Failed), Failed);
        assert_eq!(Failed.and(Healthy), Failed);
    }
}
