#!/usr/bin/env bash
# Keel dependency stack: PostgreSQL, PgBouncer, Redis, RabbitMQ.
#
#   infra/dev/stack.sh up      ensure everything runs; write .keel/stack.env
#   infra/dev/stack.sh down    stop only what `up` started (never system services)
#   infra/dev/stack.sh status  print each dependency and where it runs
#   infra/dev/stack.sh env     print the resolved .keel/stack.env
#
# Policy for Postgres, Redis and RabbitMQ: if something answers on the
# configured *_PORT (infra/dev/stack.env), reuse it as is (that is how CI and a
# developer's own services are used). Otherwise install the package if needed
# (without letting apt start its system service) and run a project-local
# instance on *_LOCAL_PORT. The choice is sticky: once a project-local instance
# has a data dir (.keel/postgres/data, .keel/redis, .keel/rabbitmq/mnesia),
# that dependency stays local whatever answers on the default port later.
# PgBouncer is always ours (unless something else already answers on
# PGBOUNCER_PORT).
#
# Where things live: .keel/ (in the clone) holds stack.env, run/, logs, the
# Redis and RabbitMQ dirs and a world-readable copy of pgbouncer.ini. What the
# postgres OS user must reach (local Postgres data dir, pgbouncer config, auth
# file, log, pid and binary) lives in the runtime dir outside the clone,
# /var/tmp/keel-<hash>/ (path recorded in .keel/runtime-dir): a clone under a
# 0700 home would be unreadable to that user.
#
# State under .keel/run/: <dep>.mode is "system" or "local" (what `up` decided
# last), <dep>.local marks an instance `up` started and `down` may stop.
#
# Root is needed only to apt-get install something or to run something as the
# postgres OS user (local Postgres, pgbouncer); with every dependency reused and
# pgbouncer already running with the current config, `up` works unprivileged.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RESOLVED_ENV="$KEELDEV_HOME/stack.env"
RT="$KEELDEV_RUNTIME_DIR"
PG_DIR="$(pg_local_dir)"
REDIS_DIR="$KEELDEV_HOME/redis"
RABBIT_DIR="$KEELDEV_HOME/rabbitmq"
RABBIT_LOCAL_NODE=keel@localhost
# pgbouncer's real files: runtime dir, owned by postgres; the auth file is 0600.
PGB_DIR="$RT/pgbouncer"
PGB_INI="$PGB_DIR/pgbouncer.ini"
PGB_PIDFILE="$PGB_DIR/pgbouncer.pid"
PGB_STAMP="$RT/pgbouncer.sha256"
# Copy of the binary the postgres user can execute (.keel/bin may not be).
PGB_BIN="$RT/bin/pgbouncer"
# World-readable copy of the generated ini for the Rust tests (P07 reads
# max_db_connections and max_prepared_statements from it).
PGB_PUBLIC_DIR="$KEELDEV_HOME/pgbouncer"
PGB_PUBLIC_INI="$PGB_PUBLIC_DIR/pgbouncer.ini"
# Where older versions of this script ran pgbouncer from (inside the clone).
PGB_LEGACY_PIDFILE="$PGB_PUBLIC_DIR/pgbouncer.pid"
PGB_TEMPLATE="$KEELDEV_ROOT/infra/pgbouncer/pgbouncer.ini.tmpl"
INIT_SQL="$KEELDEV_ROOT/infra/postgres/init.sql"
: "${AMQP_MGMT_USER:=guest}"
: "${AMQP_MGMT_PASSWORD:=guest}"
AMQP_VHOST=keel

# Resolved ports, filled in by `up`.
R_PG_PORT=
R_REDIS_PORT=
R_AMQP_PORT=
R_AMQP_MGMT_PORT=
R_PGBOUNCER_PORT=

set_mode() { printf '%s\n' "$2" >"$KEELDEV_RUN/$1.mode"; }
get_mode() { cat "$KEELDEV_RUN/$1.mode" 2>/dev/null || echo unknown; }

# Serialise up/down: two concurrent `up`s (parallel CI jobs, a script and a
# developer) must not both decide to start the same local instance.
# Every daemon we spawn gets `9>&-`: a daemon inheriting fd 9 would hold the
# lock for its whole life and block every later up/down.
take_lock() {
    mkdir -p "$KEELDEV_RUN"
    exec 9>"$KEELDEV_RUN/stack.lock"
    flock -w 300 9 || die "another stack.sh holds $KEELDEV_RUN/stack.lock for > 300 s"
}

# ---------------------------------------------------------------- Postgres --

pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p "$1" -t 2
    else
        port_open 127.0.0.1 "$1"
    fi
}

pg_local_pidfile() { printf '%s\n' "$PG_DIR/data/postmaster.pid"; }

