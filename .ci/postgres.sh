#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on loopback for the parallel-search-workers test, and print the
# Optuna storage URL to export as TORCHPOCKET_TEST_POSTGRES. Debian's `postgresql` package is installed
# when missing (root + apt). Prints nothing and exits 0 when no server can be started: the test then skips.
#   eval "$(.ci/postgres.sh)"    # sets TORCHPOCKET_TEST_POSTGRES
set -uo pipefail
PORT=${PGPORT_TEST:-54329}
DIR=${PGDATA_TEST:-/tmp/torchpocket-pg}

find_bin() {
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  command -v "$1" || true
}

if [ -z "$(find_bin initdb)" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q postgresql || (apt-get update -q && apt-get install -y -q postgresql)) >/dev/null 2>&1
fi
INITDB=$(find_bin initdb); PG_CTL=$(find_bin pg_ctl)
if [ -z "$INITDB" ] || [ -z "$PG_CTL" ]; then
  echo "postgres: no server binaries; the PostgreSQL case of the workers test will skip" >&2
  exit 0
fi
AS=()  # PostgreSQL refuses to run as root: use the package's postgres user
if [ "$(id -u)" = 0 ]; then
  if id postgres >/dev/null 2>&1; then AS=(runuser -u postgres --); else
    echo "postgres: running as root without a postgres user; skipping" >&2; exit 0; fi
fi
mkdir -p "$DIR" && { [ "$(id -u)" != 0 ] || chown postgres "$DIR"; }
if [ ! -f "$DIR/PG_VERSION" ]; then
  "${AS[@]}" "$INITDB" -D "$DIR" -A trust -U postgres >/dev/null 2>&1 || { echo "postgres: initdb failed" >&2; exit 0; }
fi
if ! "${AS[@]}" "$PG_CTL" -D "$DIR" status >/dev/null 2>&1; then
  "${AS[@]}" "$PG_CTL" -D "$DIR" -l "$DIR/server.log" -w -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" start \
    >/dev/null 2>&1 || { echo "postgres: server did not start (see $DIR/server.log)" >&2; exit 0; }
fi
echo "export TORCHPOCKET_TEST_POSTGRES=postgresql://postgres@127.0.0.1:$PORT/postgres"
