"""Attribute probes on attention features: grouped cross-validation, baseline, control task, selectivity.

For every feature key ``(feature, layer, step)`` and attribute, :func:`probe` fits a scikit-learn
classifier in ``cv`` folds that never share a group between train and test, and reports:

* ``accuracy``: mean test accuracy over the folds, with a 95% t-interval over folds (``ci_low``,
  ``ci_high``; ``interval`` is its half-width);
* ``baseline``: the accuracy of predicting the training fold's majority class;
* ``permutation``: the same probe, same folds, trained and tested on the labels shuffled across samples
  (a seeded permutation, class frequencies kept). It rules out a pipeline that scores above chance
  with no information at all (a leak between folds, a bug in the scoring); under grouped folds it sits
  at chance by construction, so it says nothing about what the probe can memorise;
* ``control``: the Hewitt and Liang (2019) **control task**: every *input type* (the value of the
  ``control_by`` columns, e.g. the word whose map is read, or the prompt) gets one fixed random label,
  the same for all its samples; the same probe is fitted on the same folds. A probe expressive enough to
  memorise which type an input is scores high on it wherever the test types also occur in training
  (``control_seen`` is that fraction of test samples), whatever the attribute;
* ``selectivity``: ``accuracy - control``. High accuracy with low selectivity means the probe can get
  the answer by recognising input types, not necessarily by reading the attribute; high selectivity
  rules that out. It does not say *where* the information comes from (the text encoder, the image):
  that takes a baseline feature (a text-only probe) on the same folds.

The folds of an attribute are computed once and reused at every site, so sites are compared on the
same splits.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ._features import Features, Key, site_name
from ._errors import AttnlensError, choices
from ._layers import LayerTable
from ._select import Selector

MODELS = ("logreg", "mlp")
GROUP_BY = ("prompt", "seed", "both")
COLUMNS = ["site", "layer", "step", "feature", "attribute", "accuracy", "ci_low", "ci_high", "interval", "baseline",
           "permutation", "control", "selectivity", "control_seen", "n", "n_classes", "folds", "model", "group_by",
           "control_by"]


def _estimator(model: Any, seed: int):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=100))
    if model == "mlp":  # the paper's probe: two linear layers with a ReLU between them
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=300,
                                                             random_state=seed))
    if hasattr(model, "fit") and hasattr(model, "predict"):
        return clone(model)
    raise AttnlensError(f"model must be one of {choices(MODELS)} or a scikit-learn classifier, not {model!r}")


def _groups(features: Features, group_by: Any) -> tuple[str, np.ndarray, np.ndarray | None]:
    """``(name, groups, second groups for 'both')``."""
    if isinstance(group_by, str):
        if group_by not in GROUP_BY:
            raise AttnlensError(f"group_by must be one of {choices(GROUP_BY)} or an array of group ids, not {group_by!r}")
        if group_by == "prompt":
            return "prompt", features.groups, None
        if "seed" not in features.y:
            raise AttnlensError(f"group_by={group_by!r} needs a 'seed' column in the labels; they have "
                                f"{choices(features.y.columns)}")
        seeds = pd.factorize(features.y["seed"])[0]
        return (group_by, seeds, None) if group_by == "seed" else ("both", features.groups, seeds)
    groups = np.asarray(group_by)
    if groups.shape != (len(features),):
        raise AttnlensError(f"label and group counts differ: {len(groups)} group ids for {len(features)} samples")
    return "custom", groups, None


def _splits(y: np.ndarray, groups: np.ndarray, second: np.ndarray | None, cv: int, seed: int,
            attribute: str, group_name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    values, counts = np.unique(y, return_counts=True)
    if len(values) < 2:
        raise AttnlensError(f"attribute {attribute!r} has a single class ({values[0]!r}) in these samples: "
                            "nothing to decode")
    single = [v for v, c in zip(values, counts) if c < 2]
    if single:
        raise AttnlensError(f"class(es) {choices(single)} of attribute {attribute!r} have a single sample; every class "
                            "needs at least 2 (collect more, or drop those samples)")
    for g, name in ((groups, group_name), (second, "seed")):
        if g is None:
            continue
        lonely = [v for v in values if len(np.unique(g[y == v])) < 2]
        if lonely:
            raise AttnlensError(f"class(es) {choices(lonely)} of attribute {attribute!r} occur in a single {name} "
                                "group, so grouped cross-validation can never both train and test on them; add "
                                "prompts or seeds, or drop those samples")
        if len(np.unique(g)) < cv:
            raise AttnlensError(f"cv={cv} folds need at least {cv} {name} groups; there are {len(np.unique(g))}")
    if cv < 2:
        raise AttnlensError(f"cv must be >= 2, got {cv}")
    if second is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the least populated class has fewer than n_splits"
            return [(tr, te) for tr, te in StratifiedGroupKFold(cv, shuffle=True, random_state=seed).split(
                np.zeros(len(y)), y, groups)]
    rng = np.random.default_rng(seed)

    def fold_of(g):
        ids = np.unique(g)
        fold = dict(zip(rng.permutation(ids), np.arange(len(ids)) % cv))
        return np.array([fold[v] for v in g])

    fp, fs = fold_of(groups), fold_of(second)
    out = []
    for k in range(cv):
        train, test = np.flatnonzero((fp != k) & (fs != k)), np.flatnonzero((fp == k) & (fs == k))
        if len(test) and len(train):
            out.append((train, test))
    if len(out) < 2:
        raise AttnlensError("group_by='both' left fewer than 2 usable folds; use more prompts and seeds or fewer folds")
    return out


def _fit_score(est, X, y, train, test) -> float:
    ytr = y[train]
    if len(np.unique(ytr)) < 2:  # a fold whose training part has one class: the classifier is that constant
        return float(np.mean(y[test] == ytr[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: max_iter is part of the probe's definition
        est.fit(X[train], ytr)
    return float(np.mean(est.predict(X[test]) == y[test]))


def _logreg_accuracies(X: np.ndarray, labels: Sequence[np.ndarray],
                       splits: Sequence[tuple[np.ndarray, np.ndarray]], C: float = 1.0, max_iter: int = 100,
                       tol: float = 1e-4) -> np.ndarray:
    """Test accuracy of standardise + L2 multinomial logistic regression, every (labels, fold) problem at once.

    The problem of labels ``j`` and fold ``f`` is scikit-learn's ``make_pipeline(StandardScaler(),
    LogisticRegression(C=C))`` fitted on ``X[train_f]``, ``labels[j][train_f]`` and scored on the test rows: it
    minimises ``C * sum(cross-entropy) + ||W||^2 / 2`` (the intercept unpenalised) over the classes present in
    its training rows. All problems are solved jointly by L-BFGS in float64 (their objectives are
    independent, so the joint minimum is each one's minimum), which costs a few batched matrix products
    instead of ``len(labels) * len(splits)`` separate fits: the reason probing every site of a study takes
    seconds rather than minutes. A test checks it agrees with scikit-learn.

    Args:
        X: ``(n, d)`` features.
        labels: label arrays of length ``n`` (the attribute; its shuffled control), any dtype.
        splits: ``(train indices, test indices)`` per fold.

    Returns:
        ``(len(labels), len(splits))`` test accuracies.
    """
    import torch

    n, d = X.shape
    P = len(labels) * len(splits)
    classes = np.unique(np.concatenate([np.asarray(y).astype(str) for y in labels]))
    K = len(classes)
    codes = [np.searchsorted(classes, np.asarray(y).astype(str)) for y in labels]
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    train = torch.zeros(P, n, dtype=torch.float64)
    Y = torch.as_tensor(np.repeat(np.stack(codes), len(splits), axis=0), dtype=torch.long)  # (P, n)
    present = torch.zeros(P, K, dtype=torch.bool)
    for j, code in enumerate(codes):
        for f, (tr, _) in enumerate(splits):
            p = j * len(splits) + f
            train[p, tr] = 1.0
            present[p, np.unique(code[tr])] = True
    counts = train.sum(1, keepdim=True)  # (P, 1)
    mean = (train @ Xt) / counts  # (P, d): each problem standardises on its own training rows
    var = (train @ Xt.pow(2)) / counts - mean.pow(2)
    std = var.clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns: scale 1, as StandardScaler
    onehot = torch.nn.functional.one_hot(Y, K).to(torch.float64)  # (P, n, K)
    # a class missing from a fold's training rows can never be predicted, as in scikit-learn
    absent = torch.where(present, 0.0, -1e4).to(torch.float64).unsqueeze(1)  # (P, 1, K)
    W = torch.zeros(P, d, K, dtype=torch.float64, requires_grad=True)  # in standardised units, as penalised
    b = torch.zeros(P, 1, K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")
    scale = float(counts.mean())

    def logits() -> torch.Tensor:
        # standardising is folded into the weights, so X is multiplied once for all problems:
        # ((X - mean) / std) @ W = X @ (W / std) - mean @ (W / std)
        weff = W / std.unsqueeze(-1)  # (P, d, K)
        out = (Xt @ weff.permute(1, 0, 2).reshape(d, P * K)).view(n, P, K).permute(1, 0, 2)
        return out - (mean.unsqueeze(1) @ weff) + b + absent  # (P, n, K)

    def objective() -> torch.Tensor:
        opt.zero_grad()
        ce = -(onehot * torch.log_softmax(logits(), dim=-1)).sum(-1)  # (P, n)
        loss = (C * (ce * train).sum() + 0.5 * W.pow(2).sum()) / scale
        loss.backward()
        return loss

    opt.step(objective)
    with torch.no_grad():
        pred = logits().argmax(-1)  # (P, n)
    acc = np.empty((len(labels), len(splits)))
    for j in range(len(labels)):
        for f, (_, te) in enumerate(splits):
            p = j * len(splits) + f
            acc[j, f] = float((pred[p, te] == Y[p, te]).double().mean())
    return acc


def _interval(acc: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if len(acc) < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc)))
    return half, half


def _control_types(features: Features, control_by: Any) -> tuple[str, np.ndarray]:
    """``(name, type id per sample)`` for the control task: the joint value of the ``control_by`` columns."""
    if control_by is None:
        control_by = "prompt"
    cols = [control_by] if isinstance(control_by, str) else list(control_by)
    if not cols:
        raise AttnlensError("control_by is empty: name the label column(s) whose value is an input type, or 'prompt'")
    valid = list(features.labels) + [c for c in ("prompt", "seed") if c in features.y]
    bad = [c for c in cols if c not in features.y or c not in valid]
    if bad:
        raise AttnlensError(f"control_by names unknown column(s) {choices(bad)}; valid: {choices(valid)}")
    joint = features.y[cols].astype(str).agg("|".join, axis=1)
    return "+".join(cols), pd.factorize(joint)[0]


def _control_labels(y: np.ndarray, types: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Hewitt-Liang control labels: each type gets one random class of ``y``, classes spread as evenly over
    the types as their number allows (so the control is not degenerate when there are few types)."""
    rng = np.random.default_rng([seed, 2, salt])
    classes = np.unique(y)
    n_types = int(types.max()) + 1
    pool = np.resize(rng.permutation(classes), n_types)
    return pool[rng.permutation(n_types)][types]


def _seen_fraction(types: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The fraction of test samples whose control type also occurs in the training rows (mean over folds)."""
    return float(np.mean([float(np.isin(types[te], types[tr]).mean()) for tr, te in splits]))


def fold_scores(X: np.ndarray, labels: Sequence[np.ndarray], splits: Sequence[tuple[np.ndarray, np.ndarray]],
                model: Any = "logreg", seed: int = 0) -> np.ndarray:
    """Test accuracy of the probe ``model`` on every label array and fold: ``(len(labels), len(splits))``.

    The same probe :func:`probe` fits (``"logreg"`` in one batched solve, anything else one scikit-learn
    fit per problem); a study that compares two features on the same folds pairs these per-fold scores.
    """
    X = np.asarray(X, dtype=np.float32)
    if model == "logreg":
        return _logreg_accuracies(X, [np.asarray(y) for y in labels], splits)
    return np.array([[_fit_score(_estimator(model, seed), X, np.asarray(y), tr, te) for tr, te in splits]
                     for y in labels])


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` with its 95% t-interval (``nan`` bounds for < 2 values)."""
    values = np.asarray(values, dtype=float)
    half, _ = _interval(values)
    mean = float(values.mean())
    return mean, mean - half, mean + half


def _select_keys(features: Features, sites: Any, feature: Any) -> list[Key]:
    keys = features.keys()
    if feature is not None:
        want = [feature] if isinstance(feature, str) else list(feature)
        bad = [f for f in want if f not in features.features]
        if bad:
            raise AttnlensError(f"feature(s) {choices(bad)} were not collected; collected: {choices(features.features)}")
        keys = [k for k in keys if k[0] in want]
    if sites is None:
        return keys
    have_layers = list(dict.fromkeys(k[1] for k in keys))
    if isinstance(sites, Selector):
        if not features.layers:
            raise AttnlensError("these features carry no layer table, so a Selector cannot filter them; pass a list "
                                "of (layer, step) sites")
        table = LayerTable(features.layers[n] for n in have_layers if n in features.layers)
        names = set(sites.match(table).names())
        steps = sites.step_indices(features.n_steps) if features.n_steps else None
        picked = [k for k in keys if k[1] in names and (steps is None or k[2] in steps)]
        if not picked:
            raise AttnlensError(f"the selector picks no captured site; captured steps: "
                                f"{sorted({k[2] for k in keys}, key=str)}, layers: {choices(have_layers)}")
        return picked
    want = []
    for s in sites:
        if isinstance(s, str):
            layer, _, step = s.partition("@")
            s = (layer, None if step in ("", "mean") else int(step))
        want.append(tuple(s))
    have = {(k[1], k[2]) for k in keys}
    bad = [w for w in want if w not in have]
    if bad:
        raise AttnlensError(f"site(s) {choices(site_name(*b) for b in bad)} were not captured; captured: "
                            f"{', '.join(site_name(*h) for h in sorted(have, key=str)[:12])}"
                            f"{' ...' if len(have) > 12 else ''}")
    return [k for k in keys if (k[1], k[2]) in want]


def probe(
    features: Features,
    attribute: str | Sequence[str],
    *,
    sites: Selector | Sequence[Any] | None = None,
    feature: str | Sequence[str] | None = None,
    model: Any = "logreg",
    cv: int = 5,
    group_by: str | Sequence = "prompt",
    control: bool = True,
    control_by: str | Sequence[str] | None = None,
    seed: int = 0,
    n_jobs: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit a probe per feature key and attribute; return a tidy DataFrame, one row per (key, attribute).

    Args:
        features: from :func:`attnlens.collect` or :func:`attnlens.load_features` (or hand-made).
        attribute: a label column, or several.
        sites: restrict to a :class:`~attnlens.Selector` or to a list of ``(layer, step)`` /
            ``"layer@step"`` sites (``None``: every collected site).
        feature: restrict to these feature names (word features or ``"self"``).
        model: ``"logreg"`` (standardise + L2 multinomial logistic regression, ``C=1``: scikit-learn's
            ``make_pipeline(StandardScaler(), LogisticRegression())``, solved in torch for all folds and the
            control of a site at once, at most 100 L-BFGS iterations; a test checks it agrees with
            scikit-learn), ``"mlp"`` (standardise + a 2-layer MLP with 128 hidden units, the paper's probe)
            or any scikit-learn classifier (cloned per fit).
        cv: number of folds.
        group_by: ``"prompt"`` (no prompt in both train and test), ``"seed"`` (no seed in both), ``"both"``
            (neither: fold ``k`` tests on prompts of prompt-fold ``k`` x seeds of seed-fold ``k`` and trains on
            the other prompts x other seeds, so each fold uses about ``(1 - 1/cv)**2`` of the data to train),
            or an array of group ids.
        control: also fit the permutation baseline and the control task (triples the cost).
        control_by: what an *input type* of the control task is: a label column (``"shape"``: the word
            whose map a ``"{shape}"`` feature reads), several (their joint value), ``"prompt"`` or
            ``"seed"``; default ``"prompt"``. Each type gets one fixed random label. Under prompt-grouped
            folds per-prompt types never recur in a test fold, so that control sits at chance by
            construction (``control_seen`` 0); choose types that recur across folds (a word) to test
            memorisation. With a single input type there is no control task (``control`` is NaN).
        seed: seeds the folds, the permutation, the control labels and the MLP.
        n_jobs: fit keys in parallel with joblib (``None``: one process).
        progress: show a progress bar over keys.

    Returns:
        DataFrame with columns ``site, layer, step, feature, attribute, accuracy, ci_low, ci_high, interval,
        baseline, permutation, control, selectivity, control_seen, n, n_classes, folds, model, group_by,
        control_by`` (module docs: what each rules out).

    Example:
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> y = pd.DataFrame({"colour": np.repeat(["red", "blue"], 40), "prompt": np.arange(80) // 4})
        >>> X = rng.normal(size=(80, 10)); X[:, 0] += np.where(y.colour == "red", 3.0, -3.0)
        >>> df = probe(Features({("word", "mid.0.cross", 0): X}, y), "colour", cv=4)
        >>> row = df.iloc[0]
        >>> row.site, bool(row.accuracy > 0.95), bool(row.baseline <= 0.6), bool(abs(row.permutation - 0.5) < 0.25)
        ('mid.0.cross@0', True, True, True)
        >>> bool(row.selectivity > 0.3), row.control_by, float(row.control_seen)   # per-prompt types never recur
        (True, 'prompt', 0.0)
    """
    if not isinstance(features, Features):
        raise AttnlensError(f"probe takes attnlens Features (from collect or load_features), not {type(features).__name__}")
    attributes = [attribute] if isinstance(attribute, str) else list(attribute)
    bad = [a for a in attributes if a not in features.labels]
    if bad:
        raise AttnlensError(f"unknown attribute(s) {choices(bad)}; the labels are {choices(features.labels)}")
    keys = _select_keys(features, sites, feature)
    group_name, groups, second = _groups(features, group_by)
    name = model if isinstance(model, str) else type(model).__name__
    _estimator(model, seed)  # validate early
    control_name, types = _control_types(features, control_by)
    plans = {}
    for salt, a in enumerate(attributes):
        y = features.y[a].astype(str).to_numpy()
        splits = _splits(y, groups, second, cv, seed, a, group_name)
        baseline = []
        for tr, te in splits:
            values, counts = np.unique(y[tr], return_counts=True)
            baseline.append(float(np.mean(y[te] == values[np.argmax(counts)])))
        shuffled = np.random.default_rng([seed, 1]).permutation(y)
        one_type = len(np.unique(types)) < 2  # a single input type: the control would be a constant label
        plans[a] = (y, splits, float(np.mean(baseline)), shuffled,
                    None if one_type else _control_labels(y, types, seed, salt), _seen_fraction(types, splits))

    def run(key: Key) -> list[dict]:
        X = np.asarray(features[key], dtype=np.float32)
        if X.shape[0] != len(features):
            raise AttnlensError(f"label and feature counts differ: {key} has {X.shape[0]} rows for {len(features)} labels")
        rows = []
        for a, (y, splits, base, shuffled, typed, seen) in plans.items():
            # logreg: every fold, the permutation and the control task in one batched solve
            extra = ([shuffled] + ([] if typed is None else [typed])) if control else []
            scores = fold_scores(X, [y, *extra], splits, model, seed)
            acc = scores[0]
            perm = float(scores[1].mean()) if control else np.nan
            ctrl = float(scores[2].mean()) if control and typed is not None else np.nan
            half, _ = _interval(acc)
            mean = float(acc.mean())
            rows.append({
                "site": site_name(key[1], key[2]), "layer": key[1], "step": key[2], "feature": key[0], "attribute": a,
                "accuracy": mean, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half), "interval": half,
                "baseline": base, "permutation": perm, "control": ctrl, "selectivity": mean - ctrl,
                "control_seen": seen if control else np.nan, "n": len(y), "n_classes": len(np.unique(y)),
                "folds": len(splits), "model": name, "group_by": group_name, "control_by": control_name,
            })
        return rows

    if n_jobs not in (None, 1):
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(run)(k) for k in keys)
    else:
        it = keys
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(keys, desc="probe", unit="site")
        results = [run(k) for k in it]
    return pd.DataFrame([r for rs in results for r in rs], columns=COLUMNS)


def probe_heatmap(df: pd.DataFrame, attribute: str | Sequence[str] | None = None, *, feature: str | None = None,
                  value: str = "accuracy"):
    """A plotly heat map of ``value`` by layer (rows, execution order) and step (columns), one panel per
    attribute (and one row of panels per feature when ``df`` holds several).

    Example:
        >>> df = pd.DataFrame({"layer": ["a", "a", "b", "b"], "step": [0, 1, 0, 1], "feature": "w",
        ...                    "attribute": "colour", "accuracy": [0.5, 0.6, 0.7, 0.9]})
        >>> fig = probe_heatmap(df)
        >>> fig.data[0].z.tolist()
        [[0.5, 0.6], [0.7, 0.9]]
    """
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise AttnlensError("probe_heatmap needs plotly: pip install plotly (or attnlens[book])") from None
    need = {"layer", "step", "feature", "attribute", value}
    if not need <= set(df.columns):
        raise AttnlensError(f"the table lacks column(s) {choices(sorted(need - set(df.columns)))}; pass probe()'s output")
    if attribute is not None:
        want = [attribute] if isinstance(attribute, str) else list(attribute)
        bad = [a for a in want if a not in set(df["attribute"])]
        if bad:
            raise AttnlensError(f"attribute(s) {choices(bad)} not in the table; it has {choices(df['attribute'].unique())}")
        df = df[df["attribute"].isin(want)]
    if feature is not None:
        if feature not in set(df["feature"]):
            raise AttnlensError(f"feature {feature!r} not in the table; it has {choices(df['feature'].unique())}")
        df = df[df["feature"] == feature]
    if df.empty:
        raise AttnlensError("nothing to plot: the table is empty")
    attrs, feats = list(dict.fromkeys(df["attribute"])), list(dict.fromkeys(df["feature"]))
    titles = [f"{f}: {a}" if len(feats) > 1 else a for f in feats for a in attrs]
    fig = make_subplots(rows=len(feats), cols=len(attrs), subplot_titles=titles, shared_yaxes=False,
                        horizontal_spacing=0.08, vertical_spacing=0.12 if len(feats) > 1 else 0.1)
    lo, hi = (-1.0, 1.0) if value == "selectivity" else (0.0, 1.0)
    for r, f in enumerate(feats, 1):
        for c, a in enumerate(attrs, 1):
            part = df[(df["feature"] == f) & (df["attribute"] == a)]
            if part.empty:
                continue
            layers = list(dict.fromkeys(part["layer"]))
            steps = sorted(part["step"].unique(), key=lambda s: (s is None, s))
            grid = part.pivot_table(index="layer", columns="step", values=value, aggfunc="mean").reindex(
                index=layers, columns=steps)
            fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[str(s) for s in steps], y=layers, zmin=lo, zmax=hi,
                                     colorscale="Viridis", coloraxis="coloraxis",
                                     hovertemplate=f"layer %{{y}}<br>step %{{x}}<br>{value} %{{z:.3f}}<extra>{f}: {a}</extra>"),
                          row=r, col=c)
            fig.update_yaxes(autorange="reversed", row=r, col=c)
            fig.update_xaxes(title_text="step", row=r, col=c)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": lo, "cmax": hi, "colorbar": {"title": value}},
                      height=max(320, 260 * len(feats)), width=max(420, 330 * len(attrs)),
                      title=f"probe {value} by layer and step")
    return fig