# need_privileges WHAT: root, or already the postgres OS user.
need_privileges() {
    [[ $(id -un) == postgres ]] || need_root "$1"
}

up_postgres() {
    if pg_local_sticky || [[ -e $RT/postgres/data ]]; then
        if port_open 127.0.0.1 "$PG_PORT"; then
            log "postgres: staying project-local ($KEELDEV_PG_MARK exists), although 127.0.0.1:$PG_PORT answers"
        fi
        use_local_postgres
    elif port_open 127.0.0.1 "$PG_PORT"; then
        log "postgres: reusing 127.0.0.1:$PG_PORT"
        set_mode postgres system
        R_PG_PORT=$PG_PORT
    else
        use_local_postgres
    fi
    wait_until 60 "postgres on $R_PG_PORT to accept queries" pg_ready "$R_PG_PORT" ||
        die "postgres on 127.0.0.1:$R_PG_PORT is not ready"
}

use_local_postgres() {
    R_PG_PORT=$PG_LOCAL_PORT
    set_mode postgres local
    if pid_alive "$(pg_local_pidfile)" postgres && port_open 127.0.0.1 "$PG_LOCAL_PORT"; then
        log "postgres: project-local instance already up on 127.0.0.1:$PG_LOCAL_PORT"
    elif port_open 127.0.0.1 "$PG_LOCAL_PORT"; then
        if [[ -r $PG_DIR/data ]]; then
            warn "postgres: something that is not ours answers on $PG_LOCAL_PORT; using it"
        else
            log "postgres: 127.0.0.1:$PG_LOCAL_PORT answers (cannot read $PG_DIR as $(id -un) to check it is ours)"
        fi
    else
        start_local_postgres
    fi
}

start_local_postgres() {
    local bindir
    need_privileges "starting the project-local Postgres (initdb and pg_ctl run as the postgres OS user)"
    bindir=$(pg_bindir) || {
        apt_install postgresql
        bindir=$(pg_bindir) || die "no PostgreSQL server binaries after installing postgresql"
    }
    ensure_runtime_dir
    mkdir -p "$PG_DIR/sock"
    chown postgres:postgres "$PG_DIR" "$PG_DIR/sock"
    chmod 0700 "$PG_DIR"
    as_postgres test -x "$PG_DIR" || die "the postgres OS user cannot reach $PG_DIR (check the permissions of its parents)"
    if ! as_postgres test -s "$PG_DIR/data/PG_VERSION"; then
        log "postgres: initdb $PG_DIR/data"
        # trust for local (Unix socket) and host connections: initdb writes
        # pg_hba lines for 127.0.0.1/32 and ::1/128 with it, so the admin psql
        # calls can use TCP as postgres without a password. The server only
        # listens on loopback (listen_addresses below).
        as_postgres "$bindir/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=trust >"$KEELDEV_RUN/postgres-initdb.log" 2>&1 ||
            die "initdb failed, see $KEELDEV_RUN/postgres-initdb.log"
        # Loopback only, trust auth (set by initdb above): a throw-away dev
        # server. Durability is traded for speed since the data is disposable.
        as_postgres tee -a "$PG_DIR/data/postgresql.conf" >/dev/null <<CONF

# --- keel (infra/dev/stack.sh) ---
listen_addresses = '127.0.0.1'
max_connections = 100
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    fi
    # Sticky marker in the clone (see pg_local_sticky in lib.sh).
    if [[ $PG_DIR == "$RT/postgres" && "$(readlink "$KEELDEV_PG_MARK" 2>/dev/null)" != "$PG_DIR/data" ]]; then
        mkdir -p "${KEELDEV_PG_MARK%/*}"
        ln -sfn "$PG_DIR/data" "$KEELDEV_PG_MARK"
    fi
    log "postgres: starting project-local instance on 127.0.0.1:$PG_LOCAL_PORT (data $PG_DIR/data)"
    # -w -t 60: pg_ctl itself polls until the server accepts connections,
    # bounded at 60 s.
    as_postgres "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-p $PG_LOCAL_PORT -k $PG_DIR/sock" start >&2 9>&- ||
        die "postgres did not start, see $PG_DIR/postgres.log"
    printf '%s\n' "$PG_LOCAL_PORT" >"$KEELDEV_RUN/postgres.local"
}

run_init_sql() {
    # The roles and databases are the registry's (infra/services.toml): init.sql is generic
    # and takes the lists as psql variables. On stdin: psql may run as the postgres OS user
    # (see psql_admin in lib.sh).
    local services extra
    services=$(IFS=,; echo "${KEELDEV_DB_SERVICES[*]}")
    extra=$(IFS=,; echo "${KEELDEV_ROLE_PREFIXES[*]}")
    psql_admin "$R_PG_PORT" -v services="$services" -v extra_roles="$extra" -f - <"$INIT_SQL" >/dev/null ||
        die "infra/postgres/init.sql failed on port $R_PG_PORT"
}

