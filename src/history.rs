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
//!
//! Nothing a client or a producer sends is trusted as a position. The functions tag the id of
//! every durable live message with an HMAC under a key only they and the nodes hold
//! ([`LiveKey`]), and a node trusts an id only when its tag verifies ([`read_live`]); a cursor
//! carries a keyed MAC of its own bytes, so a client cannot write positions into it. History is
//! read in bounded [`Page`]s.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
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

/// What history says about one channel since a position, one page at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// The entries after the position, oldest first (possibly none). `more`: the page filled
    /// up, so there may be more after the last one; ask again from there.
    Entries { entries: Vec<Entry>, more: bool },
    /// Continuity cannot be proven; the channel continues from `tail`. `lost`: the position is
    /// missing although newer than the oldest entry kept, which trimming never does: history was
    /// lost (a failover to a replica that had not received the last writes), not outrun.
    Reset { tail: StreamId, lost: bool },
}

/// How much one history read may return, over all the channels it asks about: at most
/// `entries` entries and `bytes` of payload, except that an entry larger than `bytes` comes
/// alone (so every read makes progress however large one entry is) unless the page is `strict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub entries: u32,
    pub bytes: u32,
    /// Never more than `bytes`: an entry larger than what is left is left for a later page, even
    /// when this one comes back empty. For reads whose budget must hold exactly; the page after
    /// it must not be strict, or a large entry would never come.
    pub strict: bool,
}

/// How a resume reads history: in pages, and not past `max_replay` entries per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    pub page: Page,
    pub max_replay: u32,
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

/// Version 2: the cursor ends with a MAC (version 1 had none and is refused as malformed).
const CURSOR_VERSION: u8 = 2;
/// Channels one cursor may carry (a stream has user + broadcast + at most 64 topics).
const MAX_CURSOR_CHANNELS: usize = 80;
/// Bytes of the MAC at the end of a cursor: 64 bits, so guessing one takes 2^63 tries online.
const CURSOR_TAG_LEN: usize = 8;

/// A decoded `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u32,
    /// UNIX seconds when the node wrote it: how long the client has been away.
    pub issued_at: u64,
    pub positions: Vec<(u32, StreamId)>,
}

/// Why a `Last-Event-ID` is not a usable cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not in the shape of a cursor at all.
    #[error("not a resume cursor of this server")]
    Malformed,
    /// Shaped like a cursor, but its MAC is not this cluster's: altered, invented, or written
    /// under a key that is gone. `epoch` is what it claims, unverified.
    #[error("a resume cursor that this server did not write")]
    Forged { epoch: u32 },
}

