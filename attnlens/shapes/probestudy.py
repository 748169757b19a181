"""The Shapes world's probing study, its recipe (issues 5, 20, 21): the prompts, the words and features it
reads, the oracle's labels, the control tasks, the text-only baseline and the paper's claims as tests.

``benchmarks/probing_study.py`` (in the repository) collects, probes and records the study with this recipe;
chapter 5 of the book imports it to re-run a slice live from a plain ``pip install``, as
:mod:`attnlens.shapes.editbench` is the world's editing benchmark. One home: the benchmark imports every
name below from here.

- :data:`SCENE_SEED`, :func:`balanced_scenes`: the study's prompt list (``balanced_scenes(prompts, SCENE_SEED)``;
  the recorded JSON keeps ``scene_seed`` and ``prompts``).
- :data:`WORDS`, :data:`FEATURES`: what :func:`attnlens.collect` reads: the shape word's, colour word's and end
  token's cross-attention maps, and the self-attention summary (``"self"``).
- :data:`ATTRS`, :data:`SEEN`, :func:`seen`: the prompt's attributes, and what the oracle reads in the image.
- :data:`CONTROL_BY`: each feature's input type for the Hewitt-Liang control task (``attnlens.probe(control_by=)``).
- :data:`TEXT`, :func:`text_only`: the text-only baseline (the text encoder's output at the same token).
- :data:`CLAIMS`, :func:`claim_verdict`, :func:`verdict`: the paper's claims as tests fixed before the run.

Example:
    >>> from attnlens.shapes import probestudy
    >>> scenes = probestudy.balanced_scenes(10, seed=probestudy.SCENE_SEED)
    >>> sorted({s.shape for s in scenes}) == sorted(probestudy.ATTRIBUTES["shape"])  # every value shows up
    True
    >>> probestudy.FEATURES, probestudy.CONTROL_BY["self"]
    (['shape_word', 'colour_word', 'end', 'self'], 'seed')
    >>> probestudy.claim_verdict(0.05, 0.09, threshold=0.02), probestudy.claim_verdict(-0.1, 0.0, threshold=0.02)
    ('agrees', 'disagrees')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._world import ATTRIBUTES, Scene, sample_scene
from .oracle import read

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .._features import Features

__all__ = ["ATTRIBUTES", "ATTRS", "SEEN", "WORDS", "FEATURES", "CONTROL_BY", "TEXT", "SCENE_SEED", "SPLIT_SEED",
           "CLAIMS", "balanced_scenes", "seen", "verdict", "claim_verdict", "text_only"]

ATTRS = list(ATTRIBUTES)  # shape, colour, size, position, background: the labels a prompt's scene gives
SEEN = ["seen_position", "seen_size"]  # the layout of the generated image, as the oracle reads it
WORDS = {"shape_word": "{shape}", "colour_word": "{colour}", "end": "<end>"}  # word features (collect's words=)
FEATURES = [*WORDS, "self"]
CONTROL_BY = {"shape_word": "shape", "colour_word": "colour", "end": "seed", "self": "seed"}
TEXT = "text_encoder"  # the layer name of the text-only baseline's rows

SCENE_SEED = 5  # the seed of the study's prompt list (recorded in its JSON; the book's live slice reuses it)
SPLIT_SEED = 11  # the seed of the selection / evaluation split of the prompts

# The paper's claims as tests, written before the run. Each is "difference > threshold"; the difference's
# 95% interval over paired held-out folds entirely above the threshold agrees, entirely below disagrees.
# "a" and "b" are (feature, step group) pairs: "image" is the best image-step site, "text" the text-only probe.
CLAIMS: list[dict[str, Any]] = [
    {"id": "cross_beyond_text_shape",
     "claim": "cross-attention of the object word decodes the object's category (shape) beyond the text-only probe",
     "test": "held-out accuracy, shape word's map (best image-step site) minus text-only probe (same token), shape",
     "a": ("shape_word", "image"), "b": ("shape_word", "text"), "attribute": "shape", "threshold": 0.02},
    {"id": "cross_beyond_text_colour",
     "claim": "cross-attention of the object word decodes the object's colour beyond the text-only probe",
     "test": "held-out accuracy, shape word's map (best image-step site) minus text-only probe (same token), colour",
     "a": ("shape_word", "image"), "b": ("shape_word", "text"), "attribute": "colour", "threshold": 0.02},
    {"id": "self_poor_shape",
     "claim": "self-attention maps decode the category (shape) poorly compared with cross-attention",
     "test": "held-out accuracy, shape word's map minus self-attention (best image-step sites), shape",
     "a": ("shape_word", "image"), "b": ("self", "image"), "attribute": "shape", "threshold": 0.10},
    {"id": "self_poor_colour",
     "claim": "self-attention maps decode colour poorly compared with cross-attention",
     "test": "held-out accuracy, shape word's map minus self-attention (best image-step sites), colour",
     "a": ("shape_word", "image"), "b": ("self", "image"), "attribute": "colour", "threshold": 0.10},
    {"id": "self_layout_position",
     "claim": "self-attention maps decode layout (the position the oracle reads) well",
     "test": "held-out accuracy of self-attention (best image-step site), seen_position",
     "a": ("self", "image"), "b": None, "attribute": "seen_position", "threshold": 0.80},
    {"id": "self_layout_size",
     "claim": "self-attention maps decode layout (the size the oracle reads) well",
     "test": "held-out accuracy of self-attention (best image-step site), seen_size",
     "a": ("self", "image"), "b": None, "attribute": "seen_size", "threshold": 0.80},
]


def balanced_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes whose every attribute takes each value equally often (up to rounding), combined at random.

    The study's prompt list is ``balanced_scenes(prompts, SCENE_SEED)``; the same ``(n, seed)`` always gives the
    same scenes, so a slice of the list is a slice of the recorded study.

    Example:
        >>> scenes = balanced_scenes(16, seed=0)
        >>> len(scenes), {s.colour for s in scenes} == set(ATTRIBUTES["colour"])
        (16, True)
    """
    rng = np.random.default_rng(seed)
    columns = {}
    for name, values in ATTRIBUTES.items():
        col = np.resize(np.array(values), n)
        rng.shuffle(col)
        columns[name] = col
    return [sample_scene(rng, **{a: str(columns[a][i]) for a in ATTRS}) for i in range(n)]


