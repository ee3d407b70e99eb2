//! Running a node: build its parts from the configuration, serve a listener until a shutdown
//! future resolves, then drain in order. Like mini-redis's `server::run`, the caller supplies
//! the listener and the shutdown (`main` gives a socket and OS signals; tests give an ephemeral
//! port and a channel), so a whole node runs in-process.
//!
//! The background tasks are owned here. Two of them the node cannot deliver without: the
//! dispatcher (bus → hub) and the bus's own task (Redis's subscription owner). If either ends
//! while the node runs, `/readyz` fails at once, the streams are told to reconnect elsewhere,
//! and [`Server::serve`] returns an error, so the process exits non-zero and its supervisor
//! restarts it, instead of a node that looks healthy while delivering nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::auth_hook::AuthHook;
use crate::bus::{self, InboundReceiver, Running};
use crate::canary::Canary;
use crate::channel::ChannelNames;
use crate::config::Config;
use crate::connection::CloseReason;
use crate::control::NodeChannels;
use crate::dev_mode::DevMode;
use crate::frame::Frame;
use crate::http::cors::Origins;
use crate::http::ip_limits::IpLimits;
use crate::hub::{Heartbeat, Hub, HubWork, Limits, TokenLife};
use crate::metrics::HubMetrics;
use crate::node::Node;
use crate::presence::{EventSettings, Presence};
use crate::renewal::{self, Renewals};
use crate::resume::Resumer;
use crate::user_limit::Seats;
use crate::{dispatch, frame, http, shutdown, telemetry};

/// Pending connections the listener queues before the kernel drops new SYNs (tokio's default
/// is 1,024). After a node fails, thousands of clients come back within their retry jitter, and
/// a SYN dropped from a full queue is retried only a second later. The kernel caps it at
/// `net.core.somaxconn` (4,096 by default).
const LISTEN_BACKLOG: i32 = 4096;

