#!/usr/bin/env bash
# Rerun every benchmark whose results depend on the embedded Shapes model, one after another on an idle
# machine, then rewrite the model card from their results. Run it after exporting a new model into
# attnlens/models/shapes (python -m attnlens.shapes.train export --workdir W --out attnlens/models/shapes).
# About an hour on 2 CPU cores. Each benchmark writes benchmarks/results/; nothing else runs meanwhile,
# since the timing figures (capture overhead, edit and probing speed) are ratios measured in one run.
#
#   scripts/rebench.sh            # everything
#   scripts/rebench.sh quality    # only the benchmarks whose names contain "quality"
#
# shapes_text_path.py is skipped when the VAE, tokenizer and scheduler it reads are those it was measured
# on (a new UNet alone); name it to run it anyway: scripts/rebench.sh text_path
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
only=${1:-}
benchmarks=(
  shapes_quality.py            # the quality bar (the card's main table)
  shapes_conditioning.py       # does the model use each word (denoising-loss gaps)
  shapes_position_diagnosis.py # where position words are lost, if they are
  shapes_text_path.py          # CLIP vs word table vs table start, trained at t=999
  capture_overhead.py
  edit_speed.py
  probing_speed.py
  probing_study.py
  shapes_edit.py               # the ShapesEdit benchmark
)
for b in "${benchmarks[@]}"; do
  [[ -n "$only" && "$b" != *"$only"* ]] && continue
  if [[ "$b" == shapes_text_path.py && -z "$only" ]] && "$PY" - <<'PY'
import json, sys
import attnlens
from attnlens.shapes.card import TEXT_PATH, text_path_applies
record = json.loads(TEXT_PATH.read_text()) if TEXT_PATH.exists() else None
sys.exit(not (record and text_path_applies(record, attnlens._pipeline.EMBEDDED_MODEL)))
PY
  then  # it trains its own UNets on the VAE's latents: a new UNet alone does not change it
    echo "== benchmarks/$b skipped: the VAE, tokenizer and scheduler it reads are those its record was measured on" >&2
    continue
  fi
  start=$(date +%s)
  echo "== benchmarks/$b" >&2
  "$PY" "benchmarks/$b"
  echo "== benchmarks/$b took $(( $(date +%s) - start )) s" >&2
done
"$PY" -m attnlens.shapes.train card --out attnlens/models/shapes
