#!/usr/bin/env python3
"""Validate the custom resources of rendered Helm output against their CRDs, offline.

Usage: validate_crs.py --crds DIR [--core-out FILE] RENDERED.yaml...

Every document whose apiVersion/kind is defined by a CRD in DIR (KEDA ScaledObject and
TriggerAuthentication, prometheus-operator ServiceMonitor and PrometheusRule) is validated with
jsonschema against that CRD's openAPIV3Schema. The schema is first made strict: every object schema
that lists `properties` and says nothing about extra keys gets `additionalProperties: false`, so a
misspelt field (`pollingIntervall`, `listname` at the wrong level) is an error instead of being
silently dropped by the API server. Free-form maps (`additionalProperties: {...}`) and
`x-kubernetes-preserve-unknown-fields` stay open, as the API server treats them.

Documents of other kinds are core resources: with --core-out they are written to FILE for
kubernetes-validate. A document with a custom-looking apiVersion (a dotted group) but no CRD in DIR
is an error, so a new custom kind cannot slip through unvalidated.

Exit status: 0 when every custom resource is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import jsonschema
import yaml

# apiVersion groups served by Kubernetes itself (validated by kubernetes-validate instead).
CORE_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
    "admissionregistration.k8s.io", "apiextensions.k8s.io", "certificates.k8s.io", "node.k8s.io",
    "events.k8s.io", "flowcontrol.apiserver.k8s.io", "resource.k8s.io",
}


def strict(schema: object) -> object:
    """Return a copy of an OpenAPI v3 schema that rejects unknown properties everywhere."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(crd_dir: Path) -> dict[tuple[str, str], dict]:
    """Map (apiVersion, kind) to a strict JSON schema for every served version of every CRD."""
    schemas: dict[tuple[str, str], dict] = {}
    files = sorted(crd_dir.glob("*.yaml")) + sorted(crd_dir.glob("*.yml"))
    if not files:
        raise SystemExit(f"validate_crs: no CRD files in {crd_dir}")
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # ObjectMeta is only `type: object` in CRDs; give it the fields we rely on.
                schema.setdefault("properties", {})["metadata"] = {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "namespace": {"type": "string"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
                for key in ("apiVersion", "kind"):
                    schema["properties"].setdefault(key, {"type": "string"})
                api_version = f"{spec['group']}/{version['name']}"
                schemas[(api_version, spec["names"]["kind"])] = strict(schema)
    return schemas


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crds", required=True, type=Path, help="folder with CRD yaml files")
    parser.add_argument("--core-out", type=Path, help="write the non-custom documents here")
    parser.add_argument("rendered", nargs="+", type=Path)
    args = parser.parse_args(argv)

    schemas = load_crds(args.crds)
    core_docs: list[dict] = []
    failures = 0
    checked = 0
    for path in args.rendered:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "?")
            where = f"{path.name}: {kind}/{name}"
            key = (api_version, kind)
            if key not in schemas:
                if group_of(api_version) in CORE_GROUPS:
                    core_docs.append(doc)
                else:
                    print(f"FAIL {where}: no CRD for {api_version} {kind} in {args.crds}")
                    failures += 1
                continue
            checked += 1
            validator = jsonschema.Draft7Validator(schemas[key])
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for err in errors:
                loc = ".".join(str(p) for p in err.absolute_path) or "<root>"
                print(f"FAIL {where}: {loc}: {err.message}")
            failures += len(errors)
            if not errors:
                print(f"ok   {where} ({api_version})")

    if args.core_out:
        args.core_out.write_text(yaml.safe_dump_all(core_docs, sort_keys=False))
    print(f"validate_crs: {checked} custom resources checked, {failures} errors, "
          f"{len(core_docs)} core documents passed on")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
