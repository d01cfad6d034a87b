# Keel's front door. Two commands from a fresh machine: `make dev` runs the platform,
# `make test` passes the tests. Every target is idempotent.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# What `make new-service` runs; the scaffolding test passes the binary it already built.
SCAFFOLD ?= $(CARGO) run -q -p keel-scaffold --

.PHONY: help dev down status demo deps build tools test lint fmt bench new-service reset-dev-data mutants rabbitmq-definitions \
	up down-compose test-compose kind-up kind-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

deps: ## dependencies only: Postgres, pgbouncer, RabbitMQ, Redis (reused or project-local)
	infra/dev/stack.sh up

build: ## debug build of every binary and test (the same artifacts `make test` uses)
	$(CARGO) build --workspace --all-targets

dev: deps build ## every service in infra/services.toml, natively; returns once each is ready
	infra/dev/services.sh start

down: ## stop everything `make dev` started, and nothing else
	infra/dev/services.sh stop
	infra/dev/stack.sh down

reset-dev-data: ## drop the services' dev databases (asks first; YES=1 skips that), recreate them empty
	YES="$(YES)" infra/dev/services.sh reset-data
	infra/dev/stack.sh up

demo: ## against `make dev`: every kind of order, their final states, then `keelctl audit`
	infra/dev/services.sh demo

new-service: ## NAME=inventory: services/NAME from templates/service, registered (docs/new-service.md)
	@[[ -n "$(NAME)" ]] || { echo "usage: make new-service NAME=<lowercase letters and digits>" >&2; exit 64; }
	$(SCAFFOLD) --root "$(CURDIR)" new "$(NAME)"

status: ## what runs where
	infra/dev/stack.sh status
	infra/dev/services.sh status

tools: ## test tools a fresh machine may lack (shellcheck, curl, docker-compose, cargo-nextest, cargo-deny, cargo-machete); fast when present
	command -v shellcheck >/dev/null && command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq shellcheck curl; }
	@# docker-compose renders compose.yaml for the drift test, which the scaffolding test also
	@# runs (before infra/deploy/check.sh would install it); no engine is needed for that.
	command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	@# Pinned: deny.toml's format and machete's findings are those of these versions. A first
	@# install compiles both from source (a few minutes); afterwards this line costs nothing.
	command -v cargo-deny >/dev/null || $(CARGO) install --locked cargo-deny@0.20.2
	command -v cargo-machete >/dev/null || $(CARGO) install --locked cargo-machete@0.9.2

lint: tools ## formatting, clippy (warnings are errors), shellcheck, unused and forbidden dependencies
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	shellcheck -x infra/dev/*.sh infra/mutants/*.sh infra/compose/*.sh infra/compose/offline/*.sh \
		infra/deploy/*.sh infra/k8s/*.sh k8s/overlays/kind/dependencies/postgres/*.sh .ci/run
	@# Declared but unused dependencies (generated code's are listed in its crate's
	@# [package.metadata.cargo-machete]); exits non-zero when it finds one.
	$(CARGO) machete
	@# Bans (one TLS provider: no aws-lc, no OpenSSL), licenses, crates.io only. No advisories:
	@# their database lives on GitHub, which these machines cannot reach (see deny.toml).
	$(CARGO) deny --workspace check bans licenses sources

test: deps lint ## the quality gates and the whole test suite (nextest, parallel)
	infra/dev/clean-test-dbs.sh
	$(CARGO) nextest run --workspace --no-fail-fast
	@# compose.yaml and k8s/ without an engine or a cluster: valid, hadolint-clean, in step with
	@# the registry and each service's check-config, and held to the Kubernetes policy.
	infra/deploy/check.sh

bench: deps ## release build; prints Keel-vs-baseline ratios and writes target/bench/report.json
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@# The bench profile (release settings, target/release) for the binaries too: built with
	@# the same profile and features as the bench itself, nothing is compiled twice.
	$(CARGO) build --profile bench --workspace --bins --example bare_axum
	$(CARGO) bench --workspace --bench keel
	$(CARGO) bench --workspace --bench journey
	$(CARGO) bench --workspace --bench messaging

rabbitmq-definitions: ## rewrite infra/rabbitmq/definitions.json from the code (topology, per-service users); commit the result
	$(CARGO) build --bins
	KEEL_BLESS=1 $(CARGO) nextest run -p keel-e2e --test rabbitmq_definitions the_definitions_file_is_what_the_code_renders
	@# The kind overlay loads a copy (kustomize takes no file from outside its folder).
	cp infra/rabbitmq/definitions.json k8s/overlays/kind/dependencies/rabbitmq/definitions.json

mutants: deps ## mutation testing of the pattern modules (slow, not part of test); MODULES=a,b for a subset
	infra/mutants/run.sh

# The compose stack (docs/deploy/compose.md): infra/compose/compose.sh finds or starts an
# engine (a project-local dockerd under .keel/docker when none answers) and runs compose.
up: ## the whole stack under docker compose (pulls public images; builds Keel's); PROFILE=observability adds traces and metrics
	infra/compose/compose.sh $(if $(PROFILE),--profile $(PROFILE)) up -d --build

down-compose: ## stop the compose stack and delete its volumes (and the project-local engine, if make up started one)
	infra/compose/compose.sh --profile observability down -v --remove-orphans
	infra/compose/engine.sh stop

test-compose: ## compose.yaml brought up here for real (offline stand-in images), the demo's orders and keelctl audit through it, then down -v
	infra/compose/test.sh

kind-up: ## a kind cluster with Keel deployed (k8s/overlays/kind; docs/deploy/kind.md); needs kind and image pulls
	infra/k8s/kind.sh up

kind-down: ## delete the kind cluster
	infra/k8s/kind.sh down

fmt: ## format the code
	$(CARGO) fmt --all
