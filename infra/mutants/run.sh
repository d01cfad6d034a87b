#!/usr/bin/env bash
# make mutants: cargo-mutants over the modules that carry Keel's patterns, each tested by the
# test binaries that exercise it (not the whole workspace: a mutant of the outbox is caught by
# the relay's tests, not by checkout's), then one table of caught / missed / unviable / timeout
# per module. Survivors either get a test or a one-line reason in .cargo/mutants.toml.
#
# Slow by design (every mutant is a build and a test run), so not part of `make test`.
# MODULES=name,name runs a subset. One mutant at a time: parallel copies would build into
# the one shared target folder (below) and could link each other's mutated libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants@27.1.0

# name | file | test packages (comma-separated) | the test targets that exercise the module.
# Only those targets are built and run, plus the packages' unit tests (--lib): a mutant build
# then links two or three test binaries instead of every one the packages have.
MODULE_TABLE=(
  "pg-outbox|crates/keel-pg/src/outbox.rs|keel-amqp,keelctl|relay outbox_proof outbox"
  "pg-inbox|crates/keel-pg/src/inbox.rs|keel-amqp,notification|consumer relay"
  "pg-idempotency|crates/keel-pg/src/idempotency.rs|keel-pg,checkout|idempotency orders_api idempotency_keys"
  "pg-jobs|crates/keel-pg/src/jobs.rs|keel-pg|jobs"
  "amqp-relay|crates/keel-amqp/src/relay.rs|keel-amqp|relay outbox_proof"
  "amqp-consumer|crates/keel-amqp/src/consumer.rs|keel-amqp,notification|consumer"
  "billing-webhook|services/billing/src/webhook.rs|billing|webhook"
  "billing-ledger-store|services/billing/src/ledger/store.rs|billing|ledger grpc"
  "checkout-stock|services/checkout/src/stock.rs|checkout|stock saga"
  "checkout-compensation|services/checkout/src/saga/compensate.rs|checkout|saga"
)

OUT=target/mutants
# One target folder for every run: cargo-mutants builds in a copy of the tree, and a shared
# target keeps the dependencies built once instead of once per module.
export CARGO_TARGET_DIR="$PWD/$OUT/target"
export KEEL_PROFILE=dev
# Every mutant is an incremental build whose cost is mostly linking: no debug info (the
# `mutants` cargo profile) and mold where it is installed cut that to a fraction.
if command -v mold >/dev/null; then
  export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-fuse-ld=mold"
fi
mkdir -p "$OUT"

wanted="${MODULES:-}"
skipped=()
for row in "${MODULE_TABLE[@]}"; do
  IFS='|' read -r name file packages targets <<<"$row"
  if [[ -n "$wanted" && ",$wanted," != *",$name,"* ]]; then continue; fi
  echo "== $name: $file (tests: $packages: --lib $targets)"
  test_args=(--lib)
  for t in $targets; do test_args+=("--test=$t"); done
  package_args=()
  for p in ${packages//,/ }; do package_args+=("--package=$p"); done

  # The baseline, run here: cargo-mutants 27 builds and tests its baseline with the mutated
  # file's own package instead of --test-package, which has none of these test targets. An
  # unmutated tree whose tests fail would make every mutant look caught, so a failing baseline
  # skips the module (and the run ends non-zero). Its test time, not counting the build, sets
  # the per-mutant timeout (3x, at least 120 s).
  rm -rf "${OUT:?}/$name"
  nextest=(cargo nextest run --cargo-profile=mutants --profile=mutants "${package_args[@]}"
    "${test_args[@]}")
  if ! "${nextest[@]}" --no-run >"$OUT/$name.baseline.log" 2>&1; then
    echo "   baseline build failed: see $OUT/$name.baseline.log; module skipped"
    skipped+=("$name")
    continue
  fi
  started=$SECONDS
  if ! "${nextest[@]}" >>"$OUT/$name.baseline.log" 2>&1; then
    echo "   baseline tests failed: see $OUT/$name.baseline.log; module skipped"
    skipped+=("$name")
    continue
  fi
  timeout=$(( (SECONDS - started) * 3 ))
  (( timeout < 120 )) && timeout=120
  echo "   baseline passed in $(( SECONDS - started )) s; mutant test timeout ${timeout} s"

  cargo_args=()
  for a in "${test_args[@]}"; do cargo_args+=("--cargo-arg=$a"); done
  # --cargo-arg reaches both the build (nextest run --no-run) and the test run. The nextest
  # profile `mutants` fails fast: one failing test is enough to call a mutant caught.
  # Exit codes 2 (missed) and 3 (timeout) are results, not failures of this script.
  cargo mutants --file "$file" --test-tool nextest --test-package "$packages" \
    --profile mutants "${cargo_args[@]}" --cargo-arg=--profile=mutants \
    --baseline skip --timeout "$timeout" --build-timeout 900 \
    --jobs 1 --output "$OUT/$name" || true
  # The shared target now holds the last mutant's build of this crate, newer than the
  # checkout's unchanged source: cargo names workspace crates' artifacts without their path,
  # so the next baseline would link the mutant. A fresh mtime makes it rebuild.
  touch "$file"
done

infra/mutants/summary.sh "$OUT"
if (( ${#skipped[@]} )); then
  echo "skipped (baseline failed): ${skipped[*]}" >&2
  exit 1
fi
