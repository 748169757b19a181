"""Probing: collection invariants, shards and resume, data-parallel collection, grouped CV, bad input."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

import attnlens
import attnlens._collect as collect_module
from attnlens import AttnlensError, Features, Selector, capture, collect, load_features, probe, probe_heatmap, shapes

STEPS = 2
SITES = Selector(kind=None, layers=["mid.*", "up.1.0.*"])
WORDS = {"shape": "{shape}", "colour": "{colour}", "end": "<end>"}


def scenes():
    return shapes.grid(shape=["star", "circle", "heart"], colour=["red", "blue"], size="large", position="center",
                       background="black")


def run(pipe, **kw):
    args = dict(words=WORDS, seeds=2, sites=SITES, num_inference_steps=STEPS, progress=False, batch_size=4)
    args.update(kw)
    return collect(pipe, scenes(), **args)


@pytest.fixture(scope="module")
def reference(pipe):
    return run(pipe)


def assert_same(a: Features, b: Features) -> None:
    assert a.keys() == b.keys()
    for key in a.keys():
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=str(key))
    cols = ["prompt", "seed", "shape", "colour"]
    pd.testing.assert_frame_equal(a.y[cols].astype(str), b.y[cols].astype(str))


# ------------------------------------------------------------------------------------------ collection
def test_features_equal_the_caches_word_maps_and_self_maps(pipe, reference):
    f = reference
    assert len(f) == 12 and f.features == ["self", "shape", "colour", "end"]
    assert f.labels == list(shapes.ATTRIBUTES)
    batch = f.y.iloc[:4]  # the first pipeline call of the collection
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
    with capture(pipe, layers=["mid.0.cross", "up.1.0.cross"], dtype=torch.float32) as cross, \
            capture(pipe, layers=["mid.0.self", "up.1.0.self"], store_resolution=4, dtype=torch.float32) as selfs:
        pipe(batch["prompt"].tolist(), num_inference_steps=STEPS, generator=gens, output_type="latent")
    for i, row in batch.iterrows():
        for layer in ("mid.0.cross", "up.1.0.cross"):
            for step in range(STEPS):
                for name, word in (("shape", row["shape"]), ("colour", row["colour"]), ("end", "<end>")):
                    want = cross.word_map(word, prompt=i, layers=[layer], steps=[step]).flatten().numpy()
                    np.testing.assert_allclose(f[name, layer, step][i], want, atol=1e-6)
        for layer in ("mid.0.self", "up.1.0.self"):
            for step in range(STEPS):
                np.testing.assert_allclose(f["self", layer, step][i], selfs[layer, step][i].flatten().numpy(), atol=1e-6)
    assert f["self", "up.1.0.self", 0].shape == (12, 4**4)  # 8x8 queries and keys pooled to 4x4
    np.testing.assert_allclose(f["self", "up.1.0.self", 0].reshape(12, 16, 16).sum(-1), 1.0, atol=1e-5)
    assert f["shape", "up.1.0.cross", 1].shape == (12, 64)
    # groups: one per prompt, the two seeds of a prompt share it
    assert f.groups.max() + 1 == 6 and (f.y.groupby(f.groups)["seed"].nunique() == 2).all()


def test_a_generation_does_not_depend_on_its_batch(pipe, reference):
    assert_same(reference, run(pipe, batch_size=5))


def test_collection_stops_the_pipeline_after_the_last_selected_step(pipe, reference):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        f = collect(pipe, scenes()[:1], words="{shape}", sites=Selector(layers="mid.0.cross", steps=[0, 1]),
                    num_inference_steps=10, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 1 of 10: one UNet call each (CFG is batched)
    assert f.keys() == [("{shape}", "mid.0.cross", 0), ("{shape}", "mid.0.cross", 1)]
    early = run(pipe, sites=Selector(kind=None, layers=["mid.*", "up.1.0.*"], steps=[0]))
    for key in early.keys():  # stopping early changes nothing that is read
        np.testing.assert_allclose(early[key], reference[key], atol=1e-5, err_msg=str(key))


def test_paper_style_prompts_with_labels_and_per_prompt_words(pipe):
    prompts = ["a red car", "a blue car", "a dog standing in the park", "a rabbit standing in the park"]
    f = collect(pipe, prompts, labels={"kind": ["car", "car", "animal", "animal"]},
                words={"object": ["car", "car", "dog", "rabbit"], "end": "<end>"},
                sites=Selector(layers="mid.0.cross", steps=[-1]), num_inference_steps=STEPS, progress=False)
    assert f.keys() == [("object", "mid.0.cross", 1), ("end", "mid.0.cross", 1)]
    assert list(f.y["kind"]) == ["car", "car", "animal", "animal"] and list(f.y["seed"]) == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------ shards and resume
def test_resume_after_a_crash_loses_and_duplicates_nothing(pipe, reference, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    real = collect_module._generate
    calls = []

    def crashing(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(collect_module, "_generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(pipe, out=out, batch_size=2, shard_size=4)  # 3 shards of 4; crashes inside the second shard
    assert sorted(p.name for p in (out / "shards").glob("shard-*")) == ["shard-000000.safetensors"]
    (out / "shards" / ".shard-000001.safetensors.tmp-99999").write_bytes(b"half a shard")  # a torn write
    with pytest.raises(AttnlensError, match="incomplete: 2 of 3 shard"):
        load_features(out)

    calls.clear()
    monkeypatch.setattr(collect_module, "_generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    f = run(pipe, out=out, batch_size=2, shard_size=4)
    assert len(calls) == 4  # only the two missing shards were generated
    assert_same(reference, f)
    index = pd.read_csv(out / "index.csv")
    assert list(index["item"]) == list(range(12)) and not index.duplicated(["prompt", "seed"]).any()
    assert not list((out / "shards").glob(".*tmp*"))
    calls.clear()
    assert_same(reference, run(pipe, out=out, batch_size=2, shard_size=4))  # complete: nothing to redo
    assert calls == []
    assert_same(reference, load_features(out))
    keep = (f.y["seed"] == 1).to_numpy()
    sub = f.select(keep)  # lazy rows of the shard directory
    assert len(sub) == 6 and list(sub.y["seed"]) == [1] * 6
    np.testing.assert_allclose(sub["shape", "mid.0.cross", 1], reference["shape", "mid.0.cross", 1][keep], atol=1e-6)
    assert np.array_equal(sub.groups, reference.groups[keep])


def test_a_shard_directory_from_another_configuration_is_refused(pipe, tmp_path):
    out = tmp_path / "feats"
    run(pipe, out=out, shard_size=6)
    with pytest.raises(AttnlensError, match="another configuration.*num_inference_steps: 2 there, 3 here"):
        run(pipe, out=out, shard_size=6, num_inference_steps=3)
    with pytest.raises(AttnlensError, match="another configuration.*words"):
        run(pipe, out=out, shard_size=6, words={"shape": "{shape}"})
    with pytest.raises(AttnlensError, match="another configuration.*items"):
        run(pipe, out=out, shard_size=6, seeds=[0, 5])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_gives_the_one_process_set(reference, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_probing import run
        from attnlens._testing import tiny_pipeline
        f = run(tiny_pipeline(), out=sys.argv[1], shard_size=2, batch_size=2)
        assert len(f) == 12
    """))
    out = tmp_path / "feats"
    launcher = Path(sys.executable).parent / "accelerate"  # --multi_gpu: its multi-process launcher (torchrun);
    # without GPUs the processes run on the CPU. (Its --cpu flag starts one process unless MPI is set up.)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                           str(script), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same(reference, load_features(out))
    from safetensors import safe_open

    ranks = []
    for path in sorted((out / "shards").glob("shard-*.safetensors")):
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads(fh.metadata()["attnlens"])
        ranks.append((meta["rank"], meta["world"]))
    assert ranks == [(k % 2, 2) for k in range(6)]  # every rank made its own shard set
    assert len(pd.read_csv(out / "index.csv")) == 12


