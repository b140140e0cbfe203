#!/usr/bin/env bash
# Installs what building imprint needs and is missing: cmake, a C/C++
# compiler, libclang (bindgen reads llama.cpp's headers with it), pkg-config,
# OpenSSL's libcrypto headers (SQLCipher encrypts the profile with it on
# Linux; macOS uses CommonCrypto), and Python's pip (the default model is
# fetched with it). `--test` adds what the test suite needs: a D-Bus session
# bus and gnome-keyring (a real Secret Service for the keyring tests), and
# the toolchain's clippy and rustfmt components when rustup manages it (the
# suite lints). Works as root or, with sudo, as a user.
# Otherwise it never touches the Rust toolchain beyond checking that cargo
# exists.
set -euo pipefail

need_cmd() { command -v "$1" >/dev/null 2>&1; }

if ! need_cmd cargo; then
  cat >&2 <<'MSG'
imprint needs a Rust toolchain (cargo), and none was found.
Install it from https://rustup.rs (one command), open a new shell, and run this again.
MSG
  exit 1
fi

packages=(cmake clang libclang-dev pkg-config libssl-dev python3-pip)
if [ "${1:-}" = "--test" ]; then
  # The suite also lints (rustfmt, clippy); rustup's minimal profile leaves
  # both out.
  if need_cmd rustup && ! { cargo clippy --version && cargo fmt --version; } >/dev/null 2>&1; then
    rustup component add clippy rustfmt
  fi
  # The keyring's Secret Service for the profile tests, curl for the HTTP
  # endpoint tests, tmux for the full-screen chat test.
  packages+=(dbus gnome-keyring curl tmux)
fi

missing=()
case "$(uname -s)" in
  Linux)
    if need_cmd dpkg-query; then
      for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
      done
      # A pip from pyenv or a venv serves as well as Debian's python3-pip.
      if python3 -m pip --version >/dev/null 2>&1; then
        missing=("${missing[@]/python3-pip}")
      fi
      read -r -a missing <<<"${missing[*]:-}"
      if ((${#missing[@]})); then
        echo "Installing: ${missing[*]}"
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then
          need_cmd sudo || { echo "Please install as root: apt-get install ${missing[*]}" >&2; exit 1; }
          SUDO="sudo"
        fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
      fi
    else
      for c in cmake clang python3; do need_cmd "$c" || missing+=("$c"); done
      if ((${#missing[@]})); then
        echo "Please install with your package manager: ${missing[*]} (plus libclang and pkg-config)" >&2
        exit 1
      fi
    fi
    ;;
  Darwin)
    need_cmd clang || { echo "Install the Xcode command line tools: xcode-select --install" >&2; exit 1; }
    for c in cmake; do need_cmd "$c" || missing+=("$c"); done
    if ((${#missing[@]})); then
      need_cmd brew || { echo "Install Homebrew (https://brew.sh) or these tools yourself: ${missing[*]}" >&2; exit 1; }
      brew install "${missing[@]}"
    fi
    ;;
  *)
    echo "Unsupported system $(uname -s); install cmake, clang/libclang and python3 with pip yourself." >&2
    ;;
esac
