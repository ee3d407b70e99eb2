//! The connect authorization hook (`SSE_AUTH_HOOK_URL`): entitlements a token cannot carry
//! ("only users with an active subscription may follow this table"), asked of the operator's
//! backend once per stream open, after the token verified and before any channel is joined.
//!
//! It owns the contract with the backend, and nothing of HTTP routing: the request it POSTs
//! (`{"user", "topics", "claims", "ip"}`), how an answer is read (allow, deny with a 4xx status
//! and a reason, or allow fewer topics), what a failure becomes (fail-closed by default, or the
//! token's grants with `SSE_AUTH_HOOK_FAIL_OPEN`), the short cache of answers, and its metrics.
//! How a [`Decision`] becomes a response is `http::events`'s.
//!
//! The hook can only take away: it sees the topics the token already grants and the client
//! asked for, and an answer naming others is cut down to those (and logged). It governs topics
//! only; the user's own channel and broadcast stay with every stream it lets open. Nothing here
//! runs per message: the hook is consulted when a stream opens, never while it lives.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::unix_now;
use crate::config::Config;
use crate::log_limit::LogLimiter;

/// Longest answer read. An answer is a few hundred bytes; this bounds a broken backend.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest deny reason passed on to the client (cut at a character boundary).
const MAX_REASON_BYTES: usize = 256;
/// The reason a client gets when the backend denies without giving one.
const DEFAULT_REASON: &str = "the authorization backend refused this stream";
/// Memory the answer cache may hold, keys included. About 20,000 answers of a typical token.
const CACHE_BUDGET_BYTES: usize = 8 * 1024 * 1024;
/// Inputs longer than this (a large token, many long topics) are asked about every time rather
/// than cached: one such entry would take the room of dozens of ordinary ones.
const MAX_CACHE_KEY_BYTES: usize = 8 * 1024;
/// Bookkeeping of one cache entry besides its key and topics (map and queue slots, `Arc`s).
const CACHE_ENTRY_OVERHEAD: usize = 128;
/// Claims left out of the cache key: they change with every token minted while saying nothing
/// about entitlement (the node checks them itself), so a reconnect with a fresh token of the
/// same user, topics and address finds the answer. `jti` stays in the key: a backend may
/// refuse one token by its id.
const VOLATILE_CLAIMS: [&str; 3] = ["exp", "iat", "nbf"];

/// What one stream open asks the backend: the verified user, the topics asked for and granted by
/// the token (no duplicates, in the order asked), the token's verified claims as they were
/// signed, and the client's address (as `SSE_TRUSTED_PROXIES` determines it).
#[derive(Debug, Serialize)]
pub struct HookRequest<'a> {
    pub user: &'a str,
    pub topics: &'a [String],
    pub claims: &'a RawValue,
    pub ip: IpAddr,
}

/// What the node does with a stream open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open it with these topics: all that were asked for, or fewer, in the order asked.
    Allow(Vec<String>),
    /// Refuse it with this 4xx status and reason.
    Deny { status: u16, reason: String },
    /// Refuse it with 503: the backend could not answer (fail-closed).
    Unavailable(Failure),
}

/// Why the backend gave no usable answer. Labels are `sse_auth_hook_total`'s outcomes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the authorization backend did not answer within the timeout")]
    Timeout,
    #[error("the authorization backend cannot be reached: {0}")]
    Unreachable(String),
    #[error("the authorization backend answered {0}")]
    BadStatus(u16),
    #[error("the authorization backend's answer is not understood: {0}")]
    Malformed(String),
}

impl Failure {
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable(_) => "unreachable",
            Failure::BadStatus(_) => "bad_status",
            Failure::Malformed(_) => "malformed",
        }
    }
}

/// A backend's answer, as cached: deny, or allow the topics in `Some` (already cut down to those
/// asked for) or all of them (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Allow(Option<Vec<String>>),
    Deny { status: u16, reason: String },
}

/// The JSON a backend may answer with a 2xx or 4xx status. Unknown fields are ignored, so a
/// backend can add its own.
#[derive(Debug, Deserialize)]
struct AnswerBody {
    allow: Option<bool>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    reason: Option<serde_json::Value>,
}

