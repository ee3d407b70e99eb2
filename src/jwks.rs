//! Keys from a JSON Web Key Set (`SSE_JWT_JWKS_URL`): fetching it, keeping the keys by `kid`,
//! and refreshing them so an identity provider can rotate its signing keys without a restart.
//!
//! The set is fetched at start, then every `SSE_JWT_JWKS_REFRESH`, and again when a token names
//! a `kid` the node does not hold (the provider published a new key). Fetches are single-flight
//! and those made for unknown kids are at most one per `SSE_JWT_JWKS_MIN_INTERVAL`, because a
//! token's header costs an attacker nothing to make up. A failed fetch keeps the keys the node
//! has; an answer with no usable key counts as a failure too, as installing it would refuse
//! every token. The last good set is written to `SSE_JWT_JWKS_CACHE`, if set, and read at start,
//! so a node restarted while the key server is down still verifies tokens.
//!
//! Only RS256 (RSA keys) and ES256 (EC P-256 keys) are taken: a key is used with the one
//! algorithm its type says, whatever a token's header claims. What a token must contain is
//! checked by [`crate::auth`]; this module only finds its key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use metrics::{Counter, Gauge};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, JwtAlgorithm};

/// Longest key set read (a provider's set is a few KiB; this bounds a broken or hostile server).
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Whole fetch, connect included: a request waiting on an unknown kid waits at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First retry after a failed fetch; it doubles up to `SSE_JWT_JWKS_REFRESH`, so a node that has
/// no key yet gets one within about a second of the server coming back.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// One verifying key and the only algorithm it is used with.
pub struct VerifyKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

/// The keys of one fetched set.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, VerifyKey>,
    /// Keys published without a `kid`.
    unnamed: Vec<VerifyKey>,
}

/// Why a token's key is not in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The set holds no key at all (never fetched, or only unusable keys).
    NoKeys,
    /// The token's `kid` is not in the set: the set may be out of date.
    UnknownKid,
    /// The token has no `kid` and the set holds several keys.
    NoKid,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for a token with header `kid`. A set of one key serves every token, with or
    /// without a kid, as providers with a single key often leave `kid` out on one side.
    pub fn find(&self, kid: Option<&str>) -> Result<&VerifyKey, Missing> {
        if let Some(key) = kid.and_then(|kid| self.by_kid.get(kid)) {
            return Ok(key);
        }
        if self.len() == 1 {
            if let Some(key) = self.unnamed.first() {
                return Ok(key);
            }
            if kid.is_none() {
                return self.by_kid.values().next().ok_or(Missing::NoKeys);
            }
        }
        match kid {
            _ if self.is_empty() => Err(Missing::NoKeys),
            Some(_) => Err(Missing::UnknownKid),
            None => Err(Missing::NoKid),
        }
    }

    /// Parses a JWKS document, keeping the keys this node can use. Keys of another type or
    /// algorithm, for encryption, or malformed are skipped (a provider may publish them for
    /// other clients), and their count returned; only a document that is not a key set at all
    /// is an error.
    pub fn parse(document: &[u8], accept: JwtAlgorithm) -> Result<(Self, usize), serde_json::Error> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(document)?;
        let mut set = KeySet::default();
        let mut skipped = 0;
        for value in document.keys {
            let Some(key) = serde_json::from_value::<Jwk>(value).ok().and_then(|jwk| usable(&jwk, accept)) else {
                skipped += 1;
                continue;
            };
            match key {
                (Some(kid), key) => {
                    // The first of two keys with one kid wins: which one a token meant is unknowable.
                    match set.by_kid.entry(kid) {
                        Entry::Occupied(_) => skipped += 1,
                        Entry::Vacant(slot) => {
                            slot.insert(key);
                        }
                    }
                }
                (None, key) => set.unnamed.push(key),
            }
        }
        Ok((set, skipped))
    }
}