down_postgres() {
    [[ -f $KEELDEV_RUN/postgres.local ]] || return 0
    local bindir
    if pid_alive "$(pg_local_pidfile)" postgres && bindir=$(pg_bindir); then
        need_privileges "stopping the project-local Postgres (pg_ctl runs as the postgres OS user)"
        log "postgres: stopping project-local instance"
        # -m fast: roll back open transactions; -w -t 60: bounded wait.
        as_postgres "$bindir/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >&2 ||
            stop_pidfile postgres "$(pg_local_pidfile)" postgres 30 TERM
    fi
    rm -f "$KEELDEV_RUN/postgres.local"
}

# ------------------------------------------------------------------- Redis --

# redis_ping PORT: RESP PING over /dev/tcp, so it works without redis-cli.
redis_ping() {
    # shellcheck disable=SC2016 # $0 expands in the child bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"; printf "PING\r\n" >&3; IFS= read -r l <&3; [[ $l == "+PONG"* ]]' "$1" 2>/dev/null
}

up_redis() {
    local pidfile="$KEELDEV_RUN/redis.pid"
    if [[ -d $REDIS_DIR ]]; then
        port_open 127.0.0.1 "$REDIS_PORT" &&
            log "redis: staying project-local ($REDIS_DIR exists), although 127.0.0.1:$REDIS_PORT answers"
    fi
    if [[ ! -d $REDIS_DIR ]] && port_open 127.0.0.1 "$REDIS_PORT"; then
        log "redis: reusing 127.0.0.1:$REDIS_PORT"
        set_mode redis system
        R_REDIS_PORT=$REDIS_PORT
    else
        R_REDIS_PORT=$REDIS_LOCAL_PORT
        set_mode redis local
        if pid_alive "$pidfile" redis-server && port_open 127.0.0.1 "$REDIS_LOCAL_PORT"; then
            log "redis: project-local instance already up on 127.0.0.1:$REDIS_LOCAL_PORT"
        elif port_open 127.0.0.1 "$REDIS_LOCAL_PORT"; then
            warn "redis: something that is not ours answers on $REDIS_LOCAL_PORT; using it"
        else
            command -v redis-server >/dev/null 2>&1 || apt_install redis-server
            mkdir -p "$REDIS_DIR"
            log "redis: starting project-local instance on 127.0.0.1:$REDIS_LOCAL_PORT"
            # --save "" / appendonly no: nothing to persist for dev and tests.
            redis-server --bind 127.0.0.1 --port "$REDIS_LOCAL_PORT" --daemonize yes \
                --pidfile "$pidfile" --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
                --save "" --appendonly no >&2 9>&-
            printf '%s\n' "$REDIS_LOCAL_PORT" >"$KEELDEV_RUN/redis.local"
        fi
    fi
    wait_until 30 "redis PING on $R_REDIS_PORT" redis_ping "$R_REDIS_PORT" ||
        die "redis on 127.0.0.1:$R_REDIS_PORT does not answer PING"
}

down_redis() {
    [[ -f $KEELDEV_RUN/redis.local ]] || return 0
    stop_pidfile redis "$KEELDEV_RUN/redis.pid" redis-server 30 TERM
    rm -f "$KEELDEV_RUN/redis.local" "$KEELDEV_RUN/redis.pid"
}

# ---------------------------------------------------------------- RabbitMQ --

# Environment of the project-local node: its own name, ports, data, logs, pid
# file, config, enabled-plugins file and Erlang cookie (HOME), so nothing of
# the system node (rabbit@localhost, /etc/rabbitmq, /var/lib/rabbitmq) is read
# or written. epmd is shared, which is fine: it is a name registry.
rabbit_local_env() {
    env HOME="$RABBIT_DIR" \
        RABBITMQ_NODENAME="$RABBIT_LOCAL_NODE" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_LOCAL_PORT" \
        RABBITMQ_DIST_PORT="$AMQP_LOCAL_DIST_PORT" \
        RABBITMQ_CONF_ENV_FILE="$RABBIT_DIR/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$RABBIT_DIR/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$RABBIT_DIR/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_DIR/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$RABBIT_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$RABBIT_DIR/log" \
        RABBITMQ_PID_FILE="$KEELDEV_RUN/rabbitmq.pid" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        "$@"
}

# The Debian wrappers in /usr/sbin switch to the rabbitmq user and ignore our
# HOME; the local node runs as the invoking user, so call the real scripts.
RABBIT_SBIN=/usr/lib/rabbitmq/bin

mgmt_api_up() {
    curl -fsS -o /dev/null -m 3 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" \
        "http://127.0.0.1:$1/api/whoami" 2>/dev/null
}

