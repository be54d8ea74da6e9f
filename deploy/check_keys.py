#!/usr/bin/env python3
"""Check that rendered agentq manifests agree with the code they deploy.

Usage: check_keys.py [--keys-json JSON] [--redis-password PASSWORD] RENDERED.yaml...

For each rendered file:
  * the KEDA ScaledObject's trigger named "pending" is a `redis` trigger whose listName is exactly the
    pending LIST key the code uses, and the trigger named "inflight" reads exactly the code's active
    ZSET key (KEDA's redis scaler runs ZCARD on a zset), for the AGENTQ_KEY_PREFIX / AGENTQ_QUEUE the
    pods get from the rendered ConfigMap;
  * no trigger reads the delayed or throttled ZSET: work that cannot run yet stays out of the replica
    count (it is promoted into pending when due);
  * every redis trigger uses only metadata keys KEDA's redis scaler knows, every value is a string,
    and scalingModifiers.formula references exactly the trigger names;
  * the worker's terminationGracePeriodSeconds is larger than its AGENTQ_DRAIN_TIMEOUT_SECS, as the
    pod really sees it (container env first, then envFrom ConfigMaps), and the api's is larger than
    its preStop pause;
  * REDIS_URL as the api and worker containers get it (Secret values from the rendered Secrets, then
    the kubelet's $(VAR) expansion) is a well-formed redis:// or rediss:// URL whose password
    percent-decodes to the very password redis-server and KEDA's TriggerAuthentication use (and to
    --redis-password when given; with Redis ACL users each component has its own password, which
    check_security.py compares); in cluster mode REDIS_CLUSTER_NODES instead (and no REDIS_URL):
    1 to 64 such seed URLs without a database, one scheme and user, and KEDA's triggers are of type
    redis-cluster with `addresses` = exactly the seeds' host:port, in order;
  * every agentq_* metric named in the PrometheusRule and the Grafana dashboard is one the code exports;
  * per worker Deployment (the main one, and <rel>-worker-batch when batch.queue is set): its own
    ScaledObject whose triggers read that Deployment's AGENTQ_QUEUE keys, grace vs drain, and
    exactly one headless Service, PodDisruptionBudget, ServiceMonitor and NetworkPolicy that select
    its pods and no other workload's (no Deployment's selector takes another's pods), and the Redis
    NetworkPolicy admits its pods;
  * the api's queues as ApiConfig reads them: AGENTQ_BATCH_QUEUE (default AGENTQ_QUEUE) is declared
    (AGENTQ_QUEUE + AGENTQ_QUEUES), every declared queue is served by a worker Deployment and every
    worker's queue is declared, and the Batch API limits (AGENTQ_FILE_*, AGENTQ_BATCH*) are integers
    inside the ranges common/src/config.rs accepts (parsed from its `ranged(...)` calls).

The code's key names come from `cargo run -q -p agentq-common --example keys -- <prefix> <queue>`
(JSON: {"pending": ..., "active": ..., ...}). If that example does not exist yet, or cargo is not
installed, the documented layout `<prefix>:{<queue>}:<name>` is used and a WARN line says so.
--keys-json (or AGENTQ_KEYS_JSON) gives the JSON directly, for a known prefix/queue pair.

check_keys.py --cluster-vs SINGLE.yaml CLUSTER.yaml compares a cluster-mode render with the
single-node render of the same values: the same ScaledObjects, every trigger of the cluster render
of type redis-cluster (never redis) naming all seed addresses of REDIS_CLUSTER_NODES, and the same
listName ({queue} keys), listLength and activationListLength per trigger as the single-node render.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

# Metadata keys the KEDA redis scaler (types redis, redis-cluster, redis-sentinel) reads
# (pkg/scalers/redis_scaler.go, typed config); "<key>FromEnv" reads the value from the target's env.
REDIS_SCALER_KEYS = {
    "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl",
    "address", "addresses", "host", "hosts", "port", "ports", "username", "password",
    "sentinelUsername", "sentinelPassword", "sentinelMaster",
}
REDIS_SCALER_FROM_ENV = {
    f"{k}FromEnv" for k in (
        "address", "addresses", "host", "hosts", "port", "ports", "username", "password",
        "sentinelUsername", "sentinelPassword", "sentinelMaster",
    )
}
# Secrets must come through a TriggerAuthentication, never as literal metadata.
FORBIDDEN_LITERAL = {"password", "sentinelPassword"}

# Metrics the api and worker export (the documented interface). When common/src/metrics.rs is
# present, the names registered there are the truth instead.
DOCUMENTED_METRICS = {
    "agentq_tasks_enqueued_total", "agentq_tasks_total", "agentq_task_duration_seconds",
    "agentq_active_tasks", "agentq_queue_depth", "agentq_queue_oldest_age_seconds",
    "agentq_llm_requests_total", "agentq_llm_request_duration_seconds", "agentq_llm_tokens_total",
    "agentq_llm_cost_dollars_total", "agentq_worker_draining", "agentq_http_requests_total",
    "agentq_http_request_duration_seconds",
    # budgets: api gauges per scope, worker counters
    "agentq_budget_spent_dollars", "agentq_budget_reserved_dollars", "agentq_budget_limit_dollars",
    "agentq_budget_refusals_total", "agentq_agent_cost_dollars_total",
}
METRIC_RE = re.compile(r"\bagentq_[a-z0-9_]+")

_keys_cache: dict[tuple[str, str], dict] = {}


def code_keys(prefix: str, queue: str, override: str | None, root: Path) -> tuple[dict, str]:
    """Key names as the code builds them, and where they came from."""
    if override:
        return json.loads(override), "given JSON"
    if (prefix, queue) in _keys_cache:
        return _keys_cache[(prefix, queue)], "cargo example keys (cached)"
    fallback = {n: f"{prefix}:{{{queue}}}:{n}" for n in ("pending", "active", "delayed", "throttled", "dead")}
    if shutil.which("cargo") is None:
        return fallback, "WARN cargo not found: documented layout <prefix>:{<queue>}:<name>"
    cmd = ["cargo", "run", "-q", "-p", "agentq-common", "--example", "keys", "--", prefix, queue]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        missing = ("no example target named" in proc.stderr
                   or "package(s) `agentq-common` not found" in proc.stderr
                   or "did not match any packages" in proc.stderr)
        if missing:
            return fallback, ("WARN `cargo run -p agentq-common --example keys` does not exist yet: "
                              "documented layout <prefix>:{<queue>}:<name>")
        raise SystemExit(f"check_keys: {' '.join(cmd)} failed:\n{proc.stderr}")
    keys = json.loads(proc.stdout)
    _keys_cache[(prefix, queue)] = keys
    return keys, "cargo run -p agentq-common --example keys"


def known_metrics(root: Path) -> tuple[set[str], str]:
    """Metric names the code registers, or the documented list when the source is not there."""
    src = root / "common" / "src" / "metrics.rs"
    if src.is_file():
        names = set(re.findall(r'"(agentq_[a-z0-9_]+)"', src.read_text()))
        if names:
            return names, str(src.relative_to(root))
    return set(DOCUMENTED_METRICS), "the documented metric list"


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(docs: list[dict], kind: str, name_suffix: str = "") -> list[dict]:
    return [d for d in docs if d.get("kind") == kind
            and d["metadata"]["name"].endswith(name_suffix)]


def secret_value(docs: list[dict], name: str, key: str) -> str | None:
    """A value of a rendered Secret (data is base64, stringData plain); None when not rendered."""
    for sec in find(docs, "Secret"):
        if sec["metadata"]["name"] != name:
            continue
        if key in (sec.get("stringData") or {}):
            return sec["stringData"][key]
        if key in (sec.get("data") or {}):
            return base64.b64decode(sec["data"][key]).decode()
    return None


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) expansion as the kubelet does it for env values: a defined VAR is replaced, an
    undefined one is left as it is, and $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_env(docs: list[dict], pod_spec: dict, container: dict) -> dict[str, str]:
    """The env a container sees: envFrom ConfigMaps first, then env entries override (with the
    kubelet's $(VAR) expansion and the values of rendered Secrets)."""
    env: dict[str, str] = {}
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in find(docs, "ConfigMap")}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            if ref["name"] not in configmaps:
                raise AssertionError(f"envFrom ConfigMap {ref['name']} is not rendered")
            env.update(configmaps[ref["name"]])
    for e in container.get("env", []):
        source = e.get("valueFrom") or {}
        if "value" in e:
            env[e["name"]] = kubelet_expand(e["value"], env)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_value(docs, ref["name"], ref["key"])
            if value is not None:
                env[e["name"]] = value
        else:
            env[e["name"]] = "<from field>"
    return env


