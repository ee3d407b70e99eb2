//! Every setting of a node: its flag, its `SSE_*` environment variable, its default and
//! its validation. Nothing else in the crate reads the environment; the rest of the code
//! receives the typed [`Config`] this module produces.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use std::ffi::OsString;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

/// A push server for Server-Sent Events, fanned out over Redis pub/sub.
#[derive(Debug, Parser)]
#[command(name = "sse-fanout", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments. Without a subcommand the node runs: `sse-fanout
    /// --listen …` means `sse-fanout serve --listen …`. The node's settings belong to `serve`
    /// alone, so another subcommand never reads (nor fails on) an `SSE_*` variable of the node.
    pub fn from_args() -> Self {
        Self::parse_from(with_default_command(std::env::args_os()))
    }
}

/// Inserts `serve` when the first argument is not a subcommand.
pub fn with_default_command(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    // The subcommands clap knows (its generated `help` included), not a list kept by hand.
    let command = <Cli as clap::CommandFactory>::command();
    let named =
        args.get(1).and_then(|a| a.to_str()).is_some_and(|a| a == "help" || command.find_subcommand(a).is_some());
    if !named {
        args.insert(1.min(args.len()), OsString::from("serve"));
    }
    args
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node (the default when no subcommand is given).
    Serve(Box<Config>),
    /// Check a stream end to end through the proxies in front of the nodes: headers,
    /// buffering, probe latency, heartbeats, idle cuts. Exit 0 clean, 1 on any FAIL.
    Doctor(DoctorArgs),
}

/// What `sse-fanout doctor` checks and with which tokens. It speaks HTTP/1.1, over TLS for
/// https:// URLs (and then also reports whether the edge offers browsers HTTP/2).
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The stream URL, e.g. `http://127.0.0.1:8080/events?topic=news` or `https://edge.example/events`.
    pub url: String,

    /// Subscriber token (JWT), sent as `Authorization: Bearer`. Its `sub` (read without
    /// verifying) is the user the probe is published to.
    #[arg(long, env = "SSE_DOCTOR_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Token with role `publisher` or `admin` for the probe. Without it the probe is skipped (WARN).
    #[arg(long, env = "SSE_DOCTOR_PUBLISHER_TOKEN", hide_env_values = true)]
    pub publisher_token: Option<String>,

    /// Where to `POST` the probe. Default: the stream URL's origin + `/api/publish`.
    #[arg(long)]
    pub publish_url: Option<String>,

    /// How long to wait for a `: ping` heartbeat after `connected` (above SSE_HEARTBEAT_INTERVAL). 0: skip.
    #[arg(long, default_value = "35s", value_parser = parse_duration)]
    pub heartbeat_wait: Duration,

    /// Also keep the stream open this long (from the request) and report if it is cut before,
    /// e.g. by a proxy idle timeout. Unset: not checked.
    #[arg(long, value_parser = parse_duration)]
    pub idle: Option<Duration>,

    /// For https:// URLs: trust only certificates issued by one in this PEM file (a private CA,
    /// or a self-signed certificate such as `scripts/cluster up --tls` writes) instead of the
    /// system's trust store.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,

    /// For https:// URLs: accept any certificate (encrypted, not authenticated).
    #[arg(long, conflicts_with = "ca_file")]
    pub insecure: bool,
}

