#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and exits non-zero
# when any input crashed, aborted or hung a target (saved under fuzz/crashes/<target>/).
#
#   scripts/fuzz.sh [SECONDS] [SEED]
#
# Driver: the seeded mutation driver of gs-fuzz (`cargo run --release -p gs-fuzz --bin
# fuzz`), which works on the stable toolchain. With GS_FUZZ_DRIVER=cargo-fuzz it runs
# libFuzzer through cargo-fuzz instead (needs `cargo install cargo-fuzz`; on a stable
# toolchain RUSTC_BOOTSTRAP=1 stands in for nightly), one target after the other,
# starting from a scratch copy of the committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
SEED=${2:-1}
TARGETS=(client_message pointer decide token)

case "${GS_FUZZ_DRIVER:-mutation}" in
mutation)
  cargo build --release -p gs-fuzz --bin fuzz
  exec "${CARGO_TARGET_DIR:-target}/release/fuzz" --target all --seconds "$SECONDS_EACH" --seed "$SEED"
  ;;
cargo-fuzz)
  failed=0
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  for t in "${TARGETS[@]}"; do
    mkdir -p "$work/$t" "fuzz/crashes/$t"
    # New inputs go to the scratch directory; the committed corpus is read only.
    if ! (cd fuzz/cargo-fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . "$t" -s none \
        "$work/$t" "../corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -seed="$SEED" -rss_limit_mb=4096 -max_len=131072 \
        -artifact_prefix="../crashes/$t/" -print_final_stats=1 2>&1 | tail -25); then
      echo "== $t: FAILED (see fuzz/crashes/$t/)"
      failed=1
    fi
  done
  exit "$failed"
  ;;
*)
  echo "GS_FUZZ_DRIVER must be mutation or cargo-fuzz" >&2
  exit 2
  ;;
esac
