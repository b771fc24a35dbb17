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
exec python -m pytest -q -p no:cacheprovider "$@" tests
