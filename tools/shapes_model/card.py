"""The model card of an exported Shapes model: ``README.md`` written from recorded figures only.

:func:`write_card` reads the folder's own files (``training.json``, written by
``python -m tools.shapes_model.train export``, which carries a summary of the training logs and the
rebuild commands; the component configs; the safetensors headers and file sizes), the quality bar's
results (``benchmarks/results/shapes_quality.json``, written by ``python -m benchmarks.shapes_quality``) and the
oracle's accuracy (``benchmarks/results/oracle_accuracy.json``). No figure in the card is typed by
hand: every number comes from one of these files. The quality figures are shown only when the
results were measured on these exact weights (same :func:`fingerprint`) by a full (not ``--quick``)
run; otherwise the card says they are still to be measured and how.

    python -m tools.shapes_model.train card --out attnlens/models/shapes      # after the benchmark

This module imports nothing else from the tool (``train`` imports it): :func:`rebuild_commands` takes a new
run's defaults as an argument.
"""

from __future__ import annotations

import json
from pathlib import Path

from attnlens._identity import fingerprint, weight_sums  # noqa: F401 (the card's facts; kept importable here)
from attnlens._tokenizer import TOKENIZER_DIR
from attnlens.shapes._world import ATTRIBUTES, IMAGE_SIZE, MENTION_PROBABILITY

from . import EMBEDDED, EMBEDDED_OUT, RESULTS as RESULTS_DIR, WORKDIR

RESULTS = RESULTS_DIR / "shapes_quality.json"
ORACLE_RESULTS = RESULTS_DIR / "oracle_accuracy.json"
CONDITIONING = RESULTS_DIR / "shapes_conditioning.json"
POSITION_DIAGNOSIS = RESULTS_DIR / "shapes_position_diagnosis.json"
TEXT_PATH = RESULTS_DIR / "shapes_text_path.json"
PROBING = RESULTS_DIR / "probing_study.json"
SELF_ATTENTION = RESULTS_DIR / "shapes_self_attention.json"
CANDIDATES = RESULTS_DIR / "shapes_self_attention_candidates.csv"
# what benchmarks/shapes_text_path.py takes from a model folder (it trains its own UNets and text encoders):
# its record stays valid for a new UNet or text encoder trained on the same VAE
TEXT_PATH_INPUTS = ("vae", "tokenizer", "scheduler")
TOKENIZER_LICENSE = TOKENIZER_DIR / "LICENSE"


# ------------------------------------------------------------------------------------------ facts


def text_path_applies(record: dict, folder: str | Path) -> bool:
    """Whether a benchmarks/shapes_text_path.py record was measured on what it reads of ``folder``
    (:data:`TEXT_PATH_INPUTS`; a record without that fingerprint, on the whole folder)."""
    if "inputs_fingerprint" in record:
        return record["inputs_fingerprint"] == fingerprint(folder, TEXT_PATH_INPUTS)
    return record.get("model_fingerprint") == fingerprint(folder)


