#!/usr/bin/env bash
# `make up` / `make down-compose`: docker compose with an engine that answers and builds with
# BuildKit (the Dockerfile's cache mounts need it).
#
# The engine: the one DOCKER_HOST names, else a project-local dockerd (engine.sh). The compose
# command: Compose v2 (`docker compose`) where installed; else Debian's docker-compose 1.29,
# told to build through Debian's docker client with BuildKit on (its own builder is the legacy
# one, and the newer client at /usr/local/bin has no buildx to fall back on).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
engine=$("$ROOT/infra/compose/engine.sh" start) || exit 1
eval "$engine"
export DOCKER_HOST
cd "$ROOT"
if docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
fi
command -v docker-compose >/dev/null || {
    echo "compose.sh: neither \`docker compose\` (v2) nor docker-compose is installed" >&2
    exit 69
}
export COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1
PATH="/usr/bin:$PATH" exec docker-compose "$@"