/// The key and its kid, when the node can verify with it.
fn usable(jwk: &Jwk, accept: JwtAlgorithm) -> Option<(Option<String>, VerifyKey)> {
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return None;
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return None,
    };
    let allowed = match accept {
        JwtAlgorithm::Auto | JwtAlgorithm::Hs256 => true,
        JwtAlgorithm::Rs256 => algorithm == Algorithm::RS256,
        JwtAlgorithm::Es256 => algorithm == Algorithm::ES256,
    };
    // A key published for another algorithm (RS512, say) is not used with ours.
    let declared = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
        Some(_) => false,
    };
    if !(allowed && declared) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((jwk.common.key_id.clone(), VerifyKey { key, algorithm }))
}

/// Why a fetch brought no keys.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("the server answered {0}")]
    Status(reqwest::StatusCode),
    #[error("the key set is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JSON Web Key Set: {0}")]
    NotAKeySet(#[from] serde_json::Error),
    #[error("no usable key (RS256 RSA or ES256 P-256, use sig) among {0}")]
    NoUsableKey(usize),
}

/// Why the JWKS settings cannot work. Fatal at startup.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("SSE_JWT_JWKS_URL {0:?} is not a URL")]
    Url(String),
    #[error("cannot build the HTTP client for SSE_JWT_JWKS_URL: {0}")]
    Client(reqwest::Error),
}

/// Counters of fetches by outcome, and the number of keys held.
struct JwksMetrics {
    ok: Counter,
    failed: Counter,
    keys: Gauge,
}

/// The key set of one URL, kept fresh. Shared by the verifier and the refresh task.
pub struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    accept: JwtAlgorithm,
    refresh: Duration,
    min_interval: Duration,
    cache: Option<PathBuf>,
    /// Read per token (an `Arc` clone); replaced whole by a successful fetch.
    current: RwLock<Arc<KeySet>>,
    /// Held for the length of a fetch, so fetches are single-flight; holds when the last began.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// When a failure was last logged: at most one line per refresh interval.
    failure_logged: Mutex<Option<Instant>>,
    metrics: JwksMetrics,
}

impl Jwks {
    /// Builds the key set from configuration, starting with the cached set when there is one.
    /// Fetching starts with [`Jwks::run`].
    pub fn from_config(config: &Config, url: &str) -> Result<Self, JwksError> {
        let url = reqwest::Url::parse(url).map_err(|_| JwksError::Url(url.to_owned()))?;
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("sse-fanout/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(JwksError::Client)?;
        let metrics = JwksMetrics {
            ok: metrics::counter!(crate::metrics::JWKS_REFRESHES, "outcome" => "ok"),
            failed: metrics::counter!(crate::metrics::JWKS_REFRESHES, "outcome" => "failed"),
            keys: metrics::gauge!(crate::metrics::JWKS_KEYS),
        };
        let jwks = Self {
            url,
            client,
            accept: config.jwt_algorithm,
            refresh: config.jwt_jwks_refresh,
            min_interval: config.jwt_jwks_min_interval,
            cache: config.jwt_jwks_cache.clone(),
            current: RwLock::new(Arc::new(KeySet::default())),
            fetching: tokio::sync::Mutex::new(None),
            failure_logged: Mutex::new(None),
            metrics,
        };
        jwks.load_cache();
        Ok(jwks)
    }

    /// The keys held now.
    pub fn keys(&self) -> Arc<KeySet> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether any token can be verified: `/readyz` fails with `keys_unavailable` until then.
    pub fn has_keys(&self) -> bool {
        !self.keys().is_empty()
    }

    /// Fetches the set again for a token whose key is missing, unless another request's fetch
    /// just did (it then waits for that fetch and uses its result) or the last fetch began less
    /// than `SSE_JWT_JWKS_MIN_INTERVAL` ago.
    pub async fn refresh_for(&self, kid: Option<&str>) {
        let mut last = self.fetching.lock().await;
        if self.keys().find(kid).is_ok() {
            return;
        }
        if last.is_some_and(|began| began.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch("unknown_kid").await;
    }

    /// Fetches at once, then every `SSE_JWT_JWKS_REFRESH`; after a failure, sooner (from half a
    /// second, doubling), until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut delay = Duration::ZERO;
        let mut retry = FIRST_RETRY;
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            let fetched = {
                let mut last = self.fetching.lock().await;
                *last = Some(Instant::now());
                self.fetch("schedule").await
            };
            delay = if fetched {
                retry = FIRST_RETRY;
                self.refresh
            } else {
                let delay = retry;
                retry = (retry * 2).min(self.refresh);
                delay
            };
        }
    }

