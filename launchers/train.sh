#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Launch ett_ds training with the deepspeed launcher, on one machine or across a SLURM allocation.
#
#   launchers/train.sh RECIPE [key=value ...] [--dry-run] [--mode local|srun|pdsh]
#
# RECIPE is a YAML file or the name of one in ett_ds/recipes (tiny -> ett_ds/recipes/tiny.yaml). Each key=value
# overrides one config field. The trainer runs as `python -m ett_ds.train --config RECIPE key=value ...`.
#
# Modes (--mode, else $ETT_LAUNCH_MODE, else automatic):
#   local  one machine: `deepspeed --num_gpus N` with N = visible GPUs, or $ETT_NUM_PROCS; on a CPU-only machine
#          N = $ETT_NUM_PROCS (default 1). Automatic outside SLURM and in a one-node allocation.
#   srun   SLURM, no ssh needed: one launcher per node, `srun --ntasks-per-node=1 deepspeed --no_ssh
#          --node_rank=$SLURM_NODEID ...`. Automatic in a multi-node allocation.
#   pdsh   SLURM, DeepSpeed's default multi-node launcher: one `deepspeed --hostfile` on this node reaches the others
#          through pdsh/ssh (passwordless ssh to every node required; pdsh installed).
# Both SLURM modes write a hostfile (`host slots=GPUS_PER_NODE`, hosts from `scontrol show hostnames`) and an
# environment file for the workers into $ETT_LAUNCH_DIR (default ./logs/launch/<job id>); the current directory
# must be on a file system every node sees.
#
# Environment:
#   ETT_NO_SETUP=1        do not source launchers/setup_env.sh (which creates/activates .venv and pip-installs)
#   ETT_NUM_PROCS=N       processes on this machine (default: all visible GPUs; 1 on CPU)
#   ETT_GPUS_PER_NODE=N   slots per node in SLURM modes (default: SLURM_GPUS_PER_NODE / SLURM_GPUS_ON_NODE / local)
#   ETT_LAUNCH_MODE       local | srun | pdsh (overridden by --mode)
#   ETT_LAUNCH_DIR        where the hostfile and worker environment file go
#   ETT_EXPORT_VARS       extra variable names (space or comma separated) the workers must receive in pdsh mode
#   ETT_NO_VALIDATE=1     skip the recipe check (python -m ett_ds.preflight) that runs before every launch
#   MASTER_PORT           rendezvous port (default in SLURM: 20000 + job id % 20000, as ett_ds.engine.dist;
#                         on one machine outside SLURM: a free port, never a fixed one)
#   OMP_NUM_THREADS       default max(1, cores / processes per node); the deepspeed launcher leaves it unset
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="train.sh"

die() { echo "$PROG: error: $*" >&2; exit 2; }
note() { echo "[$PROG] $*" >&2; }
usage() { sed -n '3,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------------------------------------- arguments
dry_run=0
mode="${ETT_LAUNCH_MODE:-auto}"
recipe=""
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --mode) [ $# -ge 2 ] || die "--mode needs a value (local, srun or pdsh)"; mode="$2"; shift ;;
        --mode=*) mode="${1#--mode=}" ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            if [ -z "$recipe" ]; then recipe="$1"
            elif [[ "$1" == *=* ]]; then overrides+=("$1")
            else die "expected key=value after the recipe, got '$1'"
            fi ;;
    esac
    shift
done
[ -n "$recipe" ] || die "missing RECIPE (usage: $PROG RECIPE [key=value ...] [--dry-run] [--mode local|srun|pdsh])"
case "$mode" in
    auto|local|srun|pdsh) ;;
    *) die "bad mode '$mode' (expected local, srun or pdsh)" ;;
esac

if [ -f "$recipe" ]; then
    recipe="$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")"
elif [ -f "$REPO/ett_ds/recipes/$recipe.yaml" ]; then
    recipe="$REPO/ett_ds/recipes/$recipe.yaml"
