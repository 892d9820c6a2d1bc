#!/usr/bin/env bash
# The production path rehearsed on this machine (scripts/rehearse.py says what it does and checks):
# Prefect server + workers, MLflow server, S3 on loopback, a node killed mid-pretraining.
# Run after scripts/setup.sh (which installs Debian's postgresql 15 and psycopg2). Exits non-zero when a
# check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/lib/postgresql/15/bin/initdb ] || { echo "rehearse: PostgreSQL 15 is missing; run scripts/setup.sh (installs Debian's postgresql)" >&2; exit 1; }
./.venv/bin/python -c 'import psycopg2' 2>/dev/null || { echo "rehearse: psycopg2 is missing from .venv; run scripts/setup.sh (uv sync --group server)" >&2; exit 1; }
# moto's S3 server in a venv of its own: installed beside the project's pinned s3fs it can move s3fs.
MOTO_VENV="${NANOCHAT_FLOW_CACHE:-$HOME/.cache/nanochat-flow}/moto-venv"
if [ ! -x "$MOTO_VENV/bin/python" ] || ! "$MOTO_VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
  uv venv -q --python 3.11 "$MOTO_VENV"
  uv pip install -q --python "$MOTO_VENV/bin/python" "moto[server]==5.2.5"
fi
NANOCHAT_MOTO_PYTHON="$MOTO_VENV/bin/python" exec ./.venv/bin/python scripts/rehearse.py "$@"
