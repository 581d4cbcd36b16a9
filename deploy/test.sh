#!/usr/bin/env bash
# Runs comodit's whole test suite on a Debian/Ubuntu machine: installs and starts what the tests need
# (Rust toolchain check, RabbitMQ with the management plugin, PostgreSQL), builds, then runs every test.
# Usage: deploy/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/common.sh

ensure_rust
ensure_free_disk . 6
ensure_rabbitmq
ensure_postgres
# Tools the real-OS provider tests drive (present on most Debian installs, listed for minimal ones).
apt_install passwd dpkg apt

export COMODIT_TEST_AMQP_URL="${COMODIT_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export COMODIT_TEST_MGMT_URL="${COMODIT_TEST_MGMT_URL:-http://127.0.0.1:15672}"
# The PostgreSQL store tests create and drop their own databases through this role.
export COMODIT_TEST_PG_URL="${COMODIT_TEST_PG_URL:-postgres://comodit:comodit@127.0.0.1:5432/postgres}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

log "building"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
log "running the tests"
# Test binaries run one after another (cargo's default); tests that restart the broker live in their
# own binaries and serialize among themselves.
set +e
cargo test --workspace --locked "$@" 2>&1 | tee /tmp/comodit-test.log | grep -vE '^test .* \.\.\. ok$'
status=${PIPESTATUS[0]}
set -e
passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' /tmp/comodit-test.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' /tmp/comodit-test.log | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
