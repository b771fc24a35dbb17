#!/usr/bin/env bash
# Sets up the project (a .venv unless an environment is already active) and runs the test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launchers/setup_env.sh
source launchers/setup_env.sh
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
