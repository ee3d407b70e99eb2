//! `sse-loadtest render`: turns the JSON result lines of a benchmark run (several servers,
//! repeated scenarios) into the Markdown tables of docs/benchmarks.md — absolute figures per
//! server and run, the spread between repeats, and our node's ratio to each peer.
//!
//! The tables replace whatever stands between the `<!-- bench:results:begin -->` and
//! `<!-- bench:results:end -->` markers, so the hand-written text around them stays.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

pub const BEGIN: &str = "<!-- bench:results:begin -->";
pub const END: &str = "<!-- bench:results:end -->";

/// Our node's label; every other label but the floor's is a peer.
const OURS: &str = "ours";
/// `sse-loadtest floor`, the cheapest fan-out possible: not a peer, the machine's limit.
const FLOOR: &str = "floor";

pub fn run(results: &Path, docs: &Path) -> Result<()> {
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {}", results.display()))?;
    let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let tables = tables(&lines);
    let doc = std::fs::read_to_string(docs).unwrap_or_default();
    let out = splice(&doc, &tables);
    std::fs::write(docs, out).with_context(|| format!("writing {}", docs.display()))?;
    eprintln!("render: {} result lines → {}", lines.len(), docs.display());
    Ok(())
}

/// Replaces the text between the markers, or appends a marked section.
pub fn splice(doc: &str, tables: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{BEGIN}\n{tables}{}", &doc[..b], &doc[e..])
        }
        _ => format!("{doc}\n{BEGIN}\n{tables}{END}\n"),
    }
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k)?.as_f64()
}

fn labels(lines: &[Value]) -> Vec<String> {
    let mut seen = Vec::new();
    for l in lines {
        if let Some(s) = l["label"].as_str()
            && !seen.iter().any(|x| x == s)
        {
            seen.push(s.to_string());
        }
    }
    seen
}

fn of<'a>(lines: &'a [Value], label: &str, scenario: &str, kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["label"] == label && l["scenario"] == scenario && l["kind"] == kind).collect()
}

