//! Per-client-address limits on event streams: how fast one address may open them
//! (`SSE_IP_OPEN_RATE` per minute, in bursts of up to `SSE_IP_OPEN_BURST`, a GCRA limiter from
//! `governor`) and how many it may hold open on this node (`SSE_IP_MAX_STREAMS`). Both are
//! checked once, when a stream opens, before its token is verified; nothing here runs per event.
//! Every attempt counts against the rate, refused or not: the rate is also what keeps one
//! address from making the node verify tokens without end.
//!
//! A client address is an IPv4 address or an IPv6 /64: a single IPv6 subscriber is usually given
//! a whole /64, and counting its addresses one by one would let it open streams from 2^64 of
//! them. Which address a request comes from is [`super::client_ip`]'s.
//!
//! The state stays bounded: a stream count exists only while its address holds a stream, and
//! [`IpLimits::upkeep`] forgets addresses whose rate state is back to that of a new address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

type OpenRate = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>;

/// A stream open refused for its client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// Over `SSE_IP_OPEN_RATE`; the next open is allowed after `retry_after`.
    RateLimited { retry_after: Duration },
    /// The address holds `SSE_IP_MAX_STREAMS` streams on this node.
    TooManyStreams,
}

impl IpRefusal {
    /// The error code and the `sse_connections_rejected_total` reason.
    pub fn label(self) -> &'static str {
        match self {
            IpRefusal::RateLimited { .. } => "rate_limited",
            IpRefusal::TooManyStreams => "too_many_streams",
        }
    }
}

pub struct IpLimits {
    rate: Option<OpenRate>,
    max_streams: u32,
    /// Open streams per address; an address leaves the map with its last stream.
    streams: Mutex<HashMap<IpAddr, u32>>,
}

impl IpLimits {
    /// `per_minute` or `max_streams` of 0 turns that limit off.
    pub fn new(per_minute: u32, burst: u32, max_streams: u32) -> Arc<Self> {
        let rate = NonZeroU32::new(per_minute).and_then(|per_minute| {
            let quota = Quota::with_period(Duration::from_secs(60) / per_minute.get())?;
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            // Keys use the standard library's randomly seeded hasher: no one can aim addresses
            // at one bucket.
            Some(RateLimiter::new(quota.allow_burst(burst), HashMapStateStore::default(), DefaultClock::default()))
        });
        Arc::new(Self { rate, max_streams, streams: Mutex::default() })
    }

    /// Admits one stream open from `client`; the slot it returns (when streams are capped)
    /// counts the stream until it is dropped.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Option<StreamSlot>, IpRefusal> {
        let key = limit_key(client);
        if self.max_streams == 0 {
            self.check_rate(key)?;
            return Ok(None);
        }
        let mut streams = self.lock();
        let count = streams.get(&key).copied().unwrap_or(0);
        if count >= self.max_streams {
            return Err(IpRefusal::TooManyStreams);
        }
        // Under the lock, so two opens racing for the last place cannot both take it.
        self.check_rate(key)?;
        streams.insert(key, count + 1);
        Ok(Some(StreamSlot { limits: self.clone(), key }))
    }

    fn check_rate(&self, key: IpAddr) -> Result<(), IpRefusal> {
        let Some(rate) = &self.rate else { return Ok(()) };
        rate.check_key(&key)
            .map_err(|not_until| IpRefusal::RateLimited { retry_after: not_until.wait_time_from(rate.clock().now()) })
    }

    /// Forgets the rate state of addresses that have not opened a stream for long enough to be
    /// indistinguishable from new ones. Called periodically by the node.
    pub fn upkeep(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        self.lock().shrink_to_fit();
    }

    /// Addresses with rate state, and addresses holding streams.
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        (self.rate.as_ref().map_or(0, |rate| rate.len()), self.lock().len())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Counts are updated in one statement each: a panic elsewhere leaves them consistent.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open stream of a client address; dropping it gives the place back.
pub struct StreamSlot {
    limits: Arc<IpLimits>,
    key: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.limits.lock();
        if let Some(count) = streams.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

/// What the limits count by: an IPv4 address, or the /64 of an IPv6 one.
fn limit_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), ip("2001:db8:1:2::"));
        assert_ne!(limit_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn the_stream_cap_counts_open_slots_per_address() {
        let limits = IpLimits::new(0, 1, 2);
        let a = limits.admit(ip("192.0.2.1")).expect("first");
        let _b = limits.admit(ip("192.0.2.1")).expect("second");
        assert_eq!(limits.admit(ip("192.0.2.1")).err(), Some(IpRefusal::TooManyStreams));
        let _other = limits.admit(ip("192.0.2.2")).expect("another address has its own count");
        let _same_64 = limits.admit(ip("2001:db8::1")).expect("v6");
        let _same_64_again = limits.admit(ip("2001:db8::2")).expect("v6, same /64, second");
        assert!(limits.admit(ip("2001:db8::3")).is_err(), "a third in the same /64");
        drop(a);
        assert!(limits.admit(ip("192.0.2.1")).is_ok(), "a closed stream gives its place back");
    }

    #[test]
    fn slots_leave_no_state_behind() {
        let limits = IpLimits::new(0, 1, 5);
        let slots: Vec<_> = (0..100).map(|i| limits.admit(ip(&format!("10.0.0.{i}"))).expect("ok")).collect();
        assert_eq!(limits.tracked().1, 100);
        drop(slots);
        assert_eq!(limits.tracked(), (0, 0));
    }

    #[test]
    fn the_rate_allows_a_burst_then_says_when_to_come_back() {
        let limits = IpLimits::new(60, 3, 0);
        for _ in 0..3 {
            assert_eq!(limits.admit(ip("192.0.2.1")).map(|slot| slot.is_none()), Ok(true));
        }
        let Err(IpRefusal::RateLimited { retry_after }) = limits.admit(ip("192.0.2.1")) else {
            panic!("the fourth open within the burst is refused")
        };
        // 60 per minute: one more a second.
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1), "{retry_after:?}");
        assert!(limits.admit(ip("192.0.2.2")).is_ok(), "another address has its own budget");
    }

    #[test]
    fn a_refused_rate_takes_no_stream_place_and_zero_turns_both_off() {
        let limits = IpLimits::new(60, 1, 5);
        let _slot = limits.admit(ip("192.0.2.1")).expect("first");
        assert!(matches!(limits.admit(ip("192.0.2.1")), Err(IpRefusal::RateLimited { .. })));
        assert_eq!(limits.tracked().1, 1);
        let off = IpLimits::new(0, 1, 0);
        for _ in 0..10_000 {
            assert_eq!(off.admit(ip("192.0.2.1")).map(|slot| slot.is_none()), Ok(true));
        }
        assert_eq!(off.tracked(), (0, 0));
    }

    #[test]
    fn upkeep_forgets_addresses_whose_budget_is_full_again() {
        // 60,000 per minute: a budget refills in a millisecond.
        let limits = IpLimits::new(60_000, 1, 0);
        for i in 0..50 {
            let _ = limits.admit(ip(&format!("10.0.0.{i}")));
        }
        assert_eq!(limits.tracked().0, 50);
        std::thread::sleep(Duration::from_millis(20));
        limits.upkeep();
        assert_eq!(limits.tracked().0, 0);
    }
}
