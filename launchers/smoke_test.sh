#!/usr/bin/env bash
# The main job on the built-in default: the whole ETT pipeline on the tiny recipe, on one GPU if present, else CPU.
#
#   bash launchers/smoke_test.sh            # 855 s measured on 2 shared CPU cores (GPU: not yet measured)
#
# Sets up .venv (unless an environment is active), builds the demo data with data_tools (rendered words in real
# fonts; plus the Tux Paint stamps when the Debian package is installed), then runs every stage, each starting
# from the previous stage's checkpoint, through launchers/train.sh (the deepspeed launcher):
#   stage 0 tokenizer pretraining -> stage 1 alignment -> stage 2 ETT -> stage 3 SFT and text-to-image
# then evaluation on the held-out split, export, one caption and one generated image, and a summary table.
# Knobs: SMOKE_SCALE (multiplies every step count, default 1), SMOKE_OUT (run folder parent, default runs/smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
export ETT_NO_SETUP=1

OUT=${SMOKE_OUT:-runs/smoke}
SCALE=${SMOKE_SCALE:-1}
DEMO=data/demo
steps() { python -c "print(max(2, int($1 * float('$SCALE'))))"; }
latest() { python -c "from ett_ds.engine.checkpoint import latest; from pathlib import Path; p = latest(Path('$1') / 'checkpoints'); assert p, 'no checkpoint in $1'; print(p)"; }
stage() {  # stage NAME STAGE STEPS [overrides...]
    local name=$1 st=$2 n=$3; shift 3
    echo "== [$name] stage=$st steps=$n"
    bash launchers/train.sh tiny "name=$name" "stage=$st" "out_dir=$OUT" "train.max_steps=$n" \
        "train.save_every=$n" "train.image_every=$n" "train.resume=never" "$@"
}
t0=$(date +%s)

echo "== demo data"
python -m data_tools demo --out "$DEMO"
TRAIN="$DEMO/train"
if [ -d /usr/share/tuxpaint/stamps ]; then
    python -m data_tools import tuxpaint --out data/tuxpaint --no-progress >/dev/null && TRAIN="$TRAIN::data/tuxpaint"
    echo "   + Tux Paint stamps (real captioned clip-art) mixed into stages 1-2"
fi

stage tok tokenizer "$(steps 300)" "train.ema_decay=0.99"
stage align align "$(steps 150)" "train.init_from=$(latest "$OUT/tok")" "data.train=$TRAIN"
stage ett ett "$(steps 200)" "train.init_from=$(latest "$OUT/align")" "data.train=$TRAIN" "optim.tokenizer_lr=2e-4"
stage sft sft "$(steps 100)" "train.init_from=$(latest "$OUT/ett")" "optim.lr=5e-4" "optim.projector_lr=5e-4"
stage t2i t2i "$(steps 200)" "train.init_from=$(latest "$OUT/ett")" "optim.lr=5e-4" "optim.projector_lr=1e-3"

echo "== evaluation (held-out fonts and text)"
python -m ett_ds.evaluate --ckpt "$(latest "$OUT/sft")" --data "$DEMO/heldout" --tasks recon,caption \
    --out "$OUT/eval_sft.json"
echo "== export"
python -m ett_ds.export --ckpt "$(latest "$OUT/t2i")" --out "$OUT/export_t2i"
echo "== inference"
img=$(python -c "import glob; print(sorted(glob.glob('$DEMO/heldout_png/*.png') or [''])[0])")
if [ -z "$img" ]; then
    python - <<PY
from pathlib import Path
from ett_ds.data.shards import expand_urls
from ett_ds.data.decode import iter_tar_samples
from collections import Counter
import io
from PIL import Image
raw = next(iter_tar_samples(expand_urls("$DEMO/heldout")[0], Counter()))
ext = next(k for k in ("png", "jpg", "webp") if k in raw)
Image.open(io.BytesIO(raw[ext])).convert("RGB").save("$OUT/heldout_example.png")
PY
    img="$OUT/heldout_example.png"
fi
python -m ett_ds.infer caption --ckpt "$(latest "$OUT/sft")" --image "$img"
python -m ett_ds.infer generate --ckpt "$OUT/export_t2i" --prompt "red fox" --out "$OUT/generated.png" --seed 0
python -m ett_ds.infer reconstruct --ckpt "$OUT/export_t2i" --image "$img" --out "$OUT/reconstructed.png"

python launchers/smoke_summary.py "$OUT" "$OUT/eval_sft.json" tok align ett sft t2i
echo
echo "pictures: $OUT/*/images/*.png, $OUT/generated.png, $OUT/reconstructed.png (input: $img)"
echo "smoke test finished in $(( $(date +%s) - t0 )) s"
