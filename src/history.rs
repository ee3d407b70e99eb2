//! History and resume cursors: the ids that let a reconnecting client continue exactly where
//! it stopped, on any node, across every channel of its stream.
//!
//! A durable publish appends to a bounded per-channel history (a Redis stream whose key is the
//! channel name itself, so key and channel always share a cluster slot) and publishes live
//! with the new entry's id. A connection tracks, per channel, the last id it delivered; every
//! event it writes carries `id: <cursor>`, a compact URL-safe encoding of
//! (history epoch, issue time, per-channel positions). On reconnect the node positions each
//! channel from the cursor, subscribes live first, replays what is newer from history, and
//! drops live duplicates by id. When continuity cannot be proven (trimmed, expired, history
//! lost with Redis) the client gets an explicit `reset` event instead of a silent gap.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;

use crate::channel::{ChannelKind, ChannelName, ChannelNames};

/// A history entry id: `<milliseconds>-<sequence>`, ordered like Redis stream ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// Before every entry: "the channel was empty when I looked".
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One message recorded in a channel's history: its id and the payload as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: StreamId,
    pub payload: Bytes,
}

/// What history says about one channel since a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Every entry after the position, oldest first (possibly none).
    Entries(Vec<Entry>),
    /// Continuity cannot be proven; the channel continues from `tail`.
    Reset { tail: StreamId },
}

/// Length and age bounds of one channel kind's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub length: u32,
    /// Zero: no age limit (and no expiry of idle histories).
    pub age: Duration,
}

/// History settings per channel kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    pub user: Retention,
    pub topic: Retention,
    pub broadcast: Retention,
}

impl HistoryConfig {
    pub fn retention(&self, kind: ChannelKind) -> Retention {
        match kind {
            ChannelKind::User => self.user,
            ChannelKind::Topic => self.topic,
            ChannelKind::Broadcast => self.broadcast,
        }
    }
}

/// Names a channel inside a cursor: 32 bits of FNV-1a. A stream holds a handful of channels,
/// so a collision inside one stream is negligible, and a cursor can only position channels
/// the token already grants.
pub fn channel_hash(channel: &ChannelName) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in channel.as_str().bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Reads the history epoch the functions return: a decimal number below 2^32 that changes
/// whenever Redis loses its data.
pub fn parse_epoch(epoch: &str) -> Option<u32> {
    epoch.parse().ok()
}

const CURSOR_VERSION: u8 = 1;
/// Channels one cursor may carry (a stream has user + broadcast + at most 64 topics).
const MAX_CURSOR_CHANNELS: usize = 80;

/// A decoded `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u32,
    /// UNIX seconds when the node wrote it: how long the client has been away.
    pub issued_at: u64,
    pub positions: Vec<(u32, StreamId)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a resume cursor of this server")]
pub struct CursorError;

impl Cursor {
    /// Writes a cursor: version, epoch, issue time, then (channel hash, position) pairs.
    pub fn encode(epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) -> String {
        URL_SAFE_NO_PAD.encode(Self::raw(epoch, issued_at, positions))
    }

    /// The `id: <cursor>\n` line of an event, encoded straight into its final buffer: this runs
    /// once per stream per durable event, on the fan-out hot path.
    pub fn id_line(epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) -> Bytes {
        let mut line = Vec::new();
        Self::put_id_line(&mut line, epoch, issued_at, positions);
        Bytes::from(line)
    }

