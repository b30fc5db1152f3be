#!/usr/bin/env bash
# Start RabbitMQ and PostgreSQL by hand (no systemd here) and create the vmcloud database
# (role vmcloud, password vmcloud, on localhost). Idempotent.
set -euo pipefail

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    rabbitmq-server -detached
fi
for _ in $(seq 1 60); do
    rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break
    sleep 1
done
rabbitmq-diagnostics -q ping >/dev/null || { echo 'start-services: RabbitMQ did not start' >&2; exit 1; }

version=$(ls /etc/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main status >/dev/null 2>&1 || pg_ctlcluster "$version" main start
for _ in $(seq 1 60); do
    pg_isready -q && break
    sleep 0.5
done
pg_isready -q || { echo 'start-services: PostgreSQL did not start' >&2; exit 1; }
psql_admin() { su postgres -c "psql -qtAc \"$1\""; }
[ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='vmcloud'")" = 1 ] \
    || psql_admin "CREATE ROLE vmcloud LOGIN PASSWORD 'vmcloud' CREATEDB"
[ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='vmcloud'")" = 1 ] \
    || su postgres -c "createdb -O vmcloud vmcloud"
echo 'start-services: RabbitMQ and PostgreSQL are running'
