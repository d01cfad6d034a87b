#!/usr/bin/env bash
# Starts, stops and reports Keel's four services natively (`make dev` / `make down`).
#
#   infra/dev/services.sh start|stop|status
#
# Services run the debug binaries from target/debug (the same artifacts the tests use, so
# `make dev` after `make test` builds nothing). Each one gets its ports and dependency URLs
# from the resolved stack file (.keel/stack.env, written by infra/dev/stack.sh up) through
# the same KEEL_* variables a container gets. Pid files under .keel/run make `stop` precise:
# it stops what `start` started and nothing else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KEEL_DIR="$ROOT/.keel"
RUN="$KEEL_DIR/run"
LOGS="$KEEL_DIR/logs"
BIN="${KEEL_BIN_DIR:-$ROOT/target/debug}"
SERVICES=(checkout billing notification psp-sim)

# shellcheck disable=SC1091  # the shared port file, checked on its own
source "$ROOT/infra/dev/stack.env"
if [[ -f "$KEEL_DIR/stack.env" ]]; then
  # shellcheck disable=SC1091
  source "$KEEL_DIR/stack.env"
fi

log() { printf '\033[1m[services]\033[0m %s\n' "$*"; }

http_port() {
  case "$1" in
    checkout) echo "$CHECKOUT_HTTP_PORT" ;;
    billing) echo "$BILLING_HTTP_PORT" ;;
    notification) echo "$NOTIFICATION_HTTP_PORT" ;;
    psp-sim) echo "$PSP_SIM_HTTP_PORT" ;;
  esac
}

# The KEEL_* environment of one service, one assignment per line.
service_env() {
  local svc="$1"
  echo "KEEL_HTTP__PORT=$(http_port "$svc")"
  case "$svc" in
    checkout | billing | notification)
      echo "KEEL_DATABASE__URL=postgres://${svc}_app:${svc}_app_dev@127.0.0.1:${PGBOUNCER_PORT}/keel_${svc}"
      echo "KEEL_DATABASE__MIGRATE_URL=postgres://${svc}_owner:${svc}_owner_dev@127.0.0.1:${PG_PORT}/keel_${svc}"
      ;;
  esac
  case "$svc" in
    billing) echo "KEEL_GRPC__PORT=$BILLING_GRPC_PORT" ;;
    notification) echo "KEEL_AMQP__URL=amqp://guest:guest@127.0.0.1:${AMQP_PORT}/keel" ;;
  esac
}

# Replaces the calling (sub)shell with the service binary, so `$!` of a background call is
# the service's own pid. Call it in a subshell or in the background, never directly.
exec_with_env() {
  local svc="$1"
  shift
  local -a vars
  mapfile -t vars < <(service_env "$svc")
  # env -i would drop PATH/HOME; instead remove any stray KEEL_* from the caller's shell so
  # the service sees exactly this configuration (unknown KEEL_* keys are rejected).
  local -a unset_args=()
  while IFS= read -r name; do unset_args+=(-u "$name"); done < <(compgen -e | grep '^KEEL_' || true)
  exec env "${unset_args[@]}" "${vars[@]}" "$@"
}

running_pid() {
  local svc="$1" pidfile="$RUN/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  # Check the pid still belongs to our binary: pids are reused after a crash or reboot.
  if [[ -r "/proc/$pid/exe" ]] && [[ "$(readlink "/proc/$pid/exe")" == "$BIN/$svc"* ]]; then
    echo "$pid"
    return 0
  fi
  rm -f "$pidfile"
  return 1
}

wait_ready() {
  local svc="$1" port deadline
  port="$(http_port "$svc")"
  deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null "http://127.0.0.1:${port}/readyz" 2>/dev/null; do
    if ! running_pid "$svc" >/dev/null; then
      log "$svc exited during start-up; last log lines:"
      tail -n 20 "$LOGS/$svc.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$svc not ready within 60 s; its /readyz says:"
      curl -sS "http://127.0.0.1:${port}/readyz" >&2 || true
      echo >&2
      return 1
    fi
    sleep 0.2 # poll interval of a bounded wait, not synchronisation
  done
}

start() {
  mkdir -p "$RUN" "$LOGS"
  for svc in "${SERVICES[@]}"; do
    [[ -x "$BIN/$svc" ]] || { log "missing $BIN/$svc: run \`cargo build --bins\` (make dev does)"; exit 1; }
  done
  for svc in checkout billing notification; do
    log "migrating $svc (owner role, direct connection)"
    (exec_with_env "$svc" "$BIN/$svc" migrate) >>"$LOGS/$svc.migrate.log" 2>&1 ||
      { tail -n 20 "$LOGS/$svc.migrate.log" >&2; exit 1; }
  done
  for svc in "${SERVICES[@]}"; do
    if pid="$(running_pid "$svc")"; then
      log "$svc already running (pid $pid)"
      continue
    fi
    local port
    port="$(http_port "$svc")"
    if curl -s -o /dev/null "http://127.0.0.1:${port}/livez" 2>/dev/null; then
      log "port $port is taken by a process this script did not start; stop it first"
      exit 1
    fi
    exec_with_env "$svc" "$BIN/$svc" </dev/null >>"$LOGS/$svc.log" 2>&1 &
    echo $! >"$RUN/$svc.pid"
    log "started $svc (pid $!), logs in .keel/logs/$svc.log"
  done
  for svc in "${SERVICES[@]}"; do
    wait_ready "$svc"
  done
  cat <<EOT

Keel is up. Every service answers /readyz.
  checkout      http://127.0.0.1:${CHECKOUT_HTTP_PORT}      (try: curl localhost:${CHECKOUT_HTTP_PORT}/v1/products)
  billing       http://127.0.0.1:${BILLING_HTTP_PORT}  gRPC 127.0.0.1:${BILLING_GRPC_PORT}
  notification  http://127.0.0.1:${NOTIFICATION_HTTP_PORT}
  psp-sim       http://127.0.0.1:${PSP_SIM_HTTP_PORT}
Each serves /livez, /readyz and /metrics. Logs (JSON): .keel/logs/<service>.log

Next:
  curl -s localhost:${CHECKOUT_HTTP_PORT}/v1/products
  curl -s localhost:${CHECKOUT_HTTP_PORT}/metrics | grep http_requests_total
  make status     what runs where
  make test       the whole test suite
  make down       stop everything make dev started
EOT
}

stop() {
  # SIGTERM to all first, then wait for each: the drains run in parallel, not one by one.
  local -A pids=()
  local svc pid
  for svc in "${SERVICES[@]}"; do
    if pid="$(running_pid "$svc")"; then
      log "stopping $svc (pid $pid, SIGTERM: graceful drain)"
      kill -TERM "$pid" 2>/dev/null || true
      pids[$svc]="$pid"
    fi
  done
  local deadline=$((SECONDS + 40))
  for svc in "${!pids[@]}"; do
    pid="${pids[$svc]}"
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "$svc still running after 40 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1 # poll interval of a bounded wait
    done
    rm -f "$RUN/$svc.pid"
  done
}

status() {
  for svc in "${SERVICES[@]}"; do
    local pid port ready
    port="$(http_port "$svc")"
    if pid="$(running_pid "$svc")"; then
      ready="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${port}/readyz" || true)"
      printf '  %-13s pid %-7s :%s  readyz %s\n' "$svc" "$pid" "$port" "$ready"
    else
      printf '  %-13s stopped\n' "$svc"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