def acl_users(docs: list[dict]) -> bool:
    """True with redisAcl.enabled: api, worker and KEDA log in as their own users with their own
    passwords (deploy/check_security.py checks those); only the default user's is compared here."""
    return bool(find(docs, "ConfigMap", "-redis-acl"))


def redis_passwords(docs: list[dict]) -> dict[str, str]:
    """The plain Redis password as redis-server (its Secret volume) and KEDA read it, where rendered."""
    found: dict[str, str] = {}
    for sts in find(docs, "StatefulSet", "-redis"):
        for vol in sts["spec"]["template"]["spec"].get("volumes", []):
            sec = vol.get("secret")
            for item in (sec or {}).get("items", []):
                value = secret_value(docs, sec["secretName"], item["key"])
                if item["path"] == "password" and value is not None:
                    found["redis-server"] = value
    for auth in find(docs, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            value = secret_value(docs, ref["name"], ref["key"])
            if ref["parameter"] == "password" and value is not None:
                found["KEDA TriggerAuthentication"] = value
    return found


URL_SAFE = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})*")


def check_redis_url(docs: list[dict], want_password: str | None, expect) -> None:
    """REDIS_URL of api and worker: parses, and its password decodes to the one Redis uses (with
    ACL users, each component's own: check_security.py compares those)."""
    plain = {} if acl_users(docs) else redis_passwords(docs)
    if want_password is not None:
        expect(bool(plain), "--redis-password given, but no rendered Secret holds the Redis password")
        plain["--redis-password"] = want_password
    for dep in find(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for container in pod["containers"]:
            env = container_env(docs, pod, container)
            name = f"{dep['metadata']['name']}/{container['name']}"
            if "REDIS_CLUSTER_NODES" in env:
                expect("REDIS_URL" not in env, f"{name}: REDIS_URL beside REDIS_CLUSTER_NODES (the pods ignore it)")
                seeds = env["REDIS_CLUSTER_NODES"].split(",")
                expect(1 <= len(seeds) <= 64, f"{name}: REDIS_CLUSTER_NODES has {len(seeds)} seeds, want 1 to 64")
                heads = {urlsplit(u).scheme + "://" + urlsplit(u).netloc.rpartition("@")[0] for u in seeds}
                expect(len(heads) == 1, f"{name}: the REDIS_CLUSTER_NODES seeds disagree on scheme or credentials")
                urls = [(f"{name} REDIS_CLUSTER_NODES seed {i + 1}", u, r"") for i, u in enumerate(seeds)]
            elif "REDIS_URL" in env:
                urls = [(f"{name} REDIS_URL", env["REDIS_URL"], r"/\d+")]
            else:
                continue
            for who, url, path_re in urls:
                check_one_url(who, url, path_re, plain, expect)


def check_one_url(who: str, url: str, path_re: str, plain: dict[str, str], expect) -> None:
    """One Redis URL (REDIS_URL, or a seed of REDIS_CLUSTER_NODES: path_re "" = no database)."""
    if "$(" in url:
        print(f"  {who}: password from a Secret that is not rendered (existing Secret), not decoded")
        return
    parts = urlsplit(url)
    expect(parts.scheme in ("redis", "rediss") and bool(parts.hostname) and parts.port is not None
           and re.fullmatch(path_re, parts.path) is not None and not parts.query and not parts.fragment,
           f"{who} is not scheme://[user[:password]@]host:port{'/db' if path_re else ''} once expanded")
    if parts.password is None:
        print(f"  {who}: no password")
        return
    expect(URL_SAFE.fullmatch(parts.password) is not None,
           f"{who}: the password part is not percent-encoded")
    decoded = unquote(parts.password, errors="strict")
    for source, value in plain.items():
        expect(decoded == value, f"{who}: the password decodes to {decoded!r}, but {source} has {value!r}")
    print(f"  {who}: host {parts.hostname}:{parts.port}{parts.path}, password percent-decodes to the one "
          f"{' and '.join(plain) or 'in the URL'} ({len(decoded)} characters)")


def seed_addresses(nodes: str) -> list[str]:
    """host:port of each seed URL of REDIS_CLUSTER_NODES, in order (the password may still be a $(VAR))."""
    return [u.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0] for u in nodes.split(",")]