    /// One fetch; installs the set on success. The caller holds `fetching`.
    async fn fetch(&self, why: &'static str) -> bool {
        match self.download().await.and_then(|body| self.parse(&body).map(|set| (body, set))) {
            Ok((body, (set, skipped))) => {
                self.metrics.ok.increment(1);
                let recovered = self.failure_logged.lock().unwrap_or_else(PoisonError::into_inner).take().is_some();
                let kids: Vec<&str> = set.by_kid.keys().map(String::as_str).collect();
                if recovered {
                    tracing::info!(url = %self.url, keys = set.len(), ?kids, "JWKS fetched again");
                } else {
                    tracing::debug!(url = %self.url, why, keys = set.len(), skipped, ?kids, "JWKS fetched");
                }
                self.install(set);
                self.write_cache(&body);
                true
            }
            Err(error) => {
                self.metrics.failed.increment(1);
                self.log_failure(why, &error);
                false
            }
        }
    }

    async fn download(&self) -> Result<Vec<u8>, FetchError> {
        let mut response =
            self.client.get(self.url.clone()).header(reqwest::header::ACCEPT, "application/json").send().await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn parse(&self, body: &[u8]) -> Result<(KeySet, usize), FetchError> {
        let (set, skipped) = KeySet::parse(body, self.accept)?;
        if set.is_empty() {
            return Err(FetchError::NoUsableKey(skipped));
        }
        Ok((set, skipped))
    }

    fn install(&self, set: KeySet) {
        self.metrics.keys.set(set.len() as f64);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }

    /// Logs the first failure after a success, then one a refresh interval while they go on.
    fn log_failure(&self, why: &'static str, error: &FetchError) {
        let mut logged = self.failure_logged.lock().unwrap_or_else(PoisonError::into_inner);
        if logged.is_some_and(|at| at.elapsed() < self.refresh) {
            return;
        }
        *logged = Some(Instant::now());
        let keys = self.keys().len();
        // reqwest's own message leaves out the cause (refused, timed out, bad certificate).
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        tracing::warn!(url = %self.url, why, keys, "cannot fetch the JWKS ({reason}); keeping the keys held");
    }

    /// Reads the cached set, if configured and present. A missing or broken file is not fatal:
    /// the fetch at start may still succeed.
    fn load_cache(&self) {
        let Some(path) = &self.cache else { return };
        let body = match std::fs::read(path) {
            Ok(body) => body,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read SSE_JWT_JWKS_CACHE: {e}");
                return;
            }
        };
        match self.parse(&body) {
            Ok((set, _)) => {
                tracing::info!(path = %path.display(), keys = set.len(), "JWKS read from the cache");
                self.install(set);
            }
            Err(e) => tracing::warn!(path = %path.display(), "ignoring SSE_JWT_JWKS_CACHE: {e}"),
        }
    }

