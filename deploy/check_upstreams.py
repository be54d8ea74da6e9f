#!/usr/bin/env python3
"""Check the AGENTQ_UPSTREAMS wiring of rendered agentq manifests against the values they came from.

Usage: check_upstreams.py [--rolled OTHER.yaml] RENDERED.yaml [VALUES.yaml...]

VALUES are the -f files of the render (the chart's values.yaml is read first, as helm does). With
upstreams.config set:
  * ConfigMap <rel>-upstreams holds upstreams.yaml, and it parses back to exactly upstreams.config;
  * the api and every worker Deployment (a batch queue's too) see AGENTQ_UPSTREAMS (container env
    after envFrom, as the pod gets it) = <upstreams.mountPath>/upstreams.yaml, and that file is
    really there: a read-only mount of that ConfigMap's key at that path;
  * both pods carry a checksum/upstreams annotation, and with --rolled (a render of the same values
    with one limit changed) that checksum differs, so a changed file rolls the pods;
  * every "api_key: env:VAR" variable reaches both containers (an env entry from a Secret, or the
    envFrom Secret of upstreams.existingSecret); the api gets OPENAI_API_KEY only when an upstream
    names it.
Without it: no AGENTQ_UPSTREAMS, no upstreams ConfigMap, no mount, no annotation, and no LLM key in
the api. Always: no ConfigMap holds an API key (llm.apiKey's value, or anything shaped like an
OpenAI key), and every api_key in a rendered upstreams file is an env: reference.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_keys import container_env, docs_of, find, worker_deployments  # noqa: E402

CHART = Path(__file__).resolve().parent / "helm" / "agentq"
KEY_SHAPED = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


def merge(base: dict, over: dict) -> dict:
    """Helm's merge of values files: maps deep, everything else replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def values_of(files: list[Path]) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = merge(values, yaml.safe_load(f.read_text()) or {})
    return values


def pods(docs: list[dict]) -> list[tuple[str, dict, dict, dict]]:
    """(component, Deployment, pod spec, main container) of the api and of every worker Deployment
    (the main one and a batch queue's, <rel>-worker-batch)."""
    out = []
    for component, deps in (("api", find(docs, "Deployment", "-api")), ("worker", worker_deployments(docs))):
        for dep in deps:
            pod = dep["spec"]["template"]["spec"]
            container = next(c for c in pod["containers"] if c["name"] == component)
            out.append((component, dep, pod, container))
    return out


