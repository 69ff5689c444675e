#!/usr/bin/env bash
# Runs a local cluster: services, migrations, 3 nodes and 2 routers (by default),
# printing each router's URL, a demo token and a demo session. Ctrl-C stops it.
# Arguments go to `cluster up` (e.g. --nodes 5 --routers 3 --tls).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/cluster" up "$@"
