#!/usr/bin/env bash
# A throwaway PostgreSQL server on a loopback port, for the tests (.ci/run) and the benchmarks.
#   .ci/postgres.sh start DIR   installs the server (Debian packages) when missing, creates a
#                               cluster in DIR, starts it and prints its URL (also in DIR/url)
#   .ci/postgres.sh stop DIR    stops it and removes DIR
# The URL carries a random password (scram-sha-256 over TCP), so tests can check that no output
# leaks it. As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail

command=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}

as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

server_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

case "$command" in
start)
  if [ -z "$(server_bin)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
  fi
  bin=$(server_bin)
  mkdir -p "$dir"
  password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf '%s\n' "$password" >"$dir/pwfile"
  if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres "$dir"
  fi
  chmod 700 "$dir"
  as_server_user "$bin/initdb" -D "$dir/data" -U rankfold --pwfile="$dir/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1
  rm -f "$dir/pwfile"
  as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" >/dev/null
  as_server_user "$bin/createdb" -h "$dir" -p "$port" -U rankfold rankfold
  url="postgresql://rankfold:$password@127.0.0.1:$port/rankfold"
  printf '%s\n' "$url" >"$dir/url"
  printf '%s\n' "$url"
  ;;
stop)
  bin=$(server_bin)
  if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: postgres.sh start|stop DIR" >&2
  exit 2
  ;;
esac
