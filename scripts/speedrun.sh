#!/usr/bin/env bash
# Set up, then run the main job: the tiny preset on this machine's CPU with embedded defaults.
# Extra arguments go to `nanochat` (e.g. `--preset d4-cpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
./.venv/bin/nanochat speedrun --preset tiny "$@"
