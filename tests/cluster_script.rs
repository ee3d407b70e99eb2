//! scripts/cluster end to end: `up` starts redis, two nodes and nginx; a stream opened through
//! nginx receives what a producer publishes to Redis and what the publish API sends with the
//! token `up` minted; `status` sees every process; `down` stops exactly the recorded PIDs.
//! `up --tls` adds nginx's TLS + HTTP/2 listener with a certificate made on the spot.
//!
//! Needs redis-server and nginx (the script installs them with apt-get when missing; so does
//! scripts/test) and uses the node binary this test was built with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster")
}

/// `sse-loadtest`, which mints the cluster's tokens: built next to this build's node binary by
/// `cargo build --workspace --all-targets` (scripts/test runs it before the tests; a build from
/// inside a test could wait on the lock of the build running it).
fn loadtest_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sse-fanout")).with_file_name("sse-loadtest");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release --workspace --all-targets` first (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `scripts/cluster <args> --state-dir <dir>` with this build's binaries.
fn cluster(dir: &Path, args: &[&str]) -> Output {
    Command::new(script())
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .env("SSE_FANOUT_BIN", env!("CARGO_BIN_EXE_sse-fanout"))
        .env("SSE_LOADTEST_BIN", loadtest_binary())
        // Short drain so `down` (and a failed test's cleanup) is quick; also shows that SSE_*
        // settings in the caller's environment reach the nodes.
        .env("SSE_DRAIN_PERIOD", "2s")
        .output()
        .expect("run scripts/cluster")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A cluster state directory in the system temp dir; on drop (also when the test panics) it
/// runs `down` and removes the directory, so no process outlives the test.
struct ClusterDir {
    path: PathBuf,
}

impl ClusterDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!("sse-fanout-cluster-{}-{nanos}", std::process::id()));
        ClusterDir { path }
    }

    /// `name -> (pid, port)` from the `processes` file `up` writes.
    fn processes(&self) -> BTreeMap<String, (u32, u16)> {
        let text = std::fs::read_to_string(self.path.join("processes")).expect("read processes file");
        text.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [name, pid, port] = fields.as_slice() else {
                    panic!("bad processes line {line:?}");
                };
                (name.to_string(), (pid.parse().expect("pid"), port.parse().expect("port")))
            })
            .collect()
    }
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        if self.path.join("processes").exists() {
            let out = cluster(&self.path, &["down"]);
            if !out.status.success() {
                eprintln!("cleanup: scripts/cluster down failed: {}", describe(&out));
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// True once the PID is gone or a zombie waiting for init to reap it.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Reads the stream until `needle` appears in what was received so far, or fails after `limit`.
async fn read_until(response: &mut reqwest::Response, received: &mut String, needle: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !received.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, response.chunk()).await {
            Ok(Ok(Some(chunk))) => received.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => panic!("stream ended before {needle:?}; received:\n{received}"),
            Ok(Err(e)) => panic!("stream failed before {needle:?}: {e}; received:\n{received}"),
            Err(_) => panic!("no {needle:?} within {limit:?}; received:\n{received}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_streams_through_nginx_and_down_stops_every_process() {
    let dir = ClusterDir::new();

    let up = cluster(&dir.path, &["up", "--nodes", "2"]);
    assert!(up.status.success(), "scripts/cluster up failed: {}", describe(&up));
    let processes = dir.processes();
    let names: Vec<&str> = processes.keys().map(String::as_str).collect();
    assert_eq!(names, ["nginx", "node-1", "node-2", "redis"], "recorded processes");
    let (_, nginx_port) = processes["nginx"];
    let (_, redis_port) = processes["redis"];

    // What `up` prints is what a person copies: the URL and a working producer command.
    let printed = String::from_utf8_lossy(&up.stdout);
    assert!(printed.contains(&format!("http://127.0.0.1:{nginx_port}")), "up should print the nginx URL:\n{printed}");
    assert!(
        printed.contains(&format!("redis-cli -p {redis_port} PUBLISH sse:broadcast")),
        "up should print a redis-cli PUBLISH line:\n{printed}"
    );

    // A subscriber through nginx, with the token `up` minted.
    let token = std::fs::read_to_string(dir.path.join("tokens/subscriber.jwt")).expect("read subscriber token");
    let client = reqwest::Client::new();
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .get(format!("http://127.0.0.1:{nginx_port}/events"))
            .bearer_auth(token.trim())
            .header("Accept", "text/event-stream")
            .send(),
    )
    .await
    .expect("nginx answers /events within 10s")
    .expect("GET /events through nginx");
    assert_eq!(stream.status(), 200, "GET /events through nginx");
    let content_type = stream.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("text/event-stream"), "content-type {content_type:?}");

    let mut received = String::new();
    read_until(&mut stream, &mut received, "event: connected", Duration::from_secs(10)).await;
    assert!(
        received.contains("node-1") || received.contains("node-2"),
        "the connected event should name the serving node:\n{received}"
    );

    // A producer publishes straight to Redis; the message crosses the bus and nginx unbuffered.
    let publish = Command::new("redis-cli")
        .args(["-p", &redis_port.to_string(), "PUBLISH", "sse:broadcast"])
        .arg(r#"{"event":"cluster-check","data":{"n":42}}"#)
        .output()
        .expect("run redis-cli");
    assert!(publish.status.success(), "redis-cli PUBLISH failed: {}", describe(&publish));
    read_until(&mut stream, &mut received, "data: {\"n\":42}\n", Duration::from_secs(10)).await;
    assert!(received.contains("event: cluster-check\n"), "published event name lost:\n{received}");

    // The publisher token `up` printed works against the API through nginx.
    let publisher = std::fs::read_to_string(dir.path.join("tokens/publisher.jwt")).expect("read publisher token");
    let published = client
        .post(format!("http://127.0.0.1:{nginx_port}/api/publish"))
        .bearer_auth(publisher.trim())
        .json(&serde_json::json!({"broadcast": true, "event": "api-check", "data": {"n": 7}}))
        .send()
        .await
        .expect("POST /api/publish through nginx");
    assert_eq!(published.status(), 202, "POST /api/publish: {:?}", published.text().await);
    read_until(&mut stream, &mut received, "data: {\"n\":7}\n", Duration::from_secs(10)).await;
    assert!(received.contains("event: api-check\n"), "API event name lost:\n{received}");
    drop(stream);

    let status = cluster(&dir.path, &["status"]);
    assert!(status.status.success(), "status should succeed while all is up: {}", describe(&status));
    let table = String::from_utf8_lossy(&status.stdout);
    for name in ["redis", "node-1", "node-2", "nginx"] {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("status lists no {name}:\n{table}"));
        assert!(row.contains("alive"), "status row for {name}: {row}");
        if name != "redis" {
            assert!(row.contains("ready"), "status row for {name}: {row}");
        }
    }

    let down = cluster(&dir.path, &["down"]);
    assert!(down.status.success(), "scripts/cluster down failed: {}", describe(&down));
    let deadline = Instant::now() + Duration::from_secs(5);
    for (name, (pid, _)) in &processes {
        while !exited(*pid) {
            assert!(Instant::now() < deadline, "{name} (pid {pid}) still runs after down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after = cluster(&dir.path, &["status"]);
    assert!(!after.status.success(), "status after down should report no cluster: {}", describe(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_tls_serves_http2_with_a_fresh_self_signed_certificate() {
    let dir = ClusterDir::new();
    let up = cluster(&dir.path, &["up", "--nodes", "1", "--tls"]);
    assert!(up.status.success(), "scripts/cluster up --tls failed: {}", describe(&up));
    let printed = String::from_utf8_lossy(&up.stdout).into_owned();
    let line = printed.lines().find(|l| l.trim_start().starts_with("TLS + HTTP/2:")).unwrap_or_else(|| {
        panic!("up --tls printed no TLS URL:\n{printed}");
    });
    let url = line.split_whitespace().find(|w| w.starts_with("https://")).expect("an https URL").to_owned();
    let cert = dir.path.join("nginx/tls/tls.crt");
    assert!(cert.is_file() && printed.contains(&cert.display().to_string()), "{printed}");

    // doctor through the TLS listener, trusting the certificate `up` made: h2, and a stream
    // that carries a probe published through the same edge.
    let read = |name: &str| std::fs::read_to_string(dir.path.join("tokens").join(name)).expect("token");
    let out = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
        .args(["doctor", &format!("{url}/events"), "--heartbeat-wait", "0", "--ca-file"])
        .arg(&cert)
        .args(["--token", read("subscriber.jwt").trim(), "--publisher-token", read("publisher.jwt").trim()])
        .env_clear()
        .output()
        .expect("run doctor");
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.lines().any(|l| l.starts_with("OK") && l.contains("protocol") && l.contains("h2")), "{report}");
    assert!(report.lines().any(|l| l.starts_with("OK") && l.contains("probe")), "{report}");

    // Without --tls again, the same state dir serves plain HTTP only: the drop-in is gone.
    let down = cluster(&dir.path, &["down"]);
    assert!(down.status.success(), "{}", describe(&down));
    let up = cluster(&dir.path, &["up", "--nodes", "1"]);
    assert!(up.status.success(), "{}", describe(&up));
    assert!(!dir.path.join("nginx/tls").exists(), "a previous --tls run's listener is left behind");
    assert!(!String::from_utf8_lossy(&up.stdout).contains("https://"));
}
