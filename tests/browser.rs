//! What a real browser gets: headless Chromium (Debian's `chromium`, driven by playwright-core
//! through `tests/browser/driver.cjs`) against redis-server, nodes and nginx rendered from
//! `nginx/cluster.conf.template`, as `scripts/cluster` runs them. Pages live on an origin of
//! their own (the driver's page server), as a site using the cluster does, so every stream is
//! a cross-origin `EventSource` through nginx.
//!
//! One Chromium serves every test of this binary (a context, i.e. a profile, per test or per
//! simulated person). Run alone with `scripts/test --browser`, which installs Chromium and
//! playwright-core when missing, or `cargo test --release --test browser` once they are there.

mod common;
#[path = "browser/driver.rs"]
mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use driver::{Context, Driver, SourceSeen, artifacts_dir, driver};
use serde_json::json;

/// `retry:` the nodes send: short, so reconnects in these tests take about a second.
const RETRY: &str = "1s";
/// Drain period: the farewells of a draining node go out within it.
const DRAIN: &str = "2s";
/// Long enough for anything a browser does here on a loaded two-core machine.
const WITHIN: Duration = Duration::from_secs(15);

/// The shared browser (started by the first test that gets here; it takes a second or two).
async fn browser() -> &'static Driver {
    let d = tokio::task::spawn_blocking(driver).await.expect("start the browser driver");
    eprintln!("Chromium {} (pages on {} and {})", d.chromium, d.app_origin, d.other_origin);
    d
}

struct Cluster {
    redis: RedisServer,
    nodes: Vec<Node>,
    nginx: Nginx,
}

/// Redis, `n` nodes (node-1..) with history, allowing the driver's app origin, and nginx in
/// front (with its TLS + HTTP/2 listener when `tls`).
async fn cluster(n: usize, tls: bool) -> Cluster {
    cluster_with(n, tls, &[]).await
}

/// [`cluster`] with more settings for the nodes.
async fn cluster_with(n: usize, tls: bool, env: &[(&str, &str)]) -> Cluster {
    let origin = browser().await.app_origin.clone();
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let id = format!("node-{i}");
        let mut settings = vec![
            ("SSE_REDIS_URL", url.as_str()),
            ("SSE_NODE_ID", id.as_str()),
            ("SSE_RETRY_INTERVAL", RETRY),
            ("SSE_DRAIN_PERIOD", DRAIN),
            ("SSE_CORS_ORIGINS", origin.as_str()),
        ];
        settings.extend_from_slice(env);
        nodes.push(Node::start(&settings).await);
    }
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let nginx = if tls { Nginx::start_tls(&ports).await } else { Nginx::start(&ports).await };
    Cluster { redis, nodes, nginx }
}

impl Cluster {
    fn events_url(&self, user: &str, query: &str) -> String {
        self.nginx.url(&format!("/events?access_token={}{query}", token(user, &["*"], None)))
    }
}

fn note(data: &str) -> String {
    json!({"event": "note", "data": data}).to_string()
}

/// Publishes durably (`FCALL sse_publish`) to `channel` every `every` until stopped: `tick`
/// events 0, 1, 2, ...
struct Ticker {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    async fn start(redis: &RedisServer, channel: &str, every: Duration) -> Self {
        let mut producer = Producer::connect(redis).await;
        let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stop2, count2, channel) = (stop.clone(), count.clone(), channel.to_owned());
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            while !stop2.load(Ordering::SeqCst) {
                interval.tick().await;
                let n = count2.load(Ordering::SeqCst);
                producer.durable(&channel, &json!({"event": "tick", "data": n.to_string()}).to_string()).await;
                count2.store(n + 1, Ordering::SeqCst);
            }
        });
        Self { stop, count, task }
    }

    async fn wait_more(&self, n: u64) {
        let target = self.count.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + WITHIN;
        while self.count.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the ticker stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("ticker task");
        self.count.load(Ordering::SeqCst)
    }
}