# ------------------------------------------------------------------------------------------ probes
class IndexSpy(ClassifierMixin, BaseEstimator):
    """Records which rows (column 0 holds the row number) it trains and tests on."""

    log: list = []

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        IndexSpy.log.append(("train", X[:, 0].astype(int)))
        return self

    def predict(self, X):
        IndexSpy.log.append(("test", X[:, 0].astype(int)))
        return np.full(len(X), self.classes_[0])


def planted(n_prompts=24, n_seeds=4, signal=5.0, seed=0):
    rng = np.random.default_rng(seed)
    colour = np.repeat(np.array(["red", "blue", "green"])[np.arange(n_prompts) % 3], n_seeds)
    y = pd.DataFrame({"colour": colour, "prompt": np.repeat(np.arange(n_prompts), n_seeds),
                      "seed": np.tile(np.arange(n_seeds), n_prompts)})
    X = rng.normal(size=(len(y), 12))
    X[:, 1] += signal * (colour == "red")
    X[:, 2] += signal * (colour == "blue")
    X[:, 0] = np.arange(len(y))
    return Features({("w", "mid.0.cross", 0): X, ("w", "mid.0.cross", 1): rng.normal(size=(len(y), 12))}, y)


@pytest.mark.parametrize("group_by", ["prompt", "seed", "both"])
def test_grouped_cv_never_shares_a_group_between_train_and_test(group_by):
    f = planted()
    IndexSpy.log = []
    df = probe(f, "colour", model=IndexSpy(), cv=4, group_by=group_by, control=False, sites=["mid.0.cross@0"])
    assert len(df) == 1 and df.folds[0] >= 2
    cols = {"prompt": ["prompt"], "seed": ["seed"], "both": ["prompt", "seed"]}[group_by]
    log = IndexSpy.log
    assert len(log) == 2 * df.folds[0]
    tested = []
    for (kind_a, train), (kind_b, test) in zip(log[::2], log[1::2]):
        assert (kind_a, kind_b) == ("train", "test")
        assert not set(train) & set(test)
        for c in cols:
            assert not set(f.y[c].iloc[train]) & set(f.y[c].iloc[test]), c
        tested += list(test)
    assert len(tested) == len(set(tested))  # each sample tested at most once
    if group_by != "both":
        assert sorted(tested) == list(range(len(f)))


