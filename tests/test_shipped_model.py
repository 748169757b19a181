"""The shipped Shapes model loads offline and generates; missing or damaged weights are named, with how to rebuild.

The damage tests build their folder from a tiny pipeline saved with ``save_pretrained`` (not from
``runs/``, which is not in git).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attnlens._pipeline as pipeline_module
from attnlens import AttnlensError, load_pipeline
from attnlens._pipeline import EMBEDDED_MODEL
from tools.shapes_model.card import fingerprint, render_card, summarize_log, weight_sums
from tools.shapes_model.train import record_rebuild

SIZE_LIMIT = 25_000_000  # issue 3: "at most 25 MB in total" (the model's own files: the CLIP tokenizer files are a
# copy of the package's attnlens/tokenizer, real files since issue 21 (no symlinks), not part of the model)


def _as_export(folder: Path) -> None:
    """Give a folder the training.json an export writes (steps, seed, weight checksums, rebuild commands)."""
    record = {"unet_step": 6000, "seed": 0, "ema": True, "config": {}, "vae": {"step": 3000, "config": {}, "seed": 0},
              "logs": {}, "sha256": weight_sums(folder)}
    _write_record(folder, record)


def _write_record(folder: Path, record: dict) -> None:
    """Write ``training.json`` and have the training tool record its rebuild commands, as export does."""
    (folder / "training.json").write_text(json.dumps(record))
    record_rebuild(folder)


# ------------------------------------------------------------------------------------------ shipped


def test_shipped_model_loads_offline_and_generates_in_seconds(tmp_path):
    script = textwrap.dedent("""
        import json, time, torch, attnlens
        t0 = time.perf_counter()
        pipe = attnlens.load_pipeline(device="cpu")
        t1 = time.perf_counter()
        image = pipe("a red star on the left", num_inference_steps=10, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(0)).images[0]
        t2 = time.perf_counter()
        print(json.dumps({"size": list(image.size), "load": t1 - t0, "generate": t2 - t1,
                          "unet": type(pipe.unet).__name__}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "ATTNLENS_MODEL"}
    # no network and an empty hub cache: nothing may come from the hub
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["size"] == [64, 64] and out["unet"] == "UNet2DConditionModel"
    assert out["load"] < 30 and out["generate"] < 30, out


def test_shipped_model_is_small_has_its_card_and_checksums():
    assert (EMBEDDED_MODEL / "model_index.json").exists(), "the embedded Shapes model is missing from attnlens/models/shapes"
    files = [f for f in EMBEDDED_MODEL.rglob("*") if f.is_file()]
    shared = {EMBEDDED_MODEL / "tokenizer" / n for n in ("vocab.json", "merges.txt", "LICENSE")}
    assert sum(f.stat().st_size for f in files if f not in shared) <= SIZE_LIMIT
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    record = json.loads((EMBEDDED_MODEL / "training.json").read_text())
    assert record["sha256"] == weight_sums(EMBEDDED_MODEL)
    card = (EMBEDDED_MODEL / "README.md").read_text()
    assert "## Measured quality" in card and "MIT" in card and (EMBEDDED_MODEL / "tokenizer" / "LICENSE").is_file()


# ------------------------------------------------------------------------------------------ damage


def test_an_intact_folder_loads(copy):
    _as_export(copy)
    assert load_pipeline(copy, device="cpu").unet.config.sample_size == 8


def test_truncated_weights_are_named(copy):
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(AttnlensError, match=r"unet/diffusion_pytorch_model\.safetensors is truncated") as err:
        load_pipeline(copy, device="cpu")
    assert "save_pretrained" in str(err.value)  # not a Shapes export: how to re-save it


def test_garbage_weights_are_named(copy):
    w = copy / "text_encoder" / "model.safetensors"
    w.write_bytes(os.urandom(4096))
    with pytest.raises(AttnlensError, match=r"text_encoder/model\.safetensors is (truncated or )?not a safetensors"):
        load_pipeline(copy, device="cpu")


def test_a_git_lfs_pointer_is_named(copy):
    w = copy / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n")
    with pytest.raises(AttnlensError, match="vae/diffusion_pytorch_model.safetensors is a Git LFS pointer.*git lfs pull"):
        load_pipeline(copy, device="cpu")


def test_a_missing_component_folder_is_named(copy):
    shutil.rmtree(copy / "vae")
    with pytest.raises(AttnlensError, match=r"model/vae is missing \(model_index.json lists the component 'vae'"):
        load_pipeline(copy, device="cpu")


def test_pickle_only_weights_and_broken_json_are_named(copy):
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(AttnlensError, match=r"unet/diffusion_pytorch_model.safetensors is missing \(the folder has only pickle weights "
                       r"\(diffusion_pytorch_model.bin\)"):
        load_pipeline(copy, device="cpu")
    w.with_suffix(".bin").rename(w)
    (copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(AttnlensError, match=r"unet/config.json is not valid JSON"):
        load_pipeline(copy, device="cpu")


def test_damaged_embedded_model_says_how_to_rebuild_it(copy, monkeypatch):
    _as_export(copy)
    monkeypatch.setattr(pipeline_module, "EMBEDDED_MODEL", copy)
    monkeypatch.delenv("ATTNLENS_MODEL", raising=False)
    load_pipeline(device="cpu")  # intact: loads
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed: only the recorded checksum can tell
    w.write_bytes(bytes(data))
    with pytest.raises(AttnlensError) as err:
        load_pipeline(device="cpu")
    msg = str(err.value)
    assert "unet/diffusion_pytorch_model.safetensors is corrupt (its SHA-256 differs" in msg
    assert "git checkout -- attnlens/models/shapes" in msg
    assert "python -m tools.shapes_model.train vae --workdir runs/shapes --steps 3000 --seed 0" in msg
    assert "python -m tools.shapes_model.train unet --workdir runs/shapes --steps 6000 --seed 0" in msg
    assert "python -m tools.shapes_model.train export --workdir runs/shapes --out attnlens/models/shapes" in msg
    record = json.loads((copy / "training.json").read_text())  # a run with recipe options: the command names them
    record["config"] = {"prediction_type": "v_prediction", "text_table_steps": 2000, "snr_floor": 1.0, "latent_std": 1.0}
    _write_record(copy, record)
    with pytest.raises(AttnlensError, match=r"unet --workdir runs/shapes --steps 6000 --seed 0 --prediction-type "
                       r"v_prediction --text-table-steps 2000 --snr-floor 1.0`"):
        load_pipeline(device="cpu")
    # resumed with a longer schedule and a new SNR floor: one command per schedule, each with what it changed
    record.update(unet_step=9000, unet_total_steps=9000, recipe_changes=[
        {"step": 2000, "changed": {"snr_floor": [0.0, 1.0]}},
        {"step": 6000, "changed": {"total_steps": [6000, 9000]}}])
    _write_record(copy, record)
    with pytest.raises(AttnlensError) as err:
        load_pipeline(device="cpu")
    assert ("`python -m tools.shapes_model.train unet --workdir runs/shapes --steps 6000 --seed 0 --prediction-type "
            "v_prediction --text-table-steps 2000` (stopped at step 2000), then `python -m tools.shapes_model.train unet "
            "--workdir runs/shapes --steps 6000 --seed 0 --snr-floor 1.0`, then `python -m tools.shapes_model.train unet "
            "--workdir runs/shapes --steps 9000 --seed 0`, then `python -m tools.shapes_model.train export") in str(err.value)
    w.unlink()
    with pytest.raises(AttnlensError, match=r"unet/diffusion_pytorch_model.safetensors is missing \(unet/ has no \.safetensors weights\)"
                       r".*tools.shapes_model.train export"):
        load_pipeline(device="cpu")
    # the loader prints what training.json records and nothing else: without a record of the commands it says
    # where the tool is; a copy elsewhere gets its own folder in the export command
    record.pop("rebuild", None)
    (copy / "training.json").write_text(json.dumps(record))
    with pytest.raises(AttnlensError, match=r"records no rebuild commands") as err:
        load_pipeline(device="cpu")
    assert "git checkout -- attnlens/models/shapes" in str(err.value) and "--steps" not in str(err.value)
    (copy / "training.json").write_text("{not json")
    with pytest.raises(AttnlensError, match=r"records no rebuild commands"):
        load_pipeline(device="cpu")
    _write_record(copy, record)
    monkeypatch.setattr(pipeline_module, "EMBEDDED_MODEL", copy.parent / "elsewhere")
    with pytest.raises(AttnlensError, match=r"Rebuild it: `python -m tools.shapes_model.train vae .*"
                       rf"`python -m tools.shapes_model.train export --workdir runs/shapes --out {re.escape(str(copy))}`"):
        load_pipeline(copy, device="cpu")


# ------------------------------------------------------------------------------------------ card


def test_card_copies_recorded_figures_and_only_for_these_weights(copy, tmp_path):
    _as_export(copy)
    log = tmp_path / "unet_log.jsonl"
    lines = [{"step": 50, "loss": 0.8, "s": 50.0}, {"step": 100, "loss": 0.4, "s": 100.0},
             {"step": 150, "loss": 0.3, "s": 40.0}, {"step": 200, "loss": 0.2, "s": 90.0}]  # resumed after step 100
    log.write_text("\n".join(json.dumps(x) for x in lines))
    summary = summarize_log(log, up_to=150)
    assert (summary["runs"], summary["wall_seconds"], summary["first_loss"]) == (2, 140.0, 0.8)
    assert summary["last_loss_mean_of_10"] == pytest.approx(0.5)
    record = json.loads((copy / "training.json").read_text())
    record["logs"] = {"unet": summary}
    record["recipe_changes"] = [{"step": 2650, "changed": {"total_steps": [6000, 10000]}},
                                {"step": 3100, "changed": {"snr_floor": [0.0, 0.1]}}]
    (copy / "training.json").write_text(json.dumps(record))

    acc = {k: {"n": 30, "accuracy": 0.9123, "target": 0.9, "pass": True} for k in ("shape", "position")}
    acc["colour"] = {"n": 20, "accuracy": 0.8766, "target": 0.95, "pass": False}
    results = {
        "quick": False, "model_fingerprint": fingerprint(copy), "command": "python benchmarks/shapes_quality.py",
        "date": "2026-01-01", "machine": "test", "guidance": 5.5, "steps": 25, "batch": 16,
        "prompt_list": {"n": 240, "n_used": 240, "version": 1, "sha256": "ab" * 32},
        "vae_round_trip": {"n": 500, "all_attributes": 0.994, "target": 0.99, "pass": True},
        "prompted_accuracy": acc,
        "unprompted_top_share": {"size": {"n": 80, "top_value": "large", "top_share": 0.7125, "target_max": 0.6,
                                          "pass": False}},
        "shape_word_iou": {"n": 150, "mean_iou": 0.5432, "target": 0.5, "pass": True,
                           "mean_iou_other_rules": {"mean": 0.4, "half_max": 0.45}},
        "speed": {"batch": 16, "threads": 2, "target": 1.0, "pass": True, "load_average_1min_before": 1.0,
                  "load_average_1min_after": 1.0, "seconds_per_image": {"attnlens.load_pipeline": 0.8123,
                                                                        "plain diffusers": 0.8001}},
        "found_rate": 0.99,
    }
    path = tmp_path / "shapes_quality.json"
    path.write_text(json.dumps(results))
    card = render_card(copy, path)
    for figure in ("91.2%", "87.7%", "99.4%", "71.2%", "0.543", "0.812", "guidance scale 5.5", "--guidance 5.5"):
        assert figure in card, figure
    assert "Target not met: prompted colour accuracy (87.7% < 95.0%)" in card
    assert "Target not met: size collapses to large" in card
    assert "2 run(s)" in card and "0.800 at the first logged step" in card
    assert "step 2650: total_steps 6000 -> 10000; step 3100: snr_floor 0.0 -> 0.1" in card
    sizes = sum(f.stat().st_size for f in copy.rglob("*") if f.is_file())
    assert f"{sizes:,} bytes" in card

    results["model_fingerprint"] = "0" * 64  # measured on other weights: no figures shown
    path.write_text(json.dumps(results))
    assert "measured on other weights" in render_card(copy, path) and "91.2%" not in render_card(copy, path)
    results["model_fingerprint"], results["quick"] = fingerprint(copy), True
    path.write_text(json.dumps(results))
    assert "Only a `--quick` development run" in render_card(copy, path)
    assert "Not measured yet" in render_card(copy, tmp_path / "absent.json")


def test_card_shows_the_conditioning_gaps_only_for_these_weights(copy, tmp_path):
    _as_export(copy)
    gap = {"gap": 0.123, "ci_low": 0.1, "ci_high": 0.146, "mse_right": 0.5}
    zero = {"gap": 0.0004, "ci_low": -0.002, "ci_high": 0.003, "mse_right": 0.5}
    cond = {"command": "python benchmarks/shapes_conditioning.py", "model_fingerprint": fingerprint(copy),
            "n_per_attribute": 64, "timesteps": [900, 600],
            "attributes": {"colour": {"timesteps": {"900": gap, "600": gap}},
                           "position": {"timesteps": {"900": zero, "600": zero}}}}
    path = tmp_path / "cond.json"
    path.write_text(json.dumps(cond))
    card = render_card(copy, tmp_path / "absent.json", conditioning_path=path)
    assert "| colour | +12.3% (+10.0% to +14.6%) | +12.3% (+10.0% to +14.6%) |" in card
    assert "| position | +0.0% (-0.2% to +0.3%) |" in card
    cond["model_fingerprint"] = "0" * 64
    path.write_text(json.dumps(cond))
    assert "Does the model use each word?" not in render_card(copy, tmp_path / "absent.json", conditioning_path=path)


def test_card_shows_the_probing_verdicts_as_recorded_and_only_for_these_weights(copy, tmp_path):
    _as_export(copy)
    claim = {"claim": "self-attention maps decode colour poorly compared with cross-attention",
             "test": "shape word's map minus self-attention, colour", "contradicted_by": "the interval below 0.1",
             "difference": -0.27, "interval": [-0.42, -0.12], "verdict": "disagrees"}
    study = {"command": "python -m benchmarks.probing_study", "generations": 480, "probes": ["logreg", "mlp"],
             "model_fingerprint": fingerprint(copy), "claims": [claim]}
    path = tmp_path / "probing.json"
    path.write_text(json.dumps(study))
    card = render_card(copy, tmp_path / "absent.json", probing_path=path)
    assert "| self-attention maps decode colour poorly compared with cross-attention |" in card
    assert "| -0.27 (-0.42 to -0.12) | disagrees |" in card
    study["model_fingerprint"] = "0" * 64
    path.write_text(json.dumps(study))
    assert "the paper's claims, tested" not in render_card(copy, tmp_path / "absent.json", probing_path=path)


def test_card_shows_the_self_attention_targets_only_for_a_full_run_on_these_weights(copy, tmp_path):
    _as_export(copy)
    record = {"command": "python -m benchmarks.shapes_self_attention", "model_fingerprint": fingerprint(copy),
              "quick": False, "diagnostics": {"fpe_every_level": {"kept": 0.5, "success": 0.9, "n": 18}},
              "targets": {"load_bearing_self_attention": {"rule": "r1", "readings_changed": 2, "images": 12,
                                                          "pass": False},
                          "free_structure": {"rule": "r2", "kept": 0.33, "n": 18, "pass": True},
                          "fpe_keeps_structure": {"rule": "r3", "kept": 0.39, "success": 1.0, "n": 18, "pass": False}},
              "ablation": [{"group": "self 8x8", "n_layers": 5, "pixel_change": 0.004, "readings_changed": 0,
                            "images": 12}]}
    path, table = tmp_path / "sa.json", tmp_path / "candidates.csv"
    path.write_text(json.dumps(record))
    table.write_text("run,recipe,unet_step,fpe_self_pixel_change,fpe_self_readings_changed,none_kept,fpe_kept,"
                     "fpe_success\ncandB,--layers-per-block 1,300,0.0783,6/8,0.333,0.333,0.667\n")
    card = render_card(copy, tmp_path / "absent.json", self_attention_path=path, candidates_path=table)
    assert "| load-bearing self-attention | r1 | 2 of 12 readings changed | **not met** |" in card
    assert "| FPE keeps structure | r3 |" in card and "fpe every level (not a target)" in card
    assert "| candB | --layers-per-block 1 | 300 | raw | 0.0783 | 6/8 | 0.333 | 0.333 | 0.667 | - | raw area |" in card
    for change in ({"model_fingerprint": "0" * 64}, {"quick": True}):  # other weights, or a slice: not shown
        path.write_text(json.dumps({**record, **change}))
        assert "Does the model use its self-attention?" not in render_card(
            copy, tmp_path / "absent.json", self_attention_path=path, candidates_path=table)


def test_text_path_current_says_whether_the_record_fits_the_folder(copy, tmp_path):
    """The tool verb rebench.sh asks before skipping the text-path benchmark: yes only for the VAE, tokenizer
    and scheduler the record was measured on; a new UNet keeps it, a new VAE does not."""
    from tools.shapes_model import train
    from tools.shapes_model.card import TEXT_PATH_INPUTS

    record = tmp_path / "text_path.json"
    assert not train.text_path_current(copy, record)  # no record
    record.write_text(json.dumps({"inputs_fingerprint": fingerprint(copy, TEXT_PATH_INPUTS)}))
    assert train.text_path_current(copy, record)
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text() + " ")
    assert train.text_path_current(copy, record)
    (copy / "vae" / "config.json").write_text((copy / "vae" / "config.json").read_text() + " ")
    assert not train.text_path_current(copy, record)
    with pytest.raises(SystemExit) as exit_:
        train.main(["text-path-current", "--out", str(copy)])  # the committed record was not measured on it
    assert exit_.value.code == 1
