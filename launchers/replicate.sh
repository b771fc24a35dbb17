#!/usr/bin/env bash
# The paper's Tab. 4/5 ablation with seeds and intervals, in one command (see `python -m experiments.replicate --help`):
#
#   launchers/replicate.sh --size tiny|small|gpu --out DIR [--seeds N] [--grid-alphas A,.. --grid-ratios R,..]
#                          [--text-pretrain] [--launcher inprocess|python|launchers/train.sh] [--allow-shared-family]
#
# Sets up the environment (launchers/setup_env.sh; ETT_NO_SETUP=1 skips it) and the fonts, then runs
# experiments.replicate from the repository root. Training uses DejaVu (fonts-dejavu-core); validation and held-out
# use another type family, Liberation (fonts-liberation2). As the smoke test does, the launcher installs both with
# apt-get when it runs as root and they are missing; otherwise it refuses in one line naming the package, unless
# --allow-shared-family accepts DejaVu styles as held-out (then the report says so). Stages run in one process by
# default; `--launcher launchers/train.sh` starts each stage with the deepspeed launcher instead (every GPU of the
# machine, or a SLURM allocation). A rerun with the same --out reuses finished stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${ETT_NO_SETUP:-}" ]; then
    # shellcheck source=launchers/setup_env.sh
    source launchers/setup_env.sh
fi
fonts_ok() {  # both type families visible to data_tools (the check the tool itself makes)
    python -c 'import sys
from data_tools.demo import find_fonts
from experiments.replicate.data import shared_families
try:
    train, held = find_fonts()
except Exception:
    sys.exit(1)
sys.exit(1 if shared_families(train, held) else 0)' 2>/dev/null
}
allow_shared=0
for a in "$@"; do [ "$a" = "--allow-shared-family" ] && allow_shared=1; done
if [ "$allow_shared" = 0 ] && ! fonts_ok; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ -z "${REPLICATE_NO_APT:-}" ]; then
        echo "[replicate] installing the fonts: fonts-dejavu-core (training) and fonts-liberation2 (held-out)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core \
            fonts-liberation2 >/dev/null) || true
    fi
    if ! fonts_ok; then
        echo "error: the held-out font family is missing: install fonts-liberation2 (apt-get install -y fonts-dejavu-core fonts-liberation2), or pass --allow-shared-family" >&2
        exit 2
    fi
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec python -m experiments.replicate "$@"
