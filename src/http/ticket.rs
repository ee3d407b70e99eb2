//! Single-use query tokens (`SSE_SINGLE_USE_QUERY_TOKENS`). A token carried in the query string
//! ends up in proxy logs and browser history; spent the first time it is accepted, cluster-wide,
//! a copy read from there opens nothing. A token is spent under its `jti` for the rest of its
//! lifetime, leeway included (after that it is refused as expired anyway), with the bus's
//! `claim_once`: `SET NX PX` in Redis, so every node sees the same spend.

use std::time::Duration;

use super::error::ApiError;
use crate::auth::{AuthError, Grant, TokenSource, unix_now};
use crate::node::Node;

/// Spends `grant`'s token if it came in the query string and query tokens are single-use;
/// refuses it when it was spent before, or when it has no `jti` to be spent under.
pub async fn spend(node: &Node, grant: &Grant, source: TokenSource) -> Result<(), ApiError> {
    if source != TokenSource::Query || !node.config.single_use_query_tokens {
        return Ok(());
    }
    let jti = grant.jti.as_deref().ok_or(AuthError::BadClaim("jti"))?;
    let valid_until = grant.expires_at.saturating_add(node.config.jwt_leeway.as_secs());
    // At least a second: a token accepted inside its leeway is still spent.
    let lifetime = Duration::from_secs(valid_until.saturating_sub(unix_now()).max(1));
    let key = format!("{}:jti:{jti}", node.channels.prefix());
    match node.hub.bus().claim_once(&key, lifetime).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            node.hub_metrics.rejected("token_replayed");
            Err(AuthError::Replayed.into())
        }
        // Fail closed: a token that cannot be spent is not accepted.
        Err(e) => Err(ApiError::unavailable("bus_unavailable", format!("cannot spend a single-use token: {e}"))),
    }
}
