#!/usr/bin/env bash
# Does a refactor change what training computes? Runs the tiny recipe (one process, seed 0, no loader workers) for
# stage ett (6 steps) and stage tokenizer (4 steps) at two commits on the same demo data, and compares every number
# of every metrics.jsonl row (timings left out). Exit 0 when all are identical.
#
#   bash bench/behaviour_check.sh BEFORE [AFTER]     # commits (AFTER: the work tree); output in /tmp/behaviour_check
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench/behaviour_check.sh BEFORE_COMMIT [AFTER_COMMIT]}
after=${2:-}
work=${BEHAVIOUR_DIR:-/tmp/behaviour_check}
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
git worktree add -q --detach "$work/before" "$before"
after_tree=$PWD
if [ -n "$after" ]; then git worktree add -q --detach "$work/after" "$after"; after_tree=$work/after; fi
cleanup() { git worktree remove --force "$work/before" 2>/dev/null || true
            [ -z "$after" ] || git worktree remove --force "$work/after" 2>/dev/null || true; }
trap cleanup EXIT
python -m data_tools demo --out "$work/data" --num-train 256 --num-heldout 32 --samples-per-shard 128 >/dev/null 2>&1
common=(data.demo_dir=null "data.train=$work/data/train" "data.eval=$work/data/heldout"
        "model.llm.text_tokenizer=$work/data/spm.model" data.num_workers=0 train.log_every=1 seed=0)
for side in before after; do
    tree=$work/before; [ "$side" = after ] && tree=$after_tree
    (cd "$tree" && python -m ett_ds.train --config tiny stage=ett train.max_steps=6 "out_dir=$work/$side/runs_ett" \
        "${common[@]}" > "$work/$side.ett.log" 2>&1 &&
     python -m ett_ds.train --config tiny stage=tokenizer train.max_steps=4 "out_dir=$work/$side/runs_tok" \
        "${common[@]}" > "$work/$side.tok.log" 2>&1) || { echo "$side: training failed, see $work/$side.*.log"; exit 1; }
done
python - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def numbers(d, pre=""):
    for k, v in d.items():
        if any(s in k for s in ("time", "per_s")):
            continue
        if isinstance(v, dict):
            yield from numbers(v, pre + k + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield pre + k, v
n, worst = 0, 0.0
for part in ("ett", "tok"):
    rows = [[json.loads(x) for x in open(f"{work}/{side}/runs_{part}/tiny/metrics.jsonl")] for side in ("before", "after")]
    assert len(rows[0]) == len(rows[1]), f"{part}: {len(rows[0])} vs {len(rows[1])} rows"
    for a, b in zip(*rows):
        da, db = dict(numbers(a)), dict(numbers(b))
        assert da.keys() == db.keys(), f"{part}: keys differ: {sorted(set(da) ^ set(db))}"
        for k in da:
            n, worst = n + 1, max(worst, abs(da[k] - db[k]))
    print(f"stage {part}: loss by step", [round(r["loss"], 7) for r in rows[1] if "loss" in r and "step" in r])
print(f"{n} logged numbers compared, max |difference| {worst:g}")
sys.exit(0 if worst == 0 else 1)
PY