up_rabbitmq() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    if [[ -d $RABBIT_DIR/mnesia ]]; then
        port_open 127.0.0.1 "$AMQP_PORT" &&
            log "rabbitmq: staying project-local ($RABBIT_DIR/mnesia exists), although 127.0.0.1:$AMQP_PORT answers"
    fi
    if [[ ! -d $RABBIT_DIR/mnesia ]] && port_open 127.0.0.1 "$AMQP_PORT"; then
        log "rabbitmq: reusing 127.0.0.1:$AMQP_PORT"
        set_mode rabbitmq system
        R_AMQP_PORT=$AMQP_PORT
        R_AMQP_MGMT_PORT=$AMQP_MGMT_PORT
        if ! mgmt_api_up "$R_AMQP_MGMT_PORT"; then
            # Online plugin enable on the running system node; its nodename
            # comes from /etc/rabbitmq/rabbitmq-env.conf via the wrapper. This
            # is the only change made to a system service (allowed: it adds
            # the HTTP API, it does not restart the node).
            log "rabbitmq: enabling rabbitmq_management on the system node"
            need_root "enabling rabbitmq_management on the system RabbitMQ node (rabbitmq-plugins)"
            timeout 120 rabbitmq-plugins enable rabbitmq_management >&2 ||
                die "rabbitmq-plugins enable rabbitmq_management failed"
        fi
    else
        R_AMQP_PORT=$AMQP_LOCAL_PORT
        R_AMQP_MGMT_PORT=$AMQP_LOCAL_MGMT_PORT
        set_mode rabbitmq local
        if pid_alive "$KEELDEV_RUN/rabbitmq.pid" beam && port_open 127.0.0.1 "$AMQP_LOCAL_PORT"; then
            log "rabbitmq: project-local node already up on 127.0.0.1:$AMQP_LOCAL_PORT"
        elif port_open 127.0.0.1 "$AMQP_LOCAL_PORT"; then
            warn "rabbitmq: something that is not ours answers on $AMQP_LOCAL_PORT; using it"
        else
            start_local_rabbitmq
        fi
        wait_for_port 127.0.0.1 "$R_AMQP_PORT" 120 ||
            die "rabbitmq did not open 127.0.0.1:$R_AMQP_PORT, see $RABBIT_DIR/log"
    fi
    # Plugin enable returns before the HTTP listener is up; poll the API.
    wait_until 120 "RabbitMQ management API on $R_AMQP_MGMT_PORT" mgmt_api_up "$R_AMQP_MGMT_PORT" ||
        die "RabbitMQ management API on 127.0.0.1:$R_AMQP_MGMT_PORT does not answer"
    local base="http://127.0.0.1:$R_AMQP_MGMT_PORT/api"
    # PUT is idempotent for both (201 created / 204 unchanged).
    curl -fsS -o /dev/null -m 10 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" -X PUT \
        -H 'content-type: application/json' "$base/vhosts/$AMQP_VHOST" ||
        die "could not create RabbitMQ vhost $AMQP_VHOST"
    curl -fsS -o /dev/null -m 10 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" -X PUT \
        -H 'content-type: application/json' \
        -d '{"configure":".*","write":".*","read":".*"}' \
        "$base/permissions/$AMQP_VHOST/$AMQP_MGMT_USER" ||
        die "could not grant $AMQP_MGMT_USER on vhost $AMQP_VHOST"
    import_rabbitmq_definitions "$base"
}

# The topology and the per-service users of infra/rabbitmq/definitions.json (the file compose
# and kind load at broker boot), imported into the running node: the services connect as their
# own least-privilege users, as they do there. Idempotent. The import skips a queue that exists
# with other arguments (left by an older Keel), and the service declaring it would then fail
# with 406 PRECONDITION_FAILED: such a queue is named, deleted (in this development vhost; its
# messages are discarded, as the log says) and imported again.
import_rabbitmq_definitions() {
    local base="$1" file="$KEELDEV_ROOT/infra/rabbitmq/definitions.json" out queues stale q
    [[ -f $file ]] || die "$file is missing (make rabbitmq-definitions writes it)"
    out=$(post_definitions "$base" "$file") || die "RabbitMQ refused $file: $out"
    queues=$(mktemp)
    curl -fsS -m 10 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" -o "$queues" \
        "$base/queues/$AMQP_VHOST?columns=name,arguments" ||
        die "could not list the queues of RabbitMQ vhost $AMQP_VHOST"
    stale=$(python3 "$KEELDEV_ROOT/infra/rabbitmq/stale_queues.py" "$file" "$queues")
    rm -f "$queues"
    [[ -z $stale ]] && return 0
    for q in $stale; do
        warn "rabbitmq: queue $q in vhost $AMQP_VHOST has other arguments than $file (an older Keel's); deleting it, with its messages"
        curl -fsS -o /dev/null -m 10 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" -X DELETE \
            "$base/queues/$AMQP_VHOST/$q" || die "could not delete RabbitMQ queue $q"
    done
    out=$(post_definitions "$base" "$file") || die "RabbitMQ refused $file: $out"
}

