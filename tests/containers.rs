//! docker-compose.yml and deploy/Dockerfile, run for real.
//!
//! `scripts/containers test` builds the images with podman, starts the compose project on free
//! host ports and runs the one test here against it (it is ignored in a plain `cargo test`,
//! which has no containers). The test checks what an operator of `docker compose up` relies
//! on, through the compose nginx where a user would go through it: every container healthy by
//! its own compose healthcheck, `/readyz` through nginx, the node running as the image's
//! non-root user with nothing but the compose environment, a publish on one node reaching
//! streams on the others, Prometheus scraping every node, and `compose stop` of a node draining
//! it within `stop_grace_period` while its streams resume on the other nodes and lose nothing.
//!
//! Every check prints `PASS <what>` as it passes; the first failure panics with what was seen.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::EventSource;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The services docker-compose.yml builds from deploy/Dockerfile.
const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// Streams opened through nginx: enough that least_conn puts several on every node.
const STREAMS: usize = 9;
const TOPIC: &str = "ctest";

/// The running compose project, as scripts/containers describes it in the environment.
struct Project {
    edge: String,
    prometheus: String,
    compose: PathBuf,
    name: String,
    secret: String,
    http: reqwest::Client,
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test runs inside `scripts/containers test`, not on its own")
    })
}

impl Project {
    fn from_env() -> Self {
        Self {
            edge: required_env("SSE_FANOUT_TEST_EDGE_URL"),
            prometheus: required_env("SSE_FANOUT_TEST_PROMETHEUS_URL"),
            compose: PathBuf::from(required_env("SSE_FANOUT_TEST_COMPOSE")),
            name: required_env("SSE_FANOUT_TEST_PROJECT"),
            secret: required_env("SSE_FANOUT_TEST_JWT_SECRET"),
            http: common::http(),
        }
    }

    fn token(&self, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(self.secret.as_bytes()))
            .expect("sign")
    }

    fn subscriber_token(&self, user: &str) -> String {
        self.token(json!({"sub": user, "exp": common::unix_now() + 3600, "topics": [TOPIC]}))
    }

    fn publisher_token(&self) -> String {
        self.token(json!({"sub": "ctest-publisher", "exp": common::unix_now() + 3600, "role": "publisher"}))
    }

    /// The container of a compose service, by the labels podman-compose (like docker compose)
    /// puts on it.
    fn container(&self, service: &str) -> String {
        let out = podman(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ]);
        let out = stdout(&out);
        let names: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(names.len(), 1, "one container for service {service}, found {names:?}");
        names[0].to_owned()
    }
}

/// `POST /api/publish` at `edge`; the status.
async fn publish(http: &reqwest::Client, edge: &str, token: &str, body: &Value) -> Result<u16, reqwest::Error> {
    let response = http.post(format!("{edge}/api/publish")).bearer_auth(token).json(body).send().await?;
    Ok(response.status().as_u16())
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman").args(args).output().expect("run podman")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn inspect(container: &str, format: &str) -> String {
    let out = podman(&["inspect", "--format", format, container]);
    assert!(out.status.success(), "podman inspect {container}: {}", String::from_utf8_lossy(&out.stderr));
    stdout(&out)
}

fn pass(what: impl std::fmt::Display) {
    println!("PASS {what}");
}

/// docker-compose.yml as compose reads it (anchors and `<<` merged).
fn compose_file() -> serde_norway::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("read docker-compose.yml");
    let mut value: serde_norway::Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    value.apply_merge().expect("merge keys");
    value
}

/// `${NAME}`, `${NAME:-default}` and `${NAME:?message}` replaced as compose replaces them.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|e| start + e).expect("closed ${");
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner.split(":?").next().unwrap_or(inner), None),
        };
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => out.push_str(&v),
            _ => out.push_str(default.unwrap_or_else(|| panic!("{name} is needed by docker-compose.yml"))),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A compose duration (`15s`, `1m30s`, `500ms`).
