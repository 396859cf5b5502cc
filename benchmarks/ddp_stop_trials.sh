#!/usr/bin/env bash
# Stop a 2-process CPU DDP `dora fit` (gloo, micro ViT, 2 loader workers each) with a signal at a moment it does not
# choose, and report how it ended: exit status (HUNG: no exit within 90 s), checkpoints, its last `dora fit:` line.
# The measurement behind docs/training.md, "Stopping" (about 45 s a trial on 2 cores).
#
#   benchmarks/ddp_stop_trials.sh NAME DELAY_S SIGNAL TARGET [WORKERS]
#     SIGNAL: TERM or INT;  TARGET: group (the whole process group: a terminal, SLURM, pkill) or main (process 0 only:
#     docker stop, kill PID);  WORKERS: loader workers per process (default 2). Runs in /tmp/ddp_stop/NAME.
# e.g.  for i in 1 2 3; do benchmarks/ddp_stop_trials.sh g$i $((27 + 3 * i)) TERM group; done
set -u
NAME=$1 DELAY=$2 SIGNAL=$3 TARGET=$4 WORKERS=${5:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
RUN=/tmp/ddp_stop/$NAME
rm -rf "$RUN" && mkdir -p "$RUN"
ARGS=(fit --model.backbone=vit_tiny_patch16_224 --model.img_size=32 --model.patch_size=8 --model.depth=2
  --model.embed_dim=48 --model.num_heads=3 --model.out_dim=128 --model.head_hidden_dim=64
  --model.head_bottleneck_dim=32 --model.warmup_epochs=1 --data.clip_length=2 --data.frame_stride=10
  --data.decode_short_side=48 --data.batch_size=2 --data.transform.init_args.global_size=32
  --data.transform.init_args.local_size=16 --data.transform.init_args.num_local_crops=2
  --data.transform.init_args.pre_crop_size=48 --trainer.accelerator=cpu --trainer.enable_progress_bar=false
  --data.paths="$REPO/assets/video/vtest.mp4" --trainer.max_steps=100000 --trainer.strategy=ddp --trainer.devices=2
  --trainer.use_distributed_sampler=false --data.num_workers="$WORKERS" --trainer.default_root_dir="$RUN/run")
# its own session; the wrapper survives the signal (trap) to record the exit status
setsid bash -c 'trap true TERM INT; cd "$0"; "$1" -m dora_lightning.cli "${@:3}" > "$2/out.log" 2> "$2/err.log"; echo $? > "$2/rc"' \
  "$REPO" "$PY" "$RUN" "${ARGS[@]}" &
sleep "$DELAY"
MAIN=$(pgrep -f "dora_lightning.cli fit.*default_root_dir=$RUN/run" | head -1)
if [ -z "$MAIN" ]; then echo "$NAME: the run ended before the signal"; exit 1; fi
if [ "$TARGET" = group ]; then kill -"$SIGNAL" -- -"$(ps -o pgid= -p "$MAIN" | tr -d ' ')"; else kill -"$SIGNAL" "$MAIN"; fi
for _ in $(seq 45); do [ -f "$RUN/rc" ] && break; sleep 2; done
echo "$NAME $SIGNAL->$TARGET: exit $(cat "$RUN/rc" 2>/dev/null || echo HUNG) | $(ls "$RUN/run/checkpoints" | tr '\n' ' ')| $(grep -E 'dora fit:|terminated with code' "$RUN/err.log" | tail -1 | cut -c1-80)"
pkill -9 -f "default_root_dir=$RUN/run" 2>/dev/null
true
