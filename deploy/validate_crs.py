#!/usr/bin/env python3
"""Validate the custom resources of rendered Helm output against their CRD schemas, offline.

Usage: validate_crs.py [--core-out-dir DIR] RENDERED.yaml...
       validate_crs.py --self-test RENDERED.yaml

The schemas come from PyPI packages that deploy/check.sh pins and installs into .venv: the
cloudcoil model packages (`cloudcoil-models-keda`, `cloudcoil-models-prometheus-operator`), pydantic
models generated from the upstream CRDs of one KEDA / prometheus-operator release each. Nothing
outside the repository and the package registries is read.

Every document whose apiVersion/kind has a model (KEDA ScaledObject, TriggerAuthentication, ...;
prometheus-operator ServiceMonitor, PrometheusRule, PodMonitor, ...) is validated the way the API
server sees it, as JSON, with
  * extra="forbid": an unknown field at any depth (`pollingIntervall`, `listName` at the wrong
    level, a misspelt `lables` in metadata) is an error instead of being silently dropped;
  * strict types: "5" for an integer, or 5 for a string such as trigger metadata, is an error;
  * field names only as the CRD spells them (camelCase), never the models' Python names.
Free-form maps (trigger `metadata`, labels) stay open, as the API server treats them.

Documents of other kinds are core resources: with --core-out-dir, those of RENDERED.yaml are
written to DIR/core-RENDERED.yaml for kubernetes-validate. A document with a custom-looking apiVersion (a dotted group) but no model is an
error, so a new custom kind cannot slip through unvalidated.

--self-test proves the validator is strict: every custom resource in the file must pass, then a
set of broken copies of them (an unknown field at each level, wrong types, a missing required
field, a Python-style name, a bad enum value) must each be rejected.

Exit status: 0 when every custom resource is valid (or, with --self-test, every broken copy is
rejected), 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from importlib import import_module, metadata
from pathlib import Path
from typing import Callable

import pydantic
import yaml

# The model module of each custom apiVersion the chart may render (imported only when used: the
# prometheus-operator ones are several MB of Python each).
MODEL_MODULES = {
    "keda.sh/v1alpha1": "cloudcoil.models.keda.v1alpha1",
    "monitoring.coreos.com/v1": "cloudcoil.models.prometheus_operator.v1",
    "monitoring.coreos.com/v1alpha1": "cloudcoil.models.prometheus_operator.v1alpha1",
}
MODEL_PACKAGES = ("cloudcoil.models.keda", "cloudcoil.models.prometheus_operator")

# apiVersion groups served by Kubernetes itself (validated by kubernetes-validate instead).
CORE_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io", "node.k8s.io",
    "events.k8s.io", "flowcontrol.apiserver.k8s.io", "resource.k8s.io",
}


def load_models(api_versions: set[str]) -> dict[tuple[str, str], type[pydantic.BaseModel]]:
    """Map (apiVersion, kind) to the model class of every top-level resource of the modules that
    serve the given apiVersions."""
    models: dict[tuple[str, str], type[pydantic.BaseModel]] = {}
    for name in sorted({MODEL_MODULES[v] for v in api_versions if v in MODEL_MODULES}):
        module = import_module(name)
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)):
                continue
            if cls.__module__ != module.__name__:
                continue
            fields = cls.model_fields
            api_version = fields["api_version"].default if "api_version" in fields else None
            kind = fields["kind"].default if "kind" in fields else None
            if isinstance(api_version, str) and isinstance(kind, str) and not kind.endswith("List"):
                models[(api_version, kind)] = cls
    return models


def versions() -> str:
    return ", ".join(f"{p} {metadata.version(p)}" for p in MODEL_PACKAGES)


def errors_of(model: type[pydantic.BaseModel], doc: dict) -> list[str]:
    """The validation errors of one document, as 'path: message' lines (empty when valid)."""
    try:
        model.model_validate_json(json.dumps(doc), strict=True, extra="forbid", by_alias=True, by_name=False)
    except pydantic.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
    return []


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(paths: list[Path], core_out_dir: Path | None) -> int:
    rendered = {path: documents(path) for path in paths}
    models = load_models({d.get("apiVersion", "") for docs in rendered.values() for d in docs})
    failures = 0
    checked = 0
    passed_on = 0
    for path, docs in rendered.items():
        core_docs: list[dict] = []
        for doc in docs:
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "?")
            where = f"{path.name}: {kind}/{name}"
            model = models.get((api_version, kind))
            if model is None:
                if group_of(api_version) in CORE_GROUPS:
                    core_docs.append(doc)
                else:
                    print(f"FAIL {where}: no schema for {api_version} {kind} in {', '.join(MODEL_PACKAGES)}")
                    failures += 1
                continue
            checked += 1
            errors = errors_of(model, doc)
            for err in errors:
                print(f"FAIL {where}: {err}")
            failures += len(errors)
            if not errors:
                print(f"ok   {where} ({api_version})")
        if core_out_dir:
            (core_out_dir / f"core-{path.name}").write_text(yaml.safe_dump_all(core_docs, sort_keys=False))
        passed_on += len(core_docs)

    print(f"validate_crs: {checked} custom resources in {len(paths)} files checked against {versions()}: "
          f"{failures} errors, {passed_on} core documents passed on")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------
# --self-test: broken copies of the rendered custom resources must be rejected.

def _parent(doc: dict, path: str) -> tuple[object, object]:
    """The container of the dotted path's last step (list indexes as numbers), and that step."""
    *parents, last = path.split(".")
    node: object = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, int(last) if isinstance(node, list) else last


