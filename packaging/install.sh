#!/usr/bin/env bash
# Installs the imprint binary into ~/.local/bin and sets the daemon to start
# at login (systemd user unit on Linux, launchd agent on macOS).
#
#   packaging/install.sh [--http 127.0.0.1:8741]
#
# Run it from a checkout after `make build` (or `cargo build --release`).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$here/target}"
bin="$target/release/imprint"
if [ ! -x "$bin" ]; then
  echo "install.sh: $bin is missing; build first with: make build" >&2
  exit 1
fi
dest="${IMPRINT_BIN_DIR:-$HOME/.local/bin}"
mkdir -p "$dest"
install -m 0755 "$bin" "$dest/imprint"
echo "Installed $dest/imprint"
case ":$PATH:" in
  *":$dest:"*) ;;
  *) echo "Note: $dest is not on your PATH; add it to your shell profile." ;;
esac
"$dest/imprint" daemon install "$@"