def compare_cluster(single_path: Path, cluster_path: Path) -> list[str]:
    """A cluster-mode render against the single-node render of the same values: the same
    ScaledObjects and triggers, each trigger of the cluster render a redis-cluster one naming every
    seed of the worker's REDIS_CLUSTER_NODES, with the same {queue} keys and thresholds."""
    errors: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(f"{cluster_path.name} vs {single_path.name}: {msg}")

    single, cluster = docs_of(single_path), docs_of(cluster_path)
    envs = {}
    for dep in worker_deployments(cluster):
        pod = dep["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "worker")
        envs[dep["metadata"]["name"]] = container_env(cluster, pod, container)
    for name, env in envs.items():
        expect("REDIS_CLUSTER_NODES" in env and "REDIS_URL" not in env,
               f"worker {name} is not in cluster mode (REDIS_CLUSTER_NODES without REDIS_URL)")
    for dep in find(single, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            expect("REDIS_CLUSTER_NODES" not in {e["name"] for e in c.get("env", [])},
                   f"the single-node render's {dep['metadata']['name']} has REDIS_CLUSTER_NODES")
    so_single = {so["metadata"]["name"]: so for so in find(single, "ScaledObject")}
    so_cluster = {so["metadata"]["name"]: so for so in find(cluster, "ScaledObject")}
    expect(bool(so_cluster), "no ScaledObject in the cluster render")
    expect(set(so_single) == set(so_cluster),
           f"ScaledObjects differ: single {sorted(so_single)}, cluster {sorted(so_cluster)}")
    for name in sorted(set(so_single) & set(so_cluster)):
        ts = {t["name"]: t for t in so_single[name]["spec"]["triggers"]}
        tc = {t["name"]: t for t in so_cluster[name]["spec"]["triggers"]}
        expect(set(ts) == set(tc), f"{name}: triggers differ: {sorted(ts)} vs {sorted(tc)}")
        env = envs.get(so_cluster[name]["spec"]["scaleTargetRef"]["name"], {})
        seeds = seed_addresses(env.get("REDIS_CLUSTER_NODES", ""))
        for tname in sorted(set(ts) & set(tc)):
            a, b = ts[tname], tc[tname]
            if a["type"] != "redis":
                expect(a == b, f"{name}: the non-Redis trigger {tname} differs")
                continue
            expect(b["type"] == "redis-cluster", f"{name}: trigger {tname} has type {b['type']}, want redis-cluster")
            ma, mb = a["metadata"], b["metadata"]
            addresses = mb.get("addresses", "").split(",")
            expect(addresses == seeds, f"{name}: trigger {tname} addresses {addresses} != the seeds {seeds}")
            for k in ("listName", "listLength", "activationListLength", "enableTLS", "username"):
                expect(ma.get(k) == mb.get(k), f"{name}: trigger {tname} {k} {mb.get(k)!r} != single-node {ma.get(k)!r}")
            expect(re.fullmatch(r"[^{}]+:\{[^{}]+\}:[a-z_]+", mb.get("listName", "")) is not None,
                   f"{name}: trigger {tname} listName {mb.get('listName')!r} carries no {{queue}} hash tag")
            expect(a.get("authenticationRef") == b.get("authenticationRef"),
                   f"{name}: trigger {tname} authenticationRef differs")
        if not errors:
            keys = ", ".join(f"{t} {tc[t]['metadata'].get('listName')}" for t in sorted(tc) if tc[t]["type"] == "redis-cluster")
            print(f"  ScaledObject {name}: redis-cluster triggers {keys} on all {len(seeds)} seeds; "
                  f"the same keys and thresholds as {single_path.name}")
    return errors


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions; or a plain map, as a Service's selector) against labels."""
    if not selector:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], [str(v) for v in e.get("values") or []]
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def workloads(docs: list[dict]) -> dict[str, dict]:
    """Pod labels of every Deployment and StatefulSet, by "<Kind>/<name>"."""
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["metadata"].get("labels") or {}
            for d in docs if d.get("kind") in ("Deployment", "StatefulSet")}