/// Why the hook settings cannot work. Fatal at startup.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("SSE_AUTH_HOOK_URL is not a URL")]
    Url,
    #[error("cannot build the HTTP client for SSE_AUTH_HOOK_URL: {0}")]
    Client(reqwest::Error),
}

/// Calls by outcome and how long they took; cache hits.
struct HookMetrics {
    duration: Histogram,
    cache_hits: Counter,
}

impl HookMetrics {
    fn outcome(label: &'static str) {
        metrics::counter!(crate::metrics::AUTH_HOOK, "outcome" => label).increment(1);
    }
}

/// The hook of one node: one HTTP client (its connection pool reused by every stream open), the
/// answer cache, and the failure policy.
pub struct AuthHook {
    url: reqwest::Url,
    client: reqwest::Client,
    timeout: Duration,
    fail_open: bool,
    cache: Option<AnswerCache>,
    metrics: HookMetrics,
    /// Failures are logged at most once a second: a backend that is down fails every open.
    failure_log: LogLimiter,
    widened_log: LogLimiter,
}

impl AuthHook {
    /// The hook of `SSE_AUTH_HOOK_URL`, or `None` when it is not set.
    pub fn from_config(config: &Config) -> Result<Option<Self>, HookError> {
        let Some(url) = &config.auth_hook_url else { return Ok(None) };
        let url = reqwest::Url::parse(url).map_err(|_| HookError::Url)?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.auth_hook_timeout)
            .timeout(config.auth_hook_timeout)
            // A redirect would turn the POST into a GET elsewhere: a 3xx is a failure instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sse-fanout/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(HookError::Client)?;
        let cache = (!config.auth_hook_cache.is_zero()).then(|| AnswerCache::new(config.auth_hook_cache));
        Ok(Some(Self {
            url,
            client,
            timeout: config.auth_hook_timeout,
            fail_open: config.auth_hook_fail_open,
            cache,
            metrics: HookMetrics {
                duration: metrics::histogram!(crate::metrics::AUTH_HOOK_DURATION),
                cache_hits: metrics::counter!(crate::metrics::AUTH_HOOK_CACHE_HITS),
            },
            failure_log: LogLimiter::default(),
            widened_log: LogLimiter::default(),
        }))
    }

    /// Asks the backend (or the cache) whether `request`'s stream may open, and with which topics.
    pub async fn decide(&self, request: &HookRequest<'_>) -> Decision {
        let key = self.cache.as_ref().and_then(|_| cache_key(request));
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(answer) = cache.get(key)
        {
            self.metrics.cache_hits.increment(1);
            return apply(answer, request.topics);
        }
        let started = Instant::now();
        let asked = self.ask(request).await;
        self.metrics.duration.record(started.elapsed().as_secs_f64());
        match asked {
            Ok((answer, widened)) => {
                if widened && let Some(suppressed) = self.widened_log.allow(unix_now() as u32) {
                    tracing::warn!(
                        user = request.user,
                        suppressed,
                        "the authorization hook allowed topics the stream did not ask for; only those asked for are joined"
                    );
                }
                let decision = apply(answer.clone(), request.topics);
                HookMetrics::outcome(match &decision {
                    Decision::Allow(topics) if topics.len() < request.topics.len() => "narrowed",
                    Decision::Allow(_) => "allowed",
                    _ => "denied",
                });
                if let (Some(cache), Some(key)) = (&self.cache, key) {
                    cache.insert(key, answer);
                }
                decision
            }
            Err(failure) => {
                HookMetrics::outcome(failure.label());
                if let Some(suppressed) = self.failure_log.allow(unix_now() as u32) {
                    let admitted = if self.fail_open { "opened with its token's grants" } else { "refused (503)" };
                    tracing::warn!(error = %failure, suppressed, "authorization hook failed; the stream is {admitted}");
                }
                if self.fail_open { Decision::Allow(request.topics.to_vec()) } else { Decision::Unavailable(failure) }
            }
        }
    }

    /// One call to the backend: its answer, and whether it named topics that were not asked for.
    async fn ask(&self, request: &HookRequest<'_>) -> Result<(Answer, bool), Failure> {
        let body = serde_json::to_vec(request).map_err(|e| Failure::Malformed(e.to_string()))?;
        let call = async {
            let mut response = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT, "application/json")
                .body(body)
                .send()
                .await
                .map_err(failure_of)?;
            let status = response.status().as_u16();
            if response.content_length().is_some_and(|length| length > MAX_ANSWER_BYTES as u64) {
                return Err(Failure::Malformed(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
            }
            let mut text = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(failure_of)? {
                if text.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(Failure::Malformed(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
                }
                text.extend_from_slice(&chunk);
            }
            Ok((status, text))
        };
        // The client's own timeout covers the same span; this one also bounds a backend that
        // trickles its answer, whatever the client does.
        let (status, text) = tokio::time::timeout(self.timeout, call).await.map_err(|_| Failure::Timeout)??;
        read_answer(status, &text, request.topics)
    }
}

/// A transport error as a failure; the URL is left out (it may hold credentials).
fn failure_of(error: reqwest::Error) -> Failure {
    if error.is_timeout() {
        return Failure::Timeout;
    }
    let error = error.without_url();
    // The source says what went wrong ("connection refused"); reqwest's own text only that
    // sending failed.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text = cause.to_string();
        source = cause.source();
    }
    Failure::Unreachable(text)
}