def _parameters(path: Path) -> int:
    """Number of parameters in a safetensors file, from its header alone (read by safetensors itself)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            count = 1
            for d in f.get_slice(name).get_shape():
                count *= d
            total += count
    return total


def summarize_log(path: str | Path, up_to: int | None = None) -> dict | None:
    """Summarise a training log (``WORKDIR/<stage>_log.jsonl``) up to step ``up_to`` (None if nothing was logged).

    Returns the number of runs (a run's clock ``s`` restarts when training resumes), the wall-clock
    seconds summed over runs, the first and last logged losses (mean of the last 10 entries) and every
    evaluation entry (lines without ``s``, e.g. the VAE's round trips).
    """
    path = Path(path)
    if not path.is_file():
        return None
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    entries = [e for e in entries if up_to is None or e.get("step", 0) <= up_to]
    timed = [e for e in entries if "s" in e]
    evals = [e for e in entries if "s" not in e]
    if not timed:  # nothing logged yet (runs shorter than the logging interval)
        return None
    seconds, runs, last = 0.0, 0, None
    for e in timed:
        if last is None or e["s"] < last:  # the clock restarted: a resumed run
            runs += 1
            seconds += last or 0.0
            last = None
        last = e["s"]
    seconds += last or 0.0
    key = next((k for k in ("loss", "rec") if k in timed[0]), None)
    tail = [e[key] for e in timed[-10:]] if key else []
    return {
        "log": path.name,
        "runs": runs,
        "wall_seconds": round(seconds, 1),
        "last_logged_step": timed[-1]["step"],
        "loss_name": key,
        "first_loss": timed[0][key] if key else None,
        "last_loss_mean_of_10": sum(tail) / len(tail) if tail else None,
        "evaluations": evals,
    }


# ------------------------------------------------------------------------------------------ card


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB, {n / 2**20:.2f} MiB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mark(ok) -> str:
    return {True: "met", False: "**not met**", None: "n/a"}[ok]


def _hours(seconds) -> str:
    return "not recorded" if not seconds else f"{seconds / 3600:.2f} h"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _quality_section(results: dict | None, folder: Path, results_path: Path) -> tuple[list[str], list[str]]:
    """The measured-quality lines and the list of targets not met."""
    embedded = folder.resolve() == EMBEDDED.resolve()
    cmd = "python -m benchmarks.shapes_quality" + ("" if embedded else f" --model {folder}")
    if results is None:
        return [f"Not measured yet: run `{cmd}`, then `python -m tools.shapes_model.train card --out {folder}`."], []
    if results.get("quick"):
        return [f"Only a `--quick` development run is recorded in `{results_path.name}`; run `{cmd}` (full) and "
                "regenerate this card."], []
    if results.get("model_fingerprint") != fingerprint(folder):
        return [f"`{results_path.name}` was measured on other weights (its fingerprint differs from this folder's); "
                f"run `{cmd}` and regenerate this card."], []
    r = results
    lines = [
        f"Measured by `{r['command']}` on {r['date']} ({r['machine']}): guidance scale {r['guidance']}, "
        f"{r['steps']} DDIM steps, batches of {r['batch']}, {r['prompt_list']['n_used']} prompt x seed pairs (list version "
        f"{r['prompt_list']['version']}, sha256 `{r['prompt_list']['sha256'][:12]}`), oracle readings. "
        f"Every figure below is copied from `benchmarks/results/{results_path.name}` by the card generator.",
        "",
        "| figure | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    failed = []
    v = r["vae_round_trip"]
    lines.append(f"| VAE round trip keeps all five attributes ({v['n']} renders) | {_pct(v['all_attributes'])} | "
                 f">= {_pct(v['target'])} | {_mark(v['pass'])} |")
    if v["pass"] is False:
        failed.append("VAE round trip")
    for k, d in r["prompted_accuracy"].items():
        lines.append(f"| prompted {k} read as named ({d['n']} images) | {_pct(d['accuracy'])} | >= {_pct(d['target'])} | "
                     f"{_mark(d['pass'])} |")
        if d["pass"] is False:
            failed.append(f"prompted {k} accuracy ({_pct(d['accuracy'])} < {_pct(d['target'])})")
    for k, d in r["unprompted_top_share"].items():
        lines.append(f"| {k} not prompted: most frequent value ({d['top_value']}, {d['n']} images) | "
                     f"{_pct(d['top_share'])} | <= {_pct(d['target_max'])} | {_mark(d['pass'])} |")
        if d["pass"] is False:
            failed.append(f"{k} collapses to {d['top_value']} when not prompted ({_pct(d['top_share'])})")
    s = r["shape_word_iou"]
    iou = "n/a" if s["mean_iou"] is None else f"{s['mean_iou']:.3f}"
    lines.append(f"| shape word's cross-attention vs object mask, mean IoU ({s['n']} images, Otsu threshold) | {iou} | "
                 f">= {s['target']} | {_mark(s['pass'])} |")
    if s["pass"] is False:
        failed.append(f"shape-word attention IoU ({iou} < {s['target']})")
    sp = r["speed"]
    main = sp["seconds_per_image"]["attnlens.load_pipeline"]
    lines.append(f"| seconds per image, batch {sp['batch']}, {sp['threads']} threads | {main:.3f} | <= {sp['target']} | "
                 f"{_mark(sp['pass'])} |")
    if sp["pass"] is False:
        failed.append(f"speed ({main:.2f} s per image > {sp['target']} s)")
    lines += ["", f"The oracle found an object in {_pct(r['found_rate'])} of the generated images. Speed beside a plain "
              "diffusers call in the same run: " + ", ".join(f"{m} {x:.3f} s" for m, x in sp["seconds_per_image"].items())
              + f" per image (1-minute load average {sp['load_average_1min_before']:.2f} before, "
              f"{sp['load_average_1min_after']:.2f} after). IoU with other threshold rules: "
              + ", ".join(f"{k} {'n/a' if x is None else f'{x:.3f}'}" for k, x in s["mean_iou_other_rules"].items()) + "."]
    return lines, failed


def _conditioning_section(cond: dict | None, folder: Path) -> list[str]:
    """Which attribute words the model uses: the denoising-loss gap of benchmarks/shapes_conditioning.py."""
    if cond is None or cond.get("model_fingerprint") != fingerprint(folder):
        return []
    steps = [str(t) for t in cond["timesteps"]]
    lines = [
        "",
        "### Does the model use each word?",
        "",
        f"The relative rise of the denoising error when the prompt names a wrong value of the attribute instead of the "
        f"right one (`{cond['command']}`, {cond['n_per_attribute']} rendered scenes per attribute, 95% interval over "
        "scenes). A gap of zero means the model ignores the word at that noise level.",
        "",
        "| attribute | " + " | ".join(f"t={t}" for t in steps) + " |",
        "| --- |" + " --- |" * len(steps),
    ]
    for a, r in cond["attributes"].items():
        cells = [r["timesteps"][t] for t in steps]
        lines.append(f"| {a} | " + " | ".join(f"{c['gap']:+.1%} ({c['ci_low']:+.1%} to {c['ci_high']:+.1%})"
                                                for c in cells) + " |")
    return lines


def _probing_section(study: dict | None, folder: Path) -> list[str]:
    """What the attention maps carry: the claims of benchmarks/probing_study.py as its record states them
    (each a test with a threshold written before the run, and its verdict), for these weights only."""
    if study is None or "claims" not in study or study.get("model_fingerprint") != fingerprint(folder):
        return []
    lines = [
        "",
        "### What the attention maps carry (the paper's claims, tested)",
        "",
        f"Probes on the attention maps of {study['generations']} generations (`{study['command']}`; the best site "
        f"chosen on half of the prompts, its accuracy measured on the other half; {', '.join(study['probes'])} "
        "probes). Each claim is a test fixed before the run, with the result that would contradict it; the "
        "verdict is agrees / disagrees / inconclusive from the 95% interval of the difference over paired folds.",
        "",
        "| claim | test | contradicted by | measured (95% interval) | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in study["claims"]:
        lo, hi = c["interval"]
        lines.append(f"| {c['claim']} | {c['test']} | {c['contradicted_by']} | {c['difference']:+.2f} "
                     f"({lo:+.2f} to {hi:+.2f}) | {c['verdict']} |")
    return lines


def _self_attention_section(record: dict | None, folder: Path, candidates: Path) -> list[str]:
    """Issue 17's targets (does the model use its self-attention, and does FPE keep structure on it?) as
    benchmarks/shapes_self_attention.py recorded them for these weights (a full run, not ``--quick``), the
    ablation per level, and the table of candidate recipes tried so far."""
    if record is None or record.get("model_fingerprint") != fingerprint(folder) or record.get("quick"):
        return []
    t = record["targets"]
    lines = ["", "### Does the model use its self-attention? (the paper's editing finding, tested)", "",
             f"`{record['command']}`: fully described prompts generated with groups of attention layers zeroed, and "
             "under-specified edits (position and size unnamed) made with `none` and `fpe`. Each target is a rule "
             "fixed before the run.", "", "| target | rule | measured | met |", "| --- | --- | --- | --- |"]
    if "load_bearing_self_attention" in t:
        x = t["load_bearing_self_attention"]
        lines.append(f"| load-bearing self-attention | {x['rule']} | {x['readings_changed']} of {x['images']} readings "
                     f"changed | {_mark(x['pass'])} |")
    if "free_structure" in t:
        x = t["free_structure"]
        lines.append(f"| free structure | {x['rule']} | `none` kept {_pct(x['kept'])} of {x['n']} | {_mark(x['pass'])} |")
    if "fpe_keeps_structure" in t:
        x = t["fpe_keeps_structure"]
        lines.append(f"| FPE keeps structure | {x['rule']} | kept {_pct(x['kept'])}, edit read as the target "
                     f"{_pct(x['success'])} of {x['n']} | {_mark(x['pass'])} |")
    for name, x in (record.get("diagnostics") or {}).items():
        lines.append(f"| diagnostic: {name.replace('_', ' ')} (not a target) | - | kept {_pct(x['kept'])}, "
                     f"success {_pct(x['success'])} of {x['n']} | - |")
    lines += ["", "Ablation (mean absolute pixel change 0..1; oracle readings changed):", "",
              "| layers zeroed | layers | pixel change | readings changed |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['group']} | {r['n_layers']} | {r['pixel_change']:.3f} | {r['readings_changed']} of {r['images']} |"
              for r in record["ablation"]]
    if candidates.exists():
        import csv

        with candidates.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            lines += ["", f"Candidate recipes tried for a model whose self-attention carries the layout "
                          f"(`benchmarks/results/{candidates.name}`, short runs; see its .md for how each was run):", "",
                      "| run | recipe | UNet step | weights | FPE layers zeroed: pixel change | readings changed | "
                      "`none` kept | `fpe` kept | `fpe` success | `fpe` every level kept | structure rule |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['run']} | {r['recipe']} | {r['unet_step']} | {r.get('weights') or 'raw'} | "
                      f"{r.get('fpe_self_pixel_change', '')} | {r.get('fpe_self_readings_changed', '')} | "
                      f"{r.get('none_kept', '')} | {r.get('fpe_kept', '')} | {r.get('fpe_success', '')} | "
                      f"{r.get('fpe_every_level_kept') or '-'} | {r.get('structure_rule') or 'raw area'} |" for r in rows]
    return lines


POSITION_USED_GAP = 0.01
"""A model uses its position words when, at some noise level, the lower end of the 95% interval of
benchmarks/shapes_conditioning.py's position gap is above this (1% of the denoising error)."""


def position_words_used(cond: dict | None, folder: Path) -> bool | None:
    """Whether the conditioning benchmark, measured on these weights, shows the model using position words
    (None when it was not measured on them)."""
    if cond is None or cond.get("model_fingerprint") != fingerprint(folder) or "position" not in cond["attributes"]:
        return None
    return max(c["ci_low"] for c in cond["attributes"]["position"]["timesteps"].values()) > POSITION_USED_GAP


def _position_section(diag: dict | None, folder: Path, text_path: dict | None = None,
                      used: bool | None = None) -> list[str]:
    """What the position diagnosis (benchmarks/shapes_position_diagnosis.py) and the text-path training
    (benchmarks/shapes_text_path.py) measured on these weights (the text-path record on this VAE,
    tokenizer and scheduler: :data:`TEXT_PATH_INPUTS`). ``used`` (:func:`position_words_used`)
    picks the verdicts: where position is lost when the model ignores its position words, why the recipe
    had to help when it uses them."""
    if diag is None or diag.get("model_fingerprint") != fingerprint(folder):
        return []
    text = diag["text_distance"]
    r2 = diag["query_position_r2"]
    t = str(diag["timesteps"][0])
    best = max(r2, key=lambda name: r2[name][t]["inner_half"])
    distances = (f"`{diag['command']}`: the text encoder's states for prompts that differ in one value are, on average, "
                 "this far apart: " + ", ".join(f"{a} {d:.2f}" for a, d in text.items()) + ". The UNet's cross-attention "
                 f"queries know where they are: at t={t}, a ridge regression from the queries of `{best}` "
                 f"({r2[best]['grid']}) to their grid coordinates scores a held-out R^2 of {r2[best][t]['all']:.2f} "
                 f"({r2[best][t]['inner_half']:.2f} away from the border).")
    L = ["", "### Position words" if used else "### Where position is lost", ""]
    if used:
        L.append(distances + " This model uses its position words (the gap above); the measurements below say why a "
                 "recipe has to help it to.")
    else:
        L.append(distances + " So the position words are lost on the text side: the encoder maps them to nearly the "
                 "same states (whether as the cause or as a consequence of the UNet never using them, this measurement "
                 "does not say).")
    norms, detect = diag.get("embedding_norm"), diag.get("latent_detectability")
    if norms:
        L.append("")
        L.append("The position words' input embeddings have a mean norm of " if used else
                 "The position words' input embeddings have hardly moved: their mean norm is ")
        L[-1] += (f"{norms['position']:.3f}, against {norms['unseen_tokens']:.3f} for tokens no prompt contains (still "
                  "at their random initialisation) and " + ", ".join(f"{a} {norms[a]:.3f}" for a in ATTRIBUTES
                                                                      if a != "position" and a in norms)
                  + " for the other attributes' words"
                  + (f"; and the five position words are {norms['spread']['position']:.3f} apart on average, against "
                     f"{norms['spread']['unseen_tokens']:.3f} for two untouched tokens and "
                     + ", ".join(f"{a} {d:.3f}" for a, d in norms["spread"].items() if a in ATTRIBUTES and a != "position")
                     + " for the values of the other attributes" if "spread" in norms else "")
                  + ("." if used else ": training never pulled them anywhere."))
    if detect:
        L.append("")
        L.append(f"Position is no harder to see than colour in the noisy latent: at SD's noisiest training step "
                 f"(t={detect['timesteps'][0]}) a matched filter tells a centered object from one on the left with "
                 f"d' = {detect['position']['d_prime'][0]:.2f}, and a change of colour with d' = "
                 f"{detect['colour']['d_prime'][0]:.2f}. Both are plain in the UNet's input at every training step"
                 + ("." if used else ", yet only colour words are learnt."))
    shares = diag.get("mean_image_share")
    if shares:
        lat, pix = shares["latent"], shares["pixels"]
        L.append("")
        L.append(f"What a word says on its own (over {shares['n_scenes']:,} random renders): each attribute's mean image "
                 "explains this share of the variance of the scaled latent: "
                 + ", ".join(f"{a} {max(lat[a], 0.0):.1%}" for a in ATTRIBUTES)  # bias correction can dip below 0
                 + " (of the pixels: " + ", ".join(f"{a} {max(pix[a], 0.0):.1%}" for a in ATTRIBUTES) + "). Position adds "
                 f"{lat['position_given_colour_background']:.1%} of the latent's variance once colour and background "
                 "are known. At the noisiest steps denoising is a regression to exactly these conditional means, so a "
                 "position word on its own moves the prediction almost nowhere: the eight object colours average to a "
                 "gray close to the average background, and where the object is matters only jointly with its colour "
                 "and background, an interaction training has to find, whereas a colour word pays off on its own.")
    if text_path and text_path_applies(text_path, folder):
        last = {arm: history[-1] for arm, history in text_path["arms"].items()}
        L.append("")
        L.append(f"The UNet can learn that interaction; a CLIP text encoder trained from scratch does not pass it on. "
                 f"`{text_path['command']}` trains this UNet architecture from scratch for {text_path['steps']} steps at "
                 f"t={text_path['timestep']} only (where the prompt is all there is to go by) on latents of this VAE, once "
                 "behind a fresh CLIP text encoder of this shape and once behind a plain word table (each token's own "
                 "embedding and a layer norm, nothing mixed between tokens). Swapping the position word then makes the "
                 f"x0 prediction {last['word_table']['position']:.1%} worse behind the word table, and changes it by "
                 f"{last['clip']['position']:+.1%} behind CLIP; swapping the colour word makes it "
                 f"{last['word_table']['colour']:.1%} and {last['clip']['colour']:.1%} worse.")
        table = last.get("clip_table_start")
        if table:
            L[-1] += (f" A third arm starts the same CLIP encoder as a word table (zero position embedding and residual "
                      f"output projections) and keeps its layers frozen for {text_path['table_steps']} steps before "
                      f"training them for {text_path['steps']} more: swapping the position word then makes the "
                      f"prediction {table['position']:.1%} worse, the colour word {table['colour']:.1%}"
                      + (". The recipe above starts its text encoder that way." if used else "."))
    return L


def _change(key: str, old, new) -> str:
    """One recipe change as the card states it."""
    if key == "resumed_from_pack":  # see tools.shapes_model.train.pack
        return ("resumed on another machine from the run's packed copy (weights and EMA rounded to fp16 once, "
                "Adam's first moment restarted at zero)")
    return f"{key} {old} -> {new}"


def render_card(folder: str | Path, results_path: str | Path = RESULTS, oracle_path: str | Path = ORACLE_RESULTS,
                conditioning_path: str | Path = CONDITIONING, diagnosis_path: str | Path = POSITION_DIAGNOSIS,
                text_path_path: str | Path = TEXT_PATH, probing_path: str | Path = PROBING,
                self_attention_path: str | Path = SELF_ATTENTION, candidates_path: str | Path = CANDIDATES) -> str:
    """The card's Markdown text for the exported model in ``folder``."""
    folder, results_path = Path(folder), Path(results_path)
    training = _read_json(folder / "training.json")
    if training is None:
        raise FileNotFoundError(f"{folder / 'training.json'} is missing: the card is written for a folder made by "
                                "`python -m tools.shapes_model.train export`")
    unet_cfg = _read_json(folder / "unet" / "config.json") or {}
    vae_cfg = _read_json(folder / "vae" / "config.json") or {}
    text_cfg = _read_json(folder / "text_encoder" / "config.json") or {}
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json") or {}
    results = _read_json(results_path)
    oracle = _read_json(Path(oracle_path))

    comp_rows, total_params = [], 0
    for comp in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        files = [f for f in sorted((folder / comp).glob("*")) if f.is_file()]
        size = sum(f.stat().st_size for f in files if not f.is_symlink())
        params = sum(_parameters(f) for f in files if f.suffix == ".safetensors")
        total_params += params
        comp_rows.append(f"| {comp} | {params:,} | {size:,} bytes ({_mb(size)}) |")
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink() and f.name != "README.md")
    links = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_symlink())
    linked = sum(f.stat().st_size for f in folder.rglob("*") if f.is_symlink() and f.is_file())

    levels = len(unet_cfg.get("block_out_channels", []))
    latent = unet_cfg.get("sample_size")
    attn_grids = [f"{latent // 2**i}x{latent // 2**i}" for i, t in enumerate(unet_cfg.get("down_block_types", []))
                  if t.startswith("CrossAttn")] if latent else []
    if latent and unet_cfg.get("mid_block_type", "").endswith("CrossAttn"):
        attn_grids.append(f"{latent // 2 ** (levels - 1)}x{latent // 2 ** (levels - 1)} (mid block)")
    cfg, vae = training.get("config", {}), training.get("vae", {})
    vcfg = vae.get("config", {})
    logs = training.get("logs", {})
    ulog, vlog = logs.get("unet"), logs.get("vae")
    quality, failed = _quality_section(results, folder, results_path)
    seed = training.get("seed")
    guidance = results["guidance"] if results and not results.get("quick") else None
    out = EMBEDDED_OUT if folder.resolve() == EMBEDDED.resolve() else str(folder)

    L = [
        "# Shapes: the embedded model of attnlens",
        "",
        "<!-- Written by `python -m tools.shapes_model.train card` (tools/shapes_model/card.py) from training.json, the "
        "component files and benchmarks/results/*.json. Do not edit by hand: regenerate. -->",
        "",
        f"A Stable Diffusion 1.x-architecture `StableDiffusionPipeline` ({IMAGE_SIZE}x{IMAGE_SIZE} images) trained "
        "from scratch by attnlens's own script on the procedural Shapes world, in which every attribute of every "
        "image is known, so that generations, attention probes and edits can be scored exactly by the world's "
        "oracle (`attnlens.shapes.oracle.read`). It is the model `attnlens.load_pipeline()` loads with no "
        "argument, offline. It runs through the same diffusers code paths as real SD 1.x; nothing in attnlens "
        "special-cases it.",
        "",
        "```python",
        "import torch, attnlens",
        "pipe = attnlens.load_pipeline()  # this folder",
        f"image = pipe(\"a small red star on the left\", num_inference_steps=25, guidance_scale={guidance or 7.5},",
        "             generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
        "",
        "## Architecture and size",
        "",
        f"- UNet: `UNet2DConditionModel`, {unet_cfg.get('in_channels')}x{latent}x{latent} latents, channels "
        f"{unet_cfg.get('block_out_channels')}, {unet_cfg.get('layers_per_block')} layers per block, "
        f"{unet_cfg.get('attention_head_dim')} heads per attention layer (diffusers' `attention_head_dim`), "
        f"self- and cross-attention at {', '.join(attn_grids)}, cross-attention width "
        f"{unet_cfg.get('cross_attention_dim')}.",
        f"- Text encoder: `CLIPTextModel` trained here, width {text_cfg.get('hidden_size')}, "
        f"{text_cfg.get('num_hidden_layers')} layers, {text_cfg.get('num_attention_heads')} heads, "
        f"{text_cfg.get('max_position_embeddings')} positions, vocabulary {text_cfg.get('vocab_size'):,}; the real "
        "CLIP tokenizer of SD 1.x, so prompts tokenize exactly as in SD 1.x.",
        f"- VAE: `AutoencoderKL`, channels {vae_cfg.get('block_out_channels')}, {vae_cfg.get('layers_per_block')} "
        f"layer per block, {vae_cfg.get('sample_size')}x{vae_cfg.get('sample_size')}x3 to "
        f"{vae_cfg.get('latent_channels')}x{latent}x{latent}, scaling factor {vae_cfg.get('scaling_factor')}.",
        f"- Scheduler: `{sched_cfg.get('_class_name')}`, {sched_cfg.get('beta_schedule')} betas "
        f"{sched_cfg.get('beta_start')} to {sched_cfg.get('beta_end')} over {sched_cfg.get('num_train_timesteps')} "
        f"steps, {sched_cfg.get('prediction_type')} prediction (SD 1.x's training schedule).",
        f"- Weights stored in fp16 safetensors (loaded as fp32 on CPU, fp16 on CUDA by `load_pipeline`).",
        "",
        "| component | parameters | on disk |",
        "| --- | --- | --- |",
        *comp_rows,
        f"| **total** (folder, without this card) | {total_params:,} | {total:,} bytes ({_mb(total)}) |",
        "",
        *([f"The tokenizer files {', '.join(f'`{x}`' for x in links)} ({linked:,} bytes, {_mb(linked)}) are links to "
           "the package's own copy in `attnlens/tokenizer/`, kept once in the repository; a wheel or a copy with "
           "`cp -L` holds the files themselves.", ""] if links else []),
        "## Training data",
        "",
        f"Renders of the Shapes world (`attnlens.shapes`): one anti-aliased object on a plain background, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}, with small jitters of position, rotation and scale. Attributes and values: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in ATTRIBUTES.items()) + ". "
        "Each image's prompt comes from templates with varied word order, position phrases and prefixes "
        "(\"a photo of a large yellow heart at the top\"); each attribute is named with probability "
        + ", ".join(f"{k} {p:.2f}" for k, p in MENTION_PROBABILITY.items())
        + ", so unnamed attributes are learnt as free. The data stream is a pure function of the seed "
        f"(`ShapesDataset`, seed {seed} for the VAE and {None if seed is None else seed + 1} for the UNet): "
        "nothing is downloaded.",
        "",
        "## Recipe",
        "",
        f"1. **VAE** ({vae.get('step', 'n/a')} steps, batch {vcfg.get('batch')}, AdamW lr {vcfg.get('lr')} with "
        f"{vcfg.get('warmup')} warm-up steps and cosine decay): L1 + L2 reconstruction with object pixels weighted "
        f"x{1 + vcfg['object_weight'] if 'object_weight' in vcfg else 'n/a'}, KL weight {vcfg.get('kl_weight')}. "
        f"Wall-clock {_hours(vlog and vlog['wall_seconds'])} over {vlog['runs'] if vlog else 'n/a'} run(s); last "
        f"reconstruction loss {vlog['last_loss_mean_of_10']:.4f} (mean of the last 10 logged)."
        if vlog else f"1. **VAE** ({vae.get('step', 'n/a')} steps; training log not recorded at export).",
    ]
    if vlog and vlog["evaluations"]:
        ev = vlog["evaluations"][-1]
        L.append(f"   Oracle round trip of 256 held-out renders at step {ev['step']}: all attributes kept on "
                 f"{_pct(ev['round_trip'].get('all'))}.")
    L += [
        f"2. **Text encoder + UNet** ({_unet_steps(training)}, batch {cfg.get('batch')}, AdamW lr "
        f"{cfg.get('lr')} with {cfg.get('warmup')} warm-up steps and cosine decay, classifier-free-guidance dropout "
        f"{cfg.get('cfg_dropout')}, min-SNR-gamma {cfg.get('min_snr_gamma')} loss weighting"
        + (f" with an x0-weight floor of {cfg['snr_floor']}" if cfg.get("snr_floor") else "")
        + (f", latents scaled to std {cfg['latent_std']} (every signal-to-noise ratio of SD's schedule times "
           f"{cfg['latent_std'] ** 2:.4g})" if cfg.get("latent_std", 1.0) != 1.0 else "")
        + (f", the text encoder started as a word table (zero position embedding and residual output "
           f"projections, its layers frozen for the first {cfg['text_table_steps']} steps)"
           if cfg.get("text_table_steps") else "") + ", EMA decay "
        f"{cfg.get('ema_decay')}; {'EMA' if training.get('ema') else 'raw'} weights exported): the standard "
        f"{'v' if cfg.get('prediction_type') == 'v_prediction' else 'epsilon'}-prediction denoising loss only. "
        "Nothing supervises attention."
        + (f" Wall-clock {_hours(ulog['wall_seconds'])} over {ulog['runs']} run(s); loss {ulog['first_loss']:.3f} "
           f"at the first logged step, {ulog['last_loss_mean_of_10']:.3f} at the end (mean of the last 10 logged)."
           if ulog else " Training log not recorded at export."),
    ]
    changes = training.get("recipe_changes") or []
    if changes:
        L.append("   The recipe changed during training (each change took effect when a run resumed at that step): "
                 + "; ".join(f"step {c['step']}: " + ", ".join(_change(k, a, b) for k, (a, b) in c["changed"].items())
                             for c in changes) + ".")
    L += [
        "",
        "## Measured quality",
        "",
        *quality,
        *_conditioning_section(_read_json(Path(conditioning_path)), folder),
        *_probing_section(_read_json(Path(probing_path)), folder),
        *_self_attention_section(_read_json(Path(self_attention_path)), folder, Path(candidates_path)),
        *_position_section(_read_json(Path(diagnosis_path)), folder, _read_json(Path(text_path_path)),
                           position_words_used(_read_json(Path(conditioning_path)), folder)),
    ]
    if oracle:
        acc = oracle["conditions"]["clean"]["accuracy"]
        L += ["", f"The oracle itself reads held-out renders ({oracle['n']}) with per-attribute accuracy "
              + ", ".join(f"{k} {_pct(v)}" for k, v in acc.items()) + " (`benchmarks/results/oracle_accuracy.json`)."]
    L += [
        "",
        "## Limitations",
        "",
        "- It knows only the Shapes world: one object, the listed attribute values, the prompt templates. Words "
        "outside that vocabulary have untrained embeddings; several objects, textures or other sizes were never seen.",
        f"- {IMAGE_SIZE}x{IMAGE_SIZE} images from {latent}x{latent} latents: its attention maps are at most "
        f"{latent}x{latent}, far coarser than SD 1.5's 64x64.",
        "- Quality is measured by the world's oracle, not by people; the oracle has its own (measured) error.",
    ]
    L += [f"- Target not met: {f}." for f in failed]
    L += [
        "",
        "## Licenses",
        "",
        "- Weights: trained by the attnlens project from procedurally generated data; released under the "
        "project's MIT license.",
        "- Tokenizer (`tokenizer/vocab.json`, `tokenizer/merges.txt`): derived from OpenAI CLIP's BPE list "
        "(`bpe_simple_vocab_16e6.txt.gz`), MIT license, Copyright (c) 2021 OpenAI; see `tokenizer/LICENSE`.",
        "",
        "## Rebuild",
        "",
        "```bash",
        *(_recorded_rebuild(training, out) or ["# training.json records no rebuild commands: "
                                               "`python -m tools.shapes_model.train card` writes them"]),
        f"python -m benchmarks.shapes_quality{'' if out == EMBEDDED_OUT else ' --model ' + out}"
        + (f" --guidance {guidance}" if guidance not in (None, 7.5) else ""),
        f"python -m tools.shapes_model.train card --out {out}",
        "```",
        "",
        f"Run from a source checkout of the repository (the training tool, `tools/shapes_model/`, is not part of the "
        f"package). Each stage resumes from its checkpoint in `{WORKDIR}`. `training.json` in this folder records the "
        "configs, seeds, steps, a summary of the training logs, these commands (`load_pipeline` prints them when "
        "the folder is damaged) and the SHA-256 of every weight file (`load_pipeline` checks them).",
        "",
    ]
    return "\n".join(L)


