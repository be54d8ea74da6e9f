#!/usr/bin/env python3
"""Helpers for loadtest/bench/cluster.sh (issue 19): one redis-server against a 3-master Redis
Cluster, the same workload over 3 queues. Standard library plus the redis-py client (installed
into .venv by cluster.sh); the wrk parser is bench.py's.

Every subcommand prints one JSON object on stdout. The queues are passed as `q@port` pairs: the
port of the Redis node that holds the queue's slot (the same port for all three in single mode).
A node is read with a plain client: a queue's keys all share its hash tag, so they are local to
that node and no redirect is involved.
"""

import json
import os
import socket
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (wrk output parser, /proc CPU reader)

PREFIX = "agentq"


def conn(port):
    import redis

    return redis.Redis(host="127.0.0.1", port=int(port), decode_responses=True)


def qmap(spec):
    """'q0@7001,q1@7002' -> [('q0', 7001), ('q1', 7002)]"""
    out = []
    for item in spec.split(","):
        q, _, p = item.partition("@")
        out.append((q, int(p)))
    return out


def key(q, suffix):
    return f"{PREFIX}:{{{q}}}:{suffix}"


def freeport():
    """A free loopback port P whose cluster bus port P+10000 is free as well."""
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p + 10000 > 65535:
            continue
        b = socket.socket()
        try:
            b.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        finally:
            b.close()
        return p
    raise SystemExit("cluster.py: no free port pair found")


