#!/usr/bin/env python3
"""scripts/lib/scale_stats.py — run by scripts/bench-scale: where this machine's CPU goes while
100,000 streams are held, and the tables of docs/benchmarks.md's "Scale" section.

  scale_stats.py sample STATE_DIR        # until killed: one JSON line a second to timeline.jsonl
  scale_stats.py report STATE_DIR        # scale run: phases, CPU by group, results → markdown
  scale_stats.py compare STATE_DIR       # compare run: 1 Redis against the cluster, as ratios

The sampler reads STATE_DIR/groups every second (one `name pid pid ...` line per group that the
script keeps up to date: nodes, nginx, redis, loadgen) and writes, per second, each group's CPU
time (utime + stime of the listed processes and all their descendants, summed over processes
alive at both ends of the second, so a killed node or a finished load generator does not make a
negative step) and resident memory, and the whole machine's busy time from /proc/stat. What the
machine spent beyond the groups ("other") is the kernel's deferred work (ksoftirqd), the
sampler itself and whatever else ran on the machine: the schedule says what that was.
"""

import json
import os
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CORES = os.cpu_count() or 1


def read_groups(state_dir):
    groups = {}
    try:
        with open(os.path.join(state_dir, "groups")) as f:
            for line in f:
                parts = line.split()
                if parts:
                    groups.setdefault(parts[0], set()).update(int(p) for p in parts[1:] if p.isdigit())
    except FileNotFoundError:
        pass
    return groups


