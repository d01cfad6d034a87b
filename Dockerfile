# Keel's one image recipe: every service is built from this file, chosen by the SERVICE build
# argument (`docker build --build-arg SERVICE=checkout -t keel/checkout:dev .`).
#
#   build    compiles every service in infra/services.toml in one cargo run, with the cargo
#            registry and target/ in BuildKit cache mounts: the stage does not depend on
#            SERVICE, so the four images share it and a second image costs nothing.
#   pick     takes the one binary SERVICE names (and refuses a name that is not a service).
#   runtime  a small image without a shell or package manager (distroless "cc": glibc, libgcc,
#            CA certificates), the binary at a fixed path, a numeric non-root user, and an
#            exec-form entrypoint, so signals reach the service itself (P20) and Kubernetes'
#            runAsNonRoot can check the user without a passwd lookup (P46).
#
# Base images are build arguments: the defaults are the public images a reader pulls; `make
# test-compose`, on a machine that can pull nothing, passes locally built stand-ins
# (infra/compose/offline/build.sh). A read-only root filesystem works: nothing is written.
#
# Migrations are the same image with `migrate --wait 60s`, run once before the service
# (compose's one-shot *-migrate services, Kubernetes' migration Jobs).

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# .dockerignore keeps target/, .keel/ and .git out of the context.
COPY . .
# The registry's names, read the way infra/dev/registry.sh reads them: a new service is built
# without touching this file. --locked: the image builds exactly what Cargo.lock says.
# ($packages is split on purpose: one -p per service.)
# hadolint ignore=SC2086
RUN --mount=type=cache,id=keel-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=keel-cargo-target,target=/src/target \
    set -eu; \
    services=$(sed -n 's/^name = "\([a-z0-9-]*\)".*/\1/p' infra/services.toml); \
    packages=""; for s in $services; do packages="$packages -p $s"; done; \
    cargo build --release --locked $packages; \
    mkdir -p /out; \
    for s in $services; do cp "target/release/$s" /out/; done

FROM build AS pick
ARG SERVICE
RUN set -eu; \
    if [ -z "${SERVICE:-}" ] || [ ! -x "/out/${SERVICE}" ]; then \
        echo "build argument SERVICE must name a service in infra/services.toml (got \"${SERVICE:-}\")" >&2; \
        exit 1; \
    fi; \
    cp "/out/${SERVICE}" /service

FROM ${RUNTIME_IMAGE} AS runtime
ARG SERVICE
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="keel-${SERVICE}" \
      org.opencontainers.image.description="Keel ${SERVICE}: a service of the Keel reference microservice platform" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=pick /service /usr/local/bin/service
# Numeric, so runAsNonRoot can verify it; not 0, and not any user the base image defines.
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/service"]
CMD ["serve"]
