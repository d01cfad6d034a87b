#!/usr/bin/env python3
"""Offline schema validation of rendered manifests: every object against the Kubernetes API's
own OpenAPI schemas (the `kubernetes-validate` package ships them), in strict mode, so an
unknown or misspelt field fails as surely as a wrong type.

    validate.py RENDERED.yaml [...]

Checked against two Kubernetes versions: the oldest Keel supports (the floor of KEDA's tested
range; every field the manifests use is there) and the one `k8s/kind-cluster.yaml` pins. An
API removed or a field renamed between them fails here before a cluster refuses it.

Custom resources are skipped, by name, and said so: KEDA's ScaledObject and
TriggerAuthentication have no schema in the package, and writing one by hand would check
our guess of KEDA's API rather than KEDA's API. infra/k8s/policy.py checks what they
reference (the Deployment, the Secret key), and `kubectl apply` against a cluster with KEDA's
CRDs validates them for real (infra/k8s/kind.sh).

Exit 0 when everything passed, 1 when an object failed, 2 when the input cannot be read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import kubernetes_validate
import yaml

VERSIONS = ("1.33.0", "1.36.0")
# API groups of custom resources, with where they are checked instead.
SKIPPED_GROUPS = {
    "keda.sh": "KEDA custom resource: no offline schema; references checked by policy.py",
}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: {Path(argv[0]).name} RENDERED.yaml [...]", file=sys.stderr)
        return 2
    failed = checked = skipped = 0
    for path in argv[1:]:
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d]
        except (OSError, yaml.YAMLError) as e:
            print(f"validate: cannot read {path}: {e}", file=sys.stderr)
            return 2
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            group = str(doc.get("apiVersion", "")).rpartition("/")[0]
            if group in SKIPPED_GROUPS:
                print(f"validate: skipped {name} ({doc['apiVersion']}): {SKIPPED_GROUPS[group]}")
                skipped += 1
                continue
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path) or "(top level)"
                    print(f"validate: {path}: {name} fails Kubernetes {version} at {where}: "
                          f"{e.message}")
                    failed += 1
                except kubernetes_validate.SchemaNotFoundError as e:
                    print(f"validate: {path}: {name}: {e.message}")
                    failed += 1
            checked += 1
    versions = " and ".join(VERSIONS)
    print(f"validate: {checked} objects checked against Kubernetes {versions} (strict), "
          f"{skipped} custom resources skipped, {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
