#!/usr/bin/env python3
"""Replays KEDA + the HPA against real agentq-worker processes.

The scaling parameters come from the Helm chart: it is rendered with `helm template` and the
worker ScaledObject, the Deployment it targets and that Deployment's ConfigMap are read (if helm
is missing, values.yaml is read instead). Every `pollingInterval` this program does what the KEDA
operator does (read each redis trigger with KEDA's own TYPE -> LLEN/ZCARD script, evaluate the
scalingModifiers formula, activation, 0 <-> 1 and cooldown), every HPA sync period (15 s, random
phase) what the HPA controller does (AverageValue ratio with 0.1 tolerance, min/max, behavior
stabilization windows and rate policies, or the legacy max(2*cur, 4) limit and 5-minute
scale-down stabilization when no behavior is set), and in between what the ReplicaSet and the
kubelet do: start worker processes, or pick victims (not ready first, then most recently ready,
then newest) and SIGTERM them, SIGKILL at terminationGracePeriodSeconds.

Rules as in KEDA's pkg/scaling/executor and the HPA controller (kubernetes
pkg/controller/podautoscaler); the chart README's "The math" section sums them up. All chart durations are divided by --time-scale so a run fits in
CI; single windows can be overridden in real seconds.

While the load command given after `--` runs (k6 spike.js) and until the fleet has settled, it
samples the queue and the fleet into a CSV, then draws a PNG and checks: backlog cleared,
replicas rose above the floor and came back to it, every stopped worker exited 0 (no SIGKILL).
Exit 0 when all hold, 1 otherwise, 2 on a usage or set-up error.

When the chart renders an upstreams file (upstreams.config), the workers get it as AGENTQ_UPSTREAMS,
localized (every base_url the mock's, --write-upstreams writes it for the api), and the limits of
--model's upstream become a provider quota to check against: the calls per second and the useful
replicas of the chart README's "Scaling under a provider's rate limit" (--llm-latency-ms), the
throttled set sampled next to the queue, and the quota checks (run.sh --scenario quota).

Python 3.11 with PyYAML and redis (the redis-py client, pinned by run.sh); matplotlib for the chart.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml

# Kubernetes controller defaults (kube-controller-manager flags).
HPA_SYNC_SECONDS = 15.0
HPA_TOLERANCE = 0.1
HPA_LEGACY_DOWNSCALE_WINDOW = 300.0
KEDA_DEFAULT_POLLING = 30.0
KEDA_DEFAULT_COOLDOWN = 300.0
DEFAULT_GRACE = 30.0

# KEDA's redis scaler reads a key by its type with this script (pkg/scalers/redis_scaler.go).
KEDA_LENGTH_SCRIPT = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = { zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen' }
return redis.call(cmd[listType], listName)
"""


def log(msg: str) -> None:
    print(f"[replay {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The formula of advanced.scalingModifiers: a small subset of expr-lang (numbers, trigger names,
# + - * / %, comparisons, && || !, ?:, parentheses).


class Formula:
    TOKEN = re.compile(r"\s*(\d+\.?\d*|\.\d+|[A-Za-z_][A-Za-z0-9_]*|==|!=|>=|<=|&&|\|\||[-+*/%()<>?:!])")

    def __init__(self, text: str):
        self.text = text
        self.tokens = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = self.TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"cannot parse formula {self.text!r} at {text[pos:]!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i = 0
        self.tree = self._ternary()
        if self.i != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.i]!r} in formula {self.text!r}")
        self.names = sorted({t for t in self.tokens if re.match(r"[A-Za-z_]", t) and t not in ("and", "or", "not")})

    def _peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, want=None):
        t = self._peek()
        if t is None or (want is not None and t != want):
            raise ValueError(f"expected {want or 'a value'} in formula {self.text!r}")
        self.i += 1
        return t

    def _ternary(self):
        cond = self._binary(0)
        if self._peek() == "?":
            self._take("?")
            a = self._ternary()
            self._take(":")
            b = self._ternary()
            return ("?", cond, a, b)
        return cond

    LEVELS = [("||", "or"), ("&&", "and"), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"), ("*", "/", "%")]

    def _binary(self, level):
        if level == len(self.LEVELS):
            return self._unary()
        left = self._binary(level + 1)
        while self._peek() in self.LEVELS[level]:
            op = self._take()
            left = (op, left, self._binary(level + 1))
        return left

    def _unary(self):
        t = self._peek()
        if t in ("-", "!", "not"):
            self._take()
            return ("neg" if t == "-" else "!", self._unary())
        if t == "(":
            self._take("(")
            e = self._ternary()
            self._take(")")
            return e
        t = self._take()
        if re.match(r"[\d.]", t):
            return ("num", float(t))
        return ("var", t)

    def eval(self, env: dict[str, float]) -> float:
        return float(self._ev(self.tree, env))

    def _ev(self, n, env):
        op = n[0]
        if op == "num":
            return n[1]
        if op == "var":
            if n[1] not in env:
                raise ValueError(f"formula uses {n[1]!r}, which is not a trigger this replay can read")
            return env[n[1]]
        if op == "neg":
            return -self._ev(n[1], env)
        if op == "!":
            return not self._ev(n[1], env)
        if op == "?":
            return self._ev(n[2], env) if self._ev(n[1], env) else self._ev(n[3], env)
        a, b = self._ev(n[1], env), self._ev(n[2], env)
        return {
            "+": lambda: a + b,
            "-": lambda: a - b,
            "*": lambda: a * b,
            "/": lambda: a / b if b else math.inf,
            "%": lambda: a % b if b else math.nan,
            "<": lambda: a < b,
            ">": lambda: a > b,
            "<=": lambda: a <= b,
            ">=": lambda: a >= b,
            "==": lambda: a == b,
            "!=": lambda: a != b,
            "&&": lambda: bool(a) and bool(b),
            "and": lambda: bool(a) and bool(b),
            "||": lambda: bool(a) or bool(b),
            "or": lambda: bool(a) or bool(b),
        }[op]()


# ---------------------------------------------------------------------------------------------
# What the chart declares.


@dataclass
class Policy:
    kind: str  # Pods | Percent
    value: int
    period: float  # seconds (compressed)


@dataclass
class Rules:
    window: float
    select: str  # Max | Min | Disabled
    policies: list[Policy]


@dataclass
class Trigger:
    name: str
    key: str
    target: float  # listLength
    activation: float  # activationListLength


@dataclass
class Setup:
    source: str
    polling: float
    cooldown: float
    min_replicas: int
    max_replicas: int
    triggers: list[Trigger]
    formula: Formula | None
    target: float
    activation_target: float
    metric_type: str
    behavior: dict[str, Rules] | None
    grace: float
    drain_timeout: int
    worker_env: dict[str, str]
    hpa_sync: float = HPA_SYNC_SECONDS
    # The AGENTQ_UPSTREAMS file the chart renders from upstreams.config (parsed), if any.
    upstreams: dict | None = None
    legacy_window: float = HPA_LEGACY_DOWNSCALE_WINDOW

    @property
    def hpa_min(self) -> int:
        return max(1, self.min_replicas)

    @property
    def floor(self) -> int:
        """Replicas once idle: 0 after the cooldown when minReplicaCount is 0."""
        return self.min_replicas


def _rules(raw: dict | None, up: bool) -> Rules:
    """autoscaling/v2 defaulting of one direction of HorizontalPodAutoscalerBehavior."""
    raw = raw or {}
    if up:
        window = raw.get("stabilizationWindowSeconds", 0)
        default = [Policy("Pods", 4, 15), Policy("Percent", 100, 15)]
    else:
        window = raw.get("stabilizationWindowSeconds", 300)
        default = [Policy("Percent", 100, 15)]
    pols = [Policy(p["type"], int(p["value"]), float(p["periodSeconds"])) for p in raw.get("policies") or []]
    return Rules(float(window), raw.get("selectPolicy", "Max"), pols or default)


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def setup_from_rendered(docs: list[dict], source: str) -> Setup:
    so = next((d for d in docs if d.get("kind") == "ScaledObject"), None)
    if so is None:
        raise SystemExit("the rendered chart has no ScaledObject (keda.enabled=false?)")
    spec = so["spec"]
    target_name = spec["scaleTargetRef"]["name"]
    dep = next(
        (d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == target_name), None
    )
    if dep is None:
        raise SystemExit(f"ScaledObject targets Deployment {target_name!r}, which the chart does not render")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env: dict[str, str] = {}
    for ef in container.get("envFrom") or []:
        ref = (ef.get("configMapRef") or {}).get("name")
        cm = next(
            (d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == ref), None
        )
        if cm:
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
    upstreams = None
    if env.get("AGENTQ_UPSTREAMS"):
        cm = next(
            (d for d in docs if d.get("kind") == "ConfigMap" and "upstreams.yaml" in (d.get("data") or {})), None
        )
        if cm is None:
            raise SystemExit("the worker has AGENTQ_UPSTREAMS but the chart renders no upstreams.yaml ConfigMap")
        upstreams = yaml.safe_load(cm["data"]["upstreams.yaml"])
    advanced = spec.get("advanced") or {}
    mods = advanced.get("scalingModifiers") or {}
    behavior_raw = (advanced.get("horizontalPodAutoscalerConfig") or {}).get("behavior")
    triggers = []
    for i, t in enumerate(spec.get("triggers") or []):
        if t.get("type") not in ("redis", "redis-cluster"):
            log(f"trigger {t.get('name') or i} of type {t.get('type')} is not replayed (value 0)")
            triggers.append(Trigger(t.get("name") or f"s{i}", "", 0, 0))
            continue
        md = t["metadata"]
        triggers.append(
            Trigger(
                t.get("name") or f"s{i}",
                md["listName"],
                float(md.get("listLength", 5)),
                float(md.get("activationListLength", 0)),
            )
        )
    return Setup(
        source=source,
        polling=float(spec.get("pollingInterval", KEDA_DEFAULT_POLLING)),
        cooldown=float(spec.get("cooldownPeriod", KEDA_DEFAULT_COOLDOWN)),
        min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        triggers=triggers,
        formula=Formula(mods["formula"]) if mods.get("formula") else None,
        target=float(mods.get("target", 0) or 0),
        activation_target=float(mods.get("activationTarget", 0) or 0),
        metric_type=mods.get("metricType", "AverageValue"),
        behavior=None
        if behavior_raw is None
        else {"up": _rules(behavior_raw.get("scaleUp"), True), "down": _rules(behavior_raw.get("scaleDown"), False)},
        grace=float(pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE)),
        drain_timeout=int(env.get("AGENTQ_DRAIN_TIMEOUT_SECS", 100)),
        worker_env=env,
        upstreams=upstreams,
    )


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(d: dict, path: str, value: str) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    v: object = value
    if re.fullmatch(r"-?\d+", value):
        v = int(value)
    elif value in ("true", "false"):
        v = value == "true"
    d[keys[-1]] = v


