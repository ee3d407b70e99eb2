//! Test support: real `redis-server`, `nginx` and `sse-fanout` processes, stopped by PID when
//! their guard drops; an SSE client that parses what a browser's EventSource would see; token
//! minting. Every test starts its own servers, so tests run in parallel.
//!
//! Ports: a node binds port 0 and the test reads the address it got from its `listening` log
//! line, so no port is ever handed from one process to another. Redis and nginx take a port
//! from [`reserve_port`]: below the kernel's ephemeral range (where `bind(0)` and every
//! outgoing connection of every test take theirs, so no client can be holding it), locked
//! across test processes, and held until the guard drops; a server that still fails to bind
//! (another program took the port) is started again on another.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

pub const SECRET: &str = "test-secret-for-e2e";

/// How long a server may take to start on a loaded two-core machine running the whole suite.
const START_WITHIN: Duration = Duration::from_secs(20);

/// A loopback port no other test (in this process or another) is given while this is held.
pub struct ReservedPort {
    pub port: u16,
    /// The lock: an abstract Unix socket named after the port. Binding a name is exclusive
    /// machine-wide and the kernel releases it when the holder exits, however it exits.
    _lock: std::os::unix::net::UnixListener,
}

/// Reserves a port for a server the test starts itself (see the module doc).
pub fn reserve_port() -> ReservedPort {
    use std::os::linux::net::SocketAddrExt;
    let (first, end) = reservable_ports();
    let span = u64::from(end - first);
    let start = unique() % span;
    for offset in 0..span {
        let port = first + ((start + offset) % span) as u16;
        let Ok(name) = std::os::unix::net::SocketAddr::from_abstract_name(format!("sse-fanout-tests-port-{port}"))
        else {
            continue;
        };
        let Ok(lock) = std::os::unix::net::UnixListener::bind_addr(&name) else { continue };
        // Nobody listens there now (a program outside the tests could).
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return ReservedPort { port, _lock: lock };
        }
    }
    panic!("no free port in {first}..{end}");
}

/// Ports below the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`).
fn reservable_ports() -> (u16, u16) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 4096 { (low.saturating_sub(10_000).max(2048), low) } else { (20_000, 30_000) }
}

/// A number no other call in any process returns at the same moment: for names and ports.
fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A loopback port free at this instant, for a client-side use that needs no server (nothing
/// is started on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("addr").port()
}

pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sse-fanout-tests/{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A private CA and one certificate it issued for 127.0.0.1 and localhost, good for servers and
/// clients alike, made with the openssl CLI (scripts/test installs it): what TLS tests give
/// `redis-server` and the node.
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    pub fn make() -> Self {
        let dir = scratch_dir("pki");
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl").args(args).current_dir(&dir).output().expect("openssl runs");
            assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=sse-fanout test CA"],
            ]
            .concat(),
        );
        openssl(&[&["req"], &ec[..], &["-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1"]].concat());
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "node.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Self { ca: dir.join("ca.crt"), cert: dir.join("node.crt"), key: dir.join("node.key") }
    }

    /// `redis-server` arguments for a TLS listener on `port` with this certificate.
    fn redis_args(&self, port: u16) -> Vec<String> {
        let path = |p: &PathBuf| p.to_str().expect("utf8 path").to_owned();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&self.cert),
            "--tls-key-file".into(),
            path(&self.key),
            "--tls-ca-cert-file".into(),
            path(&self.ca),
        ]
    }

    /// The node's settings that trust this CA and show this certificate.
    pub fn node_env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &PathBuf| p.to_str().expect("utf8 path").to_owned();
        vec![
            ("SSE_REDIS_TLS_CA_FILE", path(&self.ca)),
            ("SSE_REDIS_TLS_CERT_FILE", path(&self.cert)),
            ("SSE_REDIS_TLS_KEY_FILE", path(&self.key)),
        ]
    }
}

