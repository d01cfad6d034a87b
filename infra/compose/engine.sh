#!/usr/bin/env bash
# A Docker engine for `make test-compose` and `make up`, on a machine that may have none.
#
#   engine.sh start   prints `export DOCKER_HOST=...` for an engine that answers: the one the
#                     environment already points at, else the system's (/var/run/docker.sock),
#                     else a project-local dockerd under .keel/docker/, started here (as root;
#                     Debian's docker.io is installed then, and only then, if dockerd is
#                     missing); exits non-zero, printing nothing, when none can be had
#   engine.sh stop    stops the project-local dockerd, if one runs (its pid file); an engine it
#                     did not start is never touched
#   engine.sh running prints the DOCKER_HOST of an engine that answers now (the one the
#                     environment names, the system's, or the project-local one), or exits 1
#   engine.sh tools   installs what `make test-compose` needs besides an engine (Debian's
#                     docker client, docker-compose, debootstrap); `make up` needs none of it
#                     when an engine answers, so `start` installs nothing then
#
# Why a project-local daemon at all: CI machines have no daemon running. It keeps its images,
# volumes and build cache under .keel/docker/root (several GB; delete the folder to reclaim
# them). It is not isolated from the host's networking: like any dockerd it uses the docker0
# bridge and adds iptables chains and IP forwarding, which stay after it stops. Hence a system
# engine that answers is always preferred, and two daemons are never run side by side.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../dev/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

D="$KEELDEV_HOME/docker"
SOCK="$D/docker.sock"
PIDFILE="$D/dockerd.pid"
# Debian's client: with DOCKER_BUILDKIT=1 it builds with BuildKit (cache mounts), which the
# newer client at /usr/local/bin cannot without buildx.
DOCKER=/usr/bin/docker

# Debian's client, or whatever docker the machine has (only `info` is asked of it here).
answers() {
    local client=$DOCKER
    [[ -x $client ]] || client=$(command -v docker) || return 1
    DOCKER_HOST=$1 timeout 10 "$client" info >/dev/null 2>&1
}

# The tools `make test-compose` uses besides the engine: Debian's docker client (BuildKit
# without buildx), docker-compose 1.29 (Compose v2 is not packaged for Debian 12), debootstrap.
ensure_tools() {
    [[ -x /usr/bin/docker ]] || apt_install docker.io
    command -v docker-compose >/dev/null || apt_install docker-compose
    command -v debootstrap >/dev/null || apt_install debootstrap
}

# The engine that answers now, in order of preference; fails when none does.
running() {
    local host
    for host in "${DOCKER_HOST:-}" unix:///var/run/docker.sock "unix://$SOCK"; do
        if [[ -n $host ]] && answers "$host"; then
            printf '%s\n' "$host"
            return 0
        fi
    done
    return 1
}

start() {
    local host
    if host=$(running); then
        printf 'export DOCKER_HOST=%q\n' "$host"
        return 0
    fi
    need_root "starting a project-local dockerd"
    command -v dockerd >/dev/null || apt_install docker.io
    mkdir -p "$D/root" "$D/exec"
    log "starting a project-local dockerd ($D)"
    # Its own data root, exec root, socket and pid file. --iptables stays on: compose's
    # published ports and the builds' egress (apt, crates.io) need its NAT rules.
    nohup "$(command -v dockerd)" \
        --data-root "$D/root" --exec-root "$D/exec" \
        --host "unix://$SOCK" --pidfile "$PIDFILE" \
        >"$D/dockerd.log" 2>&1 &
    local pid=$!
    if ! wait_until 60 "dockerd to answer on $SOCK" answers "unix://$SOCK"; then
        kill -TERM "$pid" 2>/dev/null || true
        die "dockerd did not start; see $D/dockerd.log"
    fi
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
running) running ;;
tools) ensure_tools ;;
*)
    echo "usage: $0 start|stop|running|tools" >&2
    exit 64
    ;;
esac
