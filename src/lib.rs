//! sse-fanout: a Server-Sent Events fan-out node over Redis pub/sub.
//!
//! The hot path reads top to bottom: [`bus`] → [`dispatch`] → [`hub`] (framed once by
//! [`frame`]) → [`connection`] → [`wire`] → the socket; [`gzip`] encodes the compressed
//! streams' bytes, once per message. [`server`] builds a node and runs it; [`node`] is the
//! state its [`http`] routes share; [`resume`] is the history protocol;
//! [`auth`] checks tokens and [`auth_hook`] asks the operator's backend when a stream opens.
//! [`renewal`] routes a stream's token renewal to the node that holds the stream.
//! [`telemetry`] owns the trace spans and their OTLP export.

mod auth;
mod auth_hook;
mod bus;
mod canary;
mod channel;
pub mod config;
mod connection;
mod control;
mod dev_mode;
mod dispatch;
pub mod doctor;
mod envelope;
mod frame;
mod gzip;
mod history;
mod http;
mod hub;
mod jwks;
mod log_limit;
pub mod logging;
mod metrics;
mod node;
mod presence;
pub mod redis_tls;
mod renewal;
mod resume;
pub mod server;
pub mod shutdown;
pub mod telemetry;
mod user_limit;
mod wire;

/// A key that cannot be used: `main` tells it from other startup failures (exit 2).
pub use auth::KeyError;
