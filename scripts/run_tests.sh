#!/usr/bin/env bash
# Sets up everything (the Python 3.12 venv, and the Python 3.11 interop venv with torch CPU +
# bitsandbytes on first use) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/_env.sh
venv="$(ensure_venv | tail -n 1)"
export QLORA_INTEROP_VENV="${QLORA_INTEROP_VENV:-$root/.venv-interop}"
bash scripts/interop_venv.sh >/dev/null
# Two worker processes for the two cores; GPU-only tests deselect themselves on a CPU machine.
exec "$venv/bin/python" -m pytest -n "${QLORA_TEST_WORKERS:-2}" -q "$@"
