#!/usr/bin/env bash
# The servers the test suite talks to: PostgreSQL (5432), Redis (6379) and RabbitMQ (5672),
# on loopback. For each one: if something already answers on its port, it is left alone (a
# laptop's own PostgreSQL keeps working unchanged); otherwise it is installed from Debian's
# packages when its program is missing (root only) and started with data of its own under
# $MOE_SERVICES_DIR. Run it as often as you like: a second run finds everything answering.
#
#   bash scripts/services.sh          # start what is missing (the default)
#   bash scripts/services.sh status   # which ports answer
#   bash scripts/services.sh stop     # stop only the servers this script started
#
# The servers it starts are test servers: they listen on 127.0.0.1 only, PostgreSQL trusts
# loopback connections as `postgres` (the suite's default TEST_POSTGRES_URL has no password)
# and RabbitMQ keeps its guest user, which it accepts from loopback only. Never point
# anything that holds real data at them. What cannot be had here (no root to install, no
# package) is one line, and the tests that need it skip with their reason.
set -uo pipefail
umask 077  # data and logs of these servers are nobody else's to read

if [ "$(id -u)" = 0 ]; then
  default_dir=/var/lib/moe-pipeline-services
else
  default_dir="${XDG_CACHE_HOME:-$HOME/.cache}/moe-pipeline-services"
fi
DIR="${MOE_SERVICES_DIR:-$default_dir}"
PG_PORT=5432
REDIS_PORT=6379
AMQP_PORT=5672

say() { echo "services: $*"; }

answers() {  # is something accepting TCP connections on 127.0.0.1:$1?
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for() {  # port, seconds, name
  local i
  for ((i = 0; i < $2 * 4; i++)); do
    answers "$1" && return 0
    sleep 0.25
  done
  say "$3 did not answer on 127.0.0.1:$1 within $2 s (log: $DIR/$3.log)"
  return 1
}

apt_updated=0
install() {  # debian packages...: install what is missing, once per run of this script
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "cannot install $* (needs root and apt-get); the tests that need it will skip"
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = 0 ]; then
    apt-get update -q >/dev/null 2>&1 || true
    apt_updated=1
  fi
  # No Recommends: rabbitmq-server and postgresql pull in nothing the tests use.
  if ! apt-get install -y -q --no-install-recommends "$@" >"$DIR/apt.log" 2>&1; then
    say "apt-get install $* failed (see $DIR/apt.log); the tests that need it will skip"
    return 1
  fi
}

