#!/usr/bin/env bash
# Does it learn, at a GPU budget? Random init vs DINO vs DoRA on the demo's video and recipe scaled up for one GPU, the
# teacher probed with k-NN and DAVIS-style propagation, in at most ~8 minutes; prints the table and checks it against
# issue 13's targets (benchmarks/learning_targets.py). Everything lands in OUTPUT_DIR (default bench_out/learning_gpu).
#
# Usage: benchmarks/bench_learning_gpu.sh [OUTPUT_DIR]
#   PYTHON=python3 benchmarks/bench_learning_gpu.sh "$OUT/learning"   # on the lent GPU machine (docs/benchmarks.md)
#   MAX_STEPS=3 EPOCHS=1 ACCELERATOR=cpu PRECISION=32-true BATCH=8 WORKERS=2 benchmarks/bench_learning_gpu.sh /tmp/x
#     (a CPU smoke run of the script itself, ~4 min on 2 cores; its numbers mean nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_out/learning_gpu}
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-20}          # 20 passes over the ~1250 clips of assets/video/photo_walk.mp4 at batch 32: 780 steps
BATCH=${BATCH:-32}
# the demo's learning rate per clip: base_lr x batch / 256 = 6.25e-4 as at the demo's batch 8 (which learns on the CPU)
BASE_LR=${BASE_LR:-$(awk -v b="$BATCH" 'BEGIN { print 0.16 / b }')}
WORKERS=${WORKERS:-12}
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
LIMIT_S=${LIMIT_S:-480}
MAX_STEPS=${MAX_STEPS:--1}    # -1: the epochs decide
mkdir -p "$OUT_DIR"
start=$(date +%s)
timeout "$LIMIT_S" "$PY" -m dora_lightning.compare --config configs/demo.yaml --output_dir "$OUT_DIR" \
  --evaluators knn davis --max_epochs "$EPOCHS" \
  --fit_arg=--trainer.accelerator="$ACCELERATOR" --fit_arg=--trainer.precision="$PRECISION" \
  --fit_arg=--data.batch_size="$BATCH" --fit_arg=--data.num_workers="$WORKERS" --fit_arg=--model.base_lr="$BASE_LR" \
  --fit_arg=--trainer.enable_progress_bar=false --fit_arg=--trainer.max_steps="$MAX_STEPS" \
  --eval_arg=--trainer.accelerator="$ACCELERATOR" --eval_arg=--trainer.enable_progress_bar=false \
  2>&1 | tee "$OUT_DIR/compare.log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/compare.log"
out_dim=$("$PY" -c "import yaml; print(yaml.safe_load(open('configs/demo.yaml'))['model']['out_dim'])")
"$PY" benchmarks/learning_targets.py "$OUT_DIR/comparison.json" --out_dim "$out_dim" | tee "$OUT_DIR/targets.txt"
