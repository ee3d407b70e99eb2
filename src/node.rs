//! The node: wires configuration, tokens, bus, hub and HTTP together, runs the background
//! tasks (dispatcher, ticker, metrics upkeep) and owns the order of shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::RedisBus;
use crate::bus::{Bus, Inbound, InboundReceiver};
use crate::channel::{ChannelName, ChannelNames};
use crate::config::Config;
use crate::connection::CloseReason;
use crate::history::{HistoryConfig, ResetReason, Since, StreamId, reset_frame};
use crate::hub::{Heartbeat, Hub, Limits};
use crate::metrics::{BusMetrics, HubMetrics, PUBLISH_REQUESTS};
use crate::{frame, http, shutdown};

/// Shared state of a running node, handed to every HTTP handler.
pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub auth: Authenticator,
    pub channels: ChannelNames,
    pub hub: Arc<Hub>,
    pub hub_metrics: HubMetrics,
    pub prometheus: PrometheusHandle,
    pub publish_requests: Counter,
    pub started: Instant,
    pub dev: Option<DevMode>,
    pub history: Option<HistoryConfig>,
    /// The history epoch last seen from the bus, for the node's own backfills.
    pub epoch: AtomicU32,
}

/// What development mode made up at startup.
pub struct DevMode {
    pub subscriber_token: String,
    pub publisher_token: String,
    pub admin_token: String,
    pub demo_page: String,
}

impl Node {
    pub fn is_development(&self) -> bool {
        self.dev.is_some()
    }
}

/// Runs a node until SIGTERM/SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let prometheus = crate::metrics::install().context("installing the metrics recorder")?;
    let node_id = config.node_id.clone().unwrap_or_else(|| format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff));
    let auth = Authenticator::from_config(&config)?;
    let background = CancellationToken::new();

    let history = config.history();
    let names = ChannelNames::new(&config.channel_prefix);
    let (bus, inbound): (Arc<dyn Bus>, InboundReceiver) = match &config.redis_url {
        Some(url) => {
            let library = history.as_ref().map(|h| crate::history::redis_library(&config.channel_prefix, h));
            let (bus, inbound) = RedisBus::start(url, library, BusMetrics::new(), background.clone())?;
            (bus, inbound)
        }
        None => {
            let (bus, inbound) = MemoryBus::new(names.clone(), history);
            (bus, inbound)
        }
    };
    let hub_metrics = HubMetrics::new();
    let limits = Limits {
        per_user: config.max_connections_per_user,
        per_user_policy: config.per_user_policy,
        per_node: config.max_connections,
        queue_capacity: config.queue_capacity as usize,
        inactivity_timeout: config.connection_timeout,
        max_lifetime: config.max_connection_lifetime,
        history: history.is_some(),
    };
    let hub = Hub::new(bus, limits, hub_metrics.clone());
    let dev = config.is_development().then(|| development_mode(&auth)).flatten();

    let listener = listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let node = Arc::new(Node {
        channels: names,
        node_id: node_id.clone(),
        auth,
        hub: hub.clone(),
        hub_metrics,
        prometheus: prometheus.clone(),
        publish_requests: metrics::counter!(PUBLISH_REQUESTS),
        started: Instant::now(),
        dev,
        history,
        epoch: AtomicU32::new(0),
        config,
    });

    tokio::spawn(dispatch(inbound, node.clone()));
    tokio::spawn(tick(hub.clone(), node.config.heartbeat_interval, background.clone()));
    tokio::spawn(metrics_upkeep(prometheus, background.clone()));

    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();
    let server = tokio::spawn(http::server::serve(
        listener,
        http::router(node.clone()),
        node.clone(),
        stop_accepting.clone(),
        connections.clone(),
    ));
    tracing::info!(node = %node_id, listen = %node.config.listen, bus = node.hub.bus().kind(), "listening");
    if let Some(dev) = &node.dev {
        announce_development_mode(&node, dev);
    }

    let signal = shutdown::signal().await;
    tracing::info!(signal, "shutting down");
    // Keep accepting while draining: probes and new requests get their 503 and move on.
    tokio::select! {
        _ = shutdown::drain(&hub, node.config.drain_period, node.config.retry_interval) => {}
        second = shutdown::signal() => tracing::warn!(signal = second, "second signal: skipping the rest of the drain"),
    }
    stop_accepting.cancel();
    let _ = server.await;
    connections.close();
    if tokio::time::timeout(Duration::from_secs(5), connections.wait()).await.is_err() {
        tracing::warn!("some connections did not finish within 5 s");
    }
    background.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// Drains the bus into the hub. Batches wake-ups: one receive takes up to 256 messages.
