//! The node's shared state: what every HTTP handler and background task of one running node
//! reaches through an `Arc<Node>`. Built once by [`crate::server`]; owns no task itself.
//!
//! It knows nothing of HTTP: handlers live in [`crate::http`] and take this state from axum.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Authenticator;
use crate::auth_hook::AuthHook;
use crate::canary::Canary;
use crate::channel::ChannelNames;
use crate::config::Config;
use crate::dev_mode::DevMode;
use crate::http::cors::Origins;
use crate::http::ip_limits::IpLimits;
use crate::hub::Hub;
use crate::metrics::HubMetrics;
use crate::presence::Presence;
use crate::renewal::Renewals;
use crate::resume::Resumer;

pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub auth: Arc<Authenticator>,
    /// The connect authorization hook (`SSE_AUTH_HOOK_URL`), when configured.
    pub auth_hook: Option<AuthHook>,
    pub channels: ChannelNames,
    /// Browser origins allowed to call this node (`SSE_CORS_ORIGINS`).
    pub origins: Origins,
    /// Stream opens and open streams per client address (`SSE_IP_*`).
    pub ip_limits: Arc<IpLimits>,
    pub hub: Arc<Hub>,
    /// Who is online across the cluster (the admin API), and the revoke command.
    pub presence: Arc<Presence>,
    pub hub_metrics: HubMetrics,
    pub prometheus: PrometheusHandle,
    pub publish_requests: Counter,
    pub started: Instant,
    /// Tokens and the demo page made up at start when no key is configured.
    pub dev: Option<DevMode>,
    /// Token renewals of open streams, here or through their node.
    pub renewals: Arc<Renewals>,
    /// Resume through history; `None` when history is off.
    pub resume: Option<Arc<Resumer>>,
    /// The delivery self-check `/readyz` reads; `None` when `SSE_CANARY_INTERVAL=0`.
    pub canary: Option<Arc<Canary>>,
    /// Set once a task the node cannot deliver without has stopped: `/readyz` then fails.
    pub(crate) failure: OnceLock<&'static str>,
}

impl Node {
    pub fn is_development(&self) -> bool {
        self.dev.is_some()
    }

    /// Records that the node can no longer deliver (the first reason wins).
    pub fn fail(&self, reason: &'static str) {
        let _ = self.failure.set(reason);
    }

    /// Why the node can no longer deliver, once it cannot.
    pub fn failure(&self) -> Option<&'static str> {
        self.failure.get().copied()
    }
}
