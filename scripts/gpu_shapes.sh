#!/usr/bin/env bash
# Train the issue-17 Shapes candidates side by side on one GPU in one device call, and bring back what
# exporting them here needs (benchmarks/results/shapes_self_attention_candidates.md, "On a GPU").
#
# Every run starts from step 0 with the shipped recipe (VAE stage checkpoints/shapes-vae.safetensors,
# v-prediction, 2000 word-table steps, SNR floor 1, batch 32, seed 0, a 10000-step schedule); only the UNet
# levers differ:
#   base      the shipped architecture (the control)
#   candB     --layers-per-block 1 --transformer-layers 2 --attention-levels 0 1 2 (convolutions cannot do
#             all the spatial work; attention at every level, two transformer blocks deep)
#   candB128  candB with --image-size 128 (32x32 latents: attention at 32/16/8, as SD's at 64/32/16)
#   base128   the shipped architecture with --image-size 128: the finer grid alone, so that with the three
#             above the two levers of the issue are measured apart (a 2x2 design)
# Each run is a background process with --device cuda and --budget-minutes $BUDGET: it stops cleanly, its
# checkpoint saved, before its budget is spent. Then each run's EMA weights (fp16) + metadata + log are
# packed (train.py ema-pack, about 12.3 MiB for candB) and tarred with its logs as $OUT/<run>.tar (one file
# per run, each under the device tool's 16 MiB), and $OUT/summary.txt says where each run stopped.
#
# The device machine has torch and transformers but not diffusers: carry it as wheels. Once, in the root of
# the checkout that calls the device tool (the versions are the ones this repository is tested with):
#   echo /.whl/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl"
#   python3 -m pip download $P diffusers==0.42.1
#   python3 -m pip download $P importlib_metadata==10.2.0
# (diffusers' other needs, huggingface_hub>=1.32, safetensors>=0.8, regex, filelock, requests, Pillow, zipp,
# are on the machine.) Then call the device tool's run with
#   command: bash scripts/gpu_shapes.sh      carry: [".whl"]      timeout_s: 540
#
# On CPU, to prove the logic (a tiny config, a 10-second budget; used by tests/test_gpu_script.py):
#   DEVICE=cpu TINY=1 OUT=/tmp/gpu_out WORK=/tmp/gpu_work bash scripts/gpu_shapes.sh
#
# Environment: DEVICE (cuda), TINY (0), BUDGET (minutes per run; 7, or 0.15 with TINY=1), STEPS (the schedule,
# 10000), STOP_AT (stop every run at this step, e.g. to compare at equal steps; default: the budget decides),
# CHECK (1: run tests/test_gpu_script.py's CUDA test first; its result goes to $OUT/check.txt),
# RUNS (which of the runs above, default all four), THREADS (torch threads per run, 3), PRECISION (fp32),
# OUT ($OUT of the device tool, else /tmp/gpu_shapes_out), WORK (/tmp/gpu_shapes), PY (python3).
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then BUDGET=${BUDGET:-0.15}; else BUDGET=${BUDGET:-7}; fi
STEPS=${STEPS:-10000}
STOP_AT=${STOP_AT:-}
RUNS=${RUNS:-base candB candB128 base128}
THREADS=${THREADS:-3}
PRECISION=${PRECISION:-fp32}
OUT=${OUT:-/tmp/gpu_shapes_out}
WORK=${WORK:-/tmp/gpu_shapes}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)

