#!/usr/bin/env bash
# The main job on the built-in default: the whole ETT pipeline on the tiny recipe, on one GPU if present, else CPU,
# ending with verdicts measured on held-out images: does the model read, reconstruct and draw, and does its reading
# hold on each held-out font family? (launchers/smoke_summary.py; README "The two commands" shows a run's output.)
#
#   bash launchers/smoke_test.sh            # CPU: about 20 minutes on 2 cores (1148 s measured while tests shared them)
#
# Sets up .venv (unless an environment is active) and the font packages, builds the demo data with data_tools
# (3-digit numbers rendered in every text font the machine has; held out by font family and by string), then runs
# every stage, each starting from the previous stage's checkpoint, through launchers/train.sh (the deepspeed launcher):
#   stage 0 tokenizer pretraining -> stage 1 alignment -> stage 2 ETT -> stage 3 SFT and text-to-image
# then evaluation on the held-out split (reconstruction after stage 0 and after ETT, captions, generated images read
# back by an OCR reader), export, one caption and one generated image, and a summary with the verdicts.
# On a GPU every stage trains 4x longer on 64x128 images (128 visual tokens); the verdicts are the same.
# Knobs: SMOKE_SCALE (multiplies every step count; default 1, GPU 4), SMOKE_SIZE (demo image HxW; default 32x64,
# GPU 64x128), SMOKE_OUT (default runs/smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
export ETT_NO_SETUP=1
# shellcheck source=launchers/fonts.sh
source launchers/fonts.sh
install_fonts  # the training collections and the held-out ones (Liberation, URW Gothic): data_tools/fonts.py

OUT=${SMOKE_OUT:-runs/smoke}
GPU=$(python -c "import torch; print(int(torch.cuda.is_available()))")
SCALE=${SMOKE_SCALE:-$([ "$GPU" = 1 ] && echo 4 || echo 1)}
SIZE=${SMOKE_SIZE:-$([ "$GPU" = 1 ] && echo 64x128 || echo 32x64)}   # HxW of the demo images
H=${SIZE%x*} W=${SIZE#*x}
DEMO=$([ "$SIZE" = 32x64 ] && echo data/demo || echo "data/demo_$SIZE")
steps() { python -c "print(max(2, int($1 * float('$SCALE'))))"; }
latest() { python -c "from ett_ds.checkpoint import latest; from pathlib import Path; p = latest(Path('$1') / 'checkpoints'); assert p, 'no checkpoint in $1'; print(p)"; }
stage() {  # stage NAME STAGE STEPS [overrides...]
    local name=$1 st=$2 n=$3; shift 3
    echo "== [$name] stage=$st steps=$n"
    bash launchers/train.sh tiny "name=$name" "stage=$st" "out_dir=$OUT" "train.max_steps=$n" \
        "train.save_every=$n" "train.image_every=$n" "train.eval_every=$n" "train.resume=never" \
        "data.train=$DEMO/train" "data.eval=$DEMO/heldout" "model.llm.text_tokenizer=$DEMO/spm.model" \
        "data.image_size=[$H,$W]" "$@"
}
evaluate() {  # evaluate CKPT TASKS OUT [args...]
    local ck=$1 tasks=$2 out=$3; shift 3
    python -m ett_ds.evaluate --ckpt "$ck" --data "$DEMO/heldout" --tasks "$tasks" --out "$out" --quiet "$@"
}
t0=$(date +%s)

echo "== demo data"
python -m data_tools demo --out "$DEMO" --size "$SIZE"

stage tok tokenizer "$(steps 800)" "train.ema_decay=0.99"
stage align align "$(steps 40)" "train.init_from=$(latest "$OUT/tok")"
stage ett ett "$(steps 400)" "train.init_from=$(latest "$OUT/align")"
stage sft sft "$(steps 600)" "train.init_from=$(latest "$OUT/ett")"
stage t2i t2i "$(steps 600)" "train.init_from=$(latest "$OUT/ett")"
t_train=$(date +%s)

echo "== evaluation on the held-out split (fonts and strings never seen in training)"
evaluate "$(latest "$OUT/tok")" recon "$OUT/eval_tok.json"
evaluate "$(latest "$OUT/ett")" recon,caption "$OUT/eval_ett.json"
evaluate "$(latest "$OUT/sft")" caption "$OUT/eval_sft.json"
evaluate "$(latest "$OUT/t2i")" t2i "$OUT/eval_t2i.json" --t2i-samples 40 --t2i-temperature 0
python -m ett_ds.evaluate --ckpt "$(latest "$OUT/sft")" --data "$DEMO/heldout_vqa.jsonl" --tasks vqa \
    --out "$OUT/eval_vqa.json" --quiet
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
python -m ett_ds.infer generate --ckpt "$OUT/export_t2i" --prompt "$(python -c "import json; print(json.loads(open('$OUT/eval_t2i.json').read())['t2i']['samples'][0]['prompt'])" 2>/dev/null || echo 42)" --out "$OUT/generated.png" --seed 0
python -m ett_ds.infer reconstruct --ckpt "$OUT/export_t2i" --image "$img" --out "$OUT/reconstructed.png"

python launchers/smoke_summary.py "$OUT" --stages tok align ett sft t2i --eval-tok "$OUT/eval_tok.json" \
    --eval-ett "$OUT/eval_ett.json" --eval-sft "$OUT/eval_sft.json" --eval-t2i "$OUT/eval_t2i.json" \
    --eval-vqa "$OUT/eval_vqa.json" --json "$OUT/verdicts.json"
echo
echo "pictures: $OUT/eval_*_recon.png, $OUT/eval_t2i_t2i.png, $OUT/*/images/*.png, $OUT/generated.png, $OUT/reconstructed.png (input: $img)"
echo "smoke test finished in $(( $(date +%s) - t0 )) s (training $(( t_train - t0 )) s)"