/// `a / b` formatted as a ratio, or a dash.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// "a / b (spread s%)" over repeats, with the mean as the headline value; the spread is
/// (max − min) / mean.
fn runs(values: &[f64], digits: usize) -> (String, Option<f64>) {
    if values.is_empty() {
        return ("–".into(), None);
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let list: Vec<String> = values.iter().map(|x| format!("{x:.digits$}")).collect();
    let spread = if v.len() > 1 && mean != 0.0 {
        format!(" (spread {:.0}%)", (v[v.len() - 1] - v[0]) / mean * 100.0)
    } else {
        String::new()
    };
    (format!("{}{spread}", list.join(" / ")), Some(mean))
}

pub fn tables(lines: &[Value]) -> String {
    let labels = labels(lines);
    let mut out = String::new();
    let peers: Vec<&String> = labels.iter().filter(|l| l.as_str() != OURS && l.as_str() != FLOOR).collect();

    // Versions and conditions.
    let _ = writeln!(out, "\n#### Servers measured\n");
    let _ = writeln!(
        out,
        "| label | version | quiet wait before run (s) | server core | load-generator core | loopback receive on | reader stays awake (ms) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for l in lines.iter().filter(|l| l["kind"] == "meta") {
        // Runs from before the setting existed had readers that slept at once.
        let awake = l["stay_awake_ms"].as_u64().unwrap_or(0);
        let receive_on = if l["rx_steered"] == true { "load-generator core" } else { "sender's core" };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {receive_on} | {awake} |",
            l["label"].as_str().unwrap_or(""),
            l["version"].as_str().unwrap_or(""),
            l["quiet_wait_s"],
            l["server_cpu"].as_str().unwrap_or(""),
            l["loadgen_cpu"].as_str().unwrap_or("")
        );
    }

    // Idle connections.
    let _ = writeln!(out, "\n#### Idle connections: server RSS per connection\n");
    let _ = writeln!(out, "Runs separated by `/`; headline = mean of runs; ratio = ours ÷ peer (lower is better).\n");
    let _ = writeln!(
        out,
        "| server | target conns | open | failures | connect rate /s | RSS bytes/conn | ratio ours÷this |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let mut rss: BTreeMap<(String, u64), Option<f64>> = BTreeMap::new();
    let mut targets: Vec<u64> =
        of_kind(lines, "conns", "checkpoint").iter().filter_map(|l| l["target_conns"].as_u64()).collect();
    targets.sort();
    targets.dedup();
    for t in &targets {
        for label in &labels {
            rss.insert((label.clone(), *t), rss_headline(lines, label, *t).1);
        }
        for label in &labels {
            let all = of(lines, label, "conns", "checkpoint");
            let coldest = all.iter().filter_map(|l| l["server_rss_kib_before"].as_u64()).min().unwrap_or(0);
            let cps: Vec<&Value> = all.into_iter().filter(|l| l["target_conns"].as_u64() == Some(*t)).collect();
            if cps.is_empty() {
                continue;
            }
            let vals: Vec<f64> =
                cps.iter().filter(|l| !is_warm(l, coldest)).filter_map(|l| f(l, "server_rss_bytes_per_conn")).collect();
            let warm = cps.iter().filter(|l| is_warm(l, coldest)).count();
            let (text, mean) = runs(&vals, 0);
            let open: Vec<String> = cps.iter().map(|l| l["open"].to_string()).collect();
            let fails: Vec<String> = cps.iter().map(|l| l["failures"].to_string()).collect();
            let rates: Vec<f64> = cps.iter().filter_map(|l| f(l, "connect_rate_per_s")).collect();
            let _ = writeln!(
                out,
                "| {label} | {t} | {} | {} | {} | {text}{} | {} |",
                open.join(" / "),
                fails.join(" / "),
                runs(&rates, 0).0,
                if warm > 0 { format!(" ({warm} run(s) on a warm server left out)") } else { String::new() },
                if label == OURS {
                    "–".into()
                } else {
                    ratio(rss.get(&(OURS.to_string(), *t)).copied().flatten(), mean)
                }
            );
        }
    }

    for (scenario, default_slo) in [("fanout", 50.0), ("unicast", 20.0)] {
        // One set of tables per stream count: a run may measure the same scenario at several.
        let mut sizes: Vec<u64> = of_kind(lines, scenario, "step").iter().filter_map(|s| s["conns"].as_u64()).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.dedup();
        for size in sizes {
            delivery_tables(&mut out, lines, &labels, scenario, size, default_slo);
        }
    }

    let _ = writeln!(out, "\n#### Reconnect storm\n");
    let _ = writeln!(
        out,
        "| server | storm | clients | streams lost | all back after (s) | reconnect p50 / p99 / max ms | clients exact | missing | duplicates | failures during storm |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for label in &labels {
        for s in of(lines, label, "reconnect", "storm") {
            let r = &s["reconnect_ms"];
            // Lines from before node-kill storms were all client drops of every stream.
            let storm = s["storm"].as_str().unwrap_or("clients_dropped").replace('_', " ");
            let lost = s.get("streams_lost").unwrap_or(&s["conns"]);
            let _ = writeln!(
                out,
                "| {label} | {storm} | {} | {lost} | {} | {} / {} / {} | {} / {} | {} | {} | {} |",
                s["conns"],
                num(f(s, "all_back_after_s"), 2),
                num(f(r, "p50_ms"), 0),
                num(f(r, "p99_ms"), 0),
                num(f(r, "max_ms"), 0),
                s["clients_exact"],
                s["clients_checked"],
                s["missing_total"],
                s["duplicates_total"],
                s["failures_during_storm"]
            );
        }
    }

    let _ = writeln!(out, "\n#### Churn\n");
    let _ = writeln!(
        out,
        "| server | held | churn opened /s | churn connect p99 ms | failures | held lost | event p99 ms | server CPU % |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for label in &labels {
        for s in of(lines, label, "churn", "churn") {
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {} | {} | {} |",
                s["held"],
                num(f(s, "churn_opened_per_s"), 0),
                num(f(&s["connect_ms"], "p99_ms"), 1),
                s["failures"],
                s["held_lost"],
                num(f(&s["latency_ms"], "p99_ms"), 2),
                num(f(s, "server_cpu_pct"), 0)
            );
        }
    }
    if peers.is_empty() {
        let _ = writeln!(out, "\n(no peer results in this run)");
    }
    out.push('\n');
    out
}