def setup_from_values(chart: Path, values_files: list[str], sets: list[str]) -> Setup:
    """Fallback without helm: the same objects the templates would render, from values.yaml."""
    vals = yaml.safe_load((chart / "values.yaml").read_text())
    for f in values_files:
        vals = _merge(vals, yaml.safe_load(Path(f).read_text()) or {})
    for s in sets:
        k, _, v = s.partition("=")
        _set_path(vals, k, v)
    k, w, c = vals["keda"], vals["worker"], vals["config"]
    target = k.get("listLength") or w["concurrency"]
    base = f"{c['keyPrefix']}:{{{c['queue']}}}"
    so = {
        "kind": "ScaledObject",
        "spec": {
            "scaleTargetRef": {"name": "worker"},
            "pollingInterval": k["pollingInterval"],
            "cooldownPeriod": k["cooldownPeriod"],
            "minReplicaCount": k["minReplicaCount"],
            "maxReplicaCount": k["maxReplicaCount"],
            "advanced": {
                "scalingModifiers": {
                    "formula": "pending + inflight",
                    "target": str(target),
                    "activationTarget": str(k.get("activationTarget", 0)),
                    "metricType": "AverageValue",
                },
                **({"horizontalPodAutoscalerConfig": {"behavior": k["behavior"]}} if k.get("behavior") else {}),
            },
            "triggers": [
                {"type": "redis", "name": "pending", "metadata": {"listName": f"{base}:pending", "listLength": str(target)}},
                {"type": "redis", "name": "inflight", "metadata": {"listName": f"{base}:active", "listLength": str(target)}},
            ],
        },
    }
    cm = {
        "kind": "ConfigMap",
        "metadata": {"name": "cm"},
        "data": {
            "AGENTQ_KEY_PREFIX": c["keyPrefix"],
            "AGENTQ_QUEUE": c["queue"],
            "AGENTQ_MAX_ATTEMPTS": str(c["maxAttempts"]),
            "AGENTQ_HEARTBEAT_SECS": str(c["heartbeatSeconds"]),
            "WORKER_CONCURRENCY": str(w["concurrency"]),
            "AGENTQ_DRAIN_TIMEOUT_SECS": str(w["drainTimeoutSeconds"]),
        },
    }
    extra = []
    ups = vals.get("upstreams") or {}
    if (ups.get("config") or {}).get("upstreams"):
        cm["data"]["AGENTQ_UPSTREAMS"] = f"{ups.get('mountPath', '/etc/agentq/upstreams')}/upstreams.yaml"
        text = yaml.safe_dump({"upstreams": ups["config"]["upstreams"]}, sort_keys=False)
        extra.append({"kind": "ConfigMap", "metadata": {"name": "upstreams"}, "data": {"upstreams.yaml": text}})
    dep = {
        "kind": "Deployment",
        "metadata": {"name": "worker"},
        "spec": {
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": w["drainTimeoutSeconds"] + w["terminationGraceMarginSeconds"],
                    "containers": [{"envFrom": [{"configMapRef": {"name": "cm"}}]}],
                }
            }
        },
    }
    return setup_from_rendered([so, cm, dep, *extra], f"{chart}/values.yaml (helm not found)")


def load_setup(args) -> Setup:
    chart = Path(args.chart)
    helm = args.helm or shutil.which("helm")
    if helm and Path(helm).exists():
        cmd = [helm, "template", "agentq", str(chart), "-n", "agentq", "--kube-version", "1.33.0",
               "--api-versions", "keda.sh/v1alpha1"]
        for f in args.values:
            cmd += ["-f", f]
        for s in args.set:
            cmd += ["--set", s]
        # The replay reads the worker's objects only; the api's admin-token Secret (auth.existingSecret,
        # which the chart requires while tokens are on) is named so the chart renders.
        if not any(s.startswith("auth.") for s in args.set):
            cmd += ["--set", "auth.existingSecret=agentq-admin"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"helm template failed:\n{res.stderr}")
        return setup_from_rendered(_docs(res.stdout), "helm template " + " ".join(cmd[2:4] + cmd[10:]))
    return setup_from_values(chart, args.values, args.set)


def compress(s: Setup, args) -> None:
    f = args.time_scale
    s.polling /= f
    s.cooldown /= f
    s.hpa_sync = HPA_SYNC_SECONDS / f
    s.legacy_window = HPA_LEGACY_DOWNSCALE_WINDOW / f
    s.grace /= f
    s.drain_timeout = max(1, round(s.drain_timeout / f))
    if s.behavior:
        for r in s.behavior.values():
            r.window /= f
            for p in r.policies:
                p.period /= f
    if args.polling_interval is not None:
        s.polling = args.polling_interval
    if args.hpa_sync is not None:
        s.hpa_sync = args.hpa_sync
    if args.cooldown is not None:
        s.cooldown = args.cooldown
    if args.scale_down_window is not None:
        s.legacy_window = args.scale_down_window
        if s.behavior:
            s.behavior["down"].window = args.scale_down_window
    if args.grace is not None:
        s.grace = args.grace
    # SIGKILL must not land inside the drain (the chart guarantees this before compression too).
    s.grace = max(s.grace, s.drain_timeout + 1)


