//! Cluster-wide presence: which streams are open on which node, for the admin API, and the
//! operator's command to disconnect a user everywhere.
//!
//! With Redis, every node writes its own streams into Redis from the hub's journal of opens and
//! closes (one pipeline per flush, at most every [`FLUSH_INTERVAL`], never per message) and
//! holds a lease key it renews every third of `SSE_PRESENCE_LEASE`. Readers trust an entry only
//! while its node's lease exists, so a node that dies drops out of every answer the moment its
//! lease lapses; the surviving nodes then delete its entries (one script per dead node, run by
//! whichever node sees it first, checking the lease inside the script so a node that came back
//! meanwhile keeps its entries). A node that finds its own lease had lapsed, or that lost
//! journal entries to a Redis outage, rewrites its entries whole. With the embedded bus the node
//! is the whole cluster and presence is read from its hub.
//!
//! Keys (`p` is `SSE_CHANNEL_PREFIX`):
//! - `p:presence:nodes`: set of the node ids that wrote presence;
//! - `p:presence:lease:<node>`: `{"version","started"}`, expiring after the lease;
//! - `p:presence:streams:<node>`: hash connection id → user id, the node's streams;
//! - `p:presence:user:<user>`: hash connection id → `{"node","connection_id","since","topics"}`;
//! - `p:presence:leaving`, `p:presence:events`: see above.
//!
//! With `SSE_PRESENCE_EVENTS`, the same scripts that write the entries append a user's
//! transitions to a bounded Redis stream, `p:presence:events` (fields `event` = `online` or
//! `offline`, `user`, `at` in Unix milliseconds). A transition is the user's, not a stream's:
//! `online` when the first entry of the user appears anywhere in the cluster, `offline` when the
//! last one has been gone for `SSE_PRESENCE_EVENTS_DELAY`. Until then the user waits in the
//! sorted set `p:presence:leaving` (scored with the time it left), and an entry that appears
//! meanwhile takes it out without an event: a reconnect, a reload, a drained node's streams
//! moving to the others, or a dead node's clients back elsewhere before its lease lapsed, write
//! nothing. Every node sweeps the due ones each second; the scripts are atomic, so each
//! transition is written once whichever node sees it.
//!
//! A revoke travels over the bus's control channel ([`Presence::revoke`], obeyed by every node
//! in [`obey`]), so it works the same with either bus.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::{UserId, unix_millis, unix_now};
use crate::bus::BusError;
use crate::bus::primary::{Follow, Target};
use crate::channel::{ChannelKind, ChannelNames};
use crate::connection::{CloseReason, Connection};
use crate::hub::{Change, Hub};

/// How often the journal of opens and closes is written: a stream shows up cluster-wide within
/// this, and a storm of opens costs one pipeline per interval.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Redis answers presence calls within this or the call fails (the admin gets a 503).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Users one batch query may ask about.
pub const MAX_BATCH_USERS: usize = 1000;

/// Changes one write script carries at most.
const WRITE_CHUNK: usize = 1000;

/// How often due `offline` transitions are looked for (with presence events on).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Deletes a node's entries. Keys of user hashes are built inside (fine on a single Redis, not
/// on Redis Cluster, which this node does not support). Without `force` it does nothing while
/// the node's lease exists: the node came back after another node decided it was dead. With
/// events on (ARGV[4]), a user left without entries starts leaving at ARGV[5]. The streams'
/// seats (ARGV[6] is the seats key prefix, [`crate::user_limit`]) go with them.
const CLEAN_SCRIPT: &str = r"
if ARGV[3] ~= 'force' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local streams = redis.call('HGETALL', KEYS[2])
for i = 1, #streams, 2 do
  local user = ARGV[1] .. streams[i + 1]
  redis.call('ZREM', ARGV[6] .. streams[i + 1], streams[i])
  if redis.call('HDEL', user, streams[i]) == 1 and ARGV[4] == '1' and redis.call('HLEN', user) == 0 then
    redis.call('ZADD', KEYS[4], 'NX', ARGV[5], streams[i + 1])
  end
end
redis.call('DEL', KEYS[2])
if ARGV[3] ~= 'force' then redis.call('SREM', KEYS[3], ARGV[2]) end
return 1
";

