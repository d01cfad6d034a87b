#!/usr/bin/env bash
# `make test-compose`: compose.yaml brought up for real on this machine, used, and torn down.
#
#  1. a Docker engine (infra/compose/engine.sh: the one DOCKER_HOST names, or a project-local
#     dockerd under .keel/docker, stopped again at the end if this run started it);
#  2. the images (infra/compose/offline/build.sh): Keel's from the real Dockerfile, the
#     third-party ones stood in for by Debian-built images, since nothing can be pulled;
#  3. `up` with the offline override; every published port on 127.0.0.1, on free ports picked
#     here, so a running `make dev` (or anything else on 8080, 5432, ...) is never disturbed;
#  4. waits for every service to report healthy (its own `probe` of /readyz);
#  5. `keelctl demo` through the published ports: approved, out of stock, declined, flaky and
#     silent provider, duplicate Idempotency-Key, replayed webhook; each must reach its
#     expected final state and its notification;
#  6. the demo's emails: every order it placed has reached the mail sink (compose's `mailpit`,
#     here the keel-smtp-sink stand-in), addressed to the customers' domain, read through the
#     sink's published API (Mailpit's GET /api/v1/messages);
#  7. `keelctl audit` against the containers' databases (through the published pgbouncer, as
#     keelctl's read-only role) and broker;
#  8. `down -v`, however the run ends (an EXIT trap), and reports image sizes, the stack's
#     resident memory and the time taken.
# Every wait is bounded; the traffic is the demo's few dozen requests, to loopback only.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../dev/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

ROOT="$KEELDEV_ROOT"
PROJECT=keeltest
STARTED=$SECONDS
COMPOSE_FILES=(-f "$ROOT/compose.yaml" -f "$ROOT/infra/compose/offline/compose.offline.yaml")
compose() { docker-compose -p "$PROJECT" --project-directory "$ROOT" "${COMPOSE_FILES[@]}" "$@"; }
docker() { /usr/bin/docker "$@"; }

# --- engine ---------------------------------------------------------------------------------
"$ROOT/infra/compose/engine.sh" tools
# The trap first: whatever happens from here on (a failed start, Ctrl-C during a wait), the
# stack comes down and an engine this run started is stopped.
engine_was_up=false
"$ROOT/infra/compose/engine.sh" running >/dev/null && engine_was_up=true