fn connected(seen: &SourceSeen) -> bool {
    !seen.data_of("connected").is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_streams_with_a_query_token_or_the_cookie_and_a_foreign_origin_is_refused() {
    let c = cluster(1, false).await;
    let d = browser().await;
    let user_token = token("cors-user", &[], None);
    let cookie = json!({"name": "sse_token", "value": user_token, "url": c.nginx.url("/"), "sameSite": "Lax"});
    let context = Context::with(json!({"cookies": [cookie]})).await;
    let page = context.app_page().await;
    let by_query = page.open(&c.nginx.url(&format!("/events?access_token={user_token}")), true, &["note"]).await;
    let by_cookie = page.open(&c.nginx.url("/events"), true, &["note"]).await;
    for source in [by_query, by_cookie] {
        page.wait_for(source, WITHIN, connected).await;
    }
    c.redis.publish("sse:user:cors-user", &note("across origins")).await;
    for source in [by_query, by_cookie] {
        let seen = page.wait_for(source, WITHIN, |s| !s.data_of("note").is_empty()).await;
        assert_eq!(seen.data_of("note"), ["across origins"], "source {source}");
        assert_eq!((seen.opens, seen.ready_state), (1, 1), "source {source}: {seen:?}");
    }

    // The same page served from an origin SSE_CORS_ORIGINS does not list: the node answers
    // 403 origin_not_allowed, and EventSource gives up at once (no retry).
    let foreign = context.page(&format!("{}/", d.other_origin)).await;
    let refused_query =
        foreign.open(&c.nginx.url(&format!("/events?access_token={user_token}")), true, &["note"]).await;
    let refused_cookie = foreign.open(&c.nginx.url("/events"), true, &["note"]).await;
    for source in [refused_query, refused_cookie] {
        let seen = foreign.wait_for(source, WITHIN, |s| s.ready_state == 2).await;
        assert_eq!((seen.opens, seen.events.len(), seen.errors.as_slice()), (0, 0, &[2][..]), "{seen:?}");
    }
    let deadline = Instant::now() + WITHIN;
    while c.nginx.access_log().lines().filter(|l| l.contains("GET /events") && l.contains(" 403 ")).count() < 2 {
        assert!(Instant::now() < deadline, "nginx logged no two 403s:\n{}", c.nginx.access_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_topic_and_broadcast_events_reach_add_event_listener_byte_exact() {
    let c = cluster(1, false).await;
    let context = Context::new().await;
    let page = context.app_page().await;
    let source = page.open(&c.events_url("pay-user", "&topic=news"), false, &["note", "admin", "done"]).await;
    page.wait_for(source, WITHIN, connected).await;

    c.redis.publish("sse:user:pay-user", &note("to the user")).await;
    page.wait_for(source, WITHIN, |s| s.data_of("note").len() == 1).await;
    c.redis.publish("sse:topic:news", &note("to the topic")).await;
    page.wait_for(source, WITHIN, |s| s.data_of("note").len() == 2).await;
    c.redis.publish("sse:broadcast", &note("to everyone")).await;
    page.wait_for(source, WITHIN, |s| s.data_of("note").len() == 3).await;

    let big: String = (0..64 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let injection = "legit\n\nevent: admin\ndata: pwned\nid: 666\nretry: 1\n\n: comment";
    // (what a producer sends as `data`, what EventSource must hand the page)
    let strings: Vec<(String, String)> = vec![
        ("one\ntwo\nthree".into(), "one\ntwo\nthree".into()),
        ("crlf\r\nline".into(), "crlf\nline".into()),
        // A lone CR ends a line as well (WHATWG: CRLF, LF or CR).
        ("lone\rcr".into(), "lone\ncr".into()),
        ("\nleading, doubled\n\nand trailing\n".into(), "\nleading, doubled\n\nand trailing\n".into()),
        (
            "unicode: héllo wörld, 日本語, emoji 🎉, RTL שלום".into(),
            "unicode: héllo wörld, 日本語, emoji 🎉, RTL שלום".into(),
        ),
        (big.clone(), big),
        (String::new(), String::new()),
        (injection.into(), injection.into()),
    ];
    for (sent, _) in &strings {
        c.redis.publish("sse:user:pay-user", &note(sent)).await;
    }
    // JSON data is sent as compact JSON in the producer's key order and number spelling.
    let objects = [
        r#"{"z":1,"a":{"y":[1,2,{"b":null}],"x":"é"},"m":true}"#,
        r#"{"big":123456789012345678901234567890,"neg":-9007199254740993,"f":1.0000000000000002,"e":1e400}"#,
    ];
    for object in objects {
        c.redis.publish("sse:user:pay-user", &format!(r#"{{"event":"note","data":{object}}}"#)).await;
    }
    // An event name with a line break is refused by the node, never written.
    c.redis.publish("sse:user:pay-user", &json!({"event": "note\nevent: admin", "data": "x"}).to_string()).await;
    // Not an envelope: delivered verbatim as a `message`.
    c.redis.publish("sse:user:pay-user", "plain text, not JSON").await;
    c.redis.publish("sse:user:pay-user", &json!({"event": "done", "data": "."}).to_string()).await;

    let seen = page.wait_for(source, WITHIN, |s| !s.data_of("done").is_empty()).await;
    let mut expected: Vec<&str> = vec!["to the user", "to the topic", "to everyone"];
    expected.extend(strings.iter().map(|(_, got)| got.as_str()));
    expected.extend(objects);
    let notes = seen.data_of("note");
    assert_eq!(notes.len(), expected.len(), "{notes:?}");
    for (i, (got, want)) in notes.iter().zip(&expected).enumerate() {
        assert!(
            got == want,
            "note {i}: got {} bytes {:?}, want {} bytes {:?}",
            got.len(),
            clip(got),
            want.len(),
            clip(want)
        );
    }
    assert!(seen.data_of("admin").is_empty(), "an injected event was dispatched: {:?}", seen.data_of("admin"));
    assert_eq!(seen.data_of("message"), ["plain text, not JSON"]);
    // The injected `id:` and `retry:` stayed data: the page's last event id is not 666.
    assert!(seen.events.iter().all(|e| e.last_event_id != "666"));
    assert_eq!((seen.opens, seen.ready_state), (1, 1), "the stream stayed open: {:?}", seen.errors);
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_in_two_tabs_never_see_each_other_and_one_user_s_eight_tabs_in_two_profiles_get_everything() {
    let c = cluster(2, false).await;
    let context = Context::new().await;
    let (alice, bob) = (context.app_page().await, context.app_page().await);
    let a = alice.open(&c.events_url("alice", ""), false, &["note"]).await;
    let b = bob.open(&c.events_url("bob", ""), false, &["note"]).await;
    alice.wait_for(a, WITHIN, connected).await;
    bob.wait_for(b, WITHIN, connected).await;
    c.redis.publish("sse:user:alice", &note("for alice")).await;
    c.redis.publish("sse:user:bob", &note("for bob")).await;
    c.redis.publish("sse:broadcast", &note("for all")).await;
    let seen_a = alice.wait_for(a, WITHIN, |s| s.data_of("note").contains(&"for all")).await;
    let seen_b = bob.wait_for(b, WITHIN, |s| s.data_of("note").contains(&"for all")).await;
    // Per channel order holds; across channels it may interleave.
    let sorted = |mut v: Vec<&str>| {
        v.sort();
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(sorted(seen_a.data_of("note")), ["for alice", "for all"]);
    assert_eq!(sorted(seen_b.data_of("note")), ["for all", "for bob"]);

    // One person, two browser profiles, four tabs each: eight streams over both nodes.
    let profiles = [Context::new().await, Context::new().await];
    let mut tabs = Vec::new();
    for profile in &profiles {
        for _ in 0..4 {
            let page = profile.app_page().await;
            let source = page.open(&c.events_url("carol", ""), false, &["note"]).await;
            tabs.push((page, source));
        }
    }
    let mut nodes = std::collections::BTreeSet::new();
    for (page, source) in &tabs {
        nodes.extend(page.wait_for(*source, WITHIN, connected).await.nodes());
    }
    let sent: Vec<String> = (0..5).map(|i| format!("carol {i}")).collect();
    for data in &sent {
        c.redis.publish("sse:user:carol", &note(data)).await;
    }
    for (i, (page, source)) in tabs.iter().enumerate() {
        let seen = page.wait_for(*source, WITHIN, |s| s.data_of("note").len() >= sent.len()).await;
        assert_eq!(seen.data_of("note"), sent, "tab {i}");
    }
    eprintln!("carol's eight tabs were on {nodes:?}");
}

/// Which of `nodes` is `node_id`.
fn node_index(nodes: &[Node], id: &str) -> usize {
    id.strip_prefix("node-")
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n - 1)
        .filter(|&i| i < nodes.len())
        .unwrap_or_else(|| panic!("unknown node {id}"))
}

/// The browser's own reconnect loop, after the node serving the page goes away (`signal`):
/// EventSource reconnects through nginx to the other node, sends `Last-Event-ID` itself, and
/// the page gets every tick exactly once, in order.
async fn browser_resumes_exactly_after(signal: &str) {
    let mut c = cluster(2, false).await;
    let context = Context::new().await;
    let page = context.app_page().await;
    let source = page.open(&c.events_url("resume-user", ""), false, &["tick"]).await;
    let first = page.wait_for(source, WITHIN, connected).await.nodes()[0].clone();
    let ticker = Ticker::start(&c.redis, "sse:user:resume-user", Duration::from_millis(50)).await;
    page.wait_for(source, WITHIN, |s| s.data_of("tick").len() >= 3).await;

    let mut victim = c.nodes.remove(node_index(&c.nodes, &first));
    victim.signal(signal);
    victim.wait_exit(WITHIN).await;
    page.wait_for(source, WITHIN, |s| s.nodes().len() >= 2).await;
    ticker.wait_more(10).await;
    let published = ticker.stop().await;

    let seen = page.wait_for(source, WITHIN, |s| s.data_of("tick").len() as u64 >= published).await;
    let expected: Vec<String> = (0..published).map(|n| n.to_string()).collect();
    assert_eq!(seen.data_of("tick"), expected, "every tick exactly once, in order");
    assert!(seen.data_of("reset").is_empty(), "{:?}", seen.data_of("reset"));
    let nodes = seen.nodes();
    assert_eq!(nodes.len(), 2, "one reconnect: {nodes:?}");
    assert_ne!(nodes[1], first);
    // EventSource reported the break (readyState 0: reconnecting) and opened again by itself.
    assert_eq!((seen.opens, seen.errors.as_slice()), (2, &[0][..]), "{seen:?}");
    // The surviving node resumed from the cursor the browser sent: nothing else connects here.
    c.nodes[0].wait_metric("sse_resumes_total", "outcome=\"exact\"", 1.0).await;
    seen.data_of("disconnected")
        .iter()
        .for_each(|d| assert_eq!(*d, r#"{"reason":"shutdown"}"#, "only a drain says goodbye"));
    if signal == "TERM" {
        assert_eq!(seen.data_of("disconnected").len(), 1, "the drain's farewell");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_resumes_exactly_after_its_node_is_killed() {
    browser_resumes_exactly_after("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_resumes_exactly_after_its_node_drains() {
    browser_resumes_exactly_after("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_mode_demo_page_connects_shows_events_and_its_form_delivers() {
    browser().await;
    // Development mode: no key, no Redis; the page and its tokens come from the node.
    let node = Node::start_raw(&[]).await;
    let nginx = Nginx::start(&[node.port]).await;
    let stdout = node.stdout_text();
    let publisher = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Publisher token:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no publisher token printed:\n{stdout}"))
        .to_owned();
    let context = Context::new().await;
    let page = context.page(&nginx.url("/")).await;
    let text = |selector: &'static str| {
        let page = &page;
        async move { page.call("textContent", json!([selector])).await.as_str().unwrap_or_default().to_owned() }
    };
    let deadline = Instant::now() + WITHIN;
    while text("#status").await != "open" {
        assert!(Instant::now() < deadline, "the demo page never connected: {}", text("#status").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let response = http()
        .post(nginx.url("/api/publish"))
        .bearer_auth(&publisher)
        .json(&json!({"users": ["demo-user"], "event": "notification", "data": {"from": "the test"}}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 202);
    let deadline = Instant::now() + WITHIN;
    while !text("#log").await.contains(r#"notification  {"from":"the test"}"#) {
        assert!(Instant::now() < deadline, "the published event is not shown: {}", text("#log").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    page.call("selectOption", json!(["#target", "topic"])).await;
    page.call("fill", json!(["#data", r#"{"from": "the form"}"#])).await;
    page.call("click", json!(["button[type=submit]"])).await;
    let deadline = Instant::now() + WITHIN;
    loop {
        let log = text("#log").await;
        if log.contains(r#"notification  {"from":"the form"}"#) && log.contains("publish  202") {
            break;
        }
        assert!(Instant::now() < deadline, "the form's publish did not arrive: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let shot = artifacts_dir().join("demo-page.png");
    let _ = std::fs::remove_file(&shot);
    page.call("screenshot", json!([{"path": shot, "fullPage": true}])).await;
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot at {}", shot.display());
    println!("demo page screenshot: {}", shot.display());
    eprintln!("demo page screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_gives_up_on_every_status_but_200_and_retries_network_errors() {
    let d = browser().await;
    let node = Node::start(&[("SSE_CORS_ORIGINS", d.app_origin.as_str())]).await;
    let context = Context::new().await;
    let page = context.app_page().await;
    // (url, what it answers); same-origin on the driver's page server, then the real node.
    let stops = [
        "/status/204",
        "/status/401",
        "/status/403",
        "/status/429",
        "/status/500",
        "/status/502",
        "/status/503",
        "/wrong-type",
    ];
    let mut closed = Vec::new();
    for path in stops {
        closed.push((path.to_owned(), page.open(path, false, &[]).await));
    }
    // The node's own refusals: no token (401) and a topic the token does not grant (403).
    let no_token = page.open(&node.url("/events"), false, &[]).await;
    let not_granted = page
        .open(&node.url(&format!("/events?access_token={}&topic=secret", token("u", &["public"], None))), false, &[])
        .await;
    let dropped = page.open("/drop", false, &[]).await;
    let ends = page.open("/ends", false, &[]).await;

    for (path, source) in &closed {
        let seen = page.wait_for(*source, WITHIN, |s| s.ready_state == 2).await;
        assert_eq!((seen.opens, seen.errors.as_slice()), (0, &[2][..]), "{path}: {seen:?}");
    }
    for source in [no_token, not_granted] {
        let seen = page.wait_for(source, WITHIN, |s| s.ready_state == 2).await;
        assert_eq!((seen.opens, seen.errors.as_slice()), (0, &[2][..]), "{seen:?}");
    }
    // A network error (connection cut before any answer) is retried after the default delay
    // (Chromium: 3 s); a 200 stream that ends is retried after its `retry:` (200 ms).
    page.wait_for(dropped, WITHIN, |s| s.errors.len() >= 2).await;
    let seen = page.wait_for(ends, WITHIN, |s| s.opens >= 3).await;
    assert!(seen.data_of("message").len() >= 3 && seen.errors.iter().all(|&r| r == 0), "{seen:?}");
    assert!(d.hits("/drop").await >= 2);
    // Nothing that gave up asked twice.
    for (path, _) in &closed {
        assert_eq!(d.hits(path).await, 1, "{path} was asked again");
    }
}

/// Opens `n` EventSources of one user in one page; returns their indexes.
async fn open_many(page: &driver::Page, url: &str, n: usize) -> Vec<usize> {
    let mut sources = Vec::new();
    for _ in 0..n {
        sources.push(page.open(url, false, &["note"]).await);
    }
    sources
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_twelve_streams_of_one_user_all_get_every_event_and_http1_caps_them_at_six() {
    let c = cluster(2, true).await;
    let user_token = token("h2-user", &[], None);

    // HTTP/2 through nginx's TLS listener (self-signed: the profile ignores certificate errors).
    let h2 = Context::with(json!({"ignoreHTTPSErrors": true})).await;
    let page = h2.app_page().await;
    let url = c.nginx.tls_url(&format!("/events?access_token={user_token}"));
    open_many(&page, &url, 12).await;
    page.wait_all(WITHIN, connected).await;
    for i in 0..3 {
        c.redis.publish("sse:user:h2-user", &note(&format!("h2 {i}"))).await;
    }
    let seen = page.wait_all(WITHIN, |s| s.data_of("note").len() >= 3).await;
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.data_of("note"), ["h2 0", "h2 1", "h2 2"], "stream {i}");
    }

    // The same twelve over HTTP/1.1 (nginx's plain listener): the browser opens six
    // connections to the origin and the other six EventSources wait for one, indefinitely.
    let h1 = Context::new().await;
    let page1 = h1.app_page().await;
    open_many(&page1, &c.nginx.url(&format!("/events?access_token={user_token}")), 12).await;
    let deadline = Instant::now() + WITHIN;
    while page1.seen_all().await.iter().filter(|s| connected(s)).count() < 6 {
        assert!(Instant::now() < deadline, "six streams never opened over HTTP/1.1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.redis.publish("sse:user:h2-user", &note("h1")).await;
    // Long enough for a seventh to have opened if it could (they opened within milliseconds).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen1 = page1.seen_all().await;
    let open: Vec<&SourceSeen> = seen1.iter().filter(|s| s.opens == 1).collect();
    let waiting: Vec<&SourceSeen> = seen1.iter().filter(|s| s.opens == 0).collect();
    assert_eq!((open.len(), waiting.len()), (6, 6), "{seen1:#?}");
    assert!(open.iter().all(|s| s.data_of("note") == ["h1"]), "{open:#?}");
    assert!(waiting.iter().all(|s| s.ready_state == 0 && s.events.is_empty()), "{waiting:#?}");
    // The HTTP/2 page got it too, on all twelve.
    let seen = page.wait_all(WITHIN, |s| s.data_of("note").len() >= 4).await;
    assert!(seen.iter().all(|s| s.data_of("note")[3] == "h1"));

    // nginx logs each stream when it ends: twelve over HTTP/2.0 once the profile is closed.
    drop(h2);
    let deadline = Instant::now() + WITHIN;
    loop {
        let log = c.nginx.access_log();
        let h2_streams = log.lines().filter(|l| l.contains("GET /events") && l.contains(" HTTP/2.0\" 200")).count();
        if h2_streams == 12 {
            break;
        }
        assert!(Instant::now() < deadline, "{h2_streams} HTTP/2 streams logged, expected 12:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = &c.nodes;
}

/// `SSE_ENABLE_COMPRESSION` through nginx (its own gzip off for `/events`, as the template has
/// it): Chromium asks for gzip, gets the node's gzip stream (one deflated piece per event, each
/// ended with a sync flush) and dispatches every event as soon as it arrives, byte for byte.
/// Nothing else is sent between two events (the heartbeat is 30 s away), so an event the
/// browser's decoder held back until more bytes came would not arrive in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_through_nginx_delivers_every_event_at_once_and_byte_exact() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = cluster_with(1, false, &[("SSE_ENABLE_COMPRESSION", "true"), ("SSE_HEARTBEAT_INTERVAL", "30s")]).await;
    // What Chromium sends gets a gzip stream through nginx (the page cannot read the header of
    // its EventSource's response; a socket can).
    let url = c.events_url("gz-user", "");
    let target = url.split_once("/events").map(|(_, rest)| format!("/events{rest}")).expect("a path");
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", c.nginx.port)).await.expect("connect to nginx");
    let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(WITHIN, socket.read(&mut buf)).await.expect("a head in time").expect("read");
        assert!(n > 0, "nginx closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.contains("content-encoding: gzip"), "nginx passes the node's gzip stream through:\n{head}");
    drop(socket);

    let context = Context::new().await;
    let page = context.app_page().await;
    let source = page.open(&url, false, &["note"]).await;
    page.wait_for(source, WITHIN, connected).await;
    let big: String = (0..40_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let json = json!({"items": (0..300).map(|i| json!({"id": i, "name": format!("item {i}"), "ok": i % 2 == 0})).collect::<Vec<_>>()})
        .to_string();
    let payloads: Vec<String> = vec![
        "small, stored".into(),
        json,
        "unicode: héllo wörld, 日本語, emoji 🎉".into(),
        big,
        "multi\nline\r\nwith a lone\rcr".into(),
        String::new(),
        "x".repeat(600),
    ];
    let mut delays = Vec::new();
    for (k, data) in payloads.iter().enumerate() {
        let started = Instant::now();
        c.redis.publish("sse:user:gz-user", &note(data)).await;
        let seen = page.wait_for(source, WITHIN, |s| s.data_of("note").len() == k + 1).await;
        delays.push(started.elapsed());
        let expected = data.replace("\r\n", "\n").replace('\r', "\n");
        assert!(seen.data_of("note")[k] == expected, "event {k} arrived changed");
    }
    let seen = page.seen(source).await;
    assert_eq!((seen.opens, seen.ready_state), (1, 1), "one open stream, never an error: {:?}", seen.errors);
    // At once: far below the 30 s until the next heartbeat (polling the page adds ~100 ms).
    assert!(delays.iter().all(|d| *d < Duration::from_secs(5)), "delays: {delays:?}");
    eprintln!("compressed events reached the page after {delays:?}");
}