impl Cursor {
    /// Writes a cursor: version, epoch, issue time, (channel hash, position) pairs, then the
    /// MAC of all of it under the cursor key.
    pub fn encode(epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) -> String {
        let mut raw = Vec::with_capacity(64);
        Self::put_raw(&mut raw, epoch, issued_at, positions);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The `id: <cursor>\n` line of an event, encoded straight into its final buffer: this runs
    /// once per stream per durable event, on the fan-out hot path.
    pub fn id_line(epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) -> Bytes {
        let mut line = Vec::new();
        Self::put_id_line(&mut line, epoch, issued_at, positions);
        Bytes::from(line)
    }

    /// Appends the `id: <cursor>\n` line to `out` (a stream's outgoing bytes). Allocates nothing
    /// once `out` has room; the MAC is one SipHash-2-4 over the ~40 raw bytes (tens of
    /// nanoseconds, against the microseconds a delivery's `send` costs).
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

    fn put_raw(out: &mut Vec<u8>, epoch: u32, issued_at: u64, positions: impl Iterator<Item = (u32, StreamId)>) {
        let from = out.len();
        out.push(CURSOR_VERSION);
        out.extend_from_slice(&epoch.to_le_bytes());
        put_varint(out, issued_at);
        for (hash, id) in positions {
            out.extend_from_slice(&hash.to_le_bytes());
            put_varint(out, id.ms);
            put_varint(out, id.seq);
        }
        let tag = cursor_tag(&out[from..]);
        out.extend_from_slice(&tag.to_le_bytes());
    }

    /// Reads and checks a cursor: its shape first, then its MAC.
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.len() > 2048 {
            return Err(CursorError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CursorError::Malformed)?;
        let Some(body_len) = bytes.len().checked_sub(CURSOR_TAG_LEN) else {
            return Err(CursorError::Malformed);
        };
        let (body, tag) = bytes.split_at(body_len);
        let cursor = Self::parse_body(body).ok_or(CursorError::Malformed)?;
        let tag = u64::from_le_bytes(tag.try_into().map_err(|_| CursorError::Malformed)?);
        // A MAC is compared in constant time by habit; a 64-bit tag leaks nothing useful here anyway.
        if !constant_time_eq(&tag.to_le_bytes(), &cursor_tag(body).to_le_bytes()) {
            return Err(CursorError::Forged { epoch: cursor.epoch });
        }
        Ok(cursor)
    }

    fn parse_body(mut input: &[u8]) -> Option<Self> {
        if take(&mut input, 1).ok()?[0] != CURSOR_VERSION {
            return None;
        }
        let epoch = u32::from_le_bytes(take(&mut input, 4).ok()?.try_into().ok()?);
        let issued_at = get_varint(&mut input).ok()?;
        let mut positions = Vec::new();
        while !input.is_empty() {
            if positions.len() == MAX_CURSOR_CHANNELS {
                return None;
            }
            let hash = u32::from_le_bytes(take(&mut input, 4).ok()?.try_into().ok()?);
            let ms = get_varint(&mut input).ok()?;
            let seq = get_varint(&mut input).ok()?;
            positions.push((hash, StreamId { ms, seq }));
        }
        Some(Self { epoch, issued_at, positions })
    }

    /// This cursor's position for `channel`, if it has one.
    pub fn position(&self, channel: &ChannelName) -> Option<StreamId> {
        let hash = channel_hash(channel);
        self.positions.iter().find(|(h, _)| *h == hash).map(|(_, id)| *id)
    }
}

/// The cursor key: a process-wide value because cursors are written deep in the fan-out path
/// (one node is one process). A node on Redis installs the key every node of its cluster
/// derives from the function library's key ([`LiveKey::cursor_key`]); until then, and for the
/// embedded bus, it is random per process, like the embedded history's epoch.
static CURSOR_KEY: RwLock<Option<(u64, u64)>> = RwLock::new(None);
/// Bumped on every install, so each thread re-reads the key only when it changed: the hot path
/// costs one load of a line nobody writes, not a lock.
static CURSOR_KEY_GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static CACHED_CURSOR_KEY: Cell<(u64, (u64, u64))> = const { Cell::new((u64::MAX, (0, 0))) };
}

/// Makes `key` the key every cursor is written and checked with from now on.
pub fn install_cursor_key(key: (u64, u64)) {
    *CURSOR_KEY.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    CURSOR_KEY_GENERATION.fetch_add(1, Ordering::AcqRel);
}

fn cursor_key() -> (u64, u64) {
    let generation = CURSOR_KEY_GENERATION.load(Ordering::Acquire);
    CACHED_CURSOR_KEY.with(|cached| {
        let (seen, key) = cached.get();
        if seen == generation {
            return key;
        }
        let key = *CURSOR_KEY.write().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(rand::random);
        cached.set((generation, key));
        key
    })
}

