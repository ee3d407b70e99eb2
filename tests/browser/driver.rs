//! The Rust side of `tests/browser/driver.cjs`: one headless Chromium for the whole test binary
//! (started by the first test that asks, closed when the binary exits and the driver's stdin
//! ends), browser contexts (profiles) closed when their guard drops, and pages that open
//! `EventSource`s and report what they dispatched.
//!
//! One browser with several contexts rather than one browser per test: the machine has two
//! cores, and each Chromium is a handful of processes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// The running driver: Chromium plus the two page origins.
pub struct Driver {
    stdin: Mutex<ChildStdin>,
    pending: Pending,
    next_id: AtomicU64,
    /// An origin the nodes' `SSE_CORS_ORIGINS` lists (the driver's first page server).
    pub app_origin: String,
    /// An origin no node lists.
    pub other_origin: String,
    pub chromium: String,
    log: PathBuf,
    _child: Mutex<Child>,
}

/// Where scripts/test installs playwright-core.
fn node_modules() -> PathBuf {
    if let Some(dir) = std::env::var_os("SSE_NODE_MODULES") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/sse-fanout-tools/npm/node_modules")
}

/// Files the tests leave for a person to look at (screenshots) and the driver's log.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("create the artifacts dir");
    dir
}

/// The shared driver, started on first use.
pub fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(Driver::start)
}

impl Driver {
    fn start() -> Self {
        let modules = node_modules();
        assert!(
            modules.join("playwright-core/package.json").exists(),
            "playwright-core is not installed in {}: run `scripts/test --browser` once (it installs \
             Debian's chromium and playwright-core), or set SSE_NODE_MODULES",
            modules.display()
        );
        // One test binary drives the browser at a time; the last run's log is the one to read.
        let log = artifacts_dir().join("driver.log");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/driver.cjs");
        let mut child = Command::new("node")
            .arg(&script)
            .env("SSE_NODE_MODULES", &modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("driver log"))
            .spawn()
            .expect("node must be installed (scripts/test installs it)");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        let ready: Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!(
                "the browser driver did not start: {first:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let pending: Pending = Arc::default();
        let dispatch = pending.clone();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                let Ok(answer) = serde_json::from_str::<Value>(&line) else { continue };
                let Some(id) = answer["id"].as_u64() else { continue };
                let Some(tx) = dispatch.lock().expect("lock").remove(&id) else { continue };
                let result = if answer["ok"] == json!(true) {
                    Ok(answer["result"].clone())
                } else {
                    Err(answer["error"].as_str().unwrap_or("?").to_owned())
                };
                let _ = tx.send(result);
            }
            // The driver is gone: every caller still waiting gets an error instead of hanging.
            dispatch.lock().expect("lock").clear();
        });
        let text = |key: &str| ready[key].as_str().unwrap_or_default().to_owned();
        Self {
            stdin: Mutex::new(stdin),
            pending,
            next_id: AtomicU64::new(1),
            app_origin: text("app"),
            other_origin: text("other"),
            chromium: text("chromium"),
            log,
            _child: Mutex::new(child),
        }
    }

    fn send(&self, id: u64, mut command: Value) {
        command["id"] = json!(id);
        let mut line = command.to_string();
        line.push('\n');
        let _ = self.stdin.lock().expect("lock").write_all(line.as_bytes());
    }

    /// Runs one command and returns its result; panics with the driver's error.
    pub async fn call(&self, command: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("lock").insert(id, tx);
        let op = command["op"].clone();
        self.send(id, command);
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(Ok(value))) => value,
            Ok(Ok(Err(e))) => panic!("browser command {op} failed: {e}"),
            Ok(Err(_)) => panic!("the browser driver exited; log:\n{}", self.log_text()),
            Err(_) => panic!("browser command {op} took over 60 s"),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many requests the page servers received for `path`.
    pub async fn hits(&self, path: &str) -> u64 {
        self.call(json!({"op": "hits", "path": path})).await.as_u64().unwrap_or(0)
    }
}

/// A browser context: a profile of its own (cookies, connection pool), closed on drop.
pub struct Context {
    handle: u64,
}

