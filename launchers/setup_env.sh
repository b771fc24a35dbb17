# Sourced by the launchers and tests/run.sh: uses the active Python environment if there is one, else creates
# ./.venv, then installs requirements.txt and the project (editable) when they changed since the last install.
# On a CPU-only machine the pinned torch==2.13.0 resolves to the CPU wheel.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    if [ ! -x "$_repo/.venv/bin/python" ]; then
        echo "[setup] creating $_repo/.venv"
        python3 -m venv "$_repo/.venv"
    fi
    # shellcheck disable=SC1091
    source "$_repo/.venv/bin/activate"
fi
_stamp="$(python -c 'import sys; print(sys.prefix)')/.ett_ds_installed"
_want="$(cat "$_repo/requirements.txt" "$_repo/pyproject.toml" | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing requirements (pip)"
    python -m pip install -q --disable-pip-version-check -r "$_repo/requirements.txt"
    python -m pip install -q --disable-pip-version-check --no-deps -e "$_repo"
    echo "$_want" > "$_stamp"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_repo/.cache/torch_extensions}"
unset _repo _stamp _want