/// Reads a backend's answer. The contract:
/// - 2xx with an empty body: allow every topic asked for;
/// - 2xx with `{"allow": true}`: allow, and with `"topics": [...]` only those of them that were
///   asked for (`true` as the second value when it named others: they are ignored);
/// - 2xx with `{"allow": false, "status": 4xx, "reason": "..."}`: deny (status 403 unless a
///   4xx is given, a default reason unless a string is);
/// - any 4xx: deny with that status, and the body's `reason` when it is JSON with one;
/// - anything else (1xx, 3xx, 5xx, a 2xx body without a boolean `allow`): a failure.
fn read_answer(status: u16, text: &[u8], asked: &[String]) -> Result<(Answer, bool), Failure> {
    let body = || -> Result<Option<AnswerBody>, Failure> {
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        // An object, not whatever serde would read a struct from (`[true]` is a sequence form).
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(text).map_err(|e| Failure::Malformed(e.to_string()))?;
        serde_json::from_value(object.into()).map(Some).map_err(|e| Failure::Malformed(e.to_string()))
    };
    match status {
        200..=299 => {
            let Some(body) = body()? else { return Ok((Answer::Allow(None), false)) };
            match body.allow {
                Some(true) => {
                    let Some(allowed) = body.topics else { return Ok((Answer::Allow(None), false)) };
                    let widened = allowed.iter().any(|topic| !asked.contains(topic));
                    let kept = allowed.into_iter().filter(|topic| asked.contains(topic)).collect();
                    Ok((Answer::Allow(Some(kept)), widened))
                }
                Some(false) => Ok((deny(body.status.as_ref(), body.reason.as_ref()), false)),
                None => Err(Failure::Malformed("a 2xx answer with a body must carry a boolean \"allow\"".into())),
            }
        }
        400..=499 => {
            // Whatever the body holds (an HTML error page, nothing), the status is the answer.
            let body = body().ok().flatten();
            let reason = body.as_ref().and_then(|b| b.reason.as_ref());
            Ok((deny(Some(&serde_json::Value::from(status)), reason), false))
        }
        other => Err(Failure::BadStatus(other)),
    }
}