/// Waits until `child` logs its `listening` line to `log` and returns the address it names;
/// panics with the log when the process exits first or takes longer than `within`.
pub async fn listen_address(child: &mut Child, log: &Path, within: Duration) -> std::net::SocketAddr {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let address = text
            .lines()
            .filter(|l| l.contains(" listening"))
            .find_map(|l| l.split_whitespace().find_map(|field| field.strip_prefix("listen=")))
            .and_then(|a| a.parse().ok());
        if let Some(address) = address {
            return address;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the node exited ({status}) before listening; log:\n{text}");
        }
        assert!(Instant::now() < deadline, "the node did not log its listen address; log:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` with no persistence, on loopback, on a [reserved](reserve_port) port.
pub struct RedisServer {
    pub port: u16,
    reserved: ReservedPort,
    /// A second, TLS-only listener ([`RedisServer::start_tls`]); `port` stays plain for the test.
    tls: Option<ReservedPort>,
    child: Option<Child>,
    dir: PathBuf,
    /// Arguments beyond the defaults (a cluster node's).
    args: Vec<String>,
    /// A sentinel's configuration (beyond its port), when this is `redis-server --sentinel`.
    sentinel: Option<String>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A server with extra `redis-server` arguments.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_listening(args, None).await
    }

    /// Each attempt reserves its ports afresh: what failed to bind may be the port, its TLS
    /// twin or a cluster bus port (either one plus 10000), none of which a retry should reuse.
    async fn start_listening(args: &[&str], pki: Option<&TestPki>) -> Self {
        for _ in 0..5 {
            let reserved = reserve_port();
            let tls = pki.map(|_| reserve_port());
            let mut all: Vec<String> = match (pki, &tls) {
                (Some(pki), Some(tls)) => pki.redis_args(tls.port),
                _ => Vec::new(),
            };
            all.extend(args.iter().map(|a| (*a).to_owned()));
            let args = all;
            let mut server = Self {
                port: reserved.port,
                reserved,
                tls,
                child: None,
                dir: scratch_dir("redis"),
                args,
                sentinel: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server could not bind any of 5 reserved ports");
    }

    /// A `redis-server --sentinel` watching `master` at `primary` with quorum `quorum`, a 1 s
    /// down-after and a short failover timeout (a failover takes a few seconds).
    pub async fn start_sentinel(master: &str, primary: u16, quorum: usize) -> Self {
        let config = [
            format!("sentinel monitor {master} 127.0.0.1 {primary} {quorum}"),
            format!("sentinel down-after-milliseconds {master} 1000"),
            format!("sentinel failover-timeout {master} 5000"),
            format!("sentinel parallel-syncs {master} 1"),
        ]
        .join("\n");
        for _ in 0..5 {
            let reserved = reserve_port();
            let mut server = Self {
                port: reserved.port,
                reserved,
                tls: None,
                child: None,
                dir: scratch_dir("sentinel"),
                args: Vec::new(),
                sentinel: Some(config.clone()),
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server --sentinel could not bind any of 5 reserved ports");
    }

    /// A server that also listens with TLS on a port of its own, with `pki`'s certificate,
    /// trusting `pki`'s CA for client certificates (which it requires: `tls-auth-clients yes`).
    pub async fn start_tls(args: &[&str], pki: &TestPki) -> Self {
        Self::start_listening(args, Some(pki)).await
    }

    /// The TLS listener's port ([`RedisServer::start_tls`]).
    pub fn tls_port(&self) -> u16 {
        self.tls.as_ref().expect("started with start_tls").port
    }

    /// `rediss://` to the TLS listener.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port())
    }

    /// Starts Redis again, empty, on the same port (after [`RedisServer::kill`]): what a restart
    /// without persistence looks like to the nodes configured with its URL. Retries while the
    /// port is still taken (a connection of the old process closing).
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_WITHIN;
        while !self.spawn().await {
            assert!(Instant::now() < deadline, "redis-server could not bind {} again", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the process and waits until it answers; false when it exited (it could not bind).
    /// The answer must come from this process: another server on the port would fool a PING.
    async fn spawn(&mut self) -> bool {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("create the redis dir");
        let mut command = Command::new("redis-server");
        if let Some(sentinel) = &self.sentinel {
            // A sentinel rewrites its configuration file: it must have one of its own.
            let file = self.dir.join("sentinel.conf");
            let dir = self.dir.to_str().expect("utf8 path");
            std::fs::write(&file, format!("port {}\nbind 127.0.0.1\ndir {dir}\n{sentinel}\n", self.port))
                .expect("write sentinel.conf");
            command.arg(&file).arg("--sentinel");
        } else {
            command
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dir", self.dir.to_str().expect("utf8 path")])
                .args(&self.args);
        }
        let child = command
            .stdout(std::fs::File::create(self.dir.join("redis.log")).expect("redis log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(info) = self.command(&["INFO", "server"]).await
                && info.lines().any(|l| l.trim() == format!("process_id:{pid}"))
            {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command in RESP and returns the raw reply text (None if unreachable).
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args).await
    }

    /// [`RedisServer::command`] with arguments that need not be text.
    pub async fn command_bytes(&self, args: &[&[u8]]) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).await.ok()?;
        let mut reply = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while resp_length(&reply).is_none() {
            let mut buffer = [0u8; 16 * 1024];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await.ok()?.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buffer[..n]);
        }
        Some(String::from_utf8_lossy(&reply).into_owned())
    }

    /// `PUBLISH` with a payload of any bytes; the number of subscribers that received it.
    pub async fn publish_bytes(&self, channel: &str, payload: &[u8]) -> i64 {
        let reply = self.command_bytes(&[b"PUBLISH", channel.as_bytes(), payload]).await.expect("redis reachable");
        reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("PUBLISH reply {reply:?}"))
    }

    /// `PUBLISH` and the number of subscribers (nodes) that received it.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let reply = self.command(&["PUBLISH", channel, payload]).await.expect("redis reachable");
        reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("PUBLISH reply {reply:?}"))
    }

    /// Sends `signal` (`STOP`, `CONT`): a stopped Redis keeps its connections open and answers
    /// nothing, as a hung or CPU-starved one does.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Redis Sentinel: a primary, a replica of it and `sentinels` sentinels watching it as
/// [`RedisSentinels::MASTER`], each knowing the replica and every other sentinel before this
/// returns (a failover needs a quorum of them to agree and a majority to elect a leader).
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

impl RedisSentinels {
    pub const MASTER: &str = "mymaster";

    pub async fn start(sentinels: usize, quorum: usize) -> Self {
        let primary = RedisServer::start().await;
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]).await;
        // Sentinels find replicas in the primary's INFO, read when they connect and then every
        // 10 s: the replica is linked first so that they know it at once.
        wait_for("the replica to link", || async {
            replica.command(&["INFO", "replication"]).await.is_some_and(|i| i.contains("master_link_status:up"))
        })
        .await;
        let mut started = Vec::new();
        for _ in 0..sentinels {
            started.push(RedisServer::start_sentinel(Self::MASTER, primary.port, quorum).await);
        }
        let fixture = Self { primary, replica, sentinels: started };
        for sentinel in &fixture.sentinels {
            wait_for("every sentinel to know the replica and the others", || async {
                let master =
                    resp_words(&sentinel.command(&["SENTINEL", "MASTER", Self::MASTER]).await.unwrap_or_default());
                let field = |name: &str| master.iter().position(|w| w == name).and_then(|i| master.get(i + 1)).cloned();
                field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels") == Some((sentinels - 1).to_string())
            })
            .await;
        }
        fixture
    }

    /// `redis+sentinel://` with every sentinel, in order.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), Self::MASTER)
    }

    /// The primary's port as `sentinel` names it.
    pub async fn named_by(sentinel: &RedisServer) -> Option<u16> {
        let reply = sentinel.command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER]).await?;
        resp_words(&reply).get(1)?.parse().ok()
    }

    /// Waits until every running sentinel names the replica as the primary and it says so too.
    pub async fn wait_promoted(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut named = Vec::new();
            for sentinel in &self.sentinels {
                named.push(Self::named_by(sentinel).await);
            }
            let role = self.replica.command(&["ROLE"]).await.unwrap_or_default();
            if named.iter().all(|p| *p == Some(self.replica.port)) && role.contains("master") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica was not promoted: sentinels name {named:?}, its ROLE {role:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The bulk and simple strings of a raw RESP reply, in order (nesting flattened).
pub fn resp_words(reply: &str) -> Vec<String> {
    reply
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with(['*', '$', '%']))
        .map(|l| l.trim_start_matches(['+', ':']).to_owned())
        .collect()
}

/// Polls `check` every 100 ms for up to 30 s.
pub async fn wait_for<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis Cluster of `redis-server --cluster-enabled yes` processes joined with
/// `redis-cli --cluster create`: `primaries` primaries with `replicas` replicas each, a 1 s node
/// timeout (a failover takes a few seconds) and no persistence.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(primaries: usize, replicas: usize) -> Self {
        Self::start_nodes(primaries, replicas, None, &[]).await
    }

    /// A cluster whose nodes take `extra` arguments after the defaults (a later value wins:
    /// `--cluster-node-timeout 30000` for a cluster that does not fail a stopped node over).
    pub async fn start_with(primaries: usize, replicas: usize, extra: &[&str]) -> Self {
        Self::start_nodes(primaries, replicas, None, extra).await
    }

    /// A cluster whose nodes also listen with TLS ([`RedisServer::start_tls`]) and talk TLS to
    /// each other; a client that connects with TLS is told the nodes' TLS ports.
    pub async fn start_tls(primaries: usize, replicas: usize, pki: &TestPki) -> Self {
        Self::start_nodes(primaries, replicas, Some(pki), &[]).await
    }

    async fn start_nodes(primaries: usize, replicas: usize, pki: Option<&TestPki>, extra: &[&str]) -> Self {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
            // Replicas sync at once (the default waits 5 s for more replicas to share a transfer).
            "--repl-diskless-sync-delay",
            "0",
        ];
        args.extend_from_slice(extra);
        let count = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = match pki {
            None => futures_util::future::join_all((0..count).map(|_| RedisServer::start_with(&args))).await,
            Some(pki) => {
                let mut tls_args = args.to_vec();
                tls_args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                futures_util::future::join_all((0..count).map(|_| RedisServer::start_tls(&tls_args, pki))).await
            }
        };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(output.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&output.stdout));
        let cluster = Self { nodes };
        cluster.wait_ok(count).await;
        cluster
    }

    /// Waits until every live node says the cluster is ok and knows `known` nodes, and every
    /// replica is in sync with its primary (before that, a failover loses everything).
    pub async fn wait_ok(&self, known: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = node.command(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                ok &= info.contains("cluster_state:ok") && info.contains(&format!("cluster_known_nodes:{known}"));
                let replication = node.command(&["INFO", "replication"]).await.unwrap_or_default();
                ok &= !replication.contains("role:slave") || replication.contains("master_link_status:up");
            }
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the redis cluster did not become ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis+cluster://` with two of the nodes as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().take(2).map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// `rediss+cluster://` to the TLS listeners of two of the nodes ([`RedisCluster::start_tls`]).
    pub fn tls_url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().take(2).map(|n| format!("127.0.0.1:{}", n.tls_port())).collect();
        format!("rediss+cluster://{}", seeds.join(","))
    }

    /// A live node other than those on `ports`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|n| n.port == port).expect("a node of the cluster")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of the cluster")
    }

    /// A client of the whole cluster (it follows MOVED and ASK).
    pub async fn client(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> =
            self.nodes.iter().filter(|n| n.child.is_some()).map(|n| format!("redis://127.0.0.1:{}", n.port)).collect();
        let client = redis::cluster::ClusterClientBuilder::new(seeds).retries(20).build().expect("cluster client");
        client.get_async_connection().await.expect("connect to the cluster")
    }

    /// The port of the primary that serves `slot`, as a live node sees it now.
    pub async fn owner(&self, slot: u16) -> u16 {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a live node");
        let mut connection =
            redis::Client::open(node.url()).expect("url").get_multiplexed_async_connection().await.expect("connect");
        let ranges: Vec<(i64, i64, Vec<redis::Value>)> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<Vec<redis::Value>>>(&mut connection)
            .await
            .expect("CLUSTER SLOTS")
            .into_iter()
            .map(|r| {
                let int = |v: &redis::Value| if let redis::Value::Int(n) = v { *n } else { -1 };
                let primary = if let redis::Value::Array(p) = &r[2] { p.clone() } else { Vec::new() };
                (int(&r[0]), int(&r[1]), primary)
            })
            .collect();
        let (_, _, primary) = ranges
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&i64::from(slot)))
            .expect("the slot is served");
        match primary.get(1) {
            Some(redis::Value::Int(port)) => *port as u16,
            other => panic!("a primary's port: {other:?}"),
        }
    }

    /// `CLUSTER MYID` of the node on `port`.
    pub async fn id(&self, port: u16) -> String {
        let reply = self.node(port).command(&["CLUSTER", "MYID"]).await.expect("CLUSTER MYID");
        reply.lines().nth(1).expect("an id").trim().to_owned()
    }

    /// Moves `slot` (and every key in it) from the primary on `from` to the one on `to`, the
    /// way `redis-cli --cluster reshard` does: IMPORTING, MIGRATING, MIGRATE, then SETSLOT NODE.
    pub async fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id, slot) = (self.id(from).await, self.id(to).await, slot.to_string());
        let ok = |reply: Option<String>, what: &str| {
            assert!(reply.as_deref().is_some_and(|r| r.starts_with("+OK")), "{what}: {reply:?}")
        };
        ok(self.node(to).command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).await, "IMPORTING");
        ok(self.node(from).command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).await, "MIGRATING");
        loop {
            let keys =
                self.node(from).command(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]).await.expect("GETKEYSINSLOT");
            let keys: Vec<&str> = keys.lines().skip(1).filter(|l| !l.starts_with('$')).collect();
            if keys.is_empty() {
                break;
            }
            let mut migrate = vec!["MIGRATE", "127.0.0.1", "", "", "0", "5000", "KEYS"];
            let port = to.to_string();
            migrate[2] = &port;
            migrate.extend(keys.iter().copied());
            let reply = self.node(from).command(&migrate).await;
            assert!(reply.as_deref().is_some_and(|r| r.starts_with('+')), "MIGRATE: {reply:?}");
        }
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            // Replicas refuse SETSLOT; the primaries are what matters.
            let _ = node.command(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await;
        }
    }
}

