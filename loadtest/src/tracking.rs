//! Per-stream delivery accounting: which sequence numbers a subscriber saw, so the run can
//! say whether each client got exactly what was sent to it — nothing lost, nothing twice —
//! including across a reconnect that resumed with `Last-Event-ID`.
//!
//! Every published message carries a sequence number that is consecutive on the stream of
//! the clients that should receive it (broadcast: one global counter; unicast: one counter per
//! user), starting at 1. A client then needs only its next expected number and three counters.

use serde::{Deserialize, Serialize};

/// What one client saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    /// The next sequence number this client expects (1 before anything arrived).
    pub next: u64,
    /// Numbers skipped over: a later one arrived first and these never came before it.
    pub gaps: u64,
    /// Numbers that arrived again, or after a later one.
    pub dups: u64,
    /// Bench events received in total.
    pub received: u64,
    /// Last SSE id seen, for `Last-Event-ID` on reconnect.
    pub last_id: Vec<u8>,
    /// Dropped by a reconnect storm and not open again yet.
    pub awaiting_back: bool,
}

impl Track {
    pub fn new() -> Self {
        Self { next: 1, ..Self::default() }
    }

    pub fn on_seq(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.gaps += seq - self.next;
            self.next = seq + 1;
        } else {
            self.dups += 1;
        }
    }

    /// Messages this client is still missing if the last one sent to it was `last`:
    /// the skipped ones plus the tail that never came.
    pub fn missing(&self, last: u64) -> u64 {
        self.gaps + (last + 1).saturating_sub(self.next)
    }

    /// Got exactly 1..=last, each once, in order.
    pub fn is_exact(&self, last: u64) -> bool {
        self.gaps == 0 && self.dups == 0 && self.next == last + 1
    }
}

/// The last sequence number sent on each stream, so clients can be checked against it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expect {
    /// Last broadcast sequence number, when broadcasts were sent.
    pub broadcast_last: Option<u64>,
    /// Last sequence number per user (index = user number), when unicasts were sent.
    pub user_last: Option<Vec<u64>>,
}

impl Expect {
    /// The last number sent on the stream client `user` follows.
    pub fn last_for(&self, user: u64) -> u64 {
        if let Some(b) = self.broadcast_last {
            return b;
        }
        self.user_last.as_ref().and_then(|v| v.get(user as usize).copied()).unwrap_or(0)
    }
}

/// Verification summed over clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub clients: u64,
    /// Clients that got exactly what was sent to them.
    pub exact: u64,
    /// Messages missing, summed over clients.
    pub missing: u64,
    /// Messages received twice or out of order, summed over clients.
    pub dups: u64,
}

impl Verdict {
    pub fn add(&mut self, other: &Verdict) {
        self.clients += other.clients;
        self.exact += other.exact;
        self.missing += other.missing;
        self.dups += other.dups;
    }
}

/// Checks `(user, track)` pairs against what was sent.
pub fn verify<'a>(tracks: impl IntoIterator<Item = (u64, &'a Track)>, expect: &Expect) -> Verdict {
    let mut v = Verdict::default();
    for (user, t) in tracks {
        let last = expect.last_for(user);
        v.clients += 1;
        v.missing += t.missing(last);
        v.dups += t.dups;
        if t.is_exact(last) {
            v.exact += 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(seqs: &[u64]) -> Track {
        let mut t = Track::new();
        for &s in seqs {
            t.on_seq(s);
        }
        t
    }

    #[test]
    fn in_order_is_exact() {
        let t = track(&[1, 2, 3]);
        assert!(t.is_exact(3));
        assert_eq!(t.missing(3), 0);
        assert_eq!(t.missing(5), 2);
        assert!(!t.is_exact(4));
    }

    #[test]
    fn gaps_dups_and_reorders() {
        let t = track(&[1, 3, 3, 2, 4]);
        assert_eq!(t.gaps, 1);
        assert_eq!(t.dups, 2);
        assert_eq!(t.received, 5);
        assert!(!t.is_exact(4));
        assert_eq!(t.missing(4), 1);
    }

    #[test]
    fn nothing_sent_nothing_received_is_exact() {
        assert!(Track::new().is_exact(0));
    }

    #[test]
    fn verify_uses_per_user_streams() {
        let expect = Expect { broadcast_last: None, user_last: Some(vec![2, 0, 1]) };
        let a = track(&[1, 2]);
        let b = Track::new();
        let c = Track::new();
        let v = verify([(0, &a), (1, &b), (2, &c)], &expect);
        assert_eq!(v, Verdict { clients: 3, exact: 2, missing: 1, dups: 0 });
        let bc = Expect { broadcast_last: Some(2), user_last: None };
        assert_eq!(verify([(7, &a)], &bc).exact, 1);
    }
}
