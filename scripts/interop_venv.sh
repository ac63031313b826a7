#!/usr/bin/env bash
# Creates (once) the Python 3.11 virtual environment in which the interop tests run the real
# PyTorch peers (bitsandbytes, later transformers/peft). The library itself never imports torch;
# only tests/interop/*.py scripts run in this venv, exchanging data through files.
#
# Usage: bash scripts/interop_venv.sh
#   QLORA_INTEROP_VENV  where the venv lives (default: .venv-interop in the repo root; a relative
#                       path is taken relative to the repo root).
# Idempotent: a stamp file records the package list; when it matches, the script only checks
# that the venv's python runs (a few seconds). All progress goes to stderr; the LAST line of
# stdout is the venv's python executable.
set -euo pipefail

# Pinned exactly: `torch==2.13.0` resolves to the local CPU wheel for Python 3.11; an unpinned
# torch would pull a multi-GB CUDA build. Add new peers here (one list, one stamp).
INTEROP_PACKAGES="torch==2.13.0 bitsandbytes==0.50.2 safetensors numpy transformers==5.23.0 peft==0.21.2 accelerate==1.15.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QLORA_INTEROP_VENV:-.venv-interop}"
case "$venv" in
  /*) ;;
  *) venv="$repo_root/$venv" ;;
esac
stamp="$venv/.qlora-interop-stamp"
venv_python="$venv/bin/python"

log() { echo "interop_venv: $*" >&2; }

# Finds a working Python 3.11 interpreter and prints its real path. `python3.11` on PATH may be a
# pyenv shim that fails when no 3.11 is selected, so each candidate is run, not just located
# (and must have venv + ensurepip: Debian splits them into python3.11-venv).
find_python311() {
  local candidates=() c real
  candidates+=("python3.11")
  for c in /root/.pyenv/versions/3.11*/bin/python3.11; do candidates+=("$c"); done
  if command -v pyenv >/dev/null 2>&1; then
    local root
    root="$(pyenv root 2>/dev/null || true)"
    if [ -n "$root" ]; then
      for c in "$root"/versions/3.11*/bin/python3.11; do candidates+=("$c"); done
    fi
  fi
  candidates+=("/usr/bin/python3.11" "/usr/local/bin/python3.11")
  for c in "${candidates[@]}"; do
    if "$c" --version >/dev/null 2>&1; then
      real="$("$c" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11); print(sys.executable)' 2>/dev/null)" \
        || continue
      if [ -n "$real" ]; then
        echo "$real"
        return 0
      fi
    fi
  done
  return 1
}

stamp_text() {
  printf 'packages: %s\n' "$INTEROP_PACKAGES"
}

# Serialise concurrent callers (two pytest workers at once) on one lock per venv path, kept out
# of the work tree.
mkdir -p "$(dirname "$venv")"
exec 9>"${TMPDIR:-/tmp}/qlora-interop-$(printf '%s' "$venv" | cksum | cut -d' ' -f1).lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(stamp_text)" ] && "$venv_python" -c 'import sys' >/dev/null 2>&1; then
  log "up to date: $venv"
  echo "$venv_python"
  exit 0
fi

if ! "$venv_python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then
  if ! py311="$(find_python311)"; then
    echo "interop_venv: no working Python 3.11 found (tried python3.11 on PATH," \
      "/root/.pyenv/versions/3.11*/bin/python3.11, \$(pyenv root)/versions/3.11*," \
      "/usr/bin/python3.11); install one (e.g. 'pyenv install 3.11' or apt's python3.11-venv)" >&2
    exit 1
  fi
  log "creating $venv with $py311"
  rm -f "$stamp"
  "$py311" -m venv --clear "$venv" >&2
fi

log "installing: $INTEROP_PACKAGES"
# shellcheck disable=SC2086  # the package list is meant to split into words
"$venv_python" -m pip install --quiet $INTEROP_PACKAGES >&2
"$venv_python" -c 'import torch, bitsandbytes, safetensors, numpy' >&2
stamp_text >"$stamp"
log "ready: $venv"
echo "$venv_python"
