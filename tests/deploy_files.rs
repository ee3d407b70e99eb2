//! The deployment files agree with the binary and with each other.
//!
//! docker-compose.yml, deploy/ (Dockerfile, prometheus.yml, k8s/) and nginx/ are written by
//! hand next to code that keeps changing. These tests read them the way their tools would and
//! check what breaks a deployment silently: an `SSE_*` variable the node does not read (it is
//! ignored, not rejected), a port that differs between the listener, the container, the probes,
//! the balancer and the scraper, a probe on the wrong endpoint, a grace period shorter than the
//! drain, and an nginx config that buffers streams or does not even load (`nginx -t`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_norway::Value;

// ------------------------------------------------------------------------------------------------
// What the binary says about itself
// ------------------------------------------------------------------------------------------------

/// `sse-fanout --help`, run without any `SSE_*` variable of ours so clap shows no values, with
/// whitespace collapsed so a wrapped line cannot split `[env: NAME`.
fn help() -> &'static str {
    static HELP: OnceLock<String> = OnceLock::new();
    HELP.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-fanout"));
        cmd.arg("--help");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SSE_") {
                cmd.env_remove(name);
            }
        }
        let out = cmd.output().expect("run sse-fanout --help");
        assert!(out.status.success(), "sse-fanout --help failed: {out:?}");
        let text = String::from_utf8(out.stdout).expect("--help is UTF-8");
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    })
}

/// Every environment variable `--help` documents (`[env: SSE_X=]`, or `[env: SSE_X]` for a
/// hidden value).
fn documented_env() -> &'static BTreeSet<String> {
    static NAMES: OnceLock<BTreeSet<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let names: BTreeSet<String> = help()
            .split("[env: ")
            .skip(1)
            .map(|rest| {
                rest.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect()
            })
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("SSE_")),
            "sse-fanout --help lists no [env: SSE_...] variables; got: {}",
            help()
        );
        names
    })
}

/// The default `--help` shows for a variable: the `[default: ...]` after its `[env: ...]`.
fn documented_default(name: &str) -> Option<String> {
    let after_env = help().split(&format!("[env: {name}")).nth(1)?;
    let own_part = after_env.split("[env: ").next()?;
    let default = own_part.split("[default: ").nth(1)?;
    Some(default.split(']').next()?.to_owned())
}

/// Fails naming every `SSE_*` variable `where_` sets that the binary does not read.
fn assert_known_env<'a>(where_: &str, names: impl IntoIterator<Item = &'a str>) {
    let unknown: Vec<&str> =
        names.into_iter().filter(|n| n.starts_with("SSE_") && !documented_env().contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "{where_} sets {unknown:?}, which `sse-fanout --help` does not list (known: {:?})",
        documented_env()
    );
}

/// A setting's value as a deployment would run it: what the file sets, else the binary's default.
fn effective(env: &BTreeMap<String, String>, name: &str) -> String {
    env.get(name)
        .cloned()
        .or_else(|| documented_default(name))
        .unwrap_or_else(|| panic!("{name} is neither set nor has a default in --help"))
}

// ------------------------------------------------------------------------------------------------
// Small parsers
// ------------------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// One YAML document with `<<` merge keys applied, as docker compose reads it.
fn yaml(rel: &str) -> Value {
    let mut value: Value = serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"));
    value.apply_merge().unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
    value
}

/// Every document of a (possibly multi-document) YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path:?} is not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} should be a string, is {v:?}"))
}

/// A scalar as text: YAML may give a port or count as a number or a string.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// Durations as the node reads them: `500ms`, `30s`, `5m`, `1h`, or bare milliseconds.
/// nginx's `1h`/`3600s`/bare seconds are handled by [`nginx_duration`].
fn sse_duration(s: &str) -> Duration {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().unwrap_or_else(|_| panic!("{s:?} is not a duration"));
    let seconds = match unit {
        "" | "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => panic!("{s:?}: unknown duration unit"),
    };
    Duration::from_secs_f64(seconds)
}

/// nginx time values: a bare number is seconds; units ms, s, m, h, d.
fn nginx_duration(s: &str) -> Duration {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("{s:?} is not an nginx time"));
    match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => panic!("{s:?}: unknown nginx time unit"),
    }
}

