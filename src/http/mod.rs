//! HTTP routes, one file per concern, composed into one router here. The router is served by
//! [`accept`]'s accept loop, not `axum::serve`, which measured twice the memory per connection.
//! Who may call what is [`grant`]'s; which origins, [`cors`]'s; every error body, [`error`]'s;
//! how a query string is decoded, [`query`]'s; spending a single-use query token, [`ticket`]'s;
//! renewing an open stream's token, [`connections`]'.
//! What a client may hold before it is authenticated is [`accept`]'s and [`pending`]'s; where a
//! request comes from, [`client_ip`]'s; how many streams an address may open, [`ip_limits`]'s.

pub mod accept;
mod admin;
mod client_ip;
mod connections;
mod content_coding;
pub mod cors;
mod deadline;
mod demo;
mod error;
mod event_stream;
mod events;
mod grant;
mod health;
mod history;
pub mod ip_limits;
mod pending;
mod publish;
mod query;
mod raw_stream;
mod ticket;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};

use crate::node::Node;

pub fn router(node: Arc<Node>) -> Router {
    let mut router = Router::new()
        .route("/events", get(events::subscribe))
        .route(
            "/api/publish",
            post(publish::publish).layer(DefaultBodyLimit::max(node.config.max_publish_bytes as usize)),
        )
        .route("/api/stats", get(admin::stats))
        .route("/api/presence", get(admin::presence_many))
        .route("/api/presence/{user}", get(admin::presence_of))
        .route("/api/connections", get(admin::connections))
        .route("/api/cluster", get(admin::cluster))
        .route("/api/users/{user}/connections", delete(admin::revoke))
        .route("/api/connections/{connection_id}/token", post(connections::renew_token))
        .route("/api/history", get(history::history))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    if node.is_development() {
        router = router.route("/", get(demo::page));
    }
    if let Some(cors) = node.origins.layer() {
        router = router.layer(cors);
    }
    router.with_state(node)
}