/// What a node is configured with. Durations take a unit (`500ms`, `30s`, `5m`, `1h`);
/// a bare number is milliseconds, as in the env files of hand-written SSE modules.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on for HTTP.
    #[arg(long, env = "SSE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Name of this node in `connected` events, logs and metrics. Default: a random `node-xxxxxx`.
    #[arg(long, env = "SSE_NODE_ID")]
    pub node_id: Option<String>,

    /// Redis URL (`redis://host:port/db`, `rediss://` for TLS), a Redis Cluster's seed nodes
    /// (`redis+cluster://host1:port1,host2:port2`, `rediss+cluster://` for TLS), or Redis
    /// Sentinel's sentinels and master name
    /// (`redis+sentinel://[user:password@]host1:port1,host2:port2/<master-name>[/<db>]`, the
    /// credentials and db being the data nodes'; no TLS). Unset: the embedded in-memory bus (a
    /// single node).
    #[arg(long, env = "SSE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// PEM file of the CA certificates a `rediss` Redis's certificate must chain to. Unset: the
    /// system's trusted roots.
    #[arg(long, env = "SSE_REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,

    /// PEM client certificate (chain) shown to a `rediss` Redis that asks for one
    /// (`tls-auth-clients yes`); needs SSE_REDIS_TLS_KEY_FILE.
    #[arg(long, env = "SSE_REDIS_TLS_CERT_FILE", requires = "redis_tls_key_file")]
    pub redis_tls_cert_file: Option<PathBuf>,

    /// PEM private key of SSE_REDIS_TLS_CERT_FILE.
    #[arg(long, env = "SSE_REDIS_TLS_KEY_FILE", requires = "redis_tls_cert_file")]
    pub redis_tls_key_file: Option<PathBuf>,

    /// Prefix of every Redis channel name: `<prefix>:user:<id>`, `<prefix>:topic:<t>`, `<prefix>:broadcast`.
    #[arg(long, env = "SSE_CHANNEL_PREFIX", default_value = "sse")]
    pub channel_prefix: String,

    /// Shared secret for HS256 tokens. With no secret, public key or JWKS URL the node runs in development mode.
    #[arg(long, env = "SSE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Path to a PEM public key for RS256 or ES256 tokens.
    #[arg(long, env = "SSE_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,

    /// URL (http or https) of a JSON Web Key Set to verify RS256/ES256 tokens with, chosen by
    /// their `kid`. Fetched at start, on SSE_JWT_JWKS_REFRESH and on an unknown `kid`.
    #[arg(long, env = "SSE_JWT_JWKS_URL", conflicts_with_all = ["jwt_secret", "jwt_public_key"])]
    pub jwt_jwks_url: Option<String>,

    /// How often the JWKS is fetched again (a failed fetch keeps the keys it had).
    #[arg(long, env = "SSE_JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwt_jwks_refresh: Duration,

    /// Least time between two fetches of the JWKS made for tokens with an unknown `kid`, so a
    /// flood of made-up kids cannot hammer the key server.
    #[arg(long, env = "SSE_JWT_JWKS_MIN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub jwt_jwks_min_interval: Duration,

    /// File the last good JWKS is written to and read at start, so the node verifies tokens
    /// while the key server is down.
    #[arg(long, env = "SSE_JWT_JWKS_CACHE")]
    pub jwt_jwks_cache: Option<PathBuf>,

    /// Token algorithm. `auto`: HS256 with a secret; RS256 or ES256 from the public key's type
    /// (with a JWKS: from each key's type).
    #[arg(long, env = "SSE_JWT_ALGORITHM", value_enum, default_value = "auto")]
    pub jwt_algorithm: JwtAlgorithm,

    /// Clock skew tolerated on `exp` (and `nbf`).
    #[arg(long, env = "SSE_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// How long before its token's `exp` a stream gets `event: token_expiring`, so the page can
    /// renew it (`POST /api/connections/<id>/token`) without dropping the stream. 0 or `off`: no warning.
    #[arg(long, env = "SSE_TOKEN_EXPIRY_WARNING", default_value = "60s", value_parser = parse_duration_or_off)]
    pub token_expiry_warning: Duration,

    /// Required `iss` claim, if set.
    #[arg(long, env = "SSE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, if set.
    #[arg(long, env = "SSE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Interval between `: ping` comments on every stream. 0 turns them off.
    #[arg(long, env = "SSE_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Reconnection delay sent once to each client as `retry:`.
    #[arg(long, env = "SSE_RETRY_INTERVAL", default_value = "3s", value_parser = parse_duration)]
    pub retry_interval: Duration,

    /// Open streams one user may hold on this node. 0: no limit. Generous by default: a browser
    /// never retries a refused stream, so a user's extra tab would silently receive nothing.
    #[arg(long, env = "SSE_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// What a connection beyond the per-user limit does: be refused (429), or evict the user's oldest stream.
    #[arg(long, env = "SSE_PER_USER_POLICY", value_enum, default_value = "reject")]
    pub per_user_policy: PerUserPolicy,

    /// Open streams this node accepts before answering 503. 0: no limit (the open-file limit still applies).
    #[arg(long, env = "SSE_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Close a stream that has delivered no event for this long (heartbeats do not count). 0: off.
    #[arg(long, env = "SSE_CONNECTION_TIMEOUT", default_value = "0", value_parser = parse_duration)]
    pub connection_timeout: Duration,

    /// Close every stream after this long, so clients reconnect (rebalancing, fresh tokens). 0: off.
    #[arg(long, env = "SSE_MAX_CONNECTION_LIFETIME", default_value = "0", value_parser = parse_duration)]
    pub max_connection_lifetime: Duration,

    /// Frames a stream may have queued before it is cut off as a slow consumer.
    #[arg(long, env = "SSE_QUEUE_CAPACITY", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Bytes of events a stream may have waiting (its queue, and the rest of an event its socket
    /// took only part of) before it is cut off as a slow consumer. Plain bytes, or with a `KiB`
    /// or `MiB` suffix. An event is never refused by an empty queue, and a resume's replay does
    /// not count against it.
    #[arg(long, env = "SSE_QUEUE_MAX_BYTES", default_value = "1MiB", value_parser = parse_queue_bytes)]
    pub queue_max_bytes: u32,

    /// A stream whose socket takes no byte for this long is dropped: its client stopped reading
    /// with something left to write. At least 1s.
    #[arg(long, env = "SSE_WRITE_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_stall_timeout: Duration,

    /// gzip event streams for clients that send `Accept-Encoding: gzip`. Each event is compressed
    /// once and the same bytes go to every such stream; a stream keeps only its trailer's CRC.
    #[arg(long, env = "SSE_ENABLE_COMPRESSION", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_compression: bool,

    /// Events (framed, in bytes) smaller than this go to gzip streams as stored blocks, not
    /// deflated: compressed on its own, a small event barely shrinks.
    #[arg(long, env = "SSE_COMPRESSION_MIN_SIZE", default_value_t = 512)]
    pub compression_min_size: u32,

    /// Largest accepted body of `POST /api/publish`, in bytes. The default takes a 64 KiB `data`
    /// string even when every character needs a JSON escape (`\"`, `\\`: twice the bytes), plus
    /// the envelope and targets.
    #[arg(long, env = "SSE_MAX_PUBLISH_BYTES", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(64..))]
    pub max_publish_bytes: u32,

    /// Query parameters a token is read from, in this order (comma-separated; empty: none).
    #[arg(long, env = "SSE_TOKEN_QUERY_PARAMS", value_delimiter = ',', default_value = "access_token,token")]
    pub token_query_params: Vec<String>,

    /// Cookies a token is read from, in this order (comma-separated; empty: none).
    #[arg(long, env = "SSE_TOKEN_COOKIES", value_delimiter = ',', default_value = "sse_token,access_token")]
    pub token_cookies: Vec<String>,

    /// A token in the query string must carry a `jti` and is accepted once, cluster-wide (kept
    /// in Redis until the token expires); a replay is 401 `token_replayed`. Query strings end up
    /// in proxy logs: a logged one-time token is worthless. Headers and cookies are unaffected.
    #[arg(long, env = "SSE_SINGLE_USE_QUERY_TOKENS", default_value_t = false, action = clap::ArgAction::Set)]
    pub single_use_query_tokens: bool,

    /// URL (http or https) of your backend's connect authorization hook: on every stream open,
    /// after the token verified, the node POSTs `{"user", "topics", "claims", "ip"}` there and
    /// the answer allows, denies (its status and reason reach the client) or narrows the topics.
    /// Unset: no hook, the token alone decides. Credentials may go in the URL (basic auth).
    #[arg(long, env = "SSE_AUTH_HOOK_URL", hide_env_values = true)]
    pub auth_hook_url: Option<String>,

    /// How long a stream open waits for the hook's answer, connecting included (10ms-60s).
    #[arg(long, env = "SSE_AUTH_HOOK_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub auth_hook_timeout: Duration,

    /// How long the hook's answer for the same user, topics, address and claims (times aside)
    /// is reused without asking again. 0: ask on every stream open.
    #[arg(long, env = "SSE_AUTH_HOOK_CACHE", default_value = "10s", value_parser = parse_duration)]
    pub auth_hook_cache: Duration,

    /// When the hook fails (timeout, unreachable, 5xx, an answer not understood): `false` refuses
    /// the stream with 503 `auth_hook_unavailable`; `true` opens it with the token's grants and
    /// logs a warning (at most once a second).
    #[arg(long, env = "SSE_AUTH_HOOK_FAIL_OPEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_hook_fail_open: bool,

    /// Origins allowed to open streams and call the API from a browser (comma-separated, or `*`).
    /// Empty: no CORS headers; same-origin only.
    #[arg(long, env = "SSE_CORS_ORIGINS", value_delimiter = ',', default_value = "")]
    pub cors_origins: Vec<String>,

    /// With Redis: how long a node's presence entries outlive it. A node renews its lease every
    /// third of this; a node that dies is cleaned up by the others once it lapses.
    #[arg(long, env = "SSE_PRESENCE_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub presence_lease: Duration,

    /// With Redis: append each user's `online`/`offline` transitions (cluster-wide, per user,
    /// not per stream) to the Redis stream `<prefix>:presence:events` for backends.
    #[arg(long, env = "SSE_PRESENCE_EVENTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub presence_events: bool,

    /// A user whose last stream closed is written `offline` only after staying away this long;
    /// coming back within it writes nothing (a reconnect, a reload, a node's drain).
    #[arg(long, env = "SSE_PRESENCE_EVENTS_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub presence_events_delay: Duration,

    /// Entries the presence events stream keeps (older ones are trimmed).
    #[arg(long, env = "SSE_PRESENCE_EVENTS_MAXLEN", default_value_t = 100_000)]
    pub presence_events_maxlen: u64,

    /// On SIGTERM, close streams in batches spread over this period, then exit.
    #[arg(long, env = "SSE_DRAIN_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub drain_period: Duration,

    /// Record durable publishes in a bounded per-channel history so clients resume with `Last-Event-ID`.
    #[arg(long, env = "SSE_HISTORY", default_value_t = true, action = clap::ArgAction::Set)]
    pub history: bool,

    /// Entries kept per user channel.
    #[arg(long, env = "SSE_HISTORY_USER_LENGTH", default_value_t = 100)]
    pub history_user_length: u32,

    /// Age after which user-channel entries are dropped (0: no age limit).
    #[arg(long, env = "SSE_HISTORY_USER_AGE", default_value = "1h", value_parser = parse_duration)]
    pub history_user_age: Duration,

    /// Entries kept per topic channel.
    #[arg(long, env = "SSE_HISTORY_TOPIC_LENGTH", default_value_t = 1000)]
    pub history_topic_length: u32,

    /// Age after which topic entries are dropped (0: no age limit).
    #[arg(long, env = "SSE_HISTORY_TOPIC_AGE", default_value = "1h", value_parser = parse_duration)]
    pub history_topic_age: Duration,

    /// Entries kept on the broadcast channel.
    #[arg(long, env = "SSE_HISTORY_BROADCAST_LENGTH", default_value_t = 1000)]
    pub history_broadcast_length: u32,

    /// Age after which broadcast entries are dropped (0: no age limit).
    #[arg(long, env = "SSE_HISTORY_BROADCAST_AGE", default_value = "1h", value_parser = parse_duration)]
    pub history_broadcast_age: Duration,

    /// Time a client has to send a whole request, head and body, from the moment its connection
    /// is accepted (on a kept-alive connection: each further head, idle time included, and then
    /// its body). An event stream's request head is timed too; the stream itself is not.
    #[arg(long, env = "SSE_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Connections that have not yet sent a complete, authenticated request. When they are this
    /// many, the oldest that has waited over a second with nothing unread makes room for a new
    /// one; until then new connections wait to be accepted. Unset: a quarter of the open-file
    /// limit. 0: no bound.
    #[arg(long, env = "SSE_MAX_PENDING_CONNECTIONS")]
    pub max_pending_connections: Option<usize>,

    /// Stream opens per minute from one client address (an IPv4 address or an IPv6 /64), beyond
    /// which `GET /events` answers 429 `rate_limited`. 0: no limit.
    #[arg(long, env = "SSE_IP_OPEN_RATE", default_value_t = 600)]
    pub ip_open_rate: u32,

    /// Stream opens one client address may make at once before SSE_IP_OPEN_RATE paces it.
    #[arg(long, env = "SSE_IP_OPEN_BURST", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub ip_open_burst: u32,

    /// Open streams one client address may hold on this node, beyond which `GET /events` answers
    /// 429 `too_many_streams`. 0: no limit.
    #[arg(long, env = "SSE_IP_MAX_STREAMS", default_value_t = 1000)]
    pub ip_max_streams: u32,

    /// Proxies (comma-separated addresses or CIDR ranges) whose `X-Forwarded-For` names the
    /// client. Empty: the TCP peer is the client and `X-Forwarded-For` is ignored.
    #[arg(long, env = "SSE_TRUSTED_PROXIES", default_value = "", value_parser = parse_trusted_proxies)]
    pub trusted_proxies: TrustedProxies,

    /// Most history entries one read from Redis returns (a resume or backfill reads page by page;
    /// `/api/history` answers one page).
    #[arg(long, env = "SSE_HISTORY_PAGE_ENTRIES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub history_page_entries: u32,

    /// Most payload bytes one read from Redis returns (a larger entry comes alone). A node keeps
    /// about 2 MiB of history reads in flight, so this also sets how many run at once.
    #[arg(long, env = "SSE_HISTORY_PAGE_BYTES", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1024..))]
    pub history_page_bytes: u32,

    /// Most history entries one (re)connecting stream is replayed; channels still behind past it
    /// get `reset` `window_lost` and continue from their current end.
    #[arg(long, env = "SSE_HISTORY_MAX_REPLAY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub history_max_replay: u32,

    /// How often the node publishes a probe to its own canary channel and times its way back
    /// through the bus, its subscriber and its dispatcher (the path of every client message).
    /// 0: off (then `/readyz` does not prove delivery).
    #[arg(long, env = "SSE_CANARY_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub canary_interval: Duration,

    /// `/readyz` answers 503 `canary_stalled` when a probe has been out this long, or the last
    /// one took longer than this to come back. At least 100ms.
    #[arg(long, env = "SSE_CANARY_THRESHOLD", default_value = "5s", value_parser = parse_duration)]
    pub canary_threshold: Duration,

    /// Log format.
    #[arg(long, env = "SSE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (`info`, `debug`, `sse_fanout=debug,info`, ...).
    #[arg(long, env = "SSE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// OpenTelemetry: base URL of an OTLP/HTTP collector (`http://collector:4318`); traces go to
    /// `<url>/v1/traces`. Unset (and no traces endpoint): no spans are exported nor built.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<String>,

    /// OpenTelemetry: full URL traces are posted to, used as is; wins over OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otel_traces_endpoint: Option<String>,

    /// OpenTelemetry: OTLP protocol; only `http/protobuf` is built in (checked only when traces are on).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "http/protobuf")]
    pub otel_protocol: String,

    /// OpenTelemetry: OTLP protocol for traces; wins over OTEL_EXPORTER_OTLP_PROTOCOL.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")]
    pub otel_traces_protocol: Option<String>,

    /// OpenTelemetry: `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "sse-fanout")]
    pub otel_service_name: String,

    /// OpenTelemetry: sampler (`parentbased_always_on`, `parentbased_traceidratio`,
    /// `traceidratio`, `always_on`, `always_off`, `parentbased_always_off`).
    #[arg(long, env = "OTEL_TRACES_SAMPLER", default_value = "parentbased_always_on")]
    pub otel_traces_sampler: String,

    /// OpenTelemetry: the ratio (0.0-1.0) of the `*traceidratio` samplers. Default 1.0.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,

    /// OpenTelemetry: `true` turns tracing off whatever the endpoint says.
    #[arg(long, env = "OTEL_SDK_DISABLED", default_value = "false")]
    pub otel_sdk_disabled: String,
}

