#!/usr/bin/env bash
# make mutants: cargo-mutants over the modules that carry Keel's patterns, each tested by the
# test binaries that exercise it (not the whole workspace: a mutant of the outbox is caught by
# the relay's tests, not by checkout's), then one table of caught / missed / unviable / timeout
# per module. Survivors either get a test or a one-line reason in .cargo/mutants.toml.
#
# Slow by design (every mutant is a build and a test run), so not part of `make test`.
# MODULES=name,name runs a subset; JOBS sets cargo-mutants' parallelism (default 1: on two
# cores a second job only fights the first for the CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants@27.1.0

# name | file | test packages (comma-separated) | nextest filterset of the integration tests
# that exercise the module (the packages' unit tests, kind(lib), always run too: they are
# fast, and a mutant they catch is caught)
MODULE_TABLE=(
  "pg-outbox|crates/keel-pg/src/outbox.rs|keel-amqp|binary(relay) | binary(outbox_proof)"
  "pg-inbox|crates/keel-pg/src/inbox.rs|keel-amqp,notification|binary(consumer) | binary(relay)"
  "pg-idempotency|crates/keel-pg/src/idempotency.rs|checkout|binary(orders_api) | binary(idempotency_keys)"
  "pg-jobs|crates/keel-pg/src/jobs.rs|keel-pg|binary(jobs)"
  "amqp-relay|crates/keel-amqp/src/relay.rs|keel-amqp|binary(relay) | binary(outbox_proof)"
  "amqp-consumer|crates/keel-amqp/src/consumer.rs|keel-amqp,notification|binary(consumer)"
  "billing-webhook|services/billing/src/webhook.rs|billing|binary(webhook)"
  "billing-ledger-store|services/billing/src/ledger/store.rs|billing|binary(ledger) | binary(grpc)"
  "checkout-stock|services/checkout/src/stock.rs|checkout|binary(stock) | binary(saga)"
  "checkout-compensation|services/checkout/src/saga/compensate.rs|checkout|binary(saga)"
)

OUT=target/mutants
# One target folder for every run: cargo-mutants builds in a copy of the tree, and a shared
# target keeps the dependencies built once instead of once per module.
export CARGO_TARGET_DIR="$PWD/$OUT/target"
export KEEL_PROFILE=dev
mkdir -p "$OUT"

wanted="${MODULES:-}"
for row in "${MODULE_TABLE[@]}"; do
  IFS='|' read -r name file packages filter <<<"$row"
  if [[ -n "$wanted" && ",$wanted," != *",$name,"* ]]; then continue; fi
  echo "== $name: $file (tests: $packages, $filter)"
  # Exit codes 2 (missed) and 3 (timeout) are results, not failures of this script.
  cargo mutants --file "$file" --test-tool nextest --test-package "$packages" \
    --jobs "${JOBS:-1}" --timeout-multiplier 3 --minimum-test-timeout 120 \
    --output "$OUT/$name" -- -E "($filter) | kind(lib)" --no-fail-fast || true
done

infra/mutants/summary.sh "$OUT"