def _set(path: str, value: object) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, last = _parent(doc, path)
        node[last] = value
    return apply


def _drop(path: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, last = _parent(doc, path)
        del node[last]
    return apply


def _rename(path: str, new: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        node, last = _parent(doc, path)
        node[new] = node.pop(last)
    return apply


# kind -> (what is broken, mutation). Paths follow what the chart renders.
BROKEN: dict[str, list[tuple[str, Callable[[dict], None]]]] = {
    "ScaledObject": [
        ("unknown top-level field", _set("bogus", 1)),
        ("misspelt spec field pollingIntervall", _set("spec.pollingIntervall", 5)),
        ("Python-style name polling_interval", _rename("spec.pollingInterval", "polling_interval")),
        ("listName beside metadata in a trigger", _set("spec.triggers.0.listName", "x")),
        ("unknown scalingModifiers field", _set("spec.advanced.scalingModifiers.formulae", "x")),
        ("unknown HPA behavior field", _set("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.window", 5)),
        ("string for an integer", _set("spec.pollingInterval", "5")),
        ("integer for a trigger metadata string", _set("spec.triggers.0.metadata.listLength", 5)),
        ("missing scaleTargetRef", _drop("spec.scaleTargetRef")),
        ("misspelt metadata.lables", _set("metadata.lables", {"a": "b"})),
    ],
    "TriggerAuthentication": [
        ("unknown secretTargetRef field", _set("spec.secretTargetRef.0.secret", "x")),
        ("missing secretTargetRef key", _drop("spec.secretTargetRef.0.key")),
    ],
    "ServiceMonitor": [
        ("misspelt endpoint intervall", _set("spec.endpoints.0.intervall", "5s")),
        ("misspelt selector matchLabel", _set("spec.selector.matchLabel", {})),
        ("scheme outside its enum", _set("spec.endpoints.0.scheme", "gopher")),
    ],
    "PrometheusRule": [
        ("misspelt rule field exp", _set("spec.groups.0.rules.0.exp", "up")),
        ("misspelt group field rule", _set("spec.groups.0.rule", [])),
        ("missing rule expr", _drop("spec.groups.0.rules.0.expr")),
    ],
}


def self_test(path: Path) -> int:
    docs = documents(path)
    models = load_models({d.get("apiVersion", "") for d in docs})
    docs = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in models]
    failures = 0
    covered = set()
    for doc in docs:
        model = models[(doc["apiVersion"], doc["kind"])]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        errors = errors_of(model, doc)
        if errors:
            print(f"FAIL {where} as rendered is rejected: {errors[0]}")
            failures += 1
            continue
        print(f"ok   {where} as rendered is accepted")
        if doc["kind"] in covered:
            continue
        covered.add(doc["kind"])
        for what, mutate in BROKEN.get(doc["kind"], []):
            broken = copy.deepcopy(doc)
            try:
                mutate(broken)
            except (KeyError, IndexError, TypeError):
                print(f"FAIL {where}: cannot apply '{what}' (the chart renders something else now)")
                failures += 1
                continue
            errors = errors_of(model, broken)
            if errors:
                print(f"ok   {where} with {what}: rejected ({errors[0]})")
            else:
                print(f"FAIL {where} with {what}: accepted")
                failures += 1
    missing = set(BROKEN) - covered
    for kind in sorted(missing):
        print(f"FAIL no {kind} in {path.name} to break (render with every optional part on)")
        failures += 1
    print(f"validate_crs --self-test ({versions()}): {failures} failures")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core-out-dir", type=Path, help="write the non-custom documents of X.yaml to DIR/core-X.yaml")
    parser.add_argument("--self-test", action="store_true", help="prove that broken copies are rejected")
    parser.add_argument("rendered", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.self_test:
        return max(self_test(p) for p in args.rendered)
    return validate(args.rendered, args.core_out_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
