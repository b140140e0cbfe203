#!/usr/bin/env bash
# The whole test suite: `make test` runs this. It builds, makes sure the
# default model is present (a no-op when it is), and runs every test against
# the real model. It fails if any test fails or if no test ran at all.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/imprint/target}"
bin="$CARGO_TARGET_DIR/debug/imprint"

cargo build --bin imprint
"$bin" model pull
IMPRINT_TEST_MODEL="$("$bin" model path)"
export IMPRINT_TEST_MODEL
echo "testing against $IMPRINT_TEST_MODEL"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

passed=$(grep -Eo '^test result: [a-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "$passed" -eq 0 ]; then echo "no test ran: treating that as a failure" >&2; exit 1; fi
