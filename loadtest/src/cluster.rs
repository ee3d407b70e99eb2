//! Publishing to a Redis Cluster the way a producer does (README, "Redis Cluster"): channel `C`
//! is `{C}` on the cluster (its hash tag), a live message is `SPUBLISH {C}`, a durable one
//! `FCALL <function> 2 {C} {C}:epoch`, each sent to the primary that owns the slot.
//!
//! The slot map is read once, with `CLUSTER SLOTS` from the first seed, when publishing starts;
//! the publisher then splits each batch into one pipeline per primary. (redis-rs's cluster
//! client sends a pipeline to one slot only, so a unicast batch spread over 100,000 users'
//! slots would be a round trip per message, and the single-Redis publisher pipelines: the
//! comparison of the two must not differ in that.) A slot that moves during a run answers
//! `MOVED` and counts as a publish error: the benchmarks do not migrate slots.
//!
//! The slot function is this tool's own (CRC16-XMODEM of the hash tag, checked against Redis's
//! `CLUSTER KEYSLOT` answers) rather than the node's: a producer does not share the server's
//! code, and a wrong slot on either side shows up as a `MOVED` error here.

use anyhow::{Context, Result, bail};
use redis::Value;

/// `--redis-url` of a Redis Cluster: `redis+cluster://host:port,host:port` (seed nodes).
pub const SCHEME: &str = "redis+cluster://";

const SLOTS: u16 = 16384;

/// The seed nodes of a `redis+cluster://` URL as `redis://` URLs, or `None` for any other URL.
pub fn seeds(url: &str) -> Option<Vec<String>> {
    let hosts = url.strip_prefix(SCHEME)?;
    let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
    Some(hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect())
}

/// A channel's name on a cluster: its sharded pub/sub channel and its history stream.
pub fn cluster_name(channel: &str) -> String {
    format!("{{{channel}}}")
}

/// The slot of a key or shard channel: CRC16-XMODEM of its hash tag (the first non-empty
/// `{...}`), or of the whole key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&len| len > 0).map(|len| &rest[..len])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % SLOTS
}

/// Which primary serves each slot: `owner[slot]` indexes `primaries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// `host:port` of each primary, in order of first appearance in `CLUSTER SLOTS`.
    pub primaries: Vec<String>,
    owner: Vec<u16>,
}

impl SlotMap {
    /// Reads a `CLUSTER SLOTS` reply; every slot must be served.
    pub fn parse(reply: &Value) -> Result<Self> {
        let Value::Array(ranges) = reply else { bail!("CLUSTER SLOTS: not an array") };
        let mut primaries: Vec<String> = Vec::new();
        let mut owner = vec![u16::MAX; SLOTS as usize];
        for range in ranges {
            let Value::Array(parts) = range else { bail!("CLUSTER SLOTS: a range is not an array") };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                bail!("CLUSTER SLOTS: a range has no start, end and primary");
            };
            let host = match primary.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => bail!("CLUSTER SLOTS: a primary has no host"),
            };
            let Some(Value::Int(port)) = primary.get(1) else { bail!("CLUSTER SLOTS: a primary has no port") };
            let addr = format!("{host}:{port}");
            let index = match primaries.iter().position(|p| *p == addr) {
                Some(i) => i,
                None => {
                    primaries.push(addr);
                    primaries.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start)?, usize::try_from(*end)?);
            if start > end || end >= SLOTS as usize {
                bail!("CLUSTER SLOTS: bad range {start}-{end}");
            }
            owner[start..=end].fill(u16::try_from(index)?);
        }
        if let Some(unserved) = owner.iter().position(|&o| o == u16::MAX) {
            bail!("slot {unserved} has no primary: is the cluster ok?");
        }
        Ok(Self { primaries, owner })
    }

    /// Index in `primaries` of the primary that owns `key`'s slot.
    pub fn owner_of(&self, key: &[u8]) -> usize {
        usize::from(self.owner[usize::from(slot(key))])
    }
}

/// Connects to the first seed that answers and reads the cluster's slot map.
pub async fn slot_map(seeds: &[String]) -> Result<SlotMap> {
    let mut last_error = None;
    for seed in seeds {
        let attempt = async {
            let client = redis::Client::open(seed.as_str()).context("bad seed URL")?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?;
            SlotMap::parse(&reply)
        };
        match attempt.await {
            Ok(map) => return Ok(map),
            Err(e) => last_error = Some(e.context(format!("seed {seed}"))),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no seed nodes in the cluster URL")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_what_redis_says() {
        // `CLUSTER KEYSLOT` on redis 7.0.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{sse:user:u7}"), slot(b"{sse:user:u7}:epoch"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"), "an empty tag hashes the whole key");
    }

    #[test]
    fn seeds_are_read_from_the_url() {
        assert_eq!(
            seeds("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            Some(vec!["redis://127.0.0.1:7000".to_string(), "redis://127.0.0.1:7001".to_string()])
        );
        assert_eq!(seeds("redis://127.0.0.1:6379"), None);
        assert_eq!(cluster_name("sse:broadcast"), "{sse:broadcast}");
    }

    fn range(start: i64, end: i64, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), Value::Int(port)]),
        ])
    }

    #[test]
    fn the_slot_map_finds_each_keys_primary() {
        let reply = Value::Array(vec![range(0, 5460, 7000), range(5461, 10922, 7001), range(10923, 16383, 7002)]);
        let map = SlotMap::parse(&reply).unwrap();
        assert_eq!(map.primaries, ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(map.owner_of(b"foo"), 2, "slot 12182");
        assert_eq!(map.owner_of(b"somekey"), 2, "slot 11058");
        assert_eq!(map.owner_of(b"{user1000}.following"), map.owner_of(b"user1000"));
        // Two ranges of one primary are one primary.
        let split = Value::Array(vec![range(0, 100, 7000), range(101, 16383, 7001), range(50, 60, 7000)]);
        assert_eq!(SlotMap::parse(&split).unwrap().primaries.len(), 2);
        let gap = Value::Array(vec![range(0, 100, 7000)]);
        assert!(SlotMap::parse(&gap).is_err(), "an unserved slot is an error");
    }
}
