#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672, guest/guest) and MariaDB/MySQL (127.0.0.1:3306) are
# running, installing them with apt-get on a fresh Debian/Ubuntu machine if they are missing,
# and that root can log in over TCP without a password (what DATABASE_URL's default expects).
# Sourced by scripts/run-daemon and scripts/test; safe to run again.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  log "$2 did not open port $1 within $3 s"
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  command -v apt-get >/dev/null || { log "cannot install $*: no apt-get; install it yourself"; exit 1; }
  log "installing $* with apt-get"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 RabbitMQ 60
}

ensure_mariadb() {
  if ! port_open 3306; then
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
    log "starting MariaDB"
    as_root mkdir -p /run/mysqld
    as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_port 3306 MariaDB 60
  fi
  # Debian's root authenticates by unix socket only; the daemon connects over TCP with no
  # password. Add plain mysql_native_password for root@127.0.0.1 when that is missing.
  if ! mariadb -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1; then
    log "allowing root@127.0.0.1 over TCP without a password (local development only)"
    as_root mariadb -u root -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('');
      GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    log "cargo not found: install Rust 1.94 or newer with rustup (https://rustup.rs), then run this again"
    exit 1
  fi
}

# Python modules the tests run: pika (the README's producer example) and prometheus_client (an
# independent parser of /metrics). pip for the python3 on PATH, else Debian's package.
ensure_py_module() { # module pip-name debian-package
  command -v python3 >/dev/null || apt_install python3
  python3 -c "import $1" 2>/dev/null && return 0
  log "installing $2 (Python) for the tests"
  python3 -m pip install --quiet --disable-pip-version-check "$2" 2>/dev/null || apt_install "$3"
}

# The TLS tests: a TLS terminator in front of RabbitMQ, and openssl to make certificates.
ensure_tls_tools() {
  command -v stunnel4 >/dev/null || apt_install stunnel4
  command -v openssl >/dev/null || apt_install openssl
}

# The host appliance tests: a real NBD server (nbdkit) and client tools (nbdinfo, nbdcopy).
ensure_nbd_tools() {
  command -v nbdkit >/dev/null || apt_install nbdkit
  command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || apt_install libnbd-bin
}

# The retention test runs a daemon whose clock is 100 days ahead (libfaketime).
ensure_faketime() {
  [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -n "$(ls /usr/lib/*/faketime/libfaketime.so.1 2>/dev/null)" ] || apt_install faketime
}

# The deployment test verifies the systemd unit with systemd-analyze.
ensure_systemd_analyze() {
  command -v systemd-analyze >/dev/null || apt_install systemd
}

# The Go client (clients/go) builds offline (scripts/test calls this; the daemon needs no Go) from Debian's packages: the Go toolchain and the
# RabbitMQ team's amqp091-go, which vendor-debian.sh points clients/go/vendor at.
# The alert rules are checked and tested by promtool (Debian's prometheus package has it; the
# server it also installs is not started).
ensure_promtool() {
  command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
}

ensure_go() {
  command -v go >/dev/null || apt_install golang-go
  [ -f /usr/share/gocode/src/github.com/rabbitmq/amqp091-go/go.mod ] || apt_install golang-github-rabbitmq-amqp091-go-dev
  sh clients/go/vendor-debian.sh
}

ensure_rust
ensure_rabbitmq
ensure_mariadb
ensure_tls_tools
ensure_nbd_tools
ensure_faketime
ensure_systemd_analyze
ensure_promtool
ensure_py_module pika pika python3-pika
ensure_py_module prometheus_client prometheus-client python3-prometheus-client
ensure_py_module openapi_spec_validator openapi-spec-validator python3-openapi-spec-validator
# The Python client (clients/python): installed from the checkout with setuptools, its tests
# check commands with jsonschema.
ensure_py_module setuptools setuptools python3-setuptools
ensure_py_module wheel wheel python3-wheel
ensure_py_module jsonschema jsonschema python3-jsonschema
# The OTLP receiver of the trace tests decodes with the official protobuf definitions.
ensure_py_module opentelemetry.proto opentelemetry-proto python3-opentelemetry-proto
ensure_py_module yaml pyyaml python3-yaml
log "RabbitMQ and MariaDB are up"