# POSTs a definitions file; prints the broker's answer when it is not a success.
post_definitions() {
    local base="$1" file="$2" code body
    body=$(mktemp)
    code=$(curl -sS -o "$body" -w '%{http_code}' -m 30 -u "$AMQP_MGMT_USER:$AMQP_MGMT_PASSWORD" \
        -H 'content-type: application/json' -X POST --data-binary "@$file" \
        "$base/definitions") || code=000
    if [[ $code == 2?? ]]; then
        rm -f "$body"
        return 0
    fi
    printf 'HTTP %s %s' "$code" "$(head -c 500 "$body")"
    rm -f "$body"
    return 1
}

start_local_rabbitmq() {
    [[ -x $RABBIT_SBIN/rabbitmq-server ]] || apt_install rabbitmq-server
    mkdir -p "$RABBIT_DIR/mnesia" "$RABBIT_DIR/log"
    # Empty env file: stops the node from sourcing the system
    # /etc/rabbitmq/rabbitmq-env.conf (which sets NODENAME=rabbit@localhost).
    : >"$RABBIT_DIR/rabbitmq-env.conf"
    cat >"$RABBIT_DIR/rabbitmq.conf" <<CONF
# Generated by infra/dev/stack.sh: project-local dev node, loopback only.
listeners.tcp.1 = 127.0.0.1:$AMQP_LOCAL_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $AMQP_LOCAL_MGMT_PORT
CONF
    # Management starts with the node: no rabbitmq-plugins round trip.
    printf '[rabbitmq_management].\n' >"$RABBIT_DIR/enabled_plugins"
    log "rabbitmq: starting project-local node $RABBIT_LOCAL_NODE on 127.0.0.1:$AMQP_LOCAL_PORT"
    (cd "$RABBIT_DIR" && rabbit_local_env "$RABBIT_SBIN/rabbitmq-server" -detached \
        >"$RABBIT_DIR/log/startup.log" 2>&1 9>&-) ||
        die "rabbitmq-server -detached failed, see $RABBIT_DIR/log/startup.log"
    printf '%s\n' "$AMQP_LOCAL_PORT" >"$KEELDEV_RUN/rabbitmq.local"
}

down_rabbitmq() {
    [[ -f $KEELDEV_RUN/rabbitmq.local ]] || return 0
    if pid_alive "$KEELDEV_RUN/rabbitmq.pid" beam; then
        log "rabbitmq: stopping project-local node $RABBIT_LOCAL_NODE"
        # `stop PIDFILE` returns once that process has exited; bounded by timeout.
        (cd "$RABBIT_DIR" && rabbit_local_env timeout 90 "$RABBIT_SBIN/rabbitmqctl" \
            -n "$RABBIT_LOCAL_NODE" stop "$KEELDEV_RUN/rabbitmq.pid" >&2) ||
            warn "rabbitmqctl stop failed or timed out"
        # Whatever rabbitmqctl did, make sure the pid is gone (TERM, then KILL).
        stop_pidfile rabbitmq "$KEELDEV_RUN/rabbitmq.pid" beam 30 TERM
    fi
    rm -f "$KEELDEV_RUN/rabbitmq.local" "$KEELDEV_RUN/rabbitmq.pid"
}

# --------------------------------------------------------------- PgBouncer --