elif [ -f "$REPO/ett_ds/recipes/$recipe" ]; then
    recipe="$REPO/ett_ds/recipes/$recipe"
else
    die "recipe '$recipe' not found (neither a file nor ett_ds/recipes/$recipe.yaml)"
fi

num_nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
if [ "$mode" = auto ]; then
    mode=local
    if [ -n "${SLURM_JOB_ID:-}" ] && is_uint "$num_nodes" && [ "$num_nodes" -gt 1 ]; then mode=srun; fi
fi
if [ "$mode" != local ] && [ -z "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" ]; then
    die "mode '$mode' needs a SLURM allocation (SLURM_JOB_NODELIST is not set); use --mode local"
fi

# ---------------------------------------------------------------------------------------------- environment
if [ "${ETT_NO_SETUP:-0}" != 1 ]; then
    if [ "$dry_run" = 1 ]; then
        note "dry run: would source launchers/setup_env.sh (set ETT_NO_SETUP=1 to skip)"
    else
        # shellcheck source=setup_env.sh
        source "$REPO/launchers/setup_env.sh"
    fi
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"

set_vars=()   # variables this script sets for the launch; shown in front of the command
set_var() { export "$1=$2"; set_vars+=("$1=$2"); }

# ett_ds importable from any directory, installed or not (deepspeed passes PYTHON* on to every node).
case ":${PYTHONPATH:-}:" in
    *":$REPO:"*) ;;
    *) set_var PYTHONPATH "$REPO${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

# Visible GPUs on this machine: CUDA_VISIBLE_DEVICES when set (SLURM sets it), else `nvidia-smi -L`.
visible_gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    IFS=',' read -r -a visible_gpus <<< "${CUDA_VISIBLE_DEVICES}"
    case "${CUDA_VISIBLE_DEVICES}" in -1|NoDevFiles) visible_gpus=() ;; esac
elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t visible_gpus < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p')
fi
n_gpus=${#visible_gpus[@]}

if [ -n "${ETT_NUM_PROCS:-}" ]; then
    { is_uint "$ETT_NUM_PROCS" && [ "$ETT_NUM_PROCS" -ge 1 ]; } ||
        die "ETT_NUM_PROCS must be a positive integer, got '$ETT_NUM_PROCS'"
fi

cores_here() {
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ "$mode" != local ]; then echo "$SLURM_CPUS_PER_TASK"; else nproc; fi
}
set_omp_threads() {  # $1 = processes per node
    if [ -z "${OMP_NUM_THREADS:-}" ]; then
        local threads=$(( $(cores_here) / $1 ))
        set_var OMP_NUM_THREADS "$(( threads > 0 ? threads : 1 ))"
    fi
}

master_port() {
    if [ -n "${MASTER_PORT:-}" ]; then echo "$MASTER_PORT"
    elif is_uint "${SLURM_JOB_ID:-x}"; then echo $(( 20000 + SLURM_JOB_ID % 20000 ))
    fi
}

# A TCP port nobody listens on, asked from the kernel (bind to port 0); used on one machine when MASTER_PORT is
# unset, so two local jobs (or a test beside a training) never both take DeepSpeed's default 29500.
free_port() {
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
                && return 0
        fi
    done
    local port tries
    for tries in $(seq 1 50); do  # no python: probe random ports until one refuses a connection
        port=$(( 20000 + RANDOM % 30000 ))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return 0; }
    done
    return 1
}