    /// Appends the `id: <cursor>\n` line to `out` (a stream's outgoing bytes).
    pub fn put_id_line(
        out: &mut Vec<u8>,
        epoch: u32,
        issued_at: u64,
        positions: impl Iterator<Item = (u32, StreamId)>,
    ) {
        thread_local! {
            /// The unencoded cursor, reused: this runs per stream per durable event.
            static RAW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        RAW.with_borrow_mut(|raw| {
            raw.clear();
            Self::put_raw(raw, epoch, issued_at, positions);
            let start = out.len();
            let encoded_len = base64::encoded_len(raw.len(), false).unwrap_or(0);
            out.extend_from_slice(b"id: ");
            out.resize(start + 4 + encoded_len, 0);
            let written = URL_SAFE_NO_PAD.encode_slice(&raw[..], &mut out[start + 4..]).unwrap_or(0);
            out.truncate(start + 4 + written);
            out.push(b'\n');
        });
    }

    fn raw(epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        Self::put_raw(&mut out, epoch, issued_at, positions);
        out
    }

    fn put_raw(out: &mut Vec<u8>, epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) {
        out.push(CURSOR_VERSION);
        out.extend_from_slice(&epoch.to_le_bytes());
        put_varint(out, issued_at);
        for (hash, id) in positions {
            out.extend_from_slice(&hash.to_le_bytes());
            put_varint(out, id.ms);
            put_varint(out, id.seq);
        }
    }

    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.len() > 2048 {
            return Err(CursorError);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CursorError)?;
        let mut input = bytes.as_slice();
        if take(&mut input, 1)?[0] != CURSOR_VERSION {
            return Err(CursorError);
        }
        let epoch = u32::from_le_bytes(take(&mut input, 4)?.try_into().map_err(|_| CursorError)?);
        let issued_at = get_varint(&mut input)?;
        let mut positions = Vec::new();
        while !input.is_empty() {
            if positions.len() == MAX_CURSOR_CHANNELS {
                return Err(CursorError);
            }
            let hash = u32::from_le_bytes(take(&mut input, 4)?.try_into().map_err(|_| CursorError)?);
            let ms = get_varint(&mut input)?;
            let seq = get_varint(&mut input)?;
            positions.push((hash, StreamId { ms, seq }));
        }
        Ok(Self { epoch, issued_at, positions })
    }

    /// This cursor's position for `channel`, if it has one.
    pub fn position(&self, channel: &ChannelName) -> Option<StreamId> {
        let hash = channel_hash(channel);
        self.positions.iter().find(|(h, _)| *h == hash).map(|(_, id)| *id)
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], CursorError> {
    if input.len() < n {
        return Err(CursorError);
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(input: &mut &[u8]) -> Result<u64, CursorError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = take(input, 1)?[0];
        value |= u64::from(byte & 0x7f).checked_shl(shift).ok_or(CursorError)?;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CursorError)
}

/// Why a stream's channels lost continuity, as the `reset` event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The cursor is older than the retained history (trimmed or expired).
    WindowLost,
    /// History was lost with Redis (restart without persistence, FLUSHALL, failover).
    HistoryLost,
    /// `Last-Event-ID` is not a cursor of this server.
    InvalidCursor,
}

impl ResetReason {
    pub fn label(self) -> &'static str {
        match self {
            ResetReason::WindowLost => "window_lost",
            ResetReason::HistoryLost => "history_lost",
            ResetReason::InvalidCursor => "invalid_cursor",
        }
    }
}

/// `event: reset` naming the channels (as clients see them) that continue without their past.
pub fn reset_frame(names: &ChannelNames, channels: &[&ChannelName], reason: ResetReason) -> Bytes {
    let logical: Vec<&str> = channels.iter().map(|c| names.logical(c)).collect();
    let data = serde_json::json!({"channels": logical, "reason": reason.label()});
    crate::frame::event(Some("reset"), None, &data.to_string())
}

/// Marks a live message that was recorded in history: `0x1F <id> 0x1F <payload>`. A JSON
/// envelope never starts with this byte; plain payloads starting with it are reserved.
pub const LIVE_ID_MARK: u8 = 0x1f;

/// Splits a live message into its history id and payload, if the function published it.
pub fn split_live_id(message: &Bytes) -> (Option<StreamId>, Bytes) {
    if message.first() != Some(&LIVE_ID_MARK) {
        return (None, message.clone());
    }
    let rest = &message[1..];
    let Some(end) = rest.iter().position(|&b| b == LIVE_ID_MARK) else {
        return (None, message.clone());
    };
    match std::str::from_utf8(&rest[..end]).ok().and_then(StreamId::parse) {
        Some(id) => (Some(id), message.slice(end + 2..)),
        None => (None, message.clone()),
    }
}

/// The Redis Function library. Generated from the configuration so that producers' plain
/// `FCALL sse_publish 1 <channel> <payload>` applies the same retention as the nodes; every
/// node loads it with `FUNCTION LOAD REPLACE` (all nodes must share history settings).
pub fn redis_library(prefix: &str, config: &HistoryConfig) -> String {
    let limits = |r: Retention| format!("{{len = {}, age = {}}}", r.length, r.age.as_millis());
    LUA_LIBRARY
        .replace("%PREFIX%", &prefix.replace('\\', "\\\\").replace('\'', "\\'"))
        .replace("%USER%", &limits(config.user))
        .replace("%TOPIC%", &limits(config.topic))
        .replace("%BROADCAST%", &limits(config.broadcast))
}

