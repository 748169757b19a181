import numpy as np
import pytest

from attnlens import AttnlensError
from attnlens.shapes import ATTRIBUTES, Scene, ShapesDataset, describe, grid, render, sample_example, sample_scene


def test_render_is_deterministic_and_masks_the_object():
    scene = sample_scene(np.random.default_rng(3))
    a, ma = render(scene)
    b, mb = render(scene)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and ma.dtype == bool
    assert 20 < ma.sum() < 64 * 64 / 2


def test_dataset_items_depend_only_on_seed_and_index():
    one, two = ShapesDataset(100, seed=5), ShapesDataset(100, seed=5)
    assert one[7]["prompt"] == two[7]["prompt"]
    assert np.array_equal(one[7]["pixels"], two[7]["pixels"])
    assert one[7]["prompt"] != ShapesDataset(100, seed=6)[7]["prompt"] or one[8]["prompt"] != ShapesDataset(100, seed=6)[8]["prompt"]
    with pytest.raises(IndexError):
        one[100]


def test_objects_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = sample_scene(rng, size="large")
        _, mask = render(scene)
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), scene


def test_unknown_values_list_the_valid_ones():
    with pytest.raises(AttnlensError, match="valid shape values: .*'circle'"):
        Scene("octagon", "red")
    with pytest.raises(AttnlensError, match="'pink'"):
        grid(colour="mauve")
    with pytest.raises(AttnlensError, match="unknown attribute"):
        sample_scene(np.random.default_rng(0), texture="wood")


def test_prompts_name_the_mentioned_attributes_once():
    rng = np.random.default_rng(1)
    for _ in range(500):
        ex = sample_example(rng)
        for name in ex.mentioned:
            if name != "position":
                assert getattr(ex.scene, name) in ex.prompt.split(), (ex.prompt, name)
        assert ex.prompt.count("center") + ex.prompt.count("middle") <= 1, ex.prompt
    assert describe(Scene("star", "red", "large", "left", "black")) == "a large red star on the left on a black background"


def test_grid_covers_every_combination():
    scenes = grid(shape=["star", "heart"], colour=["red", "blue"], size="small", position="top", background="gray", seeds=2)
    assert len(scenes) == 8
    assert {(s.shape, s.colour) for s in scenes} == {("star", "red"), ("star", "blue"), ("heart", "red"), ("heart", "blue")}
    assert len(grid(seeds=1)) == np.prod([len(v) for v in ATTRIBUTES.values()])
