import json

import torch

from attnlens._tokenizer import load_tokenizer
from tools.shapes_model import train


def test_tokenizer_matches_sd1_ids():
    tok = load_tokenizer()
    assert len(tok) == 49408
    # ids of Stable Diffusion 1.x's tokenizer for a well-known prompt
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.tokenize("hexagon") == ["hex", "agon</w>"]
    ids = tok("a red star", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_training_runs_resumes_and_exports(tmp_path):
    work = tmp_path / "run"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1"])
    first = json.loads((work / "unet.safetensors.json").read_text())["meta"]["step"]
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "3", "--save-every", "1", "--snr-floor", "0.05"])
    assert first == 2
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["config"]["snr_floor"] == 0.05
    # the change of recipe on resuming is on record, and a later resume keeps the new weighting
    assert meta["recipe_changes"] == [{"step": 2, "changed": {"snr_floor": [0.0, 0.05], "total_steps": [2, 3]}}]
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "4", "--save-every", "1"])
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["config"]["snr_floor"] == 0.05 and len(meta["recipe_changes"]) == 2
    # a new latent std rescales the latents: the scaling factor follows it, and the change is on record
    scale = meta["scaling_factor"]
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "5", "--save-every", "1", "--latent-std", "0.5"])
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["config"]["latent_std"] == 0.5 and abs(meta["scaling_factor"] - scale / 2) < 1e-9
    assert meta["recipe_changes"][-1] == {"step": 4, "changed": {"latent_std": [1.0, 0.5], "total_steps": [4, 5]}}
    out = train.export(work, tmp_path / "pipe")
    # the export records the commands that rebuild it (the loader prints them, importing nothing from the tool)
    rebuild = [r["command"] for r in json.loads((out / "training.json").read_text())["rebuild"]]
    assert rebuild[0] == "python -m tools.shapes_model.train vae --workdir runs/shapes --steps 2 --seed 0"
    assert rebuild[-2].endswith("--steps 5 --seed 0 --latent-std 0.5")
    assert rebuild[-1] == "python -m tools.shapes_model.train export --workdir runs/shapes --out {out}"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, use_safetensors=True)
    assert abs(pipe.vae.config.scaling_factor - scale / 2) < 1e-6  # the pipeline decodes with the new factor
    image = pipe("a red star", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_word_table_start_makes_each_state_its_own_token():
    torch.manual_seed(0)
    text = train.build_text_encoder(train.TINY_UNET)
    train.start_as_word_table(text)
    ids = torch.tensor([[49406, 320, 736, 2368, 49407], [49407, 2368, 736, 320, 49406]])
    with torch.no_grad():
        h = text(ids).last_hidden_state
    assert torch.allclose(h[0, 1], h[1, 3]) and torch.allclose(h[0, 2], h[1, 2])  # no position, no mixing
    assert not torch.allclose(h[0, 1], h[0, 2])


def _layers(path):
    from safetensors.torch import load_file

    weights = load_file(path)
    return {k: v.clone() for k, v in weights.items() if k.startswith("text/") and ".layers." in k}


def test_v_prediction_and_word_table_steps_train_resume_and_export(tmp_path):
    work = tmp_path / "run"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "2", "--save-every", "1",
                "--prediction-type", "v_prediction", "--text-table-steps", "2"])
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["config"]["prediction_type"] == "v_prediction" and meta["config"]["text_table_steps"] == 2
    frozen = _layers(work / "unet.safetensors")
    assert frozen
    # the text encoder's layers did not move during the word-table steps: their output projections are still 0
    assert all(not v.any() for k, v in frozen.items() if k.endswith(("out_proj.weight", "fc2.weight")))
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "4", "--save-every", "1"])  # keeps both
    meta = json.loads((work / "unet.safetensors.json").read_text())["meta"]
    assert meta["config"]["prediction_type"] == "v_prediction" and meta["recipe_changes"] == [
        {"step": 2, "changed": {"total_steps": [2, 4]}}]
    after = _layers(work / "unet.safetensors")
    assert any(not torch.equal(after[k], frozen[k]) for k in frozen)  # the layers train after the table steps
    try:
        train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "5", "--prediction-type", "epsilon"])
    except SystemExit as exc:
        assert "prediction_type='v_prediction'" in str(exc) and "fixed when a run starts" in str(exc)
    else:
        raise AssertionError("changing the prediction type of a run must fail")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(train.export(work, tmp_path / "pipe"), torch_dtype=torch.float32,
                                                   use_safetensors=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a red star", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_pack_and_unpack_resume_a_run_on_another_machine(tmp_path):
    from safetensors.torch import load_file

    work, elsewhere = tmp_path / "run", tmp_path / "next_machine"
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    train.main(["unet", "--tiny", "--workdir", str(work), "--steps", "3", "--save-every", "1",
                "--prediction-type", "v_prediction"])
    pack = tmp_path / "pack.safetensors"
    with (work / "unet_log.jsonl").open("a") as f:  # a 3-step run logs nothing (every 50 steps): one line to carry
        f.write(json.dumps({"step": 3, "loss": 0.5, "lr": 1e-5, "s": 1.0}) + "\n")
    train.main(["pack", "--workdir", str(work), "--pack", str(pack)])
    assert pack.stat().st_size < (work / "unet.safetensors").stat().st_size / 5
    (elsewhere).mkdir()
    for suffix in ("", ".json"):  # the VAE stage travels separately (checkpoints/shapes-vae.safetensors)
        (elsewhere / f"vae.safetensors{suffix}").write_bytes((work / f"vae.safetensors{suffix}").read_bytes())
    train.main(["unpack", "--workdir", str(elsewhere), "--pack", str(pack)])
    full, back = load_file(str(work / "unet.safetensors")), load_file(str(elsewhere / "unet.safetensors"))
    assert full.keys() == back.keys()
    emb = next(k for k in full if k.startswith("text/") and k.endswith("embeddings.token_embedding.weight"))
    sq = next(k for k, v in full.items() if k.endswith("/exp_avg_sq") and v.shape == full[emb].shape)
    rows = full[sq].abs().sum(1) > 0
    assert 0 < int(rows.sum()) < 200  # a few prompt tokens out of 49,408
    for key, value in full.items():
        if key.endswith("/exp_avg"):
            assert not back[key].any()  # the first moment restarts at zero
        elif key.endswith("/exp_avg_sq"):
            torch.testing.assert_close(back[key], value, rtol=1e-2, atol=0)
        elif key.endswith("embeddings.token_embedding.weight"):  # the rows training used, rounded to fp16
            torch.testing.assert_close(back[key][rows], value[rows].half().float(), rtol=0, atol=0)
        elif value.is_floating_point():
            torch.testing.assert_close(back[key], value.half().float(), rtol=0, atol=0)
    # the rows no prompt used come back as the run's seeded initialisation, which training never changed
    # but for weight decay
    torch.manual_seed(0)
    train._load_vae(work)
    init = train.build_text_encoder(train.TINY_UNET).get_input_embeddings().weight.detach()
    torch.testing.assert_close(back[emb][~rows], init[~rows], rtol=0, atol=0)
    torch.testing.assert_close(full[emb][~rows], init[~rows], rtol=1e-4, atol=0)
    meta = json.loads((elsewhere / "unet.safetensors.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["recipe_changes"][-1] == {"step": 3, "changed": {"resumed_from_pack": [False, True]}}
    assert (elsewhere / "unet_log.jsonl").read_text() == (work / "unet_log.jsonl").read_text()
    train.main(["unet", "--tiny", "--workdir", str(elsewhere), "--steps", "4", "--save-every", "1"])
    assert json.loads((elsewhere / "unet.safetensors.json").read_text())["meta"]["step"] == 4
    train.main(["export", "--workdir", str(elsewhere), "--out", str(tmp_path / "raw"), "--raw"])
    record = json.loads((tmp_path / "raw" / "training.json").read_text())
    assert record["ema"] is False and record["unet_step"] == 4
    assert {"step": 3, "changed": {"resumed_from_pack": [False, True]}} in record["recipe_changes"]
    from tools.shapes_model.card import render_card

    assert "step 3: resumed on another machine from the run's packed copy" in render_card(tmp_path / "raw",
                                                                                           tmp_path / "absent.json")
