//! Who may do what over HTTP, decided in one place for every route: find the token (header,
//! the configured query parameters, the configured cookies), verify it, enforce the origin rule for cookie-carried tokens, and
//! check the role a route needs. Every refusal is an [`ApiError`], answered by `error.rs`.
//!
//! The hyper path takes an [`Access`] as an axum extractor, which runs before the body is read
//! (so a bad token is refused without waiting for a body) and records a valid one in the
//! request's mark for the accept layer's pending set ([`super::pending`]); the raw `/events`
//! path, which has no axum request, calls [`grant`].

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use super::error::ApiError;
use super::pending::RequestMark;
use super::query;
use crate::auth::{AuthError, Grant, Role, TokenSource, token_from_request};
use crate::node::Node;

/// A verified token and where the request carried it.
#[derive(Debug)]
pub struct Access {
    pub grant: Grant,
    pub source: TokenSource,
}

impl Access {
    /// Refuses a token the page did not set itself: a state-changing request must carry its
    /// token in `Authorization: Bearer` (a cookie rides along from any site; a query string
    /// ends up in proxy logs).
    pub fn bearer_only(self) -> Result<Self, ApiError> {
        match self.source {
            TokenSource::Header => Ok(self),
            TokenSource::Query | TokenSource::Cookie => Err(AuthError::BearerRequired.into()),
        }
    }

    /// The grant, when its role is at least `role`.
    pub fn require(self, role: Role) -> Result<Grant, ApiError> {
        if self.grant.role >= role {
            return Ok(self.grant);
        }
        Err(match role {
            Role::Admin => ApiError::forbidden("not_an_admin", "the token's role must be admin"),
            _ => ApiError::forbidden("not_a_publisher", "the token's role must be publisher or admin"),
        })
    }
}

/// Verifies the request's token. A token from a cookie is refused for a request from an origin
/// outside `SSE_CORS_ORIGINS`: the browser sent it on another site's behalf.
pub async fn grant(node: &Node, headers: &HeaderMap, query: Option<&str>) -> Result<Access, ApiError> {
    let names = &node.auth.names;
    let query_token = names.query.iter().find_map(|name| query_param(query, name));
    let (token, source) =
        token_from_request(headers, query_token.as_deref(), &names.cookies).ok_or(AuthError::Missing)?;
    if source == TokenSource::Cookie {
        check_origin(node, headers)?;
    }
    let grant = node.auth.verify(token).await?;
    Ok(Access { grant, source })
}

/// Refuses a browser request from an origin outside the configured allow-list.
pub fn check_origin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let origin = headers.get(header::ORIGIN);
    if node.origins.permits(origin.map(|o| o.as_bytes())) {
        return Ok(());
    }
    let shown = origin.and_then(|o| o.to_str().ok()).unwrap_or("(not text)");
    Err(ApiError::forbidden("origin_not_allowed", format!("origin {shown} is not allowed")))
}

/// The last value of `name` in a query string (a repeated parameter overrides), decoded by the
/// routes' one decoder. A value that does not decode is kept as written: a token holds no `%`,
/// so it then fails verification (401) rather than the query being refused (400).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    let (_, value) = query?
        .rsplit('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| query::decode(key).is_ok_and(|key| key == name))?;
    Some(query::decode(value).unwrap_or(Cow::Borrowed(value)))
}

impl FromRequestParts<Arc<Node>> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, Self::Rejection> {
        let access = grant(node, &parts.headers, parts.uri.query()).await?;
        super::ticket::spend(node, &access.grant, access.source).await?;
        // A valid token: once its body is read too, the connection is no longer one of those
        // the accept layer bounds.
        if let Some(pending) = parts.extensions.get::<RequestMark>() {
            pending.authenticated();
        }
        Ok(access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_access_token_is_read_decoded() {
        assert_eq!(query_param(Some("access_token=x&a=1&access_token=t%2Ek"), "access_token").as_deref(), Some("t.k"));
        assert_eq!(query_param(Some("topic=a"), "access_token"), None);
        assert_eq!(query_param(None, "access_token"), None);
    }

    proptest::proptest! {
        /// Any query string gives an `access_token` or none, without a panic.
        #[test]
        fn any_query_is_read_without_panicking(query in "([a-z_]{0,12}=?([ -~]|%[0-9A-Fa-f]{2}|%){0,16}&?){0,4}|.*") {
            let _ = query_param(Some(&query), "access_token");
        }
    }
}
