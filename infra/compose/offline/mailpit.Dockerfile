# The offline stand-in for compose.yaml's `mailpit` (Mailpit's image cannot be pulled here):
# keel-smtp-sink (crates/keel-smtp-sink), which speaks SMTP and serves a subset of Mailpit's
# HTTP API with the same field names, behind a `/mailpit` that answers compose.yaml's
# healthcheck (`/mailpit readyz`) the way Mailpit does (mailpit-entrypoint.sh). Only
# `make test-compose` uses it; a reader's `docker compose up` pulls Mailpit itself.
#
# Built by build.sh with the repository as its context (.dockerignore keeps target/, .keel/ and
# .git out), on the same bases as Keel's own images and with the same cache mounts as the root
# Dockerfile's build stage: the crates it shares with the services are fetched and compiled
# once.
#
#   docker build -f infra/compose/offline/mailpit.Dockerfile \
#       --build-arg RUST_IMAGE=keel-offline/rust:dev --build-arg RUNTIME_IMAGE=keel-offline/runtime:dev \
#       -t keel-offline/mailpit:dev .

ARG RUST_IMAGE=keel-offline/rust:dev
ARG RUNTIME_IMAGE=keel-offline/runtime:dev

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=keel-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=keel-cargo-target,target=/src/target \
    set -eu; \
    cargo build --release --locked -p keel-smtp-sink; \
    cp target/release/keel-smtp-sink /keel-smtp-sink

FROM ${RUNTIME_IMAGE}
COPY --from=build /keel-smtp-sink /usr/local/bin/keel-smtp-sink
COPY --chmod=0755 infra/compose/offline/mailpit-entrypoint.sh /mailpit
# Numeric and not root, as Keel's own images; nothing is written (messages live in memory).
USER 10001:10001
EXPOSE 1025 8025
ENTRYPOINT ["/mailpit"]
