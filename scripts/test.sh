#!/usr/bin/env bash
# Runs every check CI runs: services up, migrations, formatting, lints, all tests
# (unit, integration and chaos tests against the real services and binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

scripts/services.sh

echo "== build (the integration tests run the real gs-node and gs-router binaries)"
cargo build --workspace --bins

echo "== migrations"
"${CARGO_TARGET_DIR:-target}/debug/cluster" migrate

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== browser client unit tests (node --test web/test/)"
node --test web/test/

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci "$@"
else
  cargo test --workspace -- "$@"
fi
