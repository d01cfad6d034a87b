#!/usr/bin/env bash
# Ensures a PgBouncer >= 1.21 binary at $KEELDEV_HOME/bin/pgbouncer and prints its
# path on stdout (logs go to stderr).
#
# Why >= 1.21: that release added `max_prepared_statements`, i.e. protocol-level
# prepared statements in transaction pooling mode, which sqlx relies on.
# Debian 12 ships 1.18, so unless a new enough pgbouncer is on PATH we build the
# Debian trixie source package (1.24.x) once and cache the binary in .keel/.
#
# Order: cached binary (costs only a `--version` call) -> pgbouncer on PATH ->
# build from source.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PGBOUNCER_MIN_VERSION=1.21
PGBOUNCER_BIN="$KEELDEV_HOME/bin/pgbouncer"
PGBOUNCER_BUILD="$KEELDEV_HOME/build"
# deb-src ONLY: a `deb` line for trixie would let apt pull trixie binaries into
# this bookworm system on the next upgrade; source indexes never do that.
TRIXIE_SRC_LIST=/etc/apt/sources.list.d/keel-trixie-src.list
TRIXIE_SRC_LINE='deb-src http://deb.debian.org/debian trixie main'

# pgbouncer_version BIN: prints e.g. 1.24.1, or fails. `--version` works as root.
pgbouncer_version() {
    local out
    out=$("$1" --version 2>/dev/null | head -n1) || return 1
    [[ $out =~ ([0-9]+\.[0-9]+(\.[0-9]+)?) ]] || return 1
    printf '%s\n' "${BASH_REMATCH[1]}"
}

good_enough() {
    local v
    [[ -x $1 ]] || return 1
    v=$(pgbouncer_version "$1") || return 1
    version_ge "$v" "$PGBOUNCER_MIN_VERSION"
}

build_from_trixie_source() {
    need_root "building pgbouncer"
    mkdir -p "$PGBOUNCER_BUILD"
    if [[ "$(cat "$TRIXIE_SRC_LIST" 2>/dev/null)" != "$TRIXIE_SRC_LINE" ]]; then
        log "adding $TRIXIE_SRC_LIST (deb-src only)"
        printf '%s\n' "$TRIXIE_SRC_LINE" >"$TRIXIE_SRC_LIST"
    fi
    # Refresh only this one list: fast, and it leaves the other indexes (and
    # thus what `apt-get upgrade` would do) exactly as they were.
    log "apt-get update (trixie sources only)"
    apt-get update -q \
        -o Dir::Etc::sourcelist="$TRIXIE_SRC_LIST" \
        -o Dir::Etc::sourceparts=- \
        -o APT::Get::List-Cleanup=0 >&2
    # dpkg-dev provides dpkg-source; the rest are pgbouncer's build deps
    # (libevent for the event loop, OpenSSL for TLS/SCRAM, c-ares for async DNS).
    apt_install dpkg-dev libevent-dev libssl-dev libc-ares-dev pkg-config make gcc

    local work
    work=$(mktemp -d "$PGBOUNCER_BUILD/src.XXXXXX")
    (
        cd "$work"
        log "apt-get source --download-only pgbouncer/trixie"
        # Sandbox user root: the temp dir is root-only (0700), _apt cannot write it.
        apt-get source -q -o APT::Sandbox::User=root --download-only pgbouncer/trixie >&2
        local dsc
        dsc=$(find . -maxdepth 1 -name 'pgbouncer_*.dsc' | head -n1)
        [[ -n $dsc ]] || die "no pgbouncer .dsc downloaded"
        # --no-check: apt already verified these files against the hashes in
        # the signed trixie Sources index; bookworm may lack the uploader key.
        dpkg-source --no-check -x "$dsc" src >&2
        cd src
        log "configure && make -j2"
        ./configure --prefix="$PGBOUNCER_BUILD/prefix" --with-cares --without-systemd >"$work/configure.log" 2>&1 ||
            die "configure failed, see $work/configure.log"
        make -j2 >"$work/make.log" 2>&1 || die "make failed, see $work/make.log"
        [[ -x ./pgbouncer ]] || die "build produced no pgbouncer binary"
        mkdir -p "$KEELDEV_HOME/bin"
        # Copy to a temp name then rename, so a concurrent reader never sees a
        # half-written binary.
        install -m 0755 ./pgbouncer "$PGBOUNCER_BIN.tmp"
        mv -f "$PGBOUNCER_BIN.tmp" "$PGBOUNCER_BIN"
    )
    rm -rf "$work"
}

ensure_pgbouncer() {
    if good_enough "$PGBOUNCER_BIN"; then
        printf '%s\n' "$PGBOUNCER_BIN"
        return 0
    fi
    local onpath
    onpath=$(command -v pgbouncer 2>/dev/null || true)
    if [[ -n $onpath ]] && good_enough "$onpath"; then
        log "using $onpath ($(pgbouncer_version "$onpath"))"
        mkdir -p "$KEELDEV_HOME/bin"
        ln -sfn "$onpath" "$PGBOUNCER_BIN"
        printf '%s\n' "$PGBOUNCER_BIN"
        return 0
    fi
    [[ -e $PGBOUNCER_BIN || -L $PGBOUNCER_BIN ]] && rm -f "$PGBOUNCER_BIN"
    log "no pgbouncer >= $PGBOUNCER_MIN_VERSION found; building from Debian trixie source"
    build_from_trixie_source
    good_enough "$PGBOUNCER_BIN" || die "built pgbouncer is not >= $PGBOUNCER_MIN_VERSION"
    log "built $PGBOUNCER_BIN ($(pgbouncer_version "$PGBOUNCER_BIN"))"
    printf '%s\n' "$PGBOUNCER_BIN"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    ensure_pgbouncer
fi