cleanup() {
    local rc=$?
    set +e
    if [[ -n ${DOCKER_HOST:-} ]]; then
        if ((rc != 0)); then
            warn "test-compose failed (exit $rc); the services' last log lines:"
            compose logs --no-color --tail=15 >&2
        fi
        log "docker-compose down -v"
        timeout 180 docker-compose -p "$PROJECT" --project-directory "$ROOT" "${COMPOSE_FILES[@]}" \
            down -v --remove-orphans >/dev/null 2>&1 || warn "down did not finish"
    fi
    if [[ $engine_was_up == false ]]; then
        "$ROOT/infra/compose/engine.sh" stop
    fi
    log "test-compose took $((SECONDS - STARTED)) s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

engine=$("$ROOT/infra/compose/engine.sh" start) || die "no Docker engine (infra/compose/engine.sh start failed)"
eval "$engine"
export DOCKER_HOST

# --- images ---------------------------------------------------------------------------------
# compose.yaml and the override read KEEL_IMAGE_TAG; build.sh tags with KEELDEV_IMAGE_TAG.
export KEEL_IMAGE_TAG=${KEELDEV_IMAGE_TAG:-dev}
"$ROOT/infra/compose/offline/build.sh" all
log "images:"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | awk '/^keel/ { printf "  %-32s %s\n", $1, $2 }' | sort >&2

# --- free loopback ports for everything compose publishes ------------------------------------
read -r -a ports < <(python3 - <<'PY'
import socket
socks = []
for _ in range(12):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
export KEEL_PUBLISH_ADDR=127.0.0.1
export KEEL_POSTGRES_PORT=${ports[0]} KEEL_PGBOUNCER_PORT=${ports[1]} \
    KEEL_RABBITMQ_MANAGEMENT_PORT=${ports[2]} KEEL_CHECKOUT_PORT=${ports[3]} \
    KEEL_BILLING_PORT=${ports[4]} KEEL_NOTIFICATION_PORT=${ports[5]} \
    KEEL_PSP_SIM_PORT=${ports[6]} KEEL_PSP_SIM_ADMIN_PORT=${ports[7]} \
    KEEL_JAEGER_PORT=${ports[8]} KEEL_PROMETHEUS_PORT=${ports[9]} KEEL_GRAFANA_PORT=${ports[10]} \
    KEEL_MAILPIT_PORT=${ports[11]}

# --- up -------------------------------------------------------------------------------------
compose down -v --remove-orphans >/dev/null 2>&1 || true
log "docker-compose up (the offline override)"
up_started=$SECONDS
# up -d returns once every container is started, each after its dependencies' conditions
# (healthy, or completed for the one-shots); a one-shot that fails makes `up` fail.
timeout 600 docker-compose -p "$PROJECT" --project-directory "$ROOT" "${COMPOSE_FILES[@]}" \
    up -d --no-build >&2

long_running=(postgres pgbouncer rabbitmq redis mailpit checkout billing notification psp-sim)
restarted=""
all_healthy() {
    local svc id status restarts
    for svc in "${long_running[@]}"; do
        id=$(compose ps -q "$svc")
        [[ -n $id ]] || return 1
        # A restart is a failure, not a slow start: `up` must converge without a restart loop.
        restarts=$(docker inspect -f '{{.RestartCount}}' "$id" 2>/dev/null) || return 1
        if ((restarts > 0)); then
            restarted=$svc
            return 0
        fi
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null) || return 1
        [[ $status == healthy ]] || return 1
    done
}
wait_until 180 "every service to be healthy" all_healthy || die "the stack did not become healthy"
[[ -z $restarted ]] || die "$restarted restarted while the stack came up (a restart loop)"
log "every service healthy $((SECONDS - up_started)) s after up"

# The one-shots ran once and exited 0 (a restart loop would show as a non-zero exit).
for oneshot in db-init checkout-migrate billing-migrate notification-migrate; do
    code=$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q "$oneshot")")
    [[ $code == 0 ]] || die "$oneshot exited $code"
done

# P14: the published pooler lets no superuser in (init.sql's lookup function never answers for
# one), while keelctl's roles below log in through it.
if PGPASSWORD=postgres_dev PGCONNECT_TIMEOUT=5 psql -X -q -h 127.0.0.1 -p "$KEEL_PGBOUNCER_PORT" \
    -U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    die "the postgres superuser logged in through pgbouncer"
fi
log "pgbouncer refuses the superuser"

# --- the journey, through the published ports -------------------------------------------------
KEELCTL="${KEELDEV_BIN_DIR:-$ROOT/target/debug}/keelctl"
if [[ ! -x $KEELCTL ]]; then
    cargo build -q -p keelctl --manifest-path "$ROOT/Cargo.toml"
    KEELCTL="$ROOT/target/debug/keelctl"
