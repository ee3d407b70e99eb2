//! Redis Sentinel: which Redis is the primary now, and noticing when that changes.
//!
//! `SSE_REDIS_URL=redis+sentinel://[user:password@]host1:port1,host2:port2/<master-name>[/<db>]`
//! names the sentinels, not a Redis; the credentials and the database apply to the data nodes
//! (sentinels are asked without authentication). [`parse`] reads that URL.
//!
//! [`Watcher`] is the one task per node that talks to the sentinels. It asks them for the
//! current primary (redis-rs's `sentinel::Sentinel`: every sentinel is asked, and the first
//! primary that answers `ROLE` as a primary wins, so a sentinel that is down or behind is
//! skipped), then waits for a reason to ask again: a `+switch-master` message on any one
//! sentinel it stays subscribed to (the immediate signal), a [`Primary::recheck`] from a
//! connection that broke or was answered `READONLY`, or [`RECHECK_INTERVAL`] passing (for the
//! case where both of those were missed). A new answer is published as a [`Located`] with a new
//! generation; everything that connects to Redis follows it (see [`super::primary`]).
//!
//! It does not connect to the primary for anything but that `ROLE` check, and it does not
//! decide what a failover means for history: the bus resubscribes and backfills as after any
//! reconnect, and the history functions tell lost positions apart (`history.lua`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, IntoConnectionInfo, RedisConnectionInfo};
use futures_util::{Stream, StreamExt};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::BusError;

pub const SCHEME: &str = "redis+sentinel://";
/// Where a sentinel listens when its address names no port.
const DEFAULT_PORT: u16 = 26379;
/// How often the sentinels are asked even without a reason: the bound on how long a node can
/// stay on a demoted primary when it missed `+switch-master` and its connection never broke.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(5);
/// One round of asking the sentinels (they answer in microseconds; a candidate primary that
/// black-holes its `ROLE` check must not hold the watcher).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting to one sentinel for `+switch-master`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A parsed `redis+sentinel://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `host:port` of each sentinel, in the order given (asked in that order).
    pub sentinels: Vec<String>,
    pub master: String,
    /// The userinfo as written (still percent-encoded), for the data nodes.
    userinfo: Option<String>,
    db: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a redis+sentinel://host:port,host:port/<master-name> URL: {0}")]
pub struct UrlError(&'static str);

/// Reads `redis+sentinel://[userinfo@]host[:port],.../<master-name>[/<db>]`.
pub fn parse(url: &str) -> Result<SentinelUrl, UrlError> {
    let rest = url.strip_prefix(SCHEME).ok_or(UrlError("the scheme must be redis+sentinel://"))?;
    if rest.contains(['?', '#']) {
        return Err(UrlError("no query or fragment is understood"));
    }
    let (authority, path) = rest.split_once('/').ok_or(UrlError("the master name is missing"))?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        sentinels.push(sentinel_address(host)?);
    }
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => (master, db.parse::<u32>().map_err(|_| UrlError("the database must be a number"))?),
        None => (path, 0),
    };
    if master.is_empty() || !master.chars().all(|c| c.is_ascii_graphic()) {
        return Err(UrlError("the master name is missing"));
    }
    Ok(SentinelUrl { sentinels, master: master.to_owned(), userinfo, db })
}

fn sentinel_address(host: &str) -> Result<String, UrlError> {
    if host.is_empty() {
        return Err(UrlError("a sentinel address is empty"));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => {
            (name, port.parse::<u16>().map_err(|_| UrlError("a sentinel port is not a number"))?)
        }
        _ => (host, DEFAULT_PORT),
    };
    if name.is_empty() || name.contains(['/', '@', ' ']) {
        return Err(UrlError("a sentinel address is malformed"));
    }
    Ok(format!("{name}:{port}"))
}

impl SentinelUrl {
    /// The URL of the data node at `host:port` with this URL's credentials and database.
    pub fn data_node(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        let userinfo = self.userinfo.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("redis://{userinfo}{host}:{port}/{}", self.db)
    }

    /// The credentials and database the `ROLE` check on a candidate primary uses, decoded the
    /// way redis-rs decodes any URL.
    fn data_settings(&self) -> Result<RedisConnectionInfo, BusError> {
        let info =
            self.data_node("localhost", 1).into_connection_info().map_err(|e| BusError::Config(e.to_string()))?;
        Ok(info.redis_settings().clone())
    }
}

/// Where the primary is, as the sentinels last named it. A new `generation` means it moved
/// (or was found for the first time): connections of an older one go to a Redis that may no
/// longer take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub generation: u64,
    pub url: Arc<str>,
}

struct Shared {
    located: watch::Sender<Option<Located>>,
    recheck: Notify,
}

/// The primary as the watcher last found it; cheap to clone, one per user of Redis.
#[derive(Clone)]
pub struct Primary {
    shared: Arc<Shared>,
    located: watch::Receiver<Option<Located>>,
}

impl Primary {
    /// The primary now, `None` until the sentinels first named one.
    pub fn current(&self) -> Option<Located> {
        self.located.borrow().clone()
    }

    /// Resolves when the primary moved since this handle last looked.
    pub async fn changed(&mut self) {
        if self.located.changed().await.is_err() {
            // The watcher is gone (shutdown): nothing will change any more.
            std::future::pending::<()>().await;
        }
    }

