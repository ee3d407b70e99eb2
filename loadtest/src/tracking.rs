//! Per-stream delivery accounting: which sequence numbers a subscriber saw, so the run can
//! say whether each client got exactly what was sent to it — nothing lost, nothing twice,
//! in the order it was sent — including across a reconnect that resumed with `Last-Event-ID`.
//!
//! Every published message carries a sequence number that is consecutive on the stream of
//! the clients that should receive it (broadcast: one global counter; unicast: one counter per
//! user), starting at 1. A client then needs only its next expected number and three counters.

use serde::{Deserialize, Serialize};

/// How far ahead of the first missing number a message may arrive and still be matched, so
/// that a reordered message is told from a lost one. Several concurrent publishers reorder
/// messages by a few positions at high rates (the order reaching the server is then not the
/// order sent); anything further ahead counts the skipped ones as lost.
pub const WINDOW: u64 = 256;

/// What one client saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    /// The lowest sequence number not received yet (1 before anything arrived).
    pub next: u64,
    /// Bit `i` set: `next + i` has been received (bit 0 is always clear between calls).
    ahead: [u64; (WINDOW / 64) as usize],
    /// Numbers given up on: a message further than `WINDOW` ahead of them arrived first.
    pub gaps: u64,
    /// Numbers that arrived a second time.
    pub dups: u64,
    /// Messages that arrived before an earlier one (reordered, not lost).
    pub reordered: u64,
    /// Bench events received in total.
    pub received: u64,
    /// Last SSE id seen, for `Last-Event-ID` on reconnect.
    pub last_id: Vec<u8>,
    /// Lost its stream in a reconnect storm (dropped by the client or by a killed node) and
    /// not open again yet.
    pub awaiting_back: bool,
    /// The stream opened at least once; a checked client that never did got nothing: it is
    /// counted as a client that was not exact.
    pub opened: bool,
}

impl Track {
    pub fn new() -> Self {
        Self { next: 1, ..Self::default() }
    }

    pub fn on_seq(&mut self, seq: u64) {
        self.received += 1;
        if seq < self.next {
            self.dups += 1;
            return;
        }
        let mut off = seq - self.next;
        if off >= WINDOW {
            // Give up on the oldest positions to make room; those never received are lost.
            let shift = off - WINDOW + 1;
            let held = (0..shift.min(WINDOW)).filter(|&i| self.bit(i)).count() as u64;
            self.gaps += shift - held;
            self.next += shift;
            self.shift_down(shift);
            off = WINDOW - 1;
        }
        if self.bit(off) {
            self.dups += 1;
            return;
        }
        if off > 0 {
            self.reordered += 1;
        }
        self.ahead[(off / 64) as usize] |= 1 << (off % 64);
        let run = self.ahead[0].trailing_ones() as u64;
        if run > 0 {
            self.next += run;
            self.shift_down(run);
            while self.bit(0) {
                self.next += 1;
                self.shift_down(1);
            }
        }
    }