show_cmd() {
    local line="+"
    local word
    for word in "${set_vars[@]}" "$@"; do line+=" $(printf '%q' "$word")"; done
    echo "$line"
}
# DeepSpeed's launchers must outlive SLURM's SIGUSR1 (time limit) and SIGTERM (preemption), which reach every process
# of a step: launch.py answers SIGTERM by terminating its workers and SIGUSR1 would end it. They run with both signals
# blocked (ett_ds.engine.preempt, stdlib only); the training processes unblock and catch them, agree at the next step
# boundary, write a checkpoint and exit 75, which the launchers pass up (launchers/slurm.sbatch requeues on 75).
guard_py() { command -v python3 || command -v python || die "no python on PATH (needed to start the launcher)"; }
run_cmd() {
    show_cmd "$@"
    [ "$dry_run" = 0 ] || exit 0
    local tool
    for tool in "$1" deepspeed; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
    done
    if [ "$1" = deepspeed ]; then
        exec "$(guard_py)" -m ett_ds.engine.preempt "$@"
    fi
    exec "$@"
}

trainer=(--module ett_ds.train --config "$recipe" "${overrides[@]}")

# The recipe and overrides are loaded as the trainer will load them (an unknown key or bad value stops here, on this
# node, in a second) and the plan is shown: world size, gradient accumulation, global batch. $1 = world size.
preflight() {
    [ "${ETT_NO_VALIDATE:-0}" != 1 ] || { note "recipe not checked (ETT_NO_VALIDATE=1)"; return 0; }
    local py out
    py="$(command -v python || command -v python3)" || die "no python on PATH to check the recipe (ETT_NO_VALIDATE=1 skips)"
    out="$("$py" -m ett_ds.preflight --world-size "$1" --config "$recipe" "${overrides[@]}" 2>&1)" ||
        die "$(printf '%s' "$out" | tail -n 1 | sed 's/^error: //')"
    if [ "$dry_run" = 1 ]; then echo "# $out"; else note "$out"; fi
}

# ---------------------------------------------------------------------------------------------- one machine
if [ "$mode" = local ]; then
    port="$(master_port)"
    # Outside SLURM (or without a numeric job id) a free port replaces DeepSpeed's fixed default 29500.
    [ -n "$port" ] || port="$(free_port)" || die "could not find a free TCP port; set MASTER_PORT"
    launcher=(deepspeed)
    if [ "$n_gpus" -gt 0 ]; then
        nprocs="${ETT_NUM_PROCS:-$n_gpus}"
        [ "$nprocs" -le "$n_gpus" ] || die "ETT_NUM_PROCS=$nprocs but only $n_gpus GPUs are visible"
        ids=("${visible_gpus[@]:0:$nprocs}")
        ids_csv="$(IFS=,; echo "${ids[*]}")"
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ "$ids_csv" =~ ^[0-9,]+$ ]]; then
            # --num_gpus would make deepspeed drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1 (wrong on shared nodes)
            launcher+=(--include "localhost:$ids_csv")
        else
            launcher+=(--num_gpus "$nprocs")
        fi
    else
        nprocs="${ETT_NUM_PROCS:-1}"
        [ -n "${DS_ACCELERATOR:-}" ] || set_var DS_ACCELERATOR cpu
        launcher+=(--num_gpus "$nprocs")
    fi
    set_omp_threads "$nprocs"
    [ -z "$port" ] || launcher+=(--master_port "$port")
    note "mode=local processes=$nprocs gpus=$n_gpus"
    preflight "$nprocs"
    run_cmd "${launcher[@]}" "${trainer[@]}"
fi

# ---------------------------------------------------------------------------------------------- SLURM
nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
command -v scontrol >/dev/null 2>&1 || die "scontrol not found: SLURM modes need it to expand '$nodelist'"
mapfile -t hosts < <(scontrol show hostnames "$nodelist")
[ "${#hosts[@]}" -gt 0 ] || die "'scontrol show hostnames $nodelist' listed no hosts"

slurm_gpus="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
slurm_gpus="${slurm_gpus##*:}"  # SLURM_GPUS_PER_NODE may read "h100:8"
[ -n "$slurm_gpus" ] || slurm_gpus="$n_gpus"
if [ "$slurm_gpus" = 0 ]; then  # CPU nodes: ETT_GPUS_PER_NODE (or ETT_NUM_PROCS) processes per node
    slots="${ETT_GPUS_PER_NODE:-${ETT_NUM_PROCS:-1}}"
    [ -n "${DS_ACCELERATOR:-}" ] || set_var DS_ACCELERATOR cpu
