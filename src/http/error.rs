//! Every HTTP error the node answers with: one status and one short JSON body, decided here.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ip_limits::IpRefusal;
use crate::auth::AuthError;
use crate::bus::BusError;

#[derive(Debug)]
pub enum ApiError {
    /// 401: no token, or one that does not verify.
    Unauthorized(AuthError),
    /// 403: the token is valid but does not allow this.
    Forbidden { code: &'static str, message: String },
    /// 404: what the path names does not exist (here, or on any node).
    NotFound { code: &'static str, message: String },
    /// 400: a request field is wrong; `field` names it.
    BadRequest { field: String, message: String },
    /// 413.
    TooLarge { limit: usize },
    /// 415: a body in a format the route does not take; `expected` names the one it does.
    UnsupportedMediaType { expected: &'static str },
    /// 408: the request's head or body did not arrive within `SSE_REQUEST_TIMEOUT`.
    RequestTimeout { after: Duration },
    /// 429; `retry_after` (seconds) becomes a `Retry-After` header when a retry time is known.
    TooManyRequests { code: &'static str, message: String, retry_after: Option<u64> },
    /// 503: draining, full, or the bus is down.
    Unavailable { code: &'static str, message: String },
    /// A 4xx status the connect authorization hook chose, with its reason.
    Denied { status: StatusCode, code: &'static str, message: String },
}

impl ApiError {
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest { field: field.into(), message: message.into() }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Forbidden { code, message: message.into() }
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unavailable { code, message: message.into() }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Denied { status, .. } => *status,
        }
    }

    /// The body's `error` code: what a client (and a trace) reads as the reason.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(AuthError::Missing) => "missing_token",
            ApiError::Unauthorized(AuthError::BearerRequired) => "bearer_required",
            ApiError::Unauthorized(AuthError::Replayed) => "token_replayed",
            ApiError::Unauthorized(_) => "invalid_token",
            ApiError::BadRequest { .. } => "invalid_request",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::Forbidden { code, .. }
            | ApiError::NotFound { code, .. }
            | ApiError::TooManyRequests { code, .. }
            | ApiError::Unavailable { code, .. }
            | ApiError::Denied { code, .. } => code,
        }
    }
}

/// A history read failed: the stream cannot be positioned now; the client retries.
pub fn history_unavailable(e: BusError) -> ApiError {
    ApiError::unavailable("not_ready", format!("history is unavailable: {e}"))
}

/// Presence could not be read from Redis.
pub fn presence_unavailable(e: crate::presence::PresenceError) -> ApiError {
    ApiError::unavailable("presence_unavailable", e.to_string())
}

/// A publish the bus did not take.
pub fn publish_failed(e: BusError) -> ApiError {
    let code = if e.is_transient() { "bus_unavailable" } else { "bus_refused" };
    ApiError::unavailable(code, e.to_string())
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            // Not the token's fault: the client should come back, here or on a ready node.
            AuthError::KeysUnavailable => ApiError::unavailable("keys_unavailable", e.to_string()),
            e => ApiError::Unauthorized(e),
        }
    }
}

impl From<IpRefusal> for ApiError {
    fn from(refusal: IpRefusal) -> Self {
        let code = refusal.label();
        match refusal {
            IpRefusal::RateLimited { retry_after } => ApiError::TooManyRequests {
                code,
                message: "this address opens streams too fast; retry later".into(),
                // Whole seconds, rounded up: a client retrying at once would be refused again.
                retry_after: Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)),
            },
            IpRefusal::TooManyStreams => ApiError::TooManyRequests {
                code,
                message: "this address holds the maximum number of streams on this node".into(),
                retry_after: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = (self.status(), self.code());
        let mut headers = Vec::new();
        let body = match self {
            ApiError::Unauthorized(e) => {
                headers.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
                json!({"error": code, "message": e.to_string()})
            }
            ApiError::BadRequest { field, message } => json!({"error": code, "field": field, "message": message}),
            ApiError::TooLarge { limit } => {
                json!({"error": code, "message": format!("body is larger than {limit} bytes")})
            }
            ApiError::UnsupportedMediaType { expected } => {
                json!({"error": code, "message": format!("the body must be {expected}")})
            }
            ApiError::RequestTimeout { after } => {
                headers.push((header::CONNECTION, HeaderValue::from_static("close")));
                json!({"error": code, "message": format!("the request did not arrive within {} ms", after.as_millis())})
            }
            ApiError::TooManyRequests { message, retry_after, .. } => {
                if let Some(seconds) = retry_after {
                    headers.push((header::RETRY_AFTER, HeaderValue::from(seconds.max(1))));
                }
                json!({"error": code, "message": message})
            }
            ApiError::Forbidden { message, .. }
            | ApiError::NotFound { message, .. }
            | ApiError::Unavailable { message, .. }
            | ApiError::Denied { message, .. } => json!({"error": code, "message": message}),
        };
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().extend(headers);
        response
    }
}
