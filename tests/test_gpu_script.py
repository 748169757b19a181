"""The GPU path of the Shapes training tool (issue 17), proven on CPU: a run stopped by its time budget and resumed is
the uninterrupted run, ``scripts/gpu_shapes.sh`` trains and returns its candidates within the device tool's limits
(``DEVICE=cpu TINY=1``), and what it returns unpacks here into the model a direct export gives. The last test runs
only where CUDA is: the same run on the GPU, and a checkpoint crossing between the devices."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.shapes_model import train

REPO = Path(__file__).resolve().parents[1]
LIMIT = 16 * 2**20  # the device tool brings back files of at most 16 MiB
LEVERS = ["--layers-per-block", "1", "--transformer-layers", "2", "--attention-levels", "0", "1", "2"]


def _vae(work: Path) -> Path:
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    return work


def _copy_vae(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".json"):
        (dst / f"vae.safetensors{suffix}").write_bytes((src / f"vae.safetensors{suffix}").read_bytes())
    return dst


def _unet(work: Path, *extra: str) -> None:
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "3", "--save-every", "100", "--seed", "0",
                "--prediction-type", "v_prediction", "--text-table-steps", "1", "--snr-floor", "1.0", *LEVERS, *extra])


def test_a_run_stopped_by_its_budget_and_resumed_is_the_uninterrupted_run(tmp_path):
    vae = _vae(tmp_path / "vae")
    whole, split = _copy_vae(vae, tmp_path / "whole"), _copy_vae(vae, tmp_path / "split")
    _unet(whole)
    _unet(split, "--device", "cpu", "--budget-minutes", "0")  # a spent budget: one step, then a clean stop
    meta = json.loads((split / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 1 and meta["total_steps"] == 3  # saved at the stop, the schedule unchanged
    _unet(split)
    a, b = load_file(whole / "unet.safetensors"), load_file(split / "unet.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {len(different)} tensors, e.g. {different[:3]}"
    meta = json.loads((split / "unet.safetensors.json").read_text())["meta"]
    assert meta["recipe_changes"] == [] and [(g["step"], g["device"]) for g in meta["segments"]] == [(0, "cpu"), (1, "cpu")]
    with pytest.raises(SystemExit, match="precision 'bf16' is for --device cuda"):
        _unet(tmp_path / "whole", "--precision", "bf16")


def test_the_gpu_script_returns_packs_within_the_limits_that_export_the_model_here(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DEVICE": "cpu", "TINY": "1", "RUNS": "candB", "STOP_AT": "2", "BUDGET": "5",
           "THREADS": "1", "OUT": str(out), "WORK": str(work), "PY": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_shapes.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "candB: exit 0, stopped at step 2, ema-pack yes" in (out / "summary.txt").read_text()
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["candB.tar", "summary.txt"] and all((out / n).stat().st_size <= LIMIT for n in returned)

    # here: unpack what came back, rebuild an exportable workdir, export, and compare with a direct export
    back = tmp_path / "back"
    back.mkdir()
    with tarfile.open(out / "candB.tar") as tar:
        tar.extractall(back, filter="data")
    pack = load_file(back / "ema-pack.safetensors")
    assert all(k == "embedding_rows" or (k.startswith(("ema_text/", "ema_unet/")) and v.dtype == torch.float16)
               for k, v in pack.items())
    info = json.loads((back / "ema-pack.safetensors.json").read_text())["ema_pack"]
    here = _copy_vae(work / "candB", tmp_path / "here")  # the run's VAE (the shipped one outside TINY mode)
    train.main(["ema-unpack", "--workdir", str(here), "--ema-pack", str(back / "ema-pack.safetensors")])
    assert json.loads((here / "unet.safetensors.json").read_text())["meta"]["config"]["attention_levels"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="cannot resume"):
        train.main(["unet", "--tiny", "--workdir", str(here), "--steps", "3"])
    with pytest.raises(SystemExit, match="without --raw"):
        train.export(here, tmp_path / "raw", use_ema=False)
    got, want = train.export(here, tmp_path / "got"), train.export(work / "candB", tmp_path / "want")
    unet_got = load_file(got / "unet" / "diffusion_pytorch_model.safetensors")
    unet_want = load_file(want / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet_got.keys() == unet_want.keys() and all(torch.equal(unet_got[k], unet_want[k]) for k in unet_got)
    text_got = load_file(next((got / "text_encoder").glob("*.safetensors")))
    text_want = load_file(next((want / "text_encoder").glob("*.safetensors")))
    embedding = "text_model.embeddings.token_embedding.weight"
    for k in text_want:
        if k != embedding:
            assert torch.equal(text_got[k], text_want[k]), k
    rows = pack["embedding_rows"]
    assert 0 < len(rows) < 1000  # the Shapes prompts' tokens, not the vocabulary
    assert torch.equal(text_got[embedding][rows], text_want[embedding][rows])
    # every other row: the seeded initialisation times one factor, to fp16 rounding
    assert (text_got[embedding].float() - text_want[embedding].float()).abs().max() <= info["embedding_scale_max_error"] + 1e-3
    import attnlens

    pipe = attnlens.load_pipeline(got, device="cpu")
    assert any(i.kind == "self" and i.name.startswith("down.2.") for i in attnlens.layers(pipe))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_a_cuda_run_follows_the_cpu_run_and_checkpoints_cross_devices(tmp_path):
    vae = _vae(tmp_path / "vae")
    cpu, gpu = _copy_vae(vae, tmp_path / "cpu"), _copy_vae(vae, tmp_path / "gpu")
    _unet(cpu)
    _unet(gpu, "--device", "cuda", "--stop-at", "2")  # 2 steps on the GPU, the third on the CPU
    _unet(gpu)
    a, b = load_file(cpu / "unet.safetensors"), load_file(gpu / "unet.safetensors")
    assert all(b[k].device.type == "cpu" for k in b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k.startswith("ema_unet/"))
    assert worst < 1e-3, worst  # the same data, noise and timesteps: only float rounding differs
    _unet(gpu, "--device", "cuda", "--stop-at", "4", "--steps", "4")  # and back onto the GPU
    meta = json.loads((gpu / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 4 and [(g["step"], g["device"]) for g in meta["segments"]] == [(0, "cuda"), (2, "cpu"), (3, "cuda")]