/// The port of a `host:port` listen address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{addr:?} has no port"))
}

// ------------------------------------------------------------------------------------------------
// docker-compose.yml, deploy/Dockerfile, deploy/prometheus.yml
// ------------------------------------------------------------------------------------------------

/// `${NAME:-default}` replaced by its default, as compose does when NAME is unset.
fn with_compose_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').unwrap_or_else(|| panic!("unclosed ${{ in {value:?}"));
        let default = rest[start + 2..end].split_once(":-").map(|(_, d)| d);
        out.push_str(default.unwrap_or_else(|| panic!("{value:?}: a published port needs a default")));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

struct ComposeNode {
    service: String,
    env: BTreeMap<String, String>,
    listen_port: u16,
}

/// A compose `environment:` in either of its two forms: a mapping, or a list of `KEY=value`.
fn compose_env(service: &str, v: &Value) -> BTreeMap<String, String> {
    match v {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let value = if v.is_null() { String::new() } else { scalar(v) };
                (str_of(k, "env name").to_owned(), value)
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = str_of(item, "environment entry");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("{service}: environment is {other:?}"),
    }
}

/// The services built from deploy/Dockerfile, in name order.
fn compose_nodes(compose: &Value) -> Vec<ComposeNode> {
    let services = compose["services"].as_mapping().expect("docker-compose.yml has services");
    let mut nodes: Vec<ComposeNode> = services
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"].as_str() == Some("deploy/Dockerfile"))
        .map(|(name, s)| {
            let service = str_of(name, "service name").to_owned();
            let env = compose_env(&service, &s["environment"]);
            let listen_port = port_of(&effective(&env, "SSE_LISTEN"));
            ComposeNode { service, env, listen_port }
        })
        .collect();
    nodes.sort_by(|a, b| a.service.cmp(&b.service));
    nodes
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_sequence().unwrap_or_else(|| panic!("{what} should be a list, is {v:?}")).iter().map(scalar).collect()
}

#[test]
fn compose_nodes_set_only_settings_the_binary_reads_and_agree_on_ports() {
    let compose = yaml("docker-compose.yml");
    let nodes = compose_nodes(&compose);
    let names: Vec<&str> = nodes.iter().map(|n| n.service.as_str()).collect();
    assert_eq!(names, ["node1", "node2", "node3"], "compose should build node1..node3 from deploy/Dockerfile");

    let mut node_ids = BTreeSet::new();
    for node in &nodes {
        let svc = &compose["services"][node.service.as_str()];
        let where_ = format!("docker-compose.yml service {}", node.service);
        assert_known_env(&where_, node.env.keys().map(String::as_str));

        assert!(
            node_ids.insert(node.env.get("SSE_NODE_ID").cloned()),
            "{where_}: SSE_NODE_ID must be set and differ between nodes"
        );
        // Without a shared secret each node would invent its own and reject the others' tokens.
        assert!(node.env.contains_key("SSE_JWT_SECRET"), "{where_}: SSE_JWT_SECRET must be set");

        let redis_url = node.env.get("SSE_REDIS_URL").expect("SSE_REDIS_URL set");
        let redis_host = redis_url.trim_start_matches("redis://").split([':', '/']).next().unwrap_or_default();
        assert!(
            compose["services"][redis_host]["image"]
                .as_str()
                .is_some_and(|i| i.rsplit('/').next().is_some_and(|name| name.starts_with("redis"))),
            "{where_}: SSE_REDIS_URL host {redis_host:?} is not the compose redis service"
        );

        let port = node.listen_port.to_string();
        assert!(
            strings(&svc["expose"], "expose").contains(&port),
            "{where_}: expose should list the SSE_LISTEN port {port}"
        );
        let check = strings(&svc["healthcheck"]["test"], "healthcheck.test").join(" ");
        assert!(
            check.contains(&format!(":{port}/healthz")),
            "{where_}: healthcheck should hit /healthz on port {port}: {check}"
        );

        let drain = sse_duration(&effective(&node.env, "SSE_DRAIN_PERIOD"));
        let grace = sse_duration(str_of(&svc["stop_grace_period"], "stop_grace_period"));
        assert!(grace > drain, "{where_}: stop_grace_period {grace:?} must exceed SSE_DRAIN_PERIOD {drain:?}");
    }

    let nginx = &compose["services"]["nginx"];
    assert!(
        strings(&nginx["volumes"], "nginx volumes")
            .iter()
            .any(|v| v.starts_with("./nginx/nginx.conf:/etc/nginx/nginx.conf")),
        "compose nginx should mount ./nginx/nginx.conf"
    );
    // The host side may be moved with SSE_FANOUT_HTTP_PORT (scripts/containers test does); by
    // default it is 8080, and the container side is nginx's listen port.
    let published: Vec<String> =
        strings(&nginx["ports"], "nginx ports").iter().map(|p| with_compose_defaults(p)).collect();
    assert!(
        published.contains(&"8080:8080".to_owned()),
        "compose nginx should publish port 8080 by default: {published:?}"
    );
    for node in &nodes {
        assert!(
            !nginx["depends_on"][node.service.as_str()].is_null(),
            "compose nginx should depend on {} (it resolves upstream names at start)",
            node.service
        );
    }
}

