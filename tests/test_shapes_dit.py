"""The Shapes DiT's training stage on tiny configs: ``train dit`` trains, resumes exactly, exports a
``PixArtAlphaPipeline`` folder that plain diffusers and ``load_pipeline`` load with the trained (EMA) weights, and
attnlens reads its attention; ``load_pipeline("shapes-dit")`` loads the shipped folder or says how to build it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import attnlens
import attnlens._pipeline as pipeline_module
from attnlens import AttnlensError, capture, layers, load_pipeline
from attnlens.shapes import ShapesDataset
from tools.shapes_model import train

needs_dit = pytest.mark.needs_dit_diffusers
TINY = ["--tiny", "--save-every", "1"]


def _run(work, *args):
    train.main([args[0], "--workdir", str(work), *TINY, *args[1:]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(workdir, folder)``: a tiny DiT trained 2 steps, resumed to 3 and exported."""
    work = tmp_path_factory.mktemp("dit")
    train.main(["vae", "--tiny", "--workdir", str(work), "--steps", "1", "--save-every", "1", "--eval-every", "1000"])
    _run(work, "dit", "--steps", "2", "--prediction-type", "v_prediction", "--text-table-steps", "2")
    meta = json.loads((work / "dit.safetensors.json").read_text())["meta"]
    assert meta["step"] == 2 and meta["config"]["prediction_type"] == "v_prediction"
    _run(work, "dit", "--steps", "3")  # resumes: same recipe, a longer schedule
    out = work / "folder"
    train.main(["export", "--denoiser", "dit", "--workdir", str(work), "--out", str(out)])
    return work, out


