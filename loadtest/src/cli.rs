//! Command-line arguments shared by every scenario and the presets that point them at
//! sse-fanout, Nchan or Pushpin, turned into the typed specs the rest of the tool uses.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::payload::Fill;
use crate::publisher::{PublishSpec, Via};
use crate::server_stats::Server;
use crate::target::SubscribeSpec;

/// Which server the defaults below are for; every default can be overridden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// sse-fanout on :8080, tokens from --jwt-secret, publishing through Redis.
    Ours,
    /// nginx + Nchan on :8091 as configured by scripts/bench (`/sub/<user>`, `/pub/<channel>`).
    Nchan,
    /// Pushpin on :7999 with the `sse-loadtest origin` backend, publishing to :5561.
    Pushpin,
    /// `sse-loadtest floor` on :8093, publishing through Redis to `sse:broadcast` (fanout only).
    Floor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublisherKind {
    /// Redis `PUBLISH` (sse-fanout's live path).
    Redis,
    /// Redis `FCALL <function>` (sse-fanout's durable path, resumable).
    Fcall,
    /// sse-fanout's `POST /api/publish`.
    HttpApi,
    /// A POST to `--publish-url` with `--publish-body` (Nchan, Pushpin, anything).
    HttpPost,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Server preset for the defaults of the URL and publisher flags.
    #[arg(long, value_enum, default_value = "ours")]
    pub target: Preset,
    /// Subscribe URL template (loopback only): {user}, {token}, {client} are filled per client.
    #[arg(long)]
    pub url: Option<String>,
    /// Extra subscribe request header, `Name: value` (repeatable, placeholders as in --url).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// HS256 secret for subscriber tokens and the publish API's publisher token.
    #[arg(long, env = "SSE_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// `topics` claim of subscriber tokens (repeatable).
    #[arg(long = "jwt-topic", default_value = "*")]
    pub jwt_topics: Vec<String>,
    /// User ids are this prefix plus a number.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Worker processes holding the clients; 0 = as many as the 20,000-file limit needs.
    #[arg(long, default_value_t = 0)]
    pub workers: u64,
    /// Spread client sockets over 127.0.0.1..=127.0.0.N.
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// New streams per second while opening.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Server process to measure (repeatable; its descendants are included).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Redis process to measure beside the server (repeatable: a cluster's primaries): each
    /// delivery step reports its CPU, also per million deliveries.
    #[arg(long = "redis-pid")]
    pub redis_pids: Vec<u32>,
    /// Name of this run in the output (e.g. ours, nchan, pushpin).
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Append JSON result lines to this file as well as stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Hard limit on the whole run; the scenario stops and reports what it has.
    #[arg(long, default_value_t = 1200)]
    pub max_secs: u64,
    /// A response head slower than this is a failure.
    #[arg(long, default_value_t = 15_000)]
    pub head_timeout_ms: u64,
    /// After a read, a worker keeps polling its sockets without sleeping for this long (0: it
    /// sleeps in epoll_wait whenever nothing is ready, like any client). On loopback the
    /// sender's CPU pays for waking a sleeping reader, unless receive processing is steered to
    /// another core; a reader that stays awake through a burst is never woken.
    #[arg(long, default_value_t = 0)]
    pub stay_awake_ms: u64,
    /// Ask for a compressed stream (`Accept-Encoding: gzip`; sse-fanout answers it with
    /// SSE_ENABLE_COMPRESSION=true) and decode it as it comes, so that every delivery check
    /// works unchanged. Delivery results then count bytes on the wire and decoded bytes apart.
    #[arg(long, value_enum)]
    pub accept_encoding: Option<AcceptEncoding>,
}

/// A content coding subscribers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcceptEncoding {
    Gzip,
}

impl Common {
    pub fn subscribe(&self, users: u64, resume: bool) -> Result<SubscribeSpec> {
        let url = self.url.clone().unwrap_or_else(|| {
            match self.target {
                Preset::Ours => "http://127.0.0.1:8080/events?access_token={token}",
                Preset::Nchan => "http://127.0.0.1:8091/sub/{user}",
                Preset::Pushpin => "http://127.0.0.1:7999/sub/{user}",
                Preset::Floor => "http://127.0.0.1:8093/sub/{user}",
            }
            .to_string()
        });
        let mut s = SubscribeSpec::from_url(&url)?;
        if self.target == Preset::Ours && self.jwt_secret.is_none() && url.contains("{token}") {
            bail!("--jwt-secret (or SSE_JWT_SECRET) is needed to mint tokens for {url}");
        }
        s.jwt_secret = self.jwt_secret.clone();
        s.jwt_topics = self.jwt_topics.clone();
        s.users = users.max(1);
        s.user_prefix = self.user_prefix.clone();
        s.headers = self.headers.clone();
        s.source_ips = self.source_ips.max(1);
        s.head_timeout_ms = self.head_timeout_ms;
        s.stay_awake_ms = self.stay_awake_ms;
        s.accept_gzip = self.accept_encoding == Some(AcceptEncoding::Gzip);
        s.resume = resume;
        Ok(s)
    }

    pub fn server(&self) -> Server {
        Server::new(self.server_pids.clone())
    }

