//! `GET /` in development mode only: the demo page development mode rendered at start (see
//! [`crate::dev_mode`]), so a first run shows the whole path in a browser.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::node::Node;

pub async fn page(State(node): State<Arc<Node>>) -> Response {
    match &node.dev {
        Some(dev) => Html(dev.demo_page.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
