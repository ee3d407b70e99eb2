//! Where subscribers connect and what they send: a loopback address, a request path
//! rendered from a URL template per client (`{user}`, `{token}`, `{client}`), extra headers,
//! and `Last-Event-ID` when resuming. The same template mechanism points one scenario at
//! sse-fanout, Nchan or Pushpin.
//!
//! Only loopback targets are accepted: this tool generates enough traffic to be abuse
//! anywhere else.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::jwt::Minter;

/// Everything a worker needs to open client number `n`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeSpec {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query with placeholders.
    pub path: String,
    /// Secret for HS256 tokens; `{token}` renders empty without it.
    pub jwt_secret: Option<String>,
    /// The `topics` claim of subscriber tokens.
    pub jwt_topics: Vec<String>,
    /// Client `n` is user `n % users`.
    pub users: u64,
    pub user_prefix: String,
    /// Extra request headers, `Name: value` with placeholders.
    pub headers: Vec<String>,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.N so a reconnect
    /// storm does not run out of ephemeral ports on one address.
    pub source_ips: u8,
    /// A response head slower than this counts as a `head_timeout` failure.
    pub head_timeout_ms: u64,
    /// Send `Last-Event-ID` when reopening a stream.
    pub resume: bool,
    /// A worker keeps polling without sleeping for this long after its last read (0: never).
    pub stay_awake_ms: u64,
    /// Send `Accept-Encoding: gzip` (a gzip-coded answer is decoded whether asked for or not).
    #[serde(default)]
    pub accept_gzip: bool,
}

impl SubscribeSpec {
    /// Builds a spec from a URL such as `http://127.0.0.1:8080/events?access_token={token}`.
    pub fn from_url(url: &str) -> Result<Self> {
        let (addr, host, path) = split_url(url)?;
        Ok(Self {
            addr,
            host,
            path,
            jwt_secret: None,
            jwt_topics: Vec::new(),
            users: 1,
            user_prefix: "u".into(),
            headers: Vec::new(),
            source_ips: 1,
            head_timeout_ms: 15_000,
            resume: false,
            stay_awake_ms: 0,
            accept_gzip: false,
        })
    }

    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self::from_url("http://127.0.0.1:8080/events?access_token={token}&u={user}").expect("valid test URL")
    }

    pub fn user_of(&self, client: u64) -> u64 {
        client % self.users.max(1)
    }

    pub fn user_name(&self, user: u64) -> String {
        format!("{}{}", self.user_prefix, user)
    }

    /// The request that opens client `client`'s stream.
    pub fn request(&self, minter: Option<&Minter>, client: u64, last_id: &[u8]) -> Result<Vec<u8>> {
        let user = self.user_name(self.user_of(client));
        let token = match minter {
            Some(m) if needs_token(&self.path, &self.headers) => m.mint(&user, &self.jwt_topics, None)?,
            _ => String::new(),
        };
        let render =
            |t: &str| t.replace("{user}", &user).replace("{client}", &client.to_string()).replace("{token}", &token);
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            render(&self.path),
            self.host
        );
        if self.accept_gzip {
            req.push_str("Accept-Encoding: gzip\r\n");
        }
        for h in &self.headers {
            req.push_str(&render(h));
            req.push_str("\r\n");
        }
        let mut req = req.into_bytes();
        if self.resume && !last_id.is_empty() {
            req.extend_from_slice(b"Last-Event-ID: ");
            req.extend_from_slice(last_id);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        Ok(req)
    }

    /// The source address for client `client`.
    pub fn source_ip(&self, client: u64) -> IpAddr {
        match self.addr.ip() {
            IpAddr::V4(_) => {
                let k = (client % u64::from(self.source_ips.max(1))) as u8 + 1;
                IpAddr::from([127, 0, 0, k])
            }
            v6 => v6,
        }
    }
}

fn needs_token(path: &str, headers: &[String]) -> bool {
    path.contains("{token}") || headers.iter().any(|h| h.contains("{token}"))
}

/// Splits `http://host:port/path` into a loopback socket address, the Host header and the
/// path; anything not on loopback is refused.
pub fn split_url(url: &str) -> Result<(SocketAddr, String, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    let with_port = with_port.replace("localhost", "127.0.0.1");
    let addr: SocketAddr =
        with_port.parse().with_context(|| format!("the host must be a loopback IP address: {url}"))?;
    if !addr.ip().is_loopback() {
        bail!("refusing non-loopback target {addr}: this tool only loads servers on this machine");
    }
    Ok((addr, authority.to_string(), path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(split_url("http://127.0.0.1:8080/events").is_ok());
        assert!(split_url("http://localhost:8080/x").is_ok());
        assert!(split_url("http://[::1]:8080/x").is_ok());
        assert!(split_url("http://10.0.0.1:8080/x").is_err());
        assert!(split_url("http://example.com/x").is_err());
        assert!(split_url("https://127.0.0.1/x").is_err());
        let (a, h, p) = split_url("http://127.0.0.1").unwrap();
        assert_eq!((a.port(), h.as_str(), p.as_str()), (80, "127.0.0.1", "/"));
    }

    #[test]
    fn renders_requests_per_client() {
        let mut s = SubscribeSpec::from_url("http://127.0.0.1:8091/sub/{user}?c={client}").unwrap();
        s.users = 3;
        s.resume = true;
        s.headers.push("X-User: {user}".into());
        let r = String::from_utf8(s.request(None, 4, b"9:0").unwrap()).unwrap();
        assert!(r.starts_with("GET /sub/u1?c=4 HTTP/1.1\r\nHost: 127.0.0.1:8091\r\n"));
        assert!(r.contains("X-User: u1\r\n"));
        assert!(r.ends_with("Last-Event-ID: 9:0\r\n\r\n"));
        let r = String::from_utf8(s.request(None, 4, b"").unwrap()).unwrap();
        assert!(!r.contains("Last-Event-ID"));
        assert!(!r.contains("Accept-Encoding"));
        s.accept_gzip = true;
        let r = String::from_utf8(s.request(None, 4, b"").unwrap()).unwrap();
        assert!(r.contains("\r\nAccept-Encoding: gzip\r\n"), "{r}");
    }

    #[test]
    fn mints_a_token_when_the_template_asks() {
        let mut s = SubscribeSpec::for_tests();
        s.jwt_secret = Some("k".into());
        let m = Minter::new("k");
        let r = String::from_utf8(s.request(Some(&m), 0, b"").unwrap()).unwrap();
        assert!(r.contains("access_token=ey"), "{r}");
    }

    #[test]
    fn source_addresses_rotate_on_loopback() {
        let mut s = SubscribeSpec::for_tests();
        s.source_ips = 4;
        assert_eq!(s.source_ip(0), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(s.source_ip(5), IpAddr::from([127, 0, 0, 2]));
    }
}