#[test]
fn prometheus_scrapes_every_compose_node() {
    let compose = yaml("docker-compose.yml");
    let expected: BTreeSet<String> =
        compose_nodes(&compose).iter().map(|n| format!("{}:{}", n.service, n.listen_port)).collect();

    let prometheus = &compose["services"]["prometheus"];
    assert!(
        strings(&prometheus["volumes"], "prometheus volumes")
            .iter()
            .any(|v| v.starts_with("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml")),
        "compose prometheus should mount ./deploy/prometheus.yml"
    );

    let config = yaml("deploy/prometheus.yml");
    let jobs = config["scrape_configs"].as_sequence().expect("prometheus.yml has scrape_configs");
    let mut targets = BTreeSet::new();
    for job in jobs {
        let path = job["metrics_path"].as_str().unwrap_or("/metrics");
        assert_eq!(path, "/metrics", "prometheus job {:?}", job["job_name"]);
        for group in job["static_configs"].as_sequence().into_iter().flatten() {
            targets.extend(strings(&group["targets"], "targets"));
        }
    }
    assert_eq!(targets, expected, "prometheus targets should be the compose nodes at their SSE_LISTEN port");
}

#[test]
fn dockerfile_builds_locked_and_runs_unprivileged_on_the_listen_port() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_ascii_uppercase(), v.trim().to_owned()))
        .collect();
    let values =
        |key: &str| -> Vec<&str> { instructions.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect() };

    assert!(dockerfile.contains("cargo build --release --locked"), "the image must build with --locked");
    assert!(values("FROM").len() >= 2, "the Dockerfile should be multi-stage");
    assert_eq!(values("STOPSIGNAL"), ["SIGTERM"], "SIGTERM starts the drain");

    let user = values("USER");
    let user = user.last().expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER should be a numeric non-root uid (Kubernetes runAsNonRoot checks it), is {user}"
    );

    let mut env = BTreeMap::new();
    for value in values("ENV") {
        for pair in value.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    assert_known_env("deploy/Dockerfile", env.keys().map(String::as_str));
    let port = port_of(&effective(&env, "SSE_LISTEN"));
    assert_eq!(values("EXPOSE"), [port.to_string()], "EXPOSE should be the SSE_LISTEN port");
}

// ------------------------------------------------------------------------------------------------
// nginx
// ------------------------------------------------------------------------------------------------

/// One nginx directive: the blocks it sits in (`http`, `upstream sse_nodes`, `location /events`)
/// and its words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Directive {
    context: Vec<String>,
    words: Vec<String>,
}

impl Directive {
    fn name(&self) -> &str {
        &self.words[0]
    }
    fn args(&self) -> String {
        self.words[1..].join(" ")
    }
    fn in_block(&self, prefix: &str) -> bool {
        self.context.last().is_some_and(|c| c.starts_with(prefix))
    }
}

