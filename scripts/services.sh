#!/usr/bin/env bash
# Makes PostgreSQL, Redis, RabbitMQ and NATS reachable at the configured addresses.
#
# For each service: if it already answers, nothing is done; if it is installed but
# stopped, it is started; if it is missing, it is installed with apt (Debian/Ubuntu)
# and started. Idempotent; prints what it did; exits non-zero with a clear message
# when a service cannot be brought up.
#
# Ports follow the project's configuration variables (defaults in brackets):
#   GS_POSTGRES__PORT [5432]  GS_REDIS__PORT [6379]  GS_RABBITMQ__PORT [5672]  GS_NATS__PORT [4222]
# Services are expected on 127.0.0.1.
set -uo pipefail

PG_PORT=${GS_POSTGRES__PORT:-5432}
REDIS_PORT=${GS_REDIS__PORT:-6379}
RABBIT_PORT=${GS_RABBITMQ__PORT:-5672}
NATS_PORT=${GS_NATS__PORT:-4222}
WAIT_SECS=${GS_SERVICES_WAIT_SECS:-90}

say() { printf 'services: %s\n' "$*"; }
fail() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=""; fi

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # port name
  local i
  for ((i = 0; i < WAIT_SECS * 5; i++)); do
    answers "$1" && return 0
    sleep 0.2
  done
  return 1
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || fail "$* missing and apt-get is not available; install it by hand"
  if [ "$APT_UPDATED" -eq 0 ]; then
    say "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update failed"
    APT_UPDATED=1
  fi
  say "installing $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || fail "apt-get install $* failed"
}

# --- PostgreSQL -------------------------------------------------------------------
postgres() {
  if answers "$PG_PORT"; then say "PostgreSQL answers on $PG_PORT"; return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then apt_install postgresql postgresql-client; fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || fail "PostgreSQL is installed but has no cluster in /etc/postgresql"
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  # Development and CI machines connect over loopback without a password (the
  # project's default configuration); allow that once, on a fresh install.
  if [ -f "$hba" ] && ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    say "allowing trusted loopback connections in $hba (development machine)"
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  say "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
    || $SUDO pg_ctlcluster "$version" main start || true
  wait_for "$PG_PORT" || fail "PostgreSQL did not come up on $PG_PORT"
  say "PostgreSQL answers on $PG_PORT"
}

# --- Redis ------------------------------------------------------------------------
redis() {
  if answers "$REDIS_PORT"; then say "Redis answers on $REDIS_PORT"; return; fi
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  say "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/gs.log >/dev/null \
    || fail "redis-server did not start"
  wait_for "$REDIS_PORT" || fail "Redis did not come up on $REDIS_PORT"
  say "Redis answers on $REDIS_PORT"
}

# --- RabbitMQ ---------------------------------------------------------------------
rabbitmq() {
  if answers "$RABBIT_PORT"; then say "RabbitMQ answers on $RABBIT_PORT"; return; fi
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  say "starting RabbitMQ (this takes a few seconds)"
  $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for "$RABBIT_PORT" || fail "RabbitMQ did not come up on $RABBIT_PORT"
  say "RabbitMQ answers on $RABBIT_PORT"
}

# --- NATS -------------------------------------------------------------------------
nats() {
  if answers "$NATS_PORT"; then say "NATS answers on $NATS_PORT"; return; fi
  command -v nats-server >/dev/null 2>&1 || apt_install nats-server
  local bin
  bin=$(command -v nats-server)
  say "starting NATS"
  $SUDO mkdir -p /var/lib/nats-server
  if command -v start-stop-daemon >/dev/null 2>&1; then
    # The pidfile names *this* server: without it start-stop-daemon takes any running
    # nats-server (a test's private instance on another port) for it and starts none.
    $SUDO start-stop-daemon --start --oknodo --background \
      --pidfile /run/gs-nats-server.pid --make-pidfile --exec "$bin" -- \
      -a 127.0.0.1 -p "$NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  else
    nohup "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd /var/lib/nats-server >/tmp/nats-server.log 2>&1 &
  fi
  wait_for "$NATS_PORT" || fail "NATS did not come up on $NATS_PORT"
  say "NATS answers on $NATS_PORT"
}

# Says so when PostgreSQL runs without autovacuum: the service's steady-state cost does
# not depend on it (no per-event updates), but the event log's indexes and the
# statistics the planner uses still do, and a long benchmark slows down without it.
autovacuum_check() {
  command -v psql >/dev/null 2>&1 || return 0
  local av
  av=$(psql -h 127.0.0.1 -p "$PG_PORT" -U "${GS_POSTGRES__USER:-postgres}" -d postgres -tAc 'SHOW autovacuum' 2>/dev/null) || return 0
  if [ "$av" = "off" ]; then
    say "WARNING: PostgreSQL runs with autovacuum = off; nothing reclaims dead tuples or"
    say "         refreshes statistics. Turn it on for long runs (ALTER SYSTEM SET autovacuum = on;"
    say "         SELECT pg_reload_conf();) or VACUUM ANALYZE between benchmarks."
  fi
}

postgres
autovacuum_check
redis
rabbitmq
nats
# Tests that stop a dependency run private redis-server / nats-server instances.
command -v redis-server >/dev/null 2>&1 || apt_install redis-server
command -v nats-server >/dev/null 2>&1 || apt_install nats-server
# The browser client's unit tests run under Node's test runner; the play page's test
# (tests/tests/browser.rs) drives headless Chromium.
command -v node >/dev/null 2>&1 || apt_install nodejs
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
  && [ -z "${GS_CHROMIUM:-}" ]; then
  apt_install chromium
fi
say "all services are up"