/// The cluster slot of a key (CRC16 of its `{hash tag}`), as `CLUSTER KEYSLOT` says.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&len| len > 0).map(|len| &rest[..len])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// The length of the complete RESP reply at the start of `buf`, or None while it is incomplete.
fn resp_length(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let header = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b'$' | b'=' | b'!' => {
            let n: i64 = header.parse().ok()?;
            if n < 0 {
                return Some(after);
            }
            let end = after + n as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' | b'%' | b'~' | b'>' => {
            let n: i64 = header.parse().ok()?;
            let items = if buf[0] == b'%' { 2 * n.max(0) } else { n.max(0) };
            let mut at = after;
            for _ in 0..items {
                at += resp_length(&buf[at..])?;
            }
            Some(at)
        }
        _ => Some(after),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An `sse-fanout` process listening on a port it chose itself (port 0).
pub struct Node {
    pub port: u16,
    child: Option<Child>,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

impl Node {
    /// Starts a node with a known secret (production mode) plus `env`; see [`Node::start_raw`].
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let mut full = vec![("SSE_JWT_SECRET", SECRET)];
        full.extend_from_slice(env);
        Self::start_raw(&full).await
    }

    /// Starts a node with exactly `env` (no secret unless given) and waits until it serves:
    /// `/healthz` answers, and with `SSE_REDIS_URL` also `/readyz` (a node on Redis refuses
    /// streams with 503 `not_ready` until its first PING is answered and its subscriber is up).
    pub async fn start_raw(env: &[(&str, &str)]) -> Self {
        let node = Self::launch(env).await;
        if env.iter().any(|(k, _)| *k == "SSE_REDIS_URL") {
            node.wait_readyz(200, START_WITHIN).await;
        }
        node
    }

    /// Starts a node with exactly `env` and waits only until `/healthz` answers: for nodes
    /// that are not meant to become ready.
    pub async fn launch(env: &[(&str, &str)]) -> Self {
        let dir = scratch_dir("node");
        let log = dir.join("stderr.log");
        let stdout = dir.join("stdout.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .env("SSE_LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start sse-fanout");
        let address = listen_address(&mut child, &log, START_WITHIN).await;
        let node = Self { port: address.port(), child: Some(child), log, stdout };
        if !answers_healthz(&node.url("/healthz")).await {
            panic!("node did not start; log:\n{}", node.log_text());
        }
        node
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until `/readyz` answers `status` (200 or 503).
    pub async fn wait_readyz(&self, status: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = http().get(self.url("/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            if got == status {
                return;
            }
            assert!(Instant::now() < deadline, "/readyz stayed {got}, expected {status}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            assert!(Instant::now() < deadline, "node did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A metric's value summed over all its label sets that contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = http().get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until a metric reaches `value`: counters are recorded around the action a client
    /// sees (a farewell is written, then the close counted), so reading them the instant the
    /// test saw the effect races. Panics with the last value after 10 s.
    pub async fn wait_metric(&self, name: &str, labels: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.metric(name, labels).await;
            if got == value {
                return;
            }
            assert!(Instant::now() < deadline, "{name}{{{labels}}} stayed {got}, expected {value}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Some(dir) = self.log.parent() else { return };
        if std::thread::panicking() {
            // The test failed: keep the node's logs for whoever reads the failure.
            eprintln!("node logs kept in {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Polls `url` for up to [`START_WITHIN`]; true once it answers 200.
async fn answers_healthz(url: &str) -> bool {
    let deadline = Instant::now() + START_WITHIN;
    while Instant::now() < deadline {
        if let Ok(r) = http().get(url).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// An HS256 token signed with [`SECRET`].
pub fn token(sub: &str, topics: &[&str], role: Option<&str>) -> String {
    token_with(json!({"sub": sub, "exp": unix_now() + 3600, "topics": topics, "role": role}))
}

pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("sign")
}

/// One event read from a stream: what its own block carried (`id`, `retry`: `None` when the
/// block had no such line) and the stream's last event id at that point (what a browser
/// would send as `Last-Event-ID`). Parsed by `sse_wire`, the tools' one SSE parser.
pub use sse_wire::Event as SseEvent;

/// One thing read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Event(SseEvent),
    Comment(String),
    /// A `retry:` line, in milliseconds (the node sends it in a block of its own).
    Retry(u64),
    /// The server ended the stream.
    End,
    /// The stream broke (the connection reset, the body's framing was cut short).
    Error(String),
}

/// Why [`SseClient::next_event`] has no event: a test that expects an open stream must be
/// able to tell a quiet stream from one the server closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEvent {
    /// Nothing arrived in time; the stream is still open.
    Timeout,
    /// The server ended the stream.
    End,
    /// The stream broke.
    Error(String),
}

impl From<sse_wire::Item> for Received {
    fn from(item: sse_wire::Item) -> Self {
        match item {
            sse_wire::Item::Event(event) => Received::Event(event),
            sse_wire::Item::Comment(comment) => Received::Comment(comment),
            sse_wire::Item::Retry(ms) => Received::Retry(ms),
        }
    }
}

/// Parses `chunk` into owned items; a stream the parser refuses fails the test.
fn parse(parser: &mut sse_wire::SseParser, chunk: &[u8]) -> Vec<sse_wire::Item> {
    let mut items = Vec::new();
    if let Err(e) = parser.feed_into(chunk, &mut items) {
        panic!("the stream is not valid SSE: {e}");
    }
    items
}

/// A parsed event stream, following the WHATWG EventSource rules. Dropping it closes the
/// connection at once, as a browser closing its tab does.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Option<String>,
    rx: mpsc::UnboundedReceiver<Received>,
    reader: Option<tokio::task::AbortHandle>,
}

impl Drop for SseClient {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl SseClient {
    /// Opens `url` with extra headers. A non-200 answer is returned with its body and no stream.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Self {
        let mut request = http_streaming().get(url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let response_headers = response.headers().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        if status != 200 {
            let body = response.text().await.ok();
            return Self { status, headers: response_headers, body, rx, reader: None };
        }
        let reader = tokio::spawn(async move {
            let mut bytes = response.bytes_stream();
            let mut parser = sse_wire::SseParser::new();
            while let Some(chunk) = bytes.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = tx.send(Received::Error(format!("{e:?}")));
                        return;
                    }
                };
                for item in parse(&mut parser, &chunk) {
                    if tx.send(item.into()).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(Received::End);
        });
        Self { status, headers: response_headers, body: None, rx, reader: Some(reader.abort_handle()) }
    }

    /// The next `n` events (comments and retries skipped), each within `within` of the one
    /// before; panics on a timeout or the end of the stream, with what came so far.
    pub async fn next_events(&mut self, n: usize, within: Duration) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            let event = self
                .next_event(within)
                .await
                .unwrap_or_else(|e| panic!("{e:?} after {} of {n} events: {events:?}", events.len()));
            events.push(event);
        }
        events
    }

    /// The next event (comments and retries skipped), or why there is none.
    pub async fn next_event(&mut self, within: Duration) -> Result<SseEvent, NoEvent> {
        self.next_event_with_retries(within).await.map(|(event, _)| event)
    }

    /// The next event and the `retry:` values that arrived since the previous call (comments
    /// skipped), or why there is none.
    pub async fn next_event_with_retries(&mut self, within: Duration) -> Result<(SseEvent, Vec<u64>), NoEvent> {
        let deadline = tokio::time::Instant::now() + within;
        let mut retries = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Received::Event(e))) => return Ok((e, retries)),
                Ok(Some(Received::Retry(ms))) => retries.push(ms),
                Ok(Some(Received::Comment(_))) => continue,
                // The reader stops after the end or an error: reading on finds the end again.
                Ok(Some(Received::End) | None) => return Err(NoEvent::End),
                Ok(Some(Received::Error(e))) => return Err(NoEvent::Error(e)),
                Err(_) => return Err(NoEvent::Timeout),
            }
        }
    }

    /// The next item of any kind, or None on timeout.
    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(item)) => Some(item),
            Ok(None) => Some(Received::End),
            Err(_) => None,
        }
    }

    /// Expects the `connected` event first and returns its JSON.
    pub async fn connected(&mut self) -> Value {
        let event = self.next_event(Duration::from_secs(5)).await.expect("a connected event");
        assert_eq!(event.event, "connected", "{event:?}");
        serde_json::from_str(&event.data).expect("connected data is JSON")
    }

    /// Asserts nothing but comments and retries arrives within `within`, and that the stream is
    /// still open then.
    pub async fn assert_silent(&mut self, within: Duration) {
        match self.next_event(within).await {
            Err(NoEvent::Timeout) => {}
            Ok(e) => panic!("expected no event, got {e:?}"),
            Err(gap) => panic!("expected an open, quiet stream; it ended: {gap:?}"),
        }
    }
}