    /// Bit `i` stands for `next + i`.
    fn bit(&self, i: u64) -> bool {
        i < WINDOW && self.ahead[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn shift_down(&mut self, k: u64) {
        if k >= WINDOW {
            self.ahead = Default::default();
            return;
        }
        let (words, bits) = ((k / 64) as usize, (k % 64) as u32);
        let n = self.ahead.len();
        for i in 0..n {
            let lo = self.ahead.get(i + words).copied().unwrap_or(0);
            let hi = self.ahead.get(i + words + 1).copied().unwrap_or(0);
            self.ahead[i] = if bits == 0 { lo } else { (lo >> bits) | (hi << (64 - bits)) };
        }
    }

    /// Messages this client is still missing if the last one sent to it was `last`.
    pub fn missing(&self, last: u64) -> u64 {
        let span = (last + 1).saturating_sub(self.next);
        let held = (0..span.min(WINDOW)).filter(|&i| self.bit(i)).count() as u64;
        self.gaps + span - held
    }

    /// Got exactly 1..=last, each once, in order.
    pub fn is_exact(&self, last: u64) -> bool {
        self.gaps == 0 && self.dups == 0 && self.reordered == 0 && self.next == last + 1
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
    /// Messages received twice, summed over clients.
    pub dups: u64,
    /// Messages received before an earlier one, summed over clients.
    #[serde(default)]
    pub reordered: u64,
    /// Clients whose stream never opened (counted in `clients`, never in `exact`).
    #[serde(default)]
    pub never_opened: u64,
}

impl Verdict {
    pub fn add(&mut self, other: &Verdict) {
        self.clients += other.clients;
        self.exact += other.exact;
        self.missing += other.missing;
        self.dups += other.dups;
        self.reordered += other.reordered;
        self.never_opened += other.never_opened;
    }
}

/// Checks `(user, track)` pairs against what was sent.
pub fn verify<'a>(tracks: impl IntoIterator<Item = (u64, &'a Track)>, expect: &Expect) -> Verdict {
    let mut v = Verdict::default();
    for (user, t) in tracks {
        let last = expect.last_for(user);
        v.clients += 1;
        if !t.opened {
            v.never_opened += 1;
            v.missing += last;
            continue;
        }
        v.missing += t.missing(last);
        v.dups += t.dups;
        v.reordered += t.reordered;
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
        t.opened = true;
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
    fn reordering_is_not_loss_but_not_exact() {
        let t = track(&[1, 3, 4, 2, 5]);
        assert_eq!((t.gaps, t.dups, t.reordered, t.received), (0, 0, 2, 5));
        assert_eq!(t.missing(5), 0);
        assert!(!t.is_exact(5));
        let t = track(&[2, 1]);
        assert_eq!(t.missing(2), 0);
        assert!(!t.is_exact(2));
    }

    #[test]
    fn local_shuffles_lose_nothing_and_are_not_exact() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        let mut seqs: Vec<u64> = (1..=5_000).collect();
        for chunk in seqs.chunks_mut(100) {
            chunk.shuffle(&mut rng);
        }
        let t = track(&seqs);
        assert_eq!((t.missing(5_000), t.gaps, t.dups, t.next), (0, 0, 0, 5_001), "{t:?}");
        assert!(t.reordered > 0);
        assert!(!t.is_exact(5_000));
    }

    #[test]
    fn duplicates_and_holes() {
        let t = track(&[1, 3, 3, 2, 2, 5]);
        assert_eq!(t.dups, 2);
        assert_eq!(t.next, 4);
        assert_eq!(t.missing(5), 1);
        assert_eq!(t.missing(7), 3);
        assert!(!t.is_exact(5));
    }

    #[test]
    fn far_ahead_counts_the_skipped_as_lost() {
        let far = 1 + WINDOW + 10;
        let t = track(&[1, 3, far]);
        // 2 and 4..far-1 minus the ones still inside the window at the end.
        assert_eq!(t.missing(far), far - 2 - 1);
        let mut all = vec![1, 3, far];
        all.extend(2..far);
        let t = track(&all);
        assert_eq!(t.next, far + 1);
        assert!(t.gaps > 0);
        assert_eq!(t.missing(far), t.gaps);
    }

    #[test]
    fn nothing_sent_nothing_received_is_exact() {
        assert!(Track::new().is_exact(0));
    }

    #[test]
    fn verify_uses_per_user_streams() {
        let expect = Expect { broadcast_last: None, user_last: Some(vec![2, 0, 1]) };
        let a = track(&[1, 2]);
        let b = track(&[]);
        let c = track(&[]);
        let never = Track::new();
        let v = verify([(0, &a), (1, &b), (2, &c)], &expect);
        assert_eq!(v, Verdict { clients: 3, exact: 2, missing: 1, ..Verdict::default() });
        // A client that never opened is a failure: it got nothing of what was sent.
        let v = verify([(0, &a), (0, &never)], &expect);
        assert_eq!(v, Verdict { clients: 2, exact: 1, missing: 2, never_opened: 1, ..Verdict::default() });
        let shuffled = track(&[2, 1]);
        let v = verify([(0, &shuffled)], &expect);
        assert_eq!(v, Verdict { clients: 1, exact: 0, missing: 0, reordered: 1, ..Verdict::default() });
        let bc = Expect { broadcast_last: Some(2), user_last: None };
        assert_eq!(verify([(7, &a)], &bc).exact, 1);
    }
}