/// A denial with a 4xx status (403 unless one is given) and a bounded reason.
fn deny(status: Option<&serde_json::Value>, reason: Option<&serde_json::Value>) -> Answer {
    let status = status
        .and_then(serde_json::Value::as_u64)
        .filter(|s| (400..=499).contains(s))
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(403);
    let reason = match reason.and_then(serde_json::Value::as_str).map(str::trim) {
        Some(reason) if !reason.is_empty() => truncate(reason, MAX_REASON_BYTES).to_owned(),
        _ => DEFAULT_REASON.to_owned(),
    };
    Answer::Deny { status, reason }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What a stream asking for `asked` gets from `answer`: the topics kept in the order asked.
fn apply(answer: Answer, asked: &[String]) -> Decision {
    match answer {
        Answer::Allow(None) => Decision::Allow(asked.to_vec()),
        Answer::Allow(Some(allowed)) => {
            Decision::Allow(asked.iter().filter(|topic| allowed.contains(topic)).cloned().collect())
        }
        Answer::Deny { status, reason } => Decision::Deny { status, reason },
    }
}

/// What an answer depends on, exactly: user, address, topics (as a set) and the claims but the
/// [volatile](VOLATILE_CLAIMS) ones, in one unambiguous string (names hold no control
/// characters, so `\n` separates them; the claims come last, as canonical JSON with sorted keys).
/// `None` when the inputs are too large to be worth caching.
fn cache_key(request: &HookRequest<'_>) -> Option<Box<str>> {
    let mut topics: Vec<&str> = request.topics.iter().map(String::as_str).collect();
    topics.sort_unstable();
    let claims: BTreeMap<String, &RawValue> = serde_json::from_str(request.claims.get()).ok()?;
    let claims: BTreeMap<&str, &RawValue> =
        claims.iter().filter(|(name, _)| !VOLATILE_CLAIMS.contains(&name.as_str())).map(|(k, v)| (&**k, *v)).collect();
    let mut key = format!("{}\n{}\n{}\n", request.user, request.ip, topics.join("\n"));
    key.push('\n');
    key.push_str(&serde_json::to_string(&claims).ok()?);
    (key.len() <= MAX_CACHE_KEY_BYTES).then(|| key.into_boxed_str())
}

/// Answers for `ttl`, within [`CACHE_BUDGET_BYTES`]. Every entry lives equally long, so the
/// oldest stored is the first to expire: one queue in insertion order serves both expiry and
/// eviction when the budget is full.
struct AnswerCache {
    ttl: Duration,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<Arc<str>, (Instant, Answer)>,
    /// Keys by when they were stored, oldest first; a key stored again appears twice, and only
    /// the copy matching its entry's time removes it.
    order: VecDeque<(Instant, Arc<str>)>,
    bytes: usize,
}

impl AnswerCache {
    fn new(ttl: Duration) -> Self {
        Self { ttl, state: Mutex::new(CacheState::default()) }
    }

    fn get(&self, key: &str) -> Option<Answer> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (stored, answer) = state.entries.get(key)?;
        (stored.elapsed() < self.ttl).then(|| answer.clone())
    }

    fn insert(&self, key: Box<str>, answer: Answer) {
        self.insert_at(key, answer, Instant::now(), CACHE_BUDGET_BYTES);
    }

    fn insert_at(&self, key: Box<str>, answer: Answer, now: Instant, budget: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let key: Arc<str> = key.into();
        let size = entry_size(&key, &answer);
        state.bytes += size;
        match state.entries.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                let old = std::mem::replace(slot.get_mut(), (now, answer));
                state.bytes -= entry_size(&key, &old.1);
            }
            Entry::Vacant(slot) => {
                slot.insert((now, answer));
            }
        }
        state.order.push_back((now, key));
        // Expired entries go first; then, past the budget, the oldest whatever their age.
        while let Some((stored, _)) = state.order.front() {
            let expired = now.saturating_duration_since(*stored) >= self.ttl;
            if !expired && state.bytes <= budget {
                break;
            }
            let Some((stored, key)) = state.order.pop_front() else { break };
            if let Entry::Occupied(slot) = state.entries.entry(key)
                && slot.get().0 == stored
            {
                let (key, (_, answer)) = slot.remove_entry();
                state.bytes -= entry_size(&key, &answer);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }
}

