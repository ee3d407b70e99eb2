//! Where a node's Redis connections go: one Redis at a fixed URL (`redis://`), or the primary
//! the sentinels name (`redis+sentinel://`, see [`super::sentinel`]), which can move.
//!
//! [`Target`] is that answer for whoever connects (the bus's subscriber, its publish pool and
//! read connection, presence and the per-user limit); each compares the [`Located`] generation
//! it connected to with the current one and reconnects when it moved. [`Follow`] does that
//! for a plain `ConnectionManager`, for the parts that need nothing more (presence, seats).
//! A fixed URL never moves, so with one Redis all of this is one clone per call.

use std::sync::{Mutex, PoisonError};

use deadpool_redis::redis::{self, aio::ConnectionManager, aio::ConnectionManagerConfig};

use super::sentinel::{self, Located, Primary};
use crate::redis_tls::RedisTls;

#[derive(Clone)]
pub enum Target {
    /// One Redis (generation 0 for ever), with the TLS settings of a `rediss://` URL.
    Fixed(Located, RedisTls),
    /// The primary the sentinels name.
    Sentinel(Primary),
}

impl Target {
    pub fn fixed(url: &str, tls: RedisTls) -> Self {
        Target::Fixed(Located { generation: 0, url: url.into() }, tls)
    }

    /// A client for `url` (the located primary's), with TLS when the URL asks for it. Sentinel
    /// URLs are plain (`rediss+sentinel://` is not supported).
    pub fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self {
            Target::Fixed(_, tls) => tls.client(url),
            Target::Sentinel(_) => redis::Client::open(url),
        }
    }

    /// Where to connect now; `None` while the sentinels have named no primary yet.
    pub fn current(&self) -> Option<Located> {
        match self {
            Target::Fixed(located, _) => Some(located.clone()),
            Target::Sentinel(primary) => primary.current(),
        }
    }

    /// Resolves when the primary moved since this handle last looked (never for a fixed URL).
    pub async fn changed(&mut self) {
        match self {
            Target::Fixed(..) => std::future::pending().await,
            Target::Sentinel(primary) => primary.changed().await,
        }
    }

    /// A connection broke or was refused a write: with sentinels, ask them again now.
    pub fn recheck(&self) {
        if let Target::Sentinel(primary) = self {
            primary.recheck();
        }
    }

    /// Like [`recheck`](Self::recheck), only when `e` says the Redis is a replica now
    /// (`READONLY`) or is gone.
    pub fn recheck_after(&self, e: &redis::RedisError) {
        let readonly = e.code() == Some("READONLY")
            // A pipeline's error lists its commands' errors.
            || e.clone().into_server_errors().is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "READONLY"));
        if readonly || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.recheck();
        }
    }

    /// True with sentinels.
    pub fn follows_sentinels(&self) -> bool {
        matches!(self, Target::Sentinel(_))
    }
}

impl From<Primary> for Target {
    fn from(primary: Primary) -> Self {
        Target::Sentinel(primary)
    }
}

/// A `ConnectionManager` to the target that is made again when the primary moves.
pub struct Follow {
    target: Target,
    config: fn() -> ConnectionManagerConfig,
    current: Mutex<Option<(u64, ConnectionManager)>>,
}

impl Follow {
    /// `config` makes the manager's settings (a closure per connection: the config is not `Clone`
    /// with every setting).
    pub fn new(target: Target, config: fn() -> ConnectionManagerConfig) -> Result<Self, redis::RedisError> {
        let follow = Self { target, config, current: Mutex::new(None) };
        // A fixed URL is checked at once, as before there were sentinels.
        if let Target::Fixed(located, _) = &follow.target {
            let manager = connect(&follow.target, located, config())?;
            *follow.current.lock().unwrap_or_else(PoisonError::into_inner) = Some((0, manager));
        }
        Ok(follow)
    }

    /// The manager for the primary now; `None` while there is none (or its URL cannot be used,
    /// which a fixed URL would have failed at start).
    pub fn manager(&self) -> Option<ConnectionManager> {
        self.current().map(|(_, manager)| manager)
    }

    /// [`manager`](Self::manager) with the generation of the primary it goes to.
    pub fn current(&self) -> Option<(u64, ConnectionManager)> {
        let located = self.target.current()?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        match current.as_ref() {
            Some((generation, manager)) if *generation == located.generation => Some((*generation, manager.clone())),
            _ => {
                let manager = connect(&self.target, &located, (self.config)())
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot use the primary's address"))
                    .ok()?;
                *current = Some((located.generation, manager.clone()));
                Some((located.generation, manager))
            }
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

fn connect(
    target: &Target,
    located: &Located,
    config: ConnectionManagerConfig,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = target.client(&located.url)?;
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The target `url` names and, with sentinels, the task that follows them.
pub fn target_of(url: &str, tls: &RedisTls) -> Result<(Target, Option<sentinel::Watcher>), super::BusError> {
    if url.starts_with(sentinel::SCHEME) {
        let (primary, watcher) = sentinel::follow(url)?;
        Ok((primary.into(), Some(watcher)))
    } else {
        Ok((Target::fixed(url, tls.clone()), None))
    }
}