/// SipHash-2-4, a keyed PRF made to authenticate short inputs, over the cursor's bytes. std's
/// `SipHasher` is deprecated only as a `HashMap` hasher; as SipHash-2-4 it is exact and stable.
#[allow(deprecated)]
fn cursor_tag(raw: &[u8]) -> u64 {
    use std::hash::Hasher;
    let (k0, k1) = cursor_key();
    let mut hasher = std::hash::SipHasher::new_with_keys(k0, k1);
    hasher.write(raw);
    hasher.finish()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], CursorError> {
    if input.len() < n {
        return Err(CursorError::Malformed);
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
        value |= u64::from(byte & 0x7f).checked_shl(shift).ok_or(CursorError::Malformed)?;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CursorError::Malformed)
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

/// Marks a live message that was recorded in history: `0x1F <id> 0x20 <tag> 0x1F <payload>`,
/// where `tag` is the hex HMAC-SHA1 of `<channel>\n<id>` under the [`LiveKey`]. A JSON envelope
/// never starts with this byte; every payload that does is reserved for the functions.
pub const LIVE_ID_MARK: u8 = 0x1f;
/// Hex digits of a tag (a whole HMAC-SHA1).
const TAG_HEX_LEN: usize = 40;
/// The longest mark: two ids of 20 digits, a dash, a space, a tag and the two mark bytes.
const MAX_MARK_LEN: usize = 2 + 41 + 1 + TAG_HEX_LEN;

/// A live message as the bus received it, once its mark (if any) has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Not recorded in history (a plain `PUBLISH`): delivered without an id.
    Plain(Bytes),
    /// Published by `sse_publish`, with the id its tag proves.
    Durable { id: StreamId, payload: Bytes },
    /// Starts like a marked message but its tag is missing or wrong: whatever it says, its id
    /// is never used. Refused and counted as `forged_history_id`.
    Forged,
}

/// Reads a live message that arrived on `channel`. `key` is the cluster's [`LiveKey`]; a node
/// without one (history off) trusts no id and delivers a well-formed mark's payload as plain.
pub fn read_live(channel: &[u8], message: &Bytes, key: Option<&LiveKey>) -> Live {
    if message.first() != Some(&LIVE_ID_MARK) {
        return Live::Plain(message.clone());
    }
    let head = &message[1..message.len().min(MAX_MARK_LEN)];
    let Some(end) = head.iter().position(|&b| b == LIVE_ID_MARK) else { return Live::Forged };
    let Some((id, tag)) = std::str::from_utf8(&head[..end]).ok().and_then(|mark| mark.split_once(' ')) else {
        return Live::Forged;
    };
    let (Some(parsed), true) = (StreamId::parse(id), tag.len() == TAG_HEX_LEN) else { return Live::Forged };
    let payload = message.slice(end + 2..);
    match key {
        None => Live::Plain(payload),
        Some(key) if key.verify(channel, id, tag.as_bytes()) => Live::Durable { id: parsed, payload },
        Some(_) => Live::Forged,
    }
}

/// The secret the history functions tag live ids with: 32 random bytes as 64 lowercase hex
/// digits, used as they are as the HMAC-SHA1 key (exactly one SHA-1 block, so HMAC needs no
/// key hashing in Lua). It lives in the function library itself (see [`Library`]): producers
/// call the functions but never see it, `FLUSHALL` does not touch it, and every node that
/// loads the library again after Redis lost it writes back the key it already holds.
#[derive(Clone)]
pub struct LiveKey {
    hex: [u8; 64],
    /// SHA-1 states after the key's inner and outer pad blocks, so a tag costs two blocks less.
    inner: sha1_smol::Sha1,
    outer: sha1_smol::Sha1,
}

impl fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveKey({})", self.fingerprint())
    }
}

impl PartialEq for LiveKey {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.hex, &other.hex)
    }
}

impl Eq for LiveKey {}

/// Where the key sits in the library's code, as [`Library::render`] writes it.
const KEY_LINE: &str = "local KEY = '";

