//! The per-user stream limit across the cluster (`SSE_MAX_CONNECTIONS_PER_USER` with
//! `SSE_PER_USER_POLICY`), with Redis.
//!
//! A user's streams hold seats in `<prefix>:seats:<user>`, a sorted set of connection ids
//! (`<node>:<n>`, as presence names them) scored with the time they opened. A stream takes its
//! seat with one atomic script before it joins the hub: under the limit it is seated; at the
//! limit it is refused (`reject`) or the oldest seats anywhere in the cluster are taken from
//! their streams (`evict-oldest`), which their nodes close with `disconnected: replaced` (this
//! node at once, another through its node channel, [`crate::control`]).
//!
//! Seats are given back without a call of their own: the presence flush that writes a closed
//! stream out of presence removes its seat (within 200 ms of the close), and the cleanup of a
//! dead node removes all of its. The script also drops, before counting, every seat whose node's
//! presence lease is gone and every seat older than [`SEAT_GRACE`] that presence does not know,
//! so a seat lost on the way (a failed write, a node cut off) never keeps a user out for long.
//!
//! While Redis does not answer within [`TAKE_TIMEOUT`], the limit falls back to each node's own
//! streams (the hub's check), counted, and logged at most once a second. A node saturated by a
//! reconnect storm can time out too (measured: docs/benchmarks.md, "Presence cost").

use std::sync::Arc;
use std::time::Duration;

use crate::bus::primary::Follow;
use bytes::Bytes;
use metrics::Counter;
use serde::Deserialize;

use crate::auth::{UserId, unix_millis, unix_now};
use crate::channel::ChannelNames;
use crate::config::PerUserPolicy;
use crate::connection::{CloseReason, ConnectionId};
use crate::hub::Hub;
use crate::log_limit::LogLimiter;
use crate::presence;
use crate::renewal::parse_connection_id;

/// Redis answers within this or the node decides alone.
const TAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// A seat presence has not seen yet is trusted this long (presence writes every 200 ms).
pub const SEAT_GRACE: Duration = Duration::from_secs(5);

/// KEYS: the user's seats, the user's presence hash. ARGV: lease key prefix, limit, policy
/// (`evict` or `reject`), the new seat, now (ms), grace (ms), this node's id. Returns `{'full'}`
/// or `{'seated', evicted...}`.
const TAKE_SCRIPT: &str = r"
local now, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
local seats = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #seats, 2 do
  local seat, since = seats[i], tonumber(seats[i + 1])
  local node = string.match(seat, '^(.+):%d+$')
  local alive = node == ARGV[7] or (node ~= nil and redis.call('EXISTS', ARGV[1] .. node) == 1)
  if not alive or (since < now - grace and redis.call('HEXISTS', KEYS[2], seat) == 0) then
    redis.call('ZREM', KEYS[1], seat)
  end
end
local count, limit = redis.call('ZCARD', KEYS[1]), tonumber(ARGV[2])
local answer = {'seated'}
if count >= limit then
  if ARGV[3] ~= 'evict' then return {'full'} end
  local evicted = redis.call('ZRANGE', KEYS[1], 0, count - limit)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, count - limit)
  for _, seat in ipairs(evicted) do table.insert(answer, seat) end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
return answer
";

/// `<prefix>:seats:`, followed by a user id: that user's seats.
pub fn seats_key_prefix(names: &ChannelNames) -> String {
    format!("{}:seats:", names.prefix())
}

/// What taking a seat decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Seat {
    /// Seated; these streams (connection ids, `<node>:<n>`) lost their seats to it.
    Taken { evicted: Vec<String> },
    /// The user holds the limit's number of streams in the cluster (`reject`).
    Full,
    /// Redis did not answer: the node applies the limit to its own streams.
    Unknown,
}