/// The functions as Lua, with `%PREFIX%`, `%USER%`, `%TOPIC%` and `%BROADCAST%` filled in by
/// [`redis_library`].
const LUA_LIBRARY: &str = include_str!("history.lua");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stream_ids_parse_print_and_order() {
        let id = StreamId::parse("1700000000000-3").expect("valid");
        assert_eq!(id, StreamId { ms: 1_700_000_000_000, seq: 3 });
        assert_eq!(id.to_string(), "1700000000000-3");
        assert!(StreamId::parse("17-4").expect("id") < StreamId::parse("18-0").expect("id"));
        assert!(StreamId::parse("17-4").expect("id") > StreamId::parse("17-3").expect("id"));
        for bad in ["", "17", "-1", "a-b", "1-2-3", "1 -2"] {
            assert_eq!(StreamId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_cursor_is_short_and_url_safe() {
        let channels = ["sse:user:42", "sse:broadcast", "sse:topic:rounds:roulette:7"].map(ChannelName::from_bus);
        let positions = channels.iter().map(|c| (channel_hash(c), StreamId { ms: 1_795_000_000_000, seq: 12 }));
        let text = Cursor::encode(0xdead_beef, 1_795_000_000, positions);
        assert!(text.len() <= 64, "{text} is {} chars", text.len());
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let cursor = Cursor::decode(&text).expect("round trip");
        assert_eq!(cursor.epoch, 0xdead_beef);
        let positions = channels.iter().map(|c| (channel_hash(c), StreamId { ms: 1_795_000_000_000, seq: 12 }));
        assert_eq!(Cursor::id_line(0xdead_beef, 1_795_000_000, positions), Bytes::from(format!("id: {text}\n")));
        assert_eq!(cursor.position(&channels[2]), Some(StreamId { ms: 1_795_000_000_000, seq: 12 }));
        assert_eq!(cursor.position(&ChannelName::from_bus("sse:user:43")), None);
    }

    #[test]
    fn garbage_is_not_a_cursor() {
        for bad in ["", "h1", "not a cursor!", "AAAA", &"A".repeat(3000)] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
        let mut valid = Cursor::encode(1, 2, std::iter::once((3, StreamId { ms: 4, seq: 5 })));
        valid.pop();
        assert!(Cursor::decode(&valid).is_err(), "truncated");
    }

    #[test]
    fn live_messages_carry_their_history_id() {
        let (id, payload) = split_live_id(&Bytes::from_static(b"\x1f1700-2\x1f{\"data\":1}"));
        assert_eq!(id, Some(StreamId { ms: 1700, seq: 2 }));
        assert_eq!(&payload[..], b"{\"data\":1}");
        let plain = Bytes::from_static(b"{\"data\":1}");
        assert_eq!(split_live_id(&plain), (None, plain.clone()));
        let odd = Bytes::from_static(b"\x1fnot an id\x1fx");
        assert_eq!(split_live_id(&odd), (None, odd.clone()));
    }

    #[test]
    fn the_library_embeds_prefix_and_limits() {
        let retention = Retention { length: 100, age: Duration::from_secs(3600) };
        let lua = redis_library("app's", &HistoryConfig { user: retention, topic: retention, broadcast: retention });
        assert!(lua.starts_with("#!lua name=sse_fanout\n"));
        assert!(lua.contains(r"local PREFIX = 'app\'s'"));
        assert!(lua.contains("user = {len = 100, age = 3600000}"));
        assert!(!lua.contains("%USER%") && !lua.contains("%PREFIX%"));
    }

    proptest! {
        #[test]
        fn any_cursor_round_trips(epoch: u32, issued: u64, positions in proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..10)) {
            let positions: Vec<(u32, StreamId)> = positions.into_iter().map(|(h, ms, seq)| (h, StreamId { ms, seq })).collect();
            let text = Cursor::encode(epoch, issued, positions.iter().copied());
            let cursor = Cursor::decode(&text).expect("round trip");
            prop_assert_eq!(cursor, Cursor { epoch, issued_at: issued, positions });
        }

        #[test]
        fn decoding_never_panics(text in ".{0,200}") {
            let _ = Cursor::decode(&text);
        }
    }
}
