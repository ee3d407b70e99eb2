//! `POST /api/connections/<connection_id>/token`: a page renews its stream's token without
//! dropping the stream. The new token comes in `Authorization: Bearer` only (a cookie rides
//! along from any site; a query string ends up in logs); it is verified here, so an invalid one
//! never leaves this node, and the renewal goes wherever the stream is ([`crate::renewal`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use super::error::ApiError;
use super::grant::Access;
use crate::auth::{AuthError, token_from_request};
use crate::metrics::TOKEN_RENEWALS;
use crate::node::Node;
use crate::renewal::Outcome;

pub async fn renew_token(
    State(node): State<Arc<Node>>,
    Path(connection_id): Path<String>,
    headers: HeaderMap,
    access: Access,
) -> Result<StatusCode, ApiError> {
    let grant = access.bearer_only()?.grant;
    // `bearer_only` made sure the token came in the header: the one passed on is the one verified.
    let (token, _) = token_from_request(&headers, None, &[]).ok_or(AuthError::Missing)?;
    let outcome = node.renewals.renew(&connection_id, token, grant).await;
    metrics::counter!(TOKEN_RENEWALS, "outcome" => outcome.label()).increment(1);
    match outcome {
        Outcome::Renewed => Ok(StatusCode::NO_CONTENT),
        Outcome::NotFound => Err(ApiError::NotFound {
            code: "connection_not_found",
            message: format!("no open stream {connection_id:?}: it ended, or its node is gone"),
        }),
        Outcome::OtherUser => {
            Err(ApiError::forbidden("not_your_connection", "the stream belongs to another user than the token's sub"))
        }
        Outcome::InvalidToken => Err(AuthError::RefusedByHolder.into()),
        Outcome::Unavailable => {
            Err(ApiError::unavailable("renewal_unavailable", "the node holding the stream did not answer; retry"))
        }
    }
}