fn entry_size(key: &str, answer: &Answer) -> usize {
    let answer = match answer {
        Answer::Allow(None) => 0,
        Answer::Allow(Some(topics)) => topics.iter().map(|t| t.len() + 24).sum(),
        Answer::Deny { reason, .. } => reason.len(),
    };
    key.len() + answer + CACHE_ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn read(status: u16, body: &str, asked: &[&str]) -> Result<(Answer, bool), Failure> {
        read_answer(status, body.as_bytes(), &topics(asked))
    }

    #[test]
    fn an_empty_2xx_or_allow_true_allows_every_topic() {
        assert_eq!(read(200, "", &["a"]), Ok((Answer::Allow(None), false)));
        assert_eq!(read(204, " \n", &["a"]), Ok((Answer::Allow(None), false)));
        assert_eq!(read(200, r#"{"allow":true}"#, &["a"]), Ok((Answer::Allow(None), false)));
        assert_eq!(read(200, r#"{"allow":true,"topics":null,"extra":1}"#, &["a"]), Ok((Answer::Allow(None), false)));
    }

    #[test]
    fn topics_narrow_and_never_widen() {
        let (answer, widened) = read(200, r#"{"allow":true,"topics":["b","z"]}"#, &["a", "b"]).expect("valid");
        assert_eq!((answer.clone(), widened), (Answer::Allow(Some(topics(&["b"]))), true));
        assert_eq!(apply(answer, &topics(&["a", "b"])), Decision::Allow(topics(&["b"])));
        let (answer, widened) = read(200, r#"{"allow":true,"topics":["b","a"]}"#, &["a", "b"]).expect("valid");
        assert!(!widened);
        assert_eq!(apply(answer, &topics(&["a", "b"])), Decision::Allow(topics(&["a", "b"])), "the order asked");
        let (answer, _) = read(200, r#"{"allow":true,"topics":[]}"#, &["a"]).expect("valid");
        assert_eq!(apply(answer, &topics(&["a"])), Decision::Allow(vec![]));
    }

    #[test]
    fn a_denial_carries_a_4xx_status_and_a_bounded_reason() {
        let deny = |status: u16, reason: &str| Answer::Deny { status, reason: reason.to_owned() };
        assert_eq!(read(200, r#"{"allow":false,"status":402,"reason":"pay"}"#, &[]), Ok((deny(402, "pay"), false)));
        assert_eq!(read(200, r#"{"allow":false}"#, &[]), Ok((deny(403, DEFAULT_REASON), false)));
        for status in ["200", "500", "99999", "\"404\"", "-1", "4.5e2"] {
            let body = format!(r#"{{"allow":false,"status":{status},"reason":"no"}}"#);
            assert_eq!(read(200, &body, &[]), Ok((deny(403, "no"), false)), "status {status}");
        }
        assert_eq!(read(403, r#"{"reason":"blocked"}"#, &[]), Ok((deny(403, "blocked"), false)));
        assert_eq!(read(404, "<html>Not Found</html>", &[]), Ok((deny(404, DEFAULT_REASON), false)));
        assert_eq!(read(451, r#"{"allow":true}"#, &[]), Ok((deny(451, DEFAULT_REASON), false)), "the status wins");
        assert_eq!(read(429, r#"{"reason":42}"#, &[]), Ok((deny(429, DEFAULT_REASON), false)));
        let long = format!(r#"{{"allow":false,"reason":"{}"}}"#, "é".repeat(200));
        let Ok((Answer::Deny { reason, .. }, _)) = read(200, &long, &[]) else { panic!("a denial") };
        assert!(reason.len() <= MAX_REASON_BYTES && reason.chars().all(|c| c == 'é'), "{reason}");
    }

    #[test]
    fn anything_else_is_a_failure() {
        assert_eq!(read(500, "", &[]), Err(Failure::BadStatus(500)));
        assert_eq!(read(503, r#"{"allow":true}"#, &[]), Err(Failure::BadStatus(503)));
        assert_eq!(read(302, "", &[]), Err(Failure::BadStatus(302)));
        for body in ["ok", "{}", r#"{"allow":"true"}"#, r#"{"allow":1}"#, "[true]", r#"{"allow":true,"topics":"a"}"#] {
            assert!(matches!(read(200, body, &["a"]), Err(Failure::Malformed(_))), "{body}");
        }
    }

    fn request<'a>(user: &'a str, topics: &'a [String], claims: &'a RawValue, ip: &str) -> HookRequest<'a> {
        HookRequest { user, topics, claims, ip: ip.parse().expect("ip") }
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("json")
    }

    #[test]
    fn the_request_body_is_the_contract() {
        let asked = topics(&["a", "b"]);
        let claims = raw(r#"{"sub":"42","exp":9,"plan":{"tier":"gold"}}"#);
        let body = serde_json::to_value(request("42", &asked, &claims, "203.0.113.9")).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"user": "42", "topics": ["a", "b"], "claims": {"sub": "42", "exp": 9, "plan": {"tier": "gold"}}, "ip": "203.0.113.9"})
        );
    }

    #[test]
    fn the_cache_key_holds_every_input_but_volatile_claims() {
        let (ab, ba, a) = (topics(&["a", "b"]), topics(&["b", "a"]), topics(&["a"]));
        let claims = raw(r#"{"sub":"42","exp":1,"iat":1,"nbf":1,"plan":"gold","jti":"x"}"#);
        fn key(user: &str, topics: &[String], claims: &RawValue, ip: &str) -> Box<str> {
            cache_key(&request(user, topics, claims, ip)).expect("small")
        }
        let base = key("42", &ab, &claims, "192.0.2.1");
        assert_eq!(base, key("42", &ba, &claims, "192.0.2.1"), "topics are a set");
        let fresh = raw(r#"{"iat":2,"jti":"x","plan":"gold","exp":2,"sub":"42"}"#);
        assert_eq!(base, key("42", &ab, &fresh, "192.0.2.1"), "a fresh token of the same claims, in any order");
        assert_ne!(base, key("43", &ab, &claims, "192.0.2.1"));
        assert_ne!(base, key("42", &a, &claims, "192.0.2.1"));
        assert_ne!(base, key("42", &ab, &claims, "192.0.2.2"));
        assert_ne!(base, key("42", &ab, &raw(r#"{"sub":"42","plan":"free","jti":"x"}"#), "192.0.2.1"));
        assert_ne!(base, key("42", &ab, &raw(r#"{"sub":"42","plan":"gold","jti":"y"}"#), "192.0.2.1"));
        let huge = raw(&format!(r#"{{"sub":"42","blob":"{}"}}"#, "x".repeat(MAX_CACHE_KEY_BYTES)));
        assert!(cache_key(&request("42", &ab, &huge, "192.0.2.1")).is_none());
    }

    #[test]
    fn cached_answers_expire_and_the_budget_evicts_the_oldest() {
        let cache = AnswerCache::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let allow = Answer::Allow(None);
        cache.insert_at("a".into(), allow.clone(), t0, usize::MAX);
        assert_eq!(cache.get("a"), Some(allow.clone()));
        assert_eq!(cache.get("b"), None);
        // Stored again later: the first queue slot must not remove the newer entry.
        cache.insert_at("a".into(), Answer::Allow(Some(vec![])), t0 + Duration::from_secs(5), usize::MAX);
        cache.insert_at("b".into(), allow.clone(), t0 + Duration::from_secs(11), usize::MAX);
        assert_eq!(cache.len(), 2, "the slot of a's first store expired without removing a");
        cache.insert_at("c".into(), allow.clone(), t0 + Duration::from_secs(16), usize::MAX);
        assert_eq!(cache.len(), 2, "a expired");
        assert_eq!(cache.get("a"), None);
        // A budget of two entries: a third evicts the oldest.
        let budget = 2 * entry_size("x", &allow);
        let small = AnswerCache::new(Duration::from_secs(10));
        for (i, key) in ["x", "y", "z"].into_iter().enumerate() {
            small.insert_at(key.into(), allow.clone(), t0 + Duration::from_millis(i as u64), budget);
        }
        assert_eq!((small.get("x"), small.get("y").is_some(), small.get("z").is_some()), (None, true, true));
        assert_eq!(small.state.lock().expect("lock").bytes, budget);
    }
}
