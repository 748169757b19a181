"""The embedded Shapes model's development tool: training, packing a run, exporting, the model card.

This is repository tooling, not runtime: it lives outside the ``attnlens`` package (the wheel does not
contain it) and knows the repository's layout, which the package does not. Its stages::

    python -m tools.shapes_model.train vae     --workdir runs/shapes --steps 3000
    python -m tools.shapes_model.train unet    --workdir runs/shapes --steps 14000
    python -m tools.shapes_model.train export  --workdir runs/shapes --out attnlens/models/shapes
    python -m tools.shapes_model.train card    --out attnlens/models/shapes
    python -m tools.shapes_model.train pack    --workdir runs/shapes
    python -m tools.shapes_model.train unpack  --workdir runs/shapes
    python -m tools.shapes_model.train text-path-current   # exit 0 if the text-path record fits the model
    python -m tools.shapes_model.train dit     --workdir runs/shapes --steps 14000 --device cuda
    python -m tools.shapes_model.train export  --denoiser dit --workdir runs/shapes --out attnlens/models/shapes-dit

``dit`` trains the Shapes DiT (PixArt-alpha's architecture with a T5 encoder, on the same VAE stage; see
``train.DiTConfig`` and the ``train`` module's docstring for the full recipe), which
``attnlens.load_pipeline("shapes-dit")`` loads from ``attnlens/models/shapes-dit``.

``export`` and ``card`` write the model folder's ``training.json`` with its own rebuild commands
(``"rebuild"``), which ``attnlens.load_pipeline`` prints for a damaged folder without importing this tool.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (this tool lives at ``tools/shapes_model/``)."""
RESULTS = REPO / "benchmarks" / "results"
"""Where the benchmarks write the records the card copies its figures from."""
CHECKPOINTS = REPO / "checkpoints"
"""Committed training state: the finished VAE stage and, while a run must resume elsewhere, its pack."""
EMBEDDED = REPO / "attnlens" / "models" / "shapes"
"""The embedded model's folder in this checkout (what ``attnlens.load_pipeline()`` loads by default)."""
EMBEDDED_OUT = "attnlens/models/shapes"
"""How commands name the embedded model's folder (relative to the repository root, where they run)."""
WORKDIR = "runs/shapes"
"""The training work directory the rebuild commands use."""
