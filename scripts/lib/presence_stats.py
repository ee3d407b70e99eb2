#!/usr/bin/env python3
"""scripts/lib/presence_stats.py — the sampler and the report of scripts/bench-presence.

  presence_stats.py sample REDIS_PORT NODE_PID OUT   one JSON line per second until killed:
      Redis `INFO commandstats/stats/cpu` (one INFO call per sample, left out of the totals)
      and the node's CPU ticks from /proc/<pid>/stat;
  presence_stats.py report STATE_DIR                  the Markdown tables of the run.

Windows are cut from the load tester's own result lines (their `unix_ms`): the steady state is
the last --window seconds of each `conns` checkpoint's hold, the opening is the time the tool
spent opening that checkpoint's streams, the storm starts at the `reconnect` record's
`storm_unix_ms`.
"""

import json
import os
import socket
import sys
import time


def info(sock, buf):
    sock.sendall(b"INFO commandstats stats cpu\r\n")
    data = bytearray(buf)
    while b"\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = bytes(data).partition(b"\r\n")
    size = int(head[1:])
    while len(rest) < size + 2:
        rest += sock.recv(65536)
    text = rest[:size].decode()
    calls, fields = {}, {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_"):].partition(":")
            calls[name] = int(stats.split(",")[0].split("=")[1])
        elif ":" in line:
            k, _, v = line.partition(":")
            fields[k] = v
    return calls, fields, rest[size + 2:]


def sample(port, pid, out):
    tick = os.sysconf("SC_CLK_TCK")
    sock = socket.create_connection(("127.0.0.1", int(port)))
    buf = b""
    with open(out, "a") as f:
        while True:
            t = time.time()
            calls, fields, buf = info(sock, buf)
            try:
                with open(f"/proc/{pid}/stat") as s:
                    st = s.read().rsplit(")", 1)[1].split()
                node_cpu = (int(st[11]) + int(st[12])) / tick
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                node_cpu, fds = None, None
            rec = {
                "t": t,
                "calls": calls,
                "total": int(fields.get("total_commands_processed", 0)),
                "redis_cpu": float(fields.get("used_cpu_sys", 0)) + float(fields.get("used_cpu_user", 0)),
                "node_cpu": node_cpu,
                "node_fds": fds,
            }
            f.write(json.dumps(rec) + "\n")
            f.flush()
            time.sleep(max(0.0, 1.0 - (time.time() - t)))


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def at(samples, t):
    """The sample nearest to time t (seconds)."""
    return min(samples, key=lambda s: abs(s["t"] - t))


def window(samples, start, end):
    a, b = at(samples, start), at(samples, end)
    secs = b["t"] - a["t"]
    if secs <= 0:
        return None
    calls = {k: b["calls"].get(k, 0) - a["calls"].get(k, 0) for k in b["calls"]}
    calls = {k: v for k, v in calls.items() if v > 0 and k != "info"}
    # The sampler's own INFO calls are left out of the total.
    total = b["total"] - a["total"] - (b["calls"].get("info", 0) - a["calls"].get("info", 0))
    node = None
    if a["node_cpu"] is not None and b["node_cpu"] is not None:
        node = (b["node_cpu"] - a["node_cpu"]) / secs
    return {
        "secs": secs,
        "total": total,
        "calls": calls,
        "node_cpu": node,
        "redis_cpu": (b["redis_cpu"] - a["redis_cpu"]) / secs,
        "peak": max(
            (
                (y["total"] - x["total"]) / (y["t"] - x["t"])
                for x, y in zip(samples, samples[1:])
                if a["t"] <= x["t"] and y["t"] <= b["t"] and y["t"] > x["t"]
            ),
            default=0.0,
        ),
    }


# Only presence and the per-user seats run scripts (EVALSHA, EVAL when Redis lost the script);
# the bus's history calls are functions (FCALL).
SCRIPTS = ("evalsha", "eval")


def script_calls(w):
    return sum(w["calls"].get(k, 0) for k in SCRIPTS)


def fmt_calls(w):
    per = sorted(w["calls"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / w['secs']:.1f}" for k, v in per[:6]) or "none"


def report(state):
    results = load(os.path.join(state, "results.jsonl"))
    window_secs = float(os.environ.get("WINDOW_SECS", "30"))
    rows = {}  # (phase) -> {variant: cells}
    order = []
    variants = []
    for r in results:
        label, kind = r.get("label", ""), r.get("kind")
        variant, _, rnd = label.partition("#")
        tl = os.path.join(state, f"timeline-{label}-{r['scenario']}.jsonl")
        if not os.path.exists(tl):
            continue
        samples = load(tl)
        if variant not in variants:
            variants.append(variant)
        ms = r["unix_ms"] / 1000
        phases = []
        if kind == "checkpoint":
            n = r["target_conns"]
            hold = r["hold_secs"]
            rate = r["connect_rate_per_s"] or 1
            steady = window(samples, ms - 1 - window_secs, ms - 1)
            phases.append((f"{n:,} idle streams, steady {window_secs:.0f} s", steady, None))
            prev = [x for x in results if x.get("label") == label and x.get("kind") == "checkpoint"
                    and x["target_conns"] < n]
            first = max((x["target_conns"] for x in prev), default=0)
            batch = n - first
            open_end = ms - hold - 0.5
            opening = window(samples, open_end - batch / rate, open_end)
            phases.append((f"opening {first:,} → {n:,} (tool's rate)", opening, batch))
        elif kind == "storm" and r.get("storm_unix_ms"):
            s0 = r["storm_unix_ms"] / 1000
            storm = window(samples, s0 - 0.5, s0 + 15)
            back = r.get("all_back_after_s")
            phases.append((f"{r['conns']:,}-stream reconnect storm, 15 s from the drop", storm, r["streams_lost"]))
            phases.append(("storm: all back after", {"text": f"{back:.2f} s" if back else "NOT ALL",
                                                     "exact": f"{r['clients_exact']}/{r['clients_checked']}"}, None))
        for name, w, opens in phases:
            if name not in rows:
                rows[name] = {}
                order.append(name)
            rows[name].setdefault(variant, []).append((w, opens))

    def value(w, opens, what):
        if w is None or "text" in w:
            return None
        if what == "calls":
            return w["total"] / w["secs"]
        if what == "scripts":
            return script_calls(w) / w["secs"]
        if what == "per_stream":
            return script_calls(w) / opens if opens else None
        if what == "node":
            return None if w["node_cpu"] is None else 100 * w["node_cpu"]
        if what == "redis":
            return 100 * w["redis_cpu"]
        return None

    def cell(name, v, what):
        ws = rows[name].get(v, [])
        if any(w and "text" in w for w, _ in ws):
            return " / ".join(f"{w['text']} ({w['exact']} exact)" for w, _ in ws) if what == "calls" else ""
        vals = [x for x in (value(w, o, what) for w, o in ws) if x is not None]
        if not vals:
            return ""
        text = " / ".join(f"{x:.2f}" if what == "per_stream" else f"{x:.1f}" for x in vals)
        base = [x for x in (value(w, o, what) for w, o in rows[name].get(variants[0], [])) if x is not None]
        if v != variants[0] and base and sum(base) > 0 and len(vals) > 0:
            text += f" ({sum(vals) / len(vals) / (sum(base) / len(base)):.2f}x)"
        return text

    out = []
    for what, title in (
        ("calls", "Redis commands per second (total_commands_processed: commands run inside scripts and functions count too; the sampler's INFO left out); in brackets the ratio to the first variant"),
        ("scripts", "presence and seat script calls per second (EVALSHA + EVAL)"),
        ("per_stream", "presence and seat script calls per stream opened"),
        ("node", "node CPU, % of one core"),
        ("redis", "Redis CPU, % of one core"),
    ):
        out.append(f"\n{title}\n")
        out.append("| phase | " + " | ".join(variants) + " |")
        out.append("|---|" + "---|" * len(variants))
        for name in order:
            if name.startswith("storm: all back") and what != "calls":
                continue
            if what == "per_stream" and not any(o for v in variants for _, o in rows[name].get(v, [])):
                continue
            out.append(f"| {name} | " + " | ".join(cell(name, v, what) for v in variants) + " |")
    out.append("\nCommands per second by name (the six most frequent)\n")
    out.append("| phase | variant | commands/s |")
    out.append("|---|---|---|")
    for name in order:
        if name.startswith("storm: all back"):
            continue
        for v in variants:
            for w, _ in rows[name].get(v, []):
                if w and "text" not in w:
                    out.append(f"| {name} | {v} | {fmt_calls(w)} |")
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1] == "sample":
        sample(*sys.argv[2:5])
    elif sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        sys.exit(__doc__)
