#!/usr/bin/env python3
"""Helpers for loadtest/bench/run.sh: the task loader, the paced client, parsers for wrk /
redis-benchmark / Prometheus output, and the report. Standard library plus the redis-py client
(`redis`, pinned and installed into .venv by run.sh); it is imported only by the subcommands that
talk to Redis, so the parsers and `freeport` start as fast as before.

Each subcommand prints one JSON object (or the report table) on stdout.
"""

import http.client
import json
import os
import socket
import statistics
import sys
import time
import urllib.request
import uuid

PREFIX = "agentq"
QUEUE = "default"
BASE = f"{PREFIX}:{{{QUEUE}}}"
PENDING = f"{BASE}:pending"
ACTIVE = f"{BASE}:active"
TASK_PREFIX = f"{BASE}:task:"
PROMPT = "hello from the bench"


def connect(port):
    """A client of the bench's private redis-server (replies decoded to str; TCP_NODELAY is redis-py's default)."""
    import redis

    return redis.Redis(host="127.0.0.1", port=int(port), decode_responses=True)


def uuid7():
    ms = time.time_ns() // 1_000_000
    r = int.from_bytes(os.urandom(10), "big")
    rand_a = (r >> 62) & 0xFFF
    rand_b = r & ((1 << 62) - 1)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def load(port, n, script_path):
    """Enqueues n tasks with the API's own enqueue.lua and the same arguments the API passes
    (id `default.<uuid v7>`, created_at ms, max_attempts 5, the serde payload, TTL 86400)."""
    n = int(n)
    r = connect(port)
    with open(script_path, "rb") as fh:
        sha = r.script_load(fh.read())
    payload = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}, separators=(",", ":"))
    start = time.monotonic()
    chunk = 1000
    done = 0
    while done < n:
        # One round trip per chunk, no MULTI/EXEC; execute() raises the first error reply.
        pipe = r.pipeline(transaction=False)
        size = min(chunk, n - done)
        for _ in range(size):
            tid = f"{QUEUE}.{uuid7()}"
            now = time.time_ns() // 1_000_000
            pipe.evalsha(sha, 2, TASK_PREFIX + tid, PENDING, tid, QUEUE, now, 5, payload, 86400)
        pipe.execute()
        done += size
    r.sadd(f"{PREFIX}:queues", QUEUE)
    took = time.monotonic() - start
    return {"loaded": n, "pending": r.llen(PENDING), "seconds": round(took, 3)}


RECORDS_LUA = """
local ks = redis.call('KEYS', ARGV[1] .. '*')
local ok, failed, other = 0, 0, 0
local first, last = nil, nil
local waits = {}
for _, k in ipairs(ks) do
  local t = redis.call('HMGET', k, 'status', 'created_at', 'started_at', 'finished_at')
  if t[1] == 'succeeded' then ok = ok + 1 elseif t[1] == 'failed' then failed = failed + 1 else other = other + 1 end
  local c, s, f = tonumber(t[2]), tonumber(t[3]), tonumber(t[4])
  if s then
    if not first or s < first then first = s end
    if c and ARGV[2] == '1' then waits[#waits + 1] = s - c end
  end
  if f and (not last or f > last) then last = f end
end
return {#ks, ok, failed, other, first or 0, last or 0, waits}
"""


def records(r, with_waits=False):
    n, ok, failed, other, first, last, waits = r.eval(RECORDS_LUA, 0, TASK_PREFIX, "1" if with_waits else "0")
    return {"tasks": n, "succeeded": ok, "failed": failed, "unfinished": other,
            "first_start_ms": first, "last_finish_ms": last, "waits_ms": waits}


def wait_done(port, n, timeout):
    """Polls LLEN pending and ZCARD active (what GET /v1/queues/default reports) every 50 ms until
    both are 0 and n task records are final; returns the records' summary."""
    r = connect(port)
    deadline = time.monotonic() + float(timeout)
    while True:
        pending, active = r.pipeline(transaction=False).llen(PENDING).zcard(ACTIVE).execute()
        if pending == 0 and active == 0:
            rec = records(r)
            if rec["succeeded"] + rec["failed"] >= int(n):
                break
        if time.monotonic() > deadline:
            rec = records(r)
            rec["timed_out"] = True
            break
        time.sleep(0.05)
    rec.pop("waits_ms", None)
    span = (rec["last_finish_ms"] - rec["first_start_ms"]) / 1000.0
    rec["span_s"] = span
    rec["tasks_per_s"] = rec["succeeded"] / span if span > 0 else 0.0
    return rec


def quantile(sorted_vals, q):
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return float(sorted_vals[i])