impl Context {
    pub async fn new() -> Self {
        Self::with(json!({})).await
    }

    /// With driver options: `cookies` (Playwright cookie objects), `ignoreHTTPSErrors`.
    pub async fn with(options: Value) -> Self {
        let mut command = json!({"op": "newContext"});
        if let (Some(command), Some(options)) = (command.as_object_mut(), options.as_object()) {
            command.extend(options.clone());
        }
        let handle = driver().call(command).await.as_u64().expect("a context handle");
        Self { handle }
    }

    /// A tab showing `url` (loaded).
    pub async fn page(&self, url: &str) -> Page {
        let handle =
            driver().call(json!({"op": "newPage", "context": self.handle, "url": url})).await.as_u64().expect("handle");
        Page { handle }
    }

    /// A tab on the allowed page origin, with the harness loaded.
    pub async fn app_page(&self) -> Page {
        self.page(&format!("{}/", driver().app_origin)).await
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Fire and forget: nobody waits for the answer.
        let d = driver();
        d.send(d.next_id.fetch_add(1, Ordering::Relaxed), json!({"op": "closeContext", "context": self.handle}));
    }
}

/// What one `EventSource` dispatched.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSeen {
    pub events: Vec<BrowserEvent>,
    /// `open` events: one per established stream.
    pub opens: u32,
    /// `readyState` at each `error` event (0: reconnecting, 2: closed for good).
    pub errors: Vec<u8>,
    /// 0 connecting, 1 open, 2 closed.
    pub ready_state: u8,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowserEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: String,
    pub last_event_id: String,
}

impl SourceSeen {
    /// Data of the events named `kind`.
    pub fn data_of(&self, kind: &str) -> Vec<&str> {
        self.events.iter().filter(|e| e.kind == kind).map(|e| e.data.as_str()).collect()
    }

    /// The node of each `connected` event, in order.
    pub fn nodes(&self) -> Vec<String> {
        self.data_of("connected")
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok()?["node_id"].as_str().map(str::to_owned))
            .collect()
    }
}

/// One tab.
pub struct Page {
    handle: u64,
}

impl Page {
    /// Runs `function` (JavaScript source of a function expression) in the page with `arg`.
    pub async fn eval(&self, function: &str, arg: Value) -> Value {
        driver().call(json!({"op": "eval", "page": self.handle, "fn": function, "arg": arg})).await
    }

    /// Calls a Playwright page method (see the driver's list).
    pub async fn call(&self, method: &str, args: Value) -> Value {
        driver().call(json!({"op": "call", "page": self.handle, "method": method, "args": args})).await
    }

    /// Opens an `EventSource` on `url` listening for `names` as well; returns its index.
    pub async fn open(&self, url: &str, with_credentials: bool, names: &[&str]) -> usize {
        let arg = json!({"url": url, "withCredentials": with_credentials, "names": names});
        let index = self.eval("(a) => openSource(a.url, a)", arg).await;
        index.as_u64().expect("a source index") as usize
    }

    pub async fn seen(&self, source: usize) -> SourceSeen {
        let value = self.eval("(i) => seen(i)", json!(source)).await;
        serde_json::from_value(value).expect("what a source saw")
    }

    pub async fn seen_all(&self) -> Vec<SourceSeen> {
        serde_json::from_value(self.eval("() => seenAll()", Value::Null).await).expect("what the sources saw")
    }

    /// Waits until `done` holds for source `source`; panics with what it saw after `within`.
    pub async fn wait_for(&self, source: usize, within: Duration, done: impl Fn(&SourceSeen) -> bool) -> SourceSeen {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.seen(source).await;
            if done(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "source {source} did not get there within {within:?}: {seen:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `done` holds for every source of the page.
    pub async fn wait_all(&self, within: Duration, done: impl Fn(&SourceSeen) -> bool) -> Vec<SourceSeen> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.seen_all().await;
            if seen.iter().all(&done) {
                return seen;
            }
            assert!(Instant::now() < deadline, "not every source got there within {within:?}: {seen:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
