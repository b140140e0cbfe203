#!/usr/bin/env bash
# The whole test suite: `make test` runs this. It builds, makes sure the
# default model is present (a no-op when it is), and runs every test against
# the real model. It fails if any test fails or if no test ran at all.
set -euo pipefail
cd "$(dirname "$0")/.."

# The profile tests need a real Secret Service keyring. On Linux the suite
# runs inside a private D-Bus session with its own gnome-keyring, unlocked
# with a throwaway password and keeping its files in a temporary folder, so
# the user's real keyring is never touched. (macOS uses the login Keychain.)
if [ "$(uname -s)" = Linux ] && [ -z "${IMPRINT_IN_TEST_SESSION:-}" ]; then
  if command -v dbus-run-session >/dev/null && command -v gnome-keyring-daemon >/dev/null; then
    export IMPRINT_IN_TEST_SESSION=1
    exec dbus-run-session -- bash "$0" "$@"
  fi
  echo "warning: dbus-run-session or gnome-keyring-daemon is missing (make test installs them); keyring tests will fail" >&2
fi
if [ -n "${IMPRINT_IN_TEST_SESSION:-}" ]; then
  keyring_home="$(mktemp -d)"
  # Only the keyring daemon sees the temporary XDG_DATA_HOME: imprint itself
  # must keep finding the real model in the usual data folder.
  printf 'imprint-test' | XDG_DATA_HOME="$keyring_home" gnome-keyring-daemon --unlock --components=secrets >/dev/null
  for _ in $(seq 50); do
    dbus-send --session --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.NameHasOwner \
      string:org.freedesktop.secrets 2>/dev/null | grep -q true && break
    sleep 0.1
  done
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/imprint/target}"
bin="$CARGO_TARGET_DIR/debug/imprint"

cargo build --bin imprint
"$bin" model pull
IMPRINT_TEST_MODEL="$("$bin" model path)"
export IMPRINT_TEST_MODEL
echo "testing against $IMPRINT_TEST_MODEL"

# The official `openai` Python client talks to the daemon's HTTP endpoint in
# the tests; it lives in a venv of its own, made once.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/imprint/pyenv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  (python3 -m venv "$venv" && "$venv/bin/pip" install -q openai) \
    || echo "warning: could not install the openai Python package; the daemon test will say it skipped that client" >&2
fi
if [ -x "$venv/bin/python" ]; then export IMPRINT_TEST_PYTHON="$venv/bin/python"; fi

log="$(mktemp)"
trap 'rm -f "$log"; [ -n "${keyring_home:-}" ] && rm -rf "$keyring_home"' EXIT
set +e
cargo test --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Lint after the tests, so a style slip never hides a test result; either
# failing fails the suite.
lint=0
if cargo clippy --version >/dev/null 2>&1 && cargo fmt --version >/dev/null 2>&1; then
  echo "lint: cargo fmt --check, cargo clippy --all-targets -- -D warnings"
  cargo fmt --check || lint=1
  cargo clippy --all-targets -- -D warnings || lint=1
else
  echo "warning: lint skipped: clippy or rustfmt is not installed (rustup component add clippy rustfmt)" >&2
fi

passed=$(grep -Eo '^test result: [a-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "$lint" -ne 0 ]; then echo "lint failed (see above): run 'make fmt' and fix what clippy names" >&2; exit 1; fi
if [ "$passed" -eq 0 ]; then echo "no test ran: treating that as a failure" >&2; exit 1; fi