def cluster_ok(*ports):
    """Waits until CLUSTER INFO says cluster_state:ok on every node and every node knows every
    slot (up to 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        states = []
        for p in ports:
            try:
                info = conn(p).execute_command("CLUSTER", "INFO")
                if isinstance(info, dict):
                    ok = info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384
                else:
                    ok = "cluster_state:ok" in info and "cluster_slots_ok:16384" in info
            except Exception:  # noqa: BLE001 - not up yet
                ok = False
            states.append(ok)
        if all(states):
            return {"ok": True, "nodes": len(ports)}
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster.py: cluster not ok after 20 s ({states})")
        time.sleep(0.1)


def pick_queues(n, *ports):
    """n queue names q<i> (the first ones found) whose hash tags land on n different masters,
    in the order of `ports`; prints {'spec': 'q@port,...', 'slots': {...}}."""
    n = int(n)
    r = conn(ports[0])
    owner = []  # (start, end, port)
    for row in r.execute_command("CLUSTER", "SLOTS"):
        start, end, master = row[0], row[1], row[2]
        owner.append((int(start), int(end), int(master[1])))
    want = [int(p) for p in ports][:n]
    chosen = {}
    slots = {}
    for i in range(10000):
        name = f"q{i}"
        slot = int(r.execute_command("CLUSTER", "KEYSLOT", key(name, "pending")))
        port = next(p for s, e, p in owner if s <= slot <= e)
        if port in want and port not in chosen:
            chosen[port] = name
            slots[name] = slot
        if len(chosen) == len(want):
            break
    if len(chosen) != len(want):
        raise SystemExit(f"cluster.py: found queues for {len(chosen)} of {len(want)} masters")
    spec = ",".join(f"{chosen[p]}@{p}" for p in want)
    return {"spec": spec, "slots": slots, "owners": [list(o) for o in owner]}


def flush(*ports):
    for p in ports:
        conn(p).flushall()
    return {"flushed": [int(p) for p in ports]}


def cpu(*pids):
    """CPU seconds (user+system) of each pid, {pid: s}."""
    return {str(p): bench.proc_cpu_s(p) for p in pids}


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def queue_counts(api, spec):
    """GET /v1/queues/<q> for each queue: pending, inflight."""
    out = {}
    for q, _ in qmap(spec):
        s = _get(f"{api}/v1/queues/{q}")
        out[q] = {"pending": s["pending"], "inflight": s["inflight"]}
    return out


def fill(api, spec, n_per_queue, batch=1000):
    """Queues n tasks on each queue through the api: POST /v1/tasks/batch, `batch` tasks per
    request (each item a POST /v1/tasks body naming its queue). Every item must be accepted."""
    n, batch = int(n_per_queue), int(batch)
    start = time.monotonic()
    accepted = {}
    for q, _ in qmap(spec):
        done = 0
        while done < n:
            size = min(batch, n - done)
            body = json.dumps({"tasks": [{"prompt": "hello from the bench", "queue": q}] * size}).encode()
            req = urllib.request.Request(f"{api}/v1/tasks/batch", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                ans = json.loads(resp.read())
            items = ans.get("data") or ans.get("tasks") or ans.get("results") or []
            ok = sum(1 for it in items if isinstance(it, dict) and (it.get("id") or it.get("task_id"))
                     and not it.get("error"))
            if ok != size:
                raise SystemExit(f"cluster.py: batch of {size} on {q}: {ok} accepted; {json.dumps(ans)[:400]}")
            done += size
        accepted[q] = done
    return {"accepted": accepted, "seconds": round(time.monotonic() - start, 3),
            "counts": queue_counts(api, spec)}


def stage(spec, direction):
    """`out`: RENAME each queue's pending (tickets) to a staging key of the same slot, so a worker
    that starts finds nothing; `in`: back, all queues one after the other (a few hundred µs)."""
    out = {}
    for q, p in qmap(spec):
        a, b = key(q, "pending"), key(q, "bench-staging")
        if direction == "in":
            a, b = b, a
        r = conn(p)
        r.rename(a, b)
        out[q] = r.llen(b)
    return {"direction": direction, "lens": out, "t": time.time()}


def _records(q, port):
    """Statuses and start/finish times of every task record of queue q on its node (SCAN +
    pipelined HMGET; the task's event streams `...:events` left out)."""
    r = conn(port)
    pat = key(q, "task:") + "*"
    keys = [k for k in r.scan_iter(match=pat, count=5000) if not k.endswith(":events")]
    ok = failed = other = 0
    first = last = None
    for i in range(0, len(keys), 2000):
        pipe = r.pipeline(transaction=False)
        for k in keys[i:i + 2000]:
            pipe.hmget(k, "status", "started_at", "finished_at")
        for status, s, f in pipe.execute():
            if status == "succeeded":
                ok += 1
            elif status == "failed":
                failed += 1
            else:
                other += 1
            if s:
                s = int(s)
                first = s if first is None or s < first else first
            if f:
                f = int(f)
                last = f if last is None or f > last else last
    return {"tasks": len(keys), "succeeded": ok, "failed": failed, "unfinished": other,
            "first_start_ms": first or 0, "last_finish_ms": last or 0}


def drain(spec, n_per_queue, timeout, *pids):
    """Reads the CPU of `pids`, renames every queue's staged pending list back (the workers are
    up and idle), then polls LLEN pending and ZCARD active of every queue (on its node) every 20 ms until all are
    0; reads the CPU of `pids` that moment (before the record scan, whose Redis time stays out),
    then checks that every task record is final. Times: from the call (just after the un-stage)
    to the empty queues (`wall_s`), and first started_at to last finished_at over all queues
    (`span_s`, the figure tasks/s uses, as bench.py's drain)."""
    n = int(n_per_queue)
    qs = qmap(spec)
    cpu_at_start = cpu(*pids) if pids else {}
    t0 = time.monotonic()
    staged = stage(spec, "in")
    deadline = t0 + float(timeout)
    clients = {p: conn(p) for _, p in qs}
    timed_out = False
    while True:
        busy = 0
        for q, p in qs:
            pending, active = clients[p].pipeline(transaction=False).llen(key(q, "pending")).zcard(
                key(q, "active")).execute()
            busy += pending + active
        if busy == 0:
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.02)
    wall = time.monotonic() - t0
    cpu_at_end = cpu(*pids) if pids else {}
    per_queue = {}
    for q, p in qs:
        rec = _records(q, p)
        # a task still being written when the queue emptied: look again briefly
        for _ in range(20):
            if rec["succeeded"] + rec["failed"] >= n:
                break
            time.sleep(0.05)
            rec = _records(q, p)
        per_queue[q] = rec
    firsts = [r["first_start_ms"] for r in per_queue.values() if r["first_start_ms"]]
    lasts = [r["last_finish_ms"] for r in per_queue.values() if r["last_finish_ms"]]
    span = (max(lasts) - min(firsts)) / 1000.0 if firsts and lasts else 0.0
    succeeded = sum(r["succeeded"] for r in per_queue.values())
    return {"wall_s": round(wall, 3), "span_s": span, "succeeded": succeeded,
            "failed": sum(r["failed"] for r in per_queue.values()),
            "unfinished": sum(r["unfinished"] for r in per_queue.values()),
            "timed_out": timed_out, "per_queue": per_queue, "staged": staged["lens"],
            "cpu_start": cpu_at_start, "cpu_end": cpu_at_end}


