#!/usr/bin/env bash
# A local PostgreSQL for the tests that run a real mlflow tracking server on it (tests/servers.py): Debian's
# postgresql, its default cluster started, a user and a database the tests know (DENSECL_TEST_POSTGRES_URI's
# default). Idempotent; prints the server's version when it answers.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v pg_ctlcluster >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
as_root pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  as_root su postgres -c "pg_isready -q" && break
  sleep 1
done
psql_as_postgres() { as_root su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
if [ -z "$(psql_as_postgres "SELECT 1 FROM pg_roles WHERE rolname = 'densecl'")" ]; then
  psql_as_postgres "CREATE USER densecl WITH PASSWORD 'densecl' CREATEDB"
fi
if [ -z "$(psql_as_postgres "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" ]; then
  psql_as_postgres "CREATE DATABASE mlflow OWNER densecl"
fi
echo "[ci] $(psql_as_postgres 'SELECT version()' | cut -d, -f1) on 127.0.0.1:5432, database mlflow"