def processes():
    """pid -> (ppid, cpu ticks, rss KiB) for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is the state (field 3 of proc(5)); ppid 4, utime 14, stime 15, rss 24.
            rss_pages = int(fields[21])
            out[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), rss_pages * PAGE_KIB)
        except (OSError, ValueError, IndexError):
            continue
    return out


def members(roots, procs):
    children = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [p for p in roots if p in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def machine():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    # user nice system idle iowait irq softirq steal ...
    idle = v[3] + v[4]
    return {"total": sum(v[:8]), "busy": sum(v[:8]) - idle, "softirq": v[6], "steal": v[7]}


def conntrack():
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def sample(state_dir):
    out = open(os.path.join(state_dir, "timeline.jsonl"), "a", buffering=1)
    me = os.getpid()
    prev_procs, prev_machine, prev_t = processes(), machine(), time.time()
    while True:
        time.sleep(1.0)
        procs, mach, now = processes(), machine(), time.time()
        groups = read_groups(state_dir)
        line = {
            "t": int(now * 1000),
            "dt": round(now - prev_t, 3),
            "machine": {k: mach[k] - prev_machine[k] for k in mach},
            "groups": {},
            "conntrack": conntrack(),
        }
        grouped = set()
        for name, roots in groups.items():
            pids = members(roots, procs) - {me}
            grouped |= pids
            cpu = sum(procs[p][1] - prev_procs[p][1] for p in pids if p in prev_procs)
            line["groups"][name] = {"cpu_ticks": cpu, "rss_kib": sum(procs[p][2] for p in pids), "procs": len(pids)}
        # The busiest processes outside the groups: what else ran on the machine.
        others = sorted(
            ((procs[p][1] - prev_procs[p][1], p) for p in procs if p in prev_procs and p not in grouped),
            reverse=True,
        )[:3]
        line["top_other"] = [[comm(p), d] for d, p in others if d > 0]
        out.write(json.dumps(line) + "\n")
        prev_procs, prev_machine, prev_t = procs, mach, now


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def load_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return rows


def windows_of(results):
    """Windows cut from the result lines: opening and holding (conns), each step's publishing,
    and a storm until every stream was back."""
    out = []
    for r in results:
        kind, scen, label, at = r.get("kind"), r.get("scenario"), r.get("label"), r.get("unix_ms", 0)
        if scen == "conns" and kind == "checkpoint" and r.get("connect_rate_per_s"):
            hold = r["hold_secs"] * 1000
            opening = r["open"] / r["connect_rate_per_s"] * 1000
            out.append((f"{label}: opening {r['open']:,}", int(at - hold - opening), at - hold))
            out.append((f"{label}: {r['open']:,} idle", at - hold, at))
        elif kind == "step" and r.get("publish_unix_ms"):
            a, b = r["publish_unix_ms"]
            out.append((f"{label}: {scen} {r['rate']:g}/s", a, b))
        elif kind == "storm" and r.get("storm_unix_ms"):
            back = r.get("all_back_after_s") or 10
            a = r["storm_unix_ms"]
            out.append((f"{label}: storm until all back", a, a + int(max(back, 2) * 1000)))
    return out


def phases(state_dir):
    out = []
    try:
        with open(os.path.join(state_dir, "phases")) as f:
            for line in f:
                name, start, end = line.split()
                out.append((name, int(start), int(end)))
    except FileNotFoundError:
        pass
    return out


def cpu_table(state_dir, windows):
    """Markdown: mean CPU of each group over each (name, start_ms, end_ms) window, % of one core."""
    timeline = load_jsonl(os.path.join(state_dir, "timeline.jsonl"))
    names = ["nodes", "nginx", "redis", "loadgen"]
    rows = [
        "| window | seconds | machine busy, % of 2 cores | of it softirq | nodes | nginx | Redis | load generator | other | busiest other processes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, start, end in windows:
        lines = [l for l in timeline if start < l["t"] <= end]
        if not lines:
            continue
        secs = sum(l["dt"] for l in lines)
        total = sum(l["machine"]["total"] for l in lines) or 1
        busy = sum(l["machine"]["busy"] for l in lines)
        soft = sum(l["machine"]["softirq"] for l in lines)
        g = {n: sum(l["groups"].get(n, {}).get("cpu_ticks", 0) for l in lines) / TICKS / secs * 100 for n in names}
        # Machine busy as % of one core, to subtract the groups from it.
        busy_core = busy / total * CORES * 100
        other = busy_core - sum(g.values())
        top = {}
        for l in lines:
            for c, d in l.get("top_other", []):
                top[c] = top.get(c, 0) + d
        top_s = ", ".join(f"{c} {d / TICKS / secs * 100:.0f}" for c, d in sorted(top.items(), key=lambda x: -x[1])[:3])
        rows.append(
            f"| {name} | {secs:.0f} | {busy / total * 100:.0f} | {soft / total * 100:.0f} | "
            + " | ".join(f"{g[n]:.0f}" for n in names)
            + f" | {other:.0f} | {top_s} |"
        )
    rows.append("")
    rows.append(
        "Group columns are % of one core (200 = both cores); machine busy and softirq are % of both "
        "cores (/proc/stat). Other = machine busy minus the groups: the kernel's deferred network "
        "work (ksoftirqd), the sampler, and anything else running."
    )
    return "\n".join(rows)


def rss_at(state_dir, when_ms, group):
    timeline = load_jsonl(os.path.join(state_dir, "timeline.jsonl"))
    best = None
    for l in timeline:
        if l["t"] <= when_ms and group in l["groups"]:
            best = l["groups"][group]["rss_kib"]
    return best


def fmt(x, nd=2):
    return "–" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}")


def report(state_dir):
    results = load_jsonl(os.path.join(state_dir, "results.jsonl"))
    out = []
    with open(os.path.join(state_dir, "setup.txt")) as f:
        out.append("```\n" + f.read().strip() + "\n```\n")
    for r in results:
        kind, scen = r.get("kind"), r.get("scenario")
        if scen == "conns" and kind == "checkpoint":
            secs = r["open"] / r["connect_rate_per_s"] if r.get("connect_rate_per_s") else None
            nodes_total = r["server_rss_kib"] * 1024
            nginx = rss_at(state_dir, r["unix_ms"], "nginx")
            out.append(
                f"**Connect and hold ({r['label']})**: {r['open']:,} of {r['target_conns']:,} streams open in "
                f"{fmt(secs, 1)} s ({r['connect_rate_per_s']:.0f}/s; failures {json.dumps(r['failures'])}); connect "
                f"p50 / p99 / max {r['connect_ms']['p50_ms']:.1f} / {r['connect_ms']['p99_ms']:.1f} / "
                f"{r['connect_ms']['max_ms']:.1f} ms. Nodes' RSS after {r['hold_secs']} s idle: "
                f"{nodes_total / 2**20:,.0f} MiB in all = {nodes_total / max(r['open'], 1):,.0f} B per stream "
                f"({r['server_rss_bytes_per_conn']:,.0f} B per stream above the nodes' RSS before opening); "
                f"kernel TCP memory {r['kernel_tcp_bytes_per_conn_both_ends']:,.0f} B per stream (all sockets of "
                f"the path); nginx RSS {fmt(nginx and nginx / 1024, 0)} MiB.\n"
            )
        elif scen in ("fanout", "unicast") and kind == "step":
            lat = r["latency_ms"]
            out.append(
                f"- {scen} {r['label']} at {r['rate']:g}/s to {r['conns']:,} streams: {r['deliveries_per_s']:,.0f} "
                f"deliveries/s, lost {r['lost']}, p50 {lat['p50_ms']:.1f} / p99 {lat['p99_ms']:.1f} / max "
                f"{lat['max_ms']:.1f} ms; nodes' CPU {r['server_cpu_pct']:.0f} % of a core "
                f"({r['server_cpu_s_per_million_deliveries']:.2f} s per million deliveries); Redis "
                f"{fmt(r.get('redis_cpu_pct'), 0)} %; load generator {r['loadgen_worker_cpu_pct']:.0f} %; "
                f"publisher fell behind: {r['publisher_fell_behind']}; met p99 ≤ {r['slo_p99_ms']:g} ms, 0 loss: "
                f"{'yes' if r['met_slo'] else 'no'}"
            )
        elif kind == "summary":
            out.append(
                f"\n{scen} {r['label']}: highest rate with p99 ≤ {r['slo_p99_ms']:g} ms and zero loss: "
                f"{fmt(r['best_rate_meeting_slo'], 0)}/s\n"
            )
        elif kind == "storm":
            rc = r["reconnect_ms"]
            out.append(
                f"**Node killed ({r['label']})**: {r['conns']:,} streams, {r['streams_lost']:,} lost with the node, "
                f"{r['back']:,} back after {fmt(r['all_back_after_s'])} s (reconnect p50 / p99 / max "
                f"{rc['p50_ms']:.0f} / {rc['p99_ms']:.0f} / {rc['max_ms']:.0f} ms); {r['clients_exact']:,} of "
                f"{r['clients_checked']:,} clients exact, missing {r['missing_total']}, duplicates "
                f"{r['duplicates_total']}, never opened {r['never_opened']}; failures {json.dumps(r['failures_during_storm'])}; "
                f"published {r['published']} durable broadcasts at {r['rate']:g}/s, {r['publish_errors']} errors.\n"
            )
    timeline = load_jsonl(os.path.join(state_dir, "timeline.jsonl"))
    peak = max((l.get("conntrack") or 0 for l in timeline), default=0)
    out.append(f"Peak connections tracked by the kernel (nf_conntrack_count): {peak:,}.")
    out.append("\n" + cpu_table(state_dir, windows_of(results) + phases(state_dir)))
    print("\n".join(out))


def compare(state_dir):
    results = [r for r in load_jsonl(os.path.join(state_dir, "results.jsonl")) if r.get("kind") == "step"]
    variants = []
    for r in results:
        v = r["label"].split("#")[0]
        if v not in variants:
            variants.append(v)
    rates = sorted({r["rate"] for r in results})
    base = variants[0] if variants else None

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    head = "| rate /s | " + " | ".join(
        f"{v}: deliveries/s, p99 ms, lost (per round) | {v}: Redis CPU s per 1M deliveries | {v}: node CPU s per 1M"
        for v in variants
    )
    ratio_cols = [v for v in variants if v != base]
    head += "".join(f" | Redis CPU per delivery {v} ÷ {base} | node CPU per delivery {v} ÷ {base}" for v in ratio_cols) + " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for rate in rates:
        cells, means = [], {}
        for v in variants:
            rs = [r for r in results if r["rate"] == rate and r["label"].split("#")[0] == v]
            cells.append(
                " / ".join(
                    f"{r['deliveries_per_s']:,.0f}, {r['latency_ms']['p99_ms']:.1f}, {r['lost']}" for r in rs
                )
                or "–"
            )
            rc = mean([r.get("redis_cpu_s_per_million_deliveries") for r in rs])
            nc = mean([r.get("server_cpu_s_per_million_deliveries") for r in rs])
            means[v] = (rc, nc)
            cells.append(" / ".join(fmt(r.get("redis_cpu_s_per_million_deliveries")) for r in rs) or "–")
            cells.append(" / ".join(fmt(r.get("server_cpu_s_per_million_deliveries")) for r in rs) or "–")
        for v in ratio_cols:
            for i in (0, 1):
                a, b = means[v][i], means[base][i]
                cells.append(f"{a / b:.2f}×" if a is not None and b else "–")
        rows.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    summaries = [r for r in load_jsonl(os.path.join(state_dir, "results.jsonl")) if r.get("kind") == "summary"]
    rows.append("")
    for v in variants:
        best = [fmt(s["best_rate_meeting_slo"], 0) for s in summaries if s["label"].split("#")[0] == v]
        slo = next((s["slo_p99_ms"] for s in summaries), None)
        rows.append(f"- {v}: highest unicast rate with p99 ≤ {slo:g} ms and zero loss, per round: {' / '.join(best)}")
    with open(os.path.join(state_dir, "setup.txt")) as f:
        print("```\n" + f.read().strip() + "\n```\n")
    print("\n".join(rows))
    print()
    print(cpu_table(state_dir, windows_of(results)))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("sample", "report", "compare"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    {"sample": sample, "report": report, "compare": compare}[sys.argv[1]](sys.argv[2])
