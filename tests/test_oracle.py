"""Tests of the Shapes oracle (:mod:`attnlens.shapes.oracle`).

Held-out renders use seeds distinct from the classifier's fit seed and from the benchmark's.
The first test to read fits the shape classifier (a few seconds); the rest reuse it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from attnlens._errors import AttnlensError
from attnlens.shapes import ATTRIBUTES, BACKGROUNDS, SHAPES, Reading, Scene, iter_scenes, read, read_many, render
from attnlens.shapes import oracle

TEST_SEED = 2024
N_HELD_OUT = 300


def _held_out(n: int = N_HELD_OUT, seed: int = TEST_SEED) -> list[Scene]:
    assert seed != oracle.FIT_SEED
    return list(iter_scenes(n, seed=seed))


def _vae_like(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 0.8), shift each channel a little and add a little pixel noise."""
    out = ndimage.gaussian_filter(image.astype(np.float64), sigma=(0.8, 0.8, 0))
    out += rng.normal(0.0, 5.0, size=3) + rng.normal(0.0, 3.0, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _accuracy(scenes: list[Scene], images: list[np.ndarray]) -> tuple[dict[str, float], float]:
    readings = read_many(images)
    hits = {k: 0 for k in ATTRIBUTES}
    all_ok = 0
    for scene, r in zip(scenes, readings):
        ok = True
        for k in ATTRIBUTES:
            good = r.found and r.attributes[k] == getattr(scene, k)
            hits[k] += good
            ok &= good
        all_ok += ok
    return {k: v / len(scenes) for k, v in hits.items()}, all_ok / len(scenes)


def test_per_attribute_accuracy_on_held_out_renders() -> None:
    scenes = _held_out()
    per_attribute, _ = _accuracy(scenes, [render(s)[0] for s in scenes])
    assert all(v >= 0.99 for v in per_attribute.values()), per_attribute


def test_small_objects_every_shape_and_colour() -> None:
    scenes = [Scene(shape, colour, "small", "center", background, rotation=7.0, scale=0.92)
              for shape in SHAPES for colour in oracle.COLOURS for background in ("black", "gray")]
    for s in scenes:
        r = read(render(s)[0])
        assert r.found and r.attributes == s.attributes(), (s, r.attributes)


def test_mask_matches_render_mask() -> None:
    ious = []
    for s in _held_out(60, seed=TEST_SEED + 1):
        image, mask = render(s)
        r = read(image)
        assert r.mask.shape == (64, 64) and r.mask.dtype == bool
        ious.append((r.mask & mask).sum() / (r.mask | mask).sum())
    assert np.mean(ious) > 0.98 and min(ious) > 0.9


def test_vae_like_degraded_renders_still_read() -> None:
    rng = np.random.default_rng(TEST_SEED + 2)
    scenes = _held_out(seed=TEST_SEED + 3)
    per_attribute, all_ok = _accuracy(scenes, [_vae_like(render(s)[0], rng) for s in scenes])
    assert all_ok >= 0.95, per_attribute
    assert all(v >= 0.95 for v in per_attribute.values()), per_attribute


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_background_finds_nothing(background: str) -> None:
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    r = read(image)
    assert not r.found
    assert r.reason.startswith("no object found")
    assert r.attributes == {} and r.confidence == {}
    assert r.mask.shape == (64, 64) and not r.mask.any()


def test_noise_and_specks_find_nothing() -> None:
    rng = np.random.default_rng(0)
    assert not read(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).found
    specks = np.full((64, 64, 3), 10, dtype=np.uint8)
    specks[30:33, 30:33] = (220, 30, 30)  # 9 px, under MIN_AREA
    r = read(specks)
    assert not r.found and r.reason.startswith("no object found")


def test_second_object_is_ignored_and_noted() -> None:
    image = render(Scene("circle", "red", "large", "left", "black"))[0].copy()
    image[40:50, 42:52] = (30, 70, 230)
    r = read(image)
    assert r.attributes["shape"] == "circle" and r.attributes["colour"] == "red"
    assert "ignored" in r.reason


SCENE = Scene("star", "orange", "large", "right", "black", dx=1.0, dy=-1.5, rotation=-6.0)


def test_other_input_forms_read_the_same() -> None:
    image, _ = render(SCENE)
    expected = SCENE.attributes()
    upscaled = np.asarray(Image.fromarray(image).resize((128, 128), Image.BILINEAR))
    rgba = np.concatenate([image, np.full((64, 64, 1), 255, dtype=np.uint8)], axis=-1)
    forms = {
        "uint8": image,
        "float": image.astype(np.float32) / 255.0,
        "pil": Image.fromarray(image),
        "128x128": upscaled,
        "128x128 pil": Image.fromarray(upscaled),
        "rgba": rgba,
        "rgba pil": Image.fromarray(rgba, "RGBA"),
        "int64": image.astype(np.int64),
    }
    for name, form in forms.items():
        r = read(form)
        assert r.found and r.attributes == expected, name
        assert r.mask.shape == (64, 64), name


def test_grayscale_reads_everything_but_colour() -> None:
    image, _ = render(SCENE)
    gray = np.asarray(Image.fromarray(image).convert("L"))
    for form in (gray, gray[..., None], Image.fromarray(gray)):
        r = read(form)
        assert r.found
        assert {k: r.attributes[k] for k in ("shape", "size", "position", "background")} == {
            k: getattr(SCENE, k) for k in ("shape", "size", "position", "background")}


@pytest.mark.parametrize("bad", [
    None,
    "image.png",
    [[0, 1], [2, 3]],
    np.zeros((3, 64, 64), dtype=np.uint8),  # channel-first
    np.zeros((64, 64, 2), dtype=np.uint8),
    np.zeros((2, 64, 64, 3), dtype=np.uint8),  # a batch: use read_many
    np.zeros((0, 64, 3), dtype=np.uint8),
    np.full((64, 64, 3), -0.5),  # [-1, 1] range
    np.full((64, 64, 3), 300),
    np.full((64, 64, 3), np.nan),
    np.zeros((64, 64, 3), dtype=bool),
])
def test_bad_input_raises(bad: object) -> None:
    with pytest.raises(AttnlensError, match="(?i)expected a PIL.Image"):
        read(bad)


def test_read_many_and_determinism() -> None:
    scenes = _held_out(12, seed=TEST_SEED + 4)
    images = [render(s)[0] for s in scenes]
    many = read_many(np.stack(images))
    assert all(isinstance(r, Reading) for r in many)
    again = [read(im) for im in images]
    for a, b in zip(many, again):
        assert a.attributes == b.attributes and a.confidence == b.confidence
        assert np.array_equal(a.mask, b.mask)
    with pytest.raises(AttnlensError):
        read_many(images[0])


def test_confidences_are_probabilities() -> None:
    for s in _held_out(30, seed=TEST_SEED + 5):
        r = read(render(s)[0])
        assert set(r.confidence) == set(ATTRIBUTES)
        assert all(0.0 <= v <= 1.0 for v in r.confidence.values())
    exact = read(render(Scene("circle", "green", "large", "center", "white"))[0])
    assert exact.confidence["colour"] > 0.9 and exact.confidence["background"] > 0.9
