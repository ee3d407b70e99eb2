//! The Grafana dashboard (deploy/grafana/) shows what nodes export: every metric its PromQL
//! names is in a live node's `/metrics` once the node has done what the panel graphs, and
//! docker-compose.yml provisions it with a datasource that reaches the compose Prometheus.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::{Node, RedisServer, SseClient, http, open_resumable, publish_api, stream_url};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/dashboards/sse-fanout.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard: its panels' targets and its variables' queries.
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        out.push(variable["definition"].as_str().expect("a variable's definition").to_owned());
    }
    out
}

/// The metric names an expression reads: identifiers starting `sse_` (our metrics' prefix),
/// outside label matchers' quoted values.
fn metric_names(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut unquoted = String::new();
    let mut quoted = false;
    for c in expression.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted {
            unquoted.push(c);
        }
    }
    for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("sse_") {
            names.insert(word.to_owned());
        }
    }
    names
}

/// The series names in Prometheus text (`name{labels} value` or `name value`).
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(sse_fanout_duration_seconds_bucket{instance=~"sse_x"}[5m]))) / sse_a_total"#,
    );
    assert_eq!(names, BTreeSet::from(["sse_a_total".to_owned(), "sse_fanout_duration_seconds_bucket".to_owned()]));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_queries_is_in_a_live_nodes_metrics() {
    let wanted: BTreeSet<String> = expressions(&dashboard()).iter().flat_map(|e| metric_names(e)).collect();
    assert!(wanted.len() >= 15, "the dashboard names too few metrics: {wanted:?}");

    // A node that has done a bit of everything the panels graph.
    let redis = RedisServer::start().await;
    let node = Node::start(&[("SSE_REDIS_URL", redis.url().as_str()), ("SSE_CANARY_INTERVAL", "200ms")]).await;
    let url = stream_url(&node, "dash", &["news"]);
    let (mut stream, cursor) = open_resumable(&url, None).await;
    let (status, reply) = publish_api(&node, json!({"topics": ["news"], "data": "one"})).await;
    assert_eq!(status, 202, "{reply}");
    let first = stream.next_event(Duration::from_secs(5)).await.expect("delivered");
    drop(stream);
    let (status, reply) = publish_api(&node, json!({"topics": ["news"], "data": "two"})).await;
    assert_eq!(status, 202, "{reply}");
    // An exact resume that replays one entry, and one reset for an unusable cursor.
    let (mut resumed, _) = open_resumable(&url, Some(&cursor)).await;
    assert_eq!(resumed.next_event(Duration::from_secs(5)).await.expect("replayed").data, "one");
    assert_ne!(first.id, None);
    let (mut reset, _) = open_resumable(&url, Some("not-a-cursor")).await;
    assert_eq!(reset.next_event(Duration::from_secs(5)).await.expect("reset").event, "reset");
    // A refused stream.
    let refused = SseClient::open(&node.url("/events?access_token=forged"), &[]).await;
    assert_eq!(refused.status, 401);

    let metrics = http().get(node.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    let have = exported(&metrics);
    let missing: Vec<&String> = wanted.iter().filter(|name| !have.contains(*name)).collect();
    assert!(missing.is_empty(), "the dashboard queries {missing:?}, which /metrics does not have:\n{metrics}");
}

#[test]
fn compose_provisions_the_dashboard_with_the_compose_prometheus() {
    let read = |rel: &str| std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let yaml = |rel: &str| -> serde_norway::Value {
        serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
    };
    let compose = yaml("docker-compose.yml");
    let grafana = &compose["services"]["grafana"];
    let volumes: Vec<&str> =
        grafana["volumes"].as_sequence().expect("grafana volumes").iter().filter_map(|v| v.as_str()).collect();
    let mount = |host: &str| {
        volumes
            .iter()
            .find_map(|v| v.strip_prefix(host)?.strip_prefix(':'))
            .map(|rest| rest.trim_end_matches(":ro").to_owned())
            .unwrap_or_else(|| panic!("compose grafana should mount {host}: {volumes:?}"))
    };
    assert_eq!(mount("./deploy/grafana/provisioning"), "/etc/grafana/provisioning");
    let dashboards_at = mount("./deploy/grafana/dashboards");

    let providers = yaml("deploy/grafana/provisioning/dashboards/sse-fanout.yml");
    let path = providers["providers"][0]["options"]["path"].as_str().expect("a provider path");
    assert_eq!(path, dashboards_at, "the provider reads the folder compose mounts the dashboards on");

    let sources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let source = &sources["datasources"][0];
    let url = source["url"].as_str().expect("a datasource url");
    let host = url.trim_start_matches("http://").split(':').next().expect("a host");
    assert!(compose["services"][host]["image"].as_str().is_some_and(|i| i.contains("prometheus")), "{url}");
    assert!(url.ends_with(":9090"), "{url}");
    let uid = source["uid"].as_str().expect("a datasource uid");
    for panel in dashboard()["panels"].as_array().expect("panels").iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"].as_str(), Some(uid), "panel {:?}", panel["title"]);
    }
}
