//! Tokens: where a request's JWT is read from, how it is checked, and what it grants.
//!
//! The order of sources is the wire contract: `Authorization: Bearer`, then the query
//! parameters of `SSE_TOKEN_QUERY_PARAMS` (EventSource cannot set headers; `access_token`,
//! `token`), then the cookies of `SSE_TOKEN_COOKIES` (`sse_token`, `access_token`), each list in
//! its order. Only the configured algorithm is accepted, so `alg: none` and HS/RS confusion
//! fail in the decoder. A fixed key is built once at startup; with a JWKS the token's `kid`
//! picks one of the keys [`crate::jwks`] holds, each used with its one algorithm, and an unknown
//! `kid` makes the set be fetched again (rate-limited) before the token is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::channel::{TopicPattern, check_name};
use crate::config::{Config, JwtAlgorithm};
use crate::jwks::{Jwks, JwksError, Missing};

/// The user a stream belongs to (a token's `sub`). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// A checked user id (from a token's `sub` or a publish request).
    pub fn new(id: &str) -> Result<Self, crate::channel::NameError> {
        check_name(id)?;
        Ok(Self(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Subscriber,
    Publisher,
    Admin,
}

/// What a valid token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    pub user: UserId,
    pub topics: Vec<TopicPattern>,
    pub role: Role,
    /// Seconds since the UNIX epoch (the `exp` claim).
    pub expires_at: u64,
    /// The `jti` claim: what a single-use query token is spent under.
    pub jti: Option<Box<str>>,
    /// Every claim of the token as it was signed, kept only when a connect authorization hook
    /// (`SSE_AUTH_HOOK_URL`) is there to be shown them.
    pub claims: Option<Box<RawValue>>,
}

impl Grant {
    /// Publishers may publish; admins may publish and read operator endpoints.
    pub fn may_publish(&self) -> bool {
        self.role >= Role::Publisher
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Longest `jti` claim accepted.
pub const MAX_JTI_BYTES: usize = 256;

/// Why a request is not authenticated. Every variant is a 401 but `KeysUnavailable`, a 503:
/// the node cannot judge any token until it has keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <jwt>, ?access_token=<jwt> or the sse_token cookie")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token signature or algorithm is not accepted")]
    BadSignature,
    #[error("token is malformed")]
    Malformed,
    #[error("token claim {0} is missing or invalid")]
    BadClaim(&'static str),
    #[error("this request needs its token in Authorization: Bearer, not in a cookie or the query string")]
    BearerRequired,
    #[error("this query token was used already: fetch a new one (query tokens are single-use here)")]
    Replayed,
    #[error("the token's signing key (kid) is not in the key set")]
    UnknownKey,
    #[error("the token has no kid and the key set holds several keys")]
    NoKeyId,
    #[error("no key to verify tokens with yet: the key set (SSE_JWT_JWKS_URL) could not be fetched")]
    KeysUnavailable,
    #[error("the node holding the stream did not accept the token")]
    RefusedByHolder,
}

impl From<Missing> for AuthError {
    fn from(missing: Missing) -> Self {
        match missing {
            Missing::NoKeys => AuthError::KeysUnavailable,
            Missing::UnknownKid => AuthError::UnknownKey,
            Missing::NoKid => AuthError::NoKeyId,
        }
    }
}

/// Why the configured key cannot be used. Fatal at startup.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read SSE_JWT_PUBLIC_KEY {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("SSE_JWT_PUBLIC_KEY is not an RSA or EC (P-256) public key in PEM form")]
    NotAKey,
    #[error("SSE_JWT_SECRET is empty")]
    EmptySecret,
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    topics: Option<Value>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    jti: Option<Value>,
}

/// Where tokens are looked for besides `Authorization: Bearer`, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenNames {
    pub query: Box<[String]>,
    pub cookies: Box<[String]>,
}

impl TokenNames {
    pub fn from_config(config: &Config) -> Self {
        let owned = |names: Vec<&str>| names.into_iter().map(str::to_owned).collect();
        Self { query: owned(config.token_query_params()), cookies: owned(config.token_cookies()) }
    }
}

/// Where verifying keys come from.
enum Keys {
    /// `SSE_JWT_SECRET`, `SSE_JWT_PUBLIC_KEY`, or the development secret.
    Fixed { key: DecodingKey, algorithm: Algorithm },
    /// `SSE_JWT_JWKS_URL`: the token's `kid` picks the key.
    Jwks(Arc<Jwks>),
}

/// Checks tokens with the configured key (or key set) and algorithms.
pub struct Authenticator {
    /// Where requests carry their tokens.
    pub names: TokenNames,
    keys: Keys,
    /// One per algorithm a key may have; a token is checked with its key's.
    validations: Vec<Validation>,
    /// Present in development mode only, to mint the tokens the node prints.
    dev_signer: Option<EncodingKey>,
    /// Whether grants carry the token's claims (for the connect authorization hook).
    keep_claims: bool,
}

impl Authenticator {
    /// Builds the verifier from configuration. In development mode (no key configured) it
    /// makes up a random secret, so tokens minted by an earlier run stop working.
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let (keys, dev_signer) = match (&config.jwt_secret, &config.jwt_public_key, &config.jwt_jwks_url) {
            (Some(secret), _, _) => {
                if secret.is_empty() {
                    return Err(KeyError::EmptySecret);
                }
                (Keys::Fixed { key: DecodingKey::from_secret(secret.as_bytes()), algorithm: Algorithm::HS256 }, None)
            }
            (None, Some(path), _) => {
                let pem = std::fs::read(path)
                    .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
                let (key, algorithm) = public_key(&pem, config.jwt_algorithm)?;
                (Keys::Fixed { key, algorithm }, None)
            }
            (None, None, Some(url)) => (Keys::Jwks(Arc::new(Jwks::from_config(config, url)?)), None),
            (None, None, None) => {
                let secret: [u8; 32] = rand::random();
                let key = DecodingKey::from_secret(&secret);
                (Keys::Fixed { key, algorithm: Algorithm::HS256 }, Some(EncodingKey::from_secret(&secret)))
            }
        };
        let algorithms = match &keys {
            Keys::Fixed { algorithm, .. } => vec![*algorithm],
            Keys::Jwks(_) => vec![Algorithm::RS256, Algorithm::ES256],
        };
        let validations = algorithms.into_iter().map(|algorithm| validation(config, algorithm)).collect();
        let keep_claims = config.auth_hook_url.is_some();
        Ok(Self { names: TokenNames::from_config(config), keys, validations, dev_signer, keep_claims })
    }

    /// The key set, when keys come from `SSE_JWT_JWKS_URL` (its refresh task is run by the server).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Fixed { .. } => None,
        }
    }

    /// Whether tokens can be verified at all: false while a key set has never been fetched.
    pub fn has_keys(&self) -> bool {
        self.jwks().is_none_or(|jwks| jwks.has_keys())
    }

    /// Verifies a token and turns its claims into a grant. A token whose key is not in the key
    /// set makes the set be fetched again (at most once per `SSE_JWT_JWKS_MIN_INTERVAL`) and is
    /// then checked once more.
    pub async fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let first = self.check(token);
        let Keys::Jwks(jwks) = &self.keys else { return first };
        match first {
            Err(AuthError::UnknownKey | AuthError::KeysUnavailable) => {
                let kid = jsonwebtoken::decode_header(token).ok().and_then(|header| header.kid);
                jwks.refresh_for(kid.as_deref()).await;
                self.check(token)
            }
            result => result,
        }
    }

    /// Verifies a token with the keys held now.
    fn check(&self, token: &str) -> Result<Grant, AuthError> {
        match &self.keys {
            Keys::Fixed { key, algorithm } => self.decode(token, key, *algorithm),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
                let keys = jwks.keys();
                let key = keys.find(header.kid.as_deref())?;
                self.decode(token, &key.key, key.algorithm)
            }
        }
    }

    /// Checks the signature with `key` and `algorithm` only, then the claims.
    fn decode(&self, token: &str, key: &DecodingKey, algorithm: Algorithm) -> Result<Grant, AuthError> {
        let validation =
            self.validations.iter().find(|v| v.algorithms == [algorithm]).ok_or(AuthError::BadSignature)?;
        let (claims, raw) = if self.keep_claims {
            // The claims as signed, for the hook; read once more for the grant.
            let raw: Box<RawValue> = decoded(token, key, validation)?;
            let claims = serde_json::from_str::<Claims>(raw.get()).map_err(|_| AuthError::BadClaim(CLAIM_TYPES))?;
            (claims, Some(raw))
        } else {
            (decoded::<Claims>(token, key, validation)?, None)
        };
        let expires_at = claims.exp.ok_or(AuthError::BadClaim("exp"))?;
        // RFC 7519 makes `sub` a string; a number is a different user id in every language.
        let Some(Value::String(user)) = claims.sub else {
            return Err(AuthError::BadClaim("sub"));
        };
        let user = UserId::new(&user).map_err(|_| AuthError::BadClaim("sub"))?;
        let topics = match claims.topics {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(TopicPattern::new(s)),
                    _ => Err(AuthError::BadClaim("topics")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(AuthError::BadClaim("topics")),
        };
        let role = match claims.role.as_deref() {
            Some("admin") => Role::Admin,
            Some("publisher") => Role::Publisher,
            _ => Role::Subscriber,
        };
        let jti = match claims.jti {
            None | Some(Value::Null) => None,
            // Bounded, as it becomes part of a Redis key.
            Some(Value::String(jti)) if !jti.is_empty() && jti.len() <= MAX_JTI_BYTES => Some(jti.into_boxed_str()),
            Some(_) => return Err(AuthError::BadClaim("jti")),
        };
        Ok(Grant { user, topics, role, expires_at, jti, claims: raw })
    }

    /// Mints a token with the development secret; `None` outside development mode.
    pub fn mint_dev_token(&self, sub: &str, topics: &[&str], role: Option<&str>, ttl: Duration) -> Option<String> {
        let signer = self.dev_signer.as_ref()?;
        let claims = DevClaims { sub, exp: unix_now() + ttl.as_secs(), topics, role };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, signer).ok()
    }
}