# render_pgbouncer_config: write pgbouncer.ini and the auth file into $PGB_DIR
# (runtime dir, postgres 0711; both files 0600 postgres) and the 0644 copy of
# the ini into .keel/pgbouncer/. Returns 0 if anything changed, 1 if not.
render_pgbouncer_config() {
    local ini userlist want s tmp changed=1
    userlist=$(
        echo '"postgres" "postgres"'
        for s in "${KEELDEV_DB_SERVICES[@]}"; do
            printf '"%s_owner" "%s_owner_dev"\n' "$s" "$s"
            printf '"%s_app" "%s_app_dev"\n' "$s" "$s"
        done
    )
    ini=$(sed -e "s|@PG_HOST@|127.0.0.1|g" \
        -e "s|@PG_PORT@|$R_PG_PORT|g" \
        -e "s|@PGBOUNCER_PORT@|$PGBOUNCER_PORT|g" \
        -e "s|@AUTH_FILE@|$PGB_DIR/userlist.txt|g" \
        -e "s|@PIDFILE@|$PGB_PIDFILE|g" \
        -e "s|@LOGFILE@|$PGB_DIR/pgbouncer.log|g" \
        "$PGB_TEMPLATE")
    if grep -v '^;' <<<"$ini" | grep -q '@[A-Z_]*@'; then
        die "unfilled placeholder in $PGB_TEMPLATE"
    fi
    want=$(printf '%s\n%s\n' "$ini" "$userlist" | sha256sum | cut -d' ' -f1)

    # Unprivileged and nothing to change (the stamp is written as root next
    # to the files it describes): leave everything as is.
    if [[ $(id -u) -ne 0 && "$(cat "$PGB_STAMP" 2>/dev/null)" == "$want" && -f $PGB_PUBLIC_INI ]]; then
        return 1
    fi
    need_root "writing the pgbouncer config in $PGB_DIR (owned by the postgres OS user)"

    ensure_runtime_dir
    mkdir -p "$PGB_DIR"
    # pgbouncer runs as postgres and must read its config and write its pid
    # and log files here. 0711: others may not list or read the secrets (the
    # files are 0600) but can check the pid file.
    chown postgres:postgres "$PGB_DIR"
    chmod 0711 "$PGB_DIR"

    tmp=$(mktemp "$PGB_DIR/.userlist.XXXXXX")
    printf '%s\n' "$userlist" >"$tmp"
    install_if_changed "$tmp" "$PGB_DIR/userlist.txt" && changed=0
    tmp=$(mktemp "$PGB_DIR/.ini.XXXXXX")
    printf '%s\n' "$ini" >"$tmp"
    install_if_changed "$tmp" "$PGB_INI" && changed=0

    # Public copy, root-owned 0644 (the passwords are only in the auth file).
    mkdir -p "$PGB_PUBLIC_DIR"
    chmod 0755 "$PGB_PUBLIC_DIR"
    if ! cmp -s "$PGB_INI" "$PGB_PUBLIC_INI"; then
        tmp=$(mktemp "$PGB_PUBLIC_DIR/.ini.XXXXXX")
        cp "$PGB_INI" "$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$PGB_PUBLIC_INI"
    fi
    if [[ "$(cat "$PGB_STAMP" 2>/dev/null)" != "$want" ]]; then
        printf '%s\n' "$want" >"$PGB_STAMP"
        chmod 0644 "$PGB_STAMP"
    fi
    return "$changed"
}

# install_if_changed TMP DEST: move TMP over DEST if the content differs
# (returns 0), else drop TMP (returns 1). Files end up 0600 postgres.
install_if_changed() {
    local tmp=$1 dest=$2
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    chown postgres:postgres "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$dest"
}

# install_pgbouncer_binary SRC: copy SRC (.keel/bin/pgbouncer, possibly a
# symlink) to $PGB_BIN in the runtime dir, where postgres can execute it.
install_pgbouncer_binary() {
    local src=$1 tmp
    cmp -s "$src" "$PGB_BIN" && return 0
    ensure_runtime_dir
    mkdir -p "$RT/bin"
    chmod 0755 "$RT/bin"
    tmp=$(mktemp "$RT/bin/.pgbouncer.XXXXXX")
    cp -L "$src" "$tmp"
    chmod 0755 "$tmp"
    mv -f "$tmp" "$PGB_BIN"
}

# Older versions ran pgbouncer from .keel/pgbouncer/ inside the clone (config,
# auth file, pid, log there, directory 0700 postgres). Stop such an instance
# and leave only the public ini copy there.
migrate_legacy_pgbouncer() {
    [[ -e $PGB_PUBLIC_DIR/userlist.txt || -e $PGB_LEGACY_PIDFILE ]] || return 0
    need_root "moving pgbouncer's files out of $PGB_PUBLIC_DIR (they belong to the postgres OS user)"
    if pid_alive "$PGB_LEGACY_PIDFILE" pgbouncer; then
        log "pgbouncer: stopping the instance running from $PGB_PUBLIC_DIR (now runs from $PGB_DIR)"
        stop_pidfile pgbouncer "$PGB_LEGACY_PIDFILE" pgbouncer 15 INT
    fi
    rm -f "$PGB_PUBLIC_DIR/userlist.txt" "$PGB_LEGACY_PIDFILE" "$PGB_PUBLIC_DIR/pgbouncer.log" \
        "$PGB_PUBLIC_DIR"/.userlist.* "$PGB_PUBLIC_DIR"/.ini.*
    chown root:root "$PGB_PUBLIC_DIR"
    chmod 0755 "$PGB_PUBLIC_DIR"
    # The old ini may be 0600 postgres: re-render the public copy.
    rm -f "$PGB_PUBLIC_INI"
}

