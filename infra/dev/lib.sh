# shellcheck shell=bash
# Shared helpers for the infra/dev scripts. Source it; it does not change shell
# options (each script sets `set -euo pipefail` itself).
#
# Naming: script variables use the KEELDEV_ prefix. KEEL_* belongs to the
# services' config loader, which rejects unknown KEEL_* variables (exit 78), so
# nothing here may leak such a name into the environment. Nothing below is
# exported except the port numbers from stack.env.

# Repo root from this file's location rather than `git rev-parse`, so the
# scripts also work from an exported tree and from any working directory.
KEELDEV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# .keel/ is gitignored: binaries, resolved stack.env, logs, pid files of what
# runs as the invoking user. Overridable so a second, throw-away stack can be
# tried without touching the main one (e.g. KEELDEV_HOME=/tmp/keel-try).
: "${KEELDEV_HOME:=$KEELDEV_ROOT/.keel}"
KEELDEV_RUN="$KEELDEV_HOME/run"

# Runtime directory for everything the postgres OS user must reach (local
# Postgres data dir and socket, pgbouncer config, auth file, log, pid, binary).
# It lives outside the clone because a clone under a 0700 home (/root, ...) is
# unreadable to that user. One per KEELDEV_HOME (short hash of its path), so a
# throw-away home never shares state with the main one. Overridable with
# KEELDEV_RUNTIME_DIR; the path in use is recorded in $KEELDEV_HOME/runtime-dir.
keeldev_hash() { printf '%s' "$1" | sha256sum | cut -c1-10; }
: "${KEELDEV_RUNTIME_DIR:=/var/tmp/keel-$(keeldev_hash "$(realpath -m "$KEELDEV_HOME")")}"

if [[ -n ${KEEL_HOME:-} ]]; then
    printf '[keel] WARNING: KEEL_HOME is ignored (and breaks the services, which reject unknown KEEL_* variables); use KEELDEV_HOME\n' >&2
fi

# shellcheck source=stack.env
. "$KEELDEV_ROOT/infra/dev/stack.env"
# Export so child processes (psql wrappers, services) see the same values.
export PG_PORT PG_LOCAL_PORT PGBOUNCER_PORT REDIS_PORT REDIS_LOCAL_PORT \
    AMQP_PORT AMQP_LOCAL_PORT AMQP_MGMT_PORT AMQP_LOCAL_MGMT_PORT \
    AMQP_LOCAL_DIST_PORT SMTP_PORT SMTP_HTTP_PORT

# The services: infra/services.toml, read by registry.sh. It sets KEELDEV_SERVICES,
# KEELDEV_DB_SERVICES (those that own a database; roles "<name>_owner"/"<name>_app",
# dev passwords "<role>_dev"), KEELDEV_ROLE_PREFIXES and one exported
# <NAME>_<KIND>_PORT per service port (the environment's value wins).
# shellcheck source=registry.sh
. "$KEELDEV_ROOT/infra/dev/registry.sh"

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
    # /proc too: kill -0 fails with EPERM for another user's process (an
    # unprivileged `up` looking at pgbouncer, which runs as postgres).
    kill -0 "$pid" 2>/dev/null || [[ -d /proc/$pid ]] || return 1
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
        need_root "running $(basename "$1") as the postgres OS user (runuser)"
        # cd /: the caller's cwd may be unreadable to postgres (a clone in /root).
        (cd / && runuser -u postgres -- "$@")
    fi
}

# need_root WHAT: die unless root, naming exactly what needs it. Only called
# where root is really required (apt-get, running something as postgres).
need_root() {
    [[ $(id -u) -eq 0 ]] || die "$1 needs root; re-run as root (only apt-get installs and what runs as the postgres OS user do)"
}