def _delta(c0, c1, pid):
    return round(c1[str(pid)] - c0[str(pid)], 3)


def _nodes(spec, node_pids):
    """[(port, pid, [queues])] in node order."""
    out = []
    for item in node_pids.split(","):
        port, _, pid = item.partition(":")
        out.append((int(port), int(pid), [q for q, p in qmap(spec) if p == int(port)]))
    return out


def _node_split(spec, node_pids, c0, c1, per_q, total):
    """Each Redis node's CPU over a run, per task of the whole workload and per task of its own queues."""
    nodes = []
    for port, pid, qs in _nodes(spec, node_pids):
        d = _delta(c0, c1, pid)
        own = sum(per_q[q] for q in qs)
        nodes.append({"port": port, "queues": qs, "cpu_s": d, "tasks": own,
                      "us_per_task_of_all": round(d * 1e6 / max(total, 1), 3),
                      "us_per_own_task": round(d * 1e6 / max(own, 1), 3)})
    return nodes


def emit_enqueue(runs_path, mode, rnd, spec, node_pids, api_pid, seconds, wrk_path, c0, c1,
                 before, after, la0, la1):
    c0, c1, before, after = json.loads(c0), json.loads(c1), json.loads(before), json.loads(after)
    w = bench.wrk(wrk_path)
    per_q = {q: after[q]["pending"] - before[q]["pending"] for q in after}
    total = sum(per_q.values())
    nodes = _node_split(spec, node_pids, c0, c1, per_q, total)
    rsum = sum(nd["cpu_s"] for nd in nodes)
    api_cpu = _delta(c0, c1, api_pid)
    rec = {"phase": "enqueue", "mode": mode, "round": int(rnd), "seconds": float(seconds),
           "wrk": w, "rps": w.get("rps", 0.0), "enqueued": total, "enqueued_per_queue": per_q,
           "enqueued_per_s": round(total / float(seconds), 1),
           "redis_cpu_s": round(rsum, 3), "redis_us_per_task": round(rsum * 1e6 / max(total, 1), 3),
           "nodes": nodes, "api_cpu_s": api_cpu, "api_us_per_task": round(api_cpu * 1e6 / max(total, 1), 3),
           "loadavg_start": la0, "loadavg_end": la1}
    with open(runs_path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def emit_drain(runs_path, mode, rnd, spec, node_pids, worker_pids, mock_pid, n_per_queue, fillj, waitj,
               la0, la1):
    waitj, fillj = json.loads(waitj), json.loads(fillj)
    c0, c1 = waitj.pop("cpu_start"), waitj.pop("cpu_end")
    per_q = {q: waitj["per_queue"][q]["succeeded"] + waitj["per_queue"][q]["failed"] for q in waitj["per_queue"]}
    total = waitj["succeeded"] + waitj["failed"]
    nodes = _node_split(spec, node_pids, c0, c1, per_q, total)
    rsum = sum(nd["cpu_s"] for nd in nodes)
    wcpu = [_delta(c0, c1, p) for p in worker_pids.split(",")]
    mcpu = _delta(c0, c1, mock_pid)
    span = waitj["span_s"]
    rec = {"phase": "drain", "mode": mode, "round": int(rnd), "tasks_queued_per_queue": int(n_per_queue),
           "fill": fillj, "staged": waitj["staged"], "tasks": total, "succeeded": waitj["succeeded"], "failed": waitj["failed"],
           "unfinished": waitj["unfinished"], "timed_out": waitj["timed_out"],
           "span_s": span, "wall_s": waitj["wall_s"],
           "tasks_per_s": round(waitj["succeeded"] / span, 1) if span > 0 else 0.0,
           "tasks_per_s_wall": round(waitj["succeeded"] / waitj["wall_s"], 1) if waitj["wall_s"] > 0 else 0.0,
           "redis_cpu_s": round(rsum, 3), "redis_us_per_task": round(rsum * 1e6 / max(total, 1), 3),
           "nodes": nodes, "worker_cpu_s": wcpu,
           "worker_us_per_task": round(sum(wcpu) * 1e6 / max(total, 1), 3),
           "mock_cpu_s": mcpu, "mock_us_per_task": round(mcpu * 1e6 / max(total, 1), 3),
           "per_queue": waitj["per_queue"], "loadavg_start": la0, "loadavg_end": la1}
    with open(runs_path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def summary(runs_path):
    with open(runs_path) as fh:
        r = json.loads(fh.read().strip().splitlines()[-1])
    nodes = ", ".join(f"{n['port']}({'/'.join(n['queues']) or '-'}) {n['us_per_task_of_all']:.1f}" for n in r["nodes"])
    if r["phase"] == "enqueue":
        return (f"{r['mode']} enqueue round {r['round']}: {r['rps']:.0f} req/s ({r['enqueued']} queued, "
                f"non-2xx {r['wrk'].get('non_2xx')}, errors {r['wrk'].get('socket_errors')}, "
                f"p99 {r['wrk'].get('p99_ms')} ms); redis {r['redis_us_per_task']:.2f} us/task [{nodes}]; "
                f"api {r['api_us_per_task']:.1f} us/task; load {r['loadavg_end']}")
    return (f"{r['mode']} drain round {r['round']}: {r['succeeded']}/{r['tasks']} in {r['span_s']:.2f} s = "
            f"{r['tasks_per_s']:.0f} tasks/s (wall {r['wall_s']:.2f} s); redis {r['redis_us_per_task']:.2f} us/task "
            f"[{nodes}]; worker {r['worker_us_per_task']:.1f} us/task; load {r['loadavg_end']}")


def _med(vals):
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def report(runs_path, out_path, meta_path, n_per_queue):
    with open(runs_path) as fh:
        runs = [json.loads(ln) for ln in fh if ln.strip()]
    with open(meta_path) as fh:
        meta = json.load(fh)
    broken = []
    for r in runs:
        tag = f"{r['mode']} {r['phase']} round {r['round']}"
        if r["phase"] == "enqueue":
            if r["wrk"].get("non_2xx") or r["wrk"].get("socket_errors") or r["enqueued"] <= 0:
                broken.append(f"{tag}: non-2xx {r['wrk'].get('non_2xx')}, socket errors "
                              f"{r['wrk'].get('socket_errors')}, {r['enqueued']} queued")
        else:
            if r["succeeded"] != 3 * int(n_per_queue) or r["failed"] or r["unfinished"] or r["timed_out"]:
                broken.append(f"{tag}: {r['succeeded']} succeeded of {3 * int(n_per_queue)}, {r['failed']} failed, "
                              f"{r['unfinished']} unfinished, timed out {r['timed_out']}")
    medians = {}
    for mode in ("single", "cluster"):
        e = [r for r in runs if r["mode"] == mode and r["phase"] == "enqueue"]
        d = [r for r in runs if r["mode"] == mode and r["phase"] == "drain"]
        if not e and not d:
            continue
        m = {"runs": len(e),
             "enqueue_req_per_s": _med([r["rps"] for r in e]),
             "enqueue_redis_us_per_task": _med([r["redis_us_per_task"] for r in e]),
             "enqueue_api_us_per_task": _med([r["api_us_per_task"] for r in e]),
             "enqueue_p99_ms": _med([r["wrk"].get("p99_ms") for r in e]),
             "drain_tasks_per_s": _med([r["tasks_per_s"] for r in d]),
             "drain_tasks_per_s_wall": _med([r["tasks_per_s_wall"] for r in d]),
             "drain_redis_us_per_task": _med([r["redis_us_per_task"] for r in d]),
             "drain_worker_us_per_task": _med([r["worker_us_per_task"] for r in d]),
             "drain_mock_us_per_task": _med([r["mock_us_per_task"] for r in d])}
        n_nodes = len(e[0]["nodes"]) if e else len(d[0]["nodes"])
        m["nodes"] = []
        for k in range(n_nodes):
            src = e[0]["nodes"][k] if e else d[0]["nodes"][k]
            m["nodes"].append({
                "port": src["port"], "queues": src["queues"],
                "enqueue_us_per_task_of_all": _med([r["nodes"][k]["us_per_task_of_all"] for r in e]),
                "enqueue_us_per_own_task": _med([r["nodes"][k]["us_per_own_task"] for r in e]),
                "drain_us_per_task_of_all": _med([r["nodes"][k]["us_per_task_of_all"] for r in d]),
                "drain_us_per_own_task": _med([r["nodes"][k]["us_per_own_task"] for r in d]),
            })
        # the cap one core puts on a master: its own queues' tasks at 1e6 / (us per own task)
        own_e = [nd["enqueue_us_per_own_task"] for nd in m["nodes"] if nd["enqueue_us_per_own_task"]]
        own_d = [nd["drain_us_per_own_task"] for nd in m["nodes"] if nd["drain_us_per_own_task"]]
        if own_e and own_d:
            per_task = statistics.mean(own_e) + statistics.mean(own_d)  # a task's whole life on its master
            m["bound"] = {
                "note": "one master's core, spent only on Redis: 1e6 / (us of Redis CPU per own task); "
                        "x masters with the queues spread evenly",
                "enqueue_per_master_per_s": round(1e6 / statistics.mean(own_e)),
                "drain_per_master_per_s": round(1e6 / statistics.mean(own_d)),
                "enqueue_plus_drain_us_per_task": round(per_task, 3),
                "enqueue_plus_drain_per_master_per_s": round(1e6 / per_task),
                "enqueue_plus_drain_all_masters_per_s": round(len(m["nodes"]) * 1e6 / per_task),
            }
        medians[mode] = m
    result = {"bench": "cluster (issue 19)", "mode": meta.get("mode"), "statistic": "median of rounds",
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **meta, "medians": medians, "broken": broken, "runs": runs}
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(f"\nagentq cluster bench ({meta.get('mode')}), medians of {meta['settings']['rounds']} round(s); "
          f"load average {meta['machine']['loadavg_start']} at start, {open('/proc/loadavg').read().split()[:3]} at end")
    print(f"{'':34} {'single':>12} {'cluster':>12}")
    for k in ("enqueue_req_per_s", "enqueue_redis_us_per_task", "enqueue_api_us_per_task", "drain_tasks_per_s",
              "drain_redis_us_per_task", "drain_worker_us_per_task"):
        a = medians.get("single", {}).get(k)
        b = medians.get("cluster", {}).get(k)
        print(f"{k:34} {a if a is not None else '-':>12} {b if b is not None else '-':>12}")
    for mode, m in medians.items():
        for nd in m["nodes"]:
            print(f"  {mode} node {nd['port']} ({','.join(nd['queues'])}): enqueue {nd['enqueue_us_per_task_of_all']} "
                  f"us/task of all ({nd['enqueue_us_per_own_task']} per own), drain {nd['drain_us_per_task_of_all']} "
                  f"({nd['drain_us_per_own_task']} per own)")
        if "bound" in m:
            print(f"  {mode} bound: {json.dumps(m['bound'])}")
    for b in broken:
        print(f"BROKEN: {b}")
    print(f"results: {out_path}")
    return 1 if broken else 0


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "freeport":
        print(freeport())
        return 0
    if cmd == "summary":
        print(summary(*args))
        return 0
    if cmd == "report":
        return report(*args)
    fn = {"cluster-ok": cluster_ok, "pick-queues": pick_queues, "flush": flush, "cpu": cpu,
          "counts": queue_counts, "fill": fill, "stage": stage, "drain": drain,
          "emit-enqueue": emit_enqueue, "emit-drain": emit_drain}[cmd]
    print(json.dumps(fn(*args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