/// Splits an nginx config into directives. Enough of nginx's grammar for our files: `#`
/// comments, quoted strings, `;` and `{ }`.
fn nginx_directives(text: &str) -> Vec<Directive> {
    let mut out = Vec::new();
    let mut context: Vec<String> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    let flush = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' if word.is_empty() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                // Keep the quotes so `Connection ""` stays visible as an empty value.
                word.push(c);
                for q in chars.by_ref() {
                    word.push(q);
                    if q == c {
                        break;
                    }
                }
            }
            ';' => {
                flush(&mut word, &mut words);
                if !words.is_empty() {
                    out.push(Directive { context: context.clone(), words: std::mem::take(&mut words) });
                }
            }
            '{' => {
                flush(&mut word, &mut words);
                context.push(std::mem::take(&mut words).join(" "));
            }
            '}' => {
                flush(&mut word, &mut words);
                assert!(context.pop().is_some(), "unbalanced '}}' in nginx config");
            }
            c if c.is_whitespace() => flush(&mut word, &mut words),
            c => word.push(c),
        }
    }
    assert!(context.is_empty(), "unclosed block in nginx config");
    out
}

fn find<'a>(directives: &'a [Directive], block: &str, name: &str) -> Vec<&'a Directive> {
    directives.iter().filter(|d| d.in_block(block) && d.name() == name).collect()
}

fn single_arg(directives: &[Directive], block: &str, name: &str) -> String {
    match find(directives, block, name).as_slice() {
        [d] => d.args(),
        found => panic!("expected one `{name}` in `{block}`, found {found:?}"),
    }
}

/// What makes the proxy SSE-safe, checked on both nginx.conf and the cluster template.
fn assert_streams_through(file: &str, d: &[Directive], heartbeat: Duration) {
    let events = "location /events";
    for (name, value) in
        [("proxy_buffering", "off"), ("proxy_cache", "off"), ("gzip", "off"), ("proxy_pass", "http://sse_nodes")]
    {
        assert_eq!(single_arg(d, events, name), value, "{file}: {name} in {events}");
    }
    let read_timeout = nginx_duration(&single_arg(d, events, "proxy_read_timeout"));
    assert!(
        read_timeout > heartbeat * 2,
        "{file}: proxy_read_timeout {read_timeout:?} must be well above the heartbeat {heartbeat:?}"
    );

    assert_eq!(single_arg(d, "server", "proxy_http_version"), "1.1", "{file}");
    let headers: BTreeSet<String> = find(d, "server", "proxy_set_header").iter().map(|h| h.args()).collect();
    for expected in [
        "Connection \"\"",
        "X-Forwarded-For $proxy_add_x_forwarded_for",
        "X-Real-IP $remote_addr",
        "X-Forwarded-Proto $scheme",
    ] {
        assert!(
            headers.contains(expected),
            "{file}: server block should set proxy_set_header {expected}; has {headers:?}"
        );
    }
    // A location with its own proxy_set_header would silently drop all of the server's.
    assert!(find(d, "location", "proxy_set_header").is_empty(), "{file}: set proxy headers in the server block only");
    let next_upstream = single_arg(d, "server", "proxy_next_upstream");
    for condition in ["error", "timeout", "http_503"] {
        assert!(
            next_upstream.split(' ').any(|w| w == condition),
            "{file}: proxy_next_upstream should include {condition}"
        );
    }

    let upstream = "upstream sse_nodes";
    assert_eq!(find(d, upstream, "least_conn").len(), 1, "{file}: least_conn");
    for sticky in ["ip_hash", "hash", "sticky"] {
        assert!(find(d, upstream, sticky).is_empty(), "{file}: nodes are stateless; no {sticky}");
    }
    assert_eq!(find(d, upstream, "keepalive").len(), 1, "{file}: keepalive");
    assert!(find(d, "location", "proxy_pass").len() >= 2, "{file}: /events and everything else should both be proxied");
}

/// The upstream `server` lines: address and the parameters after it.
fn upstream_servers(d: &[Directive]) -> Vec<(String, Vec<String>)> {
    find(d, "upstream sse_nodes", "server").iter().map(|s| (s.words[1].clone(), s.words[2..].to_vec())).collect()
}

/// The heartbeat the compose nodes run with.
fn compose_heartbeat() -> Duration {
    let compose = yaml("docker-compose.yml");
    let nodes = compose_nodes(&compose);
    let node = nodes.first().expect("compose has nodes");
    sse_duration(&effective(&node.env, "SSE_HEARTBEAT_INTERVAL"))
}