/// Where and how spans are exported, once [`Config::traces`] found tracing on and valid.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The URL spans are posted to (OTLP/HTTP with protobuf bodies).
    pub url: String,
    pub service_name: String,
    pub sampler: TraceSampler,
}

/// `OTEL_TRACES_SAMPLER` (with its ratio): which traces are kept. `ParentBased` samplers follow
/// the decision of an incoming `traceparent` and apply the inner rule only to new traces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedRatio(f64),
}

/// `SSE_TRUSTED_PROXIES`: the networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Whether `address` (IPv4-mapped IPv6 read as IPv4) is one of the proxies.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|network| network.contains(&address))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Comma-separated addresses (`10.0.0.5`, `::1`) and CIDR ranges (`10.0.0.0/8`); empty entries
/// (a trailing comma, an empty variable) are skipped.
fn parse_trusted_proxies(s: &str) -> Result<TrustedProxies, String> {
    let mut networks = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let network = match (entry.parse::<IpNet>(), entry.parse::<IpAddr>()) {
            (Ok(network), _) => network.trunc(),
            (_, Ok(address)) => IpNet::from(address.to_canonical()),
            _ => {
                return Err(format!(
                    "SSE_TRUSTED_PROXIES entry {entry:?} is not an IP address or a CIDR range like 10.0.0.0/8"
                ));
            }
        };
        networks.push(network);
    }
    Ok(TrustedProxies(networks))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    Auto,
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PerUserPolicy {
    Reject,
    EvictOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting that parses but cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("SSE_CHANNEL_PREFIX must be 1-64 characters without whitespace or control characters")]
    ChannelPrefix,
    #[error("SSE_NODE_ID must be 1-64 characters of letters, digits, '-', '_' or '.'")]
    NodeId,
    #[error("SSE_JWT_ALGORITHM={0} needs {1}")]
    AlgorithmNeedsKey(&'static str, &'static str),
    #[error("SSE_JWT_JWKS_URL is not an http:// or https:// URL")]
    JwksUrl,
    #[error("SSE_JWT_JWKS_REFRESH and SSE_JWT_JWKS_MIN_INTERVAL must be at least 1s")]
    JwksIntervalTooShort,
    #[error("SSE_AUTH_HOOK_URL is not an http:// or https:// URL")]
    AuthHookUrl,
    #[error("SSE_AUTH_HOOK_TIMEOUT must be from 10ms to 60s")]
    AuthHookTimeout,
    #[error(
        "SSE_REDIS_URL is not a redis:// or rediss:// URL, a redis+cluster:// or rediss+cluster://host:port,host:port URL, or a redis+sentinel://host:port,host:port/<master-name> URL"
    )]
    RedisUrl,
    #[error("SSE_REDIS_TLS_* apply to TLS connections only: SSE_REDIS_URL must be rediss:// or rediss+cluster://")]
    RedisTlsWithoutTls,
    #[error("SSE_CHANNEL_PREFIX must not contain '{{' or '}}' with a Redis Cluster (the braces are the hash tag)")]
    ClusterPrefix,
    #[error("SSE_PRESENCE_LEASE must be at least 1s")]
    PresenceLeaseTooShort,
    #[error("SSE_PRESENCE_EVENTS needs SSE_REDIS_URL (the events are a Redis stream)")]
    PresenceEventsWithoutRedis,
    #[error("SSE_PRESENCE_EVENTS is not available on a Redis Cluster yet (presence is node-local there)")]
    PresenceEventsOnCluster,
    #[error("SSE_PRESENCE_EVENTS_MAXLEN must be at least 1")]
    PresenceEventsMaxlen,
    #[error("SSE_CORS_ORIGINS entry {0:?} is not `*` or an origin like https://app.example.com")]
    CorsOrigin(String),
    #[error("SSE_HEARTBEAT_INTERVAL must be at least 1s (or 0 to turn heartbeats off)")]
    HeartbeatTooShort,
    #[error("SSE_HISTORY_*_LENGTH must be at least 1")]
    HistoryLength,
    #[error("SSE_REQUEST_TIMEOUT must be at least 100ms")]
    RequestTimeoutTooShort,
    #[error("SSE_WRITE_STALL_TIMEOUT must be at least 1s")]
    WriteStallTooShort,
    #[error(
        "SSE_CANARY_INTERVAL and SSE_CANARY_THRESHOLD must be at least 100ms (SSE_CANARY_INTERVAL=0 turns the canary off)"
    )]
    CanaryTooShort,
    #[error("{0} entry {1:?} is not a name of 1-64 letters, digits, '_', '-' or '.'")]
    TokenName(&'static str, String),
    #[error("{0}={1:?} is not an http:// or https:// URL")]
    OtelEndpoint(&'static str, String),
    #[error("{0}={1:?}: this node exports traces over OTLP/HTTP only; use http/protobuf (port 4318 on a collector)")]
    OtelProtocol(&'static str, String),
    #[error(
        "OTEL_TRACES_SAMPLER={0:?} is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
    )]
    OtelSampler(String),
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?} is not a ratio from 0.0 to 1.0")]
    OtelSamplerArg(String),
    #[error("OTEL_SDK_DISABLED={0:?} is not true or false")]
    OtelDisabled(String),
}

