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
# and run a project-local instance under .keel/<name>/ on *_LOCAL_PORT. PgBouncer
# is always ours (unless something else already answers on PGBOUNCER_PORT).
#
# State under .keel/run/: <dep>.mode is "system" or "local" (what `up` decided
# last), <dep>.local marks an instance `up` started and `down` may stop.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RESOLVED_ENV="$KEEL_HOME/stack.env"
PG_DIR="$KEEL_HOME/postgres"
REDIS_DIR="$KEEL_HOME/redis"
RABBIT_DIR="$KEEL_HOME/rabbitmq"
RABBIT_LOCAL_NODE=keel@localhost
PGB_DIR="$KEEL_HOME/pgbouncer"
PGB_INI="$PGB_DIR/pgbouncer.ini"
PGB_PIDFILE="$PGB_DIR/pgbouncer.pid"
PGB_TEMPLATE="$KEEL_ROOT/infra/pgbouncer/pgbouncer.ini.tmpl"
INIT_SQL="$KEEL_ROOT/infra/postgres/init.sql"
: "${AMQP_MGMT_USER:=guest}"
: "${AMQP_MGMT_PASSWORD:=guest}"
AMQP_VHOST=keel

# Resolved ports, filled in by `up`.
R_PG_PORT=
R_REDIS_PORT=
R_AMQP_PORT=
R_AMQP_MGMT_PORT=
R_PGBOUNCER_PORT=

set_mode() { printf '%s\n' "$2" >"$KEEL_RUN/$1.mode"; }
get_mode() { cat "$KEEL_RUN/$1.mode" 2>/dev/null || echo unknown; }