def worker_deployments(docs: list[dict]) -> list[dict]:
    """Deployments that run /usr/local/bin/agentq-worker (the main fleet and a batch queue's)."""
    return [d for d in find(docs, "Deployment")
            if any("agentq-worker" in " ".join(c.get("command") or []) for c in d["spec"]["template"]["spec"]["containers"])]


# Batch API limits: env name -> (min, max) as ApiConfig accepts them; common/src/config.rs wins when present.
BATCH_LIMITS = {
    "AGENTQ_FILE_MAX_BYTES": (1024, 1 << 40), "AGENTQ_BATCH_MAX_REQUESTS": (1, 10_000_000),
    "AGENTQ_FILE_TTL_SECS": (60, 365 * 86_400), "AGENTQ_FILES_MAX_TOTAL_BYTES": (1024, 1 << 44),
    "AGENTQ_BATCHES_MAX": (1, 1_000_000),
}


def code_ranges(root: Path) -> tuple[dict[str, tuple[int, int]], str]:
    """The (min, max) of each `ranged(env, ENV_X, default, min, max)` in common/src/config.rs, by env name."""
    src = root / "common" / "src" / "config.rs"
    if not src.is_file():
        return dict(BATCH_LIMITS), "the documented ranges"
    text = src.read_text()
    names = dict(re.findall(r'pub const (ENV_\w+): &str = "(\w+)";', text))
    num = r"([0-9_]+(?:\s*(?:<<|\*)\s*[0-9_]+)?)"
    out: dict[str, tuple[int, int]] = {}
    call = r"ranged\(\s*env,\s*(ENV_\w+),\s*[^,]+,\s*" + num + r",\s*" + num + r",?\s*\)"
    for const, lo, hi in re.findall(call, text):
        if const in names:
            out[names[const]] = (eval(lo), eval(hi))  # integer literals with << and * only (matched above)
    return out, str(src.relative_to(root))