#[test]
fn nginx_conf_streams_unbuffered_to_every_compose_node() {
    let d = nginx_directives(&read("nginx/nginx.conf"));
    assert_streams_through("nginx/nginx.conf", &d, compose_heartbeat());

    let compose = yaml("docker-compose.yml");
    let expected: Vec<String> =
        compose_nodes(&compose).iter().map(|n| format!("{}:{}", n.service, n.listen_port)).collect();
    let servers = upstream_servers(&d);
    let addresses: Vec<String> = servers.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(addresses, expected, "nginx upstream should list the compose nodes");
    for (address, params) in &servers {
        for param in ["max_fails=", "fail_timeout="] {
            assert!(params.iter().any(|p| p.starts_with(param)), "nginx upstream server {address} needs {param}");
        }
    }

    // The published container port is the one nginx listens on.
    let listen_args = single_arg(&d, "server", "listen");
    let listen = listen_args.split_whitespace().next().unwrap_or_default().to_owned();
    assert!(
        listen_args.split_whitespace().any(|p| p.starts_with("backlog=")),
        "nginx needs a deep accept queue for the reconnects after a node fails: listen {listen_args}"
    );
    let published = strings(&compose["services"]["nginx"]["ports"], "nginx ports");
    assert!(
        published.iter().any(|p| p.rsplit(':').next() == Some(listen.as_str())),
        "compose publishes {published:?} but nginx listens on {listen}"
    );
}

#[test]
fn cluster_template_carries_the_same_proxy_settings() {
    let production = nginx_directives(&read("nginx/nginx.conf"));
    let template = nginx_directives(&render_cluster_template(Path::new("/tmp/sse-cluster")));
    assert_streams_through("nginx/cluster.conf.template", &template, compose_heartbeat());

    // Everything under `server` and `upstream` except addresses must match, so the local
    // cluster behaves like the deployed one.
    let shared = |d: &[Directive]| -> BTreeSet<Directive> {
        d.iter()
            .filter(|d| d.context.iter().any(|c| c == "server" || c.starts_with("upstream")))
            // `include` names the TLS drop-in's directory, a path like the addresses.
            .filter(|d| !matches!(d.name(), "listen" | "server" | "include"))
            .cloned()
            .collect()
    };
    let (prod, tmpl) = (shared(&production), shared(&template));
    let missing: Vec<_> = prod.difference(&tmpl).collect();
    let extra: Vec<_> = tmpl.difference(&prod).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "nginx.conf and cluster.conf.template differ:\n only in nginx.conf: {missing:?}\n only in the template: {extra:?}"
    );

    // Both take the TLS + HTTP/2 drop-in (nginx/tls.conf.template) inside their server block.
    for (file, d) in [("nginx/nginx.conf", &production), ("nginx/cluster.conf.template", &template)] {
        let include = single_arg(d, "server", "include");
        assert!(include.ends_with("/tls/*.conf"), "{file}: the server block should include tls/*.conf: {include}");
    }

    let text = read("nginx/cluster.conf.template");
    for placeholder in ["@STATE_DIR@", "@LISTEN@", "@UPSTREAM_SERVERS@", "@RLIMIT_NOFILE@", "@WORKER_CONNECTIONS@"] {
        assert!(text.contains(placeholder), "template lacks {placeholder}, which scripts/lib/nginx-conf.sh fills");
        assert!(
            read("scripts/lib/nginx-conf.sh").contains(placeholder),
            "scripts/lib/nginx-conf.sh does not fill {placeholder}"
        );
    }
    // scripts/cluster and the tests' nginx render through that one function.
    assert!(read("scripts/cluster").contains("render_nginx_conf "), "scripts/cluster renders nginx.conf itself");
    // Runs as a foreground child of scripts/cluster, which records its PID.
    assert!(
        template.iter().any(|d| d.context.is_empty() && d.words == ["daemon", "off"]),
        "the template should say `daemon off;`"
    );
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("sse-fanout-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nginx_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"));
    on_path.chain([PathBuf::from("/usr/sbin/nginx")]).find(|p| p.is_file())
}