impl Config {
    /// Checks what clap's types cannot: relations between settings and the shape of strings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.channel_prefix;
        if p.is_empty() || p.len() > 64 || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::ChannelPrefix);
        }
        if let Some(id) = &self.node_id
            && !is_plain_name(id)
        {
            return Err(ConfigError::NodeId);
        }
        if let Some(url) = &self.jwt_jwks_url {
            let parsed = reqwest::Url::parse(url).map_err(|_| ConfigError::JwksUrl)?;
            if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
                return Err(ConfigError::JwksUrl);
            }
            if self.jwt_jwks_refresh < Duration::from_secs(1) || self.jwt_jwks_min_interval < Duration::from_secs(1) {
                return Err(ConfigError::JwksIntervalTooShort);
            }
        }
        if let Some(url) = &self.auth_hook_url {
            let parsed = reqwest::Url::parse(url).map_err(|_| ConfigError::AuthHookUrl)?;
            if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
                return Err(ConfigError::AuthHookUrl);
            }
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.auth_hook_timeout) {
            return Err(ConfigError::AuthHookTimeout);
        }
        let asymmetric = self.jwt_public_key.is_some() || self.jwt_jwks_url.is_some();
        match self.jwt_algorithm {
            JwtAlgorithm::Hs256 if self.jwt_secret.is_none() && asymmetric => {
                return Err(ConfigError::AlgorithmNeedsKey("HS256", "SSE_JWT_SECRET"));
            }
            JwtAlgorithm::Rs256 if !asymmetric && self.jwt_secret.is_some() => {
                return Err(ConfigError::AlgorithmNeedsKey("RS256", "SSE_JWT_PUBLIC_KEY or SSE_JWT_JWKS_URL"));
            }
            JwtAlgorithm::Es256 if !asymmetric && self.jwt_secret.is_some() => {
                return Err(ConfigError::AlgorithmNeedsKey("ES256", "SSE_JWT_PUBLIC_KEY or SSE_JWT_JWKS_URL"));
            }
            _ => {}
        }
        if self.presence_lease < Duration::from_secs(1) {
            return Err(ConfigError::PresenceLeaseTooShort);
        }
        if self.presence_events && self.redis_url.is_none() {
            return Err(ConfigError::PresenceEventsWithoutRedis);
        }
        if self.presence_events && self.redis_url.as_deref().is_some_and(crate::bus::cluster::is_cluster_url) {
            return Err(ConfigError::PresenceEventsOnCluster);
        }
        if self.presence_events_maxlen == 0 {
            return Err(ConfigError::PresenceEventsMaxlen);
        }
        let tls_files = self.redis_tls_ca_file.is_some() || self.redis_tls_cert_file.is_some();
        if tls_files && !self.redis_url.as_deref().is_some_and(crate::redis_tls::is_tls_url) {
            return Err(ConfigError::RedisTlsWithoutTls);
        }
        if let Some(url) = &self.redis_url {
            if crate::bus::cluster::is_cluster_url(url) {
                crate::bus::cluster::seeds(url).map_err(|_| ConfigError::RedisUrl)?;
                // Every key and channel of a channel is `{<channel>}`: a brace in the prefix would
                // move the hash tag (and `{}` would hash stream and epoch apart).
                if p.contains(['{', '}']) {
                    return Err(ConfigError::ClusterPrefix);
                }
            } else if url.starts_with(crate::bus::sentinel::SCHEME) {
                crate::bus::sentinel::parse(url).map_err(|_| ConfigError::RedisUrl)?;
            } else if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::RedisUrl);
            }
        }
        for (setting, names) in
            [("SSE_TOKEN_QUERY_PARAMS", self.token_query_params()), ("SSE_TOKEN_COOKIES", self.token_cookies())]
        {
            if let Some(bad) = names.iter().find(|name| !is_plain_name(name)) {
                return Err(ConfigError::TokenName(setting, (*bad).to_owned()));
            }
        }
        for origin in self.cors_origins() {
            if origin != "*" && !is_origin(origin) {
                return Err(ConfigError::CorsOrigin(origin.to_owned()));
            }
        }
        if !self.heartbeat_interval.is_zero() && self.heartbeat_interval < Duration::from_secs(1) {
            return Err(ConfigError::HeartbeatTooShort);
        }
        if [self.history_user_length, self.history_topic_length, self.history_broadcast_length].contains(&0) {
            return Err(ConfigError::HistoryLength);
        }
        if self.request_timeout < Duration::from_millis(100) {
            return Err(ConfigError::RequestTimeoutTooShort);
        }
        if self.write_stall_timeout < Duration::from_secs(1) {
            return Err(ConfigError::WriteStallTooShort);
        }
        let least = Duration::from_millis(100);
        if !self.canary_interval.is_zero() && (self.canary_interval < least || self.canary_threshold < least) {
            return Err(ConfigError::CanaryTooShort);
        }
        self.traces()?;
        Ok(())
    }

    /// The trace export settings, `None` when tracing is off: no OTLP endpoint is set, or
    /// `OTEL_SDK_DISABLED=true`. The other `OTEL_*` settings are checked only when it is on, so a
    /// variable meant for other services (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`) does not stop a
    /// node that exports nothing. Endpoint rules are the OTLP exporter specification's: the
    /// traces endpoint is used as is, the base endpoint gets `/v1/traces` appended.
    pub fn traces(&self) -> Result<Option<TraceSettings>, ConfigError> {
        let disabled = match self.otel_sdk_disabled.trim().to_ascii_lowercase().as_str() {
            "" | "false" => false,
            "true" => true,
            _ => return Err(ConfigError::OtelDisabled(self.otel_sdk_disabled.clone())),
        };
        let url = match (&self.otel_traces_endpoint, &self.otel_endpoint) {
            _ if disabled => return Ok(None),
            (Some(url), _) => checked_otel_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)?.to_owned(),
            (None, Some(base)) => {
                format!("{}/v1/traces", checked_otel_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)?.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        let (variable, protocol) = match &self.otel_traces_protocol {
            Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol),
            None => ("OTEL_EXPORTER_OTLP_PROTOCOL", &self.otel_protocol),
        };
        if protocol.trim() != "http/protobuf" {
            return Err(ConfigError::OtelProtocol(variable, protocol.clone()));
        }
        let ratio = || -> Result<f64, ConfigError> {
            let Some(arg) = &self.otel_traces_sampler_arg else { return Ok(1.0) };
            arg.trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| ConfigError::OtelSamplerArg(arg.clone()))
        };
        let sampler = match self.otel_traces_sampler.trim() {
            "always_on" => TraceSampler::AlwaysOn,
            "always_off" => TraceSampler::AlwaysOff,
            "traceidratio" => TraceSampler::Ratio(ratio()?),
            "parentbased_always_on" => TraceSampler::ParentBasedAlwaysOn,
            "parentbased_always_off" => TraceSampler::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => TraceSampler::ParentBasedRatio(ratio()?),
            other => return Err(ConfigError::OtelSampler(other.to_owned())),
        };
        Ok(Some(TraceSettings { url, service_name: self.otel_service_name.clone(), sampler }))
    }

    /// The query parameters a token is read from, without empty entries.
    pub fn token_query_params(&self) -> Vec<&str> {
        self.token_query_params.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect()
    }

    /// The cookies a token is read from, without empty entries.
    pub fn token_cookies(&self) -> Vec<&str> {
        self.token_cookies.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect()
    }

    /// Configured origins without the empty entries a trailing comma or an empty variable leaves.
    pub fn cors_origins(&self) -> impl Iterator<Item = &str> {
        self.cors_origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty())
    }

    /// The TLS settings for Redis, their files read (a `rediss` URL only).
    pub fn redis_tls(&self) -> Result<crate::redis_tls::RedisTls, crate::redis_tls::RedisTlsError> {
        crate::redis_tls::RedisTls::load(
            self.redis_url.as_deref(),
            self.redis_tls_ca_file.as_deref(),
            self.redis_tls_cert_file.as_deref().zip(self.redis_tls_key_file.as_deref()),
        )
    }

    /// History retention per channel kind, or `None` when history is off.
    pub fn history(&self) -> Option<crate::history::HistoryConfig> {
        use crate::history::{HistoryConfig, Retention};
        self.history.then_some(HistoryConfig {
            user: Retention { length: self.history_user_length, age: self.history_user_age },
            topic: Retention { length: self.history_topic_length, age: self.history_topic_age },
            broadcast: Retention { length: self.history_broadcast_length, age: self.history_broadcast_age },
        })
    }

    /// How resumes read history: page bounds and the most one stream is replayed.
    pub fn replay_limits(&self) -> crate::history::ReplayLimits {
        use crate::history::{Page, ReplayLimits};
        ReplayLimits {
            page: Page { entries: self.history_page_entries, bytes: self.history_page_bytes, strict: false },
            max_replay: self.history_max_replay,
        }
    }

    /// Development mode: no key configured, so the node makes up a secret and prints tokens.
    pub fn is_development(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none() && self.jwt_jwks_url.is_none()
    }
}