def check(path: Path, value_files: list[Path], rolled: Path | None) -> list[str]:
    errors: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(f"{path.name}: {msg}")

    docs = docs_of(path)
    values = values_of(value_files)
    ups = values["upstreams"]
    config = ups.get("config") or {}
    on = bool(config.get("upstreams"))
    want_path = f"{ups['mountPath']}/upstreams.yaml"
    cms = find(docs, "ConfigMap", "-upstreams")
    workloads = pods(docs)
    components = [c for c, *_ in workloads]
    expect(components.count("api") == 1 and components.count("worker") >= 1,
           f"expected one api and one or more worker Deployments, found {components}")

    # --- no key in any ConfigMap ----------------------------------------------------------------
    api_key = (values.get("llm") or {}).get("apiKey") or ""
    for cm in find(docs, "ConfigMap"):
        for k, body in (cm.get("data") or {}).items():
            where = f"ConfigMap {cm['metadata']['name']} key {k}"
            expect(not api_key or api_key not in str(body), f"{where} contains llm.apiKey's value")
            expect(KEY_SHAPED.search(str(body)) is None, f"{where} contains something shaped like an API key")

    if not on:
        expect(not cms, "upstreams.config is empty, but an upstreams ConfigMap is rendered")
        for component, dep, pod, container in workloads:
            env = container_env(docs, pod, container)
            who = dep["metadata"]["name"]
            expect("AGENTQ_UPSTREAMS" not in env, f"{who}: AGENTQ_UPSTREAMS is set, but upstreams.config is empty")
            expect(not any(v["name"] == "upstreams" for v in pod.get("volumes", [])), f"{who}: upstreams volume without upstreams.config")
            expect("checksum/upstreams" not in (dep["spec"]["template"]["metadata"].get("annotations") or {}),
                   f"{who}: checksum/upstreams annotation without upstreams.config")
            if component == "api":
                expect("OPENAI_API_KEY" not in env, f"{who}: the api gets OPENAI_API_KEY, but no upstream names it")
        print(f"  {path.name}: upstreams.config empty: no AGENTQ_UPSTREAMS, ConfigMap, mount or checksum in api and worker")
        return errors

    # --- the file -------------------------------------------------------------------------------
    expect(len(cms) == 1, f"expected one upstreams ConfigMap, found {len(cms)}")
    if len(cms) != 1:
        return errors
    cm = cms[0]
    cm_name = cm["metadata"]["name"]
    body = (cm.get("data") or {}).get("upstreams.yaml")
    expect(body is not None, f"ConfigMap {cm_name} has no key upstreams.yaml")
    parsed = yaml.safe_load(body or "") or {}
    expect(parsed == config, f"ConfigMap {cm_name} upstreams.yaml parses to {parsed!r}, not upstreams.config {config!r}")
    for u in parsed.get("upstreams", []):
        if "api_key" in u:
            expect(re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", str(u["api_key"])) is not None,
                   f"upstream {u.get('name')}: api_key is not an env: reference")
    key_vars = sorted({u["api_key"][4:] for u in config["upstreams"] if u.get("api_key")})

    # --- api and worker -------------------------------------------------------------------------
    rolled_ann: dict[str, str] = {}
    if rolled is not None:
        for _, dep, _, _ in pods(docs_of(rolled)):
            rolled_ann[dep["metadata"]["name"]] = (dep["spec"]["template"]["metadata"].get("annotations") or {}).get(
                "checksum/upstreams", "")
    for component, dep, pod, container in workloads:
        who = dep["metadata"]["name"]
        env = container_env(docs, pod, container)
        expect(env.get("AGENTQ_UPSTREAMS") == want_path,
               f"{who}: AGENTQ_UPSTREAMS is {env.get('AGENTQ_UPSTREAMS')!r}, want {want_path!r}")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] in vols
                  and (vols[m["name"]].get("configMap") or {}).get("name") == cm_name]
        expect(len(mounts) == 1, f"{who}: ConfigMap {cm_name} is mounted {len(mounts)} times, want once")
        for m in mounts:
            items = {i["key"]: i["path"] for i in vols[m["name"]]["configMap"].get("items", [])}
            file_path = f"{m['mountPath'].rstrip('/')}/{items.get('upstreams.yaml', 'upstreams.yaml')}"
            expect(file_path == want_path, f"{who}: the mount puts upstreams.yaml at {file_path}, AGENTQ_UPSTREAMS says {want_path}")
            expect(m.get("readOnly") is True, f"{who}: the upstreams mount is not readOnly")
        ann = dep["spec"]["template"]["metadata"].get("annotations") or {}
        expect(bool(ann.get("checksum/upstreams")), f"{who}: no checksum/upstreams annotation (pods would not roll)")
        if rolled is not None:
            expect(rolled_ann.get(who) not in (None, "", ann.get("checksum/upstreams")),
                   f"{who}: checksum/upstreams did not change when upstreams.config changed")
        names = {e["name"] for e in container.get("env", [])}
        from_secret = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
        for var in key_vars:
            expect(var in names or bool(from_secret),
                   f"{who}: api_key env:{var} is neither an env entry nor possibly in an envFrom Secret")
            entry = next((e for e in container.get("env", []) if e["name"] == var), None)
            if entry is not None:
                expect("secretKeyRef" in (entry.get("valueFrom") or {}), f"{who}: {var} is not from a Secret")
        if component == "api":
            expect(("OPENAI_API_KEY" in names) == ("OPENAI_API_KEY" in key_vars),
                   f"{who}: OPENAI_API_KEY in the api must follow whether an upstream names it")
        print(f"  {who}: AGENTQ_UPSTREAMS={want_path} (read-only mount of {cm_name}), key vars {key_vars or 'none'} "
              f"from {'env' if not from_secret else 'env + envFrom ' + ', '.join(from_secret)}"
              f"{', checksum rolls' if rolled is not None else ''}")
    print(f"  {path.name}: {len(config['upstreams'])} upstreams, upstreams.yaml == upstreams.config")
    return errors


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rolled", type=Path, help="a render of the same values with upstreams.config changed")
    parser.add_argument("rendered", type=Path)
    parser.add_argument("values", nargs="*", type=Path)
    args = parser.parse_args(argv)
    errors = check(args.rendered, args.values, args.rolled)
    for e in errors:
        print(f"FAIL {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