    /// Asks the watcher to ask the sentinels now (a connection to the primary broke, or it
    /// answered `READONLY`: it may have been demoted).
    pub fn recheck(&self) {
        self.shared.recheck.notify_one();
    }
}

/// The task that asks the sentinels; the bus runs it beside its subscription owner.
pub struct Watcher {
    url: SentinelUrl,
    sentinel: Sentinel,
    node: SentinelNodeConnectionInfo,
    shared: Arc<Shared>,
}

/// Parses `url` and sets up the watcher (no connection yet) and the handle that follows it.
pub fn follow(url: &str) -> Result<(Primary, Watcher), BusError> {
    let url = parse(url).map_err(|e| BusError::Config(e.to_string()))?;
    let addresses: Vec<String> = url.sentinels.iter().map(|a| format!("redis://{a}")).collect();
    let sentinel = Sentinel::build(addresses).map_err(|e| BusError::Config(e.to_string()))?;
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(url.data_settings()?);
    let (located, receiver) = watch::channel(None);
    let shared = Arc::new(Shared { located, recheck: Notify::new() });
    Ok((Primary { shared: shared.clone(), located: receiver }, Watcher { url, sentinel, node, shared }))
}

type Switches = Pin<Box<dyn Stream<Item = redis::Msg> + Send>>;

impl Watcher {
    /// Asks, then asks again whenever there is a reason, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut switches: Option<Switches> = None;
        // Which sentinel to listen on next: the one after the last that failed.
        let mut next_listen = 0;
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.ask().await;
            if switches.is_none() {
                switches = self.listen(&mut next_listen).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = recheck.tick() => {}
                _ = self.shared.recheck.notified() => {
                    // Many connections notice one failover together: one round answers them all.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                switch = next_switch(&mut switches) => match switch {
                    Some(message) => {
                        let text = message.get_payload::<String>().unwrap_or_default();
                        if text.split(' ').next() != Some(self.url.master.as_str()) {
                            continue; // Another master the same sentinels watch.
                        }
                        tracing::info!(switch = %text, "sentinel announced a new primary");
                    }
                    None => {
                        tracing::warn!("lost the sentinel connection that announces failovers; listening on another");
                        switches = None;
                    }
                },
            }
        }
    }

    /// One round of asking the sentinels; publishes the answer when it names another primary.
    async fn ask(&mut self) {
        let asked =
            tokio::time::timeout(ASK_TIMEOUT, self.sentinel.async_master_for(&self.url.master, Some(&self.node)));
        let client = match asked.await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                tracing::warn!(master = %self.url.master, error = %e, "the sentinels name no reachable primary");
                return;
            }
            Err(_) => {
                tracing::warn!(master = %self.url.master, "the sentinels did not name a primary in time");
                return;
            }
        };
        let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() else { return };
        let url: Arc<str> = self.url.data_node(host, *port).into();
        self.shared.located.send_if_modified(|located| {
            if located.as_ref().is_some_and(|l| l.url == url) {
                return false;
            }
            let generation = located.as_ref().map_or(1, |l| l.generation + 1);
            tracing::info!(master = %self.url.master, primary = %format!("{host}:{port}"), generation, "following the primary the sentinels name");
            *located = Some(Located { generation, url: url.clone() });
            true
        });
    }

    /// Subscribes to `+switch-master` on the first sentinel from `next` on that accepts.
    async fn listen(&self, next: &mut usize) -> Option<Switches> {
        let count = self.url.sentinels.len();
        for _ in 0..count {
            let address = &self.url.sentinels[*next % count];
            *next = (*next + 1) % count;
            let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let client = redis::Client::open(format!("redis://{address}"))?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            if let Ok(Ok(pubsub)) = subscribed {
                return Some(Box::pin(pubsub.into_on_message()));
            }
        }
        None
    }
}

/// The next `+switch-master` message; `None` when the connection ended. Never resolves without
/// a connection (the periodic recheck then also retries listening).
async fn next_switch(switches: &mut Option<Switches>) -> Option<redis::Msg> {
    match switches {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_sentinels_a_master_and_the_data_nodes_credentials() {
        let url = parse("redis+sentinel://a:26380,b,[::1]:7/mymaster").expect("valid");
        assert_eq!(url.sentinels, ["a:26380", "b:26379", "[::1]:7"]);
        assert_eq!(url.master, "mymaster");
        assert_eq!(url.data_node("10.0.0.5", 6379), "redis://10.0.0.5:6379/0");
        assert_eq!(url.data_node("::1", 6379), "redis://[::1]:6379/0");

        let url = parse("redis+sentinel://user:p%40ss@a:1,b:2/m/3").expect("valid");
        assert_eq!(url.data_node("h", 9), "redis://user:p%40ss@h:9/3");
        let settings = url.data_settings().expect("settings");
        assert_eq!((settings.username(), settings.password(), settings.db()), (Some("user"), Some("p@ss"), 3));

        for bad in [
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel://a:x/m",
            "redis+sentinel://a:1,,b:2/m",
            "redis+sentinel:///m",
            "redis+sentinel://a:1/m/x",
            "redis+sentinel://a:1/m?db=1",
            "redis://a:1/m",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