def describe(s: Setup) -> str:
    lines = [
        f"chart: {s.source}",
        f"  KEDA: pollingInterval {s.polling:g}s, cooldownPeriod {s.cooldown:g}s, replicas {s.min_replicas}..{s.max_replicas}",
        "  triggers: " + ", ".join(f"{t.name}={t.key or '(not replayed)'}" for t in s.triggers),
    ]
    if s.formula:
        lines.append(
            f"  scalingModifiers: formula {s.formula.text!r}, target {s.target:g} ({s.metric_type}), "
            f"activationTarget {s.activation_target:g}"
        )
    else:
        lines.append("  no scalingModifiers: one HPA metric per trigger, the largest proposal wins")
    lines.append(f"  HPA: sync every {s.hpa_sync:g}s, tolerance {HPA_TOLERANCE}, min {s.hpa_min}")
    if s.behavior:
        for d in ("up", "down"):
            r = s.behavior[d]
            pols = ", ".join(f"{p.kind} {p.value} per {p.period:g}s" for p in r.policies)
            lines.append(f"  scale {d}: window {r.window:g}s, select {r.select}: {pols}")
    else:
        lines.append(
            f"  no behavior: legacy limits, scale-up to max(2*cur, 4) per sync, scale-down window {s.legacy_window:g}s"
        )
    lines.append(
        f"  pods: terminationGracePeriodSeconds {s.grace:g}s, AGENTQ_DRAIN_TIMEOUT_SECS {s.drain_timeout}, "
        f"WORKER_CONCURRENCY {s.worker_env.get('WORKER_CONCURRENCY', '?')}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The provider's quota (upstreams.config): what the local stack runs with and what it can use.


LIMITS = ("rpm", "tpm", "concurrency")


def localize_upstreams(doc: dict, base_url: str) -> dict:
    """The chart's upstreams file for the local stack: every upstream's base_url becomes the mock's
    and every api_key the stack's OPENAI_API_KEY; names, models and limits are kept as rendered."""
    out = {"upstreams": []}
    for u in doc.get("upstreams") or []:
        u = dict(u, base_url=base_url)
        if u.get("api_key"):
            u["api_key"] = "env:OPENAI_API_KEY"
        out["upstreams"].append(u)
    return out


@dataclass
class Quota:
    upstream: str
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


def quota_for(doc: dict | None, model: str) -> Quota | None:
    """The limits that apply to calls of `model`: the tightest of its upstream's `limits` and the
    model's `model_limits` (the limiter checks both scopes). None when no upstream serves it."""
    for u in (doc or {}).get("upstreams") or []:
        if model not in (u.get("models") or []):
            continue
        q = Quota(u["name"])
        for scope in (u.get("limits") or {}, (u.get("model_limits") or {}).get(model) or {}):
            for k in LIMITS:
                v = scope.get(k)
                if v:
                    cur = getattr(q, k)
                    setattr(q, k, int(v) if cur is None else min(cur, int(v)))
        return q
    return None


@dataclass
class Capacity:
    rate: float  # calls per second the quota sustains
    in_flight: float  # calls in flight at that rate (Little's law)
    replicas: int  # workers those calls keep busy


def useful_capacity(q: Quota, latency_s: float, concurrency: int, tokens_per_task: float | None = None) -> Capacity | None:
    """The chart README's "Scaling under a provider's rate limit": useful in-flight =
    min(rpm / 60 x L, tpm / 60 / T x L, concurrency), useful replicas = ceil(in-flight /
    worker.concurrency). None when nothing limits the calls (a TPM without T counts as nothing)."""
    bounds = []
    if q.rpm:
        bounds.append(q.rpm / 60 * latency_s)
    if q.tpm and tokens_per_task:
        bounds.append(q.tpm / 60 / tokens_per_task * latency_s)
    if q.concurrency:
        bounds.append(float(q.concurrency))
    if not bounds or latency_s <= 0 or concurrency <= 0:
        return None
    in_flight = min(bounds)
    return Capacity(in_flight / latency_s, in_flight, max(1, math.ceil(in_flight / concurrency - 1e-9)))


def backlogged_pace(rows: list[dict], min_throttled: float = 1) -> tuple[float, float, float] | None:
    """Completions per second while the limiter held a backlog: from the first sample with at
    least `min_throttled` tasks in the throttled set (the quota is used up from there on, so a quiet
    start's headroom is not counted; run.sh passes one second of the quota) to the last sample with
    any backlog left (pending, in flight, retrying or throttled). Returns (start t, end t, tasks per
    second), or None when never that much was throttled."""
    start = next((i for i, r in enumerate(rows) if r.get("throttled", 0) >= max(1, min_throttled)), None)
    if start is None:
        return None
    backlog = lambda r: r["pending"] + r["inflight"] + r["retrying"] + r.get("throttled", 0)  # noqa: E731
    end = max(i for i, r in enumerate(rows) if i >= start and backlog(r) > 0)
    a, b = rows[start], rows[end]
    if b["t"] <= a["t"]:
        return None
    return a["t"], b["t"], (b["done_total"] - a["done_total"]) / (b["t"] - a["t"])


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of xs; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def task_waits(tasks: list[tuple[int, int, int]]) -> dict:
    """From (created_at ms, finished_at ms, times parked) of the finished tasks: queue time and park
    count percentiles, and how far the finishing order strays from first-in-first-out: `overtaken`
    is the share of tasks that finished after a task created at least `lag_s` (1 s) later did."""
    if not tasks:
        return {}
    tasks = sorted(tasks)
    waits = [(f - c) / 1000 for c, f, _ in tasks]
    parks = [n for _, _, n in tasks]
    # A task is overtaken when some task created >= 1 s after it finished before it.
    overtaken, best = 0, math.inf  # best: the earliest finish among tasks created >= 1 s later
    j = len(tasks)
    for i in range(len(tasks) - 1, -1, -1):
        c, f, _ = tasks[i]
        while j > 0 and tasks[j - 1][0] >= c + 1000:
            j -= 1
            best = min(best, tasks[j][1])
        if best < f:
            overtaken += 1
    return {
        "tasks": len(tasks),
        "wait_s": {q: percentile(waits, q) for q in (50, 95, 100)},
        "parked": {q: percentile(parks, q) for q in (50, 95, 100)},
        "parked_more_than_once": sum(1 for n in parks if n > 1) / len(parks),
        "overtaken": overtaken / len(tasks),
    }


def step_above(s: Setup, n: int) -> int:
    """The most replicas one HPA scale-up from n may ask for: the chart's scaleUp policies (Pods
    n + value, Percent ceil(n x (1 + value / 100)), selectPolicy), or the legacy max(2n, 4)."""
    if not s.behavior:
        return min(s.max_replicas, max(2 * n, 4))
    up = s.behavior["up"]
    if up.select == "Disabled":
        return n
    vals = [n + p.value if p.kind == "Pods" else math.ceil(n * (1 + p.value / 100)) for p in up.policies]
    return min(s.max_replicas, max(n, max(vals) if up.select == "Max" else min(vals)))


def scale_down_time(s: Setup, frm: int, to: int) -> float:
    """Seconds the HPA needs, after its last recommendation above `to`, to bring `frm` replicas to
    `to` or fewer: the scale-down stabilization window, then the scale-down policies step by step
    (each step one policy period, plus a sync to act), or straight down after the legacy window."""
    to = max(to, s.hpa_min)
    if frm <= to:
        return 0.0
    if not s.behavior:
        return s.legacy_window + s.hpa_sync
    down = s.behavior["down"]
    if down.select == "Disabled":
        return math.inf
    t, n = down.window + s.hpa_sync, frm
    period = max(p.period for p in down.policies)
    for _ in range(1000):
        if n <= to:
            return t
        vals = [n - p.value if p.kind == "Pods" else int(n * (1 - p.value / 100)) for p in down.policies]
        n = max(to, min(vals) if down.select == "Max" else max(vals), 0)
        t += period + s.hpa_sync
    return math.inf


@dataclass
class Sync:
    t: float
    pending: int  # LLEN pending at the sync
    throttled: int  # ZCARD throttled at the sync
    proposal: int | None  # the HPA's metric proposal (None when the HPA did not compute one)
    desired: int


def held_back(syncs: list[Sync], target: float, min_throttled: float = 1) -> tuple[float | None, list[int]]:
    """The onset ends at the first HPA sync that finds at least `min_throttled` tasks parked in the
    throttled set (run.sh: one second of the quota, more than a fresh limiter parks in its first
    second) and less than one replica's target waiting in pending: from then on the queue holds no
    backlog of admissible work, the limiter holds it. Returns (that sync's time, the metric
    proposals of it and of every later sync with work parked and pending < target); (None, [])
    when the limiter never held that much."""
    floor = max(1, min_throttled)
    first = next((i for i, y in enumerate(syncs)
                  if y.proposal is not None and y.throttled >= floor and y.pending < target), None)
    if first is None:
        return None, []
    held = [y.proposal for y in syncs[first:] if y.proposal is not None and y.throttled > 0 and y.pending < target]
    return syncs[first].t, held


# ---------------------------------------------------------------------------------------------
# KEDA and the HPA.


class Keda:
    """The operator's RequestScale on every poll: activation, 0 -> 1 and N -> 0 after the cooldown."""

    def __init__(self, s: Setup):
        self.s = s
        self.last_active = None

    def poll(self, now: float, active: bool, spec: int) -> int | None:
        s = self.s
        if spec < s.min_replicas:
            return s.min_replicas
        if active:
            self.last_active = now
            if spec == 0:
                return max(s.min_replicas, 1)
            return None
        if spec > 0 and s.min_replicas == 0:
            if self.last_active is None or now - self.last_active >= s.cooldown:
                return 0
        return None


@dataclass
class Event:
    t: float
    change: int


class Hpa:
    def __init__(self, s: Setup):
        self.s = s
        self.recs: list[tuple[float, int]] = []
        self.up_events: list[Event] = []
        self.down_events: list[Event] = []
        self.last_raw: int | None = None

    def proposals(self, values: dict[str, float], composite: float | None, status: int, ready: int) -> int:
        """Desired replicas from the metrics (max over metrics, like computeReplicasForMetrics)."""
        s = self.s
        metrics = (
            [(composite, s.target, s.metric_type)]
            if s.formula
            else [(values[t.name], t.target, "AverageValue") for t in s.triggers]
        )
        best = 0
        for usage, target, kind in metrics:
            if target <= 0:
                continue
            if kind == "AverageValue":
                if status == 0:
                    r = math.ceil(usage / target) if usage > 0 else 0
                else:
                    ratio = usage / (target * status)
                    r = status if abs(1.0 - ratio) <= HPA_TOLERANCE else math.ceil(usage / target)
            else:  # Value
                ratio = usage / target
                r = status if abs(1.0 - ratio) <= HPA_TOLERANCE else math.ceil(ready * ratio)
            best = max(best, r)
        return best

    def reconcile(self, now: float, spec: int, status: int, ready: int, values, composite) -> tuple[int, str]:
        s = self.s
        if spec == 0 and s.hpa_min != 0:
            return spec, "scaling disabled at 0 replicas (KEDA owns 0 <-> 1)"
        if spec > s.max_replicas:
            desired, why = s.max_replicas, "above max"
        elif spec < s.hpa_min:
            desired, why = s.hpa_min, "below min"
        else:
            raw = self.proposals(values, composite, status, ready)
            self.last_raw = raw
            if s.behavior:
                desired, why = self._with_behavior(now, spec, raw)
            else:
                desired, why = self._legacy(now, spec, raw)
            why = f"metric proposal {raw}{why}"
        if desired != spec and s.behavior:
            ev = Event(now, abs(desired - spec))
            (self.up_events if desired > spec else self.down_events).append(ev)
            longest = max(p.period for r in s.behavior.values() for p in r.policies)
            self.up_events = [e for e in self.up_events if now - e.t <= longest]
            self.down_events = [e for e in self.down_events if now - e.t <= longest]
        return desired, why

    def _record(self, now: float, raw: int, horizon: float) -> None:
        # Kubernetes reuses one slot older than the windows; keeping the list pruned is the same.
        self.recs = [(t, r) for t, r in self.recs if now - t <= horizon]
        self.recs.append((now, raw))

    def _legacy(self, now: float, cur: int, raw: int) -> tuple[int, str]:
        s = self.s
        window_max = max([raw] + [r for t, r in self.recs if now - t <= s.legacy_window])
        self._record(now, raw, s.legacy_window)
        limit = min(s.max_replicas, max(2 * cur, 4))
        desired = min(max(window_max, s.hpa_min), limit)
        why = ""
        if window_max != raw:
            why += f", stabilized to {window_max} (highest in {s.legacy_window:g}s)"
        if desired != max(window_max, s.hpa_min):
            why += f", limited to {desired}"
        return desired, why

    def _change(self, events: list[Event], now: float, period: float) -> int:
        return sum(e.change for e in events if now - e.t < period)

    def _with_behavior(self, now: float, cur: int, raw: int) -> tuple[int, str]:
        s = self.s
        up, down = s.behavior["up"], s.behavior["down"]
        up_rec, down_rec = raw, raw
        for t, r in self.recs:
            if now - t < up.window:
                up_rec = min(up_rec, r)
            if now - t < down.window:
                down_rec = max(down_rec, r)
        rec = min(max(cur, up_rec), down_rec)
        self._record(now, raw, max(up.window, down.window))
        why = f", stabilized to {rec}" if rec != raw else ""
        desired = rec
        if rec > cur:
            if up.select == "Disabled":
                limit = cur
            else:
                vals = []
                for p in up.policies:
                    start = cur - self._change(self.up_events, now, p.period) + self._change(self.down_events, now, p.period)
                    vals.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
                limit = max(vals) if up.select == "Max" else min(vals)
            limit = max(limit, cur)
            allowed = min(s.max_replicas, limit)
            if rec > allowed:
                desired = allowed
                why += f", scale-up limited to {allowed}"
        elif rec < cur:
            if down.select == "Disabled":
                limit = cur
            else:
                vals = []
                for p in down.policies:
                    start = cur - self._change(self.up_events, now, p.period) + self._change(self.down_events, now, p.period)
                    vals.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
                limit = min(vals) if down.select == "Max" else max(vals)
            limit = min(limit, cur)
            allowed = max(s.hpa_min, limit)
            if rec < allowed:
                desired = allowed
                why += f", scale-down limited to {allowed}"
        return desired, why


# ---------------------------------------------------------------------------------------------
# The Deployment: worker processes.


@dataclass
class Worker:
    n: int
    created: float
    start_at: float
    port: int = 0
    proc: subprocess.Popen | None = None
    ready_at: float | None = None
    term_at: float | None = None
    killed: bool = False
    exit_code: int | None = None
    exited_at: float | None = None
    next_probe: float = 0.0
    log: object = None

    @property
    def name(self) -> str:
        return f"worker-{self.n}"

    @property
    def gone(self) -> bool:
        return self.exit_code is not None


def pick_victims(live: list[Worker], n: int) -> list[Worker]:
    """ReplicaSet deletion order (controller_utils ActivePodsWithRanks) among equal pods on one
    node: not started before started, not ready before ready, most recently ready first, then
    newest first. Whether a worker is busy plays no part, as in Kubernetes."""

    def rank(w: Worker):
        state = 0 if w.proc is None else (1 if w.ready_at is None else 2)
        return (state, -(w.ready_at or 0), -w.created)

    return sorted(live, key=rank)[:n]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 0.3) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


