#!/usr/bin/env python3
"""Helpers for loadtest/bench/run.sh: the task loader, the paced client, parsers for wrk /
redis-benchmark / Prometheus output, and the report. Standard library plus the redis-py client
(`redis`, pinned and installed into .venv by run.sh); it is imported only by the subcommands that
talk to Redis, so the parsers and `freeport` start as fast as before. Phase 6's SSE clients
(`streams`) use httpx and httpx-sse, pinned and installed the same way, imported only there.

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


def load(port, n, script_path, target=PENDING):
    """Enqueues n tasks with the API's own enqueue.lua and the same arguments the API passes
    (id `default.<uuid v7>`, created_at ms, max_attempts 5, the serde payload, TTL 86400).
    `target`: where `pending` ends up (the limiter phase stages it outside `pending` and RENAMEs
    it in once the worker is up and idle). Since fair scheduling, `pending` holds one ticket per
    id and the ids wait in their tenant's line (`pending:<tenant>`); with no tickets in
    `pending` a worker takes nothing, so staging the tickets alone holds the work back.
    With BENCH_TENANTS=N (> 1) the tasks are spread round robin over N tenants (`default`,
    `t1`, ...), as the api would enqueue them for N tenants' tokens.
    The fair-scheduling enqueue.lua has fair.lua prepended (as common/src/queue/mod.rs does) and
    takes the tenant as ARGV[10]; an older script (no fair.lua beside it) is loaded as it is."""
    n = int(n)
    tenants = max(1, int(os.environ.get("BENCH_TENANTS", "1") or 1))
    r = connect(port)
    with open(script_path, "rb") as fh:
        source = fh.read()
    # prepended as common/src/queue/mod.rs does: fair.lua, then (since the group enqueue of
    # issue 20) the shared step enqueue_item.lua; an older tree has neither or only fair.lua
    for lib in ("enqueue_item.lua", "fair.lua"):
        path = os.path.join(os.path.dirname(script_path), lib)
        if os.path.exists(path):
            with open(path, "rb") as fh:
                source = fh.read() + source
    sha = r.script_load(source)
    payload = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}, separators=(",", ":"))
    start = time.monotonic()
    chunk = 1000
    done = 0
    while done < n:
        # One round trip per chunk, no MULTI/EXEC; execute() raises the first error reply.
        pipe = r.pipeline(transaction=False)
        size = min(chunk, n - done)
        for i in range(size):
            tid = f"{QUEUE}.{uuid7()}"
            now = time.time_ns() // 1_000_000
            k = (done + i) % tenants
            tenant = "" if k == 0 else f"t{k}"
            pipe.evalsha(sha, 2, TASK_PREFIX + tid, PENDING, tid, QUEUE, now, 5, payload, 86400, "0", "0", "", tenant)
        pipe.execute()
        done += size
    r.sadd(f"{PREFIX}:queues", QUEUE)
    if target != PENDING:
        r.rename(PENDING, target)
    took = time.monotonic() - start
    return {"loaded": n, "tenants": tenants, "pending": r.llen(target), "seconds": round(took, 3)}


# Task records are the hashes `<prefix>:{<queue>}:task:<id>`; the task's event stream
# `...:task:<id>:events` (a STREAM, written since event streams exist) matches the same pattern.
RECORDS_LUA = """
local all = redis.call('KEYS', ARGV[1] .. '*')
local ks = {}
for _, k in ipairs(all) do
  if string.sub(k, -7) ~= ':events' then ks[#ks + 1] = k end
end
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


def proc_cpu_s(pid, split=False):
    """utime+stime of a process in seconds, from /proc/PID/stat (10 ms ticks); with `split`, the
    pair [user, system]."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    if split:
        return [int(fields[11]) / tck, int(fields[12]) / tck]
    return (int(fields[11]) + int(fields[12])) / tck


def wait_done(port, n, timeout, *pids):
    """Polls LLEN pending and ZCARD active (what GET /v1/queues/default reports) every 50 ms until
    both are 0 and n task records are final; returns the records' summary. With `pids`, their CPU
    seconds are read the moment the queue is empty (`cpu_s`, in the order given), before the
    records are scanned, so the scan's own Redis time is left out."""
    r = connect(port)
    deadline = time.monotonic() + float(timeout)
    cpu = None
    busy = None
    while True:
        pending, active = r.pipeline(transaction=False).llen(PENDING).zcard(ACTIVE).execute()
        if pending == 0 and active == 0:
            if pids:
                cpu = [proc_cpu_s(p, split=True) for p in pids]
            # Redis's time inside commands since the phase's CONFIG RESETSTAT, before the scan
            busy = redis_busy(r)
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
    if cpu is not None:
        rec["cpu_s"] = cpu
    if busy is not None:
        rec["redis_busy_usec"], rec["redis_calls"], rec["redis_evalsha"] = busy
    return rec


def redis_busy(r):
    """Redis's time inside commands since CONFIG RESETSTAT (INFO commandstats, the bench's own
    INFO and CONFIG left out): (usec, calls, EVALSHA calls)."""
    usec = calls = evalsha = 0
    for name, st in r.info("commandstats").items():
        if name in ("cmdstat_info", "cmdstat_config"):
            continue
        usec += int(st["usec"])
        calls += int(st["calls"])
        if name == "cmdstat_evalsha":
            evalsha += int(st["calls"])
    return usec, calls, evalsha


def workflow(api, port, nodes):
    """Phase 5: a fan-out workflow of `nodes` nodes (a root, nodes-2 leaves, a join reading
    {{parents}}) posted to POST /v1/workflows and run by one worker, then as many plain tasks
    posted to POST /v1/tasks (one keep-alive connection) and run the same way. Redis's time inside
    commands per node, everything included (the workflow's bookkeeping, the node tasks' fetches and
    results, the test's polling; the issue's bound: under 1 ms), and per plain task for scale. The
    two are not a before/after: the plain tasks arrive one POST at a time, so the worker fetches
    them one by one, while a fan-out's leaves become runnable together and are fetched in batches."""
    r = connect(port)
    n = int(nodes)
    host, port_s = api.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port_s), timeout=30)

    def post(path, body):
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 202:
            raise SystemExit(f"bench: {path} answered {resp.status}: {data[:200]!r}")
        return json.loads(data)

    leaves = [f"n{i}" for i in range(n - 2)]
    body = {"nodes": [{"id": "root", "prompt": "fan out"}]
            + [{"id": leaf, "depends_on": ["root"], "prompt": f"leaf {leaf}"} for leaf in leaves]
            + [{"id": "join", "depends_on": leaves, "prompt": "join {{parents}}"}]}
    r.config_resetstat()
    t0 = time.perf_counter()
    wid = post("/v1/workflows", body)["id"]
    key = f"{BASE}:wf:{wid}"
    while (st := r.hget(key, "status")) == "running":
        time.sleep(0.02)
    wf_s = time.perf_counter() - t0
    wf_usec, wf_calls, wf_eval = redis_busy(r)
    r.config_resetstat()
    t0 = time.perf_counter()
    for i in range(n):
        post("/v1/tasks", {"prompt": f"plain {i}"})
    while r.llen(PENDING) or r.zcard(ACTIVE):
        time.sleep(0.02)
    plain_s = time.perf_counter() - t0
    p_usec, p_calls, p_eval = redis_busy(r)
    ok = sum(1 for k in r.scan_iter(f"{TASK_PREFIX}*", count=1000)
             if not k.endswith(":events") and r.hget(k, "status") == "succeeded")
    return {"nodes": n, "status": st, "seconds": wf_s, "redis_us_per_node": wf_usec / n,
            "commands_per_node": wf_calls / n, "evalsha_per_node": wf_eval / n,
            "plain_seconds": plain_s, "plain_redis_us_per_task": p_usec / n,
            "plain_commands_per_task": p_calls / n, "plain_evalsha_per_task": p_eval / n,
            "succeeded_records": ok}


# ---- phase 6: SSE streams (GET /v1/tasks/{id}/events) ----

def stream_prompt(i, words):
    """The prompt of stream task i: `words` words, the first naming the task, so every answer
    ("echo: <prompt>", one token a word) is different and a client that got another task's text
    would be caught."""
    return " ".join([f"s{i}"] + [f"w{j}" for j in range(int(words) - 1)])


