#!/usr/bin/env bash
# The paper's Tab. 4/5 ablation with seeds and intervals, in one command (see `python -m experiments.replicate --help`):
#
#   launchers/replicate.sh --size tiny|small|gpu --out DIR [--seeds N] [--grid-alphas A,.. --grid-ratios R,..]
#                          [--text-pretrain] [--launcher inprocess|python|launchers/train.sh]
#
# Sets up the environment (launchers/setup_env.sh; ETT_NO_SETUP=1 skips it), then runs experiments.replicate from the
# repository root. Stages run in one process by default; `--launcher launchers/train.sh` starts each stage with the
# deepspeed launcher instead (every GPU of the machine, or a SLURM allocation). A rerun with the same --out reuses
# finished stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${ETT_NO_SETUP:-}" ]; then
    # shellcheck source=launchers/setup_env.sh
    source launchers/setup_env.sh
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec python -m experiments.replicate "$@"
