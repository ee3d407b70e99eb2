//! sse-fanout: a Server-Sent Events fan-out node over Redis pub/sub.
//!
//! The hot path reads top to bottom: [`bus`] → [`hub`] (framed once by [`frame`]) →
//! [`connection`] → the socket. [`node`] wires the parts; [`http`] holds the routes.

pub mod auth;
pub mod bus;
pub mod channel;
pub mod config;
pub mod connection;
pub mod doctor;
pub mod envelope;
pub mod frame;
pub mod history;
pub mod http;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod shutdown;