# the recipe fields train.py's command line sets (the rest of UNetConfig is fixed in code)
_UNET_FLAGS = ("prediction_type", "text_table_steps", "snr_floor", "latent_std",
               # the architecture levers (issue 17's candidates); a resumed run takes them from its checkpoint
               "layers_per_block", "transformer_layers", "attention_levels")


def _value(v) -> str:
    """A flag's value as the command line takes it (a sequence as space-separated items)."""
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


OUT = "{out}"
"""Stands for the model folder in the recorded rebuild commands (the loader puts the folder it loads there)."""
TRAIN = "python -m tools.shapes_model.train"


def rebuild_commands(training: dict, defaults, stage: str = "unet") -> list[dict[str, str]]:
    """The commands that rebuild the exported folder ``training.json`` describes, as recorded in its
    ``"rebuild"`` entry: ``[{"command": ..., "note": ...}, ...]`` for the VAE stage, each schedule of the
    denoiser ``stage`` (``"unet"`` or ``"dit"``; :func:`unet_commands`) and the export; :data:`OUT` stands for
    the folder. ``defaults`` is a new run's config of that stage (the recipe flags that differ from it are
    named)."""
    seed = training.get("seed", 0)
    vae = training.get("vae") if isinstance(training.get("vae"), dict) else {}
    rows = [(f"{TRAIN} vae --workdir {WORKDIR} --steps {vae.get('step', 'STEPS')} --seed {seed}", "")]
    rows += unet_commands(training, seed, defaults, stage)
    which = "" if stage == "unet" else f" --denoiser {stage}"
    rows.append((f"{TRAIN} export{which} --workdir {WORKDIR} --out {OUT}", ""))
    return [{"command": command, "note": note} for command, note in rows]