/// `url` when it is an http:// or https:// URL with a host, else the error naming `variable`.
fn checked_otel_url<'a>(variable: &'static str, url: &'a str) -> Result<&'a str, ConfigError> {
    let url = url.trim();
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => Ok(url),
        _ => Err(ConfigError::OtelEndpoint(variable, url.to_owned())),
    }
}

/// 1-64 letters, digits, `-`, `_` or `.`: a node id, a token parameter or cookie name.
fn is_plain_name(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_origin(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1.5s`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 30s, 5m, 1h, or milliseconds)"))?;
    let seconds = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// [`parse_duration`], or `off` for zero: for settings where zero turns a feature off.
pub fn parse_duration_or_off(s: &str) -> Result<Duration, String> {
    if s.trim().eq_ignore_ascii_case("off") { Ok(Duration::ZERO) } else { parse_duration(s) }
}

/// Parses a byte size: a bare number of bytes, or a number with a `KiB` (1024) or `MiB`
/// (1024 * 1024) suffix, with or without a space between. `KB`, `MB`, `k` and the like are
/// refused rather than guessed at: whether they mean 1000 or 1024 differs from tool to tool.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("{s:?} is not a size (examples: 262144, 256KiB, 1MiB)"))?;
    let unit_bytes = match unit.trim_start() {
        "" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use bytes, KiB or MiB)")),
    };
    value.checked_mul(unit_bytes).ok_or_else(|| format!("{s:?} is out of range"))
}

/// `SSE_QUEUE_MAX_BYTES`: a byte size from 1 KiB to 1 GiB. The ceiling keeps a stream's byte
/// count, a `u32` in every stream's state, far from overflowing by the one event that may
/// cross the bound.
fn parse_queue_bytes(s: &str) -> Result<u32, String> {
    const RANGE: std::ops::RangeInclusive<u64> = 1024..=1024 * 1024 * 1024;
    let bytes = parse_byte_size(s)?;
    if !RANGE.contains(&bytes) {
        return Err(format!("{s:?} is outside 1KiB..=1024MiB"));
    }
    u32::try_from(bytes).map_err(|_| format!("{s:?} is out of range"))
}

/// The node's settings from `args` (after the program name), without validating them.
#[cfg(test)]
pub fn config_from(args: &[&str]) -> Config {
    let full = std::iter::once("sse-fanout").chain(args.iter().copied()).map(OsString::from);
    match Cli::parse_from(with_default_command(full)).command {
        Command::Serve(config) => *config,
        Command::Doctor(_) => panic!("not the node's arguments"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["sse-fanout"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(with_default_command(full.into_iter().map(OsString::from)))
            .map_err(|e| e.to_string())?;
        let Command::Serve(config) = cli.command else { return Err("not serve".into()) };
        config.validate().map_err(|e| e.to_string())?;
        Ok(*config)
    }

    #[test]
    fn durations_take_units_and_bare_numbers_are_milliseconds() {
        assert_eq!(parse_duration("30000"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("1e400s").is_err());
    }

    #[test]
    fn the_expiry_warning_defaults_to_a_minute_and_zero_or_off_turn_it_off() {
        assert_eq!(parse(&[]).expect("defaults are valid").token_expiry_warning, Duration::from_secs(60));
        let warning = |value: &str| parse(&["--token-expiry-warning", value]).map(|c| c.token_expiry_warning);
        assert_eq!(warning("90000"), Ok(Duration::from_secs(90)), "a bare number is milliseconds");
        assert_eq!(warning("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(warning("0"), Ok(Duration::ZERO));
        assert_eq!(warning("off"), Ok(Duration::ZERO));
        assert_eq!(warning("OFF"), Ok(Duration::ZERO));
        assert!(warning("soon").unwrap_err().contains("--token-expiry-warning"));
    }

    #[test]
    fn traces_are_off_without_an_endpoint_and_follow_the_otlp_endpoint_rules() {
        let traces = |args: &[&str]| parse(args).map(|c| c.traces().expect("checked by validate"));
        assert_eq!(traces(&[]), Ok(None));
        // Other OTEL_* settings are not even checked while tracing is off.
        assert_eq!(traces(&["--otel-protocol", "grpc", "--otel-traces-sampler", "x"]), Ok(None));
        let on = traces(&["--otel-endpoint", "http://collector:4318"]).expect("valid").expect("on");
        assert_eq!(on.url, "http://collector:4318/v1/traces");
        assert_eq!((on.service_name.as_str(), on.sampler), ("sse-fanout", TraceSampler::ParentBasedAlwaysOn));
        let url = |args: &[&str]| traces(args).expect("valid").expect("on").url;
        assert_eq!(url(&["--otel-endpoint", "https://c.example/otlp/"]), "https://c.example/otlp/v1/traces");
        assert_eq!(
            url(&["--otel-endpoint", "http://a:4318", "--otel-traces-endpoint", "http://b:9/custom"]),
            "http://b:9/custom",
            "the traces endpoint is used as is and wins"
        );
        assert_eq!(traces(&["--otel-endpoint", "http://a:4318", "--otel-sdk-disabled", "true"]), Ok(None));
        for (args, named) in [
            (&["--otel-endpoint", "collector:4318"][..], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (&["--otel-traces-endpoint", "ftp://c/x"][..], "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            (&["--otel-endpoint", "http://c:4317", "--otel-protocol", "grpc"][..], "OTEL_EXPORTER_OTLP_PROTOCOL"),
            (
                &["--otel-endpoint", "http://c", "--otel-traces-protocol", "http/json"][..],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            ),
            (&["--otel-endpoint", "http://c", "--otel-traces-sampler", "jaeger_remote"][..], "OTEL_TRACES_SAMPLER"),
            (
                &[
                    "--otel-endpoint",
                    "http://c",
                    "--otel-traces-sampler",
                    "traceidratio",
                    "--otel-traces-sampler-arg",
                    "1.5",
                ][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (&["--otel-sdk-disabled", "maybe"][..], "OTEL_SDK_DISABLED"),
        ] {
            let error = parse(args).expect_err(named);
            assert!(error.contains(named), "{args:?}: {error}");
        }
        let sampler = |name: &str, arg: &str| {
            let args = ["--otel-endpoint", "http://c", "--otel-traces-sampler", name, "--otel-traces-sampler-arg", arg];
            traces(&args).expect("valid").expect("on").sampler
        };
        assert_eq!(sampler("traceidratio", "0.25"), TraceSampler::Ratio(0.25));
        assert_eq!(sampler("parentbased_traceidratio", "0"), TraceSampler::ParentBasedRatio(0.0));
        assert_eq!(sampler("always_off", "junk is ignored"), TraceSampler::AlwaysOff);
    }

    #[test]
    fn sizes_are_bytes_kib_or_mib() {
        assert_eq!(parse_byte_size("262144"), Ok(262_144));
        assert_eq!(parse_byte_size("256KiB"), Ok(262_144));
        assert_eq!(parse_byte_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_byte_size(" 2 MiB "), Ok(2 * 1_048_576));
        assert_eq!(parse_byte_size("0"), Ok(0));
        for junk in ["", "MiB", "1.5MiB", "-1", "1KB", "1MB", "1k", "1M", "1mib", "1GiB", "1 MiB x", "ten"] {
            assert!(parse_byte_size(junk).is_err(), "{junk:?} was accepted");
        }
        assert!(parse_byte_size("99999999999999999999").is_err());
        assert!(parse_byte_size("18446744073709551615MiB").unwrap_err().contains("out of range"));
    }

    #[test]
    fn the_queue_byte_bound_defaults_to_1_mib_and_takes_suffixes() {
        assert_eq!(parse(&[]).expect("defaults are valid").queue_max_bytes, 1024 * 1024);
        assert_eq!(parse(&["--queue-max-bytes", "256KiB"]).expect("valid").queue_max_bytes, 256 * 1024);
        assert_eq!(parse(&["--queue-max-bytes", "4096"]).expect("valid").queue_max_bytes, 4096);
        assert_eq!(parse(&["--queue-max-bytes", "1024MiB"]).expect("valid").queue_max_bytes, 1 << 30);
        for refused in ["1MB", "1.5MiB", "lots", "1023", "1025MiB", "0"] {
            let error = parse(&["--queue-max-bytes", refused]).expect_err(refused);
            assert!(error.contains("--queue-max-bytes"), "the error names the setting: {error}");
        }
    }

    #[test]
    fn the_write_stall_timeout_is_at_least_a_second() {
        assert_eq!(parse(&[]).expect("defaults are valid").write_stall_timeout, Duration::from_secs(30));
        assert_eq!(parse(&["--write-stall-timeout", "2s"]).expect("valid").write_stall_timeout, Duration::from_secs(2));
        assert!(parse(&["--write-stall-timeout", "500ms"]).unwrap_err().contains("SSE_WRITE_STALL_TIMEOUT"));
        assert!(parse(&["--write-stall-timeout", "0"]).is_err());
    }

    #[test]
    fn defaults_are_a_development_node_on_port_8080() {
        let config = parse(&[]).expect("defaults are valid");
        assert_eq!(config.listen.port(), 8080);
        assert!(config.is_development());
        assert!(config.redis_url.is_none());
        assert_eq!(config.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(config.max_connections_per_user, 100);
    }

    #[test]
    fn the_default_publish_limit_takes_a_64_kib_string_of_escapes_and_many_targets() {
        let limit = parse(&[]).expect("defaults are valid").max_publish_bytes as usize;
        let users: Vec<String> = (0..100).map(|i| format!("{i:0>256}")).collect();
        let data = "\"\\".repeat(32 * 1024);
        let body = serde_json::json!({"users": users, "event": "e".repeat(256), "id": "i".repeat(256), "data": data});
        let len = body.to_string().len();
        assert!(len <= limit, "{len} > {limit}");
    }

    #[test]
    fn wrong_values_are_clear_errors() {
        assert!(parse(&["--listen", "nonsense"]).is_err());
        assert!(parse(&["--heartbeat-interval", "10x"]).is_err());
        assert!(parse(&["--heartbeat-interval", "10ms"]).unwrap_err().contains("at least 1s"));
        assert!(parse(&["--redis-url", "localhost:6379"]).unwrap_err().contains("SSE_REDIS_URL"));
        assert!(parse(&["--presence-events", "true"]).unwrap_err().contains("SSE_PRESENCE_EVENTS needs SSE_REDIS_URL"));
        let redis = ["--redis-url", "redis://127.0.0.1:6379", "--presence-events", "true"];
        assert!(parse(&[&redis[..], &["--presence-events-maxlen", "0"]].concat()).unwrap_err().contains("MAXLEN"));
        assert!(parse(&["--redis-url", "redis+cluster://"]).unwrap_err().contains("SSE_REDIS_URL"));
        assert!(parse(&["--redis-url", "redis+cluster://a:1,b"]).unwrap_err().contains("SSE_REDIS_URL"));
        assert!(parse(&["--redis-url", "rediss+cluster://a:1,b:2"]).is_ok());
        assert!(parse(&["--redis-url", "rediss://a:1", "--redis-tls-ca-file", "/ca.pem"]).is_ok());
        assert!(
            parse(&["--redis-url", "redis://a:1", "--redis-tls-ca-file", "/ca.pem"])
                .unwrap_err()
                .contains("SSE_REDIS_TLS_* apply to TLS connections only")
        );
        assert!(parse(&["--redis-tls-ca-file", "/ca.pem"]).unwrap_err().contains("SSE_REDIS_TLS_*"));
        assert!(parse(&["--redis-url", "rediss://a:1", "--redis-tls-cert-file", "/c.pem"]).is_err());
        assert!(parse(&["--redis-url", "redis+cluster://a:1,b:2"]).is_ok());
        assert!(parse(&["--redis-url", "redis+sentinel://a:1,b:2/mymaster"]).is_ok());
        assert!(parse(&["--redis-url", "redis+sentinel://a:1,b:2"]).unwrap_err().contains("SSE_REDIS_URL"));
        assert!(parse(&["--redis-url", "rediss+sentinel://a:1/m"]).unwrap_err().contains("SSE_REDIS_URL"));
        let braces = parse(&["--redis-url", "redis+cluster://a:1", "--channel-prefix", "s{x}"]).unwrap_err();
        assert!(braces.contains("SSE_CHANNEL_PREFIX"), "{braces}");
        assert!(parse(&["--redis-url", "redis://a:1", "--channel-prefix", "s{x}"]).is_ok(), "single Redis: as before");
        let cluster = ["--redis-url", "redis+cluster://a:1,b:2", "--presence-events", "true"];
        assert!(parse(&cluster).unwrap_err().contains("Redis Cluster"));
        assert!(parse(&["--node-id", "has space"]).is_err());
        assert!(parse(&["--channel-prefix", ""]).is_err());
        assert!(parse(&["--per-user-policy", "sometimes"]).is_err());
        assert!(parse(&["--cors-origins", "app.example.com"]).is_err());
        assert!(parse(&["--jwt-secret", "s", "--jwt-algorithm", "ES256"]).is_err());
        assert!(parse(&["--jwt-secret", "s", "--jwt-public-key", "/k.pem"]).is_err());
        assert!(parse(&["--queue-capacity", "0"]).is_err());
        assert!(parse(&["--history-user-length", "0"]).is_err());
        assert!(parse(&["--history", "maybe"]).is_err());
        assert!(parse(&["--history", "false"]).expect("valid").history().is_none());
        assert!(parse(&["--history-page-entries", "0"]).is_err());
        assert!(parse(&["--history-page-bytes", "1000"]).is_err());
        assert!(parse(&["--history-max-replay", "0"]).is_err());
        let limits =
            parse(&["--history-page-entries", "10", "--history-max-replay", "50"]).expect("valid").replay_limits();
        assert_eq!((limits.page.entries, limits.page.bytes, limits.max_replay), (10, 262_144, 50));
    }

    #[test]
    fn doctor_takes_a_url_and_tokens_and_serve_stays_the_default() {
        let serve = |args: &[&str]| Cli::try_parse_from(with_default_command(args.iter().map(OsString::from)));
        assert!(matches!(serve(&["sse-fanout"]).expect("no subcommand").command, Command::Serve(_)));
        let Command::Serve(config) = serve(&["sse-fanout", "--listen", "127.0.0.1:9"]).expect("flags").command else {
            panic!("serve is implied")
        };
        assert_eq!(config.listen.port(), 9);
        let cli = Cli::try_parse_from([
            "sse-fanout",
            "doctor",
            "http://127.0.0.1:8080/events",
            "--token",
            "t",
            "--heartbeat-wait",
            "2s",
            "--idle",
            "1m",
        ])
        .expect("doctor args");
        let Command::Doctor(args) = cli.command else { panic!("doctor subcommand") };
        assert_eq!(args.url, "http://127.0.0.1:8080/events");
        assert_eq!(args.heartbeat_wait, Duration::from_secs(2));
        assert_eq!(args.idle, Some(Duration::from_secs(60)));
        assert!(args.publisher_token.is_none() && args.publish_url.is_none());
    }

    #[test]
    fn a_jwks_url_is_http_or_https_and_excludes_the_other_keys() {
        let config = parse(&["--jwt-jwks-url", "https://idp.example/.well-known/jwks.json"]).expect("valid");
        assert!(!config.is_development());
        assert_eq!(config.jwt_jwks_refresh, Duration::from_secs(300));
        assert_eq!(config.jwt_jwks_min_interval, Duration::from_secs(10));
        assert!(parse(&["--jwt-jwks-url", "http://127.0.0.1:9/jwks", "--jwt-algorithm", "ES256"]).is_ok());
        for bad in ["idp.example/jwks", "ftp://idp.example/jwks", "file:///etc/jwks.json", "https://"] {
            assert!(parse(&["--jwt-jwks-url", bad]).unwrap_err().contains("SSE_JWT_JWKS_URL"), "{bad}");
        }
        assert!(parse(&["--jwt-jwks-url", "https://i/j", "--jwt-secret", "s"]).is_err());
        assert!(parse(&["--jwt-jwks-url", "https://i/j", "--jwt-public-key", "/k.pem"]).is_err());
        assert!(parse(&["--jwt-jwks-url", "https://i/j", "--jwt-algorithm", "HS256"]).is_err());
        assert!(parse(&["--jwt-jwks-url", "https://i/j", "--jwt-jwks-refresh", "500ms"]).is_err());
    }

    #[test]
    fn accept_limits_have_generous_defaults_and_zero_turns_them_off() {
        let config = parse(&[]).expect("defaults are valid");
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.max_pending_connections, None);
        assert_eq!((config.ip_open_rate, config.ip_open_burst, config.ip_max_streams), (600, 300, 1000));
        assert!(config.trusted_proxies.is_empty());
        let off = parse(&["--ip-open-rate", "0", "--ip-max-streams", "0", "--max-pending-connections", "0"])
            .expect("0 turns each off");
        assert_eq!((off.ip_open_rate, off.ip_max_streams, off.max_pending_connections), (0, 0, Some(0)));
        assert!(parse(&["--ip-open-burst", "0"]).is_err());
        assert!(parse(&["--request-timeout", "50ms"]).unwrap_err().contains("SSE_REQUEST_TIMEOUT"));
        assert_eq!(parse(&["--request-timeout", "1500"]).expect("ms").request_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn the_auth_hook_is_off_by_default_fail_closed_and_cached_briefly() {
        let config = parse(&[]).expect("defaults are valid");
        assert!(config.auth_hook_url.is_none());
        assert_eq!(
            (config.auth_hook_timeout, config.auth_hook_cache),
            (Duration::from_secs(2), Duration::from_secs(10))
        );
        assert!(!config.auth_hook_fail_open);
        let on = parse(&["--auth-hook-url", "https://u:p@backend.internal/sse/authorize", "--auth-hook-cache", "0"])
            .expect("valid");
        assert_eq!(on.auth_hook_cache, Duration::ZERO);
        assert!(parse(&["--auth-hook-fail-open", "true"]).expect("valid").auth_hook_fail_open);
        assert_eq!(parse(&["--auth-hook-timeout", "500"]).expect("ms").auth_hook_timeout, Duration::from_millis(500));
        for bad in ["backend/authorize", "ftp://backend/authorize", "http://"] {
            assert!(parse(&["--auth-hook-url", bad]).unwrap_err().contains("SSE_AUTH_HOOK_URL"), "{bad}");
        }
        for bad in ["0", "5ms", "61s"] {
            assert!(parse(&["--auth-hook-timeout", bad]).unwrap_err().contains("SSE_AUTH_HOOK_TIMEOUT"), "{bad}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_and_ranges() {
        let config = parse(&["--trusted-proxies", "10.0.0.0/8, 192.0.2.7,::1,2001:db8::/32,"]).expect("valid");
        let trusted = |a: &str| config.trusted_proxies.contains(a.parse().expect("address"));
        assert!(trusted("10.200.3.4") && trusted("192.0.2.7") && trusted("::1") && trusted("2001:db8:5::9"));
        assert!(trusted("::ffff:10.1.1.1"), "an IPv4-mapped peer is its IPv4 address");
        assert!(!trusted("192.0.2.8") && !trusted("11.0.0.1") && !trusted("2001:db9::1"));
        let error = parse(&["--trusted-proxies", "10.0.0.0/8,proxy.local"]).unwrap_err();
        assert!(error.contains("proxy.local") && error.contains("SSE_TRUSTED_PROXIES"), "{error}");
        assert!(parse(&["--trusted-proxies", "10.0.0.0/33"]).is_err());
    }

    #[test]
    fn the_canary_runs_every_2s_with_a_5s_threshold_and_0_turns_it_off() {
        let config = parse(&[]).expect("defaults are valid");
        assert_eq!((config.canary_interval, config.canary_threshold), (Duration::from_secs(2), Duration::from_secs(5)));
        let fast = parse(&["--canary-interval", "200", "--canary-threshold", "1s"]).expect("valid");
        assert_eq!((fast.canary_interval, fast.canary_threshold), (Duration::from_millis(200), Duration::from_secs(1)));
        assert!(parse(&["--canary-interval", "0"]).expect("off").canary_interval.is_zero());
        assert!(parse(&["--canary-interval", "50ms"]).unwrap_err().contains("SSE_CANARY_INTERVAL"));
        assert!(parse(&["--canary-threshold", "10ms"]).unwrap_err().contains("SSE_CANARY_THRESHOLD"));
    }

    #[test]
    fn cors_origins_split_on_commas() {
        let config = parse(&["--cors-origins", "https://a.example, http://localhost:3000,"]).expect("valid");
        let origins: Vec<&str> = config.cors_origins().collect();
        assert_eq!(origins, ["https://a.example", "http://localhost:3000"]);
    }
}
