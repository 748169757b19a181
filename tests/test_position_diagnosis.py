"""benchmarks/shapes_position_diagnosis.py's measurements on a tiny random pipeline, and the card's use of them."""

import json
import shutil

import numpy as np
import pytest

from attnlens import shapes
from attnlens._testing import tiny_pipeline
from tools.shapes_model.card import TEXT_PATH_INPUTS, fingerprint, render_card, weight_sums


@pytest.fixture(scope="module")
def diagnosis():
    from benchmarks import shapes_position_diagnosis

    return shapes_position_diagnosis


def test_untrained_embeddings_all_sit_at_the_unseen_baseline(diagnosis, pipe):
    norms = diagnosis.embedding_norms(pipe, n_prompts=200)
    assert set(shapes.ATTRIBUTES) | {"unseen_tokens", "unseen_tokens_std", "spread"} == set(norms)
    assert set(shapes.ATTRIBUTES) | {"unseen_tokens"} == set(norms["spread"])
    # nothing is trained in a random pipeline: every attribute's words look like tokens no prompt contains
    for attribute in shapes.ATTRIBUTES:
        assert abs(norms[attribute] - norms["unseen_tokens"]) < 4 * norms["unseen_tokens_std"] + 1e-3


def test_trained_words_stand_out_from_the_baseline(diagnosis):
    pipe = tiny_pipeline()
    table = pipe.text_encoder.get_input_embeddings().weight
    for colour in shapes.ATTRIBUTES["colour"]:  # what training does to words the UNet uses
        table.data[pipe.tokenizer(colour, add_special_tokens=False).input_ids] *= 10
    norms = diagnosis.embedding_norms(pipe, n_prompts=200)
    assert norms["colour"] > norms["unseen_tokens"] + 4 * norms["unseen_tokens_std"]
    assert norms["spread"]["colour"] > 3 * norms["spread"]["unseen_tokens"] > 3 * 0.9 * norms["spread"]["position"]
    assert abs(norms["position"] - norms["unseen_tokens"]) < 4 * norms["unseen_tokens_std"] + 1e-3


def test_detectability_grows_as_noise_falls(diagnosis, pipe):
    detect = diagnosis.latent_detectability(pipe, n=4, seed=0)
    t, snr = detect["timesteps"], detect["snr"]
    assert t == sorted(t, reverse=True) and snr == sorted(snr)
    for name in ("position", "colour"):
        d = detect[name]["d_prime"]
        assert detect[name]["energy_median"] > 0 and d == sorted(d)
        # d'^2 / snr is the energy at every step
        assert np.allclose(np.square(d) / np.array(snr), detect[name]["energy_median"], rtol=1e-6)