if ! $PY -c "import diffusers" 2>/dev/null; then  # the device machine: install the carried wheels
  ls .whl/*.whl >/dev/null 2>&1 || { echo "diffusers is missing and no .whl/ was carried (see this script's header)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
$PY -c "import torch, diffusers, transformers, attnlens; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || exit 2
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${CHECK:-0}" = 1 ]; then  # opt-in, about a minute: the CUDA test of train.py's device path first
  $PY -m pytest -x -q -p no:cacheprovider tests/test_gpu_script.py -k cuda 2>&1 | tail -n 3 | tee "$OUT/check.txt"
fi

flags() {  # the UNet levers of each run
  case $1 in
    base) echo "" ;;
    candB) echo "--layers-per-block 1 --transformer-layers 2 --attention-levels 0 1 2" ;;
    candB128) echo "--layers-per-block 1 --transformer-layers 2 --attention-levels 0 1 2 --image-size 128" ;;
    base128) echo "--image-size 128" ;;
    *) echo "unknown run $1 (valid: base candB candB128 base128)" >&2; return 1 ;;
  esac
}

TRAIN="$PY -m tools.shapes_model.train"
TINYFLAG=""
if [ "$TINY" = 1 ]; then  # a tiny VAE stage stands in for the shipped one (the tiny UNet is built to its latents)
  TINYFLAG="--tiny"
  $TRAIN vae --tiny --workdir "$WORK/vae" --steps 1 --save-every 1 --eval-every 1000 --device "$DEVICE" 2>/dev/null || exit 3
  VAE="$WORK/vae/vae.safetensors"
else
  VAE=checkpoints/shapes-vae.safetensors
fi
PRECFLAG=""; [ "$DEVICE" = cpu ] || PRECFLAG="--precision $PRECISION"
STOPFLAG=""; [ -n "$STOP_AT" ] && STOPFLAG="--stop-at $STOP_AT"

declare -A PID
for run in $RUNS; do
  f=$(flags "$run") || exit 4
  w="$WORK/$run"; mkdir -p "$w"
  cp "$VAE" "$w/vae.safetensors"; cp "$VAE.json" "$w/vae.safetensors.json"
  # shellcheck disable=SC2086
  $TRAIN unet $TINYFLAG --workdir "$w" --steps "$STEPS" --seed 0 --prediction-type v_prediction \
    --text-table-steps 2000 --snr-floor 1.0 --save-every 1000 --threads "$THREADS" --device "$DEVICE" \
    --budget-minutes "$BUDGET" $PRECFLAG $STOPFLAG $f >"$w/train.log" 2>&1 &
  PID[$run]=$!
  echo "started $run (pid ${PID[$run]}): $f"
done
if [ "$DEVICE" != cpu ]; then  # one reading of the GPU's load while the runs train
  (sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >"$WORK/gpu_load.txt" 2>&1) &
fi

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"
say "gpu_shapes.sh: DEVICE=$DEVICE TINY=$TINY BUDGET=$BUDGET min STEPS=$STEPS STOP_AT=${STOP_AT:-none} PRECISION=$PRECISION"
for run in $RUNS; do
  w="$WORK/$run"
  wait "${PID[$run]}"; rc=$?
  step=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['meta']['step'])" "$w/unet.safetensors.json" 2>/dev/null || echo none)
  last=$(tail -n 1 "$w/unet_log.jsonl" 2>/dev/null)
  packed=no
  if [ "$step" != none ] && $TRAIN ema-pack --workdir "$w" >>"$w/train.log" 2>&1; then packed=yes; fi
  files=$(cd "$w" && ls ema-pack.safetensors ema-pack.safetensors.json unet_log.jsonl train.log 2>/dev/null)
  # shellcheck disable=SC2086
  tar -cf "$OUT/$run.tar" -C "$w" $files
  size=$(stat -c %s "$OUT/$run.tar")
  over=""; [ "$size" -gt 16777216 ] && over=" OVER THE 16 MiB LIMIT"
  say "$run: exit $rc, stopped at step $step, ema-pack $packed, $run.tar $size bytes$over; last log: ${last:-none}"
  [ "$rc" = 0 ] || tail -n 5 "$w/train.log" | sed "s/^/  $run| /" | tee -a "$OUT/summary.txt"
done
[ -f "$WORK/gpu_load.txt" ] && sed 's/^/gpu load | /' "$WORK/gpu_load.txt" | tee -a "$OUT/summary.txt"
say "wall $(( $(date +%s) - T0 )) s"
