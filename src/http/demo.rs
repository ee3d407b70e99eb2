//! `GET /` in development mode only: a page that opens an EventSource with a development token
//! and publishes through the API, so a first run shows the whole path in a browser.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::node::Node;

const TEMPLATE: &str = include_str!("demo.html");

/// Fills the page with the node's development tokens (JWTs hold only `[A-Za-z0-9_.-]`).
pub fn render(subscriber_token: &str, publisher_token: &str) -> String {
    TEMPLATE.replace("{{SUBSCRIBER_TOKEN}}", subscriber_token).replace("{{PUBLISHER_TOKEN}}", publisher_token)
}

pub async fn page(State(node): State<Arc<Node>>) -> Response {
    match &node.dev {
        Some(dev) => Html(dev.demo_page.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