@needs_dit
def test_a_resumed_run_equals_an_uninterrupted_one(exported, tmp_path):
    work, _ = exported
    (tmp_path / "vae.safetensors").write_bytes((work / "vae.safetensors").read_bytes())
    (tmp_path / "vae.safetensors.json").write_bytes((work / "vae.safetensors.json").read_bytes())
    _run(tmp_path, "dit", "--steps", "2", "--prediction-type", "v_prediction", "--text-table-steps", "2")
    _run(tmp_path, "dit", "--steps", "3")
    resumed, straight = load_file(work / "dit.safetensors"), load_file(tmp_path / "dit.safetensors")
    assert resumed.keys() == straight.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    meta = json.loads((work / "dit.safetensors.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["recipe_changes"] == [{"step": 2, "changed": {"total_steps": [2, 3]}}]
    # the word-table start froze the T5 layers for the first 2 steps, then they trained
    assert any(not torch.equal(v, 0 * v) for k, v in resumed.items() if k.startswith("text/") and k.endswith(".o.weight"))


@needs_dit
def test_the_export_loads_with_plain_diffusers_and_holds_the_ema_weights(exported):
    from diffusers import PixArtAlphaPipeline

    work, out = exported
    for weights in out.glob("*/*.safetensors"):  # shipped in fp16
        assert {v.dtype for v in load_file(weights).values()} == {torch.float16}, weights
    pipe = PixArtAlphaPipeline.from_pretrained(str(out), use_safetensors=True, torch_dtype=torch.float16)
    ckpt = load_file(work / "dit.safetensors")
    for name, p in pipe.transformer.state_dict().items():
        torch.testing.assert_close(p, ckpt[f"ema_dit/{name}"].half(), rtol=0, atol=0, msg=name)
    for name, p in pipe.text_encoder.state_dict().items():
        kept = ckpt.get(f"ema_text/{name}", ckpt["ema_text/shared.weight"] if name.endswith("embed_tokens.weight") else None)
        # (T5 keeps its feed-forward output `wo` in fp32 when loaded in fp16: the fp16 values, upcast)
        torch.testing.assert_close(p.float(), kept.half().float(), rtol=0, atol=0, msg=name)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    record = json.loads((out / "training.json").read_text())
    assert record["dit_step"] == 3 and record["config"]["layers"] == train.TINY_DIT.layers
    commands = [r["command"] for r in record["rebuild"]]
    assert any(" dit " in c and "--prediction-type v_prediction" in c and "--text-table-steps 2" in c for c in commands)
    assert commands[-1].endswith("export --denoiser dit --workdir runs/shapes --out {out}")
    before = record["rebuild"]
    train.record_rebuild(out)  # what the card stage refreshes: the same commands for a DiT folder
    assert json.loads((out / "training.json").read_text())["rebuild"] == before


@needs_dit
def test_attnlens_reads_the_exported_dit(exported):
    _, out = exported
    pipe = load_pipeline(out, device="cpu")
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.transformer.dtype == torch.float32
    n = train.TINY_DIT.layers
    assert layers(pipe).names() == [f"block.{i}.{kind}" for i in range(n) for kind in ("self", "cross")]
    pipe.set_progress_bar_config(disable=True)
    with capture(pipe) as cache:
        image = pipe("a red star on the left", num_inference_steps=2, use_resolution_binning=False,
                     clean_caption=False, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64)  # the Shapes world's size at the transformer's default
    assert cache.words() == ["a", "red", "star", "on", "the", "left"]  # one T5 token per Shapes word
    star = cache.word_map("star")
    side = 16 // train.TINY_DIT.patch_size  # 16x16 latents in patches: the token grid
    assert star.shape == (side, side) and torch.isfinite(star).all() and star.sum() > 0


def test_the_dit_tokenizer_has_one_token_per_shapes_word():
    tok = train.shapes_tokenizer()
    words = set(train.shapes_words().split())
    ds = ShapesDataset(300, seed=3)
    for i in range(len(ds)):
        prompt = ds[i]["prompt"]
        pieces = tok.convert_ids_to_tokens(tok(prompt).input_ids)
        assert pieces[-1] == "</s>" and pieces.count("</s>") == 1
        spoken = [p for p in pieces[:-1] if p != ","]
        assert [p.lstrip("\u2581") for p in spoken] == prompt.replace(",", "").split(), prompt
        assert all(p.startswith("\u2581") and p[1:] in words for p in spoken), prompt


def test_t5_word_table_start_makes_each_state_its_own_token():
    torch.manual_seed(0)
    tok = train.shapes_tokenizer()
    text = train.build_t5_text_encoder(train.TINY_DIT, len(tok))
    train.start_as_word_table(text)
    a, b = tok(["a red star", "star red a"], return_tensors="pt").input_ids
    with torch.no_grad():
        h = text(torch.stack([a, b])).last_hidden_state
    assert torch.allclose(h[0, 1], h[1, 1]) and torch.allclose(h[0, 0], h[1, 2])  # no mixing, no position
    assert not torch.allclose(h[0, 0], h[0, 1])


def test_load_pipeline_shapes_dit_without_the_folder_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline_module, "EMBEDDED_DIT", tmp_path / "shapes-dit")
    for call in (lambda: load_pipeline("shapes-dit", device="cpu"),
                 lambda: (monkeypatch.setenv("ATTNLENS_MODEL", "shapes-dit"), load_pipeline(device="cpu"))):
        with pytest.raises(AttnlensError, match=r"Shapes DiT is not in .*export --denoiser dit .*--out "
                                                r"attnlens/models/shapes-dit"):
            call()


@needs_dit
def test_load_pipeline_shapes_dit_loads_the_folder(exported, monkeypatch):
    monkeypatch.setattr(pipeline_module, "EMBEDDED_DIT", exported[1])
    pipe = load_pipeline("shapes-dit", device="cpu")
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    assert attnlens.layers(pipe).names()[:2] == ["block.0.self", "block.0.cross"]


def test_the_shipped_size_fits_the_budget():
    """The default DiTConfig's denoiser and text encoder, in fp16, with the VAE stage's VAE, stay under 25 MB."""
    cfg = train.DiTConfig()
    with torch.device("meta"):
        dit = train.build_dit(cfg)
        text = train.build_t5_text_encoder(cfg, len(train.shapes_tokenizer()))
        vae = train.build_vae(train.VAEConfig())
    n = sum(p.numel() for m in (dit, vae) for p in m.parameters())
    n += sum(p.numel() for p in {id(p): p for p in text.parameters()}.values())  # tied embeddings once
    assert n * 2 < 25e6, n * 2
    assert dit.config.patch_size == 2 and dit.config.num_layers == 8 and dit.config.num_attention_heads * \
        dit.config.attention_head_dim == 256


@needs_dit
def test_padding_changes_nothing(exported):
    """Trained at ``max_text_tokens`` with the attention mask, the DiT generates the same at PixArt's default
    ``max_sequence_length`` (120) as at a length that just holds the prompt."""
    _, out = exported
    pipe = load_pipeline(out, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    images = [pipe("a small blue heart at the top", num_inference_steps=2, use_resolution_binning=False,
                   clean_caption=False, output_type="pt", max_sequence_length=n,
                   generator=torch.Generator().manual_seed(0)).images for n in (8, 120)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
    assert (images[0] - pipe("a small red heart at the top", num_inference_steps=2, use_resolution_binning=False,
                             clean_caption=False, output_type="pt", max_sequence_length=8,
                             generator=torch.Generator().manual_seed(0)).images).abs().max() > 1e-4
