//! The measurement stamp carried in every published event's data: a per-stream sequence
//! number and the send time, so a subscriber can compute publish-to-receive latency and
//! detect loss, duplicates and reordering without any other channel back to the publisher.
//!
//! Format: `<seq>:<unix nanos>:<padding>` — ASCII digits only, so it survives every server's
//! framing (our JSON envelope, Nchan's raw body, Pushpin's `http-stream` content) unescaped.
//! The padding (`x` repeated) lets a run choose the payload size.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the UNIX epoch. Publisher and subscribers run on the same machine, so
/// they read the same clock and the difference is a true one-way latency.
pub fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// What a subscriber learns from one event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Position in the stream this event belongs to (broadcast: global; unicast: per user).
    pub seq: u64,
    /// When the publisher created the message.
    pub sent_nanos: u64,
}

/// Writes the data string for `stamp`, padded with `x` to at least `min_len` bytes.
pub fn encode(stamp: Stamp, min_len: usize) -> String {
    let mut s = format!("{}:{}:", stamp.seq, stamp.sent_nanos);
    if s.len() < min_len {
        s.extend(std::iter::repeat_n('x', min_len - s.len()));
    }
    s
}

/// Reads a stamp back from an event's data; `None` for anything else (the `connected`
/// event, a peer's welcome text), which the caller ignores.
pub fn decode(data: &[u8]) -> Option<Stamp> {
    let (seq, rest) = parse_digits(data)?;
    let rest = rest.strip_prefix(b":")?;
    let (sent_nanos, rest) = parse_digits(rest)?;
    if !rest.starts_with(b":") {
        return None;
    }
    Some(Stamp { seq, sent_nanos })
}

fn parse_digits(s: &[u8]) -> Option<(u64, &[u8])> {
    let end = s.iter().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 || end > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &s[..end] {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((v, &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_padding() {
        let st = Stamp { seq: 42, sent_nanos: 1_700_000_000_123_456_789 };
        assert_eq!(decode(encode(st, 0).as_bytes()), Some(st));
        let padded = encode(st, 100);
        assert_eq!(padded.len(), 100);
        assert_eq!(decode(padded.as_bytes()), Some(st));
    }

    #[test]
    fn rejects_other_data() {
        assert_eq!(decode(br#"{"connection_id":"c1","node":"n1"}"#), None);
        assert_eq!(decode(b"12:34"), None);
        assert_eq!(decode(b":12:34:"), None);
        assert_eq!(decode(b"99999999999999999999999:1:"), None);
        assert_eq!(decode(b""), None);
    }
}