/// Runs in order, so a backfill after a bus reconnect is delivered before what follows it.
async fn dispatch(mut inbound: InboundReceiver, node: Arc<Node>) {
    let hub = node.hub.clone();
    let mut batch = Vec::with_capacity(256);
    while inbound.recv_many(&mut batch, 256).await > 0 {
        let mut index = 0;
        // Set once the rest of the batch's confirmations were looked at: the later ones have
        // nothing left to backfill (a storm of streams brings a confirmation each).
        let mut rest_backfilled = false;
        while index < batch.len() {
            match &batch[index] {
                Inbound::Message { channel, id, payload } => hub.deliver(channel.as_str(), *id, payload).await,
                Inbound::Disconnected => {
                    hub.mark_gaps();
                    rest_backfilled = false;
                }
                Inbound::Subscribed(_) if node.history.is_some() && !rest_backfilled => {
                    rest_backfilled = true;
                    // After a reconnect the confirmations arrive together: backfill every gapped
                    // channel confirmed from here to the end of the batch in one round trip. No
                    // message of a channel precedes its own confirmation, so order holds.
                    let gaps: Vec<(ChannelName, StreamId)> = batch[index..]
                        .iter()
                        .filter_map(|m| match m {
                            Inbound::Subscribed(channel) => {
                                hub.take_gap(channel.as_str()).map(|last| (channel.clone(), last))
                            }
                            _ => None,
                        })
                        .collect();
                    if !gaps.is_empty() {
                        backfill(&node, &gaps).await;
                    }
                }
                Inbound::Subscribed(_) => {}
            }
            index += 1;
        }
        batch.clear();
        if hub.bus().take_overflow() {
            tracing::warn!("the bus outran the dispatcher and live messages were dropped; streams resume from history");
            hub.close_all(CloseReason::Overflow);
        }
    }
}

/// Pending connections the listener queues before the kernel drops new SYNs (tokio's default
/// is 1,024). After a node fails, thousands of clients come back within their retry jitter, and
/// a SYN dropped from a full queue is retried only a second later. The kernel caps it at
/// `net.core.somaxconn` (4,096 by default).
const LISTEN_BACKLOG: i32 = 4096;

fn listen(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Delivers what channels missed while the bus was disconnected, from history.
async fn backfill(node: &Node, gaps: &[(ChannelName, StreamId)]) {
    let epoch = node.epoch.load(Ordering::Acquire);
    let (current, results) = match node.hub.bus().since(epoch, Duration::ZERO, gaps).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(channels = gaps.len(), error = %e, "backfill after a bus reconnect failed");
            return;
        }
    };
    let mut missed = 0;
    for ((channel, _), since) in gaps.iter().zip(results) {
        match since {
            Since::Entries(entries) => {
                missed += entries.len();
                for (id, payload) in entries {
                    node.hub.deliver(channel.as_str(), Some(id), &payload).await;
                }
            }
            Since::Reset { tail } => {
                let reason = if current == epoch { ResetReason::WindowLost } else { ResetReason::HistoryLost };
                tracing::warn!(%channel, reason = reason.label(), "history lost across a bus reconnect; streams are told to reset");
                let frame = reset_frame(&node.channels, &[channel], reason);
                node.hub.deliver_rebase(channel.as_str(), current, tail, frame).await;
            }
        }
    }
    node.epoch.store(current, Ordering::Release);
    tracing::info!(channels = gaps.len(), missed, "backfilled after a bus reconnect");
}

/// One node-wide ticker instead of a timer per stream: clock, heartbeats and timeouts. With a
/// heartbeat interval of N seconds, each tick pings 1/N of the streams (see `hub::Heartbeat`).
async fn tick(hub: Arc<Hub>, heartbeat_interval: Duration, stop: CancellationToken) {
    let slots = heartbeat_interval.as_secs_f64().ceil().max(1.0) as u64;
    let frame = frame::comment("ping");
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut count: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        count += 1;
        let heartbeat =
            (!heartbeat_interval.is_zero()).then(|| Heartbeat { frame: frame.clone(), slot: count % slots, slots });
        hub.tick(heartbeat.as_ref());
    }
}

async fn metrics_upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

fn development_mode(auth: &Authenticator) -> Option<DevMode> {
    let subscriber_token = auth.mint_dev_token("demo-user", &["*"], None, DEV_TOKEN_TTL)?;
    let publisher_token = auth.mint_dev_token("demo-publisher", &[], Some("publisher"), DEV_TOKEN_TTL)?;
    let admin_token = auth.mint_dev_token("demo-admin", &[], Some("admin"), DEV_TOKEN_TTL)?;
    let demo_page = http::demo::render(&subscriber_token, &publisher_token);
    Some(DevMode { subscriber_token, publisher_token, admin_token, demo_page })
}

fn announce_development_mode(node: &Node, dev: &DevMode) {
    let addr = node.config.listen;
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    let base = format!("http://{host}:{}", addr.port());
    tracing::warn!(
        "DEVELOPMENT MODE: no SSE_JWT_SECRET or SSE_JWT_PUBLIC_KEY; tokens below are signed with a random secret"
    );
    // Printed to stdout, not the log: this is the first-run guide, meant to be copied.
    println!(
        "\n==== sse-fanout is in DEVELOPMENT MODE ====\n\
         Set SSE_JWT_SECRET (HS256) or SSE_JWT_PUBLIC_KEY (RS256/ES256) for production.\n\n\
         Demo page:        {base}/\n\
         Subscriber token: {sub}\n\
         Publisher token:  {publ}\n\
         Admin token:      {admin}\n\n\
         Subscribe:\n  curl -N '{base}/events?topic=news&access_token={sub}'\n\n\
         Publish:\n  curl -X POST '{base}/api/publish' -H 'Authorization: Bearer {publ}' -H 'Content-Type: application/json' \\\n    \
         -d '{{\"users\":[\"demo-user\"],\"event\":\"notification\",\"data\":{{\"hello\":\"world\"}}}}'\n\n\
         Stats:\n  curl '{base}/api/stats' -H 'Authorization: Bearer {admin}'\n\
         ===========================================\n",
        sub = dev.subscriber_token,
        publ = dev.publisher_token,
        admin = dev.admin_token,
    );
}
