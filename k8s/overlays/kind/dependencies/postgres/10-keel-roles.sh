#!/bin/bash
# Creates Keel's roles and databases when the postgres image initialises an empty data
# directory (it runs /docker-entrypoint-initdb.d/* once, against a server listening only on
# its socket, so nothing can connect over TCP before this has finished). The SQL is the dev
# stack's own, infra/postgres/init.sql, copied beside this script because kustomize reads no
# file outside the overlay; infra/k8s/test_policy.py fails if the copy drifts.
#
# The list is the registry's services with `database = true` (infra/services.toml); the same
# test checks it, and `make new-service` appends a new service's name to it. No extra role
# pairs: those are for the platform's own tests.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
  -v services=checkout,billing,notification -v extra_roles= \
  -f /etc/keel/postgres/init.sql