else
    slots="${ETT_GPUS_PER_NODE:-$slurm_gpus}"
fi
{ is_uint "$slots" && [ "$slots" -ge 1 ]; } || die "cannot tell the GPUs per node ('$slots'); set ETT_GPUS_PER_NODE"
set_omp_threads "$slots"

master_addr="${MASTER_ADDR:-${hosts[0]}}"
port="$(master_port)"
port="${port:-29500}"
launch_dir="${ETT_LAUNCH_DIR:-$PWD/logs/launch/${SLURM_JOB_ID:-local}}"
hostfile="$launch_dir/hostfile"
env_file="$launch_dir/.deepspeed_env"

hostfile_text="$(printf '%s slots='"$slots"'\n' "${hosts[@]}")"

# Workers started by pdsh get only NCCL_*/PYTHON* and what this file lists (deepspeed reads it via DS_ENV_FILE).
env_text=""
export_names=(PATH LD_LIBRARY_PATH VIRTUAL_ENV CONDA_PREFIX CUDA_HOME HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE
              HF_HUB_OFFLINE TRANSFORMERS_OFFLINE TORCH_EXTENSIONS_DIR OMP_NUM_THREADS DS_ACCELERATOR
              TOKENIZERS_PARALLELISM)
mapfile -t ett_names < <(compgen -e | grep '^ETT_' || true)
user_list="${ETT_EXPORT_VARS:-}"
read -r -a user_names <<< "${user_list//,/ }"
for name in "${export_names[@]}" "${ett_names[@]}" "${user_names[@]}"; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "ETT_EXPORT_VARS: '$name' is not a variable name"
    [ -n "${!name+x}" ] || continue
    value="${!name}"
    if [[ "$value" == *[$'\n''"$`']* ]]; then
        note "not exporting $name to workers: its value has a newline, \", \$ or \`"
        continue
    fi
    env_text+="$name=$value"$'\n'
done
set_var DS_ENV_FILE "$env_file"

note "mode=$mode nodes=${#hosts[@]} slots/node=$slots world=$(( ${#hosts[@]} * slots )) master=$master_addr:$port"
preflight "$(( ${#hosts[@]} * slots ))"
if [ "$dry_run" = 1 ]; then
    echo "# hostfile $hostfile"
    printf '%s\n' "$hostfile_text"
    echo "# worker environment $env_file"
    printf '%s' "$env_text"
else
    mkdir -p "$launch_dir"
    printf '%s\n' "$hostfile_text" > "$hostfile"
    printf '%s' "$env_text" > "$env_file"
fi

ds_args=(--hostfile "$hostfile" --master_addr "$master_addr" --master_port "$port")
if [ "$mode" = pdsh ]; then
    [ "$dry_run" = 1 ] || command -v pdsh >/dev/null 2>&1 || die "pdsh mode needs pdsh on PATH (or use --mode srun)"
    run_cmd deepspeed --launcher pdsh "${ds_args[@]}" "${trainer[@]}"
fi

# srun mode: SLURM_NODEID must be read on each node, hence the small `bash -c` around deepspeed.
srun_args=(srun --nodes="${#hosts[@]}" --ntasks="${#hosts[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1)
# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch; without it each node gets one core.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# Each node's launcher starts through the signal guard (see run_cmd); srun itself keeps its own signal handling.
# shellcheck disable=SC2016  # $SLURM_NODEID and $@ are expanded by the per-node shell, not here
run_cmd "${srun_args[@]}" bash -c \
    'exec "$(command -v python3 || command -v python)" -m ett_ds.engine.preempt deepspeed --node_rank="$SLURM_NODEID" "$@"' \
    deepspeed \
    --no_ssh "${ds_args[@]}" "${trainer[@]}"