/// Which claims a token's claims fail to parse for, when one has the wrong type.
const CLAIM_TYPES: &str = "exp, sub, topics or role";

/// Checks the signature with `key` and the registered claims with `validation`, and reads the
/// claims as `T`.
fn decoded<T: serde::de::DeserializeOwned>(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<T, AuthError> {
    let data = jsonwebtoken::decode::<T>(token, key, validation).map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::BadSignature
        }
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::BadClaim("sub"),
        ErrorKind::MissingRequiredClaim(_) => AuthError::BadClaim("exp"),
        ErrorKind::InvalidAudience => AuthError::BadClaim("aud"),
        ErrorKind::InvalidIssuer => AuthError::BadClaim("iss"),
        ErrorKind::ImmatureSignature => AuthError::BadClaim("nbf"),
        ErrorKind::Json(_) => AuthError::BadClaim(CLAIM_TYPES),
        _ => AuthError::Malformed,
    })?;
    Ok(data.claims)
}

/// What every token must satisfy, for tokens signed with `algorithm`.
fn validation(config: &Config, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = config.jwt_leeway.as_secs();
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match &config.jwt_audience {
        Some(aud) => validation.set_audience(&[aud]),
        // Without a configured audience a token's `aud` is not ours to judge.
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &config.jwt_issuer {
        validation.set_issuer(&[iss]);
    }
    validation
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    exp: u64,
    topics: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
}

fn public_key(pem: &[u8], algorithm: JwtAlgorithm) -> Result<(DecodingKey, Algorithm), KeyError> {
    let rsa = || DecodingKey::from_rsa_pem(pem).ok().map(|k| (k, Algorithm::RS256));
    let ec = || DecodingKey::from_ec_pem(pem).ok().map(|k| (k, Algorithm::ES256));
    match algorithm {
        JwtAlgorithm::Rs256 => rsa(),
        JwtAlgorithm::Es256 => ec(),
        JwtAlgorithm::Auto | JwtAlgorithm::Hs256 => rsa().or_else(ec),
    }
    .ok_or(KeyError::NotAKey)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Where a request carried its token. A browser attaches cookies to requests from any site,
/// so a cookie-carried token proves less than one the page had to set itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Cookie,
}

/// Finds the token in the contract's order: header, query parameter (`query_token`, already
/// looked up by the configured names), then the configured cookies in their order.
pub fn token_from_request<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
    cookies: &[String],
) -> Option<(&'a str, TokenSource)> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let mut parts = value.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some((token.trim(), TokenSource::Header));
        }
    }
    if let Some(token) = query_token.filter(|t| !t.is_empty()) {
        return Some((token, TokenSource::Query));
    }
    let sent = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(_, value)| !value.is_empty())
    };
    cookies
        .iter()
        .find_map(|wanted| sent().find(|(name, _)| name == wanted))
        .map(|(_, value)| (value, TokenSource::Cookie))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn config(args: &[&str]) -> Config {
        crate::config::config_from(args)
    }

    fn sign(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
            .expect("sign")
    }

    fn auth(secret: &str) -> Authenticator {
        Authenticator::from_config(&config(&["--jwt-secret", secret])).expect("valid secret")
    }

    fn default_cookies() -> Box<[String]> {
        TokenNames::from_config(&config(&[])).cookies
    }

    #[test]
    fn the_header_wins_then_the_query_then_the_cookie() {
        let cookies = default_cookies();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; sse_token=cookie"));
        assert_eq!(token_from_request(&headers, None, &cookies), Some(("cookie", TokenSource::Cookie)));
        assert_eq!(token_from_request(&headers, Some("query"), &cookies), Some(("query", TokenSource::Query)));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer header"));
        assert_eq!(token_from_request(&headers, Some("query"), &cookies), Some(("header", TokenSource::Header)));
        assert_eq!(token_from_request(&HeaderMap::new(), Some(""), &cookies), None);
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(token_from_request(&basic, None, &cookies), None);
    }

    #[test]
    fn cookies_are_read_in_the_configured_order_whatever_order_they_are_sent_in() {
        let cookies = default_cookies();
        assert_eq!(&*cookies, ["sse_token", "access_token"]);
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("access_token=seed; other=1"));
        assert_eq!(token_from_request(&headers, None, &cookies), Some(("seed", TokenSource::Cookie)));
        headers.append(header::COOKIE, HeaderValue::from_static("sse_token=ours"));
        assert_eq!(token_from_request(&headers, None, &cookies), Some(("ours", TokenSource::Cookie)));
        // A cookie left off the list is not a token; with an empty list no cookie is.
        let only_ours = TokenNames::from_config(&config(&["--token-cookies", "sse_token"])).cookies;
        headers.remove(header::COOKIE);
        headers.insert(header::COOKIE, HeaderValue::from_static("access_token=seed"));
        assert_eq!(token_from_request(&headers, None, &only_ours), None);
        let none = TokenNames::from_config(&config(&["--token-cookies", ""])).cookies;
        assert!(none.is_empty());
        assert_eq!(token_from_request(&headers, None, &none), None);
    }

    #[test]
    fn a_valid_token_grants_its_user_topics_and_role() {
        let exp = unix_now() + 60;
        let token =
            sign("s3cret", serde_json::json!({"sub": "42", "exp": exp, "topics": ["news:*"], "role": "publisher"}));
        let grant = auth("s3cret").check(&token).expect("valid");
        assert_eq!(grant.user.as_str(), "42");
        assert_eq!(grant.topics, [TopicPattern::new("news:*")]);
        assert!(grant.may_publish());
        assert!(!grant.is_admin());
        let numeric = sign("s3cret", serde_json::json!({"sub": 7, "exp": exp}));
        assert_eq!(auth("s3cret").check(&numeric).unwrap_err(), AuthError::BadClaim("sub"));
    }

    #[test]
    fn claims_are_kept_as_signed_only_for_a_connect_hook() {
        let exp = unix_now() + 60;
        let token = sign("k", serde_json::json!({"sub": "42", "exp": exp, "plan": {"tier": "gold"}, "n": 1.50}));
        assert!(auth("k").check(&token).expect("valid").claims.is_none(), "no hook: nothing more is kept");
        let hooked = Authenticator::from_config(&config(&["--jwt-secret", "k", "--auth-hook-url", "http://hook/a"]))
            .expect("valid");
        let grant = hooked.check(&token).expect("valid");
        let claims: serde_json::Value =
            serde_json::from_str(grant.claims.as_deref().expect("kept").get()).expect("json");
        assert_eq!(claims, serde_json::json!({"sub": "42", "exp": exp, "plan": {"tier": "gold"}, "n": 1.50}));
        // The grant and its refusals are the same either way.
        assert_eq!((grant.user.as_str(), grant.expires_at), ("42", exp));
        let wrong = sign("k", serde_json::json!({"sub": "42", "exp": exp, "topics": "x"}));
        assert_eq!(hooked.check(&wrong).unwrap_err(), auth("k").check(&wrong).unwrap_err());
        let expired = sign("k", serde_json::json!({"sub": "42", "exp": exp - 600}));
        assert_eq!(hooked.check(&expired).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let a = auth("s3cret");
        let now = unix_now();
        assert_eq!(
            a.check(&sign("other", serde_json::json!({"sub": "1", "exp": now + 60}))).unwrap_err(),
            AuthError::BadSignature
        );
        assert_eq!(
            a.check(&sign("s3cret", serde_json::json!({"sub": "1", "exp": now - 120}))).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            a.check(&sign("s3cret", serde_json::json!({"exp": now + 60}))).unwrap_err(),
            AuthError::BadClaim("sub")
        );
        assert_eq!(a.check(&sign("s3cret", serde_json::json!({"sub": "1"}))).unwrap_err(), AuthError::BadClaim("exp"));
        assert_eq!(
            a.check(&sign("s3cret", serde_json::json!({"sub": "a b", "exp": now + 60}))).unwrap_err(),
            AuthError::BadClaim("sub")
        );
        assert_eq!(
            a.check(&sign("s3cret", serde_json::json!({"sub": "1", "exp": now + 60, "topics": "x"}))).unwrap_err(),
            AuthError::BadClaim("topics")
        );
        assert_eq!(a.check("not.a.jwt").unwrap_err(), AuthError::Malformed);
        // Within the 30 s leeway an expired token still passes.
        assert!(a.check(&sign("s3cret", serde_json::json!({"sub": "1", "exp": now - 10}))).is_ok());
    }

    #[test]
    fn a_sub_with_invisible_characters_is_refused() {
        let a = auth("s3cret");
        let exp = unix_now() + 60;
        for sub in ["ad\u{200B}min", "\u{FEFF}42", "42\u{202E}", "a\u{2066}b\u{2069}"] {
            let token = sign("s3cret", serde_json::json!({"sub": sub, "exp": exp}));
            assert_eq!(a.check(&token).unwrap_err(), AuthError::BadClaim("sub"), "{sub:?}");
        }
    }

    #[test]
    fn alg_none_is_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(format!(r#"{{"sub":"1","exp":{}}}"#, unix_now() + 60));
        let token = format!("{header}.{claims}.");
        assert!(auth("s3cret").check(&token).is_err());
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let a =
            Authenticator::from_config(&config(&["--jwt-secret", "k", "--jwt-issuer", "idp", "--jwt-audience", "sse"]))
                .expect("valid");
        let exp = unix_now() + 60;
        assert!(a.check(&sign("k", serde_json::json!({"sub": "1", "exp": exp, "iss": "idp", "aud": "sse"}))).is_ok());
        assert_eq!(
            a.check(&sign("k", serde_json::json!({"sub": "1", "exp": exp, "iss": "x", "aud": "sse"}))).unwrap_err(),
            AuthError::BadClaim("iss")
        );
        assert_eq!(
            a.check(&sign("k", serde_json::json!({"sub": "1", "exp": exp, "iss": "idp", "aud": "x"}))).unwrap_err(),
            AuthError::BadClaim("aud")
        );
    }

    #[test]
    fn development_mode_mints_tokens_it_accepts() {
        let a = Authenticator::from_config(&config(&[])).expect("dev");
        let token = a.mint_dev_token("demo", &["*"], Some("admin"), Duration::from_secs(60)).expect("dev signer");
        let grant = a.check(&token).expect("valid");
        assert!(grant.is_admin());
        assert!(auth("s3cret").mint_dev_token("x", &[], None, Duration::from_secs(1)).is_none());
    }

    /// A header value: mostly shaped like what clients send, sometimes any bytes at all.
    fn header_bytes(shaped: &'static str) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            3 => shaped.prop_map(String::into_bytes),
            1 => proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest::proptest! {
        /// Whatever a request carries, the token found (if any) is a non-empty piece of the
        /// place it is said to come from, and finding it never panics.
        #[test]
        fn any_request_yields_a_token_from_where_it_says_or_none(
            authorization in proptest::option::of(header_bytes("(?i:bearer|basic|)[ \t]{0,2}[ -~]{0,40}")),
            cookies in proptest::collection::vec(header_bytes("([ -~]{0,6}(sse_token|access_token)?=[ -~]{0,12};? ?){0,3}"), 0..3),
            param in proptest::option::of(proptest::prelude::any::<String>()),
        ) {
            let mut headers = HeaderMap::new();
            if let Some(value) = authorization.and_then(|b| HeaderValue::from_bytes(&b).ok()) {
                headers.insert(header::AUTHORIZATION, value);
            }
            for value in cookies.iter().filter_map(|b| HeaderValue::from_bytes(b).ok()) {
                headers.append(header::COOKIE, value);
            }
            if let Some((token, source)) = token_from_request(&headers, param.as_deref(), &default_cookies()) {
                proptest::prop_assert!(!token.is_empty());
                let from = match source {
                    TokenSource::Header => headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
                    TokenSource::Query => param.clone(),
                    TokenSource::Cookie => headers
                        .get_all(header::COOKIE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find(|v| v.contains(&format!("sse_token={token}")) || v.contains(&format!("access_token={token}")))
                        .map(str::to_owned),
                };
                proptest::prop_assert!(from.is_some_and(|f| f.contains(token)), "{token:?} from {source:?}");
            }
        }

        /// Any string offered as a token is refused with a reason, or verified, without a panic.
        #[test]
        fn any_token_text_is_verified_or_refused_without_panicking(
            token in "[A-Za-z0-9_=.-]{0,80}|[ -~]{0,80}|([A-Za-z0-9_-]{0,40}\\.){2}[A-Za-z0-9_-]{0,40}",
        ) {
            let _ = auth("s3cret").check(&token);
        }
    }

    #[test]
    fn a_file_that_is_not_a_key_is_a_startup_error() {
        assert!(matches!(public_key(b"-----BEGIN NOTHING-----", JwtAlgorithm::Auto), Err(KeyError::NotAKey)));
    }
}