class Fleet:
    def __init__(self, s: Setup, args, t0: float):
        self.s, self.args, self.t0 = s, args, t0
        self.workers: list[Worker] = []
        self.count = 0
        self.rnd = random.Random(args.seed)
        self.env = dict(os.environ)
        self.env.update(s.worker_env)
        # The local stack replaces what points at the cluster.
        for k in ("REDIS_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
            if k in os.environ:
                self.env[k] = os.environ[k]
        self.env.update(
            AGENTQ_MODEL=args.model,
            AGENTQ_LOG_FORMAT="json",
            AGENTQ_DRAIN_TIMEOUT_SECS=str(s.drain_timeout),
        )
        for k in ("REDIS_PASSWORD", "REDIS_PASSWORD_URLENCODED"):  # the chart's name, and an older one
            self.env.pop(k, None)
        # The chart's file is mounted at a path of the pod; here it is the localized copy.
        self.env.pop("AGENTQ_UPSTREAMS", None)
        if getattr(args, "upstreams_file", None):
            self.env["AGENTQ_UPSTREAMS"] = str(args.upstreams_file)

    def t(self, now: float) -> float:
        return now - self.t0

    def active(self) -> list[Worker]:
        """Pods that count in the Deployment: not terminating, not exited."""
        return [w for w in self.workers if w.term_at is None and not w.gone]

    def terminating(self) -> list[Worker]:
        return [w for w in self.workers if w.term_at is not None and not w.gone]

    def ready(self) -> list[Worker]:
        return [w for w in self.active() if w.ready_at is not None]

    def _spawn(self, w: Worker) -> None:
        w.port = free_port()
        env = dict(self.env, AGENTQ_LISTEN=f"127.0.0.1:{w.port}", HOSTNAME=f"replay-{w.name}")
        w.log = open(Path(self.args.out) / f"{w.name}.log", "wb")
        # Own session: a terminal Ctrl-C reaches the replay, which stops the workers itself.
        w.proc = subprocess.Popen([self.args.worker_bin], env=env, stdout=w.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def reconcile(self, now: float, spec: int) -> None:
        live = self.active()
        if len(live) < spec:
            for _ in range(spec - len(live)):
                self.count += 1
                delay = self.args.pod_start + self.rnd.uniform(0, self.args.pod_start_jitter)
                w = Worker(self.count, now, now + delay)
                self.workers.append(w)
                if delay <= 0:
                    self._spawn(w)
        elif len(live) > spec:
            for w in pick_victims(live, len(live) - spec):
                w.term_at = now
                if w.proc is None:
                    w.exit_code, w.exited_at = 0, now  # never started: just deleted
                else:
                    w.proc.send_signal(signal.SIGTERM)

    def tick(self, now: float) -> None:
        for w in self.workers:
            if w.gone:
                continue
            if w.proc is None:
                if now >= w.start_at:
                    self._spawn(w)
                continue
            rc = w.proc.poll()
            if rc is not None:
                w.exit_code, w.exited_at = rc, now
                if w.log:
                    w.log.close()
                if w.term_at is None:
                    log(f"t={self.t(now):6.1f}s {w.name} exited on its own with {rc}")
                continue
            if w.term_at is not None and now - w.term_at >= self.s.grace and not w.killed:
                log(f"t={self.t(now):6.1f}s {w.name} still running {self.s.grace:g}s after SIGTERM: SIGKILL")
                w.proc.kill()
                w.killed = True
            if w.ready_at is None and w.term_at is None and now >= w.next_probe:
                w.next_probe = now + 0.2
                if http_ok(f"http://127.0.0.1:{w.port}/readyz"):
                    w.ready_at = now

    def stop_all(self, now_fn) -> None:
        for w in self.active():
            w.term_at = now_fn()
            if w.proc is None:
                w.exit_code, w.exited_at = 0, w.term_at
            else:
                w.proc.send_signal(signal.SIGTERM)
        while any(not w.gone for w in self.workers):
            self.tick(now_fn())
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Sampling.


def scrape_counter(url: str, metric: str, label_filter: str = "") -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            total = 0.0
            for line in r.read().decode().splitlines():
                if line.startswith(metric) and label_filter in line and not line.startswith("#"):
                    name = line.split("{")[0].split(" ")[0]
                    if name == metric:
                        total += float(line.rsplit(" ", 1)[1])
            return total
    except Exception:
        return None


def read_tasks(rdb, base: str) -> list[tuple[int, int, int]]:
    """(created_at, finished_at, times parked) of every finished task record of the queue."""
    out = []
    head = f"{base}:task:"
    keys = [k for k in rdb.scan_iter(match=head + "*", count=1000) if ":" not in k[len(head):]]
    for i in range(0, len(keys), 500):
        pipe = rdb.pipeline(transaction=False)
        for k in keys[i:i + 500]:
            pipe.hmget(k, "created_at", "finished_at", "throttled")
        for v in pipe.execute(raise_on_error=False):
            if isinstance(v, list) and v[0] and v[1]:
                out.append((int(v[0]), int(v[1]), int(v[2] or 0)))
    return out


def mock_stats(url: str) -> dict | None:
    """The mock's /_mock/calls: total calls (429s included) and quota_rejections."""
    try:
        with urllib.request.urlopen(f"{url}/_mock/calls", timeout=1) as r:
            return json.load(r)
    except Exception:
        return None


def mock_quota(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/_mock/quota", timeout=1) as r:
            return json.load(r)
    except Exception:
        return None


COLUMNS = [
    "t", "phase", "arrival_rate", "completion_rate", "pending", "inflight", "retrying", "dead",
    "composite", "hpa_proposal", "replicas_desired", "replicas", "ready", "terminating", "enqueued_total",
    "done_total", "llm_calls", "throttled", "proposal_if_throttled_counted", "quota_429s",
]


# ---------------------------------------------------------------------------------------------
# The chart.


def draw(rows: list[dict], s: Setup, out: Path, title: str, marks: dict, quota: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (a1, a2, a3) = plt.subplots(3, 1, sharex=True, figsize=(10, 7.5), dpi=90,
                                     gridspec_kw={"height_ratios": [1, 1, 1]})
    a1.plot(t, [r["arrival_rate"] for r in rows], label="arrivals /s (POST 202)", color="tab:blue")
    a1.plot(t, [r["completion_rate"] for r in rows], label="completions /s", color="tab:green")
    if quota:
        lim = ", ".join(f"{k} {quota[k]}" for k in LIMITS if quota.get(k))
        a1.axhline(quota["rate"], ls="--", color="tab:red", lw=1,
                   label=f"provider quota ({lim}): {quota['rate']:.3g} calls/s")
    a1.set_ylabel("tasks / s")
    a1.legend(loc="upper right", fontsize=8)
    a2.plot(t, [r["pending"] for r in rows], label="pending (LLEN)", color="tab:orange")
    a2.plot(t, [r["inflight"] for r in rows], label="in flight (ZCARD)", color="tab:purple")
    if any(r["retrying"] for r in rows):
        a2.plot(t, [r["retrying"] for r in rows], label="retrying", color="tab:red")
    a2.set_ylabel("tasks")
    if any(r.get("throttled") for r in rows):
        # Thousands parked next to a handful pending: the throttled set gets its own scale.
        a2b = a2.twinx()
        a2b.plot(t, [r.get("throttled", 0) for r in rows], label="throttled (ZCARD, right scale; not in the formula)",
                 color="tab:brown")
        a2b.set_ylabel("throttled", color="tab:brown")
        a2b.set_ylim(bottom=0)
        h1, l1 = a2.get_legend_handles_labels()
        h2, l2 = a2b.get_legend_handles_labels()
        a2.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    else:
        a2.legend(loc="upper right", fontsize=8)
    prop = [(r["t"], r["hpa_proposal"]) for r in rows if r["hpa_proposal"] != ""]
    if prop:
        a3.step([p[0] for p in prop], [min(p[1], s.max_replicas + 1) for p in prop], where="post",
                label="HPA metric proposal ceil(composite/target)", color="tab:blue", lw=0.8, alpha=0.6)
    a3.step(t, [r["ready"] for r in rows], where="post", label="ready workers", color="tab:green", lw=2)
    a3.step(t, [r["terminating"] for r in rows], where="post", label="draining (SIGTERM sent)", color="tab:red")
    a3.step(t, [r["replicas_desired"] for r in rows], where="post", label="desired replicas (after limits)",
            color="black", lw=1, ls="--")
    if quota:
        cf = [(r["t"], r["proposal_if_throttled_counted"]) for r in rows
              if r.get("proposal_if_throttled_counted") not in ("", None)]
        a3.step([p[0] for p in cf], [min(p[1], s.max_replicas + 1) for p in cf], where="post",
                label="proposal had the throttled set counted", color="tab:brown", lw=0.8, ls=":")
        a3.axhline(quota["useful_replicas"], ls="-.", color="tab:red", lw=1,
                   label=f"replicas the quota can use ({quota['useful_replicas']}); checked: <= twice that once held")
        a3.axhline(2 * quota["useful_replicas"], ls="-.", color="tab:red", lw=0.6, alpha=0.5)
    a3.axhline(s.max_replicas, ls=":", color="grey", lw=0.8)
    a3.axhline(s.floor, ls=":", color="grey", lw=0.8)
    a3.set_ylim(-0.5, s.max_replicas + 1.5)
    a3.set_ylabel("workers")
    a3.set_xlabel("seconds since the load started")
    a3.legend(loc="upper right", fontsize=8)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        for x in marks.values():
            if x is not None:
                ax.axvline(x, color="grey", lw=0.8, ls="--")
    right = t[-1] if t else 1
    for i, (label, x) in enumerate(m for m in marks.items() if m[1] is not None):
        near_end = x > 0.8 * right
        a2.annotate(f" {label} " if not near_end else f"{label} ", (x, 0.62 - 0.12 * i),
                    xycoords=("data", "axes fraction"), fontsize=7, va="top",
                    ha="right" if near_end else "left", color="dimgrey")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main loop.


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chart", default=str(Path(__file__).resolve().parents[2] / "deploy/helm/agentq"))
    ap.add_argument("-f", "--values", action="append", default=[], help="extra values file for helm")
    ap.add_argument("--set", action="append", default=[], help="helm --set (e.g. worker.concurrency=4)")
    ap.add_argument("--helm", help="helm binary (default: on PATH)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="divide every chart/controller duration by this")
    ap.add_argument("--polling-interval", type=float, help="override pollingInterval (real seconds)")
    ap.add_argument("--hpa-sync", type=float, help="override the HPA sync period (real seconds)")
    ap.add_argument("--cooldown", type=float, help="override cooldownPeriod (real seconds)")
    ap.add_argument("--scale-down-window", type=float, help="override the scale-down stabilization window (real s)")
    ap.add_argument("--grace", type=float, help="override terminationGracePeriodSeconds (real seconds)")
    ap.add_argument("--pod-start", type=float, default=0.0, help="seconds between a scale-up and the process start")
    ap.add_argument("--pod-start-jitter", type=float, default=0.0,
                    help="up to this many seconds more, drawn per pod (pods of one scale-up do not start in the same ms)")
    ap.add_argument("--sample", type=float, default=0.5, help="sampling interval of the CSV (s)")
    ap.add_argument("--rate-window", type=float, default=2.0, help="window of the arrival/completion rates (s)")
    ap.add_argument("--settle-timeout", type=float, help="max seconds to wait for the fleet to settle after the load")
    ap.add_argument("--worker-bin", required=True)
    ap.add_argument("--model", default="mock-gpt")
    ap.add_argument("--api-url", required=True)
    ap.add_argument("--mock-url", required=True)
    ap.add_argument("--out", required=True, help="folder for CSV, PNG, worker logs, result JSON")
    ap.add_argument("--png", help="chart path (default OUT/autoscale.png)")
    ap.add_argument("--title", default="")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--llm-latency-ms", type=float, default=200.0,
                    help="the mock's latency, for the replicas a provider quota can use (ms)")
    ap.add_argument("--tokens-per-task", type=float, help="average tokens per task, when a TPM limit applies")
    ap.add_argument("--replica-bound", type=int,
                    help="under a quota: most replicas allowed (default 2 x the replicas the quota can use)")
    ap.add_argument("--min-pace", type=float, default=0.9,
                    help="under a quota: least completions/s while backlogged, as a share of the quota's pace")
    ap.add_argument("--max-429-share", type=float, default=0.01,
                    help="under a quota: most of the mock's calls that may be quota 429s")
    ap.add_argument("--write-upstreams", metavar="PATH",
                    help="only write the chart's upstreams file for the local stack to PATH and exit")
    ap.add_argument("--describe", action="store_true", help="print the parameters and exit")
    ap.add_argument("--redraw", metavar="DIR", help="only redraw the chart from DIR/autoscale.csv and result JSON")
    ap.add_argument("load", nargs=argparse.REMAINDER, help="-- load command (k6 run spike.js)")
    args = ap.parse_args()
    load_cmd = args.load[1:] if args.load[:1] == ["--"] else args.load

    s = load_setup(args)
    compress(s, args)
    concurrency = int(s.worker_env.get("WORKER_CONCURRENCY", "0") or 0)
    quota = quota_for(s.upstreams, args.model)
    cap = useful_capacity(quota, args.llm_latency_ms / 1000, concurrency, args.tokens_per_task) if quota else None
    bound = (args.replica_bound or step_above(s, step_above(s, s.hpa_min))) if cap else None
    desc = describe(s)
    if s.upstreams:
        desc += f"\n  upstreams.config: {len(s.upstreams.get('upstreams') or [])} upstream(s); model {args.model}: "
        if quota is None:
            desc += "served by none of them"
        else:
            lim = ", ".join(f"{k} {getattr(quota, k)}" for k in LIMITS if getattr(quota, k)) or "no limits"
            desc += f"upstream {quota.upstream}, {lim}"
        if cap:
            desc += (f"\n  quota at {args.llm_latency_ms:g} ms per call: {cap.rate:.3g} calls/s, "
                     f"{cap.in_flight:.3g} in flight, useful replicas ceil({cap.in_flight:.3g} / {concurrency}) = "
                     f"{cap.replicas}; checks: replicas <= {bound} (two scale-up steps from {s.hpa_min}), "
                     f"<= {2 * cap.replicas} asked for and running once the limiter holds the backlog")
    print(desc, flush=True)
    if s.upstreams:
        local = localize_upstreams(s.upstreams, f"{args.mock_url}/v1")
        path = Path(args.write_upstreams or Path(args.out) / "upstreams.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# the chart's upstreams.config, localized by replay.py (base_url: the mock)\n"
                        + yaml.safe_dump(local, sort_keys=False))
        args.upstreams_file = path.resolve()
    if args.write_upstreams:
        if not s.upstreams:
            raise SystemExit("the chart renders no upstreams file (upstreams.config is empty)")
        print(f"upstreams file {args.upstreams_file}")
        return 0
    if args.describe:
        return 0
    if args.redraw:
        d = Path(args.redraw)
        with open(d / "autoscale.csv") as fh:
            rows = [
                {k: (v if k == "phase" or v == "" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(fh)
            ]
        res = json.loads((d / "autoscale-result.json").read_text())
        png = Path(args.png) if args.png else d / "autoscale.png"
        draw(rows, s, png, args.title or "agentq autoscaling replay", res.get("marks", {}), res.get("quota"))
        print(f"chart {png} ({png.stat().st_size // 1024} KB)")
        return 0
    if not load_cmd:
        ap.error("give the load command after --")
    rnd = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # decode_responses: replies as str, as the queue figures are printed and written to the CSV.
    rdb = redis.Redis.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        decode_responses=True, socket_timeout=5, socket_connect_timeout=5,
    )
    prefix = s.worker_env.get("AGENTQ_KEY_PREFIX", "agentq")
    queue = s.worker_env.get("AGENTQ_QUEUE", "default")
    base = f"{prefix}:{{{queue}}}"
    keys = {t.key for t in s.triggers if t.key}
    for k in keys:
        if not k.startswith(base + ":"):
            log(f"WARNING: trigger key {k} is not under {base}: the workers never write it")

    def metric_values() -> dict[str, float]:
        return {t.name: float(rdb.eval(KEDA_LENGTH_SCRIPT, 1, t.key)) if t.key else 0.0 for t in s.triggers}

    def composite_of(values: dict[str, float]) -> float | None:
        if not s.formula:
            return None
        v = s.formula.eval(values)
        return 0.0 if math.isnan(v) else v

    def if_throttled_counted(values: dict[str, float], composite: float | None, throttled: int) -> int | None:
        """What the HPA would propose if the throttled set were in the formula (it is not)."""
        if s.formula:
            return math.ceil((composite + throttled) / s.target) if s.target > 0 else None
        props = [math.ceil((values[t.name] + throttled) / t.target) for t in s.triggers if t.target > 0]
        return max(props) if props else None

    def is_active(values, composite) -> bool:
        if s.formula:
            return composite > s.activation_target
        return any(values[t.name] > t.activation for t in s.triggers)

    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True
        log(f"signal {signum}: stopping")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t0 = time.monotonic()
    fleet = Fleet(s, args, t0)
    keda, hpa = Keda(s), Hpa(s)
    spec = s.hpa_min if s.min_replicas > 0 else 0
    fleet.reconcile(t0, spec)
    # Give the initial fleet time to start, as a Deployment would have been running before the test.
    deadline = t0 + 30
    while len(fleet.ready()) < spec and time.monotonic() < deadline:
        fleet.tick(time.monotonic())
        time.sleep(0.05)
    log(f"{len(fleet.ready())} worker(s) ready; starting the load: {' '.join(load_cmd)}")

    t0 = time.monotonic()
    fleet.t0 = t0
    load = subprocess.Popen(load_cmd)
    next_poll = t0
    next_sync = t0 + rnd.uniform(0, s.hpa_sync)
    next_sample = t0
    rows: list[dict] = []
    history: list[tuple[float, float, float]] = []  # (t, enqueued_total, done_total)
    phase = "load"
    load_end = None
    settle_since = None
    settled_at = None
    if args.settle_timeout is None:
        down = s.behavior["down"] if s.behavior else None
        per_step = max((p.period for p in down.policies), default=s.hpa_sync) if down else s.hpa_sync
        window = down.window if down else s.legacy_window
        args.settle_timeout = window + s.cooldown + per_step * (math.ceil(math.log2(max(2, s.max_replicas))) * 4) + 30
    hold = max(3 * s.hpa_sync, 2 * s.polling, 2.0)
    last_desc = ""
    max_spec, max_spec_t = spec, 0.0
    first_rise = None
    backlog_cleared_at = None
    peak_backlog, peak_backlog_t = 0, 0.0  # pending + in flight + retrying + throttled
    hpa_decisions = 0
    hpa_syncs: list[Sync] = []
    scale_events = []
    error = None

    def set_spec(now: float, new: int, who: str, why: str) -> None:
        nonlocal spec, max_spec, max_spec_t, first_rise
        if new == spec:
            return
        log(f"t={now - t0:6.1f}s {who}: {spec} -> {new} ({why})")
        scale_events.append({"t": round(now - t0, 2), "from": spec, "to": new, "by": who, "why": why})
        if new > spec and first_rise is None and new > s.floor:
            first_rise = now - t0
        spec = new
        if spec > max_spec:
            max_spec, max_spec_t = spec, now - t0
        fleet.reconcile(now, spec)

    try:
        while True:
            now = time.monotonic()
            if stop["flag"]:
                error = "interrupted"
                break
            fleet.tick(now)
            if phase == "load" and load.poll() is not None:
                phase, load_end = "settle", now - t0
                log(f"t={now - t0:6.1f}s load finished (exit {load.returncode}); waiting for the fleet to settle")
            if now >= next_poll:
                next_poll += s.polling
                values = metric_values()
                comp = composite_of(values)
                new = keda.poll(now, is_active(values, comp), spec)
                if new is not None:
                    set_spec(now, new, "KEDA", f"composite {comp:g}, active={is_active(values, comp)}")
            if now >= next_sync:
                # The HPA controller requeues a key one sync period after it finished with it (a
                # fixed delay, not a fixed rate), so the previous sync's scale event is always just
                # outside a policy period equal to the sync period.
                next_sync = now + s.hpa_sync
                values = metric_values()  # the HPA asks KEDA's metrics server, which reads live
                comp = composite_of(values)
                desired, why = hpa.reconcile(now, spec, len(fleet.active()), len(fleet.ready()), values, comp)
                hpa_decisions += 1
                hpa_syncs.append(Sync(now - t0, rdb.llen(f"{base}:pending"), rdb.zcard(f"{base}:throttled"),
                                      hpa.last_raw if why.startswith("metric proposal") else None, desired))
                desc = f"{'composite ' + format(comp, 'g') if comp is not None else values}, {why}"
                if desired != spec:
                    set_spec(now, desired, "HPA", desc)
                last_desc = desc
            if now >= next_sample:
                next_sample += args.sample
                p = rdb.llen(f"{base}:pending")
                f = rdb.zcard(f"{base}:active")
                r = rdb.zcard(f"{base}:delayed")
                d = rdb.zcard(f"{base}:dead")
                th = rdb.zcard(f"{base}:throttled")  # parked by the flow limiter, outside pending
                enq = scrape_counter(f"{args.api_url}/metrics", "agentq_tasks_enqueued_total", f'queue="{queue}"')
                enq = enq if enq is not None else (history[-1][1] if history else 0.0)
                done = max(0.0, enq - p - f - r - th)
                tt = now - t0
                history.append((tt, enq, done))
                past = [h for h in history if tt - h[0] >= args.rate_window]
                ref = past[-1] if past else history[0]
                dt = tt - ref[0]
                values = metric_values()
                comp = composite_of(values)
                stats = mock_stats(args.mock_url) if len(rows) % 4 == 0 else None
                rows.append({
                    "t": round(tt, 2), "phase": phase,
                    "arrival_rate": round((enq - ref[1]) / dt, 2) if dt > 0 else 0.0,
                    "completion_rate": round((done - ref[2]) / dt, 2) if dt > 0 else 0.0,
                    "pending": p, "inflight": f, "retrying": r, "dead": d,
                    "composite": comp if comp is not None else "",
                    "hpa_proposal": "" if hpa.last_raw is None else hpa.last_raw,
                    "replicas_desired": spec, "replicas": len(fleet.active()), "ready": len(fleet.ready()),
                    "terminating": len(fleet.terminating()), "enqueued_total": int(enq), "done_total": int(done),
                    "llm_calls": stats["total"] if stats else "",
                    "throttled": th,
                    "proposal_if_throttled_counted": if_throttled_counted(values, comp, th),
                    "quota_429s": stats.get("quota_rejections", "") if stats else "",
                })
                backlog = p + f + r + th
                if backlog > peak_backlog:
                    peak_backlog, peak_backlog_t = backlog, tt
                if phase == "settle":
                    if backlog == 0 and backlog_cleared_at is None:
                        backlog_cleared_at = tt
                    if backlog > 0:
                        backlog_cleared_at = None
                    calm = (
                        backlog == 0
                        and spec == s.floor
                        and len(fleet.active()) == s.floor
                        and not fleet.terminating()
                    )
                    if calm:
                        settle_since = settle_since or now
                        if now - settle_since >= hold:
                            settled_at = settle_since - t0
                            log(f"t={tt:6.1f}s settled: backlog 0 and {spec} replica(s) for {hold:g}s")
                            break
                    else:
                        settle_since = None
                    if tt - load_end > args.settle_timeout:
                        log(f"t={tt:6.1f}s not settled {args.settle_timeout:g}s after the load "
                            f"(backlog {backlog}, desired {spec}, running {len(fleet.active())}, "
                            f"draining {len(fleet.terminating())}; last HPA: {last_desc})")
                        break
            time.sleep(0.02)
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGTERM)
            try:
                load.wait(15)
            except subprocess.TimeoutExpired:
                load.kill()
                load.wait()
        end_t = time.monotonic() - t0
        scaled_down = [w for w in fleet.workers if w.term_at is not None]
        fleet.stop_all(time.monotonic)

    # -- results
    with open(out / "autoscale.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows(rows)
    started = len([w for w in fleet.workers if w.proc is not None])
    bad_exits = [w for w in scaled_down if w.exit_code != 0 or w.killed]
    final_exits = [w for w in fleet.workers if w not in scaled_down]
    bad_final = [w for w in final_exits if w.exit_code != 0 or w.killed]
    drain_times = [w.exited_at - w.term_at for w in scaled_down if w.exited_at is not None]
    last = rows[-1] if rows else {}
    back_to_floor = next(
        (e["t"] for e in reversed(scale_events) if e["to"] == s.floor and e["from"] > s.floor), None
    )
    checks = [
        ("load command exited 0", load.returncode == 0, f"exit {load.returncode}"),
        ("backlog cleared", bool(last) and last["pending"] == 0 and last["inflight"] == 0 and last["retrying"] == 0
         and last["throttled"] == 0,
         f"pending {last.get('pending')}, in flight {last.get('inflight')}, retrying {last.get('retrying')}, "
         f"throttled {last.get('throttled')} at the end"),
        ("replicas rose under the spike", max_spec > s.floor,
         f"max {max_spec} at t={max_spec_t:.1f}s (floor {s.floor}, max {s.max_replicas})"),
        ("replicas back to the floor after the load", settled_at is not None and spec == s.floor,
         f"{spec} desired at the end" + (f", back to {s.floor} at t={back_to_floor:.1f}s" if back_to_floor else "")),
        ("every scaled-down worker exited 0 without SIGKILL", not bad_exits,
         f"{len(scaled_down)} scaled down, " + (", ".join(f"{w.name}: exit {w.exit_code}{' (SIGKILL)' if w.killed else ''}" for w in bad_exits) or "all exit 0")
         + (f", drain {min(drain_times):.1f}-{max(drain_times):.1f}s" if drain_times else "")),
        ("remaining workers exited 0 at teardown", not bad_final,
         ", ".join(f"{w.name}: exit {w.exit_code}" for w in bad_final) or f"{len(final_exits)} ok"),
    ]
    quota_res = None
    if cap:
        checks = [c for c in checks if c[0] != "replicas rose under the spike"]
        stats = mock_stats(args.mock_url) or {}
        mq = mock_quota(args.mock_url) or {}
        calls, r429 = int(stats.get("total", 0)), int(stats.get("quota_rejections", 0))
        pace = backlogged_pace(rows, cap.rate)
        useful2 = 2 * cap.replicas
        target = s.target if s.formula else min((t.target for t in s.triggers if t.target > 0), default=1)
        held_t, held = held_back(hpa_syncs, target, cap.rate)
        peak_cf = max((r["proposal_if_throttled_counted"] for r in rows
                       if r["proposal_if_throttled_counted"] not in ("", None)), default=0)
        during = [r["replicas_desired"] for r in rows if pace and pace[0] <= r["t"] <= pace[1]]
        mean_during = sum(during) / len(during) if during else None  # samples are evenly spaced
        # After the onset the HPA keeps its onset recommendation for the scale-down window, then
        # comes down policy period by policy period: from then on replicas must fit the quota.
        settled_from = held_t + scale_down_time(s, max_spec, useful2) + 2 * s.hpa_sync if held_t is not None else None
        end_t_backlog = pace[1] if pace else None
        sustained = [r["replicas_desired"] for r in rows
                     if settled_from is not None and end_t_backlog and settled_from <= r["t"] <= end_t_backlog]
        want = min(cap.replicas, s.max_replicas)
        checks[2:2] = [
            ("the spike asks for maxReplicaCount if throttled tasks counted", peak_cf >= s.max_replicas,
             f"ceil((pending + in flight + throttled) / {s.target:g}) peaked at {peak_cf} (max {s.max_replicas})"),
            ("replicas rose to what the quota can use", max_spec >= want,
             f"max {max_spec} at t={max_spec_t:.1f}s, useful replicas {cap.replicas}"),
            ("the onset stayed within two scale-up steps", max_spec <= bound,
             f"max {max_spec} at t={max_spec_t:.1f}s (allowed {bound}: two scale-up steps from {s.hpa_min}, "
             f"what the HPA may take before new pods park the excess)"),
            ("held-back work adds no replicas", bool(held) and max(held) <= useful2,
             "the limiter never held the backlog" if not held else
             f"metric proposal {min(held)}..{max(held)} at the {len(held)} HPA syncs from t={held_t:.1f}s with "
             f"work throttled and pending < {target:g} (allowed {useful2} = 2 x useful)"),
            ("replicas came down to what the quota can use while the backlog lasted",
             bool(sustained) and max(sustained) <= useful2,
             (f"{min(sustained)}..{max(sustained)} from t={settled_from:.1f}s to t={end_t_backlog:.1f}s "
              f"(allowed {useful2}; from {max_spec}: scale-down window and policy steps after t={held_t:.1f}s)")
             if sustained else
             f"nothing to check: the backlog ended at t={end_t_backlog if end_t_backlog is not None else float('nan'):.1f}s, "
             f"before the HPA could come down (t={settled_from if settled_from is not None else float('nan'):.1f}s)"),
            ("backlog cleared at the quota's pace",
             pace is not None and pace[2] >= args.min_pace * cap.rate,
             "nothing was throttled" if pace is None else
             f"{pace[2]:.2f} tasks/s from t={pace[0]:.1f}s to t={pace[1]:.1f}s = "
             f"{100 * pace[2] / cap.rate:.1f} % of the quota's {cap.rate:.3g}/s (need {100 * args.min_pace:g} %)"
             + (f"; mean replicas {mean_during:.2f}" if mean_during is not None else "")),
            ("the provider's quota held (mock 429s)", calls > 0 and r429 <= args.max_429_share * calls,
             f"{r429} quota 429s of {calls} calls ({100 * r429 / max(1, calls):.2f} %, allowed "
             f"{100 * args.max_429_share:g} %); mock rpm {mq.get('rpm')}"),
        ]
        tasks = read_tasks(rdb, base)
        waits = task_waits(tasks)
        with open(out / "tasks.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["created_ms", "finished_ms", "parked"])
            wr.writerows(sorted(tasks))
        if quota.rpm and mq.get("rpm") != quota.rpm:
            log(f"WARNING: the mock enforces rpm {mq.get('rpm')}, upstreams.config says {quota.rpm}")
        quota_res = {
            "upstream": quota.upstream, "rpm": quota.rpm, "tpm": quota.tpm, "concurrency": quota.concurrency,
            "rate": cap.rate, "in_flight": cap.in_flight, "useful_replicas": cap.replicas, "replica_bound": bound,
            "backlogged_from_t": pace[0] if pace else None, "backlogged_to_t": pace[1] if pace else None,
            "pace": pace[2] if pace else None, "pace_share": pace[2] / cap.rate if pace else None,
            "mean_replicas_backlogged": mean_during, "proposal_if_throttled_counted_peak": peak_cf,
            "held_from_t": held_t, "held_back_proposals": [min(held, default=None), max(held, default=None), len(held)],
            "sustained_from_t": settled_from,
            "sustained_replicas": [min(sustained, default=None), max(sustained, default=None)],
            "mock_calls": calls, "mock_quota_429s": r429, "mock_rpm": mq.get("rpm"),
            "peak_throttled": max((r["throttled"] for r in rows), default=0),
            "tasks": waits,
        }
    if error:
        checks.append(("not interrupted", False, error))
    marks = {"load ends": load_end, f"back to {s.floor}": back_to_floor}
    png = Path(args.png) if args.png else out / "autoscale.png"
    try:
        title = args.title or "agentq autoscaling replay"
        draw(rows, s, png, title, marks, quota_res)
        png_note = f"{png} ({png.stat().st_size // 1024} KB)"
    except ImportError:
        png_note = "not drawn: matplotlib is not installed"
    result = {
        "ok": all(c[1] for c in checks),
        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "max_replicas": max_spec,
        "max_replicas_t": max_spec_t,
        "first_scale_up_t": first_rise,
        "peak_backlog": peak_backlog,
        "peak_backlog_t": peak_backlog_t,
        "load_end_t": load_end,
        "backlog_cleared_t": backlog_cleared_at,
        "settled_t": settled_at,
        "duration_s": end_t,
        "workers_started": started,
        "workers_scaled_down": len(scaled_down),
        "hpa_decisions": hpa_decisions,
        "scale_events": scale_events,
        "marks": marks,
        "quota": quota_res,
        "hpa_syncs": [dict(vars(y), t=round(y.t, 2)) for y in hpa_syncs],
    }
    (out / "autoscale-result.json").write_text(json.dumps(result, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.1f}s"  # noqa: E731
    print(f"\n== autoscaling replay ({end_t:.0f}s) ==")
    print(f"  peak backlog (pending+in flight+retrying+throttled) {peak_backlog} at t={peak_backlog_t:.1f}s; "
          f"first scale-up t={fmt(first_rise)}; max replicas {max_spec} at t={max_spec_t:.1f}s")
    print(f"  load ended t={fmt(load_end)}, backlog cleared t={fmt(backlog_cleared_at)}, "
          f"settled at {s.floor} replica(s) t={fmt(settled_at)}")
    print(f"  {len(scale_events)} scale changes, {started} worker processes started, {len(scaled_down)} scaled down")
    if quota_res:
        print(f"  quota {quota_res['rate']:.3g} calls/s (useful replicas {cap.replicas}); peak throttled "
              f"{quota_res['peak_throttled']}; proposal had throttled tasks counted: up to "
              f"{quota_res['proposal_if_throttled_counted_peak']}")
        w = quota_res["tasks"]
        if w:
            print(f"  {w['tasks']} tasks: queue time p50 {w['wait_s'][50]:.1f}s, p95 {w['wait_s'][95]:.1f}s, "
                  f"max {w['wait_s'][100]:.1f}s; parked p50 {w['parked'][50]}, p95 {w['parked'][95]}, "
                  f"max {w['parked'][100]} times ({100 * w['parked_more_than_once']:.0f} % more than once); "
                  f"{100 * w['overtaken']:.0f} % overtaken by a task created >= 1 s later")
    print(f"  csv {out / 'autoscale.csv'}, chart {png_note}")
    for n, ok, d in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {n}: {d}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
