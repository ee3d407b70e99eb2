//! HTTP routes, one file per concern, composed into one router here. The router is served by
//! [`server`]'s accept loop, not `axum::serve` (see ../shared/CRATES.md §3).

pub mod admin;
pub mod demo;
pub mod error;
pub mod event_stream;
pub mod events;
pub mod health;
pub mod history;
pub mod publish;
pub mod raw_stream;
pub mod server;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::node::Node;

pub fn router(node: Arc<Node>) -> Router {
    let mut router = Router::new()
        .route("/events", get(events::subscribe))
        .route(
            "/api/publish",
            post(publish::publish).layer(DefaultBodyLimit::max(node.config.max_publish_bytes as usize)),
        )
        .route("/api/stats", get(admin::stats))
        .route("/api/history", get(history::history))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    if node.is_development() {
        router = router.route("/", get(demo::page));
    }
    if let Some(cors) = cors_layer(&node) {
        router = router.layer(cors);
    }
    router.with_state(node)
}

/// The CORS headers of an event stream served on the raw path (the router's `CorsLayer` does
/// the same for everything hyper serves).
pub fn stream_cors_headers(node: &Node, origin: Option<&HeaderValue>) -> Vec<(HeaderName, HeaderValue)> {
    let Some(origin) = origin.filter(|o| !o.is_empty()) else { return Vec::new() };
    let mut configured = node.config.cors_origins().peekable();
    if configured.peek().is_none() {
        return Vec::new();
    }
    if !configured.any(|o| o == "*" || o.as_bytes() == origin.as_bytes()) {
        return Vec::new();
    }
    vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true")),
        (header::VARY, HeaderValue::from_static("origin")),
    ]
}

fn cors_layer(node: &Node) -> Option<CorsLayer> {
    let origins: Vec<&str> = node.config.cors_origins().collect();
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.contains(&"*") {
        // Credentials (cookies) cannot be combined with a literal `*`: echo the caller's origin.
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CACHE_CONTROL,
                HeaderName::from_static("last-event-id"),
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}