/// Writes a node's opens and closes in order (KEYS[1]: the node's streams hash) and, with events
/// on (ARGV[2] = '1'), the users' transitions (KEYS[2]: the events stream, KEYS[3]: the leaving
/// set), then sweeps the users away longer than the delay. A closed stream's seat goes too
/// ([`crate::user_limit`]). ARGV: user key prefix, events, now (ms), delay (ms), maxlen, seats
/// key prefix, then per change `+`/`-`, user, connection id, entry (`+` only).
const WRITE_SCRIPT: &str = r"
local events = ARGV[2] == '1'
local now = tonumber(ARGV[3])
for i = 7, #ARGV, 4 do
  local user, id = ARGV[i + 1], ARGV[i + 2]
  local key = ARGV[1] .. user
  if ARGV[i] == '+' then
    redis.call('HSET', KEYS[1], id, user)
    if redis.call('HSET', key, id, ARGV[i + 3]) == 1 and events and redis.call('HLEN', key) == 1
      and redis.call('ZREM', KEYS[3], user) == 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], '*', 'event', 'online', 'user', user, 'at', ARGV[3])
    end
  else
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', ARGV[6] .. user, id)
    if redis.call('HDEL', key, id) == 1 and events and redis.call('HLEN', key) == 0 then
      redis.call('ZADD', KEYS[3], 'NX', now, user)
    end
  end
end
if not events then return 0 end
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]), 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  redis.call('ZREM', KEYS[3], due[i])
  if redis.call('EXISTS', ARGV[1] .. due[i]) == 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], '*', 'event', 'offline', 'user', due[i], 'at', due[i + 1])
  end
end
return #due / 2
";

/// `SSE_PRESENCE_EVENTS` on: how transitions are written.
#[derive(Debug, Clone, Copy)]
pub struct EventSettings {
    /// `SSE_PRESENCE_EVENTS_DELAY`.
    pub delay: Duration,
    /// `SSE_PRESENCE_EVENTS_MAXLEN`.
    pub maxlen: u64,
}

/// `p:presence:user:<user>`, the user's streams in the cluster.
pub fn user_key(names: &ChannelNames, user: &UserId) -> String {
    format!("{}:presence:user:{}", names.prefix(), user.as_str())
}

/// `p:presence:lease:`, followed by a node id: that node's lease.
pub fn lease_key_prefix(names: &ChannelNames) -> String {
    format!("{}:presence:lease:", names.prefix())
}

/// One open stream as presence shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEntry {
    pub node: String,
    pub connection_id: String,
    /// Unix seconds.
    pub since: u64,
    pub topics: Vec<String>,
}

/// One live node as `/api/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeEntry {
    pub node: String,
    pub streams: u64,
    pub version: Option<String>,
    pub started: Option<u64>,
}

/// What a node writes in its lease key.
#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    version: Option<String>,
    started: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis is unavailable for presence: {0}")]
    Unavailable(String),
    #[error("redis did not answer a presence call in time")]
    Timeout,
    #[error("cannot use the redis settings: {0}")]
    Config(String),
}

pub struct Presence {
    node_id: String,
    hub: Arc<Hub>,
    names: ChannelNames,
    started: u64,
    lease: Duration,
    /// `None` with the embedded bus. Follows the primary with Redis Sentinel.
    redis: Option<Arc<Follow>>,
    events: Option<EventSettings>,
    clean_script: redis::Script,
    write_script: redis::Script,
}