    pub fn redis(&self) -> Server {
        Server::new(self.redis_pids.clone())
    }
}

#[derive(Debug, Clone, Args)]
pub struct Publish {
    /// How to publish; the default follows --target.
    #[arg(long, value_enum)]
    pub publisher: Option<PublisherKind>,
    /// Redis to publish through; `redis+cluster://host:port,host:port` (seed nodes) publishes
    /// to a Redis Cluster as a producer does: `SPUBLISH {channel}`, or the two-key `FCALL`.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Redis function for --publisher fcall: called as FCALL <f> 1 <channel> <payload>.
    #[arg(long, default_value = "sse_publish")]
    pub fcall_function: String,
    /// Publish URL (HTTP publishers); {channel} is filled in.
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Body template for --publisher http-post: {data} and {channel} are filled in.
    #[arg(long)]
    pub publish_body: Option<String>,
    /// Extra publish request header (repeatable).
    #[arg(long = "publish-header")]
    pub publish_headers: Vec<String>,
    /// Concurrent publish connections (HTTP) or in-flight pipelines (Redis).
    #[arg(long, default_value_t = 8)]
    pub publish_conns: usize,
    /// Broadcast channel name as the publisher addresses it.
    #[arg(long)]
    pub channel_broadcast: Option<String>,
    /// Per-user channel template ({user} is the user id).
    #[arg(long)]
    pub channel_user: Option<String>,
    /// SSE event name in published envelopes.
    #[arg(long, default_value = "bench")]
    pub event: String,
    /// Pad each event's data to at least this many bytes.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// What the padding is: `x` repeated, or varied JSON objects (for runs where how well
    /// events compress matters; sse-fanout publishers only).
    #[arg(long, value_enum, default_value = "x")]
    pub payload_fill: Fill,
}

/// Pushpin's GRIP publish item: the SSE event is written into the stream as-is.
const PUSHPIN_BODY: &str =
    r#"{"items":[{"channel":"{channel}","formats":{"http-stream":{"content":"event: bench\ndata: {data}\n\n"}}}]}"#;

impl Publish {
    pub fn spec(&self, common: &Common) -> Result<PublishSpec> {
        let preset = common.target;
        let kind = self.publisher.unwrap_or(match preset {
            Preset::Ours | Preset::Floor => PublisherKind::Redis,
            Preset::Nchan | Preset::Pushpin => PublisherKind::HttpPost,
        });
        let (bc, user) = match preset {
            Preset::Ours | Preset::Floor => ("sse:broadcast", "sse:user:{user}"),
            Preset::Nchan | Preset::Pushpin => ("broadcast", "user_{user}"),
        };
        let via = match kind {
            PublisherKind::Redis => Via::Redis { url: self.redis_url.clone() },
            PublisherKind::Fcall => Via::Fcall { url: self.redis_url.clone(), function: self.fcall_function.clone() },
            PublisherKind::HttpApi => Via::HttpApi {
                url: self.publish_url.clone().unwrap_or_else(|| "http://127.0.0.1:8080/api/publish".into()),
                secret: match &common.jwt_secret {
                    Some(s) => s.clone(),
                    None => bail!("--publisher http-api needs --jwt-secret"),
                },
            },
            PublisherKind::HttpPost => {
                let url = match (&self.publish_url, preset) {
                    (Some(u), _) => u.clone(),
                    (None, Preset::Nchan) => "http://127.0.0.1:8091/pub/{channel}".into(),
                    (None, Preset::Pushpin) => "http://127.0.0.1:5561/publish/".into(),
                    (None, Preset::Ours | Preset::Floor) => bail!("--publisher http-post needs --publish-url"),
                };
                let body = self.publish_body.clone().unwrap_or_else(|| {
                    match preset {
                        Preset::Pushpin => PUSHPIN_BODY,
                        _ => "{data}",
                    }
                    .to_string()
                });
                let mut headers = self.publish_headers.clone();
                if preset == Preset::Pushpin && self.publish_headers.is_empty() {
                    headers.push("Content-Type: application/json".into());
                }
                Via::HttpPost { url, body, headers }
            }
        };
        Ok(PublishSpec {
            via,
            channel_broadcast: self.channel_broadcast.clone().unwrap_or(bc.into()),
            channel_user: self.channel_user.clone().unwrap_or(user.into()),
            user_prefix: common.user_prefix.clone(),
            event: self.event.clone(),
            payload_bytes: self.payload_bytes,
            payload_fill: self.payload_fill,
            concurrency: self.publish_conns,
        })
    }
}

/// Parses `10,20,50` into rates.
pub fn parse_rates(s: &str) -> Result<Vec<f64>> {
    let rates: Vec<f64> = s.split(',').map(|r| r.trim().parse::<f64>()).collect::<Result<_, _>>()?;
    if rates.is_empty() || rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("rates must be positive numbers, comma-separated: {s}");
    }
    Ok(rates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rates("10, 20,50").unwrap(), vec![10.0, 20.0, 50.0]);
        assert!(parse_rates("10,0").is_err());
        assert!(parse_rates("x").is_err());
    }
}
