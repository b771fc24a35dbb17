#!/usr/bin/env bash
# The paper's Tab. 4/5 ablation with seeds and intervals, in one command (see `python -m experiments.replicate --help`):
#
#   launchers/replicate.sh --size tiny|small|gpu --out DIR [--seeds N] [--grid-alphas A,.. --grid-ratios R,..]
#                          [--text-pretrain] [--launcher inprocess|python|launchers/train.sh] [--allow-shared-family]
#
# Sets up the environment (launchers/setup_env.sh; ETT_NO_SETUP=1 skips it) and the fonts, then runs
# experiments.replicate from the repository root. Training uses every text font but two collections (augmented);
# validation uses URW Gothic (fonts-urw-base35), held-out Liberation (fonts-liberation2): data_tools/fonts.py. As the
# smoke test does, the launcher installs the font packages with apt-get when it runs as root and they are missing;
# without a held-out collection it refuses in one line naming the packages, unless --allow-shared-family accepts
# DejaVu styles as held-out (then the report says so). Stages run in one process by
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
from data_tools.fonts import demo_split
from experiments.replicate.data import shared_families
try:
    train, held = demo_split()
except Exception:
    sys.exit(1)
sys.exit(1 if shared_families(train, held) else 0)' 2>/dev/null
}
allow_shared=0
for a in "$@"; do [ "$a" = "--allow-shared-family" ] && allow_shared=1; done
# shellcheck source=launchers/fonts.sh
source launchers/fonts.sh
FONTS_NO_APT="${REPLICATE_NO_APT:-${FONTS_NO_APT:-}}" install_fonts
if [ "$allow_shared" = 0 ] && ! fonts_ok; then
    echo "error: no held-out font collection: install fonts-liberation2 and fonts-urw-base35 (apt-get install -y fonts-liberation2 fonts-urw-base35), or pass --allow-shared-family" >&2
    exit 2
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec python -m experiments.replicate "$@"