# Serialise up/down: two concurrent `up`s (parallel CI jobs, a script and a
# developer) must not both decide to start the same local instance.
# Every daemon we spawn gets `9>&-`: a daemon inheriting fd 9 would hold the
# lock for its whole life and block every later up/down.
take_lock() {
    mkdir -p "$KEEL_RUN"
    exec 9>"$KEEL_RUN/stack.lock"
    flock -w 300 9 || die "another stack.sh holds $KEEL_RUN/stack.lock for > 300 s"
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

up_postgres() {
    if port_open 127.0.0.1 "$PG_PORT"; then
        log "postgres: reusing 127.0.0.1:$PG_PORT"
        set_mode postgres system
        R_PG_PORT=$PG_PORT
    else
        R_PG_PORT=$PG_LOCAL_PORT
        set_mode postgres local
        if pid_alive "$(pg_local_pidfile)" postgres && port_open 127.0.0.1 "$PG_LOCAL_PORT"; then
            log "postgres: project-local instance already up on 127.0.0.1:$PG_LOCAL_PORT"
        elif port_open 127.0.0.1 "$PG_LOCAL_PORT"; then
            warn "postgres: something that is not ours answers on $PG_LOCAL_PORT; using it"
        else
            start_local_postgres
        fi
    fi
    wait_until 60 "postgres on $R_PG_PORT to accept queries" pg_ready "$R_PG_PORT" ||
        die "postgres on 127.0.0.1:$R_PG_PORT is not ready"
}

start_local_postgres() {
    local bindir
    bindir=$(pg_bindir) || {
        apt_install postgresql
        bindir=$(pg_bindir) || die "no PostgreSQL server binaries after installing postgresql"
    }
    mkdir -p "$PG_DIR/sock"
    chown postgres:postgres "$PG_DIR" "$PG_DIR/sock"
    chmod 0700 "$PG_DIR"
    as_postgres test -x "$PG_DIR" || die "the postgres OS user cannot reach $PG_DIR (check the permissions of its parents)"
    if [[ ! -s $PG_DIR/data/PG_VERSION ]]; then
        log "postgres: initdb $PG_DIR/data"
        as_postgres "$bindir/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=trust >"$PG_DIR/initdb.log" 2>&1 ||
            die "initdb failed, see $PG_DIR/initdb.log"
        # Loopback only, trust auth (set by initdb above): a throw-away dev
        # server. Durability is traded for speed since the data is disposable.
        cat >>"$PG_DIR/data/postgresql.conf" <<CONF

# --- keel (infra/dev/stack.sh) ---
listen_addresses = '127.0.0.1'
max_connections = 100
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    fi
    log "postgres: starting project-local instance on 127.0.0.1:$PG_LOCAL_PORT"
    # -w -t 60: pg_ctl itself polls until the server accepts connections,
    # bounded at 60 s.
    as_postgres "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-p $PG_LOCAL_PORT -k $PG_DIR/sock" start >&2 9>&- ||
        die "postgres did not start, see $PG_DIR/postgres.log"
    printf '%s\n' "$PG_LOCAL_PORT" >"$KEEL_RUN/postgres.local"
}

run_init_sql() {
    command -v psql >/dev/null 2>&1 || apt_install postgresql-client
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$R_PG_PORT" -U postgres -d postgres \
        -f "$INIT_SQL" >/dev/null || die "infra/postgres/init.sql failed on port $R_PG_PORT"
}

down_postgres() {
    [[ -f $KEEL_RUN/postgres.local ]] || return 0
    local bindir
    if pid_alive "$(pg_local_pidfile)" postgres && bindir=$(pg_bindir); then
        log "postgres: stopping project-local instance"
        # -m fast: roll back open transactions; -w -t 60: bounded wait.
        as_postgres "$bindir/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >&2 ||
            stop_pidfile postgres "$(pg_local_pidfile)" postgres 30 TERM
    fi
    rm -f "$KEEL_RUN/postgres.local"
}

# ------------------------------------------------------------------- Redis --

# redis_ping PORT: RESP PING over /dev/tcp, so it works without redis-cli.
redis_ping() {
    # shellcheck disable=SC2016 # $0 expands in the child bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"; printf "PING\r\n" >&3; IFS= read -r l <&3; [[ $l == "+PONG"* ]]' "$1" 2>/dev/null
}

up_redis() {
    local pidfile="$KEEL_RUN/redis.pid"
    if port_open 127.0.0.1 "$REDIS_PORT"; then
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
            printf '%s\n' "$REDIS_LOCAL_PORT" >"$KEEL_RUN/redis.local"
        fi
    fi
    wait_until 30 "redis PING on $R_REDIS_PORT" redis_ping "$R_REDIS_PORT" ||
        die "redis on 127.0.0.1:$R_REDIS_PORT does not answer PING"
}

down_redis() {
    [[ -f $KEEL_RUN/redis.local ]] || return 0
    stop_pidfile redis "$KEEL_RUN/redis.pid" redis-server 30 TERM
    rm -f "$KEEL_RUN/redis.local" "$KEEL_RUN/redis.pid"
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
        RABBITMQ_PID_FILE="$KEEL_RUN/rabbitmq.pid" \
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
    if port_open 127.0.0.1 "$AMQP_PORT"; then
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
            timeout 120 rabbitmq-plugins enable rabbitmq_management >&2 ||
                die "rabbitmq-plugins enable rabbitmq_management failed"
        fi
    else
        R_AMQP_PORT=$AMQP_LOCAL_PORT
        R_AMQP_MGMT_PORT=$AMQP_LOCAL_MGMT_PORT
        set_mode rabbitmq local
        if pid_alive "$KEEL_RUN/rabbitmq.pid" beam && port_open 127.0.0.1 "$AMQP_LOCAL_PORT"; then
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
    printf '%s\n' "$AMQP_LOCAL_PORT" >"$KEEL_RUN/rabbitmq.local"
}

down_rabbitmq() {
    [[ -f $KEEL_RUN/rabbitmq.local ]] || return 0
    if pid_alive "$KEEL_RUN/rabbitmq.pid" beam; then
        log "rabbitmq: stopping project-local node $RABBIT_LOCAL_NODE"
        # `stop PIDFILE` returns once that process has exited; bounded by timeout.
        (cd "$RABBIT_DIR" && rabbit_local_env timeout 90 "$RABBIT_SBIN/rabbitmqctl" \
            -n "$RABBIT_LOCAL_NODE" stop "$KEEL_RUN/rabbitmq.pid" >&2) ||
            warn "rabbitmqctl stop failed or timed out"
        # Whatever rabbitmqctl did, make sure the pid is gone (TERM, then KILL).
        stop_pidfile rabbitmq "$KEEL_RUN/rabbitmq.pid" beam 30 TERM
    fi
    rm -f "$KEEL_RUN/rabbitmq.local" "$KEEL_RUN/rabbitmq.pid"
}

# --------------------------------------------------------------- PgBouncer --

render_pgbouncer_config() {
    local tmp
    mkdir -p "$PGB_DIR"
    # pgbouncer runs as postgres and must read its config and write its pid
    # and log files here; the auth file holds passwords, hence 0700.
    chown postgres:postgres "$PGB_DIR"
    chmod 0700 "$PGB_DIR"

    tmp=$(mktemp "$PGB_DIR/.userlist.XXXXXX")
    {
        echo '"postgres" "postgres"'
        local s
        for s in "${KEEL_DB_SERVICES[@]}"; do
            printf '"%s_owner" "%s_owner_dev"\n' "$s" "$s"
            printf '"%s_app" "%s_app_dev"\n' "$s" "$s"
        done
    } >"$tmp"
    install_if_changed "$tmp" "$PGB_DIR/userlist.txt" || true

    tmp=$(mktemp "$PGB_DIR/.ini.XXXXXX")
    sed -e "s|@PG_HOST@|127.0.0.1|g" \
        -e "s|@PG_PORT@|$R_PG_PORT|g" \
        -e "s|@PGBOUNCER_PORT@|$PGBOUNCER_PORT|g" \
        -e "s|@AUTH_FILE@|$PGB_DIR/userlist.txt|g" \
        -e "s|@PIDFILE@|$PGB_PIDFILE|g" \
        -e "s|@LOGFILE@|$PGB_DIR/pgbouncer.log|g" \
        "$PGB_TEMPLATE" >"$tmp"
    if grep -v '^;' "$tmp" | grep -q '@[A-Z_]*@'; then
        rm -f "$tmp"
        die "unfilled placeholder in $PGB_TEMPLATE"
    fi
    install_if_changed "$tmp" "$PGB_INI"
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

up_pgbouncer() {
    local bin changed=0
    bin=$("$KEEL_ROOT/infra/dev/pgbouncer.sh")
    render_pgbouncer_config && changed=1
    R_PGBOUNCER_PORT=$PGBOUNCER_PORT

    # Ours but listening on another port (PGBOUNCER_PORT changed): restart.
    if pid_alive "$PGB_PIDFILE" pgbouncer && ! port_open 127.0.0.1 "$PGBOUNCER_PORT"; then
        log "pgbouncer: ours runs on another port; restarting on $PGBOUNCER_PORT"
        stop_pidfile pgbouncer "$PGB_PIDFILE" pgbouncer 15 INT
    fi

    if port_open 127.0.0.1 "$PGBOUNCER_PORT"; then
        if pid_alive "$PGB_PIDFILE" pgbouncer; then
            set_mode pgbouncer local
            if ((changed)); then
                # SIGHUP re-reads pgbouncer.ini and the auth file (e.g. a new
                # Postgres port) without dropping clients.
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
        as_postgres test -r "$PGB_INI" -a -x "$bin" ||
            die "the postgres OS user cannot read $PGB_INI or run $bin (check parent directory permissions)"
        log "pgbouncer: starting on 127.0.0.1:$PGBOUNCER_PORT (as postgres; it refuses root)"
        # -d: daemonize; config errors end up in the log file.
        # The soft fd limit (often 1024) is below what max_client_conn = 1000
        # needs once server connections are added. Raise it inside the
        # postgres-user shell: runuser's PAM session resets limits, so raising
        # it here before runuser would not stick.
        # shellcheck disable=SC2016 # expanded by the child bash, on purpose
        as_postgres bash -c 'ulimit -Sn 4096 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"; exec "$0" -d "$1"' \
            "$bin" "$PGB_INI" >&2 9>&- ||
            die "pgbouncer failed to start: $(tail -n5 "$PGB_DIR/pgbouncer.log" 2>/dev/null)"
        wait_for_port 127.0.0.1 "$PGBOUNCER_PORT" 30 ||
            die "pgbouncer did not open $PGBOUNCER_PORT: $(tail -n5 "$PGB_DIR/pgbouncer.log" 2>/dev/null)"
        printf '%s\n' "$PGBOUNCER_PORT" >"$KEEL_RUN/pgbouncer.local"
        set_mode pgbouncer local
    fi
}

check_pgbouncer_path() {
    # The path the services use: an app role, through PgBouncer, with SCRAM.
    local out
    out=$(PGPASSWORD=checkout_app_dev PGCONNECT_TIMEOUT=5 psql -X -q -tA \
        -h 127.0.0.1 -p "$R_PGBOUNCER_PORT" -U checkout_app -d keel_checkout -c 'select 1' 2>&1) ||
        die "checkout_app cannot query keel_checkout through pgbouncer: $out"
}

down_pgbouncer() {
    # SIGINT = safe shutdown (let running transactions finish); SIGTERM would
    # wait for every client to disconnect (pgbouncer >= 1.23).
    if pid_alive "$PGB_PIDFILE" pgbouncer; then
        stop_pidfile pgbouncer "$PGB_PIDFILE" pgbouncer 15 INT
    fi
    rm -f "$KEEL_RUN/pgbouncer.local"
}

# ---------------------------------------------------------------- commands --

write_resolved_env() {
    local tmp
    tmp=$(mktemp "$KEEL_HOME/.stack.env.XXXXXX")
    # Plain KEY=VALUE, numbers only: read by bash (source) and by the Rust test
    # kit, which skips comments and non-numeric values.
    cat >"$tmp" <<ENV
# Resolved by infra/dev/stack.sh up. Do not edit; re-run up instead.
# postgres: $(get_mode postgres), pgbouncer: $(get_mode pgbouncer), redis: $(get_mode redis), rabbitmq: $(get_mode rabbitmq)
PG_PORT=$R_PG_PORT
PGBOUNCER_PORT=$R_PGBOUNCER_PORT
REDIS_PORT=$R_REDIS_PORT
AMQP_PORT=$R_AMQP_PORT
AMQP_MGMT_PORT=$R_AMQP_MGMT_PORT
CHECKOUT_HTTP_PORT=$CHECKOUT_HTTP_PORT
BILLING_GRPC_PORT=$BILLING_GRPC_PORT
BILLING_HTTP_PORT=$BILLING_HTTP_PORT
NOTIFICATION_HTTP_PORT=$NOTIFICATION_HTTP_PORT
PSP_SIM_HTTP_PORT=$PSP_SIM_HTTP_PORT
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
    need_root "stack.sh up"
    mkdir -p "$KEEL_HOME" "$KEEL_RUN"
    take_lock
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
    mkdir -p "$KEEL_RUN"
    take_lock
    down_pgbouncer
    down_rabbitmq
    down_redis
    down_postgres
    # Nothing is resolved any more: readers fall back to infra/dev/stack.env,
    # which still points at the (untouched) system services.
    rm -f "$KEEL_RUN"/*.mode "$RESOLVED_ENV"
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