fi
# `env -i`: keelctl, like the services, refuses KEEL_* variables it does not know, and this
# script exported compose's (KEEL_CHECKOUT_PORT, ...).
keelctl() {
    env -i PATH="$PATH" HOME="$HOME" KEEL_STACK__HOST=127.0.0.1 \
        KEEL_STACK__PGBOUNCER_PORT="$KEEL_PGBOUNCER_PORT" \
        KEEL_RABBITMQ__MANAGEMENT_URL="http://127.0.0.1:$KEEL_RABBITMQ_MANAGEMENT_PORT" \
        KEEL_RABBITMQ__USERNAME=keel KEEL_RABBITMQ__PASSWORD=keel_dev \
        KEEL_CHECKOUT__HTTP_URL="http://127.0.0.1:$KEEL_CHECKOUT_PORT" \
        KEEL_BILLING__HTTP_URL="http://127.0.0.1:$KEEL_BILLING_PORT" \
        KEEL_NOTIFICATION__HTTP_URL="http://127.0.0.1:$KEEL_NOTIFICATION_PORT" \
        KEEL_PSP_SIM__HTTP_URL="http://127.0.0.1:$KEEL_PSP_SIM_PORT" \
        KEEL_PSP_SIM__ADMIN_URL="http://127.0.0.1:$KEEL_PSP_SIM_ADMIN_PORT" \
        timeout 300 "$KEELCTL" "$@"
}
log "keelctl demo: every kind of order through http://127.0.0.1:$KEEL_CHECKOUT_PORT"
# As JSON, kept: the orders it placed are what the mail check below looks for.
mkdir -p "$KEELDEV_HOME/compose"
demo_json="$KEELDEV_HOME/compose/demo.json"
demo_rc=0
keelctl -o json demo >"$demo_json" || demo_rc=$?
python3 - "$demo_json" >&2 <<'PY' || true
import json, sys
outcome = json.load(open(sys.argv[1]))
for c in outcome["cases"]:
    print(f"  {c['scenario']:<30} {c['order_id']:<36} {c['state']:<18} "
          f"{'ok' if c['ok'] else 'NOT OK, expected ' + c['expected']}  {c['note']}")
print(f"  replayed webhook: {outcome['replayed_webhook']}")
PY
((demo_rc == 0)) || die "keelctl demo failed (exit $demo_rc); its outcome: $demo_json"

# Every order the demo placed reached a final state and its notification; notification emails
# each one (an email.send job, at least once). Read the sink's API until every order has a
# message whose subject names it, every recipient in the customers' domain: bounded at 60 s,
# one loopback request per half second.
log "mail: the demo's emails at http://127.0.0.1:$KEEL_MAILPIT_PORT/api/v1/messages"
python3 - "$KEEL_MAILPIT_PORT" "$demo_json" >&2 <<'PY'
import json, sys, time, urllib.request

port, demo_json = sys.argv[1], sys.argv[2]
DOMAIN = "@customers.keel.test"
orders = sorted({c["order_id"] for c in json.load(open(demo_json))["cases"] if c["order_id"]})
url = f"http://127.0.0.1:{port}/api/v1/messages?limit=500"
deadline = time.monotonic() + 60
problem = "no answer yet"
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        messages = body.get("messages") or []
        recipients = [t.get("Address", "") for m in messages for t in (m.get("To") or [])]
        strays = [m for m in messages
                  if not m.get("To") or any(not t.get("Address", "").endswith(DOMAIN) for t in m["To"])]
        if strays:
            sys.exit(f"mail: messages outside {DOMAIN}: "
                     + ", ".join(f"{m.get('Subject')!r} to {m.get('To')}" for m in strays[:5]))
        missing = [o for o in orders if not any(o in (m.get("Subject") or "") for m in messages)]
        if not missing and body.get("total", 0) >= len(orders):
            print(f"mail: {body['total']} message(s) for the demo's {len(orders)} orders, every "
                  f"one to {DOMAIN} ({', '.join(sorted(set(recipients)))}); e.g. "
                  f"{messages[0].get('Subject')!r}")
            break
        problem = f"{body.get('total', 0)} message(s); no email yet for order(s) {', '.join(missing)}"
    except OSError as e:
        problem = f"the sink's API: {e}"
    if time.monotonic() >= deadline:
        sys.exit(f"mail: after 60 s, {problem}")
    time.sleep(0.5)  # the poll interval of a bounded wait
PY
log "keelctl audit"
keelctl audit >&2

# --- what it cost -----------------------------------------------------------------------------
log "resident memory of the running stack:"
mapfile -t running < <(compose ps -q)
docker stats --no-stream --format '{{.Name}} {{.MemUsage}}' "${running[@]}" |
    awk '{ split($2, a, /[A-Za-z]+/); v = a[1]; u = $2; sub(/^[0-9.]+/, "", u);
           m = (u == "GiB") ? v * 1024 : (u == "KiB") ? v / 1024 : v; total += m;
           printf "  %-40s %8.1f MiB\n", $1, m }
         END { printf "  %-40s %8.1f MiB\n", "total", total }' >&2
log "test-compose passed"