impl LiveKey {
    /// A new random key (the operating system's CSPRNG through `rand`).
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
            pair[1] = HEX_DIGITS[usize::from(byte & 0xf)];
        }
        Self::from_hex(hex)
    }

    /// Reads the key of 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let hex: [u8; 64] = text.as_bytes().try_into().ok()?;
        hex.iter().all(|b| HEX_DIGITS.contains(b)).then(|| Self::from_hex(hex))
    }

    /// The key written in a library's code, if the library is one that has a key.
    pub fn in_library(code: &str) -> Option<Self> {
        let at = code.find(KEY_LINE)? + KEY_LINE.len();
        Self::parse(code.get(at..at + 64)?)
    }

    fn from_hex(hex: [u8; 64]) -> Self {
        let pad = |byte: u8| {
            let mut block = [0u8; 64];
            for (b, k) in block.iter_mut().zip(hex) {
                *b = k ^ byte;
            }
            let mut state = sha1_smol::Sha1::new();
            state.update(&block);
            state
        };
        Self { hex, inner: pad(0x36), outer: pad(0x5c) }
    }

    pub fn as_str(&self) -> &str {
        // Only hex digits are ever stored.
        std::str::from_utf8(&self.hex).unwrap_or_default()
    }

    /// HMAC-SHA1 of the concatenated `parts`.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 20] {
        let mut inner = self.inner.clone();
        parts.iter().for_each(|part| inner.update(part));
        let mut outer = self.outer.clone();
        outer.update(&inner.digest().bytes());
        outer.digest().bytes()
    }

    /// The hex tag of a live id, as `sse_publish` writes it.
    #[cfg(test)]
    fn tag(&self, channel: &[u8], id: &str) -> String {
        hex(&self.mac(&[channel, b"\n", id.as_bytes()]))
    }

    fn verify(&self, channel: &[u8], id: &str, tag: &[u8]) -> bool {
        let expected = self.mac(&[channel, b"\n", id.as_bytes()]);
        let mut wanted = [0u8; TAG_HEX_LEN];
        for (pair, byte) in wanted.chunks_exact_mut(2).zip(expected) {
            pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
            pair[1] = HEX_DIGITS[usize::from(byte & 0xf)];
        }
        constant_time_eq(&wanted, tag)
    }

    /// A name for the key that reveals nothing of it (what `FCALL sse_key_id 0` answers): how a
    /// node checks each second that the library still holds the key it verifies with.
    pub fn fingerprint(&self) -> String {
        hex(&self.mac(&[b"sse-fanout key id"]))[..16].to_owned()
    }

    /// The history epoch of a Redis Cluster: the library's, derived from its key, since a cluster
    /// has no key outside one slot to keep a shared epoch in. Every node derives the same, and
    /// it changes when the key does (a cluster that lost its library and every node).
    pub fn cluster_epoch(&self) -> u32 {
        let mac = self.mac(&[b"sse-fanout cluster epoch"]);
        u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]])
    }

    /// The cursor key derived from this one: every node of a cluster derives the same.
    pub fn cursor_key(&self) -> (u64, u64) {
        let mac = self.mac(&[b"sse-fanout cursor key"]);
        let word = |at: usize| u64::from_le_bytes(mac[at..at + 8].try_into().unwrap_or_default());
        (word(0), word(8))
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Redis Function library's source: generated from the configuration so that producers'
/// plain `FCALL sse_publish 1 <channel> <payload>` applies the same retention as the nodes
/// (all nodes must share history settings), with the cluster's [`LiveKey`] written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    prefix: String,
    config: HistoryConfig,
    /// For a Redis Cluster: `{<channel>}` keys, SPUBLISH, per-history era markers and the
    /// library's epoch (see history.lua).
    cluster: bool,
}

impl Library {
    pub fn new(prefix: &str, config: HistoryConfig) -> Self {
        Self { prefix: prefix.to_owned(), config, cluster: false }
    }

    /// The same library for a Redis Cluster.
    pub fn for_cluster(self) -> Self {
        Self { cluster: true, ..self }
    }

