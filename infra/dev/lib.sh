# shellcheck shell=bash
# Shared helpers for the infra/dev scripts. Source it; it does not change shell
# options (each script sets `set -euo pipefail` itself).

# Repo root from this file's location rather than `git rev-parse`, so the
# scripts also work from an exported tree and from any working directory.
KEEL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# .keel/ is gitignored: binaries, generated config, data dirs, pid files.
# Overridable so a second, throw-away stack can be tried without touching the
# main one (e.g. KEEL_HOME=/tmp/keel-try).
: "${KEEL_HOME:=$KEEL_ROOT/.keel}"
KEEL_RUN="$KEEL_HOME/run"
export KEEL_ROOT KEEL_HOME KEEL_RUN

# shellcheck source=stack.env
. "$KEEL_ROOT/infra/dev/stack.env"
# Export so child processes (psql wrappers, services) see the same values.
export PG_PORT PG_LOCAL_PORT PGBOUNCER_PORT REDIS_PORT REDIS_LOCAL_PORT \
    AMQP_PORT AMQP_LOCAL_PORT AMQP_MGMT_PORT AMQP_LOCAL_MGMT_PORT \
    AMQP_LOCAL_DIST_PORT CHECKOUT_HTTP_PORT BILLING_GRPC_PORT \
    BILLING_HTTP_PORT NOTIFICATION_HTTP_PORT PSP_SIM_HTTP_PORT

# Services that own a database. The dev passwords follow "<role>_dev" and are
# spelled out in infra/postgres/init.sql; keep both in sync.
# shellcheck disable=SC2034 # used by the scripts that source this file
KEEL_DB_SERVICES=(checkout billing notification)

log() { printf '[keel] %s\n' "$*" >&2; }
warn() { printf '[keel] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[keel] ERROR: %s\n' "$*" >&2
    exit 1
}

# port_open HOST PORT: true if a TCP connect succeeds. Prefer `nc -z`; else
# bash's /dev/tcp, under `timeout` so an unroutable host cannot hang us.
port_open() {
    local host=$1 port=$2
    if command -v nc >/dev/null 2>&1; then
        nc -z -w 1 "$host" "$port" >/dev/null 2>&1
    else
        # shellcheck disable=SC2016 # $0/$1 expand in the child bash, on purpose
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" >/dev/null 2>&1
    fi
}

# wait_until SECONDS DESCRIPTION CMD...: poll CMD until it succeeds or the
# deadline passes. The short sleep only paces the poll; success is decided by
# CMD, never by the passage of time.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            warn "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# wait_for_port HOST PORT SECONDS
wait_for_port() {
    wait_until "$3" "$1:$2 to accept connections" port_open "$1" "$2"
}

# wait_for_port_closed HOST PORT SECONDS
port_closed() { ! port_open "$1" "$2"; }
wait_for_port_closed() {
    wait_until "$3" "$1:$2 to stop accepting connections" port_closed "$1" "$2"
}

# pid_alive PIDFILE [COMM]: the pid in PIDFILE is running (and, if COMM is
# given, its /proc comm starts with COMM, so a recycled pid is not mistaken
# for ours).
pid_alive() {
    local file=$1 comm=${2:-} pid
    [[ -s $file ]] || return 1
    pid=$(head -n1 "$file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -n $comm ]]; then
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm"* ]] || return 1
    fi
}

pid_of() { head -n1 "$1"; }
pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# stop_pidfile NAME PIDFILE COMM SECONDS [SIGNAL]: send SIGNAL (default TERM)
# to the process in PIDFILE if it is ours, poll until it exits, escalate to
# SIGKILL only after the deadline. Never kills by name.
stop_pidfile() {
    local name=$1 file=$2 comm=$3 seconds=$4 sig=${5:-TERM} pid
    if ! pid_alive "$file" "$comm"; then
        log "$name: not running"
        return 0
    fi
    pid=$(pid_of "$file")
    log "$name: stopping pid $pid (SIG$sig)"
    kill "-$sig" "$pid" 2>/dev/null || true
    if ! wait_until "$seconds" "$name (pid $pid) to exit" pid_gone "$pid"; then
        warn "$name: still running after ${seconds}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 10 "$name (pid $pid) to die" pid_gone "$pid" || true
    fi
}

# as_postgres CMD...: run as the postgres OS user (initdb, pg_ctl and
# pgbouncer all refuse to run as root).
as_postgres() {
    if [[ $(id -un) == postgres ]]; then
        "$@"
    else
        runuser -u postgres -- "$@"
    fi
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "$1 needs root (apt-get, runuser)"
}

# apt_install PKG...: install missing packages; `apt-get update` at most once
# per run and only when something actually has to be installed.
KEEL_APT_UPDATED=${KEEL_APT_UPDATED:-0}
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    need_root "installing ${missing[*]}"
    if [[ $KEEL_APT_UPDATED != 1 ]]; then
        log "apt-get update"
        apt-get update -q >&2
        KEEL_APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Newest installed PostgreSQL server bin dir (Debian keeps them versioned).
pg_bindir() {
    local d
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
    [[ -n $d && -x $d/initdb ]] || return 1
    printf '%s\n' "$d"
}

# version_ge A B: A >= B by version sort.
version_ge() {
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}
