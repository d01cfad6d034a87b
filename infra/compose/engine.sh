#!/usr/bin/env bash
# A Docker engine for `make test-compose` and `make up`, on a machine that may have none.
#
#   engine.sh start   prints `export DOCKER_HOST=...` for an engine that answers: the one the
#                     environment already points at, else a project-local dockerd under
#                     .keel/docker/ (started here, as root; Debian's docker.io, installed if
#                     missing) whose pid this script records
#   engine.sh stop    stops the project-local dockerd, if this script started one; an engine it
#                     did not start is never touched
#
# Why a project-local daemon and not the system's: CI and a developer's laptop may have no
# daemon running (or one we must not reconfigure); this one lives and dies with the test, its
# images and volumes under .keel/docker/root, and nothing else on the machine sees it.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../dev/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

D="$KEELDEV_HOME/docker"
SOCK="$D/docker.sock"
PIDFILE="$D/dockerd.pid"
# Debian's client: with DOCKER_BUILDKIT=1 it builds with BuildKit (cache mounts), which the
# newer client at /usr/local/bin cannot without buildx.
DOCKER=/usr/bin/docker

answers() { DOCKER_HOST=$1 timeout 10 "$DOCKER" info >/dev/null 2>&1; }

ensure_packages() {
    # docker.io: dockerd and a client that builds with BuildKit; docker-compose 1.29 (the
    # Compose v2 plugin is not packaged for Debian 12); debootstrap for the base image.
    [[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || apt_install docker.io
    command -v docker-compose >/dev/null || apt_install docker-compose
    command -v debootstrap >/dev/null || apt_install debootstrap
}

start() {
    ensure_packages
    if [[ -n ${DOCKER_HOST:-} ]] && answers "$DOCKER_HOST"; then
        printf 'export DOCKER_HOST=%q\n' "$DOCKER_HOST"
        return 0
    fi
    if answers "unix://$SOCK"; then
        printf 'export DOCKER_HOST=%q\n' "unix://$SOCK"
        return 0
    fi
    need_root "starting a project-local dockerd"
    mkdir -p "$D/root" "$D/exec"
    log "starting a project-local dockerd ($D)"
    # Its own data root, exec root, socket and pid file: nothing shared with a system engine.
    # --iptables stays on: compose's published ports and container egress (apt, crates.io)
    # need its NAT rules; they are removed again when the daemon stops.
    nohup /usr/sbin/dockerd \
        --data-root "$D/root" --exec-root "$D/exec" \
        --host "unix://$SOCK" --pidfile "$PIDFILE" \
        >"$D/dockerd.log" 2>&1 &
    wait_until 60 "dockerd to answer on $SOCK" answers "unix://$SOCK" ||
        die "dockerd did not start; see $D/dockerd.log"
    printf 'export DOCKER_HOST=%q\n' "unix://$SOCK"
}

stop() {
    [[ -f $PIDFILE ]] || return 0
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the project-local dockerd (pid $pid)"
        kill -TERM "$pid"
        # dockerd stops its containers first (their own grace periods): give it time.
        local deadline=$((SECONDS + 60))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { warn "dockerd did not stop in 60 s; killing it"; kill -KILL "$pid"; }
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 64
    ;;
esac