    /// The library's code with `key` in it.
    pub fn render(&self, key: &LiveKey) -> String {
        let limits = |r: Retention| format!("{{len = {}, age = {}}}", r.length, r.age.as_millis());
        LUA_LIBRARY
            .replace("%PREFIX%", &self.prefix.replace('\\', "\\\\").replace('\'', "\\'"))
            .replace("%USER%", &limits(self.config.user))
            .replace("%TOPIC%", &limits(self.config.topic))
            .replace("%BROADCAST%", &limits(self.config.broadcast))
            .replace("%CLUSTER%", if self.cluster { "true" } else { "false" })
            .replace("%EPOCH%", &if self.cluster { key.cluster_epoch() } else { 0 }.to_string())
            .replace("%KEY%", key.as_str())
    }
}

/// The functions as Lua, with `%PREFIX%`, `%USER%`, `%TOPIC%`, `%BROADCAST%` and `%KEY%` filled
/// in by [`Library::render`].
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
        // 51 bytes: 43 of positions and 8 of MAC.
        assert!(text.len() <= 68, "{text} is {} chars", text.len());
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
            assert_eq!(Cursor::decode(bad), Err(CursorError::Malformed), "{bad}");
        }
        let mut valid = Cursor::encode(1, 2, std::iter::once((3, StreamId { ms: 4, seq: 5 })));
        valid.pop();
        assert!(Cursor::decode(&valid).is_err(), "truncated");
    }

    /// The raw bytes of a cursor, and the text of raw bytes (no MAC is added or checked).
    fn raw_of(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).expect("base64")
    }

    #[test]
    fn a_cursor_with_any_byte_changed_is_refused_and_names_the_epoch_it_claims() {
        let text = Cursor::encode(77, 1_795_000_000, std::iter::once((9, StreamId { ms: 1_795_000_000_000, seq: 3 })));
        let raw = raw_of(&text);
        for at in 0..raw.len() {
            for flip in [0x01u8, 0x80] {
                let mut altered = raw.clone();
                altered[at] ^= flip;
                let decoded = Cursor::decode(&URL_SAFE_NO_PAD.encode(&altered));
                assert!(decoded.is_err(), "byte {at} ^ {flip:#x} was accepted: {decoded:?}");
            }
        }
        // An invented position: the right shape, the old MAC.
        let mut invented = raw.clone();
        let body = invented.len() - CURSOR_TAG_LEN;
        invented[body - 2] = 0; // the sequence of the position
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&invented)), Err(CursorError::Forged { epoch: 77 }));
        // A version 1 cursor (it had no MAC).
        let mut version1 = raw[..body].to_vec();
        version1[0] = 1;
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&version1)), Err(CursorError::Malformed), "version 1");
    }

    fn key() -> LiveKey {
        LiveKey::parse("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").expect("a key")
    }

    #[test]
    fn the_live_tag_is_hmac_sha1_of_channel_and_id() {
        // python3 -c "import hmac,hashlib; print(hmac.new(b'0123456789abcdef'*4, b'hello', hashlib.sha1).hexdigest())"
        assert_eq!(hex(&key().mac(&[b"hello"])), "82cbe013ff563e690b9ef735d75d8f6daf82eb53");
        assert_eq!(key().tag(b"sse:user:1", "5-0"), hex(&key().mac(&[b"sse:user:1\n5-0"])));
        assert_eq!(LiveKey::parse("0123"), None);
        assert_eq!(LiveKey::parse(&"G".repeat(64)), None);
        assert_ne!(LiveKey::generate(), LiveKey::generate());
        assert!(!format!("{:?}", key()).contains("0123456789abcdef"), "Debug does not show the key");
    }

    fn marked(channel: &str, id: &str, key: &LiveKey, payload: &str) -> Bytes {
        Bytes::from(format!("\x1f{id} {}\x1f{payload}", key.tag(channel.as_bytes(), id)))
    }

    #[test]
    fn a_live_id_is_trusted_only_with_its_tag() {
        let key = key();
        let channel = b"sse:user:1";
        let genuine = marked("sse:user:1", "1700-2", &key, "{\"data\":1}");
        let payload = Bytes::from_static(b"{\"data\":1}");
        assert_eq!(
            read_live(channel, &genuine, Some(&key)),
            Live::Durable { id: StreamId { ms: 1700, seq: 2 }, payload: payload.clone() }
        );
        assert_eq!(read_live(channel, &genuine, None), Live::Plain(payload.clone()), "history off: no id");
        assert_eq!(read_live(channel, &payload, Some(&key)), Live::Plain(payload.clone()));
        let forged = [
            // Another channel's tag, another id under this tag, another key, the version 1 mark.
            marked("sse:user:2", "1700-2", &key, "x"),
            Bytes::from(format!("\x1f1700-3 {}\x1fx", key.tag(channel, "1700-2"))),
            marked("sse:user:1", "1700-2", &LiveKey::generate(), "x"),
            Bytes::from_static(b"\x1f99999999999999-0\x1f{\"data\":1}"),
            Bytes::from_static(b"\x1fnot an id\x1fx"),
            Bytes::from_static(b"\x1f"),
            Bytes::from(format!("\x1f1700-2 {}x\x1fx", key.tag(channel, "1700-2"))),
        ];
        for message in forged {
            assert_eq!(read_live(channel, &message, Some(&key)), Live::Forged, "{message:?}");
        }
    }

    #[test]
    fn the_library_embeds_prefix_limits_and_key_and_gives_the_key_back() {
        let retention = Retention { length: 100, age: Duration::from_secs(3600) };
        let library = Library::new("app's", HistoryConfig { user: retention, topic: retention, broadcast: retention });
        let lua = library.render(&key());
        assert!(lua.starts_with("#!lua name=sse_fanout\n"));
        assert!(lua.contains(r"local PREFIX = 'app\'s'"));
        assert!(lua.contains("user = {len = 100, age = 3600000}"));
        for placeholder in ["%PREFIX%", "%USER%", "%TOPIC%", "%BROADCAST%", "%KEY%", "%CLUSTER%", "%EPOCH%"] {
            assert!(!lua.contains(placeholder), "{placeholder} is filled");
        }
        assert!(lua.contains("local CLUSTER = false\n") && lua.contains("local CLUSTER_EPOCH = '0'"), "single Redis");
        let clustered = library.clone().for_cluster().render(&key());
        assert!(clustered.contains("local CLUSTER = true\n"));
        assert!(clustered.contains(&format!("local CLUSTER_EPOCH = '{}'", key().cluster_epoch())));
        assert_eq!(LiveKey::in_library(&clustered), Some(key()));
        assert_eq!(LiveKey::in_library(&lua), Some(key()));
        assert_eq!(LiveKey::in_library(LUA_LIBRARY), None, "an unfilled library has no key");
    }

    proptest! {
        #[test]
        fn any_cursor_round_trips(epoch: u32, issued: u64, positions in proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..10)) {
            let positions: Vec<(u32, StreamId)> = positions.into_iter().map(|(h, ms, seq)| (h, StreamId { ms, seq })).collect();
            let text = Cursor::encode(epoch, issued, positions.iter().copied());
            let cursor = Cursor::decode(&text).expect("round trip");
            prop_assert_eq!(cursor, Cursor { epoch, issued_at: issued, positions: positions.clone() });
            let mut line = b"data: x\n".to_vec();
            Cursor::put_id_line(&mut line, epoch, issued, positions.iter().copied());
            prop_assert_eq!(line, format!("data: x\nid: {text}\n").into_bytes());
        }

        #[test]
        fn decoding_never_panics(text in ".{0,200}") {
            let _ = Cursor::decode(&text);
        }

        #[test]
        fn decoding_any_bytes_never_panics_and_never_accepts_them(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            // Random bytes carry a valid MAC with probability 2^-64.
            prop_assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw)).is_err());
        }

        #[test]
        fn reading_any_live_message_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut message = vec![LIVE_ID_MARK];
            message.extend(raw);
            let read = read_live(b"sse:user:1", &Bytes::from(message), Some(&key()));
            let trusted = matches!(read, Live::Durable { .. });
            prop_assert!(!trusted, "an id without its tag was trusted");
        }
    }
}