def test_batched_logreg_agrees_with_scikit_learn():
    """The default probe is solved in torch for all folds at once; it must be scikit-learn's estimator."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from attnlens._probing import _logreg_accuracies

    rng = np.random.default_rng(3)
    n, d = 240, 20
    y = rng.integers(0, 4, n)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, d)  # unequal scales: standardising matters
    X[:, :4] += 3.0 * np.eye(4)[y] * X[:, :4].std(0)
    X[:, 7] = 2.0  # a constant column
    y[:3] = 3  # class 3 appears in few rows, so some folds train without it ...
    splits = [(np.arange(60, n), np.arange(60)), (np.arange(0, 180), np.arange(180, n)),
              (np.flatnonzero(y != 3), np.flatnonzero(y == 3))]  # ... and one fold never sees it
    labels = [y, rng.permutation(y)]
    fast = _logreg_accuracies(X, labels, splits, max_iter=1000, tol=1e-8)
    for j, yy in enumerate(labels):
        for f, (tr, te) in enumerate(splits):
            est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, tol=1e-10)).fit(X[tr], yy[tr])
            pred = est.predict(X[te])
            assert abs(fast[j, f] - np.mean(pred == yy[te])) <= 1 / len(te) + 1e-9, (j, f)
    assert fast[0, 0] > 0.6 and fast[0, 2] == 0.0  # the signal is found; an unseen class is never predicted


def test_planted_signal_is_found_and_the_shuffled_control_is_at_chance():
    f = planted()
    df = probe(f, "colour", cv=4).set_index("site")
    hit, noise = df.loc["mid.0.cross@0"], df.loc["mid.0.cross@1"]
    assert hit.accuracy > 0.9 and hit.ci_low <= hit.accuracy <= hit.ci_high and hit.interval >= 0
    assert abs(hit.permutation - 1 / 3) < 0.2 and abs(hit.control - 1 / 3) < 0.2 and hit.selectivity > 0.5
    assert abs(noise.accuracy - 1 / 3) < 0.2 and abs(noise.selectivity) < 0.25
    assert hit.baseline < 0.5 and hit.n == 96 and hit.n_classes == 3
    from joblib import parallel_backend

    with parallel_backend("threading"):  # the n_jobs path, without starting worker processes
        pd.testing.assert_frame_equal(probe(f, "colour", cv=4, n_jobs=2), df.reset_index())  # parallel = serial
    mlp = probe(f, "colour", cv=4, model="mlp", sites=["mid.0.cross@0"], control=False).iloc[0]
    assert mlp.accuracy > 0.9 and np.isnan(mlp.control)


def test_probe_on_collected_features_and_heatmap(reference):
    df = probe(reference, ["shape", "colour"], cv=3, sites=Selector(layers="up.1.0.*", steps=[1]))
    assert set(df["feature"]) == {"shape", "colour", "end", "self"} and set(df["site"]) == {"up.1.0.cross@1", "up.1.0.self@1"}
    assert len(df) == 8 and df["accuracy"].between(0, 1).all() and list(df.columns[:8]) == [
        "site", "layer", "step", "feature", "attribute", "accuracy", "ci_low", "ci_high"]
    full = probe(reference, "shape", cv=3, feature="end", control=False)
    fig = probe_heatmap(full, "shape")
    z = np.asarray(fig.data[0].z)
    assert z.shape == (2, STEPS) and list(fig.data[0].y) == ["mid.0.cross", "up.1.0.cross"]
    assert len(probe_heatmap(df).data) == 8  # 4 features x 2 attributes


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors(pipe, reference):
    with pytest.raises(AttnlensError, match=r"word 'car' \(feature 'car'\) is absent from 1 of 2 prompt.*'a blue boat'"):
        collect(pipe, ["a red car", "a blue boat"], words="car", num_inference_steps=STEPS, progress=False)
    with pytest.raises(AttnlensError, match="names 'shap'.*not a label"):
        run(pipe, words="{shap}")
    with pytest.raises(AttnlensError, match="label and prompt counts differ: 3 label rows for 2 prompts"):
        collect(pipe, ["a red car", "a blue car"], labels={"c": ["r", "b", "g"]}, words="car", progress=False)
    with pytest.raises(AttnlensError, match="label and feature counts differ"):
        Features({("w", "mid.0.cross", 0): np.zeros((5, 3))}, pd.DataFrame({"c": list("aabb")}))
    with pytest.raises(AttnlensError, match="matches no layer"):
        run(pipe, sites=Selector(layers="up.7.*"))
    with pytest.raises(AttnlensError, match=r"step\(s\) \[9\] out of range"):
        run(pipe, sites=Selector(steps=[9]))
    with pytest.raises(AttnlensError, match=r"site\(s\) 'down.0.0.cross@1' were not captured; captured: mid.0"):
        probe(reference, "shape", sites=["down.0.0.cross@1"])
    with pytest.raises(AttnlensError, match="feature.*'colour_word'.*not collected"):
        probe(reference, "shape", feature="colour_word")
    with pytest.raises(AttnlensError, match="unknown attribute.*'hue'"):
        probe(reference, "hue")
    lonely = Features({("w", "l", 0): np.zeros((5, 2))}, pd.DataFrame({"c": list("aabbx"), "prompt": range(5)}))
    with pytest.raises(AttnlensError, match=r"class\(es\) 'x' of attribute 'c' have a single sample"):
        probe(lonely, "c", cv=2)
    with pytest.raises(AttnlensError, match=r"'a' of attribute 'c' occur in a single prompt group"):
        probe(Features({("w", "l", 0): np.zeros((4, 2))}, pd.DataFrame({"c": list("aabb"), "prompt": [0, 0, 1, 2]})),
              "c", cv=2)
    with pytest.raises(AttnlensError, match="model must be one of"):
        probe(reference, "shape", model="svm")
    with pytest.raises(AttnlensError, match="not an attnlens feature directory"):
        load_features(Path(attnlens.__file__).parent)


# ------------------------------------------------------------------------------------------ control tasks
def typed(signal_word: float, signal_colour: float, n_prompts: int = 60, n_seeds: int = 2, seed: int = 0) -> Features:
    """Each prompt reads one of 6 words and has a colour drawn independently of its word; the feature
    carries the word identity with strength ``signal_word`` and the colour with ``signal_colour``."""
    rng = np.random.default_rng(seed)
    word = np.repeat(np.arange(n_prompts) % 6, n_seeds)
    colour = np.repeat(rng.permutation(np.arange(n_prompts) % 3), n_seeds)
    y = pd.DataFrame({"word": np.array(list("abcdef"))[word], "colour": np.array(["red", "green", "blue"])[colour],
                      "prompt": np.repeat(np.arange(n_prompts), n_seeds), "seed": np.tile(np.arange(n_seeds), n_prompts)})
    X = rng.normal(size=(len(y), 12))
    X[:, :6] += signal_word * np.eye(6)[word]
    X[:, 6:9] += signal_colour * np.eye(3)[colour]
    return Features({("w", "mid.0.cross", 0): X}, y)


def test_control_task_scores_high_for_a_probe_that_memorises_input_types():
    """The feature knows only which word it belongs to: a fixed random colour per word is easy to fit, so the
    Hewitt-Liang control is high (the words recur across prompt folds) and selectivity is negative, while the
    permutation baseline stays at chance and says nothing."""
    row = probe(typed(4.0, 0.0), "colour", cv=4, control_by="word").iloc[0]
    assert row.control > 0.9 and row.control_seen == 1.0 and row.control_by == "word"
    assert abs(row.accuracy - 1 / 3) < 0.2 and abs(row.permutation - 1 / 3) < 0.2 and row.selectivity < -0.4
    per_prompt = probe(typed(4.0, 0.0), "colour", cv=4).iloc[0]  # per-prompt types never recur in a test fold
    assert per_prompt.control_by == "prompt" and per_prompt.control_seen == 0.0


def test_a_feature_with_real_signal_has_positive_selectivity():
    row = probe(typed(0.0, 4.0), "colour", cv=4, control_by="word").iloc[0]
    assert row.accuracy > 0.9 and abs(row.control - 1 / 3) < 0.25 and row.selectivity > 0.4
    mlp = probe(typed(0.0, 4.0), "colour", cv=4, control_by="word", model="mlp").iloc[0]
    assert mlp.accuracy > 0.9 and mlp.selectivity > 0.3
    one_seed = probe(typed(0.0, 4.0, n_seeds=1), "colour", cv=4, control_by="seed").iloc[0]
    assert np.isnan(one_seed.control) and np.isnan(one_seed.selectivity) and not np.isnan(one_seed.permutation)
    with pytest.raises(AttnlensError, match="control_by names unknown column.*'hue'.*valid: 'word', 'colour'"):
        probe(typed(0.0, 4.0), "colour", control_by="hue")


# ------------------------------------------------------------------------------------------ the study's claims
def study_module():
    from benchmarks import probing_study

    return probing_study


def claim_world(study, claim_true: bool, n_prompts: int = 72, n_seeds: int = 2):
    """Synthetic study features: the shape word's map (steps 0 and 6), self-attention, and the text-only
    feature. Where the claims are true the map knows the colour and the text and self-attention do not; where
    they are false the text and self-attention know it better than the map does."""
    rng = np.random.default_rng(1)
    shape = np.repeat(np.arange(n_prompts) % 3, n_seeds)
    colour = np.repeat(rng.permutation(np.arange(n_prompts) % 3), n_seeds)
    y = pd.DataFrame({"shape": np.array(["star", "circle", "heart"])[shape],
                      "colour": np.array(["red", "green", "blue"])[colour],
                      "prompt": np.repeat(np.arange(n_prompts), n_seeds), "seed": np.tile(np.arange(n_seeds), n_prompts)})
    n = len(y)
    knows = lambda strength: rng.normal(size=(n, 8)) + strength * np.concatenate([np.eye(3)[colour], np.eye(3)[shape],
                                                                                    np.zeros((n, 2))], 1)
    other = 0.0 if claim_true else 10.0
    X = {("shape_word", "down.0.0.cross", 0): knows(2.0), ("shape_word", "down.0.0.cross", 6): knows(2.0),
         ("self", "down.0.0.self", 0): knows(other), ("self", "down.0.0.self", 6): knows(other)}
    feats = Features(X, y)
    text = Features({("shape_word", study.TEXT, 0): knows(other)}, y)
    return feats, text


@pytest.mark.parametrize("claim_true", [True, False])
def test_the_study_says_disagrees_where_a_claim_is_false(claim_true):
    study = study_module()
    feats, text = claim_world(study, claim_true)
    out = study.run_study(feats, text, [0, 6], cv=3, cv_eval=4, models=("logreg",))
    got = {c["id"]: c for c in out["claims"]}
    want = "agrees" if claim_true else "disagrees"
    for cid in ("cross_beyond_text_colour", "self_poor_colour"):
        c = got[cid]
        assert c["verdict"] == want, (cid, c)
        lo, hi = c["interval"]
        assert lo <= c["difference"] <= hi and set(c["per_probe"]) == {"logreg"}
    assert got["self_layout_position"]["verdict"] == "untested"   # no oracle labels in this world
    table = out["table"]
    assert set(table["layer"]) == {"down.0.0.cross", "down.0.0.self", study.TEXT} and table["control_by"].notna().all()
    held = out["held_out"]
    assert set(held["steps"]) >= {"0", "6", "image", "text"} and (held["n"] == out["n_evaluation"]).all()
    assert out["n_selection"] + out["n_evaluation"] == len(feats)


def test_study_verdict_rule_and_halves():
    study = study_module()
    v = study.claim_verdict
    assert v(0.05, 0.2, 0.02) == "agrees" and v(-0.1, 0.01, 0.02) == "disagrees"
    assert v(0.0, 0.1, 0.02) == "inconclusive" and v(np.nan, np.nan, 0.0) == "inconclusive"
    feats, _ = claim_world(study, True)
    sel, ev = study.halves(feats)
    assert not set(feats.groups[sel]) & set(feats.groups[ev]) and sel.sum() == ev.sum()


def test_text_only_baseline_reads_the_encoder_at_the_features_word(pipe, reference):
    study = study_module()
    text = study.text_only(pipe, reference, words=WORDS)
    assert text.keys() == [(w, study.TEXT, 0) for w in WORDS] and len(text) == len(reference)
    assert (text.groups == reference.groups).all()
    row = 3
    prompt, shape = reference.y["prompt"].iloc[row], reference.y["shape"].iloc[row]
    tok = pipe.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0][0].float().numpy()
    where = [i for i, t in enumerate(tok.convert_ids_to_tokens(ids[0].tolist())) if t.startswith(shape)]
    np.testing.assert_allclose(text["shape", study.TEXT, 0][row], hidden[where].mean(0), atol=1e-5)
    same_prompt = np.flatnonzero(reference.groups == reference.groups[row])
    assert len(same_prompt) == 2 and np.allclose(*text["end", study.TEXT, 0][same_prompt])  # seeds share the text


def test_the_study_reruns_on_another_model_with_no_code_change(pipe):
    """The whole analysis (tables, held-out sites, text-only baseline, claims) on a tiny random model."""
    study = study_module()
    scenes = shapes.grid(shape=["star", "circle", "heart"], colour=["red", "blue"], size=["large", "small"],
                         position=["left", "right"], background="black")
    feats = collect(pipe, scenes, words=study.WORDS, seeds=2, sites=Selector(kind=None, layers=["mid.*"], steps=[0, 1]),
                    num_inference_steps=STEPS, progress=False, batch_size=8)
    out = study.run_study(feats, study.text_only(pipe, feats), [0, 1], cv=2, cv_eval=2, models=("logreg",))
    assert set(out["table"]["feature"]) == set(study.FEATURES) and "background" not in set(out["table"]["attribute"])
    assert {c["verdict"] for c in out["claims"]} <= {"agrees", "disagrees", "inconclusive", "untested"}
    assert len(out["step0"]) == 4 and json.dumps(out["claims"], default=float)


# ------------------------------------------------------------------ the recipe in the package (issue 21)
RECIPE = ("ATTRS", "SEEN", "WORDS", "FEATURES", "CONTROL_BY", "TEXT", "SCENE_SEED", "SPLIT_SEED", "CLAIMS",
          "balanced_scenes", "seen", "verdict", "claim_verdict", "text_only")


def test_the_study_recipe_has_one_home_in_the_package():
    """benchmarks/probing_study.py uses the package's recipe objects and defines none of them itself."""
    import ast

    from attnlens.shapes import probestudy

    study = study_module()
    for name in RECIPE:
        assert getattr(study, name) is getattr(probestudy, name), name
    tree = ast.parse(Path(study.__file__).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    assert defined.isdisjoint(RECIPE), sorted(defined & set(RECIPE))


@pytest.mark.parametrize("stem", ["probing_study", "probing_study_quick"])
def test_the_recipe_rebuilds_the_recorded_prompts_and_split(stem):
    """The recorded study's prompt list and halves come back from the package's recipe: the labels of
    ``balanced_scenes(prompts, scene_seed)`` times the recorded seeds, grouped by prompt as collect groups them,
    split by ``halves(split_seed)``, give the record's half sizes, the selection table's class counts and the
    held-out table's majority share (``chance``) of every prompt attribute."""
    from attnlens import results_dir
    from attnlens.shapes import probestudy

    study = study_module()
    results = results_dir(f"{stem}.json")
    meta = json.loads((results / f"{stem}.json").read_text())
    table = pd.read_csv(results / f"{stem}.csv")
    held = pd.read_csv(results / f"{stem}_summary.csv", dtype={"steps": str})
    scenes = probestudy.balanced_scenes(meta["prompts"], seed=meta["scene_seed"])
    assert meta["scene_seed"] == probestudy.SCENE_SEED and meta["split_seed"] == probestudy.SPLIT_SEED
    assert meta["control_by"] == probestudy.CONTROL_BY
    rows = pd.DataFrame([s.prompt_row() for s in scenes])
    y = rows.loc[rows.index.repeat(meta["seeds"])].reset_index(drop=True)
    y.insert(1, "seed", np.tile(np.arange(meta["seeds"]), len(scenes)))
    assert len(y) == meta["generations"]
    sel, ev = study.halves(Features({}, y), seed=meta["split_seed"])
    assert (int(sel.sum()), int(ev.sum())) == (meta["selection_generations"], meta["evaluation_generations"])
    for a in probestudy.ATTRS:
        recorded_classes = set(table.loc[(table["attribute"] == a) & (table["layer"] != probestudy.TEXT), "n_classes"])
        assert recorded_classes == {y.loc[sel, a].nunique()}, a
        rows_a = held[held["attribute"] == a]
        assert set(rows_a["n"]) == {int(ev.sum())}, a
        chance = y.loc[ev, a].value_counts(normalize=True).max()
        np.testing.assert_allclose(rows_a["chance"], chance, atol=1e-4, err_msg=a)
