#!/usr/bin/env bash
# Sets up the venv and runs the main job. Extra arguments go to the script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/_env.sh
venv="$(ensure_venv | tail -n 1)"
exec "$venv/bin/python" experiments/finetune.py "$@"
