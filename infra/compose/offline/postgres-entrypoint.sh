#!/bin/sh
# The offline postgres stand-in's entrypoint: what the official image's does for compose.yaml.
# On first start (empty $PGDATA) it creates the cluster with the superuser password from
# POSTGRES_PASSWORD_FILE and lets SCRAM logins in from the network; then it runs the server
# in the foreground, as PID 1's exec, so SIGTERM is a clean (smart) shutdown.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD_FILE:?POSTGRES_PASSWORD_FILE must name the superuser password file}"
    initdb --username=postgres --pwfile="$POSTGRES_PASSWORD_FILE" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
fi
if [ "${1:-}" = postgres ]; then
    shift
    exec postgres "$@"
fi
exec "$@"