impl Presence {
    /// Presence for a node. Needs a tokio runtime
    /// (the Redis connection is made lazily).
    pub fn new(
        node_id: String,
        hub: Arc<Hub>,
        names: ChannelNames,
        redis_url: Option<&str>,
        target: Option<&Target>,
        lease: Duration,
        events: Option<EventSettings>,
    ) -> Result<Arc<Self>, PresenceError> {
        let redis = match redis_url {
            None => None,
            // The presence keys and the cleaning script span slots: not ported to a Redis Cluster
            // yet. The node answers for its own streams, as with the embedded bus; a revoke still
            // reaches every node (it travels over the bus).
            Some(url) if crate::bus::cluster::is_cluster_url(url) => {
                tracing::warn!(
                    "presence on a Redis Cluster is not implemented yet: the admin API lists this node's streams only"
                );
                None
            }
            Some(url) => {
                // The bus's target (with sentinels there must be one watcher per node; it also
                // carries the TLS settings of a `rediss://` URL).
                let Some(target) = target.cloned() else {
                    return Err(PresenceError::Config(format!("no redis target for {url}")));
                };
                let config = || {
                    ConnectionManagerConfig::new()
                        .set_number_of_retries(usize::MAX)
                        .set_max_delay(Duration::from_secs(2))
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(COMMAND_TIMEOUT))
                };
                Some(Arc::new(Follow::new(target, config).map_err(|e| PresenceError::Config(e.to_string()))?))
            }
        };
        Ok(Arc::new(Self {
            node_id,
            hub,
            names,
            started: unix_now(),
            lease,
            redis,
            events,
            clean_script: redis::Script::new(CLEAN_SCRIPT),
            write_script: redis::Script::new(WRITE_SCRIPT),
        }))
    }

    /// The connection to Redis presence uses (shared by the per-user limit's seats).
    pub fn redis(&self) -> Option<Arc<Follow>> {
        self.redis.clone()
    }

    fn key(&self, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}:presence:{rest}", self.names.prefix())
    }

    /// How `connection` shows up in presence.
    fn entry(&self, connection: &Connection, unix: u64) -> StreamEntry {
        StreamEntry {
            node: self.node_id.clone(),
            connection_id: connection.id.shown(&self.node_id),
            since: unix.saturating_sub(connection.opened_at.elapsed().as_secs()),
            topics: connection
                .channels
                .iter()
                .enumerate()
                // A renewal may have taken the stream off some (it still names them).
                .filter(|&(slot, _)| connection.listens_at(slot))
                .map(|(_, c)| c)
                .filter(|c| self.names.kind_of(c) == Some(ChannelKind::Topic))
                .filter_map(|c| self.names.logical(c).strip_prefix("topic:"))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// This node's streams, ordered by connection number, after `after` (a number), at most
    /// `limit`; and the number to ask after next when there may be more.
    pub fn local(&self, after: u64, limit: usize) -> (Vec<(UserId, StreamEntry)>, Option<u64>) {
        let mut streams: Vec<Arc<Connection>> = self.hub.streams().into_iter().filter(|c| c.id.0 > after).collect();
        streams.sort_unstable_by_key(|c| c.id.0);
        let more = streams.len() > limit;
        streams.truncate(limit);
        let unix = unix_now();
        let next = streams.last().filter(|_| more).map(|c| c.id.0);
        (streams.iter().map(|c| (c.user.clone(), self.entry(c, unix))).collect(), next)
    }

    /// `user`'s open streams in the whole cluster, oldest first.
    pub async fn streams_of(&self, user: &UserId) -> Result<Vec<StreamEntry>, PresenceError> {
        let Some(redis) = &self.redis else {
            let unix = unix_now();
            return Ok(self.hub.streams_of(user).iter().map(|c| self.entry(c, unix)).collect());
        };
        let mut redis = connected(redis)?;
        let mut call = redis::cmd("HVALS");
        call.arg(self.key(format_args!("user:{}", user.as_str())));
        let values: Vec<String> = timed(call.query_async(&mut redis)).await?;
        let entries: Vec<StreamEntry> = values.iter().filter_map(|v| serde_json::from_str(v).ok()).collect();
        let alive = self.alive(&mut redis, entries.iter().map(|e| e.node.as_str())).await?;
        let mut streams: Vec<StreamEntry> = entries.into_iter().filter(|e| alive.contains(&e.node)).collect();
        streams.sort_by(|a, b| (a.since, &a.connection_id).cmp(&(b.since, &b.connection_id)));
        Ok(streams)
    }

    /// Whether each user holds a stream anywhere in the cluster (same order as `users`).
    pub async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, PresenceError> {
        let Some(redis) = &self.redis else {
            return Ok(users.iter().map(|u| self.hub.connections_of(u) > 0).collect());
        };
        let mut redis = connected(redis)?;
        let mut calls = redis::pipe();
        for user in users {
            calls.cmd("HVALS").arg(self.key(format_args!("user:{}", user.as_str())));
        }
        let values: Vec<Vec<String>> = timed(calls.query_async(&mut redis)).await?;
        let nodes: Vec<Vec<String>> = values
            .iter()
            .map(|v| v.iter().filter_map(|e| serde_json::from_str::<StreamEntry>(e).ok()).map(|e| e.node).collect())
            .collect();
        let alive = self.alive(&mut redis, nodes.iter().flatten().map(String::as_str)).await?;
        Ok(nodes.iter().map(|n| n.iter().any(|node| alive.contains(node))).collect())
    }

    /// The nodes alive in the cluster, with their stream counts and versions.
    pub async fn cluster(&self) -> Result<Vec<NodeEntry>, PresenceError> {
        let Some(redis) = &self.redis else {
            return Ok(vec![NodeEntry {
                node: self.node_id.clone(),
                streams: self.hub.stats().connections as u64,
                version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                started: Some(self.started),
            }]);
        };
        let mut redis = connected(redis)?;
        let mut call = redis::cmd("SMEMBERS");
        call.arg(self.key(format_args!("nodes")));
        let mut nodes: Vec<String> = timed(call.query_async(&mut redis)).await?;
        nodes.sort();
        let mut calls = redis::pipe();
        for node in &nodes {
            calls.cmd("GET").arg(self.key(format_args!("lease:{node}")));
            calls.cmd("HLEN").arg(self.key(format_args!("streams:{node}")));
        }
        let replies: Vec<(Option<String>, u64)> = timed(calls.query_async(&mut redis)).await?;
        Ok(nodes
            .into_iter()
            .zip(replies)
            .filter_map(|(node, (lease, streams))| {
                let lease: Lease =
                    lease.map(|l| serde_json::from_str(&l).unwrap_or(Lease { version: None, started: None }))?;
                Some(NodeEntry { node, streams, version: lease.version, started: lease.started })
            })
            .collect())
    }

    /// Which of `nodes` hold their lease now (one round trip).
    async fn alive<'a>(
        &self,
        redis: &mut ConnectionManager,
        nodes: impl Iterator<Item = &'a str>,
    ) -> Result<HashSet<String>, PresenceError> {
        let nodes: Vec<&str> = nodes.collect::<BTreeSet<_>>().into_iter().collect();
        if nodes.is_empty() {
            return Ok(HashSet::new());
        }
        let mut calls = redis::pipe();
        for node in &nodes {
            calls.cmd("EXISTS").arg(self.key(format_args!("lease:{node}")));
        }
        let exists: Vec<bool> = timed(calls.query_async(redis)).await?;
        Ok(nodes.into_iter().zip(exists).filter(|(_, e)| *e).map(|(n, _)| n.to_owned()).collect())
    }

    /// Asks every node, this one included, to disconnect `user` with `disconnected: revoked`.
    pub async fn revoke(&self, user: &UserId) -> Result<(), BusError> {
        let command = serde_json::json!({ "revoke": user.as_str() }).to_string();
        self.hub.bus().publish(&[self.names.control()], Bytes::from(command), false).await.map(|_| ())
    }

    /// Keeps this node's presence in Redis until `stop`, then removes it. Returns at once with
    /// the embedded bus.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(follow) = self.redis.clone() else { return };
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // False until this node's entries are known to be whole in Redis.
        let mut synced = false;
        let mut failing = false;
        // The primary written to (it moves with Redis Sentinel).
        let mut written_to = None;
        loop {
            let (renewal, sweeping) = tokio::select! {
                _ = stop.cancelled() => break,
                _ = renew.tick() => (true, false),
                _ = flush.tick() => (false, false),
                _ = sweep.tick(), if self.events.is_some() => (false, true),
            };
            let Some((generation, mut redis)) = follow.current() else { continue };
            if written_to.replace(generation).is_some_and(|before| before != generation) {
                // A promoted replica may lack the last writes: write everything again.
                synced = false;
            }
            let result = async {
                if renewal {
                    if self.renew(&mut redis).await? {
                        synced = false;
                    }
                    self.clean_dead(&mut redis).await?;
                }
                if synced {
                    let journal = self.hub.take_journal();
                    if journal.lost {
                        synced = false;
                    } else if !journal.changes.is_empty() {
                        // A failed write loses these: rewrite everything next time.
                        synced = false;
                        self.write(&mut redis, &journal.changes).await?;
                        synced = true;
                    }
                }
                if !synced {
                    self.resync(&mut redis).await?;
                    synced = true;
                }
                if sweeping {
                    self.write(&mut redis, &[]).await?;
                }
                Ok::<(), PresenceError>(())
            }
            .await;
            match result {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("presence is written to redis again");
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot write presence to redis; will retry");
                }
                _ => {}
            }
        }
        let Some(mut redis) = follow.manager() else { return };
        if let Err(e) = self.leave(&mut redis).await {
            tracing::warn!(error = %e, "could not remove this node's presence; it lapses with its lease");
        }
    }

    /// Renews the lease; true when it had lapsed (the node's entries may have been cleaned).
    async fn renew(&self, redis: &mut ConnectionManager) -> Result<bool, PresenceError> {
        let mut calls = redis::pipe();
        calls
            .cmd("SET")
            .arg(self.key(format_args!("lease:{}", self.node_id)))
            .arg(self.lease_value())
            .arg("PX")
            .arg(self.lease.as_millis() as u64)
            .arg("GET");
        calls.cmd("SADD").arg(self.key(format_args!("nodes"))).arg(&self.node_id).ignore();
        let (previous,): (Option<String>,) = timed(calls.query_async(redis)).await?;
        Ok(previous.is_none())
    }

    fn lease_value(&self) -> String {
        serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "started": self.started}).to_string()
    }

    /// Deletes the entries of every node whose lease lapsed.
    async fn clean_dead(&self, redis: &mut ConnectionManager) -> Result<(), PresenceError> {
        let mut call = redis::cmd("SMEMBERS");
        call.arg(self.key(format_args!("nodes")));
        let nodes: Vec<String> = timed(call.query_async(&mut *redis)).await?;
        let others = nodes.iter().map(String::as_str).filter(|n| *n != self.node_id);
        let alive = self.alive(redis, others.clone()).await?;
        for dead in others.filter(|n| !alive.contains(*n)) {
            let cleaned: i64 = timed(self.clean(dead, false).invoke_async(&mut *redis)).await?;
            if cleaned == 1 {
                tracing::info!(node = dead, "removed the presence of a node whose lease lapsed");
            }
        }
        Ok(())
    }

    fn clean(&self, node: &str, force: bool) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.clean_script.prepare_invoke();
        invocation
            .key(self.key(format_args!("lease:{node}")))
            .key(self.key(format_args!("streams:{node}")))
            .key(self.key(format_args!("nodes")))
            .arg(self.key(format_args!("user:")))
            .arg(node)
            .arg(if force { "force" } else { "" })
            .arg(if self.events.is_some() { "1" } else { "" })
            .arg(unix_millis())
            .arg(crate::user_limit::seats_key_prefix(&self.names))
            .key(self.key(format_args!("leaving")));
        invocation
    }

    /// Rewrites this node's entries whole from the hub, which journals from the same instant.
    async fn resync(&self, redis: &mut ConnectionManager) -> Result<(), PresenceError> {
        let streams = self.hub.keep_journal();
        let _: i64 = timed(self.clean(&self.node_id, true).invoke_async(&mut *redis)).await?;
        let opened: Vec<Change> = streams.into_iter().map(Change::Opened).collect();
        self.write(redis, &opened).await?;
        tracing::debug!(streams = opened.len(), "presence rewritten");
        Ok(())
    }

    /// Writes opens and closes, in order, with the users' transitions when events are on (one
    /// script call per [`WRITE_CHUNK`] changes, so a storm's flush never holds Redis long); with
    /// no change it only sweeps the due `offline`s.
    async fn write(&self, redis: &mut ConnectionManager, changes: &[Change]) -> Result<(), PresenceError> {
        let unix = unix_now();
        let events = self.events.unwrap_or(EventSettings { delay: Duration::ZERO, maxlen: 1 });
        let mut chunks = changes.chunks(WRITE_CHUNK);
        let mut next = Some(chunks.next().unwrap_or(&[]));
        while let Some(chunk) = next.take() {
            let mut invocation = self.write_script.prepare_invoke();
            invocation
                .key(self.key(format_args!("streams:{}", self.node_id)))
                .key(self.key(format_args!("events")))
                .key(self.key(format_args!("leaving")))
                .arg(self.key(format_args!("user:")))
                .arg(if self.events.is_some() { "1" } else { "" })
                .arg(unix_millis())
                .arg(events.delay.as_millis() as u64)
                .arg(events.maxlen)
                .arg(crate::user_limit::seats_key_prefix(&self.names));
            for change in chunk {
                match change {
                    Change::Opened(connection) => {
                        let entry = self.entry(connection, unix);
                        let json = serde_json::to_string(&entry).unwrap_or_default();
                        invocation.arg("+").arg(connection.user.as_str()).arg(&entry.connection_id).arg(json);
                    }
                    Change::Closed { id, user } => {
                        invocation.arg("-").arg(user.as_str()).arg(id.shown(&self.node_id)).arg("");
                    }
                }
            }
            let swept: i64 = timed(invocation.invoke_async(&mut *redis)).await?;
            if swept > 0 {
                tracing::debug!(users = swept, "presence: offline transitions due");
            }
            next = chunks.next();
        }
        Ok(())
    }

    /// Removes this node from presence (a clean stop).
    async fn leave(&self, redis: &mut ConnectionManager) -> Result<(), PresenceError> {
        let _: i64 = timed(self.clean(&self.node_id, true).invoke_async(&mut *redis)).await?;
        let mut calls = redis::pipe();
        calls.cmd("DEL").arg(self.key(format_args!("lease:{}", self.node_id))).ignore();
        calls.cmd("SREM").arg(self.key(format_args!("nodes"))).arg(&self.node_id).ignore();
        timed(calls.query_async::<()>(redis)).await
    }
}