def test_card_reports_embeddings_and_detectability_only_for_these_weights(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder, safe_serialization=True)
    (folder / "training.json").write_text(json.dumps(
        {"unet_step": 10, "seed": 0, "ema": True, "config": {}, "vae": {"step": 5, "config": {}, "seed": 0},
         "logs": {}, "sha256": weight_sums(folder)}))
    r2 = {"mid.0.cross": {"grid": "4x4", "999": {"all": 0.9, "inner_half": 0.8}}}
    diag = {"command": "python benchmarks/shapes_position_diagnosis.py", "model_fingerprint": fingerprint(folder),
            "timesteps": [999], "text_distance": {"colour": 2.0, "position": 0.1}, "query_position_r2": r2,
            "embedding_norm": {"shape": 0.48, "colour": 0.53, "size": 0.49, "position": 0.28, "background": 0.51,
                               "unseen_tokens": 0.219, "unseen_tokens_std": 0.014,
                               "spread": {"shape": 0.67, "colour": 0.72, "size": 0.84, "position": 0.355,
                                          "background": 0.78, "unseen_tokens": 0.311}},
            "latent_detectability": {"timesteps": [999, 600], "snr": [0.0047, 0.19],
                                     "position": {"energy_median": 1300.0, "d_prime": [2.47, 15.8]},
                                     "colour": {"energy_median": 1400.0, "d_prime": [2.57, 16.4]}},
            "mean_image_share": {"n_scenes": 4096,
                                 "latent": {"shape": 0.003, "colour": 0.107, "size": 0.007, "position": 0.009,
                                            "background": 0.159, "position_given_colour_background": 0.321},
                                 "pixels": {"shape": 0.0, "colour": 0.012, "size": 0.0, "position": 0.001,
                                            "background": 0.889, "position_given_colour_background": 0.053}}}
    path = tmp_path / "diag.json"
    path.write_text(json.dumps(diag))
    card = render_card(folder, tmp_path / "absent.json", diagnosis_path=path)
    assert "their mean norm is 0.280, against 0.219 for tokens no prompt contains" in card
    assert "shape 0.480, colour 0.530, size 0.490, background 0.510" in card
    assert "the five position words are 0.355 apart on average, against 0.311 for two untouched tokens" in card
    assert "(t=999) a matched filter tells a centered object from one on the left with d' = 2.47" in card
    assert "over 4,096 random renders" in card and "colour 10.7%" in card and "position 0.9%" in card
    assert "Position adds 32.1% of the latent's variance once colour and background are known" in card
    assert "The UNet can learn that interaction" not in card  # no text-path record for these weights
    text_path = tmp_path / "text_path.json"
    text_path.write_text(json.dumps({
        "command": "python benchmarks/shapes_text_path.py", "model_fingerprint": fingerprint(folder), "steps": 200,
        "timestep": 999, "arms": {"clip": [{"position": 0.0004, "colour": 0.31}],
                                  "word_table": [{"position": 0.081, "colour": 0.27}]}}))
    card = render_card(folder, tmp_path / "absent.json", diagnosis_path=path, text_path_path=text_path)
    assert "The UNet can learn that interaction" in card and "from scratch for 200 steps at t=999" in card
    assert ("8.1% worse behind the word table, and changes it by +0.0% behind CLIP; swapping the colour word makes it "
            "27.0% and 31.0% worse") in card
    assert "Where position is lost" in card and "training never pulled them anywhere" in card
    # a model that uses its position words (the conditioning gap says so) gets the other verdicts, and the
    # table-start arm of the text-path benchmark is reported
    cond = tmp_path / "cond.json"
    gap = {"999": {"gap": 0.2, "ci_low": 0.15, "ci_high": 0.25}, "600": {"gap": 0.0, "ci_low": -0.01, "ci_high": 0.01}}
    cond.write_text(json.dumps({"command": "python benchmarks/shapes_conditioning.py", "n_per_attribute": 64,
                                "model_fingerprint": fingerprint(folder), "timesteps": [999, 600],
                                "attributes": {"position": {"timesteps": gap}}}))
    record = json.loads(text_path.read_text())
    record["table_steps"] = 200
    record["arms"]["clip_table_start"] = [{"position": 0.427, "colour": 0.57}]
    text_path.write_text(json.dumps(record))
    card = render_card(folder, tmp_path / "absent.json", conditioning_path=cond, diagnosis_path=path,
                       text_path_path=text_path)
    assert "### Position words" in card and "This model uses its position words" in card
    assert "Where position is lost" not in card and "never pulled" not in card and "only colour words are learnt" not in card
    assert ("keeps its layers frozen for 200 steps before training them for 200 more: swapping the position word then "
            "makes the prediction 42.7% worse, the colour word 57.0%. The recipe above starts its text encoder that way.") in card
    gap["999"]["ci_low"] = 0.005  # within the interval of no effect: the old verdicts
    cond.write_text(json.dumps({**json.loads(cond.read_text()), "attributes": {"position": {"timesteps": gap}}}))
    assert "Where position is lost" in render_card(folder, tmp_path / "absent.json", conditioning_path=cond,
                                                   diagnosis_path=path, text_path_path=text_path)
    record["inputs_fingerprint"] = fingerprint(folder, TEXT_PATH_INPUTS)  # what the text-path run used
    text_path.write_text(json.dumps(record))
    shutil.rmtree(folder / "unet")
    tiny_pipeline(seed=1).unet.save_pretrained(folder / "unet", safe_serialization=True)  # other weights
    assert "Where position is lost" not in render_card(folder, tmp_path / "absent.json", diagnosis_path=path)
    # the text-path record trains its own UNets on this VAE's latents: a new UNet keeps it, a new VAE drops it
    diag["model_fingerprint"] = fingerprint(folder)
    path.write_text(json.dumps(diag))
    card = render_card(folder, tmp_path / "absent.json", diagnosis_path=path, text_path_path=text_path)
    assert "The UNet can learn that interaction" in card
    shutil.rmtree(folder / "vae")
    tiny_pipeline(seed=1).vae.save_pretrained(folder / "vae", safe_serialization=True)
    diag["model_fingerprint"] = fingerprint(folder)
    path.write_text(json.dumps(diag))
    card = render_card(folder, tmp_path / "absent.json", diagnosis_path=path, text_path_path=text_path)
    assert "Where position is lost" in card and "The UNet can learn that interaction" not in card


def test_explained_share_is_zero_without_an_effect_and_exact_with_one(diagnosis):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 4000).astype(str)
    noise = rng.normal(size=(4000, 6))
    assert abs(diagnosis._explained(noise, labels)) < 0.005  # bias-corrected: no effect reads as ~0
    means = rng.normal(size=(5, 6))
    x = means[labels.astype(int)] + noise
    expected = means.var(0).sum() / (means.var(0).sum() + 6)  # between-value variance over the total
    assert diagnosis._explained(x, labels) == pytest.approx(expected, abs=0.03)


def test_mean_image_shares_position_says_little_on_its_own(diagnosis, pipe):
    shares = diagnosis.mean_image_shares(pipe, n=600, seed=0)
    assert shares["n_scenes"] == 600
    for space in ("pixels", "latent"):
        assert set(shares[space]) == set(shapes.ATTRIBUTES) | {"position_given_colour_background"}
    pix = shares["pixels"]
    # a property of the world, whatever the VAE: the background fills most pixels, and the object's mean
    # colour is close to the mean background, so its place alone hardly changes the mean image ...
    assert pix["background"] > 0.5 and pix["position"] < 0.01
    # ... while it does once colour and background are known
    assert pix["position_given_colour_background"] > 5 * max(pix["position"], 0.001)