def _recorded_rebuild(training: dict, out: str) -> list[str]:
    """The recorded rebuild commands as shell lines for ``out`` (empty if none are recorded)."""
    rows = training.get("rebuild") or []
    return [r["command"].replace(OUT, out) + (f"   # {r['note']}" if r.get("note") else "") for r in rows]


def unet_commands(training: dict, seed, defaults, stage: str = "unet") -> list[tuple[str, str]]:
    """``(command, note)`` for each ``train unet`` (or ``train dit``: ``stage``) command that rebuilds the run
    ``training.json`` records: the recipe flags that differ from ``defaults`` (a new run's config; flags the
    stage's config lacks are left out), and one command per
    schedule when the run was resumed with another ``--steps`` (each continues the last one's checkpoint,
    as the run did). ``note`` says where to stop, or is empty."""
    config = dict(training.get("config") or {})
    changes = sorted(training.get("recipe_changes") or [], key=lambda c: c["step"])
    for c in reversed(changes):  # the values the run started with
        for key, (old, _new) in c["changed"].items():
            if key in _UNET_FLAGS:
                config[key] = old
    base = f"{TRAIN} {stage} --workdir {WORKDIR}"
    first = "".join(f" {_flag(k)} {_value(config[k])}" for k in _UNET_FLAGS
                    if k in config and hasattr(defaults, k) and _value(config[k]) != _value(getattr(defaults, k)))
    final = training.get(f"{stage}_total_steps") or training.get(f"{stage}_step")
    commands, flags = [], first
    for i, c in enumerate(changes):
        changed = {k: v for k, v in c["changed"].items() if k in _UNET_FLAGS or k == "total_steps"}
        if not changed:
            continue
        # the schedule in force before this change: the old side of the next change of total_steps
        total = next((d["changed"]["total_steps"][0] for d in changes[i:] if "total_steps" in d["changed"]), final)
        commands.append((f"{base} --steps {total} --seed {seed}{flags}",
                         "" if total == c["step"] else f"stopped at step {c['step']}"))
        flags = "".join(f" {_flag(k)} {new}" for k, (_old, new) in changed.items() if k in _UNET_FLAGS)
    commands.append((f"{base} --steps {final} --seed {seed}{flags}",
                     f"this export is its checkpoint at step {training.get(f'{stage}_step')}"
                     if _intermediate(training, stage) else ""))
    return commands


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _intermediate(training: dict, stage: str = "unet") -> bool:
    total = training.get(f"{stage}_total_steps")
    return bool(total) and training.get(f"{stage}_step", 0) < total


def _unet_steps(training: dict) -> str:
    if _intermediate(training):
        return (f"**an intermediate export**: step {training.get('unet_step')} of a {training.get('unet_total_steps')}-step "
                "schedule, whose learning rate had not yet decayed; training continues and a later export replaces it")
    return f"{training.get('unet_step')} steps"


def write_card(folder: str | Path, results_path: str | Path = RESULTS, oracle_path: str | Path = ORACLE_RESULTS) -> Path:
    """Write ``README.md`` into an exported model folder; return the card's path. (``train card`` also
    refreshes the folder's rebuild commands and ``tokenizer/LICENSE`` first.)"""
    folder = Path(folder)
    text = render_card(folder, results_path, oracle_path)
    path = folder / "README.md"
    path.write_text(text)
    return path