/// Runs `nginx -t` on `conf` with its own prefix and early error log, so nothing outside `dir`
/// is needed.
fn nginx_test(nginx: &Path, dir: &TempDir, name: &str, conf: &str) {
    let path = dir.0.join(name);
    std::fs::write(&path, conf).expect("write nginx config");
    let out = Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(&dir.0)
        .arg("-e")
        .arg(dir.0.join("error.log"))
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run nginx -t");
    assert!(
        out.status.success(),
        "nginx -t rejects {name}:\n{}\n--- config ---\n{conf}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nginx_accepts_both_configs() {
    // Not a skip: the other end-to-end tests need nginx as well, and scripts/test installs it.
    let Some(nginx) = nginx_binary() else {
        panic!("nginx is not installed here: scripts/test installs it (or apt-get install nginx)");
    };
    let dir = TempDir::new("nginx-t");

    // The compose hostnames do not resolve here and nginx resolves upstreams at load time.
    let mut production = read("nginx/nginx.conf");
    let compose = yaml("docker-compose.yml");
    for (i, node) in compose_nodes(&compose).iter().enumerate() {
        let from = format!("server {}:{}", node.service, node.listen_port);
        assert!(production.contains(&from), "nginx.conf lacks `{from}`");
        production = production.replace(&from, &format!("server 127.0.0.1:{}", 18080 + i));
    }
    nginx_test(&nginx, &dir, "nginx.conf", &production);

    let state = dir.0.join("cluster");
    std::fs::create_dir_all(state.join("tmp")).expect("create state dir");
    nginx_test(&nginx, &dir, "cluster.conf", &render_cluster_template(&state));

    // With the TLS + HTTP/2 drop-in rendered where the server block includes it, as
    // `scripts/cluster up --tls` does (certificate made by the same library function).
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            r#"source scripts/lib/nginx-conf.sh && make_self_signed_cert "$1" \
               && render_nginx_tls_conf 127.0.0.1:18443 "$1/tls.crt" "$1/tls.key" >"$1/tls.conf""#,
        )
        .arg("tls")
        .arg(state.join("tls"))
        .current_dir(repo())
        .output()
        .expect("run bash");
    assert!(out.status.success(), "TLS drop-in: {}", String::from_utf8_lossy(&out.stderr));
    let tls = std::fs::read_to_string(state.join("tls/tls.conf")).expect("tls.conf");
    assert!(tls.contains("listen 127.0.0.1:18443 ssl http2"), "{tls}");
    let leftover = tls.match_indices('@').any(|(i, _)| tls[i + 1..].starts_with(|c: char| c.is_ascii_uppercase()));
    assert!(!leftover, "a placeholder is left in the TLS drop-in:\n{tls}");
    nginx_test(&nginx, &dir, "cluster-tls.conf", &render_cluster_template(&state));
}

/// The template filled in by scripts/lib/nginx-conf.sh, as scripts/cluster fills it, for two nodes.
fn render_cluster_template(state_dir: &Path) -> String {
    let upstreams = ["127.0.0.1:18081".to_owned(), "127.0.0.1:18082".to_owned()];
    let rendered = common::render_nginx_conf(state_dir, "127.0.0.1:18079", 4096, 1024, &upstreams);
    // A placeholder is `@NAME@` in capitals; the comments mention `@ signs` in lower case.
    let leftover =
        rendered.match_indices('@').any(|(i, _)| rendered[i + 1..].starts_with(|c: char| c.is_ascii_uppercase()));
    assert!(!leftover, "the template has a placeholder the renderer does not fill");
    for upstream in &upstreams {
        assert!(rendered.contains(&format!("server {upstream} ")), "no `server {upstream}` in the rendered config");
    }
    rendered
}

// ------------------------------------------------------------------------------------------------
// Kubernetes
// ------------------------------------------------------------------------------------------------

/// Every manifest in deploy/k8s by (kind, name), with the file it came from.
fn k8s_objects() -> BTreeMap<(String, String), (String, Value)> {
    let dir = repo().join("deploy/k8s");
    let mut objects = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("read deploy/k8s")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    entries.sort();
    for path in entries {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        for doc in yaml_documents(&path) {
            let kind = str_of(&doc["kind"], "kind").to_owned();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let key = (kind, name);
            assert!(!objects.contains_key(&key), "{key:?} defined twice in deploy/k8s");
            objects.insert(key, (file.clone(), doc));
        }
    }
    objects
}

fn one_of_kind<'a>(objects: &'a BTreeMap<(String, String), (String, Value)>, kind: &str) -> &'a Value {
    let found: Vec<_> = objects.iter().filter(|((k, _), _)| k == kind).collect();
    match found.as_slice() {
        [(_, (_, v))] => v,
        _ => panic!("deploy/k8s should have exactly one {kind}, has {}", found.len()),
    }
}