    /// Replaces the cache file with `body`, through a temporary file and a rename so a crash
    /// mid-write leaves the old set rather than half of a new one.
    fn write_cache(&self, body: &[u8]) {
        let Some(path) = &self.cache else { return };
        if std::fs::read(path).is_ok_and(|cached| cached == body) {
            return;
        }
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        let written = std::fs::write(&temporary, body).and_then(|()| std::fs::rename(&temporary, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "cannot write SSE_JWT_JWKS_CACHE: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // A P-256 public key and a 2048-bit RSA public key (test vectors, public halves only).
    const EC_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const EC_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    const RSA_N: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    fn ec(kid: Option<&str>) -> serde_json::Value {
        let mut key = json!({"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y, "use": "sig"});
        if let Some(kid) = kid {
            key["kid"] = json!(kid);
        }
        key
    }

    fn rsa(kid: &str) -> serde_json::Value {
        json!({"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": kid, "alg": "RS256"})
    }

    fn parse(keys: serde_json::Value, accept: JwtAlgorithm) -> (KeySet, usize) {
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes(), accept).expect("a key set")
    }

    #[test]
    fn rsa_and_p256_keys_are_kept_with_their_one_algorithm() {
        let (set, skipped) = parse(json!([ec(Some("e1")), rsa("r1")]), JwtAlgorithm::Auto);
        assert_eq!((set.len(), skipped), (2, 0));
        assert_eq!(set.find(Some("e1")).map(|k| k.algorithm).ok(), Some(Algorithm::ES256));
        assert_eq!(set.find(Some("r1")).map(|k| k.algorithm).ok(), Some(Algorithm::RS256));
        assert_eq!(set.find(Some("r2")).err(), Some(Missing::UnknownKid));
        assert_eq!(set.find(None).err(), Some(Missing::NoKid));
        let (only_ec, skipped) = parse(json!([ec(Some("e1")), rsa("r1")]), JwtAlgorithm::Es256);
        assert_eq!((only_ec.len(), skipped), (1, 1));
        assert!(only_ec.find(Some("r1")).is_err_and(|m| m == Missing::UnknownKid));
    }

    #[test]
    fn keys_the_node_cannot_use_are_skipped_not_fatal() {
        let mut encryption = ec(Some("enc"));
        encryption["use"] = json!("enc");
        let mut p384 = ec(Some("p384"));
        p384["crv"] = json!("P-384");
        let mut rs512 = rsa("rs512");
        rs512["alg"] = json!("RS512");
        let keys = json!([
            encryption,
            p384,
            rs512,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "OKP", "crv": "Ed25519", "x": EC_X, "kid": "ed"},
            {"kty": "RSA", "kid": "broken"},
            "not an object",
            rsa("dup"),
            ec(Some("dup")),
            rsa("good"),
        ]);
        let (set, skipped) = parse(keys, JwtAlgorithm::Auto);
        assert_eq!((set.len(), skipped), (2, 8));
        assert_eq!(set.find(Some("dup")).map(|k| k.algorithm).ok(), Some(Algorithm::RS256), "the first dup wins");
        assert!(set.find(Some("good")).is_ok());
        assert!(KeySet::parse(b"{\"keys\": 1}", JwtAlgorithm::Auto).is_err());
        assert!(KeySet::parse(b"<html>", JwtAlgorithm::Auto).is_err());
    }

    #[test]
    fn a_set_of_one_key_serves_tokens_with_or_without_a_kid() {
        let (named, _) = parse(json!([ec(Some("only"))]), JwtAlgorithm::Auto);
        assert!(named.find(None).is_ok());
        assert_eq!(named.find(Some("other")).err(), Some(Missing::UnknownKid));
        let (unnamed, _) = parse(json!([ec(None)]), JwtAlgorithm::Auto);
        assert!(unnamed.find(None).is_ok() && unnamed.find(Some("any")).is_ok());
        let (two_unnamed, _) = parse(json!([ec(None), ec(None)]), JwtAlgorithm::Auto);
        assert_eq!(two_unnamed.find(None).err(), Some(Missing::NoKid));
        assert_eq!(KeySet::default().find(Some("k")).err(), Some(Missing::NoKeys));
        assert_eq!(KeySet::default().find(None).err(), Some(Missing::NoKeys));
    }
}
