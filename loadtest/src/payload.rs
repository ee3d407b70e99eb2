//! The measurement stamp carried in every published event's data: a per-stream sequence
//! number and the send time, so a subscriber can compute publish-to-receive latency and
//! detect loss, duplicates and reordering without any other channel back to the publisher.
//!
//! Format: `<seq>:<unix nanos>:<padding>` — ASCII digits only, so it survives every server's
//! framing (our JSON envelope, Nchan's raw body, Pushpin's `http-stream` content) unescaped.
//! The padding lets a run choose the payload size: `x` repeated, or JSON objects that vary
//! (ids, numbers, words) for runs where how well the payload compresses matters
//! (`--payload-fill json`: a run of `x` would compress to almost nothing).

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

/// What a payload is padded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Fill {
    /// `x` repeated.
    #[default]
    X,
    /// A JSON array of objects with varying ids, timestamps, amounts and words, as a
    /// notification feed carries (different in every event). Its quotes need a publisher
    /// that escapes the data (sse-fanout's envelope does; Pushpin's body template does not).
    Json,
}

/// Writes the data string for `stamp`, padded to `min_len` bytes (or not at all when the stamp
/// alone is that long).
pub fn encode(stamp: Stamp, min_len: usize, fill: Fill) -> String {
    let mut s = format!("{}:{}:", stamp.seq, stamp.sent_nanos);
    if s.len() >= min_len {
        return s;
    }
    match fill {
        Fill::X => s.extend(std::iter::repeat_n('x', min_len - s.len())),
        Fill::Json => {
            json_fill(&mut s, stamp.seq, min_len);
            s.truncate(min_len - 1);
            s.push(']');
        }
    }
    s
}

/// Appends `[` and JSON objects to `s` until it holds at least `len` bytes; the values come
/// from a generator seeded with `seed`, so that events differ from each other.
fn json_fill(s: &mut String, seed: u64, len: usize) {
    const WORDS: [&str; 16] = [
        "order",
        "shipped",
        "payment",
        "received",
        "alice",
        "bob",
        "refund",
        "pending",
        "item",
        "delivered",
        "warehouse",
        "berlin",
        "lisbon",
        "express",
        "cancelled",
        "review",
    ];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    s.push('[');
    while s.len() < len {
        let text: Vec<&str> = (0..6).map(|_| WORDS[next() as usize % WORDS.len()]).collect();
        s.push_str(&format!(
            r#"{{"id":"{:08x}{:08x}","at":{},"user":{},"text":"{}","amount":{}.{:02}}},"#,
            next() & 0xffff_ffff,
            next() & 0xffff_ffff,
            1_795_000_000_000 + next() % 1_000_000,
            next() % 100_000,
            text.join(" "),
            next() % 10_000,
            next() % 100
        ));
    }
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
        assert_eq!(decode(encode(st, 0, Fill::X).as_bytes()), Some(st));
        for fill in [Fill::X, Fill::Json] {
            for len in [100, 256, 4096] {
                let padded = encode(st, len, fill);
                assert_eq!(padded.len(), len);
                assert_eq!(decode(padded.as_bytes()), Some(st));
                assert!(!padded.contains('\n'));
            }
        }
        let json = encode(st, 300, Fill::Json);
        assert!(json.contains(r#":[{"id":""#) && json.ends_with(']'), "{json}");
        assert_ne!(json[40..], encode(Stamp { seq: 43, ..st }, 300, Fill::Json)[40..], "events differ");
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
