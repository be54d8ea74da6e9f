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
    return setup_from_rendered([so, cm, dep], f"{chart}/values.yaml (helm not found)")


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
                w = Worker(self.count, now, now + self.args.pod_start)
                self.workers.append(w)
                if self.args.pod_start <= 0:
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


def mock_calls(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/_mock/calls", timeout=1) as r:
            return int(json.load(r)["total"])
    except Exception:
        return None


COLUMNS = [
    "t", "phase", "arrival_rate", "completion_rate", "pending", "inflight", "retrying", "dead",
    "composite", "hpa_proposal", "replicas_desired", "replicas", "ready", "terminating", "enqueued_total",
    "done_total", "llm_calls",
]


# ---------------------------------------------------------------------------------------------
# The chart.


def draw(rows: list[dict], s: Setup, out: Path, title: str, marks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (a1, a2, a3) = plt.subplots(3, 1, sharex=True, figsize=(10, 7.5), dpi=90,
                                     gridspec_kw={"height_ratios": [1, 1, 1]})
    a1.plot(t, [r["arrival_rate"] for r in rows], label="arrivals /s (POST 202)", color="tab:blue")
    a1.plot(t, [r["completion_rate"] for r in rows], label="completions /s", color="tab:green")
    a1.set_ylabel("tasks / s")
    a1.legend(loc="upper right", fontsize=8)
    a2.plot(t, [r["pending"] for r in rows], label="pending (LLEN)", color="tab:orange")
    a2.plot(t, [r["inflight"] for r in rows], label="in flight (ZCARD)", color="tab:purple")
    if any(r["retrying"] for r in rows):
        a2.plot(t, [r["retrying"] for r in rows], label="retrying", color="tab:red")
    a2.set_ylabel("tasks")
    a2.legend(loc="upper right", fontsize=8)
    prop = [(r["t"], r["hpa_proposal"]) for r in rows if r["hpa_proposal"] != ""]
    if prop:
        a3.step([p[0] for p in prop], [min(p[1], s.max_replicas + 1) for p in prop], where="post",
                label="HPA metric proposal ceil(composite/target)", color="tab:blue", lw=0.8, alpha=0.6)
    a3.step(t, [r["ready"] for r in rows], where="post", label="ready workers", color="tab:green", lw=2)
    a3.step(t, [r["terminating"] for r in rows], where="post", label="draining (SIGTERM sent)", color="tab:red")
    a3.step(t, [r["replicas_desired"] for r in rows], where="post", label="desired replicas (after limits)",
            color="black", lw=1, ls="--")
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
    ap.add_argument("--describe", action="store_true", help="print the parameters and exit")
    ap.add_argument("--redraw", metavar="DIR", help="only redraw the chart from DIR/autoscale.csv and result JSON")
    ap.add_argument("load", nargs=argparse.REMAINDER, help="-- load command (k6 run spike.js)")
    args = ap.parse_args()
    load_cmd = args.load[1:] if args.load[:1] == ["--"] else args.load

    s = load_setup(args)
    compress(s, args)
    print(describe(s), flush=True)
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
        draw(rows, s, png, args.title or "agentq autoscaling replay", res.get("marks", {}))
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
    peak_backlog, peak_backlog_t = 0, 0.0
    hpa_decisions = 0
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
                enq = scrape_counter(f"{args.api_url}/metrics", "agentq_tasks_enqueued_total", f'queue="{queue}"')
                enq = enq if enq is not None else (history[-1][1] if history else 0.0)
                done = max(0.0, enq - p - f - r)
                tt = now - t0
                history.append((tt, enq, done))
                past = [h for h in history if tt - h[0] >= args.rate_window]
                ref = past[-1] if past else history[0]
                dt = tt - ref[0]
                values = metric_values()
                comp = composite_of(values)
                rows.append({
                    "t": round(tt, 2), "phase": phase,
                    "arrival_rate": round((enq - ref[1]) / dt, 2) if dt > 0 else 0.0,
                    "completion_rate": round((done - ref[2]) / dt, 2) if dt > 0 else 0.0,
                    "pending": p, "inflight": f, "retrying": r, "dead": d,
                    "composite": comp if comp is not None else "",
                    "hpa_proposal": "" if hpa.last_raw is None else hpa.last_raw,
                    "replicas_desired": spec, "replicas": len(fleet.active()), "ready": len(fleet.ready()),
                    "terminating": len(fleet.terminating()), "enqueued_total": int(enq), "done_total": int(done),
                    "llm_calls": mock_calls(args.mock_url) if len(rows) % 4 == 0 else "",
                })
                backlog = p + f + r
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
        ("backlog cleared", bool(last) and last["pending"] == 0 and last["inflight"] == 0 and last["retrying"] == 0,
         f"pending {last.get('pending')}, in flight {last.get('inflight')}, retrying {last.get('retrying')} at the end"),
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
    if error:
        checks.append(("not interrupted", False, error))
    marks = {"load ends": load_end, f"back to {s.floor}": back_to_floor}
    png = Path(args.png) if args.png else out / "autoscale.png"
    try:
        title = args.title or "agentq autoscaling replay"
        draw(rows, s, png, title, marks)
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
    }
    (out / "autoscale-result.json").write_text(json.dumps(result, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.1f}s"  # noqa: E731
    print(f"\n== autoscaling replay ({end_t:.0f}s) ==")
    print(f"  peak backlog (pending+in flight+retrying) {peak_backlog} at t={peak_backlog_t:.1f}s; "
          f"first scale-up t={fmt(first_rise)}; max replicas {max_spec} at t={max_spec_t:.1f}s")
    print(f"  load ended t={fmt(load_end)}, backlog cleared t={fmt(backlog_cleared_at)}, "
          f"settled at {s.floor} replica(s) t={fmt(settled_at)}")
    print(f"  {len(scale_events)} scale changes, {started} worker processes started, {len(scaled_down)} scaled down")
    print(f"  csv {out / 'autoscale.csv'}, chart {png_note}")
    for n, ok, d in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {n}: {d}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