up_pgbouncer() {
    local bin changed=0
    migrate_legacy_pgbouncer
    bin=$(KEELDEV_APT_UPDATED=$KEELDEV_APT_UPDATED "$KEELDEV_ROOT/infra/dev/pgbouncer.sh")
    install_pgbouncer_binary "$bin"
    render_pgbouncer_config && changed=1
    R_PGBOUNCER_PORT=$PGBOUNCER_PORT

    # Ours but listening on another port (PGBOUNCER_PORT changed): restart.
    if pid_alive "$PGB_PIDFILE" pgbouncer && ! port_open 127.0.0.1 "$PGBOUNCER_PORT"; then
        need_root "restarting pgbouncer (it runs as the postgres OS user)"
        log "pgbouncer: ours runs on another port; restarting on $PGBOUNCER_PORT"
        stop_pidfile pgbouncer "$PGB_PIDFILE" pgbouncer 15 INT
    fi

    if port_open 127.0.0.1 "$PGBOUNCER_PORT"; then
        if pid_alive "$PGB_PIDFILE" pgbouncer; then
            set_mode pgbouncer local
            if ((changed)); then
                # SIGHUP re-reads pgbouncer.ini and the auth file (e.g. a new
                # Postgres port) without dropping clients.
                need_root "reloading pgbouncer (it runs as the postgres OS user)"
                log "pgbouncer: config changed, reloading"
                kill -HUP "$(pid_of "$PGB_PIDFILE")"
            else
                log "pgbouncer: already up on 127.0.0.1:$PGBOUNCER_PORT"
            fi
        else
            warn "pgbouncer: something that is not ours answers on $PGBOUNCER_PORT; using it as is"
            set_mode pgbouncer system
        fi
    else
        need_privileges "starting pgbouncer as the postgres OS user (it refuses to run as root)"
        as_postgres test -r "$PGB_INI" -a -x "$PGB_BIN" ||
            die "the postgres OS user cannot read $PGB_INI or run $PGB_BIN (check the permissions of $RT)"
        log "pgbouncer: starting on 127.0.0.1:$PGBOUNCER_PORT (as postgres; it refuses root), files in $PGB_DIR"
        # -d: daemonize; config errors end up in the log file.
        # The soft fd limit (often 1024) is below what max_client_conn = 1000
        # needs once server connections are added. Raise it inside the
        # postgres-user shell: runuser's PAM session resets limits, so raising
        # it here before runuser would not stick.
        # shellcheck disable=SC2016 # expanded by the child bash, on purpose
        as_postgres bash -c 'ulimit -Sn 4096 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"; exec "$0" -d "$1"' \
            "$PGB_BIN" "$PGB_INI" >&2 9>&- ||
            die "pgbouncer failed to start: $(tail -n5 "$PGB_DIR/pgbouncer.log" 2>/dev/null)"
        wait_for_port 127.0.0.1 "$PGBOUNCER_PORT" 30 ||
            die "pgbouncer did not open $PGBOUNCER_PORT: $(tail -n5 "$PGB_DIR/pgbouncer.log" 2>/dev/null)"
        printf '%s\n' "$PGBOUNCER_PORT" >"$KEELDEV_RUN/pgbouncer.local"
        set_mode pgbouncer local
    fi
}

check_pgbouncer_path() {
    # The path the services use: an app role, through PgBouncer, with SCRAM. Every registered
    # database's: one query each, and a missing role or grant shows up here, not in a service.
    local out s
    for s in "${KEELDEV_DB_SERVICES[@]}"; do
        out=$(PGPASSWORD="${s}_app_dev" PGCONNECT_TIMEOUT=5 psql -X -q -tA \
            -h 127.0.0.1 -p "$R_PGBOUNCER_PORT" -U "${s}_app" -d "keel_${s}" -c 'select 1' 2>&1) ||
            die "${s}_app cannot query keel_${s} through pgbouncer: $out"
    done
}

down_pgbouncer() {
    # SIGINT = safe shutdown (let running transactions finish); SIGTERM would
    # wait for every client to disconnect (pgbouncer >= 1.23).
    local f
    for f in "$PGB_PIDFILE" "$PGB_LEGACY_PIDFILE"; do
        if pid_alive "$f" pgbouncer; then
            need_root "stopping pgbouncer (it runs as the postgres OS user)"
            stop_pidfile pgbouncer "$f" pgbouncer 15 INT
        fi
    done
    rm -f "$KEELDEV_RUN/pgbouncer.local"
}

# ---------------------------------------------------------------- commands --

# service_ports: NAME_KIND_PORT=port for every port of every registered service.
service_ports() {
    local s kind
    for s in "${KEELDEV_SERVICES[@]}"; do
        for kind in $(reg_get "$s" ports); do
            printf '%s=%s\n' "$(reg_port_var "$s" "$kind")" "$(reg_port "$s" "$kind")"
        done
    done
}