def check_queues(docs: list[dict], workers: list[tuple[dict, dict]], root: Path, expect) -> None:
    """The api's declared queues and batch queue against the worker Deployments, and its batch limits."""
    served = {env.get("AGENTQ_QUEUE", "default"): dep["metadata"]["name"] for dep, env in workers}
    expect(len(served) == len(workers),
           f"two worker Deployments serve one queue: {[e.get('AGENTQ_QUEUE') for _, e in workers]}")
    ranges, ranges_from = code_ranges(root)
    for api in find(docs, "Deployment", "-api"):
        pod = api["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "api")
        env = container_env(docs, pod, container)
        default = env.get("AGENTQ_QUEUE", "default")
        declared = {default} | {q.strip() for q in env.get("AGENTQ_QUEUES", default).split(",") if q.strip()}
        batch_queue = env.get("AGENTQ_BATCH_QUEUE", default)
        expect(batch_queue in declared, f"api AGENTQ_BATCH_QUEUE {batch_queue!r} is not declared "
                                        f"(AGENTQ_QUEUE + AGENTQ_QUEUES = {sorted(declared)})")
        expect(batch_queue in served,
               f"api AGENTQ_BATCH_QUEUE {batch_queue!r} is served by no worker Deployment ({served})")
        for q in sorted(declared - set(served)):
            expect(False, f"api declares queue {q!r}, which no worker Deployment serves ({served})")
        for q in sorted(set(served) - declared):
            expect(False, f"worker Deployment {served[q]} serves {q!r}, which the api does not accept "
                          f"(declared {sorted(declared)})")
        for name, (lo, hi) in sorted(BATCH_LIMITS.items()):
            lo, hi = ranges.get(name, (lo, hi))
            value = env.get(name)
            expect(value is not None and value.isdigit() and lo <= int(value) <= hi,
                   f"api {name}={value!r} is not an integer in [{lo}, {hi}] ({ranges_from})")
        print(f"  api: declared queues {sorted(declared)}, batch queue {batch_queue!r} served by "
              f"{served.get(batch_queue)}; batch limits in the ranges of {ranges_from}")


def check_selection(docs: list[dict], workers: list[tuple[dict, dict]], expect) -> None:
    """Each worker Deployment has its own Service, PDB, ServiceMonitor and NetworkPolicy, none of which
    takes another workload's pods; the Redis NetworkPolicy lets its pods in."""
    pods = workloads(docs)
    for dep in find(docs, "Deployment"):
        me = f"Deployment/{dep['metadata']['name']}"
        for other, labels in pods.items():
            if other != me:
                expect(not selects(dep["spec"]["selector"], labels),
                       f"{me}'s selector matches the pods of {other}")
    services = find(docs, "Service")
    monitors = find(docs, "ServiceMonitor")
    pdbs = find(docs, "PodDisruptionBudget")
    policies = find(docs, "NetworkPolicy")
    worker_pods = [pods[f"Deployment/{d['metadata']['name']}"] for d, _ in workers]
    worker_pdbs = [p for p in pdbs if any(selects(p["spec"]["selector"], labels) for labels in worker_pods)]
    redis_pods = [labels for w, labels in pods.items() if w.startswith("StatefulSet/") and w.endswith("-redis")]
    summary = []
    for dep, _ in workers:
        me = f"Deployment/{dep['metadata']['name']}"
        mine = pods[me]
        for kind, objs, sel, required in (
            ("Service", services, lambda o: o["spec"].get("selector"), True),
            ("PodDisruptionBudget", pdbs, lambda o: o["spec"]["selector"], bool(worker_pdbs)),
            ("NetworkPolicy", policies, lambda o: o["spec"]["podSelector"], bool(policies)),
        ):
            chosen = [o for o in objs if selects(sel(o), mine)]
            if required:
                expect(len(chosen) == 1, f"{me}: {len(chosen)} {kind}s select its pods, want 1")
            for o in chosen:
                others = [w for w, labels in pods.items() if w != me and selects(sel(o), labels)]
                expect(not others, f"{kind} {o['metadata']['name']} selects the pods of {me} and of {others}")
        svc = [s for s in services if selects(s["spec"].get("selector"), mine)]
        if monitors and svc:
            by = [m for m in monitors if selects(m["spec"]["selector"], svc[0]["metadata"].get("labels") or {})]
            expect(len(by) == 1,
                   f"{me}: {len(by)} ServiceMonitors select its Service {svc[0]['metadata']['name']}, want 1")
            for m in by:
                other_svcs = [s["metadata"]["name"] for s in services
                              if s is not svc[0] and selects(m["spec"]["selector"], s["metadata"].get("labels") or {})]
                expect(not other_svcs,
                       f"ServiceMonitor {m['metadata']['name']} selects {svc[0]['metadata']['name']} and {other_svcs}")
        for np in policies:
            if not any(selects(np["spec"]["podSelector"], labels) for labels in redis_pods):
                continue
            peers = [p.get("podSelector") for rule in np["spec"].get("ingress") or [] for p in rule.get("from") or []
                     if "podSelector" in p and "namespaceSelector" not in p]
            expect(any(selects(p, mine) for p in peers),
                   f"NetworkPolicy {np['metadata']['name']} does not let {me}'s pods reach Redis")
        summary.append(dep["metadata"]["name"])
    print(f"  selection: {', '.join(summary)}: one Service{', PDB' if worker_pdbs else ''}"
          f"{', ServiceMonitor' if monitors else ''}{', NetworkPolicy (and Redis ingress)' if policies else ''}"
          " each, no selector across workloads")


def check_file(path: Path, override: str | None, root: Path, redis_password: str | None = None) -> list[str]:
    errors: list[str] = []
    docs = docs_of(path)

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(f"{path.name}: {msg}")

    main = find(docs, "Deployment", "-worker")
    expect(len(main) == 1, f"expected one main worker Deployment (<rel>-worker), found {len(main)}")
    workers = []
    for dep in worker_deployments(docs):
        pod = dep["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "worker")
        workers.append((dep, container_env(docs, pod, container)))
    if not workers:
        return errors

    # --- grace vs drain -------------------------------------------------------------------
    for dep, env in workers:
        pod = dep["spec"]["template"]["spec"]
        who = dep["metadata"]["name"]
        drain = env.get("AGENTQ_DRAIN_TIMEOUT_SECS")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        expect(drain is not None and drain.isdigit(), f"{who} AGENTQ_DRAIN_TIMEOUT_SECS missing or not an integer: {drain!r}")
        if drain is not None and drain.isdigit():
            expect(int(grace) > int(drain),
                   f"{who} terminationGracePeriodSeconds {grace} must exceed AGENTQ_DRAIN_TIMEOUT_SECS {drain}")
            print(f"  grace: {who} terminationGracePeriodSeconds {grace} > AGENTQ_DRAIN_TIMEOUT_SECS {drain}")
    for api in find(docs, "Deployment", "-api"):
        api_pod = api["spec"]["template"]["spec"]
        api_grace = api_pod.get("terminationGracePeriodSeconds", 30)
        for c in api_pod["containers"]:
            pause = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
            if pause is not None:
                expect(int(api_grace) > int(pause),
                       f"api terminationGracePeriodSeconds {api_grace} must exceed its preStop sleep {pause}")
                print(f"  api: preStop sleep {pause} s < terminationGracePeriodSeconds {api_grace}")

    # --- REDIS_URL as the pods see it ---------------------------------------------------------
    check_redis_url(docs, redis_password, expect)

    # --- queues, batch queue and limits; per-Deployment objects -----------------------------
    check_queues(docs, workers, root, expect)
    check_selection(docs, workers, expect)

    # --- KEDA triggers vs code keys ---------------------------------------------------------
    scaled = find(docs, "ScaledObject")
    if not scaled:
        print(f"  keda: no ScaledObject in {path.name} (keda.enabled=false)")
    by_name = {dep["metadata"]["name"]: env for dep, env in workers}
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in scaled]
    if scaled:
        for name in by_name:
            expect(targets.count(name) == 1, f"worker Deployment {name} is the target of {targets.count(name)} ScaledObjects, want 1")
    for so in scaled:
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        expect(spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment" and target in by_name,
               f"ScaledObject {so['metadata']['name']} targets {target}, not a worker Deployment ({sorted(by_name)})")
        if target not in by_name:
            continue
        env = by_name[target]
        prefix = env.get("AGENTQ_KEY_PREFIX", "agentq")
        queue = env.get("AGENTQ_QUEUE", "default")
        keys, source = code_keys(prefix, queue, override, root)
        print(f"  ScaledObject {so['metadata']['name']} -> {target}: keys for prefix={prefix} queue={queue} from {source}: "
              f"pending={keys.get('pending')} active={keys.get('active')}")
        triggers = {t.get("name"): t for t in spec["triggers"]}
        for tname, code_key in (("pending", "pending"), ("inflight", "active")):
            t = triggers.get(tname)
            expect(t is not None, f"ScaledObject {so['metadata']['name']} has no trigger named {tname!r}")
            if t is None:
                continue
            want_type = "redis-cluster" if "REDIS_CLUSTER_NODES" in env else "redis"
            expect(t["type"] == want_type, f"trigger {tname} has type {t['type']}, want {want_type}")
            if "REDIS_CLUSTER_NODES" in env:
                seeds = seed_addresses(env["REDIS_CLUSTER_NODES"])
                md = t.get("metadata") or {}
                expect(md.get("addresses") == ",".join(seeds),
                       f"trigger {tname}: addresses {md.get('addresses')!r} are not the REDIS_CLUSTER_NODES seeds {seeds}")
                stray = {"address", "host", "hosts", "port", "ports", "databaseIndex"} & set(md)
                expect(not stray, f"trigger {tname}: {sorted(stray)} beside addresses in cluster mode")
            want = keys.get(code_key)
            got = t["metadata"].get("listName")
            expect(want is not None, f"the code printed no {code_key!r} key")
            expect(got == want, f"ScaledObject {so['metadata']['name']}: trigger {tname} listName {got!r} != code's {code_key} key {want!r}")
            if got == want:
                print(f"  trigger {tname}: listName {got} == code {code_key} key")
        # Work that cannot run now stays out of the replica count: retrying tasks (delayed) and tasks
        # the flow limiter parked (throttled) are promoted into pending when due, by the workers and
        # by the api, so KEDA wakes a fleet at zero then and not earlier.
        waiting = {n: keys.get(n, f"{prefix}:{{{queue}}}:{n}") for n in ("delayed", "throttled")}
        for t in spec["triggers"]:
            for n, key in waiting.items():
                expect((t.get("metadata") or {}).get("listName") != key,
                       f"trigger {t.get('name')} reads the {n} key {key}: it must stay outside the scaling formula")
        print(f"  outside the formula: {', '.join(f'{n}={k}' for n, k in waiting.items())}")
        for t in spec["triggers"]:
            md = t.get("metadata", {})
            for k, v in md.items():
                expect(isinstance(v, str), f"trigger {t.get('name')}: metadata {k} must be a string, got {v!r}")
            if t["type"] in ("redis", "redis-cluster", "redis-sentinel"):
                unknown = set(md) - REDIS_SCALER_KEYS - REDIS_SCALER_FROM_ENV
                expect(not unknown, f"trigger {t.get('name')}: metadata keys unknown to KEDA's redis scaler: {sorted(unknown)}")
                literal = set(md) & FORBIDDEN_LITERAL
                expect(not literal, f"trigger {t.get('name')}: secret {sorted(literal)} given literally; use a TriggerAuthentication")
                expect("listName" in md, f"trigger {t.get('name')}: listName is required")
                has_addr = any(k in md for k in ("address", "addresses", "host", "hosts", "addressFromEnv", "hostFromEnv"))
                expect(has_addr, f"trigger {t.get('name')}: no address/host")
            if t["type"] == "prometheus" and "agentq_task_duration_seconds" in md.get("query", ""):
                expect(f'queue="{queue}"' in md["query"],
                       f"ScaledObject {so['metadata']['name']}: latency query {md['query']!r} is not for its queue {queue!r}")
        mods = (spec.get("advanced") or {}).get("scalingModifiers")
        expect(mods is not None, "ScaledObject has no advanced.scalingModifiers (pending + in-flight)")
        if mods:
            names = {t.get("name") for t in spec["triggers"]}
            used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", mods["formula"]))
            expect({"pending", "inflight"} <= used, f"formula {mods['formula']!r} must add pending and inflight")
            expect(names <= used, f"triggers {sorted(names - used)} are not in the formula {mods['formula']!r}")
            print(f"  formula: {mods['formula']} (target {mods.get('target')} per replica)")
        for t in spec["triggers"]:
            ref = (t.get("authenticationRef") or {}).get("name")
            if ref:
                expect(bool(find(docs, "TriggerAuthentication", ref)),
                       f"trigger {t.get('name')} references TriggerAuthentication {ref}, which is not rendered")

    # --- metric names in alerts and dashboard -----------------------------------------------
    texts = []
    for rule in find(docs, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            texts += [r["expr"] for r in group["rules"]]
    for cm in find(docs, "ConfigMap", "-dashboard"):
        for body in (cm.get("data") or {}).values():
            dash = json.loads(body)  # must be valid JSON
            texts.append(json.dumps(dash))
    known, known_from = known_metrics(root)
    used: set[str] = set()
    for text in texts:
        used |= set(METRIC_RE.findall(text))
    for metric in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        expect(metric in known or base in known, f"metric {metric} (alerts/dashboard) is not exported ({known_from})")
    if used:
        print(f"  metrics: {len(used)} names in alerts/dashboard, all in {known_from}")
    return errors


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys-json", default=os.environ.get("AGENTQ_KEYS_JSON"))
    parser.add_argument("--redis-password", help="the Redis password the renders were given")
    parser.add_argument("--cluster-vs", action="store_true",
                        help="compare SINGLE.yaml CLUSTER.yaml (pairs of renders) instead")
    parser.add_argument("rendered", nargs="+", type=Path)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    all_errors: list[str] = []
    if args.cluster_vs:
        if len(args.rendered) % 2:
            parser.error("--cluster-vs takes pairs: SINGLE.yaml CLUSTER.yaml ...")
        pairs = list(zip(args.rendered[::2], args.rendered[1::2]))
        for single, cluster in pairs:
            print(f"{cluster.name} vs {single.name}:")
            try:
                all_errors += compare_cluster(single, cluster)
            except (AssertionError, KeyError, StopIteration) as exc:
                all_errors.append(f"{cluster.name}: {type(exc).__name__}: {exc}")
        for e in all_errors:
            print(f"FAIL {e}")
        print(f"check_keys --cluster-vs: {len(pairs)} pairs compared, {len(all_errors)} errors")
        return 1 if all_errors else 0
    for path in args.rendered:
        print(f"{path.name}:")
        try:
            all_errors += check_file(path, args.keys_json, root, args.redis_password)
        except (AssertionError, KeyError, StopIteration, json.JSONDecodeError) as exc:
            all_errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
    for e in all_errors:
        print(f"FAIL {e}")
    print(f"check_keys: {len(args.rendered)} renders checked, {len(all_errors)} errors")
    return 1 if all_errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
