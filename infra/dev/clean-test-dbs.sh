#!/usr/bin/env bash
# Drops databases left behind by test runs that were killed before their cleanup ran
# (keel_t_*), and test templates (keel_tpl_*) so a run starts from the current migrations.
# Run by `make test` before the suite; never touches the keel_<service> databases.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck disable=SC1091  # the shared port file, checked on its own
source "$ROOT/infra/dev/stack.env"
if [[ -f "$ROOT/.keel/stack.env" ]]; then
  # shellcheck disable=SC1091
  source "$ROOT/.keel/stack.env"
fi
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"; }
psql_admin -At -c "
  SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', datname)
  FROM pg_database
  WHERE datname LIKE 'keel\_t\_%' OR datname LIKE 'keel\_tpl\_%'" |
  while IFS= read -r stmt; do
    [[ -n "$stmt" ]] || continue
    # Templates must lose their template flag before they can be dropped.
    db="$(sed -E 's/.*EXISTS "?([^" ]+)"? WITH.*/\1/' <<<"$stmt")"
    psql_admin -c "ALTER DATABASE \"$db\" WITH IS_TEMPLATE false" >/dev/null 2>&1 || true
    psql_admin -c "$stmt"
  done