fn compose_duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_digit() {
                break;
            }
            unit.push(c);
            chars.next();
        }
        let value: f64 = number.parse().unwrap_or_else(|_| panic!("{text:?} is not a duration"));
        total += Duration::from_secs_f64(match unit.as_str() {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => panic!("{text:?}: unknown unit {unit:?}"),
        });
        number.clear();
    }
    assert!(number.is_empty(), "{text:?}: a number without a unit");
    total
}

/// The number carried by an event's data, `{"n": N}`.
fn n_of(data: &str) -> Option<u64> {
    serde_json::from_str::<Value>(data).ok()?["n"].as_u64()
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `within`.
async fn eventually<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose project that `scripts/containers test` starts"]
async fn compose_project_serves_scrapes_and_drains() {
    let project = Project::from_env();
    let compose = compose_file();
    let services = &compose["services"];

    // ---- every container healthy by its own compose healthcheck --------------------------------
    // podman schedules healthchecks with systemd timers; without systemd (containers, CI
    // sandboxes) it never runs them, so each is run here, as the timer would.
    for service in ["redis", "node1", "node2", "node3"] {
        let container = project.container(service);
        let healthy = eventually(Duration::from_secs(30), async || {
            let run = podman(&["healthcheck", "run", &container]);
            run.status.success().then_some(())
        })
        .await;
        let status = inspect(&container, "{{.State.Health.Status}}");
        assert!(healthy.is_some() && status == "healthy", "{service} is not healthy: {status}");
    }
    pass("redis, node1, node2, node3 healthy (their compose healthchecks, run by `podman healthcheck run`)");

    // ---- /readyz through nginx --------------------------------------------------------------
    let readyz = eventually(Duration::from_secs(30), async || {
        let response = project.http.get(format!("{}/readyz", project.edge)).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(readyz.is_some(), "GET {}/readyz through nginx did not answer 200 within 30 s", project.edge);
    pass(format!("GET /readyz through nginx ({}) 200", project.edge));

    // ---- the image's user, and nothing but the compose environment ---------------------------
    for node in NODES {
        let container = project.container(node);
        let user = inspect(&container, "{{.Config.User}}");
        assert_eq!(user, "10001:10001", "{node}: the container should run as the image's USER");
        let status = podman(&["exec", &container, "cat", "/proc/1/status"]);
        let uids = stdout(&status).lines().find(|l| l.starts_with("Uid:")).unwrap_or_default().to_owned();
        let uid_values: Vec<&str> = uids.split_whitespace().skip(1).collect();
        assert!(
            uid_values.len() == 4 && uid_values.iter().all(|u| *u == "10001"),
            "{node}: PID 1 should run as uid 10001 (real, effective, saved, fs), got {uids:?}"
        );
        let cmdline = podman(&["exec", &container, "cat", "/proc/1/cmdline"]);
        assert_eq!(
            String::from_utf8_lossy(&cmdline.stdout),
            "/usr/local/bin/sse-fanout\0",
            "{node}: PID 1 should be the binary, without arguments"
        );

        // What the binary reads: every SSE_* variable of the container. Expected: the compose
        // service's environment over the image's ENV (SSE_LISTEN), nothing more.
        let mut expected: BTreeMap<String, String> = BTreeMap::from([("SSE_LISTEN".into(), "0.0.0.0:8080".into())]);
        for (k, v) in services[node]["environment"].as_mapping().expect("environment is a mapping") {
            let value = match v {
                serde_norway::Value::String(s) => interpolate(s),
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                other => panic!("{node}: environment value {other:?}"),
            };
            expected.insert(k.as_str().expect("env name").to_owned(), value);
        }
        let env: Vec<String> = serde_json::from_str(&inspect(&container, "{{json .Config.Env}}")).expect("env JSON");
        let actual: BTreeMap<String, String> = env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.starts_with("SSE_"))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(names(&actual), names(&expected), "{node}: SSE_* variables differ from docker-compose.yml's");
        for (k, v) in &expected {
            assert_eq!(&actual[k], v, "{node}: {k}");
        }
        let ready = podman(&["exec", &container, "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/readyz"]);
        assert!(
            ready.status.success(),
            "{node}: /readyz inside the container: {}",
            String::from_utf8_lossy(&ready.stderr)
        );
    }
    pass(
        "node1..node3 run /usr/local/bin/sse-fanout as uid 10001, no arguments, SSE_* = docker-compose.yml's environment + the image's SSE_LISTEN, and are ready",
    );

    // ---- Prometheus scrapes every node ----------------------------------------------------------
    let want: BTreeSet<String> = NODES.iter().map(|n| format!("{n}:8080")).collect();
    let mut last = Value::Null;
    let scraped = eventually(Duration::from_secs(60), async || {
        let url = format!("{}/api/v1/query?query=up", project.prometheus);
        let body: Value = project.http.get(&url).send().await.ok()?.json().await.ok()?;
        last = body.clone();
        let up: BTreeSet<String> = body["data"]["result"]
            .as_array()?
            .iter()
            .filter(|r| r["metric"]["job"] == "sse-fanout" && r["value"][1] == "1")
            .filter_map(|r| r["metric"]["instance"].as_str().map(str::to_owned))
            .collect();
        (up == want).then_some(())
    })
    .await;
    assert!(scraped.is_some(), "Prometheus should report up=1 for {want:?} within 60 s; last answer: {last}");
    pass(format!("Prometheus ({}) reports up=1 for job sse-fanout on {want:?}", project.prometheus));

    // ---- streams through nginx; a publish on one node reaches the others -----------------------
    let sources: Vec<EventSource> = (0..STREAMS)
        .map(|i| {
            let token = project.subscriber_token(&format!("ctest-user-{i}"));
            EventSource::open(format!("{}/events?topic={TOPIC}&access_token={token}", project.edge))
        })
        .collect();
    for (i, source) in sources.iter().enumerate() {
        let connected = source.wait_for(Duration::from_secs(15), |s| !s.connections.is_empty()).await;
        assert!(connected, "stream {i} through nginx did not see `connected`: refused {:?}", source.seen().refused);
    }
    let first_node = |s: &EventSource| s.seen().connections[0].node_id.clone();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for source in &sources {
        *per_node.entry(first_node(source)).or_default() += 1;
    }
    assert!(per_node.len() >= 2, "nginx should spread {STREAMS} streams over the nodes, got {per_node:?}");
    pass(format!("{STREAMS} streams through nginx, on {per_node:?}"));

    let publisher = project.publisher_token();
    let (origin, _) = per_node.iter().next().expect("a node with streams");
    let origin = origin.clone();
    let body = json!({"topics": [TOPIC], "event": "cross", "data": {"n": 0}}).to_string();
    let published = podman(&[
        "exec",
        &project.container(&origin),
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {publisher}"),
        "-H",
        "Content-Type: application/json",
        "--data",
        &body,
        "http://127.0.0.1:8080/api/publish",
    ]);
    assert_eq!(stdout(&published), "202", "publish inside {origin}: {}", String::from_utf8_lossy(&published.stderr));
    let elsewhere: Vec<&EventSource> = sources.iter().filter(|s| first_node(s) != origin).collect();
    for source in &elsewhere {
        let got = source.wait_for(Duration::from_secs(5), |s| !s.data_of("cross").is_empty()).await;
        assert!(got, "a stream on {} did not receive the publish made on {origin}", first_node(source));
    }
    pass(format!("a publish made on {origin} reached the {} streams on the other nodes", elsewhere.len()));

    // ---- compose stop of one node: drained within stop_grace_period, nothing lost ---------------
    let (victim, on_victim) = per_node.iter().max_by_key(|(_, n)| **n).map(|(n, c)| (n.clone(), *c)).expect("nodes");
    let victim_container = project.container(&victim);
    let grace = compose_duration(services[victim.as_str()]["stop_grace_period"].as_str().expect("stop_grace_period"));
    let drain = compose_duration(
        services[victim.as_str()]["environment"]["SSE_DRAIN_PERIOD"].as_str().expect("SSE_DRAIN_PERIOD"),
    );

    // Publish through nginx all along, durably (the API's default), one message every 100 ms.
    let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher_task = {
        let (http, edge, token, publishing) =
            (project.http.clone(), project.edge.clone(), publisher.clone(), publishing.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), Vec::new());
            let mut n = 1;
            while publishing.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"topics": [TOPIC], "event": "m", "data": {"n": n}});
                match publish(&http, &edge, &token, &body).await {
                    Ok(202) => acked.push(n),
                    Ok(status) => refused.push((n, status.to_string())),
                    Err(e) => refused.push((n, e.to_string())),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let stop = {
        let compose = project.compose.clone();
        let victim = victim.clone();
        tokio::task::spawn_blocking(move || Command::new(compose).args(["stop", &victim]).output())
    };
    let stop = stop.await.expect("join").expect("run compose stop");
    let stopped_in = started.elapsed();
    assert!(stop.status.success(), "compose stop {victim}: {}", String::from_utf8_lossy(&stop.stderr));
    // A little more publishing after the node is gone, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    publishing.store(false, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = publisher_task.await.expect("publisher");

    let state = inspect(&victim_container, "{{.State.Status}} {{.State.ExitCode}}");
    assert_eq!(
        state, "exited 0",
        "{victim} should exit 0 after its drain (137 is SIGKILL at stop_grace_period), took {stopped_in:?}"
    );
    assert!(stopped_in < grace, "compose stop {victim} took {stopped_in:?}, over stop_grace_period {grace:?}");
    pass(format!(
        "compose stop {victim} ({on_victim} streams): drained and exited 0 in {:.1}s (SSE_DRAIN_PERIOD {drain:?}, stop_grace_period {grace:?})",
        stopped_in.as_secs_f64()
    ));

    assert!(!acked.is_empty(), "no publish through nginx was accepted during the drain: {refused:?}");
    let everything = |s: &common::Seen| s.data_of("m").iter().filter_map(|d| n_of(d)).collect::<Vec<_>>() == acked;
    for (i, source) in sources.iter().enumerate() {
        let complete = source.wait_for(Duration::from_secs(30), everything).await;
        let seen = source.seen();
        let got: Vec<u64> = seen.data_of("m").iter().filter_map(|d| n_of(d)).collect();
        let missing: Vec<&u64> = acked.iter().filter(|n| !got.contains(n)).collect();
        assert!(
            complete,
            "stream {i} (first on {}) should have every accepted message once, in order: missing {missing:?}, got {got:?}",
            seen.connections[0].node_id
        );
        let resets = seen.events.iter().filter(|e| e.event == "reset").count();
        assert_eq!(resets, 0, "stream {i}: `reset` events {:?}", seen.data_of("reset"));
        assert!(seen.refused.is_empty(), "stream {i}: reconnects refused through nginx: {:?}", seen.refused);
        if seen.connections[0].node_id == victim {
            let last = &seen.connections.last().expect("connections").node_id;
            assert!(
                seen.connections.len() >= 2 && *last != victim,
                "stream {i} was on {victim} and did not move: {:?}",
                seen.connections.iter().map(|c| &c.node_id).collect::<Vec<_>>()
            );
        }
    }
    pass(format!(
        "the {on_victim} streams of {victim} resumed on the other nodes; all {STREAMS} streams got the {} messages accepted during the drain exactly once, in order, no reset ({} publishes refused: {:?})",
        acked.len(),
        refused.len(),
        refused
    ));
}