/// How long open connections get to finish once the node stops accepting.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `address` the way the node listens: address reuse and a deep accept queue.
pub fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Runs a node on `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::build(config)?.serve(listener, shutdown, std::future::pending()).await
}

/// A node built and not yet serving.
pub struct Server {
    node: Arc<Node>,
    inbound: InboundReceiver,
    /// Hub work for the dispatcher (renewals).
    work: mpsc::Receiver<HubWork>,
    bus_owner: Option<tokio::task::JoinHandle<()>>,
    /// Cancelled last: stops the ticker, the metrics upkeep and the bus's task.
    background: CancellationToken,
}

impl Server {
    /// Builds the node's parts; spawns the bus's task. Needs a tokio runtime.
    pub fn build(config: Config) -> anyhow::Result<Self> {
        let prometheus = crate::metrics::install().context("installing the metrics recorder")?;
        let node_id =
            config.node_id.clone().unwrap_or_else(|| format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff));
        let auth = Arc::new(Authenticator::from_config(&config)?);
        let auth_hook = AuthHook::from_config(&config)?;
        let background = CancellationToken::new();
        let history = config.history();
        let channels = ChannelNames::new(&config.channel_prefix);
        let redis_tls = config.redis_tls()?;
        let Running { bus, inbound, owner, target } =
            bus::start(config.redis_url.as_deref(), &redis_tls, &channels, history, background.clone())?;
        let resume =
            history.is_some().then(|| Arc::new(Resumer::new(bus.clone(), channels.clone(), config.replay_limits())));
        let hub_metrics = HubMetrics::new();
        let limits = Limits {
            per_user: config.max_connections_per_user,
            per_user_policy: config.per_user_policy,
            per_node: config.max_connections,
            queue_capacity: config.queue_capacity as usize,
            queue_max_bytes: config.queue_max_bytes,
            inactivity_timeout: config.connection_timeout,
            max_lifetime: config.max_connection_lifetime,
            history: history.is_some(),
            token: TokenLife { leeway: config.jwt_leeway, warning: config.token_expiry_warning },
            compress_from: config.compression_min_size as usize,
        };
        let canary = (!config.canary_interval.is_zero())
            .then(|| Arc::new(Canary::new(channels.canary(&node_id), config.canary_interval, config.canary_threshold)));
        let (work, work_rx) = tokio::sync::mpsc::channel(renewal::WORK_CAPACITY);
        let renewals = Arc::new(Renewals::new(&node_id, channels.clone(), bus.clone(), auth.clone(), work));
        NodeChannels::new(&channels, renewals.clone(), canary.clone()).subscribe(bus.as_ref());
        let hub = Hub::new(bus, &node_id, limits, hub_metrics.clone());
        let presence = Presence::new(
            node_id.clone(),
            hub.clone(),
            channels.clone(),
            config.redis_url.as_deref(),
            target.as_ref(),
            config.presence_lease,
            config.presence_events.then_some(EventSettings {
                delay: config.presence_events_delay,
                maxlen: config.presence_events_maxlen,
            }),
        )?;
        let seats = Seats::new(
            presence.redis(),
            channels.clone(),
            &node_id,
            config.max_connections_per_user,
            config.per_user_policy,
        );
        let dev = if config.is_development() { DevMode::start(&auth) } else { None };
        let node = Arc::new(Node {
            origins: Origins::from_config(&config),
            ip_limits: IpLimits::new(config.ip_open_rate, config.ip_open_burst, config.ip_max_streams),
            node_id,
            auth,
            auth_hook,
            channels,
            hub,
            seats,
            presence,
            hub_metrics,
            prometheus,
            publish_requests: metrics::counter!(crate::metrics::PUBLISH_REQUESTS),
            started: Instant::now(),
            dev,
            resume,
            canary,
            renewals,
            failure: OnceLock::new(),
            config,
        });
        Ok(Self { node, inbound, work: work_rx, bus_owner: owner, background })
    }

    /// The node's shared state (for in-process tests of its routes).
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves `listener` until `shutdown` resolves, then drains: new streams are refused at
    /// once and open ones closed over the drain period. `hurry` resolving during the drain
    /// skips the rest of it (a second signal). Returns an error when a task the node cannot
    /// deliver without stopped.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        hurry: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Server { node, inbound, work, bus_owner, background } = self;
        let hub = node.hub.clone();
        // The tasks without which nothing is delivered; each returns the name of its failure.
        let mut vital: JoinSet<&'static str> = JoinSet::new();
        let dispatcher = tokio::spawn(dispatch::dispatch(
            inbound,
            work,
            hub.clone(),
            node.resume.clone(),
            NodeChannels::new(&node.channels, node.renewals.clone(), node.canary.clone()),
        ));
        let stop_dispatcher = dispatcher.abort_handle();
        vital.spawn(watch("dispatcher_stopped", dispatcher));
        if let Some(owner) = bus_owner {
            vital.spawn(watch("bus_stopped", owner));
        }
        let helpers = TaskTracker::new();
        helpers.spawn(tick(hub.clone(), node.config.heartbeat_interval, background.clone()));
        helpers.spawn(metrics_upkeep(node.prometheus.clone(), background.clone()));
        if let Some(jwks) = node.auth.jwks() {
            helpers.spawn(jwks.clone().run(background.clone()));
        }
        helpers.spawn(node.presence.clone().run(background.clone()));
        helpers.spawn(ip_limits_upkeep(node.ip_limits.clone(), background.clone()));
        if let Some(canary) = &node.canary {
            helpers.spawn(canary.clone().run(hub.bus().clone(), background.clone()));
        }

        let listen = listener.local_addr().ok();
        let stop_accepting = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(http::accept::serve(
            listener,
            http::router(node.clone()),
            node.clone(),
            stop_accepting.clone(),
            connections.clone(),
        ));
        // `listen=<ip:port>`: the address actually bound (port 0 picks one), which tests read.
        tracing::info!(node = %node.node_id, listen = listen.map(tracing::field::display), bus = hub.bus().kind(), "listening");
        if let (Some(dev), Some(listen)) = (&node.dev, listen) {
            dev.announce(listen);
        }

        let failure = tokio::select! {
            () = shutdown => None,
            Some(ended) = vital.join_next() => Some(ended.unwrap_or("vital_task_lost")),
        };
        match failure {
            None => {
                tracing::info!("shutting down");
                // Keep accepting while draining: probes and new requests get their 503 and move on.
                let period = node.config.drain_period;
                let span = telemetry::drain_span(&node.node_id, period.as_millis() as u64);
                let drain = shutdown::drain(&hub, period, node.config.retry_interval).instrument(span.clone());
                let outcome = tokio::select! {
                    () = drain => "completed",
                    () = hurry => {
                        tracing::warn!("asked again: skipping the rest of the drain");
                        "hurried"
                    }
                };
                span.record("drain.outcome", outcome);
            }
            Some(reason) => {
                node.fail(reason);
                tracing::error!(reason, "a task the node cannot deliver without stopped; closing every stream");
                // Clients resume elsewhere from their cursors; nothing here can deliver to them.
                hub.start_draining();
                hub.close_all(CloseReason::Shutdown);
            }
        }
        stop_accepting.cancel();
        let _ = accept.await;
        connections.close();
        if tokio::time::timeout(FINISH_TIMEOUT, connections.wait()).await.is_err() {
            tracing::warn!("some connections did not finish within 5 s");
        }
        background.cancel();
        helpers.close();
        helpers.wait().await;
        vital.abort_all();
        stop_dispatcher.abort();
        match failure {
            None => {
                tracing::info!("stopped");
                Ok(())
            }
            Some(reason) => Err(anyhow::anyhow!("stopped because a vital task ended ({reason})")),
        }
    }
}

/// Waits for a vital task; whatever way it ends (returned or panicked) is a failure of the node.
async fn watch(failure: &'static str, task: tokio::task::JoinHandle<()>) -> &'static str {
    if let Err(e) = task.await {
        tracing::error!(failure, error = %e, "vital task panicked");
    }
    failure
}

/// One node-wide ticker instead of a timer per stream: clock, heartbeats and timeouts. With a
/// heartbeat interval of N seconds, each tick pings 1/N of the streams (see `hub::Heartbeat`).
async fn tick(hub: Arc<Hub>, heartbeat_interval: Duration, stop: CancellationToken) {
    let slots = heartbeat_interval.as_secs_f64().ceil().max(1.0) as u64;
    // One frame for every ping: its gzip piece is made once, for the node's whole life.
    let frame = Frame::from(frame::comment("ping"));
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

async fn metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

/// Every 10 s the per-address rate state forgets addresses that have been quiet long enough to
/// look new: without it, every address that ever opened a stream would stay in memory.
async fn ip_limits_upkeep(limits: Arc<IpLimits>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = ticker.tick() => limits.upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_mode::DevMode;
    use serde_json::{Value, json};

    /// A development-mode node (it mints its own tokens) on an ephemeral port.
    async fn built() -> (Server, TcpListener) {
        built_with(&[]).await
    }

    async fn built_with(args: &[&str]) -> (Server, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = Server::build(crate::config::config_from(args)).expect("build");
        (server, listener)
    }

    fn tokens(server: &Server) -> &DevMode {
        server.node().dev.as_ref().expect("development mode")
    }

    async fn status_of(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn a_node_serves_a_given_listener_until_its_shutdown_future_resolves() {
        let (server, listener) = built().await;
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (publisher, admin) = (tokens(&server).publisher_token.clone(), tokens(&server).admin_token.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running =
            tokio::spawn(server.serve(listener, async { stopped.await.unwrap_or(()) }, std::future::pending()));
        let http = reqwest::Client::new();

        let (status, body) = status_of(http.get(format!("{base}/healthz")).send().await.expect("healthz")).await;
        assert_eq!((status, body), (200, json!({"status": "ok"})));
        let (status, body) = status_of(http.get(format!("{base}/readyz")).send().await.expect("readyz")).await;
        assert_eq!((status, body), (200, json!({"status": "ready"})));
        let publish = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(&publisher)
            .json(&json!({"users": ["u1"], "data": {"n": 1}}))
            .send()
            .await
            .expect("publish");
        let (status, body) = status_of(publish).await;
        assert_eq!((status, body["channels"].as_u64()), (202, Some(1)));
        let stats = http.get(format!("{base}/api/stats")).bearer_auth(&admin).send().await.expect("stats");
        let (status, body) = status_of(stats).await;
        assert_eq!(
            (status, body["connections"].as_u64(), body["bus"]["kind"].as_str()),
            (200, Some(0), Some("memory"))
        );

        stop.send(()).expect("the node is running");
        let ended = tokio::time::timeout(Duration::from_secs(10), running).await.expect("stops in time");
        ended.expect("no panic").expect("a clean stop");
        assert!(http.get(format!("{base}/healthz")).send().await.is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn when_the_dispatchers_input_ends_readyz_fails_and_the_node_stops_with_an_error() {
        let (mut server, listener) = built().await;
        let base = format!("http://{}", listener.local_addr().expect("address"));
        // The dispatcher's input is the bus's inbound queue: give it one whose sender we hold.
        let (input, inbound) = tokio::sync::mpsc::channel(16);
        server.inbound = inbound;
        let node = server.node().clone();
        let running = tokio::spawn(server.serve(listener, std::future::pending(), std::future::pending()));
        let http = reqwest::Client::new();
        let (status, _) = status_of(http.get(format!("{base}/readyz")).send().await.expect("readyz")).await;
        assert_eq!(status, 200, "ready while the dispatcher runs");

        drop(input);
        let ended = tokio::time::timeout(Duration::from_secs(10), running).await.expect("stops in time");
        let error = ended.expect("no panic").expect_err("a node without its dispatcher must fail");
        assert!(error.to_string().contains("dispatcher_stopped"), "{error}");
        assert_eq!(node.failure(), Some("dispatcher_stopped"));
        let readyz = axum::http::Request::get("/readyz").body(axum::body::Body::empty()).expect("request");
        let response = tower::ServiceExt::oneshot(http::router(node), readyz).await.expect("answer");
        assert_eq!(response.status(), 503);
        let body = axum::body::to_bytes(response.into_body(), 1024).await.expect("body");
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body, json!({"status": "not_ready", "reason": "dispatcher_stopped"}));
    }

    /// Answers one request with the router alone, no socket: (status, JSON body).
    async fn ask(node: &Arc<Node>, request: axum::http::Request<axum::body::Body>) -> (u16, Value) {
        let response = tower::ServiceExt::oneshot(http::router(node.clone()), request).await.expect("answer");
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn get(path: &str, token: Option<&str>) -> axum::http::Request<axum::body::Body> {
        let mut request = axum::http::Request::get(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(axum::body::Body::empty()).expect("request")
    }

    fn publish(token: &str, body: &str) -> axum::http::Request<axum::body::Body> {
        axum::http::Request::post("/api/publish")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_owned()))
            .expect("request")
    }

    #[tokio::test]
    async fn probes_answer_without_a_token() {
        let (server, _listener) = built().await;
        let node = server.node();
        assert_eq!(ask(node, get("/healthz", None)).await, (200, json!({"status": "ok"})));
        assert_eq!(ask(node, get("/readyz", None)).await, (200, json!({"status": "ready"})));
        let response = tower::ServiceExt::oneshot(http::router(node.clone()), get("/metrics", None)).await.expect("ok");
        assert_eq!(response.status(), 200);
    }

    #[tokio::test]
    async fn stats_need_an_admin_token() {
        let (server, _listener) = built().await;
        let (node, dev) = (server.node(), tokens(&server));
        let (status, body) = ask(node, get("/api/stats", None)).await;
        assert_eq!((status, body["error"].as_str()), (401, Some("missing_token")));
        let (status, body) = ask(node, get("/api/stats", Some("not.a.token"))).await;
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
        let (status, body) = ask(node, get("/api/stats", Some(&dev.publisher_token))).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("not_an_admin")));
        let (status, body) = ask(node, get("/api/stats", Some(&dev.admin_token))).await;
        assert_eq!((status, body["node_id"].as_str()), (200, Some(node.node_id.as_str())));
        assert_eq!((body["connections"].as_u64(), body["draining"].as_bool()), (Some(0), Some(false)));
    }

    #[tokio::test]
    async fn publish_needs_a_publisher_token_and_a_valid_body() {
        let (server, _listener) = built().await;
        let (node, dev) = (server.node(), tokens(&server));
        let valid = r#"{"topics":["news"],"event":"note","data":"hi"}"#;
        let (status, body) = ask(node, publish(&dev.subscriber_token, valid)).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("not_a_publisher")));
        let (status, body) = ask(node, publish(&dev.publisher_token, r#"{"data":1}"#)).await;
        assert_eq!((status, body["field"].as_str()), (400, Some("users")));
        let (status, body) = ask(node, publish(&dev.publisher_token, valid)).await;
        assert_eq!((status, body["channels"].as_u64()), (202, Some(1)));
        let too_large =
            format!(r#"{{"broadcast":true,"data":"{}"}}"#, "x".repeat(node.config.max_publish_bytes as usize));
        let (status, body) = ask(node, publish(&dev.publisher_token, &too_large)).await;
        assert_eq!((status, body["error"].as_str()), (413, Some("too_large")));
    }

    #[tokio::test]
    async fn a_cookie_token_from_a_foreign_origin_authorizes_nothing() {
        let (server, _listener) = built_with(&["--cors-origins", "https://app.example"]).await;
        let (node, dev) = (server.node(), tokens(&server));
        let body = r#"{"broadcast":true,"data":"x"}"#;
        let with_cookie = |origin: &str, path: &str, token: &str| {
            let method = if path == "/api/publish" { "POST" } else { "GET" };
            axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("origin", origin)
                .header("cookie", format!("other=1; sse_token={token}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .expect("request")
        };
        let (status, answer) =
            ask(node, with_cookie("http://evil.example", "/api/publish", &dev.publisher_token)).await;
        assert_eq!((status, answer["error"].as_str()), (403, Some("origin_not_allowed")));
        let (status, answer) = ask(node, with_cookie("http://evil.example", "/api/stats", &dev.admin_token)).await;
        assert_eq!((status, answer["error"].as_str()), (403, Some("origin_not_allowed")));
        let (status, _) = ask(node, with_cookie("https://app.example", "/api/stats", &dev.admin_token)).await;
        assert_eq!(status, 200, "the allowed origin's cookie still works");
        // A bearer token is set by the page itself: the origin rule of CORS is the browser's.
        let mut bearer = publish(&dev.publisher_token, body);
        bearer.headers_mut().insert("origin", axum::http::HeaderValue::from_static("http://evil.example"));
        assert_eq!(ask(node, bearer).await.0, 202);
    }

    #[tokio::test]
    async fn publish_takes_only_a_bearer_token_and_a_json_body() {
        let (server, _listener) = built_with(&["--cors-origins", "https://app.example"]).await;
        let (node, dev) = (server.node(), tokens(&server));
        let body = r#"{"broadcast":true,"data":"x"}"#;
        let post = |uri: String, headers: &[(&str, String)]| {
            let mut request = axum::http::Request::post(uri);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            request.body(axum::body::Body::from(body)).expect("request")
        };
        let json = ("content-type", "application/json".to_owned());
        let cookie = ("cookie", format!("sse_token={}", dev.publisher_token));
        let same_site = ("origin", "https://app.example".to_owned());
        let (status, answer) = ask(node, post("/api/publish".into(), &[json.clone(), cookie, same_site])).await;
        assert_eq!((status, answer["error"].as_str()), (401, Some("bearer_required")), "a cookie never publishes");
        let query = format!("/api/publish?access_token={}", dev.publisher_token);
        let (status, answer) = ask(node, post(query, std::slice::from_ref(&json))).await;
        assert_eq!((status, answer["error"].as_str()), (401, Some("bearer_required")), "nor a query token");
        let bearer = ("authorization", format!("Bearer {}", dev.publisher_token));
        let plain = ("content-type", "text/plain".to_owned());
        let (status, answer) = ask(node, post("/api/publish".into(), &[bearer.clone(), plain])).await;
        assert_eq!((status, answer["error"].as_str()), (415, Some("unsupported_media_type")));
        let (status, answer) = ask(node, post("/api/publish".into(), std::slice::from_ref(&bearer))).await;
        assert_eq!((status, answer["error"].as_str()), (415, Some("unsupported_media_type")), "no content type");
        assert_eq!(ask(node, post("/api/publish".into(), &[bearer, json])).await.0, 202);
    }
}