as_owner() {  # run a command as the user that owns the server's data (postgres refuses root)
  local user=$1
  shift
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

pg_bin() {  # the bin directory of the PostgreSQL our data was made with, else the newest
  local d=""
  if [ -s "$DIR/postgres/PG_VERSION" ]; then
    d="/usr/lib/postgresql/$(cat "$DIR/postgres/PG_VERSION")/bin"
  fi
  [ -n "$d" ] && [ -x "$d/postgres" ] || d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

start_postgres() {
  if answers $PG_PORT; then say "PostgreSQL: something answers on $PG_PORT, left alone"; return 0; fi
  local bin
  bin=$(pg_bin) || { install postgresql && bin=$(pg_bin); } || return 1
  if answers $PG_PORT; then say "PostgreSQL: the package started its own on $PG_PORT, left alone"; return 0; fi
  local data="$DIR/postgres" owner
  owner=$(id -un)
  [ "$(id -u)" = 0 ] && owner=postgres
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data" && chown "$owner" "$data" && chmod 700 "$data"
    as_owner "$owner" "$bin/initdb" -D "$data" -U postgres --auth-local=trust \
      --auth-host=trust -E UTF8 >"$DIR/postgres-init.log" 2>&1 \
      || { say "PostgreSQL: initdb failed (see $DIR/postgres-init.log)"; return 1; }
  fi
  touch "$DIR/postgres.log" && chown "$owner" "$DIR/postgres.log"
  # The socket goes in the data dir: /run/postgresql may not exist or be writable.
  as_owner "$owner" "$bin/pg_ctl" -D "$data" -l "$DIR/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $data -c fsync=off" start >/dev/null \
    || { say "PostgreSQL failed to start (see $DIR/postgres.log)"; return 1; }
  wait_for $PG_PORT 30 postgres && say "PostgreSQL started on 127.0.0.1:$PG_PORT ($data)"
}

start_redis() {
  if answers $REDIS_PORT; then say "Redis: something answers on $REDIS_PORT, left alone"; return 0; fi
  command -v redis-server >/dev/null || install redis-server || return 1
  if answers $REDIS_PORT; then say "Redis: the package started its own on $REDIS_PORT, left alone"; return 0; fi
  mkdir -p "$DIR/redis"
  local owner
  owner=$(id -un)
  # As root, the package's unprivileged redis user runs it (a root Redis with no password
  # could be told to write files anywhere).
  if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then owner=redis; fi
  touch "$DIR/redis.log" && chown "$owner" "$DIR/redis" "$DIR/redis.log"
  # No persistence: a test server whose data is made and removed by the tests themselves.
  as_owner "$owner" redis-server --bind 127.0.0.1 --port $REDIS_PORT --daemonize yes \
    --dir "$DIR/redis" --pidfile "$DIR/redis/redis.pid" --logfile "$DIR/redis.log" \
    --save "" --appendonly no \
    || { say "Redis failed to start (see $DIR/redis.log)"; return 1; }
  touch "$DIR/redis.started"
  wait_for $REDIS_PORT 20 redis && say "Redis started on 127.0.0.1:$REDIS_PORT"
}

start_rabbitmq() {
  if answers $AMQP_PORT; then say "RabbitMQ: something answers on $AMQP_PORT, left alone"; return 0; fi
  if [ "$(id -u)" != 0 ]; then
    # Debian's rabbitmq-server runs only as root or rabbitmq (it switches to rabbitmq itself).
    say "RabbitMQ: nothing on $AMQP_PORT; start it as root (or your service manager)"
    return 1
  fi
  command -v rabbitmq-server >/dev/null || install rabbitmq-server || return 1
  if answers $AMQP_PORT; then say "RabbitMQ: the package started its own on $AMQP_PORT, left alone"; return 0; fi
  if rabbitmqctl -q status >/dev/null 2>&1; then
    # A node runs, but not on 127.0.0.1:5672: someone else's, not ours to start or stop.
    say "RabbitMQ: a node runs here but does not answer on 127.0.0.1:$AMQP_PORT; left alone"
    return 1
  fi
  # The package's node and files (/var/lib/rabbitmq), with its listeners and the Erlang port
  # mapper on loopback; rabbitmqctl reaches it with no settings of its own.
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT ERL_EPMD_ADDRESS=127.0.0.1 \
    rabbitmq-server -detached >"$DIR/rabbitmq.log" 2>&1 \
    || { say "RabbitMQ failed to start (see $DIR/rabbitmq.log)"; return 1; }
  wait_for $AMQP_PORT 90 rabbitmq || return 1
  touch "$DIR/rabbitmq.started"  # only now: `stop` stops only a node this script started
  say "RabbitMQ started on 127.0.0.1:$AMQP_PORT"
}

browser() {  # not a server: the headless browser the page's test drives (Debian's chromium)
  if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then return 0; fi
  install chromium && say "chromium installed (the web page's browser test)"
}

stop_all() {
  local bin
  if [ -s "$DIR/postgres/postmaster.pid" ] && bin=$(pg_bin); then
    as_owner "$(stat -c %U "$DIR/postgres")" "$bin/pg_ctl" -D "$DIR/postgres" -m fast stop \
      >/dev/null && say "PostgreSQL stopped"
  fi
  if [ -e "$DIR/redis.started" ]; then
    # By its port, not a pid file that may name another process after a reboot.
    redis-cli -h 127.0.0.1 -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 && say "Redis stopped"
    rm -f "$DIR/redis.started"
  fi
  if [ -e "$DIR/rabbitmq.started" ]; then
    rabbitmqctl stop >/dev/null 2>&1 && say "RabbitMQ stopped"
    rm -f "$DIR/rabbitmq.started"
  fi
}

status_all() {
  local name port
  for name in postgres:$PG_PORT redis:$REDIS_PORT rabbitmq:$AMQP_PORT; do
    port=${name#*:}
    if answers "$port"; then say "${name%%:*} answers on 127.0.0.1:$port"; else
      say "${name%%:*}: nothing on 127.0.0.1:$port"; fi
  done
}

# Others may pass through (the servers' own users reach their folders below) but not list it.
mkdir -p "$DIR" && chmod 711 "$DIR"
case "${1:-start}" in
  start)
    # Each server on its own: one that cannot be had costs only the tests that need it.
    start_postgres || true
    start_redis || true
    start_rabbitmq || true
    browser || true
    ;;
  stop) stop_all ;;
  status) status_all ;;
  *) echo "usage: bash scripts/services.sh [start|status|stop]" >&2; exit 2 ;;
esac
exit 0