fn get<'a>(objects: &'a BTreeMap<(String, String), (String, Value)>, kind: &str, name: &str) -> &'a Value {
    &objects
        .get(&(kind.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("the Deployment refers to {kind} {name:?}, not in deploy/k8s"))
        .1
}

/// `labels` contains every `selector` pair.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A probe's or Service's port reference: a name or a number, resolved to the container port.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    let ports = container["ports"].as_sequence().expect("container lists ports");
    let found = match port {
        Value::String(name) => ports.iter().find(|p| p["name"].as_str() == Some(name)),
        Value::Number(n) => ports.iter().find(|p| p["containerPort"].as_u64() == n.as_u64()),
        other => panic!("port reference {other:?}"),
    };
    let found = found.unwrap_or_else(|| panic!("port {port:?} is not a container port"));
    found["containerPort"].as_u64().and_then(|p| u16::try_from(p).ok()).expect("containerPort is a port number")
}

/// Seconds the preStop hook holds the pod before SIGTERM: `sleep N` or `sleep: {seconds: N}`.
fn pre_stop_seconds(container: &Value) -> u64 {
    let pre_stop = &container["lifecycle"]["preStop"];
    if let Some(seconds) = pre_stop["sleep"]["seconds"].as_u64() {
        return seconds;
    }
    let command = strings(&pre_stop["exec"]["command"], "preStop exec command");
    match command.as_slice() {
        [sleep, n] if sleep.ends_with("sleep") => n.parse().expect("preStop sleep takes whole seconds"),
        _ => panic!("preStop should sleep a few seconds, is {command:?}"),
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_binary_and_each_other() {
    let objects = k8s_objects();
    for ((kind, name), (file, doc)) in &objects {
        assert!(
            doc["metadata"]["namespace"].is_null(),
            "{file}: {kind} {name} names a namespace; the manifests are namespace-agnostic"
        );
    }

    let deployment = one_of_kind(&objects, "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(3), "replicas");
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(selects(&spec["selector"]["matchLabels"], pod_labels), "Deployment selector must match its pod labels");
    let containers = pod["containers"].as_sequence().expect("containers");
    let [container] = containers.as_slice() else {
        panic!("one container per pod expected");
    };

    // Every variable the pod gets: envFrom ConfigMaps and Secrets, then env.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            let cm = get(&objects, "ConfigMap", name);
            for (k, v) in cm["data"].as_mapping().expect("ConfigMap data") {
                let value =
                    v.as_str().unwrap_or_else(|| panic!("ConfigMap {name}: {k:?} must be a quoted string, is {v:?}"));
                env.insert(str_of(k, "key").to_owned(), value.to_owned());
            }
        }
        if let Some(name) = source["secretRef"]["name"].as_str() {
            let secret = get(&objects, "Secret", name);
            for field in ["stringData", "data"] {
                for (k, _) in secret[field].as_mapping().into_iter().flatten() {
                    env.insert(str_of(k, "key").to_owned(), "(secret)".to_owned());
                }
            }
        }
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = str_of(&var["name"], "env name").to_owned();
        let value = var["value"].as_str().unwrap_or("(from a reference)");
        env.insert(name, value.to_owned());
    }
    assert_known_env("deploy/k8s", env.keys().map(String::as_str));
    assert!(
        env.contains_key("SSE_JWT_SECRET") || env.contains_key("SSE_JWT_PUBLIC_KEY"),
        "pods need a JWT key, or each runs in development mode with its own secret"
    );
    assert!(env.contains_key("SSE_NODE_ID"), "pods need SSE_NODE_ID (the pod name)");

    // One port, and everything points at it.
    let listen_port = port_of(&effective(&env, "SSE_LISTEN"));
    let ports = container["ports"].as_sequence().expect("ports");
    assert_eq!(ports.len(), 1, "one container port");
    assert_eq!(
        ports[0]["containerPort"].as_u64(),
        Some(u64::from(listen_port)),
        "containerPort must be the SSE_LISTEN port"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(resolve_port(container, &get["port"]), listen_port, "{probe} port");
    }
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(listen_port.to_string().as_str()));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    // The kubelet must not SIGKILL a pod that is still sleeping in preStop or draining.
    let drain = sse_duration(&effective(&env, "SSE_DRAIN_PERIOD"));
    let pre_stop = Duration::from_secs(pre_stop_seconds(container));
    let grace =
        Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds set"));
    assert!(
        grace > drain + pre_stop,
        "terminationGracePeriodSeconds {grace:?} must exceed SSE_DRAIN_PERIOD {drain:?} + preStop {pre_stop:?}"
    );

    let security = &container["securityContext"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "runAsNonRoot");
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    for kind in ["requests", "limits"] {
        assert!(container["resources"][kind].is_mapping(), "resources.{kind} set");
    }

    let service = one_of_kind(&objects, "Service");
    assert!(selects(&service["spec"]["selector"], pod_labels), "Service selector must match the pods");
    let service_ports = service["spec"]["ports"].as_sequence().expect("ports");
    for port in service_ports {
        assert_eq!(resolve_port(container, &port["targetPort"]), listen_port, "Service targetPort");
    }

    let pdb = one_of_kind(&objects, "PodDisruptionBudget");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "PodDisruptionBudget selector must match the pods"
    );

    let monitor = one_of_kind(&objects, "ServiceMonitor");
    assert!(
        selects(&monitor["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"]),
        "ServiceMonitor must select the Service"
    );
    let service_port_names: BTreeSet<&str> = service_ports.iter().filter_map(|p| p["name"].as_str()).collect();
    for endpoint in monitor["spec"]["endpoints"].as_sequence().expect("endpoints") {
        let port = endpoint["port"].as_str().unwrap_or_default();
        assert!(service_port_names.contains(port), "ServiceMonitor port {port:?} is not a Service port name");
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    }

    // The kustomization applies every manifest but the optional ServiceMonitor.
    let kustomization = one_of_kind(&objects, "Kustomization");
    let listed: BTreeSet<String> = strings(&kustomization["resources"], "resources").into_iter().collect();
    let manifests: BTreeSet<String> = objects
        .iter()
        .filter(|((kind, _), _)| kind != "Kustomization" && kind != "ServiceMonitor")
        .map(|(_, (file, _))| file.clone())
        .collect();
    assert_eq!(listed, manifests, "kustomization.yaml resources vs the manifests");
}