def sse_enqueue(api, n, words, ids_path):
    """Posts n tasks to POST /v1/tasks (one keep-alive connection) with prompts of `words` words;
    writes their ids, one a line, to ids_path."""
    n = int(n)
    host, port_s = api.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port_s), timeout=30)
    headers = {"Content-Type": "application/json"}
    ids = []
    t0 = time.monotonic()
    for i in range(n):
        conn.request("POST", "/v1/tasks", json.dumps({"prompt": stream_prompt(i, words)}), headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 202:
            raise SystemExit(f"bench: POST /v1/tasks answered {resp.status}: {data[:200]!r}")
        ids.append(json.loads(data)["id"])
    with open(ids_path, "w") as fh:
        fh.write("\n".join(ids) + "\n")
    return {"posted": n, "words": int(words), "seconds": round(time.monotonic() - t0, 3)}


def proc_kib(pid, field):
    """A `/proc/PID/status` field in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def machine_jiffies():
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def redis_cpu_s(r):
    """Redis's own CPU seconds (INFO cpu: used_cpu_sys + used_cpu_user, main thread and others)."""
    c = r.info("cpu")
    return float(c["used_cpu_sys"]) + float(c["used_cpu_user"])


class _Follower:
    """What one SSE client saw of its task's stream."""
    __slots__ = ("tid", "last_id", "texts", "kinds", "first_at", "first_delta_at", "end_at", "terminal",
                 "done_content", "usage_completion", "seq", "seq_bad", "attempts", "reconnects",
                 "refused", "error")

    def __init__(self, tid):
        self.tid = tid
        self.last_id = None
        self.texts = []
        self.kinds = {}
        self.first_at = self.first_delta_at = self.end_at = None
        self.terminal = None
        self.done_content = None
        self.usage_completion = None
        self.seq = 0
        self.seq_bad = 0
        self.attempts = 0
        self.reconnects = 0
        self.refused = 0
        self.error = None


async def _follow(f, client, connecting, ready):
    """Follows task f.tid's events until its terminal event; a stream the server closes before
    that (a client too slow for its queue, a restart) is resumed with Last-Event-ID, as an
    EventSource would. `connecting` bounds the connections being opened at once (2000 SYNs at
    once would overflow the api's accept backlog); it is released at the first event."""
    import asyncio

    from httpx_sse import aconnect_sse

    held = True
    await connecting.acquire()
    tries = 0
    try:
        while f.terminal is None:
            headers = {"Last-Event-ID": f.last_id} if f.last_id else {}
            try:
                async with aconnect_sse(client, "GET", f"/v1/tasks/{f.tid}/events", headers=headers) as es:
                    if es.response.status_code != 200:
                        await es.response.aread()
                        f.refused += 1
                        f.error = f"HTTP {es.response.status_code}: {es.response.text[:200]}"
                        tries += 1
                        if tries > 20:
                            return
                        await asyncio.sleep(1.0)
                        continue
                    async for ev in es.aiter_sse():
                        now = time.monotonic()
                        if f.first_at is None:
                            f.first_at = now
                            ready[0] += 1
                            if held:
                                held = False
                                connecting.release()
                        if ev.id:
                            f.last_id = ev.id
                        kind = ev.event
                        f.kinds[kind] = f.kinds.get(kind, 0) + 1
                        if kind == "delta":
                            d = json.loads(ev.data)
                            if f.first_delta_at is None:
                                f.first_delta_at = now
                            if d.get("seq", 0) <= f.seq:
                                f.seq_bad += 1
                            f.seq = d.get("seq", 0)
                            f.texts.append(d.get("text", ""))
                        elif kind == "attempt_started":
                            # a client keeps only the text after the last attempt_started
                            f.attempts += 1
                            f.texts = []
                        elif kind == "usage":
                            f.usage_completion = json.loads(ev.data).get("completion_tokens")
                        elif kind in ("done", "error"):
                            f.end_at = now
                            f.terminal = kind
                            if kind == "done":
                                f.done_content = (json.loads(ev.data).get("result") or {}).get("content")
                            else:
                                f.error = ev.data[:300]
                            return
            except Exception as e:  # noqa: BLE001 - a dropped connection is resumed; the last error is reported
                f.error = f"{type(e).__name__}: {e}"[:300]
                tries += 1
                if tries > 20:
                    return
                await asyncio.sleep(0.2)
            if f.terminal is None:
                f.reconnects += 1
    finally:
        if held:
            connecting.release()


async def _streams(api, api_pid, port, mock_pid, ids_path, ready_path, go_path, timeout):
    import asyncio
    import resource

    import httpx

    r = connect(port)
    with open(ids_path) as fh:
        ids = [ln.strip() for ln in fh if ln.strip()]
    n = len(ids)
    timeout = float(timeout)
    out = {"clients": n}
    out["api_rss_base_kib"] = proc_kib(api_pid, "VmRSS")
    # one client (connection pool) per 100 streams: httpcore's pool scans its connections on
    # every request, which is quadratic in one pool of 2000
    per = 100
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    tmo = httpx.Timeout(30.0, read=60.0)  # the api sends a heartbeat every 15 s
    clients = [httpx.AsyncClient(base_url=api, limits=limits, timeout=tmo) for _ in range((n + per - 1) // per)]
    fs = [_Follower(t) for t in ids]
    connecting = asyncio.Semaphore(64)
    ready = [0]
    t0 = time.monotonic()
    tasks = [asyncio.create_task(_follow(f, clients[i // per], connecting, ready)) for i, f in enumerate(fs)]
    deadline = t0 + 120
    while ready[0] < n and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    out["connected"] = ready[0]
    out["connect_s"] = round(time.monotonic() - t0, 3)
    # idle: every client holds a stream of a queued task (no worker runs); the api's memory per
    # stream after a moment to settle, and its CPU over 2 s of nothing happening
    await asyncio.sleep(1.0)
    a0 = proc_cpu_s(api_pid)
    await asyncio.sleep(2.0)
    out["api_idle_cpu_s_per_s"] = round((proc_cpu_s(api_pid) - a0) / 2.0, 4)
    out["api_rss_idle_kib"] = proc_kib(api_pid, "VmRSS")
    out["idle_kib_per_stream"] = (out["api_rss_idle_kib"] - out["api_rss_base_kib"]) / max(n, 1)

    # the streaming window: from here (the worker is started once the ready file exists) to the
    # last client's terminal event
    r.config_resetstat()
    rc0 = redis_cpu_s(r)
    c0 = {"api": proc_cpu_s(api_pid), "redis_proc": proc_cpu_s(r.info("server")["process_id"]),
          "mock": proc_cpu_s(mock_pid)}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    mj0 = machine_jiffies()
    tw0 = time.monotonic()
    with open(ready_path + ".tmp", "w") as fh:
        fh.write("ready\n")
    os.rename(ready_path + ".tmp", ready_path)
    while not os.path.exists(go_path):
        if time.monotonic() - tw0 > 60:
            raise SystemExit("bench: no worker started (no go file)")
        await asyncio.sleep(0.02)
    with open(go_path) as fh:
        worker_pids = [int(p) for p in fh.read().split()]
    peak = [0]

    async def sample():
        while True:
            peak[0] = max(peak[0], proc_kib(api_pid, "VmRSS"))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, tw0 + timeout - time.monotonic()))
    tw1 = time.monotonic()
    out["window_s"] = round(tw1 - tw0, 3)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    mj1 = machine_jiffies()
    rc1 = redis_cpu_s(r)
    out["api_cpu_s"] = proc_cpu_s(api_pid) - c0["api"]
    out["redis_cpu_s"] = rc1 - rc0
    out["redis_proc_cpu_s"] = proc_cpu_s(r.info("server")["process_id"]) - c0["redis_proc"]
    out["mock_cpu_s"] = proc_cpu_s(mock_pid) - c0["mock"]
    out["worker_cpu_s"] = sum(proc_cpu_s(p) for p in worker_pids)  # since its start
    out["worker_vmhwm_kib"] = sum(proc_kib(p, "VmHWM") for p in worker_pids)
    out["client_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # how busy the whole machine was (every process, other sessions' too), in % of all its CPUs
    out["machine_busy_pct"] = round(100.0 * (mj1[0] - mj0[0]) / max(mj1[1] - mj0[1], 1), 1)
    sampler.cancel()
    out["api_vmhwm_kib"] = proc_kib(api_pid, "VmHWM")
    out["api_rss_peak_sampled_kib"] = max(peak[0], proc_kib(api_pid, "VmRSS"))
    out["api_rss_end_kib"] = proc_kib(api_pid, "VmRSS")
    cs = r.info("commandstats")
    stats = {k[len("cmdstat_"):]: {"calls": int(v["calls"]), "usec": int(v["usec"])} for k, v in cs.items()
             if k not in ("cmdstat_info", "cmdstat_config")}
    out["redis_commands"] = stats
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for c in clients:
        await c.aclose()

    # what every client got, against the task's record (GET /v1/tasks/{id})
    kinds = {}
    for f in fs:
        for k, v in f.kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    out["events"] = sum(kinds.values())
    out["events_by_kind"] = kinds
    got = {}
    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=api, timeout=30.0) as hc:
        async def one(tid):
            async with sem:
                resp = await hc.get(f"/v1/tasks/{tid}")
                got[tid] = resp.json() if resp.status_code == 200 else {"http_status": resp.status_code}
        await asyncio.gather(*(one(f.tid) for f in fs))
    tokens = matched = done_ok = 0
    bad = []
    durations = []
    for f in fs:
        t = got.get(f.tid, {})
        content = (t.get("result") or {}).get("content")
        usage = t.get("usage") or {}
        tokens += int(usage.get("completion_tokens") or 0)
        text = "".join(f.texts)
        ok_text = content is not None and text == content
        ok_done = f.terminal == "done" and f.done_content == content
        matched += ok_text
        done_ok += ok_done
        if not (ok_text and ok_done) and len(bad) < 5:
            bad.append({"id": f.tid, "status": t.get("status"), "terminal": f.terminal, "error": f.error,
                        "text_len": len(text), "result_len": len(content or ""), "events": f.kinds})
        if f.first_delta_at is not None and f.end_at is not None:
            durations.append(f.end_at - f.first_delta_at)
    ends = [f.end_at for f in fs if f.end_at is not None]
    starts = [f.first_delta_at for f in fs if f.first_delta_at is not None]
    out["tokens"] = tokens
    out["full_text_ok"] = matched
    out["done_ok"] = done_ok
    out["complete"] = sum(1 for f in fs if f.terminal == "done")
    out["errors"] = sum(1 for f in fs if f.terminal == "error")
    out["reconnects"] = sum(f.reconnects for f in fs)
    out["refused"] = sum(f.refused for f in fs)
    out["seq_out_of_order"] = sum(f.seq_bad for f in fs)
    out["attempts_seen"] = sum(f.attempts for f in fs)
    out["examples_bad"] = bad
    durations.sort()
    out["stream_s_p50"] = round(quantile(durations, 0.5), 3)
    out["stream_s_max"] = round(durations[-1], 3) if durations else 0.0
    out["span_s"] = round(max(ends) - min(starts), 3) if ends and starts else 0.0
    tok_per_stream = tokens / max(n, 1)
    out["stream_tokens_per_s_p50"] = round(tok_per_stream / out["stream_s_p50"], 2) if out["stream_s_p50"] else 0.0
    return out


def streams(api, api_pid, port, mock_pid, ids_path, ready_path, go_path, timeout):
    """Phase 6, the client side: one asyncio process holding an SSE stream per task id in
    ids_path (httpx + httpx-sse). Idle first (the tasks are queued, no worker): the api's RSS
    before and after connecting. Then it writes ready_path, run.sh starts the worker(s) and
    writes their pids to go_path, and the streaming window lasts until every client got its
    terminal event: api / Redis / mock / worker / client CPU, api peak RSS, Redis commandstats.
    Last, each client's text (the deltas after the last attempt_started) is checked against the
    task's result (GET /v1/tasks/{id}) and its `done` event."""
    import asyncio

    return asyncio.run(_streams(api, int(api_pid), port, int(mock_pid), ids_path, ready_path, go_path, timeout))


# ---- phase 7: the OpenAI-compatible front door against a direct task (k6's chat.js) ----

# variant -> (chat.js MODE, STREAM_SHARE, the k6 Trend of one call's latency)
FRONTDOOR = {
    "enqueue": ("enqueue", "0", "http_req_duration"),
    "task": ("task", "0", "task_latency"),
    "chat": ("chat", "0", "chat_latency"),
    "chat-stream": ("chat", "1", "chat_stream_latency"),
}
FRONTDOOR_ORDER = ["enqueue", "task", "chat", "chat-stream"]
FRONTDOOR_WARM = 20


def _chat_warm(api, n):
    """n waited chat completions on one connection, before the CPU is sampled: the worker's
    connections to Redis and the mock, and the api's code paths, are warm for every variant."""
    host, port_s = api.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port_s), timeout=30)
    body = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": PROMPT}]})
    for _ in range(int(n)):
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise SystemExit(f"bench: warm-up chat call answered {resp.status}: {data[:200]!r}")
    conn.close()


def frontdoor(variant, k6, script, api, port, n, vus, rate, out_prefix, api_pid, worker_pid, redis_pid, mock_pid):
    """Phase 7, one run of one variant: FRONTDOOR_WARM waited chat calls (the same warm-up for
    every variant), the worker left to go idle, 1 s of idle CPU sampled, then k6 runs chat.js for n
    calls shared by `vus` VUs (shared-iterations; with `rate` > 0 instead n / rate seconds of
    `rate` calls per second, constant-arrival-rate from `vus` pre-allocated VUs) in the
    variant's mode; CPU of the api, worker,
    Redis and mock process is read when k6 has exited and the queue is empty (for `enqueue`, once
    the worker has run every task), before the task records are scanned. k6's own CPU is its
    rusage as this process's child."""
    import resource
    import subprocess

    mode, share, trend = FRONTDOOR[variant]
    n, vus, rate = int(n), int(vus), float(rate)
    pids = {"api": int(api_pid), "worker": int(worker_pid), "redis": int(redis_pid), "mock": int(mock_pid)}
    r = connect(port)
    _chat_warm(api, FRONTDOOR_WARM)
    idle(pids["worker"], pids["api"])
    i0 = {k: proc_cpu_s(p) for k, p in pids.items()}
    time.sleep(1.0)
    idle_rate = {k: round(proc_cpu_s(p) - i0[k], 3) for k, p in pids.items()}
    r.config_resetstat()
    c0 = {k: proc_cpu_s(p, split=True) for k, p in pids.items()}
    mj0 = machine_jiffies()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary_path = f"{out_prefix}.summary.json"
    env = dict(os.environ, SUMMARY_JSON=summary_path)
    args = [k6, "run", "--quiet", "--no-usage-report", "--no-color", "-e", f"BASE_URL={api}", "-e", f"MODE={mode}",
            "-e", f"STREAM_SHARE={share}", "-e", f"VUS={vus}", "-e", "MAX_FAILED_RATE=0", "-e", "PROMPT_SIZE=20"]
    if rate > 0:
        args += ["-e", f"RATE={rate:g}", "-e", f"DURATION={n / rate:.3f}s"]
    else:
        args += ["-e", f"ITERATIONS={n}"]
    args.append(script)
    t0 = time.monotonic()
    with open(f"{out_prefix}.k6.txt", "w") as fh:
        k6_rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
    k6_wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the CPU and Redis's command counts are read the moment the queue is empty (for `enqueue`,
    # the worker may still be running tasks when k6 exits); the record scan comes after them
    polls = 0
    deadline = time.monotonic() + 120
    timed_out = False
    while True:
        pending, active = r.pipeline(transaction=False).llen(PENDING).zcard(ACTIVE).execute()
        polls += 1
        if pending == 0 and active == 0:
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.02)
    c1 = {k: proc_cpu_s(p, split=True) for k, p in pids.items()}
    cs = r.info("commandstats")
    mj1 = machine_jiffies()
    rec = records(r)
    out = {"variant": variant, "calls": n, "vus": vus, "rate": rate, "k6_rc": k6_rc, "k6_wall_s": round(k6_wall, 3),
           "k6_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
           "idle_cpu_s_per_s": idle_rate,
           "machine_busy_pct": round(100.0 * (mj1[0] - mj0[0]) / max(mj1[1] - mj0[1], 1), 1),
           "records": rec["tasks"], "succeeded": rec["succeeded"], "failed": rec["failed"],
           "unfinished": rec["unfinished"], "timed_out": timed_out,
           "drained_after_k6_s": round(time.monotonic() - t0 - k6_wall, 3)}
    for k in pids:
        (u0, s0), (u1, s1) = c0[k], c1[k]
        out[f"{k}_cpu_s"] = round((u1 + s1) - (u0 + s0), 3)
        out[f"{k}_sys_s"] = round(s1 - s0, 3)
    # every command Redis ran (a script's inner commands are counted on their own lines too),
    # less this function's own polling
    cmds = {k[len("cmdstat_"):]: int(v["calls"]) for k, v in cs.items() if k not in ("cmdstat_info", "cmdstat_config")}
    for c in ("llen", "zcard"):
        if c in cmds:
            cmds[c] -= polls
            if cmds[c] <= 0:
                del cmds[c]
    out["redis_commands"] = cmds
    try:
        with open(summary_path) as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        m = {"metrics": {}, "state": {}}
    met = m.get("metrics", {})
    val = lambda name, key: (met.get(name) or {}).get("values", {}).get(key)  # noqa: E731
    out["k6_run_s"] = (m.get("state", {}).get("testRunDurationMs") or 0) / 1000.0
    out["iterations"] = val("iterations", "count") or 0
    out["dropped_iterations"] = val("dropped_iterations", "count") or 0
    if rate > 0 and out["iterations"]:
        out["calls"] = int(out["iterations"])  # the arrival rate's count, n give or take one
    out["http_reqs"] = val("http_reqs", "count") or 0
    out["calls_ok"] = val("call_ok", "passes") or 0
    out["calls_failed"] = val("call_ok", "fails") or 0
    out["checks_rate"] = val("checks", "rate")
    out["p50_ms"] = val(trend, "med") or 0.0
    out["p99_ms"] = val(trend, "p(99)") or 0.0
    out["avg_ms"] = val(trend, "avg") or 0.0
    if variant == "chat-stream":
        out["first_byte_p50_ms"] = val("chat_stream_first_byte", "med") or 0.0
    return out


def frontdoor_figures(rec):
    """Per-call figures of a phase-7 run (`f_*`: the client's JSON)."""
    d = lambda a, b: a / b if b else 0.0  # noqa: E731
    n = rec.get("f_calls", 0)
    for who in ("api", "worker", "redis", "mock", "k6"):
        rec[f"{who}_cpu_us_per_call"] = d(rec.get(f"f_{who}_cpu_s", 0.0), n) * 1e6
    for who in ("api", "worker", "redis"):
        rec[f"{who}_sys_us_per_call"] = d(rec.get(f"f_{who}_sys_s", 0.0), n) * 1e6
    rec["server_cpu_us_per_call"] = rec["api_cpu_us_per_call"] + rec["worker_cpu_us_per_call"] + rec["redis_cpu_us_per_call"]
    rec["calls_per_s"] = d(n, rec.get("f_k6_run_s", 0.0))
    rec["load_model"] = f"{rec.get('f_rate', 0):g}/s" if rec.get("f_rate") else f"{rec.get('f_vus')} VUs"
    rec["p50_ms"] = rec.get("f_p50_ms", 0.0)
    rec["p99_ms"] = rec.get("f_p99_ms", 0.0)
    rec["http_reqs_per_call"] = d(rec.get("f_http_reqs", 0), n)
    rec["machine_busy_pct"] = rec.get("f_machine_busy_pct", 0.0)
    cmds = rec.get("f_redis_commands") or {}
    rec["redis_commands_per_call"] = d(sum(cmds.values()), n)
    for c in ("evalsha", "xread", "exists", "hmget", "hgetall", "xrange", "sismember", "sadd"):
        if c in cmds:
            rec[f"redis_{c}_per_call"] = d(cmds[c], n)
    if "f_first_byte_p50_ms" in rec:
        rec["first_byte_p50_ms"] = rec["f_first_byte_p50_ms"]


FRONTDOOR_FIGURES = [
    ("calls_per_s", "calls/s", "calls/s"),
    ("p50_ms", "latency p50, ms", "ms"),
    ("p99_ms", "latency p99, ms", "ms"),
    ("api_cpu_us_per_call", "api CPU, us/call", "us/call"),
    ("redis_cpu_us_per_call", "redis CPU, us/call", "us/call"),
    ("worker_cpu_us_per_call", "worker CPU, us/call", "us/call"),
    ("server_cpu_us_per_call", "api + redis + worker, us/call", "us/call"),
    ("mock_cpu_us_per_call", "mock CPU, us/call (control)", "us/call"),
    ("k6_cpu_us_per_call", "k6 CPU, us/call (client)", "us/call"),
    ("api_sys_us_per_call", "  of the api's: kernel, us/call", "us/call"),
    ("http_reqs_per_call", "HTTP requests per call", "reqs"),
    ("redis_commands_per_call", "Redis commands per call", "cmds"),
    ("machine_busy_pct", "machine busy, %", "%"),
]
# the comparisons: (variant, minus); the first is the front door's overhead over a direct task
FRONTDOOR_DELTAS = [("chat", "task"), ("chat-stream", "task"), ("chat", "enqueue"), ("task", "enqueue")]


def frontdoor_report(runs):
    """Medians per variant, and the differences of medians (with the median of the per-round
    differences: the variants of a round run back to back) for the CPU figures."""
    by = {}
    for r in runs:
        if r["phase"] == "frontdoor":
            by.setdefault(r["variant"], []).append(r)
    if not by:
        return None
    variants = [v for v in FRONTDOOR_ORDER if v in by]
    med = {v: {k: round(statistics.median([r.get(k, 0) for r in by[v]]), 2) for k, _, _ in FRONTDOOR_FIGURES}
           for v in variants}
    runs_of = {v: {k: [round(r.get(k, 0), 2) for r in sorted(by[v], key=lambda x: x["round"])]
                   for k, _, _ in FRONTDOOR_FIGURES} for v in variants}
    deltas = []
    for a, b in FRONTDOOR_DELTAS:
        if a not in by or b not in by:
            continue
        row = {"variant": a, "minus": b}
        for k in ("api_cpu_us_per_call", "redis_cpu_us_per_call", "worker_cpu_us_per_call", "server_cpu_us_per_call",
                  "p50_ms", "p99_ms", "calls_per_s"):
            row[k] = round(med[a][k] - med[b][k], 2)
            rb = {r["round"]: r[k] for r in by[b]}
            paired = [r[k] - rb[r["round"]] for r in by[a] if r["round"] in rb]
            if paired:
                row[k + "_paired"] = round(statistics.median(paired), 2)
                row[k + "_paired_range"] = [round(min(paired), 2), round(max(paired), 2)]
        deltas.append(row)
    return {"variants": variants, "medians": med, "runs": runs_of, "deltas": deltas,
            "figures": {k: label for k, label, _ in FRONTDOOR_FIGURES}}


def frontdoor_print(fd):
    vs = fd["variants"]
    print("\nfront door (phase 7): medians per variant; runs in brackets")
    print(f"{'figure':34}" + "".join(f"{v:>14}" for v in vs))
    for k, label, _ in FRONTDOOR_FIGURES:
        print(f"{label:34}" + "".join(f"{fd['medians'][v][k]:>14,.2f}" for v in vs))
    print("differences, us/call (of medians; [median of per-round differences])")
    for row in fd["deltas"]:
        print(f"  {row['variant']:>11} - {row['minus']:<8} api {row['api_cpu_us_per_call']:+7.1f} "
              f"[{row.get('api_cpu_us_per_call_paired', 0):+7.1f}]  redis {row['redis_cpu_us_per_call']:+6.1f} "
              f"[{row.get('redis_cpu_us_per_call_paired', 0):+6.1f}]  worker {row['worker_cpu_us_per_call']:+6.1f} "
              f"[{row.get('worker_cpu_us_per_call_paired', 0):+6.1f}]  sum {row['server_cpu_us_per_call']:+7.1f} "
              f"[{row.get('server_cpu_us_per_call_paired', 0):+7.1f}]; p50 {row['p50_ms']:+.2f} ms")


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
    if phase == "bulk":
        n = rec["wrk_requests"] * rec["per_request"]
        rec["tasks_per_s"] = rec["wrk_rps"] * rec["per_request"]
        rec["p50_ms"] = rec["wrk_p50_ms"]
        rec["p99_ms"] = rec["wrk_p99_ms"]
        rec["api_cpu_us_per_task"] = d(rec["api_cpu_s"], n) * 1e6
        rec["redis_cpu_us_per_task"] = d(rec["redis_cpu_s"], n) * 1e6
        rec["raw_hset_rps"] = rec["rb_rps"]
        # Redis is one core: its CPU per record bounds what any client can reach, whatever the
        # machine's other load does to redis-benchmark's own rate
        rec["raw_redis_us_per_record"] = d(rec["raw_redis_cpu_s"], rec["raw_records"]) * 1e6
        rec["raw_redis_bound_rps"] = d(1e6, rec["raw_redis_us_per_record"])
        rec["bulk_redis_bound_tasks_per_s"] = d(1e6, rec["redis_cpu_us_per_task"])
        rec["pct_of_raw"] = d(rec["tasks_per_s"], rec["raw_redis_bound_rps"]) * 100
    if phase in ("enqueue", "enqueue-nogroup"):
        rec["rps"] = rec["wrk_rps"]
        rec["p50_ms"] = rec["wrk_p50_ms"]
        rec["p99_ms"] = rec["wrk_p99_ms"]
        rec["api_cpu_s_per_1k"] = d(rec["api_cpu_s"], rec["wrk_requests"]) * 1000
        rec["redis_cpu_s_per_1k"] = d(rec["redis_cpu_s"], rec["wrk_requests"]) * 1000
        rec["wrk_cpu_s_per_1k"] = d(rec["wrk_cpu_s"], rec["wrk_requests"]) * 1000
        rec["redis_eval_rps"] = rec["rb_rps"]
        rec["pct_of_limit"] = d(rec["rps"], rec["rb_rps"]) * 100
    elif phase in ("drain", "fanout", "fanout-h2"):
        n = rec["rec_succeeded"]
        rec["tasks_per_s"] = rec["rec_tasks_per_s"]
        for who in ("worker", "mock", "redis"):
            rec[f"{who}_cpu_us_per_task"] = d(rec[f"{who}_cpu_s"], n) * 1e6
        if "rec_redis_busy_usec" in rec:
            # INFO commandstats: time inside commands and commands per task (wall time inside
            # each command, so less noisy than the process's CPU ticks, but inflated when Redis
            # is descheduled mid-command)
            rec["redis_busy_us_per_task"] = d(rec["rec_redis_busy_usec"], n)
            rec["redis_commands_per_task"] = d(rec["rec_redis_calls"], n)
            rec["redis_evalsha_per_task"] = d(rec["rec_redis_evalsha"], n)
        if "worker_vmhwm_kib" in rec:
            rec["worker_vmhwm_mib"] = rec["worker_vmhwm_kib"] / 1024
    elif phase == "limiter":
        limiter_figures(rec)
    elif phase == "workflow":
        rec["redis_us_per_node"] = rec["wf_redis_us_per_node"]
        rec["plain_redis_us_per_task"] = rec["wf_plain_redis_us_per_task"]
        rec["seconds"] = rec["wf_seconds"]
    elif phase == "streams":
        streams_figures(rec)
    elif phase == "frontdoor":
        frontdoor_figures(rec)
    elif phase == "latency":
        rec["p50_ms"] = rec["waits_p50_ms"]
        rec["p99_ms"] = rec["waits_p99_ms"]
        rec["hist_p50_ms"] = rec["hist_p50_ms"]
        rec["hist_p99_ms"] = rec["hist_p99_ms"]
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def streams_figures(rec):
    """Phase 6's figures from the client's JSON (`s_*`)."""
    d = lambda a, b: a / b if b else 0.0  # noqa: E731
    tokens = rec.get("s_tokens", 0)
    cmds = rec.get("s_redis_commands") or {}
    calls = lambda c: cmds.get(c, {}).get("calls", 0)  # noqa: E731
    usec = lambda c: cmds.get(c, {}).get("usec", 0)  # noqa: E731
    rec["clients"] = rec.get("s_clients", 0)
    rec["idle_kib_per_stream"] = rec.get("s_idle_kib_per_stream", 0.0)
    rec["api_rss_base_mib"] = rec.get("s_api_rss_base_kib", 0) / 1024
    rec["api_rss_idle_mib"] = rec.get("s_api_rss_idle_kib", 0) / 1024
    rec["api_peak_rss_mib"] = rec.get("s_api_vmhwm_kib", 0) / 1024
    rec["api_idle_cpu_s_per_s"] = rec.get("s_api_idle_cpu_s_per_s", 0.0)
    rec["api_cpu_s"] = rec.get("s_api_cpu_s", 0.0)
    rec["redis_cpu_s"] = rec.get("s_redis_cpu_s", 0.0)
    rec["worker_cpu_s"] = rec.get("s_worker_cpu_s", 0.0)
    rec["mock_cpu_s"] = rec.get("s_mock_cpu_s", 0.0)
    rec["client_cpu_s"] = rec.get("s_client_cpu_s", 0.0)
    rec["window_s"] = rec.get("s_window_s", 0.0)
    rec["events"] = rec.get("s_events", 0)
    rec["deltas"] = (rec.get("s_events_by_kind") or {}).get("delta", 0)
    rec["tokens"] = tokens
    rec["api_cpu_us_per_event"] = d(rec["api_cpu_s"], rec["events"]) * 1e6
    rec["redis_cpu_us_per_token"] = d(rec["redis_cpu_s"], tokens) * 1e6
    rec["redis_cpu_us_per_delta"] = d(rec["redis_cpu_s"], rec["deltas"]) * 1e6
    rec["tokens_per_delta"] = d(tokens, rec["deltas"])
    rec["machine_busy_pct"] = rec.get("s_machine_busy_pct", 0.0)
    # commandstats `usec` is wall time inside each command (inflated when Redis is descheduled on a
    # busy machine, and a script's inner commands are counted again on their own lines), so only a
    # share is used: the api hub's XREADs against the scripts (the queue's and the worker's emit.lua)
    rec["redis_xread_share_pct"] = d(usec("xread"), usec("xread") + usec("evalsha")) * 100
    rec["xadd_per_token"] = d(calls("xadd"), tokens)
    rec["evalsha_per_token"] = d(calls("evalsha"), tokens)
    rec["xread_calls"] = calls("xread")
    rec["xread_us_per_call"] = d(usec("xread"), calls("xread"))
    rec["redis_busy_us_per_token"] = d(sum(v.get("usec", 0) for v in cmds.values()), tokens)
    rec["evalsha_us_per_token"] = d(usec("evalsha"), tokens)
    rec["xread_us_per_token"] = d(usec("xread"), tokens)
    rec["stream_tokens_per_s_p50"] = rec.get("s_stream_tokens_per_s_p50", 0.0)
    rec["stream_s_p50"] = rec.get("s_stream_s_p50", 0.0)
    rec["full_text_ok_pct"] = d(rec.get("s_full_text_ok", 0), rec["clients"]) * 100
    rec["done_ok_pct"] = d(rec.get("s_done_ok", 0), rec["clients"]) * 100


def idle(*pids):
    """Waits until the processes are idle (at most one 10 ms tick of CPU over 0.3 s, checked every
    0.1 s; 15 s at most): a worker that just answered /readyz may still be warming up (with flow
    control it builds its tokenizers off the async threads). Returns their CPU seconds, each as
    [user, system]."""
    deadline = time.monotonic() + 15
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    samples = []
    while True:
        samples.append(sum(proc_cpu_s(p) for p in pids))
        if len(samples) >= 4 and samples[-1] - samples[-4] <= tick + 1e-9:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {"cpu_s": [proc_cpu_s(p, split=True) for p in pids], "waited_s": round(0.1 * (len(samples) - 1), 1)}


def seed(port, mode, *keys):
    """Writes a sliding window into limiter scope hashes, so the run measures the admitted path.
    A scope with no state is seeded by reserve.lua as if its last minute was used up at its limit,
    so however high the limits, the first second of a fresh scope would refuse (and park) every
    call. `empty`: `head` = now - 60 s, `rsum` = `tsum` = 0, no buckets (as after a quiet minute).
    `steady`: also one request and 100 tokens in each of the last 60 one-second buckets, as after a
    minute of traffic: the hash then holds ~125 fields, which Redis still keeps as a listpack (up
    to hash-max-listpack-entries = 128), where every field lookup is a linear scan."""
    r = connect(port)
    sec = int(r.time()[0])
    for k in keys:
        m = {"head": sec - 60, "rsum": 0, "tsum": 0}
        if mode == "steady":
            for b in range(sec - 60, sec):
                m[f"r:{b}"] = 1
                m[f"t:{b}"] = 100
            m["rsum"], m["tsum"] = 60, 6000
        r.hset(k, mapping=m)
    return {"seeded": list(keys), "head": sec - 60, "mode": mode,
            "encoding": [r.object("encoding", k) for k in keys], "fields": [r.hlen(k) for k in keys]}


def prom_sum(text, name):
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def flowstats(port, metrics_url, *scopes):
    """What the limiter did in a run: Redis's EVALSHA calls and µs inside them since CONFIG
    RESETSTAT (every queue and limiter step is one EVALSHA), the worker's agentq_limiter_* counters,
    each scope's counted requests and tokens (`rsum`, `tsum`) and leases left, and tasks parked."""
    r = connect(port)
    cs = r.info("commandstats")
    out = {}
    ev = cs.get("cmdstat_evalsha", {})
    out["evalsha_calls"] = int(ev.get("calls", 0))
    out["evalsha_usec"] = int(ev.get("usec", 0))
    out["redis_calls"] = sum(int(v.get("calls", 0)) for k, v in cs.items()
                             if k not in ("cmdstat_evalsha", "cmdstat_config", "cmdstat_info"))
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for m in ("admitted", "throttled", "tokens_reserved", "tokens_used", "fallbacks"):
        v = prom_sum(text, f"agentq_limiter_{m}_total")
        out[f"limiter_{m}"] = v if v is not None else 0
    out["throttled_set"] = r.zcard(f"{BASE}:throttled")
    for i, k in enumerate(scopes):
        rsum, tsum = r.hmget(k, "rsum", "tsum")
        out[f"scope{i}_fields"] = r.hlen(k)
        out[f"scope{i}_encoding"] = r.object("encoding", k)
        out[f"scope{i}_rsum"] = int(rsum or 0)
        out[f"scope{i}_tsum"] = int(tsum or 0)
        out[f"scope{i}_leases"] = r.zcard(k + ":leases")
    return out


def slowlog(port, *roots):
    """Redis's own time per script, from SLOWLOG (the limiter phase sets slowlog-log-slower-than 0
    when BENCH_SLOWLOG=1): calls and µs inside each script (named by the SHA1 of the .lua files
    under common/src of each source tree given: the checkout, and the trees the binaries were built
    from, $AGENTQ_BENCH_SRC_DIRS), and of every other command. Execution time only: reading the
    request and writing the reply are not in it."""
    import hashlib
    names = {}
    for root, sub in [(t, d) for t in roots for d in ("common/src/queue", "common/src/flow")]:
        d = os.path.join(root, sub)
        files = {}
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.endswith(".lua"):
                with open(os.path.join(d, f), "rb") as fh:
                    files[f] = fh.read()
        for f, text in files.items():
            names[hashlib.sha1(text).hexdigest()] = f
            if "fence.lua" in files:  # complete and fail run behind the fencing check
                names[hashlib.sha1(files["fence.lua"] + text).hexdigest()] = f
    r = connect(port)
    entries = r.slowlog_get(1_000_000)
    out = {}
    for e in entries:
        cmd = e["command"]
        cmd = cmd.decode() if isinstance(cmd, bytes) else cmd
        parts = cmd.split(" ", 2)
        name = parts[0].lower()
        if name == "evalsha" and len(parts) > 1:
            name = names.get(parts[1].lower(), "evalsha:" + parts[1][:8])
        agg = out.setdefault(name, {"calls": 0, "usec": 0})
        agg["calls"] += 1
        agg["usec"] += int(e["duration"])
    for agg in out.values():
        agg["usec_per_call"] = round(agg["usec"] / agg["calls"], 2)
    return {"entries": len(entries), "by_command": out}


# the limiter phase's variants, in the order of the report; (variant, minus) pairs for the deltas
LIMITER_ORDER = ["before", "implicit", "limits", "limits-steady", "limits-rate", "limits-percall", "before-openai",
                 "implicit-openai", "limits-openai", "implicit-nocalllog"]
LIMITER_DELTAS = [
    ("limits", "before", True), ("limits-steady", "before", True), ("limits-openai", "before-openai", True),
    ("limits-rate", "before", True), ("limits-percall", "before", False), ("limits", "limits-percall", False),
    ("limits-steady", "limits", False), ("limits", "limits-rate", False),
    ("implicit", "before", False), ("implicit-openai", "before-openai", False),
    ("limits", "implicit", False), ("limits-openai", "implicit-openai", False),
    ("implicit-openai", "implicit", False), ("limits-openai", "limits", False),
    ("implicit-nocalllog", "implicit", False),
]
LIMITER_FIGURES = [
    ("worker_cpu_us_per_task", "worker CPU us/task (drain only)"),
    ("worker_sys_us_per_task", "  of which kernel (stime)"),
    ("redis_cpu_us_per_task", "redis CPU us/task"),
    ("redis_sys_us_per_task", "  of which kernel (stime)"),
    ("worker_redis_us_per_task", "worker + redis us/task"),
    ("mock_cpu_us_per_task", "mock CPU us/task (control)"),
    ("worker_total_us_per_task", "worker CPU us/task incl. start-up"),
    ("worker_startup_cpu_ms", "worker start-up CPU ms"),
    ("tasks_per_s", "tasks/s"),
    ("evalsha_per_task", "EVALSHA calls/task"),
    ("evalsha_us_per_task", "us inside EVALSHA/task"),
    ("evalsha_usec_per_call", "us per EVALSHA"),
    ("worker_vmhwm_mib", "worker peak RSS MiB"),
]
LIMITER_TARGET_US = 15.0
LIMITER_VARIANTS = {
    "before": "binaries of AGENTQ_BENCH_BEFORE_BIN_DIR (before flow control), AGENTQ_MODEL=mock-gpt",
    "implicit": "AGENTQ_BENCH_BIN_DIR, no AGENTQ_UPSTREAMS (implicit upstream: nothing counted or held; calls "
                "admitted from grants once the route is hot)",
    "limits": "AGENTQ_BENCH_BIN_DIR, AGENTQ_UPSTREAMS: one upstream serving mock-gpt, rpm/tpm/concurrency set on the "
              "upstream and in model_limits, far above reach; scopes start from an empty window",
    "limits-steady": "as limits, the scopes start from a minute of 1 s buckets (~125 hash fields), as in steady operation",
    "limits-rate": "as limits without concurrency (rpm and tpm on the upstream and the model): windows counted, no leases",
    "limits-percall": "as limits with AGENTQ_LIMITER_GRANTS=0: no grants, every call reserved and settled by its own item "
                      "of a script (group commit only)",
    "before-openai": "as before, AGENTQ_MODEL=gpt-4o-mini",
    "implicit-openai": "as implicit, AGENTQ_MODEL=gpt-4o-mini (prompt tokens counted with tiktoken's o200k_base)",
    "limits-openai": "as limits, serving gpt-4o-mini (tiktoken)",
    "implicit-nocalllog": "as implicit with RUST_LOG=info,agent_call=off: without the per-call audit log line",
}


def limiter_figures(rec):
    d = lambda a, b: a / b if b else 0.0  # noqa: E731
    n = rec["rec_succeeded"]
    (wu1, ws1), (ru1, rs1), (mu1, ms1) = rec["rec_cpu_s"]
    w_end, r_end, m_end = wu1 + ws1, ru1 + rs1, mu1 + ms1
    # user and system (kernel: syscalls, the loopback TCP path) time apart, for worker and redis
    if rec.get("cpu0_split"):
        (wu0, ws0), (ru0, rs0) = rec["cpu0_split"]
        rec["worker_user_us_per_task"] = d(wu1 - wu0, n) * 1e6
        rec["worker_sys_us_per_task"] = d(ws1 - ws0, n) * 1e6
        rec["redis_user_us_per_task"] = d(ru1 - ru0, n) * 1e6
        rec["redis_sys_us_per_task"] = d(rs1 - rs0, n) * 1e6
    rec["worker_cpu_us_per_task"] = d(w_end - rec["worker_cpu_s0"], n) * 1e6
    rec["worker_total_us_per_task"] = d(w_end, n) * 1e6
    rec["worker_startup_cpu_ms"] = rec["worker_cpu_s0"] * 1000
    rec["redis_cpu_us_per_task"] = d(r_end - rec["redis_cpu_s0"], n) * 1e6
    rec["mock_cpu_us_per_task"] = d(m_end - rec["mock_cpu_s0"], n) * 1e6
    rec["worker_redis_us_per_task"] = rec["worker_cpu_us_per_task"] + rec["redis_cpu_us_per_task"]
    rec["tasks_per_s"] = rec["rec_tasks_per_s"]
    rec["evalsha_per_task"] = d(rec["flow_evalsha_calls"], n)
    rec["evalsha_us_per_task"] = d(rec["flow_evalsha_usec"], n)
    rec["evalsha_usec_per_call"] = d(rec["flow_evalsha_usec"], rec["flow_evalsha_calls"])
    rec["worker_vmhwm_mib"] = rec["worker_vmhwm_kib"] / 1024


def limiter_report(runs_path, out_path, mode, n_runs, meta_path):
    with open(runs_path) as fh:
        runs = [json.loads(ln) for ln in fh if ln.strip()]
    meta = json.load(open(meta_path)) if meta_path and os.path.exists(meta_path) else {}
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    variants = [v for v in LIMITER_ORDER if v in by]
    med = {v: {k: statistics.median([r.get(k, 0) for r in by[v]]) for k, _ in LIMITER_FIGURES} for v in variants}
    deltas = []
    failures = []
    for a, b, target in LIMITER_DELTAS:
        if a not in by or b not in by:
            continue
        row = {"variant": a, "minus": b}
        for k in ("worker_cpu_us_per_task", "redis_cpu_us_per_task", "worker_redis_us_per_task",
                  "worker_total_us_per_task"):
            row[k] = round(med[a][k] - med[b][k], 2)
            # the same difference taken within each round (runs of a round are back to back)
            rb = {r["round"]: r[k] for r in by[b]}
            paired = [r[k] - rb[r["round"]] for r in by[a] if r["round"] in rb]
            if paired:
                row[k + "_paired"] = round(statistics.median(paired), 2)
                row[k + "_paired_range"] = [round(min(paired), 2), round(max(paired), 2)]
        if target:
            row["target"] = f"<= {LIMITER_TARGET_US:g}"
            row["meets_target"] = row["worker_redis_us_per_task"] <= LIMITER_TARGET_US
            if not row["meets_target"]:
                failures.append(f"{a} - {b}")
        deltas.append(row)
    broken = []
    for r in runs:
        tag = f"{r['variant']} round {r['round']}"
        if r.get("rec_succeeded") != r.get("tasks") or r.get("rec_timed_out"):
            broken.append(f"{tag}: {r.get('rec_succeeded')} of {r.get('tasks')} tasks succeeded")
        if r.get("flow_limiter_throttled") or r.get("flow_throttled_set"):
            broken.append(f"{tag}: the limiter throttled {r.get('flow_limiter_throttled')} calls "
                          f"({r.get('flow_throttled_set')} parked): the limits are meant never to bind")
        if r["variant"].startswith("limits"):
            n = r.get("tasks", 0)
            base = 60 if r["variant"].endswith("-steady") else 0  # the seeded minute's requests
            # the minute may have moved on during the drain: its buckets leave the window
            ok = lambda v: v is not None and n <= v <= n + base  # noqa: E731
            if r.get("flow_limiter_admitted") != n or not ok(r.get("flow_scope0_rsum")) or not ok(r.get("flow_scope1_rsum")):
                broken.append(f"{tag}: admitted {r.get('flow_limiter_admitted')}, counted {r.get('flow_scope0_rsum')}"
                              f"/{r.get('flow_scope1_rsum')} requests for {n} tasks")
            if r.get("flow_scope0_leases") or r.get("flow_scope1_leases"):
                broken.append(f"{tag}: leases left after the drain")
    m = machine()
    result = {
        "mode": mode,
        "rounds": n_runs,
        "statistic": "median of runs per variant; deltas also as the median of per-round differences (_paired)",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**meta.get("machine", {}), "loadavg_end": m["loadavg"]},
        "git": meta.get("git", {}),
        "settings": meta.get("settings", {}),
        "binaries": meta.get("binaries", {}),
        "variants": {v: LIMITER_VARIANTS.get(v, "") for v in variants},
        "medians": med,
        "deltas": deltas,
        "short_of_target": failures,
        "broken": broken,
        "runs": runs,
    }
    write_json(out_path, result)
    mc = result["machine"]
    print(f"\nagentq limiter bench ({mode}, median of {n_runs} round(s)) on {mc.get('cores')} cores, "
          f"{mc.get('cpu_model')}; load average at start {mc.get('loadavg_start')}, at end {mc.get('loadavg_end')}")
    print(f"{'figure':36}" + "".join(f"{v:>20}" for v in variants))
    for k, label in LIMITER_FIGURES:
        print(f"{label:36}" + "".join(f"{med[v][k]:>20,.2f}" for v in variants))
    print("\ndeltas, us/task (difference of medians; [median of per-round differences])")
    for row in deltas:
        ok = "" if "meets_target" not in row else (" target <= 15: " + ("met" if row["meets_target"] else "MISSED"))
        print(f"  {row['variant']:>18} - {row['minus']:<16} worker {row['worker_cpu_us_per_task']:+7.2f} "
              f"[{row.get('worker_cpu_us_per_task_paired', 0):+7.2f}]  redis {row['redis_cpu_us_per_task']:+7.2f} "
              f"[{row.get('redis_cpu_us_per_task_paired', 0):+7.2f}]  sum {row['worker_redis_us_per_task']:+7.2f} "
              f"[{row.get('worker_redis_us_per_task_paired', 0):+7.2f}]{ok}")
    for b in broken:
        print(f"BROKEN: {b}")
    print(f"\nresults: {out_path}")
    return result


# metric key, phase, field, unit, target (op, value), reference
TABLE = [
    ("enqueue_http_rps", "enqueue", "rps", "req/s", (">=", 30000)),
    ("enqueue_http_p50_ms", "enqueue", "p50_ms", "ms", None),
    ("enqueue_http_p99_ms", "enqueue", "p99_ms", "ms", None),
    ("enqueue_api_cpu_s_per_1k", "enqueue", "api_cpu_s_per_1k", "CPU s/1k", None),
    ("enqueue_redis_cpu_s_per_1k", "enqueue", "redis_cpu_s_per_1k", "CPU s/1k", None),
    ("redis_eval_limit_rps", "enqueue", "redis_eval_rps", "req/s", None),
    ("enqueue_pct_of_redis_limit", "enqueue", "pct_of_limit", "%", (">=", 40)),
    ("enqueue_nogroup_http_rps", "enqueue-nogroup", "rps", "req/s", None),
    ("enqueue_nogroup_redis_cpu_s_per_1k", "enqueue-nogroup", "redis_cpu_s_per_1k", "CPU s/1k", None),
    ("enqueue_nogroup_pct_of_redis_limit", "enqueue-nogroup", "pct_of_limit", "%", None),
    ("bulk_tasks_per_s", "bulk", "tasks_per_s", "tasks/s", (">=", 250000)),
    ("bulk_request_p99_ms", "bulk", "p99_ms", "ms", None),
    ("bulk_api_cpu_us_per_task", "bulk", "api_cpu_us_per_task", "us/task", None),
    ("bulk_redis_cpu_us_per_task", "bulk", "redis_cpu_us_per_task", "us/task", None),
    ("bulk_redis_bound_tasks_per_s", "bulk", "bulk_redis_bound_tasks_per_s", "tasks/s", None),
    ("raw_pipelined_hset_rps", "bulk", "raw_hset_rps", "records/s", None),
    ("raw_redis_us_per_record", "bulk", "raw_redis_us_per_record", "us/record", None),
    ("raw_redis_bound_rps", "bulk", "raw_redis_bound_rps", "records/s", None),
    ("bulk_pct_of_raw_limit", "bulk", "pct_of_raw", "%", None),
    ("drain_tasks_per_s", "drain", "tasks_per_s", "tasks/s", (">=", 10000)),
    ("drain_worker_cpu_us_per_task", "drain", "worker_cpu_us_per_task", "us/task", ("<=", 100)),
    ("drain_mock_cpu_us_per_task", "drain", "mock_cpu_us_per_task", "us/task", None),
    ("drain_redis_cpu_us_per_task", "drain", "redis_cpu_us_per_task", "us/task", None),
    ("drain_redis_busy_us_per_task", "drain", "redis_busy_us_per_task", "us/task", None),
    ("drain_redis_commands_per_task", "drain", "redis_commands_per_task", "cmds/task", None),
    ("drain_redis_evalsha_per_task", "drain", "redis_evalsha_per_task", "calls/task", None),
    ("fanout_tasks_per_s", "fanout", "tasks_per_s", "tasks/s", (">=", 450)),
    ("fanout_worker_peak_rss_mib", "fanout", "worker_vmhwm_mib", "MiB", ("<=", 64)),
    ("fanout_worker_cpu_us_per_task", "fanout", "worker_cpu_us_per_task", "us/task", None),
    ("fanout_mock_cpu_us_per_task", "fanout", "mock_cpu_us_per_task", "us/task", None),
    # the same fan-out with AGENTQ_LLM_HTTP=http2 (h2c to the mock): issue 20's memory target
    ("fanout_h2_tasks_per_s", "fanout-h2", "tasks_per_s", "tasks/s", (">=", 490)),
    ("fanout_h2_worker_peak_rss_mib", "fanout-h2", "worker_vmhwm_mib", "MiB", ("<=", 40)),
    ("fanout_h2_worker_cpu_us_per_task", "fanout-h2", "worker_cpu_us_per_task", "us/task", None),
    ("fanout_h2_mock_cpu_us_per_task", "fanout-h2", "mock_cpu_us_per_task", "us/task", None),
    ("queue_wait_p50_ms", "latency", "p50_ms", "ms", None),
    ("queue_wait_p99_ms", "latency", "p99_ms", "ms", ("<=", 5)),
    ("queue_wait_hist_p50_ms", "latency", "hist_p50_ms", "ms", None),
    ("queue_wait_hist_p99_ms", "latency", "hist_p99_ms", "ms", None),
    ("workflow_fanout_seconds", "workflow", "seconds", "s", None),
    ("workflow_redis_us_per_node", "workflow", "redis_us_per_node", "us/node", ("<=", 1000)),
    ("plain_task_redis_us_per_task", "workflow", "plain_redis_us_per_task", "us/task", None),
    ("streams_clients", "streams", "clients", "streams", None),
    ("streams_idle_kib_per_stream", "streams", "idle_kib_per_stream", "KiB", ("<=", 64)),
    ("streams_api_rss_base_mib", "streams", "api_rss_base_mib", "MiB", None),
    ("streams_api_peak_rss_mib", "streams", "api_peak_rss_mib", "MiB", None),
    ("streams_window_s", "streams", "window_s", "s", None),
    ("streams_stream_tokens_per_s", "streams", "stream_tokens_per_s_p50", "tok/s", None),
    ("streams_api_cpu_s", "streams", "api_cpu_s", "CPU s", None),
    ("streams_events", "streams", "events", "events", None),
    ("streams_api_cpu_us_per_event", "streams", "api_cpu_us_per_event", "us/event", None),
    ("streams_tokens", "streams", "tokens", "tokens", None),
    ("streams_redis_cpu_us_per_token", "streams", "redis_cpu_us_per_token", "us/token", None),
    ("streams_xadd_per_token", "streams", "xadd_per_token", "calls", None),
    ("streams_evalsha_per_token", "streams", "evalsha_per_token", "calls", None),
    ("streams_tokens_per_delta", "streams", "tokens_per_delta", "tokens", None),
    ("streams_redis_cpu_us_per_delta", "streams", "redis_cpu_us_per_delta", "us/delta", None),
    ("streams_redis_xread_share_pct", "streams", "redis_xread_share_pct", "%", None),
    ("streams_worker_cpu_s", "streams", "worker_cpu_s", "CPU s", None),
    ("streams_mock_cpu_s", "streams", "mock_cpu_s", "CPU s", None),
    ("streams_client_cpu_s", "streams", "client_cpu_s", "CPU s", None),
    ("streams_machine_busy_pct", "streams", "machine_busy_pct", "%", None),
    ("streams_full_text_ok_pct", "streams", "full_text_ok_pct", "%", None),
    ("frontdoor_task_calls_per_s", "frontdoor-task", "calls_per_s", "calls/s", None),
    ("frontdoor_chat_calls_per_s", "frontdoor-chat", "calls_per_s", "calls/s", None),
    ("frontdoor_task_p99_ms", "frontdoor-task", "p99_ms", "ms", None),
    ("frontdoor_chat_p99_ms", "frontdoor-chat", "p99_ms", "ms", None),
    ("frontdoor_task_api_cpu_us_per_call", "frontdoor-task", "api_cpu_us_per_call", "us/call", None),
    ("frontdoor_chat_api_cpu_us_per_call", "frontdoor-chat", "api_cpu_us_per_call", "us/call", None),
    ("frontdoor_stream_api_cpu_us_per_call", "frontdoor-chat-stream", "api_cpu_us_per_call", "us/call", None),
    ("frontdoor_task_server_cpu_us_per_call", "frontdoor-task", "server_cpu_us_per_call", "us/call", None),
    ("frontdoor_chat_server_cpu_us_per_call", "frontdoor-chat", "server_cpu_us_per_call", "us/call", None),
]


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")


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
        # phase 7's variants are phases of their own for the medians (frontdoor-chat, ...)
        name = f"frontdoor-{r['variant']}" if r["phase"] == "frontdoor" else r["phase"]
        phases.setdefault(name, []).append(r)
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
        if r["phase"] == "bulk":
            if r.get("wrk_non_2xx") or r.get("wrk_socket_errors"):
                broken.append(f"{tag}: {r.get('wrk_non_2xx')} non-2xx answers, {r.get('wrk_socket_errors')} socket errors")
            want = r.get("wrk_requests", 0) * r.get("per_request", 0)
            if r.get("queued_after", 0) < want:
                broken.append(f"{tag}: {r.get('queued_after')} ids queued for {want} tasks in answered requests")
        if r["phase"] in ("enqueue", "enqueue-nogroup"):
            if r.get("wrk_non_2xx") or r.get("wrk_socket_errors"):
                broken.append(f"{tag}: {r.get('wrk_non_2xx')} non-2xx answers, {r.get('wrk_socket_errors')} socket errors")
            if r.get("queued_after", 0) < r.get("wrk_requests", 0):
                broken.append(f"{tag}: {r.get('queued_after')} ids queued for {r.get('wrk_requests')} answered requests")
        elif r["phase"] in ("drain", "fanout", "fanout-h2"):
            if r.get("rec_succeeded") != r.get("tasks") or r.get("rec_timed_out"):
                broken.append(f"{tag}: {r.get('rec_succeeded')} of {r.get('tasks')} tasks succeeded")
        elif r["phase"] == "workflow":
            if r.get("wf_status") != "succeeded" or r.get("wf_succeeded_records") != 2 * r.get("wf_nodes", 0):
                broken.append(f"{tag}: workflow {r.get('wf_status')}, {r.get('wf_succeeded_records')} task records "
                              f"succeeded of {2 * r.get('wf_nodes', 0)}")
        elif r["phase"] == "streams":
            n = r.get("clients", 0)
            if (r.get("s_connected") != n or r.get("s_full_text_ok") != n or r.get("s_done_ok") != n
                    or r.get("s_errors") or not n):
                broken.append(f"{tag}: of {n} SSE clients {r.get('s_connected')} connected, "
                              f"{r.get('s_full_text_ok')} got their task's full text, {r.get('s_done_ok')} a matching "
                              f"done event, {r.get('s_errors')} an error event; e.g. {r.get('s_examples_bad')}")
        elif r["phase"] == "frontdoor":
            tag = f"frontdoor {r.get('variant')} round {r.get('round')}"
            n = r.get("f_calls", 0)
            if (r.get("f_k6_rc") != 0 or r.get("f_calls_ok") != n or r.get("f_calls_failed") or r.get("f_timed_out")
                    or r.get("f_dropped_iterations")
                    or r.get("f_succeeded") != n + FRONTDOOR_WARM or r.get("f_records") != n + FRONTDOOR_WARM):
                broken.append(f"{tag}: k6 exit {r.get('f_k6_rc')}, {r.get('f_calls_ok')} of {n} calls ok "
                              f"({r.get('f_calls_failed')} failed, {r.get('f_dropped_iterations')} dropped by the "
                              f"arrival rate: k6 had no free VU); {r.get('f_succeeded')} of {r.get('f_records')} task "
                              f"records succeeded (expected {n + FRONTDOOR_WARM})")
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
    fd = frontdoor_report(runs)
    if fd:
        result["frontdoor"] = fd
    write_json(out_path, result)
    mc = result["machine"]
    print(f"\nagentq bench ({mode}, median of {n_runs} run(s)) on {mc.get('cores')} cores, "
          f"{mc.get('cpu_model')}; load average at start {mc.get('loadavg_start')}, at end {mc.get('loadavg_end')}")
    print(f"{'metric':34} {'value':>12}  {'unit':9} {'target':>9}  ok")
    print("-" * 74)
    for key, entry in metrics.items():
        ok = "" if "meets_target" not in entry else ("yes" if entry["meets_target"] else "NO")
        print(f"{key:34} {entry['value']:>12,.3f}  {entry['unit']:9} {entry.get('target', ''):>9}  {ok}")
    if fd:
        frontdoor_print(fd)
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
    if p == "bulk":
        return (f"{r['tasks_per_s']:.0f} tasks/s ({r['wrk_rps']:.1f} req/s of {r['per_request']}), p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms; CPU us/task: api {r['api_cpu_us_per_task']:.2f}, redis {r['redis_cpu_us_per_task']:.2f}; "
                f"raw pipelined HSET {r['raw_hset_rps']:.0f} records/s, {r['raw_redis_us_per_record']:.2f} us of Redis CPU each "
                f"(bound {r['raw_redis_bound_rps']:.0f}/s; bulk is {r['pct_of_raw']:.0f}% of it); queued "
                f"{r['queued_after']}; load {r['loadavg']}")
    if p in ("enqueue", "enqueue-nogroup"):
        return (f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; redis EVAL limit "
                f"{r['redis_eval_rps']:.0f}/s ({r['pct_of_limit']:.0f}%); CPU s/1k req: api {r['api_cpu_s_per_1k']:.3f}, "
                f"redis {r['redis_cpu_s_per_1k']:.3f}, wrk {r['wrk_cpu_s_per_1k']:.3f}; non-2xx {r['wrk_non_2xx']}, "
                f"errors {r['wrk_socket_errors']}; queued {r['queued_after']} of {r['wrk_requests']}; load {r['loadavg']}")
    if p == "limiter":
        return (f"{r['variant']}: {r['rec_succeeded']}/{r['tasks']} in {r['rec_span_s']:.2f} s = {r['tasks_per_s']:.0f} tasks/s; "
                f"CPU us/task: worker {r['worker_cpu_us_per_task']:.1f} (start-up {r['worker_startup_cpu_ms']:.0f} ms), "
                f"redis {r['redis_cpu_us_per_task']:.1f}, mock {r['mock_cpu_us_per_task']:.1f}; EVALSHA/task "
                f"{r['evalsha_per_task']:.2f} at {r['evalsha_usec_per_call']:.1f} us; admitted {r['flow_limiter_admitted']:.0f}, "
                f"throttled {r['flow_limiter_throttled']:.0f}; load {r['loadavg']}")
    if p in ("drain", "fanout", "fanout-h2"):
        return (f"{r['rec_succeeded']}/{r['tasks']} succeeded in {r['rec_span_s']:.2f} s = {r['tasks_per_s']:.0f} tasks/s; "
                f"CPU us/task: worker {r['worker_cpu_us_per_task']:.1f}, mock {r['mock_cpu_us_per_task']:.1f}, "
                f"redis {r['redis_cpu_us_per_task']:.1f}; redis inside commands {r.get('redis_busy_us_per_task', 0):.1f} us/task, "
                f"{r.get('redis_commands_per_task', 0):.2f} commands/task, {r.get('redis_evalsha_per_task', 0):.2f} EVALSHA/task; "
                f"worker VmHWM {r['worker_vmhwm_mib']:.1f} MiB; load {r['loadavg']}")
    if p == "frontdoor":
        return (f"{r['variant']}: {r['f_calls_ok']}/{r['f_calls']} calls ok at {r['load_model']} in {r['f_k6_run_s']:.2f} s = "
                f"{r['calls_per_s']:.0f} calls/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; CPU us/call: api "
                f"{r['api_cpu_us_per_call']:.1f}, redis {r['redis_cpu_us_per_call']:.1f}, worker {r['worker_cpu_us_per_call']:.1f}, "
                f"mock {r['mock_cpu_us_per_call']:.1f}, k6 {r['k6_cpu_us_per_call']:.1f}; idle CPU s/s {r['f_idle_cpu_s_per_s']}; "
                f"machine {r['machine_busy_pct']:.0f}% busy; load {r['loadavg']}")
    if p == "workflow":
        return (f"{r['wf_nodes']}-node fan-out {r['wf_status']} in {r['seconds']:.2f} s; Redis {r['redis_us_per_node']:.1f} us/node "
                f"({r['wf_commands_per_node']:.2f} commands, {r['wf_evalsha_per_node']:.2f} EVALSHA); plain tasks "
                f"{r['plain_redis_us_per_task']:.1f} us/task ({r['wf_plain_commands_per_task']:.2f} commands) in "
                f"{r['wf_plain_seconds']:.2f} s; load {r['loadavg']}")
    if p == "streams":
        return (f"{r['clients']} SSE clients ({r['s_connected']} connected in {r['s_connect_s']:.1f} s): idle api RSS "
                f"{r['api_rss_base_mib']:.1f} -> {r['api_rss_idle_mib']:.1f} MiB = {r['idle_kib_per_stream']:.1f} KiB/stream; "
                f"streaming {r['window_s']:.1f} s (per stream p50 {r['stream_s_p50']:.1f} s, "
                f"{r['stream_tokens_per_s_p50']:.1f} tok/s): api CPU {r['api_cpu_s']:.2f} s, peak RSS {r['api_peak_rss_mib']:.1f} MiB, "
                f"{r['events']} events ({r['api_cpu_us_per_event']:.1f} us each); {r['tokens']} tokens, redis "
                f"{r['redis_cpu_us_per_token']:.2f} us/token, XADD {r['xadd_per_token']:.3f}/token, EVALSHA "
                f"{r['evalsha_per_token']:.3f}/token; CPU s worker {r['worker_cpu_s']:.1f}, mock {r['mock_cpu_s']:.1f}, "
                f"client {r['client_cpu_s']:.1f}; full text {r['s_full_text_ok']}/{r['clients']}, done "
                f"{r['s_done_ok']}, reconnects {r['s_reconnects']}; load {r['loadavg']}")
    return (f"{r['pace_accepted']} posted at {r['pace_rate']:.0f}/s; started_at-created_at p50 {r['p50_ms']:.0f} ms, "
            f"p99 {r['p99_ms']:.0f} ms, max {r['waits_max_ms']:.0f} ms; histogram p50 {r['hist_p50_ms']:.2f} ms, "
            f"p99 {r['hist_p99_ms']:.2f} ms; load {r['loadavg']}")


def script_cost(port, src_dir, n, batch, tenants="1"):
    """Redis's own time inside the two scripts every task passes at the worker, `fetch.lua` and
    `complete.lua`, of the source tree `src_dir` (before or after a change), without a worker:
    n tasks are queued with that tree's enqueue.lua (spread over `tenants` tenants where the tree
    has fair scheduling), then taken `batch` at a time with its fetch.lua and each reported with
    its complete.lua, straight from here. INFO commandstats' `usec` (time inside EVALSHA, no
    network, no client) per task, split by script; the caller's Python speed does not enter it.
    Run it on an otherwise idle private Redis (it FLUSHALLs)."""
    import redis
    n, batch, tenants = int(n), int(batch), int(tenants)
    q = os.path.join(src_dir, "common", "src", "queue")
    g = os.path.join(src_dir, "common", "src", "graph")
    fair = os.path.exists(os.path.join(q, "fair.lua"))

    def src(*parts):
        return "".join(open(p).read() for p in parts)

    pre = [os.path.join(q, "events.lua")] + ([os.path.join(q, "fair.lua")] if fair else []) + [os.path.join(g, "wf.lua")]
    r = connect(port)
    r.flushall()
    item = [os.path.join(q, "enqueue_item.lua")] if os.path.exists(os.path.join(q, "enqueue_item.lua")) else []
    enq_sha = r.script_load(src(*([os.path.join(q, "fair.lua")] if fair else []), *item, os.path.join(q, "enqueue.lua")))
    fetch = r.register_script(src(*pre, os.path.join(q, "fetch.lua")))
    complete = r.register_script(src(*pre, os.path.join(q, "fence.lua"), os.path.join(q, "complete.lua")))
    payload = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}, separators=(",", ":"))
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        tid = f"{QUEUE}.{uuid7()}"
        k = i % tenants
        tenant = "" if k == 0 else f"t{k}"
        pipe.evalsha(enq_sha, 2, TASK_PREFIX + tid, PENDING, tid, QUEUE, time.time_ns() // 1_000_000, 5,
                     payload, 86400, "0", "0", "", tenant)
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
    w = "bench-w"
    fkeys = [PENDING, f"{BASE}:inflight:{w}", ACTIVE, f"{BASE}:dead", f"{BASE}:workers", f"{BASE}:worker:{w}"]

    def evalsha_usec():
        st = r.info("commandstats").get("cmdstat_evalsha", {})
        return int(st.get("usec", 0)), int(st.get("calls", 0))

    started = []
    fetch_usec = fetch_calls = 0
    while True:
        r.config_resetstat()
        out = fetch(keys=fkeys, args=[TASK_PREFIX, batch, time.time_ns() // 1_000_000, w, "", 86400, 60])
        u, c = evalsha_usec()
        fetch_usec += u
        fetch_calls += c
        runs = out[1:] if fair else out
        got = [(runs[i], runs[i + 5]) for i in range(0, len(runs) - 6, 7)]
        if not got:
            break
        started.extend(got)
    complete_usec = 0
    ckeys_tail = [f"{BASE}:running"] if fair else []
    for tid, token in started:
        r.config_resetstat()
        v = complete(keys=[TASK_PREFIX + tid, f"{BASE}:inflight:{w}", ACTIVE] + ckeys_tail,
                     args=[tid, token, time.time_ns() // 1_000_000, '{"content":"hi"}', 86400, 1, 1,
                           "10|5|0|1000", "", "", "", "", 0, "", ""])
        if v != "ok":
            raise SystemExit(f"bench: complete.lua answered {v!r}")
        complete_usec += evalsha_usec()[0]
    done = len(started)
    return {"src": src_dir, "fair": fair, "tasks": n, "batch": batch, "tenants": tenants, "started": done,
            "fetch_calls": fetch_calls, "fetch_us_per_task": round(fetch_usec / max(done, 1), 3),
            "complete_us_per_task": round(complete_usec / max(done, 1), 3),
            "us_per_task": round((fetch_usec + complete_usec) / max(done, 1), 3)}


def enqueue_cost(port, src_dir, n, prefill="12000"):
    """Redis's own time inside `enqueue.lua` of the source tree `src_dir`, per call: `prefill`
    tasks first (past the `recent` index's cap of 10,000, so its trim runs as in steady
    operation), then n more, pipelined as `load` sends them; INFO commandstats' `usec` per EVALSHA
    of those n. Run it on an otherwise idle private Redis (it FLUSHALLs)."""
    r = connect(port)
    r.flushall()
    path = os.path.join(src_dir, "common", "src", "queue", "enqueue.lua")
    load(port, int(prefill), path)
    r.config_resetstat()
    load(port, int(n), path)
    st = r.info("commandstats").get("cmdstat_evalsha", {})
    calls = int(st.get("calls", 0))
    return {"src": src_dir, "tasks": int(n), "prefill": int(prefill),
            "us_per_enqueue": round(int(st.get("usec", 0)) / max(calls, 1), 3)}


def bulk_cost(port, n, rounds, *src_dirs):
    """Redis's own time per item inside `enqueue_many.lua` (fair.lua and enqueue_item.lua
    prepended, as common/src/queue/enqueue.rs sends it) of each source tree in `src_dirs`, in
    interleaved rounds: 12,000 tasks first (past the `recent` index's cap, so its trim runs as in
    steady operation), then n more in 100-item calls pipelined 20 at a time, as the api writes a
    1,000-task POST /v1/tasks/batch; INFO commandstats' `usec` per item. A tree whose
    enqueue_many.lua takes the flags string (ARGV[6], issue 20's second round) gets it; an older
    one gets its per-item '' argument. Run it on an otherwise idle private Redis (it FLUSHALLs)."""
    r = connect(port)
    n, rounds = int(n), int(rounds)
    payload = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}, separators=(",", ":"))
    scripts = {}
    for d in src_dirs:
        q = os.path.join(d, "common", "src", "queue")
        src = "".join(open(os.path.join(q, f)).read() for f in ("fair.lua", "enqueue_item.lua", "enqueue_many.lua"))
        scripts[d] = (src, "local flags = ARGV[6]" in src)

    def batch(sha, flags, k):
        p = r.pipeline(transaction=False)
        for c in range(0, k, 100):
            ids = [f"{QUEUE}.{uuid7()}" for _ in range(min(100, k - c))]
            keys = [PENDING, f"{BASE}:lanes"] + [TASK_PREFIX + i for i in ids]
            argv = [QUEUE, int(time.time() * 1000), 86400, 5, ""]
            if flags:
                argv.append("0" * len(ids))
                for i in ids:
                    argv += [i, payload]
            else:
                for i in ids:
                    argv += [i, payload, ""]
            p.evalsha(sha, len(keys), *keys, *argv)
        p.execute()

    per = {d: [] for d in src_dirs}
    for _ in range(rounds):
        for d in src_dirs:
            src, flags = scripts[d]
            r.flushall()
            sha = r.script_load(src)
            batch(sha, flags, 12000)
            r.config_resetstat()
            for c in range(0, n, 2000):
                batch(sha, flags, min(2000, n - c))
            st = r.info("commandstats").get("cmdstat_evalsha", {})
            per[d].append(round(int(st.get("usec", 0)) / n, 3))
    return {"tasks": n, "rounds": rounds,
            "us_per_item": {d: {"median": statistics.median(v), "runs": v} for d, v in per.items()}}


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "freeport":
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
        s.close()
        return
    if cmd == "bulk-body":
        # POST /v1/tasks/batch's body for phase 8: n tasks like phase 1's
        n = int(args[0])
        print(json.dumps({"tasks": [{"prompt": "hello from the bench"} for _ in range(n)]}))
        return
    if cmd == "load":
        out = load(*args)
    elif cmd == "script-cost":
        out = script_cost(*args)
    elif cmd == "enqueue-cost":
        out = enqueue_cost(*args)
    elif cmd == "bulk-cost":
        out = bulk_cost(*args)
    elif cmd == "workflow":
        out = workflow(*args)
    elif cmd == "sse-enqueue":
        out = sse_enqueue(*args)
    elif cmd == "streams":
        out = streams(*args)
    elif cmd == "frontdoor":
        out = frontdoor(*args)
    elif cmd == "wait":
        out = wait_done(*args)
    elif cmd == "waits":
        out = waits(*args)
    elif cmd == "pace":
        out = pace(*args)
    elif cmd == "hist":
        out = hist(*args)
    elif cmd == "idle":
        out = idle(*args)
    elif cmd == "seed":
        out = seed(*args)
    elif cmd == "flowstats":
        out = flowstats(*args)
    elif cmd == "cpusplit":
        out = [proc_cpu_s(p, split=True) for p in args]
    elif cmd == "slowlog":
        out = slowlog(*args)
    elif cmd == "limiter-report":
        result = limiter_report(args[0], args[1], args[2], int(args[3]), args[4] if len(args) > 4 else None)
        if result["broken"]:
            sys.exit(1)
        if os.environ.get("BENCH_STRICT") == "1" and result["short_of_target"]:
            sys.exit(2)
        return
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