pub struct Seats {
    redis: Arc<Follow>,
    names: ChannelNames,
    node_id: String,
    limit: usize,
    policy: PerUserPolicy,
    script: redis::Script,
    /// At most a line a second: in a storm on a saturated node, thousands of seats can fail.
    fallback_log: LogLimiter,
    seated: Counter,
    full: Counter,
    evicted: Counter,
    fallback: Counter,
}

impl Seats {
    /// Seats for a node with Redis and a per-user limit; `None` when either is missing.
    pub fn new(
        redis: Option<Arc<Follow>>,
        names: ChannelNames,
        node_id: &str,
        limit: usize,
        policy: PerUserPolicy,
    ) -> Option<Arc<Self>> {
        let redis = redis.filter(|_| limit > 0)?;
        let outcome = |o: &'static str| metrics::counter!(crate::metrics::USER_LIMIT_CHECKS, "outcome" => o);
        Some(Arc::new(Self {
            redis,
            names,
            node_id: node_id.to_owned(),
            limit,
            policy,
            script: redis::Script::new(TAKE_SCRIPT),
            fallback_log: LogLimiter::default(),
            seated: outcome("seated"),
            full: outcome("full"),
            evicted: outcome("evicted"),
            fallback: outcome("fallback"),
        }))
    }

    /// Takes a seat for `user`'s stream `id`.
    pub async fn take(&self, user: &UserId, id: ConnectionId) -> Seat {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{}{}", seats_key_prefix(&self.names), user.as_str()))
            .key(presence::user_key(&self.names, user))
            .arg(presence::lease_key_prefix(&self.names))
            .arg(self.limit)
            .arg(if self.policy == PerUserPolicy::EvictOldest { "evict" } else { "reject" })
            .arg(id.shown(&self.node_id))
            .arg(unix_millis())
            .arg(SEAT_GRACE.as_millis() as u64)
            .arg(&self.node_id);
        let Some(mut redis) = self.redis.manager() else { return self.fall_back("no primary known yet") };
        let answer = tokio::time::timeout(TAKE_TIMEOUT, invocation.invoke_async::<Vec<String>>(&mut redis)).await;
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return self.fall_back(&e.to_string()),
            Err(_) => return self.fall_back("timed out"),
        };
        let mut answer = answer.into_iter();
        match answer.next().as_deref() {
            Some("seated") => {
                let evicted: Vec<String> = answer.collect();
                self.seated.increment(1);
                self.evicted.increment(evicted.len() as u64);
                Seat::Taken { evicted }
            }
            Some("full") => {
                self.full.increment(1);
                Seat::Full
            }
            other => self.fall_back(&format!("unexpected answer {other:?}")),
        }
    }

    /// Ends the streams that lost their seats (`<node>:<n>`): this node's at once, another's
    /// through its node channel.
    pub async fn evict(&self, hub: &Hub, seats: &[String]) {
        for seat in seats {
            let Some((node, id)) = parse_connection_id(seat) else { continue };
            if node == self.node_id {
                hub.close_id(id, CloseReason::Replaced);
                continue;
            }
            let message = serde_json::json!({"type": "evict", "connection": id.0}).to_string();
            if let Err(e) = hub.bus().publish(&[self.names.node(node)], Bytes::from(message), false).await {
                tracing::warn!(node, error = %e, "could not ask a node to close a stream that lost its seat");
            }
        }
    }

    fn fall_back(&self, why: &str) -> Seat {
        self.fallback.increment(1);
        if let Some(held_back) = self.fallback_log.allow(unix_now() as u32) {
            tracing::warn!(
                error = why,
                held_back,
                "redis did not seat a stream: the per-user limit counts this node's streams only"
            );
        }
        Seat::Unknown
    }
}

/// Carries out another node's `evict` on this node's channel; false when `payload` is something
/// else (a renewal).
pub fn obey(hub: &Hub, payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Command {
        Evict { connection: u64 },
    }
    match serde_json::from_slice::<Command>(payload) {
        Ok(Command::Evict { connection }) => {
            hub.close_id(ConnectionId(connection), CloseReason::Replaced);
            true
        }
        Err(_) => false,
    }
}