/// kubernetes-validate, which scripts/test installs (`SSE_KUBERNETES_VALIDATE`); a run without it
/// fails rather than skipping, so the manifests are never silently unchecked.
fn kubernetes_validate() -> PathBuf {
    let path = std::env::var_os("SSE_KUBERNETES_VALIDATE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/sse-fanout-tools/venv/bin/kubernetes-validate")
    });
    assert!(
        path.exists(),
        "{path:?} is missing: run scripts/test (it installs kubernetes-validate) or set SSE_KUBERNETES_VALIDATE"
    );
    path
}

/// Validates `files` strictly (unknown fields refused) against the Kubernetes API schemas.
fn validate_manifests(files: &[PathBuf]) -> std::process::Output {
    std::process::Command::new(kubernetes_validate())
        .arg("--strict")
        .arg("--no-warn")
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

/// Beyond parsing: every manifest in deploy/k8s is checked against the schema of its kind, so a
/// misspelt field or a value of the wrong type fails here, not in `kubectl apply`. Kinds that are
/// not Kubernetes' own (Kustomization, the Prometheus operator's ServiceMonitor) have no schema
/// there and keep the parse checks above.
#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_api_schemas() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let output = validate_manifests(&files);
    let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    for kind in ["deployment", "service", "configmap", "secret", "poddisruptionbudget"] {
        assert!(report.contains(&format!("passed for resource {kind}/")), "{kind} was not validated:\n{report}");
    }

    // The validator refuses what it should: the deployment with a field Kubernetes does not
    // know and a count of the wrong type.
    let broken = read("deploy/k8s/deployment.yaml").replacen("spec:\n", "spec:\n  replicaz: 3\n", 1);
    let dir = std::env::temp_dir().join(format!("sse-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("deployment.yaml");
    std::fs::write(&file, broken).expect("write");
    let refused = validate_manifests(std::slice::from_ref(&file));
    std::fs::remove_dir_all(&dir).ok();
    assert!(!refused.status.success(), "an unknown field passed: {}", String::from_utf8_lossy(&refused.stdout));
}
