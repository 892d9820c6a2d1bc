#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, idempotently:
#   Debian packages (when missing), uv, the virtual environment at ./.venv from uv.lock,
#   and the Rust extension tokenizer_rs (built by maturin through uv).
# Package downloads are cached outside the repo (~/.cache/uv, ~/.cache/pip, ~/.cargo), so a second
# run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
# Debian packages the pipeline and its tests call at run time.
# chromium: the headless browser the chat page's test drives through playwright (its own download can't work offline).
# postgresql: the database of the rehearsal's Prefect and MLflow servers (scripts/rehearse.py), as a team's.
DEBIAN_PACKAGES=(ca-certificates chromium postgresql)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo (Rust) is required to build tokenizer_rs; install rustup's stable toolchain" >&2; exit 1; }

if ! command -v uv >/dev/null || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "setup: installing uv $UV_VERSION"
  python3 -m pip install -q "uv==$UV_VERSION" 2>/dev/null || python3 -m pip install -q --user "uv==$UV_VERSION"
  export PATH="$HOME/.local/bin:$PATH"
fi

# --frozen: install exactly what uv.lock pins, never re-resolve on a user's machine. The `server` group
# (psycopg2 for MLflow on PostgreSQL; the worker image installs it too) serves the rehearsal's servers.
uv sync --frozen --group server --python 3.11
echo "setup: ready — $(./.venv/bin/python -c 'import tokenizer_rs, torch; print(f"tokenizer_rs {tokenizer_rs.version()}, torch {torch.__version__}")')"
