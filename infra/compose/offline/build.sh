#!/usr/bin/env bash
# Builds every image `make test-compose` runs, on a machine that can pull none:
#
#   keel-base/debian:bookworm   a minimal Debian made here with debootstrap (about 35 s once)
#   keel-offline/{postgres,rabbitmq,redis,pgbouncer}
#                               stand-ins for compose.yaml's third-party images (./Dockerfile)
#   keel-offline/runtime        the runtime base (distroless "cc"'s stand-in)
#   keel-offline/rust           the build stage's base: this machine's own Rust toolchain
#   keel/<service>:dev          Keel's images, from the real Dockerfile at the root, with its
#                               base images overridden by build arguments
#   keel-offline/mailpit        compose.yaml's mail sink: keel-smtp-sink behind a Mailpit-like
#                               /mailpit (./mailpit.Dockerfile, built like Keel's images)
#
# Needs DOCKER_HOST pointing at an engine (infra/compose/engine.sh start). Images already in
# the engine are reused, and BuildKit's cache mounts keep cargo's registry and target/ between
# runs, so a second run costs only what changed.
set -euo pipefail
# A failing command inside $(...) (the build context, the pgbouncer binary) stops the script.
shopt -s inherit_errexit

# shellcheck source-path=SCRIPTDIR source=../../dev/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../dev/lib.sh"

HERE="$KEELDEV_ROOT/infra/compose/offline"
WORK="$KEELDEV_HOME/compose"
BASE=keel-base/debian:bookworm
TAG=${KEELDEV_IMAGE_TAG:-dev}
# Debian's client: BuildKit (cache mounts, COPY --chmod) without buildx.
docker() { DOCKER_BUILDKIT=1 /usr/bin/docker "$@"; }

[[ -n ${DOCKER_HOST:-} ]] || die "DOCKER_HOST is not set: run infra/compose/engine.sh start first"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror this machine's apt uses (deb822 sources first, then sources.list).
debian_mirror() {
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*debian\)[[:space:]]*$/\1/p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    [[ -n $uri ]] || uri=$(sed -n 's/^deb[[:space:]]\+\(http[^[:space:]]*debian\)[[:space:]]\+bookworm[[:space:]].*/\1/p' \
        /etc/apt/sources.list 2>/dev/null | head -n1)
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

base_image() {
    mkdir -p "$WORK"
    have_image "$BASE" && return 0
    need_root "debootstrap"
    local rootfs="$WORK/rootfs" mirror
    mirror=$(debian_mirror)
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    log "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $WORK/debootstrap.log"
    # Nothing of the build machine's apt state or caches goes into the image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
    log "imported $BASE"
}

# The stand-ins' build context: their Dockerfile and entrypoint, the pgbouncer binary and the
# toolchain, hard-linked (same filesystem) or copied. BuildKit sends a target only the files
# its COPY lines name.
context() {
    local ctx="$WORK/context" sysroot pgbouncer
    rm -rf "$ctx"
    mkdir -p "$ctx/toolchain"
    cp "$HERE/Dockerfile" "$HERE/postgres-entrypoint.sh" "$ctx/"
    pgbouncer=$("$KEELDEV_ROOT/infra/dev/pgbouncer.sh")
    cp "$(realpath "$pgbouncer")" "$ctx/pgbouncer"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca-bundle.crt"
    sysroot=$(rustc --print sysroot)
    # bin/ and lib/ are the toolchain; share/ (docs, 800 MB) is not needed to build.
    cp -al "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/" 2>/dev/null ||
        cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
    printf '%s\n' "$ctx"
}

stand_ins() {
    local ctx target
    ctx=$(context)
    for target in postgres rabbitmq redis pgbouncer runtime rust; do
        log "building keel-offline/$target"
        docker build -q --target "$target" --build-arg BASE_IMAGE="$BASE" \
            -t "keel-offline/$target:$TAG" "$ctx" >/dev/null
    done
    rm -rf "$ctx"
}

# Keel's own images: the real Dockerfile, only the bases swapped.
keel_images() {
    local service
    for service in "${KEELDEV_SERVICES[@]}"; do
        log "building keel/$service:$TAG"
        docker build -q \
            --build-arg SERVICE="$service" \
            --build-arg RUST_IMAGE="keel-offline/rust:$TAG" \
            --build-arg RUNTIME_IMAGE="keel-offline/runtime:$TAG" \
            --build-arg REVISION="$(git -C "$KEELDEV_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
            -t "keel/$service:$TAG" "$KEELDEV_ROOT" >/dev/null
    done
}

# Mailpit's stand-in: a workspace binary, so built from the repository like Keel's images (on
# their bases, sharing their cargo cache mounts), after them: the crates are compiled by then.
mailpit_image() {
    log "building keel-offline/mailpit:$TAG (keel-smtp-sink)"
    docker build -q -f "$HERE/mailpit.Dockerfile" \
        --build-arg RUST_IMAGE="keel-offline/rust:$TAG" \
        --build-arg RUNTIME_IMAGE="keel-offline/runtime:$TAG" \
        -t "keel-offline/mailpit:$TAG" "$KEELDEV_ROOT" >/dev/null
}

case "${1:-all}" in
stand-ins) base_image && stand_ins && mailpit_image ;;
keel) keel_images ;;
all) mkdir -p "$WORK" && base_image && stand_ins && keel_images && mailpit_image ;;
*)
    echo "usage: $0 [stand-ins|keel|all]" >&2
    exit 64
    ;;
esac