/// The every-step and headline tables of one delivery scenario at one stream count.
fn delivery_tables(out: &mut String, lines: &[Value], labels: &[String], scenario: &str, size: u64, default_slo: f64) {
    // The objective the steps were measured against (`scripts/bench --fanout-slo` changes it).
    let slo = of_kind(lines, scenario, "step")
        .iter()
        .filter(|s| s["conns"].as_u64() == Some(size))
        .find_map(|s| f(s, "slo_p99_ms"))
        .unwrap_or(default_slo);
    let _ = writeln!(out, "\n#### {scenario}, {size} streams: every step\n");
    let _ = writeln!(
        out,
        "| server | run | rate /s | subscribers | deliveries /s | lost | p50 ms | p99 ms | p99.9 ms | max ms | server CPU % | server CPU s per 1M deliveries | load-gen CPU % | met p99 ≤ {slo} ms, 0 loss |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut best: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut cpu_m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut cpu_all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for label in labels {
        let steps = of(lines, label, scenario, "step").into_iter().filter(|s| s["conns"].as_u64() == Some(size));
        let mut run = 0;
        let mut prev_rate = f64::INFINITY;
        let mut best_this: Option<f64> = None;
        let mut cpu_this: Option<f64> = None;
        // A rate counts only if every lower step of its run met the objective too: a pass
        // after a miss is noise, not a rate the server keeps.
        let mut held = true;
        for s in steps {
            let rate = f(s, "rate").unwrap_or(0.0);
            if rate <= prev_rate {
                if run > 0 {
                    best.entry(label.clone()).or_default().push(best_this.unwrap_or(0.0));
                    if let Some(c) = cpu_this {
                        cpu_m.entry(label.clone()).or_default().push(c);
                    }
                }
                run += 1;
                best_this = None;
                cpu_this = None;
                held = true;
            }
            prev_rate = rate;
            if let Some(c) = f(s, "server_cpu_s_per_million_deliveries") {
                cpu_all.entry(label.clone()).or_default().push(c);
            }
            let lat = &s["latency_ms"];
            let met = s["met_slo"].as_bool().unwrap_or(false);
            held &= met;
            if held && best_this.is_none_or(|b| rate > b) {
                best_this = Some(rate);
                cpu_this = f(s, "server_cpu_s_per_million_deliveries");
            }
            let _ = writeln!(
                out,
                "| {label} | {run} | {rate} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s["conns"],
                num(f(s, "deliveries_per_s"), 0),
                s["lost"],
                num(f(lat, "p50_ms"), 2),
                num(f(lat, "p99_ms"), 2),
                num(f(lat, "p999_ms"), 2),
                num(f(lat, "max_ms"), 1),
                num(f(s, "server_cpu_pct"), 0),
                num(f(s, "server_cpu_s_per_million_deliveries"), 2),
                num(f(s, "loadgen_worker_cpu_pct"), 0),
                if met { "yes" } else { "no" }
            );
        }
        if run > 0 {
            best.entry(label.clone()).or_default().push(best_this.unwrap_or(0.0));
            if let Some(c) = cpu_this {
                cpu_m.entry(label.clone()).or_default().push(c);
            }
        }
    }
    let _ = writeln!(out, "\n#### {scenario}, {size} streams: headline\n");
    let _ = writeln!(
        out,
        "| server | highest rate with p99 ≤ {slo} ms and 0 loss there and at every lower rate (per run) | ratio ours÷this | server CPU s per 1M deliveries at that rate | ratio ours÷this | server CPU s per 1M deliveries, mean of all steps | ratio ours÷this |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let mean = |v: Option<&Vec<f64>>| v.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64);
    let ours_all = mean(cpu_all.get(OURS));
    let ours_best = best.get(OURS).and_then(|v| runs(v, 0).1);
    let ours_cpu = cpu_m.get(OURS).and_then(|v| runs(v, 2).1);
    for label in labels.iter().filter(|l| best.contains_key(*l)) {
        let (bt, bm) = runs(best.get(label).map(Vec::as_slice).unwrap_or(&[]), 0);
        let (ct, cm) = runs(cpu_m.get(label).map(Vec::as_slice).unwrap_or(&[]), 2);
        let mine = label == OURS;
        let all = mean(cpu_all.get(label));
        let _ = writeln!(
            out,
            "| {label} | {bt} | {} | {ct} | {} | {} | {} |",
            if mine { "–".into() } else { ratio(ours_best, bm) },
            if mine { "–".into() } else { ratio(ours_cpu, cm) },
            num(all, 2),
            if mine { "–".into() } else { ratio(ours_all, all) }
        );
    }
    if best.contains_key(FLOOR) {
        let _ = writeln!(
            out,
            "\n`floor` is `sse-loadtest floor`, not a peer: one `send` per stream and nothing else, the \
    lowest latency and CPU per delivery any server can show on this machine."
        );
    }
}

/// A checkpoint measured on a server that already held much more memory before the run
/// than its coldest start (left over from earlier scenarios): its RSS difference says
/// nothing about the streams.
fn is_warm(l: &Value, coldest_kib: u64) -> bool {
    let before = l["server_rss_kib_before"].as_u64().unwrap_or(0);
    before > coldest_kib + coldest_kib / 2 + 10 * 1024
}

/// RSS per connection at checkpoint `t` over the cold runs of `label`.
fn rss_headline(lines: &[Value], label: &str, t: u64) -> (String, Option<f64>) {
    let all = of(lines, label, "conns", "checkpoint");
    let coldest = all.iter().filter_map(|l| l["server_rss_kib_before"].as_u64()).min().unwrap_or(0);
    let vals: Vec<f64> = all
        .iter()
        .filter(|l| l["target_conns"].as_u64() == Some(t) && !is_warm(l, coldest))
        .filter_map(|l| f(l, "server_rss_bytes_per_conn"))
        .collect();
    runs(&vals, 0)
}

fn of_kind<'a>(lines: &'a [Value], scenario: &str, kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["scenario"] == scenario && l["kind"] == kind).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splices_between_markers_or_appends() {
        let doc = format!("intro\n{BEGIN}\nold\n{END}\nafter\n");
        assert_eq!(splice(&doc, "new\n"), format!("intro\n{BEGIN}\nnew\n{END}\nafter\n"));
        let appended = splice("intro\n", "t\n");
        assert!(appended.starts_with("intro\n\n<!--"));
        assert!(appended.ends_with(&format!("t\n{END}\n")));
    }

    #[test]
    fn headline_takes_best_rate_per_run_and_ratios() {
        let step = |label: &str, rate: f64, met: bool, cpu: f64| {
            json!({"label": label, "scenario": "fanout", "kind": "step", "rate": rate,
                   "met_slo": met, "server_cpu_s_per_million_deliveries": cpu,
                   "latency_ms": {"p99_ms": 1.0}, "conns": 10, "lost": 0})
        };
        let lines = vec![
            step("ours", 10.0, true, 1.0),
            step("ours", 20.0, true, 2.0),
            step("ours", 10.0, true, 1.0),
            step("ours", 20.0, false, 2.0),
            step("nchan", 10.0, true, 4.0),
            step("nchan", 20.0, false, 4.0),
        ];
        let t = tables(&lines);
        // ours: runs best 20 and 10 → mean 15; nchan 10 → ratio 1.50×.
        assert!(t.contains("| ours | 20 / 10 (spread 67%) |"), "{t}");
        assert!(t.contains("| nchan | 10 | 1.50× |"), "{t}");
        assert!(t.contains("highest rate with p99 ≤ 50 ms"), "{t}");
        let relaxed: Vec<Value> = lines
            .into_iter()
            .map(|mut l| {
                l["slo_p99_ms"] = json!(250.0);
                l
            })
            .collect();
        assert!(tables(&relaxed).contains("highest rate with p99 ≤ 250 ms"), "the objective comes from the steps");
    }

    #[test]
    fn a_pass_after_a_miss_does_not_count() {
        let step = |label: &str, rate: f64, met: bool| {
            json!({"label": label, "scenario": "fanout", "kind": "step", "rate": rate, "met_slo": met,
                   "server_cpu_s_per_million_deliveries": 1.0, "latency_ms": {"p99_ms": 1.0}, "conns": 10, "lost": 0})
        };
        let t = tables(&[
            step("ours", 10.0, true),
            step("ours", 20.0, false),
            step("ours", 30.0, true),
            step("nchan", 10.0, false),
            step("nchan", 20.0, true),
        ]);
        assert!(t.contains("| ours | 10 |"), "{t}");
        assert!(t.contains("| nchan | 0 |"), "{t}");
    }

    #[test]
    fn a_server_without_steps_at_a_size_has_no_headline_row() {
        let step = |label: &str, scenario: &str| {
            json!({"label": label, "scenario": scenario, "kind": "step", "rate": 1.0, "met_slo": true,
                   "server_cpu_s_per_million_deliveries": 1.0, "latency_ms": {"p99_ms": 1.0}, "conns": 10, "lost": 0})
        };
        let t = tables(&[step("floor", "fanout"), step("ours", "fanout"), step("ours", "unicast")]);
        let unicast = t.find("#### unicast, 10 streams: headline").expect("unicast headline");
        assert!(!t[unicast..].contains("| floor |"), "{t}");
        assert_eq!(t.matches("`floor` is `sse-loadtest floor`").count(), 1, "{t}");
    }

    #[test]
    fn each_stream_count_has_its_own_headline() {
        let step = |conns: u64, rate: f64, met: bool| {
            json!({"label": "ours", "scenario": "fanout", "kind": "step", "rate": rate, "met_slo": met,
                   "server_cpu_s_per_million_deliveries": 4.0, "latency_ms": {"p99_ms": 1.0}, "conns": conns, "lost": 0})
        };
        let t =
            tables(&[step(10000, 2.0, false), step(10000, 5.0, false), step(3000, 10.0, true), step(3000, 20.0, true)]);
        let big = t.find("#### fanout, 10000 streams: headline").expect("the 10k headline");
        let small = t.find("#### fanout, 3000 streams: headline").expect("the 3k headline");
        assert!(big < small, "larger first\n{t}");
        assert!(t[big..small].contains("| ours | 0 |"), "no 10k step met the objective\n{t}");
        assert!(t[small..].contains("| ours | 20 |"), "{t}");
    }

    #[test]
    fn the_floor_is_explained_and_is_no_peer() {
        let step = |label: &str| {
            json!({"label": label, "scenario": "fanout", "kind": "step", "rate": 2.0, "met_slo": false,
                   "server_cpu_s_per_million_deliveries": 4.0, "latency_ms": {"p99_ms": 100.0}, "conns": 10, "lost": 0})
        };
        let t = tables(&[step("floor"), step("ours")]);
        assert!(t.contains("`floor` is `sse-loadtest floor`, not a peer"), "{t}");
        assert!(t.contains("(no peer results in this run)"), "{t}");
        assert!(!tables(&[step("nchan"), step("ours")]).contains("`floor` is"));
    }

    #[test]
    fn rss_ratio_per_checkpoint() {
        let cp = |label: &str, bytes: f64| {
            json!({"label": label, "scenario": "conns", "kind": "checkpoint", "target_conns": 10000,
                   "open": 10000, "failures": {}, "connect_rate_per_s": 500.0,
                   "server_rss_bytes_per_conn": bytes})
        };
        let t = tables(&[cp("ours", 3000.0), cp("nchan", 10000.0), cp("ours", 3200.0)]);
        assert!(
            t.contains(
                "| ours | 10000 | 10000 / 10000 | {} / {} | 500 / 500 (spread 0%) | 3000 / 3200 (spread 6%) | – |"
            ),
            "{t}"
        );
        assert!(t.contains("0.31×"), "{t}");
    }

    #[test]
    fn storms_say_what_kind_and_how_many_streams_were_lost() {
        let storm = |extra: Value| {
            let mut l = json!({"label": "ours", "scenario": "reconnect", "kind": "storm", "conns": 900,
                   "all_back_after_s": 1.5, "reconnect_ms": {"p50_ms": 100.0, "p99_ms": 200.0, "max_ms": 300.0},
                   "clients_exact": 900, "clients_checked": 900, "missing_total": 0, "duplicates_total": 0,
                   "failures_during_storm": {}});
            for (k, v) in extra.as_object().into_iter().flatten() {
                l[k] = v.clone();
            }
            l
        };
        let t = tables(&[storm(json!({})), storm(json!({"storm": "node_killed", "streams_lost": 300}))]);
        assert!(t.contains("| ours | clients dropped | 900 | 900 | 1.50 |"), "an old line: every stream dropped\n{t}");
        assert!(t.contains("| ours | node killed | 900 | 300 | 1.50 |"), "{t}");
    }
}