def waits(port):
    r = connect(port)
    rec = records(r, with_waits=True)
    w = sorted(int(x) for x in rec["waits_ms"])
    return {"tasks": rec["tasks"], "succeeded": rec["succeeded"], "samples": len(w),
            "p50_ms": quantile(w, 0.50), "p99_ms": quantile(w, 0.99),
            "max_ms": float(w[-1]) if w else 0.0}


def pace(url, rate, seconds):
    """Open-loop paced POST /v1/tasks at `rate` per second for `seconds` on one keep-alive
    connection (sends late ones at once rather than skipping them)."""
    rate, seconds = float(rate), float(seconds)
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"prompt": PROMPT})
    headers = {"Content-Type": "application/json"}
    total = int(rate * seconds)
    ok = errors = 0
    lat = []
    t0 = time.monotonic()
    for i in range(total):
        due = t0 + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        s = time.monotonic()
        try:
            conn.request("POST", "/v1/tasks", body, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 202:
                ok += 1
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
        lat.append((time.monotonic() - s) * 1000)
    took = time.monotonic() - t0
    lat.sort()
    return {"sent": total, "accepted": ok, "errors": errors, "rate": total / took,
            "post_p50_ms": quantile(lat, 0.5), "post_p99_ms": quantile(lat, 0.99)}


def hist(url, name):
    """p50/p99 linearly interpolated inside the Prometheus buckets (like histogram_quantile)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0

    def q(p):
        if total == 0:
            return 0.0
        rank = p * total
        prev_le, prev_c = 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if le == float("inf"):
                    return prev_le * 1000
                return (prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)) * 1000
            prev_le, prev_c = le, c
        return prev_le * 1000

    return {"count": total, "p50_ms": q(0.5), "p99_ms": q(0.99)}


def _ms(v):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)


def wrk(path):
    out = {"non_2xx": 0, "socket_errors": 0}
    with open(path) as fh:
        for line in fh:
            s = line.strip()
            if s.startswith("Requests/sec:"):
                out["rps"] = float(s.split()[1])
            elif s.startswith("50%"):
                out["p50_ms"] = _ms(s.split()[1])
            elif s.startswith("99%"):
                out["p99_ms"] = _ms(s.split()[1])
            elif "requests in" in s:
                out["requests"] = int(s.split()[0])
            elif s.startswith("Non-2xx"):
                out["non_2xx"] = int(s.split()[-1])
            elif s.startswith("Socket errors"):
                out["socket_errors"] = sum(int(p.split()[-1]) for p in s.split(":", 1)[1].split(","))
    return out


def rbench(path):
    with open(path) as fh:
        rows = [ln.strip() for ln in fh if ln.strip()]
    # --csv: header then "EVAL ...","rps","avg","min","p50","p95","p99","max"
    head = [h.strip('"') for h in rows[0].split('","')]
    vals = [v.strip('"') for v in rows[-1].rsplit('","', len(head) - 1)]
    row = dict(zip(head, vals))
    return {"rps": float(row["rps"]), "p50_ms": float(row.get("p50_latency_ms", 0)),
            "p99_ms": float(row.get("p99_latency_ms", 0))}


def emit(path, phase, pairs):
    """Appends one run of a phase to the JSONL file: k=v pairs, where a JSON object value is
    flattened to k_field keys; then derives the per-phase figures."""
    rec = {"phase": phase}
    for p in pairs:
        k, v = p.split("=", 1)
        try:
            val = json.loads(v)
        except ValueError:
            val = v
        if isinstance(val, dict):
            for kk, vv in val.items():
                rec[f"{k}_{kk}"] = vv
        else:
            rec[k] = val
    d = lambda a, b: a / b if b else 0.0  # noqa: E731
    if phase == "enqueue":
        rec["rps"] = rec["wrk_rps"]
        rec["p50_ms"] = rec["wrk_p50_ms"]
        rec["p99_ms"] = rec["wrk_p99_ms"]
        rec["api_cpu_s_per_1k"] = d(rec["api_cpu_s"], rec["wrk_requests"]) * 1000
        rec["redis_cpu_s_per_1k"] = d(rec["redis_cpu_s"], rec["wrk_requests"]) * 1000
        rec["wrk_cpu_s_per_1k"] = d(rec["wrk_cpu_s"], rec["wrk_requests"]) * 1000
        rec["redis_eval_rps"] = rec["rb_rps"]
        rec["pct_of_limit"] = d(rec["rps"], rec["rb_rps"]) * 100
    elif phase in ("drain", "fanout"):
        n = rec["rec_succeeded"]
        rec["tasks_per_s"] = rec["rec_tasks_per_s"]
        for who in ("worker", "mock", "redis"):
            rec[f"{who}_cpu_us_per_task"] = d(rec[f"{who}_cpu_s"], n) * 1e6
        if "worker_vmhwm_kib" in rec:
            rec["worker_vmhwm_mib"] = rec["worker_vmhwm_kib"] / 1024
    elif phase == "latency":
        rec["p50_ms"] = rec["waits_p50_ms"]
        rec["p99_ms"] = rec["waits_p99_ms"]
        rec["hist_p50_ms"] = rec["hist_p50_ms"]
        rec["hist_p99_ms"] = rec["hist_p99_ms"]
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


# metric key, phase, field, unit, target (op, value), reference
TABLE = [
    ("enqueue_http_rps", "enqueue", "rps", "req/s", (">=", 30000)),
    ("enqueue_http_p50_ms", "enqueue", "p50_ms", "ms", None),
    ("enqueue_http_p99_ms", "enqueue", "p99_ms", "ms", None),
    ("enqueue_api_cpu_s_per_1k", "enqueue", "api_cpu_s_per_1k", "CPU s/1k", None),
    ("enqueue_redis_cpu_s_per_1k", "enqueue", "redis_cpu_s_per_1k", "CPU s/1k", None),
    ("redis_eval_limit_rps", "enqueue", "redis_eval_rps", "req/s", None),
    ("enqueue_pct_of_redis_limit", "enqueue", "pct_of_limit", "%", (">=", 40)),
    ("drain_tasks_per_s", "drain", "tasks_per_s", "tasks/s", (">=", 10000)),
    ("drain_worker_cpu_us_per_task", "drain", "worker_cpu_us_per_task", "us/task", ("<=", 100)),
    ("drain_mock_cpu_us_per_task", "drain", "mock_cpu_us_per_task", "us/task", None),
    ("drain_redis_cpu_us_per_task", "drain", "redis_cpu_us_per_task", "us/task", None),
    ("fanout_tasks_per_s", "fanout", "tasks_per_s", "tasks/s", (">=", 450)),
    ("fanout_worker_peak_rss_mib", "fanout", "worker_vmhwm_mib", "MiB", ("<=", 64)),
    ("fanout_worker_cpu_us_per_task", "fanout", "worker_cpu_us_per_task", "us/task", None),
    ("fanout_mock_cpu_us_per_task", "fanout", "mock_cpu_us_per_task", "us/task", None),
    ("queue_wait_p50_ms", "latency", "p50_ms", "ms", None),
    ("queue_wait_p99_ms", "latency", "p99_ms", "ms", ("<=", 5)),
    ("queue_wait_hist_p50_ms", "latency", "hist_p50_ms", "ms", None),
    ("queue_wait_hist_p99_ms", "latency", "hist_p99_ms", "ms", None),
]


def machine():
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    return {"cores": os.cpu_count(), "cpu_model": model, "mem_mib": mem,
            "kernel": os.uname().release, "loadavg": [float(x) for x in open("/proc/loadavg").read().split()[:3]]}


def report(runs_path, out_path, mode, n_runs, meta_path):
    with open(runs_path) as fh:
        runs = [json.loads(ln) for ln in fh if ln.strip()]
    meta = json.load(open(meta_path)) if meta_path and os.path.exists(meta_path) else {}
    phases = {}
    for r in runs:
        phases.setdefault(r["phase"], []).append(r)
    medians = {}
    for name, rs in phases.items():
        keys = sorted({k for r in rs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        medians[name] = {k: statistics.median([r[k] for r in rs if k in r]) for k in keys}
    metrics = {}
    failures = []
    for key, phase, field, unit, target in TABLE:
        v = medians.get(phase, {}).get(field)
        if v is None:
            continue
        entry = {"value": round(v, 3), "unit": unit}
        if target:
            op, t = target
            entry["target"] = f"{op} {t}"
            entry["meets_target"] = v >= t if op == ">=" else v <= t
            if not entry["meets_target"]:
                failures.append(key)
        metrics[key] = entry
    broken = []
    for r in runs:
        tag = f"{r['phase']} run {r.get('run')}"
        if r["phase"] == "enqueue":
            if r.get("wrk_non_2xx") or r.get("wrk_socket_errors"):
                broken.append(f"{tag}: {r.get('wrk_non_2xx')} non-2xx answers, {r.get('wrk_socket_errors')} socket errors")
            if r.get("queued_after", 0) < r.get("wrk_requests", 0):
                broken.append(f"{tag}: {r.get('queued_after')} ids queued for {r.get('wrk_requests')} answered requests")
        elif r["phase"] in ("drain", "fanout"):
            if r.get("rec_succeeded") != r.get("tasks") or r.get("rec_timed_out"):
                broken.append(f"{tag}: {r.get('rec_succeeded')} of {r.get('tasks')} tasks succeeded")
        elif r["phase"] == "latency":
            if r.get("pace_accepted") != r.get("pace_sent") or r.get("waits_succeeded") != r.get("pace_sent"):
                broken.append(f"{tag}: {r.get('pace_accepted')} accepted, {r.get('waits_succeeded')} succeeded "
                              f"of {r.get('pace_sent')} sent")
    m = machine()
    result = {
        "mode": mode,
        "runs_per_phase": n_runs,
        "statistic": "median of runs",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**meta.get("machine", {}), "loadavg_end": m["loadavg"]},
        "git": meta.get("git", {}),
        "settings": meta.get("settings", {}),
        "metrics": metrics,
        "short_of_target": failures,
        "broken": broken,
        "medians": medians,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    mc = result["machine"]
    print(f"\nagentq bench ({mode}, median of {n_runs} run(s)) on {mc.get('cores')} cores, "
          f"{mc.get('cpu_model')}; load average at start {mc.get('loadavg_start')}, at end {mc.get('loadavg_end')}")
    print(f"{'metric':34} {'value':>12}  {'unit':9} {'target':>9}  ok")
    print("-" * 74)
    for key, entry in metrics.items():
        ok = "" if "meets_target" not in entry else ("yes" if entry["meets_target"] else "NO")
        print(f"{key:34} {entry['value']:>12,.3f}  {entry['unit']:9} {entry.get('target', ''):>9}  {ok}")
    if failures:
        print(f"\nshort of target: {', '.join(failures)}")
    for b in broken:
        print(f"BROKEN: {b}")
    print(f"\nresults: {out_path}")
    return result


def summary(runs_path):
    """One line about the last run recorded, for the progress log."""
    with open(runs_path) as fh:
        r = json.loads(fh.read().strip().splitlines()[-1])
    p = r["phase"]
    if p == "enqueue":
        return (f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; redis EVAL limit "
                f"{r['redis_eval_rps']:.0f}/s ({r['pct_of_limit']:.0f}%); CPU s/1k req: api {r['api_cpu_s_per_1k']:.3f}, "
                f"redis {r['redis_cpu_s_per_1k']:.3f}, wrk {r['wrk_cpu_s_per_1k']:.3f}; non-2xx {r['wrk_non_2xx']}, "
                f"errors {r['wrk_socket_errors']}; queued {r['queued_after']} of {r['wrk_requests']}; load {r['loadavg']}")
    if p in ("drain", "fanout"):
        return (f"{r['rec_succeeded']}/{r['tasks']} succeeded in {r['rec_span_s']:.2f} s = {r['tasks_per_s']:.0f} tasks/s; "
                f"CPU us/task: worker {r['worker_cpu_us_per_task']:.1f}, mock {r['mock_cpu_us_per_task']:.1f}, "
                f"redis {r['redis_cpu_us_per_task']:.1f}; worker VmHWM {r['worker_vmhwm_mib']:.1f} MiB; load {r['loadavg']}")
    return (f"{r['pace_accepted']} posted at {r['pace_rate']:.0f}/s; started_at-created_at p50 {r['p50_ms']:.0f} ms, "
            f"p99 {r['p99_ms']:.0f} ms, max {r['waits_max_ms']:.0f} ms; histogram p50 {r['hist_p50_ms']:.2f} ms, "
            f"p99 {r['hist_p99_ms']:.2f} ms; load {r['loadavg']}")


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "freeport":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
        s.close()
        return
    if cmd == "load":
        out = load(*args)
    elif cmd == "wait":
        out = wait_done(*args)
    elif cmd == "waits":
        out = waits(*args)
    elif cmd == "pace":
        out = pace(*args)
    elif cmd == "hist":
        out = hist(*args)
    elif cmd == "wrk":
        out = wrk(*args)
    elif cmd == "rbench":
        out = rbench(*args)
    elif cmd == "emit":
        out = emit(args[0], args[1], args[2:])
    elif cmd == "summary":
        print(summary(*args))
        return
    elif cmd == "machine":
        out = machine()
    elif cmd == "report":
        result = report(args[0], args[1], args[2], int(args[3]), args[4] if len(args) > 4 else None)
        if result["broken"]:
            sys.exit(1)
        if os.environ.get("BENCH_STRICT") == "1" and result["short_of_target"]:
            sys.exit(2)
        return
    else:
        raise SystemExit(f"unknown subcommand {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