fn http_streaming() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

/// The `reset history_lost` events an open stream gets when the history it followed is gone
/// (Redis restarted empty, or was flushed): one per channel, in any order. Reads them until
/// every one of `channels` was named, each once, and returns the last: its `id:` is the stream's
/// cursor in the new history.
pub async fn read_history_lost(stream: &mut SseClient, channels: &[&str]) -> SseEvent {
    let mut named: Vec<String> = Vec::new();
    let mut last = None;
    while named.len() < channels.len() {
        let reset = stream
            .next_event(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e:?} after resets for {named:?} of {channels:?}"));
        assert_eq!(reset.event, "reset", "{reset:?} before a reset for each of {channels:?} (got {named:?})");
        let data: Value = serde_json::from_str(&reset.data).expect("reset data is JSON");
        assert_eq!(data["reason"], "history_lost", "{data}");
        for channel in data["channels"].as_array().expect("channels") {
            let channel = channel.as_str().expect("a channel name").to_owned();
            assert!(channels.contains(&channel.as_str()), "a reset for {channel}, not one of {channels:?}");
            assert!(!named.contains(&channel), "{channel} reset twice");
            named.push(channel);
        }
        last = Some(reset);
    }
    last.expect("at least one channel")
}

/// Opens a stream for `user` on `node` with the given topics and checks `connected`.
pub async fn subscribe(node: &Node, user: &str, topics: &[&str]) -> SseClient {
    let token = token(user, &["*"], None);
    let mut url = node.url(&format!("/events?access_token={token}"));
    for t in topics {
        url.push_str(&format!("&topic={t}"));
    }
    let mut client = SseClient::open(&url, &[]).await;
    assert_eq!(client.status, 200, "{:?}", client.body);
    client.connected().await;
    client
}

