#!/usr/bin/env bash
# Sets up the project (a .venv unless an environment is already active) and runs the test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launchers/setup_env.sh
source launchers/setup_env.sh
# test-only packages (requirements-test.txt), with requirements.txt in the same resolve so its torch pin holds
_tstamp="$(python -c 'import sys; print(sys.prefix)')/.ett_ds_test_installed"
_twant="$(cat requirements.txt requirements-test.txt | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$_tstamp" 2>/dev/null)" != "$_twant" ]; then
    echo "[tests] installing test-only requirements (pip)"
    if python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt; then
        echo "$_twant" > "$_tstamp"
    else
        echo "[tests] pip failed; tests that need requirements-test.txt will skip"
    fi
fi
# the optional lmms-eval extra (requirements-lmms.txt) for tests/test_lmms_eval.py: --no-deps, since lmms-eval's own
# requirements would replace the pinned torch; ETT_LMMS_EXTRA tells the test whether it is installed or failed to be
_lstamp="$(python -c 'import sys; print(sys.prefix)')/.ett_ds_lmms_installed"
_lwant="$(sha1sum requirements-lmms.txt | cut -d' ' -f1)"
if [ "$(cat "$_lstamp" 2>/dev/null)" != "$_lwant" ]; then
    echo "[tests] installing the lmms-eval extra (pip --no-deps -r requirements-lmms.txt)"
    if python -m pip install -q --disable-pip-version-check --no-deps -r requirements-lmms.txt; then
        echo "$_lwant" > "$_lstamp"
    else
        echo "[tests] pip failed; tests/test_lmms_eval.py will skip"
    fi
fi
if [ "$(cat "$_lstamp" 2>/dev/null)" = "$_lwant" ]; then export ETT_LMMS_EXTRA=installed; else export ETT_LMMS_EXTRA=failed; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    pkgs=$(grep -v '^#' tests/apt-packages.txt | tr '\n' ' ')
    missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$missing" ]; then
        echo "[tests] installing Debian packages: $missing"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
            || echo "[tests] apt-get failed; tests that need these packages will skip"
    fi
fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
# one pytest worker per core (pytest-xdist, requirements-test.txt), whole files per worker so that a file's
# module-scoped fixtures (a demo folder, a trained checkpoint) are built once; ETT_TEST_WORKERS=1 runs in one process
workers="${ETT_TEST_WORKERS:-$(python -c 'import os; print(min(2, len(os.sched_getaffinity(0))))')}"
parallel=()
if [ "$workers" -gt 1 ] && python -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$workers" --dist loadfile)
fi
exec python -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} "$@" tests