def seen(image) -> dict[str, Any]:
    """The oracle's reading of one generated image as label columns (``collect``'s ``image_labels=``):
    ``seen_found`` (an object was found) and ``seen_<attribute>`` for each of :data:`ATTRS` ("" where unread).

    ``image``: a PIL image or an ``(H, W, 3)`` array, as :func:`attnlens.shapes.read` takes.

    Example:
        >>> from attnlens import shapes
        >>> image, _ = shapes.render(shapes.Scene("star", "red", "large", "center", "black"))
        >>> labels = seen(image)
        >>> labels["seen_found"], labels["seen_shape"], labels["seen_colour"]
        (True, 'star', 'red')
    """
    r = read(image)
    return {"seen_found": r.found, **{f"seen_{a}": r.attributes.get(a, "") for a in ATTRS}}


def verdict(row: pd.Series) -> str:
    """Whether one probe row decodes its attribute: **yes** when it beats its control task by >= 0.2 and its
    interval clears the control, **weak** when by >= 0.1, **no** otherwise (a description of a row, not a claim).

    ``row``: a row of :func:`attnlens.probe`'s table (``selectivity``, ``ci_low``, ``control``).

    Example:
        >>> import pandas as pd
        >>> verdict(pd.Series({"selectivity": 0.3, "ci_low": 0.7, "control": 0.4}))
        'yes'
    """
    if row.selectivity >= 0.2 and row.ci_low > row.control:
        return "yes"
    return "weak" if row.selectivity >= 0.1 else "no"


def claim_verdict(low: float, high: float, threshold: float) -> str:
    """The claim "difference > threshold" from the difference's interval ``[low, high]``: above the threshold
    agrees, below disagrees, straddling it (or not finite) is inconclusive.

    Example:
        >>> claim_verdict(0.01, 0.2, threshold=0.02)
        'inconclusive'
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if low > threshold:
        return "agrees"
    if high < threshold:
        return "disagrees"
    return "inconclusive"


def text_only(pipe, feats: Features, words: dict[str, str] = WORDS) -> Features:
    """The text-only baseline: the text encoder's output (what the UNet's cross-attention keys and values are
    computed from) at the same token(s) a word feature reads, averaged over them; no image, no UNet.

    ``feats``: features from :func:`attnlens.collect` whose labels hold ``prompt`` and the template's attributes.
    Returns Features with the labels and groups of ``feats`` and keys ``(word feature, TEXT, 0)``,
    ``(n, hidden)`` float32; every seed of a prompt has the same row.

    Example:
        >>> import pandas as pd
        >>> import attnlens
        >>> from attnlens._testing import tiny_pipeline
        >>> pipe = tiny_pipeline()
        >>> labels = pd.DataFrame({"prompt": ["a red star", "a blue heart", "a red star"], "seed": [0, 0, 1],
        ...                        "shape": ["star", "heart", "star"], "colour": ["red", "blue", "red"]})
        >>> text = text_only(pipe, attnlens.Features({}, labels))
        >>> text.keys()[0], text["shape_word", TEXT, 0].shape == (3, pipe.text_encoder.config.hidden_size)
        (('shape_word', 'text_encoder', 0), True)
        >>> bool((text["end", TEXT, 0][0] == text["end", TEXT, 0][2]).all())  # the seeds of a prompt share it
        True
    """
    import pandas as pd
    import torch

    from .._cache import AttentionCache
    from .._features import Features

    y = feats.y
    prompts = y["prompt"].astype(str).tolist()
    uniq = list(dict.fromkeys(prompts))
    first = {p: i for i, p in reversed(list(enumerate(prompts)))}
    tok = pipe.tokenizer
    ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    enc = pipe.text_encoder
    with torch.no_grad():
        hidden = torch.cat([enc(ids[i:i + 256].to(enc.device))[0].float().cpu() for i in range(0, len(uniq), 256)]).numpy()
    cache = AttentionCache({})
    cache.tokens = [tok.convert_ids_to_tokens(row) for row in ids.tolist()]
    labels = y[[c for c in y.columns if c not in ("prompt", "seed")]]
    where = pd.Index(uniq).get_indexer(prompts)
    X = {}
    for name, spec in words.items():
        rows = []
        for j, p in enumerate(uniq):
            word = spec.format(**labels.iloc[first[p]].to_dict()) if isinstance(spec, str) and "{" in spec else spec
            rows.append(hidden[j, cache.token_indices(word, prompt=j)].mean(0))
        X[(name, TEXT, 0)] = np.stack(rows).astype(np.float32)[where]
    return Features(X, y, feats.groups)