/// `POST /api/publish` with a publisher token; returns status and JSON body.
pub async fn publish_api(node: &Node, body: Value) -> (u16, Value) {
    let response = http()
        .post(node.url("/api/publish"))
        .bearer_auth(token("producer", &[], Some("publisher")))
        .json(&body)
        .send()
        .await
        .expect("publish request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------------------
// nginx in front of nodes, and an EventSource-like client (tests/cluster_nginx.rs)
// ---------------------------------------------------------------------------------------------

/// `nginx/cluster.conf.template` filled in by `scripts/lib/nginx-conf.sh`, the renderer
/// `scripts/cluster` uses: nginx keeps its files under `state_dir`, listens on `listen` and
/// balances over `upstreams` (`host:port` each).
pub fn render_nginx_conf(
    state_dir: &std::path::Path,
    listen: &str,
    nofile: u32,
    worker_connections: u32,
    upstreams: &[String],
) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"source scripts/lib/nginx-conf.sh && render_nginx_conf "$@""#)
        .arg("render_nginx_conf")
        .arg(state_dir)
        .args([listen, &nofile.to_string(), &worker_connections.to_string()])
        .args(upstreams)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run bash");
    assert!(out.status.success(), "scripts/lib/nginx-conf.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("the config is UTF-8")
}

/// nginx rendered from `nginx/cluster.conf.template` (the config `scripts/cluster` runs), on a
/// [reserved](reserve_port) loopback port, in front of the given node ports. Stopped by PID on
/// drop.
pub struct Nginx {
    pub port: u16,
    reserved: ReservedPort,
    /// The TLS + HTTP/2 listener (`nginx/tls.conf.template`), when started with one.
    tls: Option<ReservedPort>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    pub async fn start(upstream_ports: &[u16]) -> Self {
        Self::start_with(upstream_ports, |conf| conf).await
    }

    /// Like [`Nginx::start`], with `edit` applied to the rendered config (to break it on purpose).
    pub async fn start_with(upstream_ports: &[u16], edit: impl Fn(String) -> String) -> Self {
        Self::launch(upstream_ports, &edit, false).await
    }

    /// Like [`Nginx::start`], plus the TLS + HTTP/2 listener of `nginx/tls.conf.template` with a
    /// self-signed certificate made on the spot, as `scripts/cluster up --tls` runs it.
    pub async fn start_tls(upstream_ports: &[u16]) -> Self {
        Self::launch(upstream_ports, &|conf| conf, true).await
    }

    async fn launch(upstream_ports: &[u16], edit: &impl Fn(String) -> String, tls: bool) -> Self {
        for _ in 0..5 {
            let reserved = reserve_port();
            let dir = scratch_dir("nginx");
            let tls = tls.then(reserve_port);
            let mut nginx = Self { port: reserved.port, reserved, tls, child: None, dir };
            if nginx.spawn(upstream_ports, edit).await {
                return nginx;
            }
        }
        panic!("nginx could not bind any of 5 reserved ports");
    }

    /// `https://127.0.0.1:<tls port><path>`; panics without a TLS listener.
    pub fn tls_url(&self, path: &str) -> String {
        let port = self.tls.as_ref().expect("nginx was started with start_tls").port;
        format!("https://127.0.0.1:{port}{path}")
    }

    /// The self-signed certificate of the TLS listener (its own trust anchor).
    pub fn tls_cert(&self) -> PathBuf {
        self.dir.join("tls/tls.crt")
    }

    /// Starts nginx and waits until it answers `/healthz` through to a node; false when it
    /// could not bind its port (it exits, or logs the failure while it retries).
    async fn spawn(&mut self, upstream_ports: &[u16], edit: &impl Fn(String) -> String) -> bool {
        let dir = &self.dir;
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx temp dir");
        let upstreams: Vec<String> = upstream_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        // Far below the 20k per-process limit of the test machines, far above what a test opens.
        let conf = render_nginx_conf(dir, &format!("127.0.0.1:{}", self.port), 8192, 8000, &upstreams);
        let conf = edit(conf);
        if let Some(tls) = &self.tls {
            // scripts/lib/nginx-conf.sh makes the certificate and renders the TLS listener into
            // the directory the server block includes, exactly as scripts/cluster does.
            let out = Command::new("bash")
                .arg("-c")
                .arg(
                    r#"source scripts/lib/nginx-conf.sh && make_self_signed_cert "$1" \
                       && render_nginx_tls_conf "$2" "$1/tls.crt" "$1/tls.key" >"$1/tls.conf""#,
                )
                .arg("tls")
                .arg(dir.join("tls"))
                .arg(format!("127.0.0.1:{}", tls.port))
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .expect("run bash");
            assert!(out.status.success(), "TLS setup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(bin)
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("stderr file"))
            .spawn()
            .expect("nginx must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if self.error_log().contains("bind() to") {
                self.stop();
                return false;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                assert!(self.error_log().contains("bind()"), "nginx exited; error log:\n{}", self.error_log());
                return false;
            }
            if let Ok(r) = http().get(self.url("/healthz")).send().await
                && r.status() == 200
                && !self.error_log().contains("bind() to")
            {
                return true;
            }
            assert!(Instant::now() < deadline, "nginx did not start; error log:\n{}", self.error_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops nginx: SIGTERM to the master, which stops its workers too (a SIGKILL would orphan
    /// them, still holding the port); SIGKILL only if it does not go.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn error_log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }

    /// What nginx logged of the requests it finished (a stream's line comes when it ends).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One stream an [`EventSource`] opened: which node `connected` named, and when.
#[derive(Debug, Clone)]
pub struct Connection {
    pub node_id: String,
    pub at: Instant,
}

/// Everything an [`EventSource`] saw, in order.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every event of every stream, `connected`, `disconnected` and `reset` included.
    pub events: Vec<SseEvent>,
    pub connections: Vec<Connection>,
    /// When each stream ended (the server closed it or the connection broke).
    pub ends: Vec<Instant>,
    /// Status of each refused attempt (0: no HTTP answer at all).
    pub refused: Vec<u16>,
}

impl Seen {
    /// Data of the events named `event`.
    pub fn data_of(&self, event: &str) -> Vec<&str> {
        self.events.iter().filter(|e| e.event == event).map(|e| e.data.as_str()).collect()
    }
}

/// A client that behaves like a browser's EventSource: it reconnects after every end of stream
/// (waiting the last `retry:` it was sent) with `Last-Event-ID` set to the stream's last event
/// id (when it has one), and records everything. One task per client; aborted on drop.
pub struct EventSource {
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventSource {
    pub fn open(url: String) -> Self {
        Self::open_with(http_streaming(), url)
    }

    /// Opens with a shared client (many sources, one connection pool).
    pub fn open_with(client: reqwest::Client, url: String) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            // The EventSource default until the server sends `retry:`.
            let mut retry = Duration::from_secs(3);
            // The EventSource's last event id string: it outlives each connection.
            let mut last_id = Vec::new();
            loop {
                let mut request = client.get(&url).header("accept", "text/event-stream");
                if !last_id.is_empty() {
                    request = request.header("last-event-id", last_id.as_slice());
                }
                match request.send().await {
                    Ok(response) if response.status() == 200 => {
                        let mut bytes = response.bytes_stream();
                        let mut parser = sse_wire::SseParser::new().with_last_event_id(&last_id);
                        while let Some(Ok(chunk)) = bytes.next().await {
                            let items = parse(&mut parser, &chunk);
                            last_id = parser.last_event_id().to_vec();
                            if let Some(ms) = parser.reconnection_time() {
                                retry = Duration::from_millis(ms);
                            }
                            let mut seen = shared.lock().expect("lock");
                            for item in items {
                                let sse_wire::Item::Event(event) = item else { continue };
                                if event.event == "connected" {
                                    let node_id = serde_json::from_str::<Value>(&event.data)
                                        .ok()
                                        .and_then(|v| v["node_id"].as_str().map(str::to_owned))
                                        .unwrap_or_default();
                                    seen.connections.push(Connection { node_id, at: Instant::now() });
                                }
                                seen.events.push(event);
                            }
                        }
                        shared.lock().expect("lock").ends.push(Instant::now());
                    }
                    Ok(response) => shared.lock().expect("lock").refused.push(response.status().as_u16()),
                    Err(_) => shared.lock().expect("lock").refused.push(0),
                }
                tokio::time::sleep(retry).await;
            }
        });
        Self { seen, task }
    }

    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("lock")
    }

    /// Waits until `done` holds for what was seen; false on timeout.
    pub async fn wait_for(&self, within: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(&self.seen()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EventSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// History and resume (tests/resume.rs, tests/history_security.rs)
// ---------------------------------------------------------------------------------------------

/// A long-lived producer connection to Redis.
pub struct Producer(pub redis::aio::MultiplexedConnection);

impl Producer {
    pub async fn connect(redis: &RedisServer) -> Self {
        let client = redis::Client::open(redis.url()).expect("url");
        Self(client.get_multiplexed_async_connection().await.expect("connect"))
    }

    /// `FCALL sse_publish 1 <channel> <payload>`; returns the history id.
    pub async fn durable(&mut self, channel: &str, payload: &str) -> String {
        redis::cmd("FCALL")
            .arg("sse_publish")
            .arg(1)
            .arg(channel)
            .arg(payload)
            .query_async(&mut self.0)
            .await
            .expect("FCALL sse_publish")
    }

    /// A plain `PUBLISH` of raw bytes; returns how many subscribers (nodes) got it.
    pub async fn publish(&mut self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH").arg(channel).arg(payload).query_async(&mut self.0).await.expect("PUBLISH")
    }

    pub async fn key_id(&mut self) -> String {
        redis::cmd("FCALL").arg("sse_key_id").arg(0).query_async(&mut self.0).await.expect("FCALL sse_key_id")
    }
}

pub fn envelope(data: &str) -> String {
    json!({"event": "m", "data": data}).to_string()
}

pub fn stream_url(node: &Node, user: &str, topics: &[&str]) -> String {
    let mut url = node.url(&format!("/events?access_token={}", token(user, &["*"], None)));
    for t in topics {
        url.push_str(&format!("&topic={t}"));
    }
    url
}

/// Opens a stream, resuming from `last_id` when given; returns it after `connected`, with the
/// cursor `connected` carried.
pub async fn open_resumable(url: &str, last_id: Option<&str>) -> (SseClient, String) {
    let headers: Vec<(&str, &str)> = last_id.map(|id| ("last-event-id", id)).into_iter().collect();
    let mut client = SseClient::open(url, &headers).await;
    assert_eq!(client.status, 200, "{:?}", client.body);
    let connected = client.next_event(Duration::from_secs(5)).await.expect("connected");
    assert_eq!(connected.event, "connected");
    let cursor = connected.id.expect("connected carries a cursor when history is on");
    (client, cursor)
}
