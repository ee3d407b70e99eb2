//! Rate-limited logging for events that can repeat thousands of times a second (refused
//! payloads from a broken producer, `accept` failing while the node is out of files): one line
//! per second, which says how many were held back since the last one.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Lets one log line through per second and counts the rest.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// The second of the last line let through, plus one (0: none yet).
    last: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// `Some(held back since the last line)` when a line may be logged in second `now`.
    pub fn allow(&self, now: u32) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if last != now.wrapping_add(1)
            && self.last.compare_exchange(last, now.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_count_of_the_rest() {
        let log = LogLimiter::default();
        assert_eq!(log.allow(0), Some(0));
        assert_eq!((log.allow(0), log.allow(0)), (None, None));
        assert_eq!(log.allow(1), Some(2));
        assert_eq!(log.allow(1), None);
        assert_eq!(log.allow(7), Some(1));
    }
}
