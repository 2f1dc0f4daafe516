#!/bin/sh
# Points vendor/ at the Debian package golang-github-rabbitmq-amqp091-go-dev, so that this module
# builds and tests with no network access (the go command uses vendor/ when it exists). A project
# that consumes the module does not need this: its go command fetches amqp091-go v1.5.0 (or newer)
# as usual. Safe to run again.
set -eu
cd "$(dirname "$0")"
src=/usr/share/gocode/src/github.com/rabbitmq/amqp091-go
if [ ! -f "$src/go.mod" ]; then
  echo "vendor-debian.sh: $src is missing: apt-get install golang-github-rabbitmq-amqp091-go-dev" >&2
  exit 1
fi
version=$(dpkg-query -W -f '${Version}' golang-github-rabbitmq-amqp091-go-dev 2>/dev/null | sed 's/-[^-]*$//')
if [ "$version" != "1.5.0" ]; then
  echo "vendor-debian.sh: go.mod requires amqp091-go v1.5.0, Debian has ${version:-none}; update go.mod" >&2
  exit 1
fi
mkdir -p vendor/github.com/rabbitmq
ln -sfn "$src" vendor/github.com/rabbitmq/amqp091-go
printf '%s\n' '# github.com/rabbitmq/amqp091-go v1.5.0' '## explicit; go 1.16' 'github.com/rabbitmq/amqp091-go' > vendor/modules.txt