# apt_install PKG...: install missing packages; `apt-get update` at most once
# per run and only when something actually has to be installed.
#
# Packages are installed WITHOUT starting their services: a temporary
# /usr/sbin/policy-rc.d that exits 101 ("action forbidden") makes
# invoke-rc.d / deb-systemd-invoke skip every start. Otherwise redis-server,
# rabbitmq-server and postgresql would come up on the default ports, and the
# next `up` would try to reuse instances it cannot administer. For postgresql,
# createcluster.conf additionally says create_main_cluster = false, so no
# 15/main cluster is created at all.
KEELDEV_APT_UPDATED=${KEELDEV_APT_UPDATED:-0}
KEELDEV_POLICY_RC=/usr/sbin/policy-rc.d
apt_install() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    need_root "installing ${missing[*]} (apt-get)"
    # Subshell: the trap is scoped to the install and always restores
    # policy-rc.d (success, failure under set -e, or Ctrl-C).
    (
        local backup=""
        trap 'rm -f "$KEELDEV_POLICY_RC"; if [[ -n $backup ]]; then mv -f "$backup" "$KEELDEV_POLICY_RC"; fi' EXIT
        trap 'exit 130' INT TERM HUP
        if [[ -e $KEELDEV_POLICY_RC || -L $KEELDEV_POLICY_RC ]]; then
            backup=$(mktemp "$KEELDEV_POLICY_RC.keel-backup.XXXXXX")
            cp -a "$KEELDEV_POLICY_RC" "$backup"
        fi
        printf '#!/bin/sh\n# Temporary, written by Keel infra/dev (apt_install): start nothing.\nexit 101\n' \
            >"$KEELDEV_POLICY_RC.tmp.$$"
        chmod 0755 "$KEELDEV_POLICY_RC.tmp.$$"
        mv -f "$KEELDEV_POLICY_RC.tmp.$$" "$KEELDEV_POLICY_RC"

        for p in "${missing[@]}"; do
            case $p in
            postgresql | postgresql-[0-9]*) no_main_cluster ;;
            esac
        done
        if [[ $KEELDEV_APT_UPDATED != 1 ]]; then
            log "apt-get update"
            apt-get update -q >&2
        fi
        log "apt-get install ${missing[*]} (service start-up suppressed)"
        # confold: keep a config file we (or the admin) wrote, e.g. our
        # createcluster.conf; UCF_FORCE_CONFFOLD does the same for ucf.
        DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get install -y -q \
            --no-install-recommends -o Dpkg::Options::=--force-confdef \
            -o Dpkg::Options::=--force-confold "${missing[@]}" >&2
    )
    KEELDEV_APT_UPDATED=1
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Before postgresql-common is installed (and configured) for the first time:
# create_main_cluster = false. Never touches an installed postgresql-common,
# whose clusters and createcluster.conf belong to the admin.
no_main_cluster() {
    local conf=/etc/postgresql-common/createcluster.conf
    pkg_installed postgresql-common && return 0
    mkdir -p "${conf%/*}"
    if [[ -f $conf ]] && grep -Eq '^[#[:space:]]*create_main_cluster' "$conf"; then
        sed -Ei 's/^[#[:space:]]*create_main_cluster.*/create_main_cluster = false/' "$conf"
    elif [[ -f $conf ]]; then
        printf 'create_main_cluster = false\n' >>"$conf"
    else
        printf '# Written by Keel infra/dev/stack.sh: no cluster on install.\ncreate_main_cluster = false\n' >"$conf"
    fi
    log "postgresql: create_main_cluster = false in $conf (no 5432 cluster on install)"
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

# ------------------------------------------------------ runtime directory --

# ensure_runtime_dir: create $KEELDEV_RUNTIME_DIR (0755, so the postgres user
# can traverse it; the subdirectories holding secrets are 0700 postgres) and
# record its path in $KEELDEV_HOME/runtime-dir.
ensure_runtime_dir() {
    local d=$KEELDEV_RUNTIME_DIR
    [[ -d $d ]] || mkdir -m 0755 "$d" 2>/dev/null || [[ -d $d ]] || die "cannot create $d"
    # /var/tmp is world-writable: refuse a directory (or symlink) planted by
    # someone else under our predictable name.
    if [[ -L $d ]] || { [[ ! -O $d ]] && [[ $(stat -c %u "$d") != 0 ]]; }; then
        die "$d is not a directory owned by root or $(id -un); remove it or set KEELDEV_RUNTIME_DIR"
    fi
    [[ ! -O $d || $(stat -c %a "$d") == 755 ]] || chmod 0755 "$d"
    mkdir -p "$KEELDEV_HOME"
    if [[ "$(cat "$KEELDEV_HOME/runtime-dir" 2>/dev/null)" != "$d" ]]; then
        printf '%s\n' "$d" >"$KEELDEV_HOME/runtime-dir"
    fi
}

# Project-local Postgres. $KEELDEV_HOME/postgres/data is the marker that makes
# the choice sticky: a symlink to the data dir in the runtime directory (or, for
# stacks created before the runtime directory existed, the data dir itself).
KEELDEV_PG_MARK="$KEELDEV_HOME/postgres/data"
pg_local_sticky() { [[ -e $KEELDEV_PG_MARK || -L $KEELDEV_PG_MARK ]]; }
# pg_local_dir: parent of data/, sock/ and postgres.log.
pg_local_dir() {
    if [[ -d $KEELDEV_PG_MARK && ! -L $KEELDEV_PG_MARK ]]; then
        printf '%s\n' "$KEELDEV_HOME/postgres"
    else
        printf '%s\n' "$KEELDEV_RUNTIME_DIR/postgres"
    fi
}

# pg_mode: "local" or "system", as decided by the last `up` (falls back to the
# sticky marker when `up` has not run).
pg_mode() {
    local m
    m=$(cat "$KEELDEV_RUN/postgres.mode" 2>/dev/null || true)
    if [[ $m == local || $m == system ]]; then
        printf '%s\n' "$m"
    elif pg_local_sticky; then
        echo local
    else
        echo system
    fi
}

# psql_admin PORT PSQL-ARGS...: psql as superuser postgres, database postgres.
# TCP on 127.0.0.1 first (our local instance trusts loopback; CI's system one
# is set up for it). If TCP is refused, fall back to the Unix socket as the
# postgres OS user (peer/trust): the local instance's socket dir, or Debian's
# /var/run/postgresql for a system instance. Files must come in on stdin
# (`-f -`): the postgres user may not be able to read the clone.
KEELDEV_PSQL_VIA=
psql_admin() {
    local port=$1 sock
    shift
    command -v psql >/dev/null 2>&1 || apt_install postgresql-client
    if [[ $KEELDEV_PSQL_VIA != "$port:"* ]]; then
        if psql -X -w -q -tA -h 127.0.0.1 -p "$port" -U postgres -d postgres -c 'select 1' >/dev/null 2>&1; then
            KEELDEV_PSQL_VIA="$port:127.0.0.1"
        else
            if [[ $(pg_mode) == local ]]; then
                sock="$(pg_local_dir)/sock"
            else
                sock=/var/run/postgresql
            fi
            [[ -S $sock/.s.PGSQL.$port ]] ||
                die "cannot connect to Postgres on 127.0.0.1:$port as postgres over TCP, and no socket $sock/.s.PGSQL.$port"
            KEELDEV_PSQL_VIA="$port:$sock"
            log "postgres: TCP login as postgres refused on $port; using $sock as the postgres OS user"
        fi
    fi
    local host=${KEELDEV_PSQL_VIA#*:}
    if [[ $host == 127.0.0.1 ]]; then
        psql -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"
    else
        as_postgres psql -X -w -q -v ON_ERROR_STOP=1 -h "$host" -p "$port" -U postgres -d postgres "$@"
    fi
}