/// Carries out a command read from the control channel.
pub fn obey(hub: &Hub, payload: &[u8]) {
    #[derive(Deserialize)]
    struct Command {
        revoke: Option<String>,
    }
    match serde_json::from_slice::<Command>(payload).ok().and_then(|c| c.revoke).map(|u| UserId::new(&u)) {
        Some(Ok(user)) => {
            let streams = hub.close_user(&user, CloseReason::Revoked);
            tracing::info!(user = user.as_str(), streams, "revoked a user's streams");
        }
        _ => tracing::warn!("ignored a control message this node does not understand"),
    }
}

/// The connection to the primary now, or why there is none.
fn connected(follow: &Follow) -> Result<ConnectionManager, PresenceError> {
    follow.manager().ok_or_else(|| PresenceError::Unavailable("no primary known yet".into()))
}

async fn timed<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, PresenceError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
        Err(_) => Err(PresenceError::Timeout),
        Ok(result) => result.map_err(|e| PresenceError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::config::PerUserPolicy;
    use crate::hub::{Limits, TokenLife};
    use crate::metrics::HubMetrics;

    fn presence() -> Arc<Presence> {
        let names = ChannelNames::new("sse");
        let (bus, _inbound) = MemoryBus::new(names.clone(), None);
        let limits = Limits {
            per_user: 0,
            per_user_policy: PerUserPolicy::Reject,
            per_node: 0,
            queue_capacity: 8,
            queue_max_bytes: 1 << 20,
            inactivity_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            history: false,
            compress_from: 512,
            token: TokenLife::default(),
        };
        let hub = Hub::new(bus, "n1", limits, HubMetrics::new());
        Presence::new("n1".into(), hub, names, None, None, Duration::from_secs(30), None).expect("presence")
    }

    #[tokio::test]
    async fn without_redis_presence_is_the_hubs_and_pages_by_connection_number() {
        let presence = presence();
        let names = ChannelNames::new("sse");
        let user = |u: &str| UserId::new(u).expect("user");
        let mut held = Vec::new();
        for (who, topic) in [("a", "news"), ("b", "sport"), ("a", "sport")] {
            let channels = vec![names.user(who), names.topic(topic)];
            held.push(presence.hub.join(user(who), channels, u64::MAX).expect("joins"));
        }
        let a = presence.streams_of(&user("a")).await.expect("answers");
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].node.as_str(), a[0].connection_id.as_str()), ("n1", "n1:1"));
        assert_eq!(a[0].topics, ["news"]);
        assert_eq!(presence.online(&[user("a"), user("c"), user("b")]).await.expect("answers"), [true, false, true]);
        let (page, next) = presence.local(0, 2);
        assert_eq!(
            page.iter().map(|(u, e)| (u.as_str(), e.connection_id.as_str())).collect::<Vec<_>>(),
            [("a", "n1:1"), ("b", "n1:2")]
        );
        assert_eq!(next, Some(2));
        let (page, next) = presence.local(2, 2);
        assert_eq!((page.len(), next), (1, None));
        assert_eq!(presence.hub.close_user(&user("a"), CloseReason::Revoked), 2);
        assert!(presence.streams_of(&user("a")).await.expect("answers").is_empty());
        assert_eq!(presence.cluster().await.expect("answers")[0].streams, 1);
    }
}
