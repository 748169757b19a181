#!/usr/bin/env bash
# Rerun every benchmark whose results depend on the embedded Shapes model, one after another on an idle
# machine, then rewrite the model card from their results. Run it after exporting a new model into
# attnlens/models/shapes (python -m tools.shapes_model.train export --workdir W --out attnlens/models/shapes).
# About an hour on 2 CPU cores. Each benchmark writes benchmarks/results/; nothing else runs meanwhile,
# since the timing figures (capture overhead, edit and probing speed) are ratios measured in one run.
#
#   scripts/rebench.sh            # everything
#   scripts/rebench.sh quality    # only the benchmarks whose names contain "quality"
#
# shapes_text_path is skipped when the VAE, tokenizer and scheduler it reads are those it was measured
# on (a new UNet alone; `python -m tools.shapes_model.train text-path-current` decides); name it to run
# it anyway: scripts/rebench.sh text_path
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
only=${1:-}
benchmarks=(
  shapes_quality            # the quality bar (the card's main table)
  shapes_conditioning       # does the model use each word (denoising-loss gaps)
  shapes_position_diagnosis # where position words are lost, if they are
  shapes_text_path          # CLIP vs word table vs table start, trained at t=999
  capture_overhead
  edit_speed
  probing_speed
  probing_study
  shapes_edit               # the ShapesEdit benchmark
)
for b in "${benchmarks[@]}"; do
  [[ -n "$only" && "$b" != *"$only"* ]] && continue
  if [[ "$b" == shapes_text_path && -z "$only" ]] && "$PY" -m tools.shapes_model.train text-path-current; then
    # it trains its own UNets on the VAE's latents: a new UNet alone does not change it
    echo "== benchmarks.$b skipped: the VAE, tokenizer and scheduler it reads are those its record was measured on" >&2
    continue
  fi
  start=$(date +%s)
  echo "== benchmarks.$b" >&2
  "$PY" -m "benchmarks.$b"
  echo "== benchmarks.$b took $(( $(date +%s) - start )) s" >&2
done
"$PY" -m tools.shapes_model.train card --out attnlens/models/shapes