write_resolved_env() {
    local tmp
    tmp=$(mktemp "$KEELDEV_HOME/.stack.env.XXXXXX")
    # Plain KEY=VALUE, numbers only: read by bash (source) and by the Rust test
    # kit, which skips comments and non-numeric values.
    cat >"$tmp" <<ENV
# Resolved by infra/dev/stack.sh up. Do not edit; re-run up instead.
# runtime dir (local Postgres data, pgbouncer files): $RT
# postgres: $(get_mode postgres), pgbouncer: $(get_mode pgbouncer), redis: $(get_mode redis), rabbitmq: $(get_mode rabbitmq)
PG_PORT=$R_PG_PORT
PGBOUNCER_PORT=$R_PGBOUNCER_PORT
REDIS_PORT=$R_REDIS_PORT
AMQP_PORT=$R_AMQP_PORT
AMQP_MGMT_PORT=$R_AMQP_MGMT_PORT
# mail: started (or found) by services.sh start, on these ports
SMTP_PORT=$SMTP_PORT
SMTP_HTTP_PORT=$SMTP_HTTP_PORT
$(service_ports)
ENV
    chmod 0644 "$tmp"
    # Rewrite only on change (mtime stays meaningful); mv is atomic for readers.
    if [[ -f $RESOLVED_ENV ]] && cmp -s "$tmp" "$RESOLVED_ENV"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$RESOLVED_ENV"
    fi
}

cmd_up() {
    # No blanket root check: need_root is called where it is really needed
    # (apt-get, anything run as the postgres OS user).
    mkdir -p "$KEELDEV_HOME" "$KEELDEV_RUN"
    take_lock
    ensure_runtime_dir
    up_postgres
    run_init_sql
    up_redis
    up_rabbitmq
    up_pgbouncer
    check_pgbouncer_path
    write_resolved_env
    log "stack is up; resolved ports in $RESOLVED_ENV"
    cat "$RESOLVED_ENV"
}

cmd_down() {
    mkdir -p "$KEELDEV_RUN"
    take_lock
    down_pgbouncer
    down_rabbitmq
    down_redis
    down_postgres
    # Nothing is resolved any more: readers fall back to infra/dev/stack.env,
    # which still points at the (untouched) system services.
    rm -f "$KEELDEV_RUN"/*.mode "$RESOLVED_ENV"
    log "stopped what up had started; system services untouched"
}

status_line() {
    local name=$1 port=$2 mode=$3 extra=${4:-} state=down
    port_open 127.0.0.1 "$port" && state=up
    printf '%-10s 127.0.0.1:%-6s %-7s %-5s %s\n' "$name" "$port" "$mode" "$state" "$extra"
}

cmd_status() {
    if [[ ! -f $RESOLVED_ENV ]]; then
        echo "stack not resolved yet (run: infra/dev/stack.sh up); defaults from infra/dev/stack.env:"
        status_line postgres "$PG_PORT" '-'
        status_line pgbouncer "$PGBOUNCER_PORT" '-'
        status_line redis "$REDIS_PORT" '-'
        status_line rabbitmq "$AMQP_PORT" '-'
        return 0
    fi
    # Resolved values win over the defaults, as for every other reader.
    # shellcheck source=/dev/null
    . "$RESOLVED_ENV"
    local pg_extra="" pgb_extra="" redis_extra="" rabbit_extra
    [[ $(get_mode postgres) == local ]] && pg_extra="data $PG_DIR/data"
    pid_alive "$PGB_PIDFILE" pgbouncer && pgb_extra="pid $(pid_of "$PGB_PIDFILE"), config $PGB_INI"
    [[ $(get_mode redis) == local ]] && redis_extra="dir $REDIS_DIR"
    rabbit_extra="mgmt http://127.0.0.1:$AMQP_MGMT_PORT vhost $AMQP_VHOST"
    [[ $(get_mode rabbitmq) == local ]] && rabbit_extra="node $RABBIT_LOCAL_NODE, $rabbit_extra"
    echo "runtime dir: $RT"
    printf '%-10s %-16s %-7s %-5s %s\n' DEPENDENCY ADDRESS MODE STATE DETAILS
    status_line postgres "$PG_PORT" "$(get_mode postgres)" "$pg_extra"
    status_line pgbouncer "$PGBOUNCER_PORT" "$(get_mode pgbouncer)" "$pgb_extra"
    status_line redis "$REDIS_PORT" "$(get_mode redis)" "$redis_extra"
    status_line rabbitmq "$AMQP_PORT" "$(get_mode rabbitmq)" "$rabbit_extra"
}

cmd_env() {
    [[ -f $RESOLVED_ENV ]] || die "$RESOLVED_ENV does not exist; run infra/dev/stack.sh up"
    cat "$RESOLVED_ENV"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
*)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
