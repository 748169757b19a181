"""Notebook plumbing shared by the chapters, the labs, the CLI and the benchmarks: torch's CPU threads,
where the recorded results are, and the one set-up call every chapter makes first.

Public names: :func:`attnlens.set_threads` and :func:`attnlens.results_dir`; :func:`attnlens.viz.setup_notebook`
(re-exported by :mod:`attnlens.viz`, where the chapters call it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import AttnlensError

THREADS_ENV = "ATTNLENS_THREADS"
BOOK_BUILD_ENV = "ATTNLENS_BOOK_BUILD"  # set by the book's Sphinx extension; its kernels inherit it
OFFLINE_RENDERER = "attnlens_notebook"  # plotly's "notebook" renderer without the CDN MathJax script
PAGE_RENDERER = "attnlens_page"  # the book build's renderer: no plotly.js in the figure (the page loads it once)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count ``set_threads`` picks when nothing asks for one: ``$ATTNLENS_THREADS``, then
    ``$OMP_NUM_THREADS``, then the cores this process may use minus one (at least 1).

    Leaving one core free is the point: torch's CPU threads spin-wait for each other at every parallel
    operation, so when one of them shares a core with another program every operation waits for the
    descheduled thread; measured on 2 cores (issue 21), a 2-thread generation went from 0.76 s to
    51-68 s while another process held one core.

    Example:
        >>> os.environ["ATTNLENS_THREADS"] = "3"
        >>> default_threads()
        3
        >>> del os.environ["ATTNLENS_THREADS"]
    """
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        raw = os.environ.get(var, "").strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                n = 0
            if n < 1:
                raise AttnlensError(f"${var} must be a whole number of threads >= 1, got {raw!r}")
            return n
    return max(1, _available_cores() - 1)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads, and the BLAS/OpenMP pools numpy and scikit-learn use, for this process; return
    the number set.

    ``threads`` defaults to ``default_threads()`` (``$ATTNLENS_THREADS``, ``$OMP_NUM_THREADS``, or the
    available cores minus one). Inter-op threads are set to 1 when torch still allows it. The chapters
    (through :func:`attnlens.viz.setup_notebook`), the ``attnlens`` CLI and the book's build-time benchmark
    call this, so ``ATTNLENS_THREADS=2 scripts/book.sh`` sets the whole build.

    Raises:
        AttnlensError: ``threads`` (or the environment variable) is not a whole number >= 1.

    Example:
        >>> import torch
        >>> set_threads(1), torch.get_num_threads()
        (1, 1)
    """
    import torch

    n = default_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AttnlensError(f"threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: keep torch's
        pass
    try:  # numpy's BLAS and OpenMP pools (scikit-learn's probes) too: with one core busy, a 2-thread BLAS
        from threadpoolctl import threadpool_limits  # spin-waited the MLP probe of chapter 5 to 18x its idle time

        threadpool_limits(limits=n)
    except ImportError:  # scikit-learn brings threadpoolctl; without it only torch's threads are set
        pass
    return n


def _installed_results() -> Path | None:
    """The ``attnlens.results`` package data of an installed (non-editable) wheel, if any: a data-only
    folder beside the package's modules (``attnlens/results/`` in site-packages)."""
    path = Path(__file__).resolve().parent / "results"
    return path if path.is_dir() else None


def results_dir(needs: str | None = None) -> Path:
    """The folder of recorded benchmark results the chapters read (``benchmarks/results/`` of the repository).

    Looked for, in order: the ``attnlens.results`` package data a ``pip install`` of the wheel ships (the
    same files, copied at build time, beside the package's modules); ``benchmarks/results`` in the current
    folder and its parents (a clone: the book runs its chapters from ``book/``, tests from the root). The
    package never looks above its own folder. ``needs`` names a file that must be in the folder.

    Raises:
        FileNotFoundError: no such folder (or none holding ``needs``); the message says where it looked.

    Example:
        >>> (results_dir("shapes_quality.json") / "shapes_quality.json").is_file()
        True
    """
    here = Path.cwd()
    installed = _installed_results()
    candidates = [installed] if installed is not None else []
    candidates += [base / "benchmarks" / "results" for base in (here, *here.parents)]
    for folder in candidates:
        if folder.is_dir() and (needs is None or (folder / needs).is_file()):
            return folder
    what = "benchmarks/results/" + (needs or "")
    raise FileNotFoundError(
        f"{what} not found in the installed results (attnlens.results) or in {here} or its parents: install "
        "attnlens from a wheel (it ships the recorded results), run from inside a clone, or run the benchmark "
        "that writes the file")


def _register_renderers() -> None:
    import plotly.io as pio
    from plotly.io import base_renderers

    class OfflineNotebookRenderer(base_renderers.NotebookRenderer):
        """plotly's ``"notebook"`` renderer (plotly.js inlined once, when activated) minus the MathJax
        ``<script>`` it adds to every figure from a CDN, which an offline page cannot load."""

        def to_mimebundle(self, fig_dict):
            from plotly.io import to_html

            html = to_html(fig_dict, config=self.config, auto_play=self.auto_play, include_plotlyjs=False,
                           include_mathjax=False, post_script=self.post_script, full_html=False,
                           animation_opts=self.animation_opts, default_width="100%", default_height=525,
                           validate=False)
            return {"text/html": html}

    class PageRenderer(OfflineNotebookRenderer):
        """For the book's build: the figure's HTML only, never plotly.js; the book's extension loads one
        copy of plotly.min.js (from the installed plotly) on each page that has a figure."""

        def activate(self):  # no inlined plotly.js bundle
            pass

    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = OfflineNotebookRenderer()
    if PAGE_RENDERER not in pio.renderers:
        pio.renderers[PAGE_RENDERER] = PageRenderer()


def setup_notebook(renderer: str | None = None, threads: int | None = None) -> None:
    """The set-up every chapter and lab calls first.

    - torch's CPU threads: :func:`attnlens.set_threads` (``threads``, ``$ATTNLENS_THREADS``, or the cores minus one);
    - a plotly renderer that works in an offline static page: inside the book's build (``$ATTNLENS_BOOK_BUILD``,
      set by its extension) ``PAGE_RENDERER``, which leaves plotly.js to the page (one file per site);
      elsewhere ``OFFLINE_RENDERER``, plotly's ``"notebook"`` renderer (plotly.js inlined once) without
      the MathJax script it would load from a CDN. ``$ATTNLENS_PLOTLY_RENDERER`` or ``renderer`` choose another;
    - library progress bars and deprecation notices quieted, so pages show only what the chapter prints.

    Example:
        >>> import plotly.io as pio
        >>> setup_notebook(renderer="json", threads=1)
        >>> pio.renderers.default, OFFLINE_RENDERER in pio.renderers, PAGE_RENDERER in pio.renderers
        ('json', True, True)
    """
    import warnings

    set_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    import plotly.io as pio

    _register_renderers()
    default = PAGE_RENDERER if os.environ.get(BOOK_BUILD_ENV) else OFFLINE_RENDERER
    pio.renderers.default = renderer or os.environ.get("ATTNLENS_PLOTLY_RENDERER") or default


# ------------------------------------------------------------------------------------ fitting a model
STORE_RESOLUTIONS = (None, 32, 16, 8)


def capture_settings(pipe, *, kind: str | None = "self", items: int = 1, num_inference_steps: int,
                     steps=None, layers=None, allow_reduce: bool = False, budget: int | None = None,
                     height: int | None = None, width: int | None = None) -> dict:
    """Keywords for :func:`attnlens.capture` that make a chapter's capture fit the memory budget on any
    model: ``{}`` when the full capture fits (the embedded Shapes model), else the largest
    ``store_resolution`` that fits (32, 16 or 8: each map's query and self-attention key grids pooled to
    that side), and, only with ``allow_reduce``, ``reduce="mean"`` (one map per layer instead of one per
    step). The estimate is the one :func:`attnlens.capture` checks before it runs (fp16 maps of ``items``
    prompts of the conditional branch, head mean, plus the working memory of the largest layer).

    Raises:
        AttnlensError: nothing fits; the message gives the smallest estimate.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> capture_settings(tiny_pipeline(), kind="self", items=3, num_inference_steps=20)
        {}
        >>> capture_settings(tiny_pipeline(), kind="self", items=3, num_inference_steps=20, budget=500_000,
        ...                  allow_reduce=True)  # its maps are 8x8 at most: only one map per layer fits
        {'reduce': 'mean'}
    """
    from types import SimpleNamespace

    from ._capture import _MIN_CHUNK, DEFAULT_BUDGET, _Recorder
    from ._layers import layers as list_layers
    from ._select import Selector

    budget = DEFAULT_BUDGET if budget is None else budget
    sel = Selector(layers=layers, kind=kind, steps=steps)
    chosen = sel.match(list_layers(pipe))
    unet_size = pipe.unet.config.sample_size
    unet_size = unet_size if isinstance(unet_size, int) else unet_size[0]
    vae = int(getattr(pipe, "vae_scale_factor", 8))
    latent = ((height // vae) if height else unet_size, (width // vae) if width else unet_size)
    options = [{} if r is None else {"store_resolution": r} for r in STORE_RESOLUTIONS]
    if allow_reduce:
        options += [{**o, "reduce": "mean"} for o in options]
    import torch

    smallest = None
    for option in options:
        rec = _Recorder(sel, None, torch.float16, option.get("reduce"), option.get("store_resolution"), budget, chosen)
        rec.clock = SimpleNamespace(latent_hw=latent, text_len=None)
        rec.steps = sel.step_indices(num_inference_steps)
        rec.rows = [None] * items
        rec.batch = 2 * items  # the classifier-free-guidance batch the layers compute
        # what capture checks: the stored maps plus one layer's working set, with the chunks as small as
        # capture makes them before it gives up
        need = sum(rec.memory(_MIN_CHUNK))
        smallest = need if smallest is None else min(smallest, need)
        if need <= budget:
            return option
    raise AttnlensError(f"no capture setting fits: the smallest needs about {smallest / 2**20:,.1f} MiB, over the "
                        f"budget of {budget / 2**20:,.1f} MiB; capture fewer layers, steps or prompts")


def is_shapes_model(pipe) -> bool:
    """Whether ``pipe`` is a model of the Shapes world, whose images the oracle (``attnlens.shapes.oracle``)
    can read: the embedded model, or a folder with its training record (``training.json``) beside
    ``model_index.json``. On any other model the chapters score with :class:`attnlens.CLIPMetrics` instead.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> import attnlens
        >>> is_shapes_model(attnlens.load_pipeline()), is_shapes_model(tiny_pipeline())
        (True, False)
    """
    from ._pipeline import EMBEDDED_MODEL

    source = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not source:
        return False
    folder = Path(str(source))
    if not folder.is_dir():
        return False
    if folder.resolve() == EMBEDDED_MODEL.resolve():
        return True
    record = folder / "training.json"
    return record.is_file() and "unet_step" in record.read_text()


def oracle_notice(pipe, scope: str = "edits"):
    """In a chapter whose scores read images with the Shapes oracle: nothing on a Shapes model; on any
    other model a Markdown notice (shown as the set-up cell's output) that those readings do not apply.
    ``scope="edits"``: the chapter scores its edits with :class:`attnlens.CLIPMetrics` instead (through
    :func:`attnlens.viz.edit_scorer`, whose ``notice`` also names where CLIP was loaded from); ``"benchmark"``,
    ``"readings"`` and ``"probing"``: see ``EditScorer.notice``.

    Example:
        >>> from attnlens._testing import tiny_pipeline
        >>> import attnlens
        >>> oracle_notice(attnlens.load_pipeline()) is None, "CLIPMetrics" in oracle_notice(tiny_pipeline()).data
        (True, True)
    """
    if is_shapes_model(pipe):
        return None
    from IPython.display import Markdown

    name = getattr(pipe, "name_or_path", None) or type(pipe).__name__
    return Markdown(_notice_text(str(name), scope))


# ------------------------------------------------------------------------------------ scoring edits
CLIP_ENV = "ATTNLENS_CLIP"  # where the chapters load CLIP from on a model other than Shapes
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # CLIPMetrics' default
NOT_MEASURED = ("not measured on this model with the oracle (it reads only Shapes images); "
                "the CLIP figures above are this model's measure")
CLIP_COLUMNS = ("clip_source", "clip_edit", "directional")


def _load_clip(clip=None):
    """``clip`` (a ``CLIPMetrics``, a ``transformers.CLIPModel`` or where to load one), else ``$ATTNLENS_CLIP``,
    else CLIPMetrics' default; an ``AttnlensError`` naming ``$ATTNLENS_CLIP`` when it cannot be loaded."""
    from ._metrics import CLIPMetrics

    if isinstance(clip, CLIPMetrics):
        return clip
    if clip is not None and not isinstance(clip, (str, bytes)) and not hasattr(clip, "__fspath__"):
        return CLIPMetrics(clip)
    source = str(clip) if clip is not None else (os.environ.get(CLIP_ENV, "").strip() or DEFAULT_CLIP)
    try:
        return CLIPMetrics(source)
    except AttnlensError as exc:
        raise AttnlensError(
            f"this is not a Shapes model, so edits are scored with CLIP, but no CLIP model could be loaded from "
            f"{source!r}: set ${CLIP_ENV} to a local folder holding a transformers CLIPModel with safetensors weights "
            f"(for example a copy of {DEFAULT_CLIP}), or to a hub id where the hub can be reached ({exc})") from exc


class EditScorer:
    """How the chapters score edits: with the Shapes oracle on a Shapes model, with CLIP on any other.

    Made by :func:`attnlens.viz.edit_scorer`. ``oracle`` says which; ``clip`` is the
    :class:`attnlens.CLIPMetrics` used on a non-Shapes model (``None`` on a Shapes one).

    - ``score(pair, source, edited)``: one edit's scores as a dict. Oracle: ``editbench.score`` (success,
      leak, kept, iou, ...). CLIP: ``clip_source`` (CLIP score of the source image against the source
      prompt), ``clip_edit`` (of the edit against the target prompt) and ``directional`` (CLIP directional
      similarity: the image change from source to edit against the prompt change), the paper's two metrics.
    - ``clip_table(sources, edits, source_prompts, target_prompts)``: the CLIP columns for ``n`` edits,
      a DataFrame of ``n`` rows.
    - ``summary(frame, by)``: the CLIP columns' means per group (a DataFrame, one row per group).
    - ``not_measured(numbers, texts)``: on a non-Shapes model, glues each name of ``numbers`` as ``nan``
      and each of ``texts`` as the sentence ``NOT_MEASURED``, so a page's oracle figures and verdicts
      are never produced from oracle readings there.
    - ``notice(scope)``: the set-up cell's Markdown notice on a non-Shapes model (``None`` on Shapes).

    Example:
        >>> from attnlens._testing import tiny_pipeline, tiny_clip
        >>> import attnlens
        >>> EditScorer(attnlens.load_pipeline()).oracle, EditScorer(tiny_pipeline(), clip=tiny_clip()).oracle
        (True, False)
    """

    def __init__(self, pipe, clip=None) -> None:
        self.oracle = is_shapes_model(pipe)
        self.model = str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)
        self.clip = None if self.oracle else _load_clip(clip)
        self.clip_source = None if self.oracle else (
            str(clip) if isinstance(clip, (str, bytes)) or hasattr(clip, "__fspath__") else
            "a CLIP model given in code" if clip is not None else os.environ.get(CLIP_ENV, "").strip() or DEFAULT_CLIP)

    def score(self, pair, source, edited) -> dict:
        """One edit's scores (see the class); ``pair`` is an ``editbench.EditPair`` (its prompts are used)."""
        if self.oracle:
            from .shapes import editbench

            return editbench.score(pair, source, edited)
        return self.clip_table([source], [edited], [pair.source_prompt], [pair.target_prompt]).iloc[0].to_dict()

    def clip_table(self, sources, edits, source_prompts, target_prompts):
        """``n`` edits' CLIP figures: a DataFrame with columns ``clip_source``, ``clip_edit``, ``directional``."""
        import pandas as pd

        if self.clip is None:
            raise AttnlensError("clip_table needs CLIP: this scorer reads a Shapes model with the oracle; "
                                "make one with edit_scorer(pipe, clip=...) on another model")
        return pd.DataFrame({
            "clip_source": self.clip.score(sources, source_prompts),
            "clip_edit": self.clip.score(edits, target_prompts),
            "directional": self.clip.directional(sources, edits, source_prompts, target_prompts),
        }).astype(float)

    @staticmethod
    def summary(frame, by="method"):
        """Means of the CLIP columns per value of ``by`` (a column name or list of them)."""
        return frame.groupby(by, sort=False)[list(CLIP_COLUMNS)].mean()

    def view(self, frame, columns):
        """``frame[columns]`` on a Shapes model; on another, the columns it has plus the CLIP columns."""
        if self.oracle:
            return frame[list(columns)]
        return frame[[c for c in columns if c in frame.columns and c not in CLIP_COLUMNS] + list(CLIP_COLUMNS)]

    def box(self, frame, by="method", what="edits on this page"):
        """The "this model and the paper" box on a non-Shapes model, generated from ``frame``'s CLIP figures:
        a Markdown list saying the oracle's figures were not measured and giving each group's mean CLIP score
        and directional similarity."""
        from IPython.display import Markdown

        means = self.summary(frame, by)
        per = "; ".join(f"`{k}`: CLIP score {r['clip_edit']:.1f}, directional {r['directional']:+.2f}"
                        for k, r in means.iterrows())
        return Markdown(
            f"- Not measured on `{self.model}` with the oracle: it reads only Shapes images, and the recorded "
            "benchmarks are the embedded Shapes model's, so neither gives a verdict about this model.\n"
            f"- Measured here with CLIP over the {len(frame)} {what} (means per {by}: CLIP score of the edit against "
            f"its target prompt, directional similarity of the image change against the prompt change): {per}. "
            "A handful of edits with no rule written before the run: figures, no verdict.")

    def not_measured(self, numbers=(), texts=()) -> None:
        """Glue ``numbers`` as ``nan`` and ``texts`` as ``NOT_MEASURED`` (a no-op on a Shapes model)."""
        if self.oracle:
            return
        from IPython.display import Markdown
        from myst_nb import glue

        for name in numbers:
            glue(name, float("nan"), display=False)
        for name in texts:
            glue(name, Markdown(NOT_MEASURED), display=False)

    def notice(self, scope: str = "edits"):
        """The set-up cell's notice on a non-Shapes model, ``None`` on a Shapes model. ``scope``: ``"edits"`` (the
        chapter's edit scores switch to CLIP), ``"benchmark"`` (its records are the Shapes model's, its live
        edits switch to CLIP), ``"readings"`` (it scores no edits; its oracle readings are marked) or
        ``"probing"`` (its probe labels stay the oracle's)."""
        if scope not in NOTICE_SCOPES:
            raise AttnlensError(f"scope must be one of {', '.join(map(repr, NOTICE_SCOPES))}, got {scope!r}")
        if self.oracle:
            return None
        from IPython.display import Markdown

        return Markdown(_notice_text(self.model, scope, self.clip_source))


NOTICE_SCOPES = ("edits", "benchmark", "readings", "probing")


def _notice_text(name: str, scope: str, clip_source: str | None = None) -> str:
    if scope not in NOTICE_SCOPES:
        raise AttnlensError(f"scope must be one of {', '.join(map(repr, NOTICE_SCOPES))}, got {scope!r}")
    head = (f"**Not a Shapes model** (`{name}`): the Shapes oracle (`attnlens.shapes.oracle`) knows only the "
            "Shapes world, so its readings of this model's images mean nothing. ")
    if scope == "probing":
        return head + (
            "This chapter's probes stay labelled by the oracle: the `seen_*` labels (what the oracle reads in each "
            "image) and every figure drawn from them are not measurements on this model; the prompt labels, images, "
            "maps and features are this model's. The editing chapters score edits with `attnlens.CLIPMetrics`.")
    if scope == "readings":
        return head + (
            "This chapter scores no edits: its oracle readings (the layout of Step 1, the readings the ablation "
            "changes) are shown as they come and are not measurements on this model, and its box on the paper says "
            "\"not measured\". The maps, images and pixel changes are this model's. The editing chapters score "
            "edits with `attnlens.CLIPMetrics`.")
    where = (f"loaded from `{clip_source}` (`${CLIP_ENV}`)" if clip_source else
             f"loaded from `${CLIP_ENV}` (default `{DEFAULT_CLIP}`) when the chapter's scorer is made")
    what = ("This chapter's recorded results are the embedded Shapes model's (oracle readings of its images, "
            "named with the model they were recorded on); its live slice is scored with `attnlens.CLIPMetrics` "
            if scope == "benchmark" else
            "This chapter therefore scores its edits with `attnlens.CLIPMetrics` ")
    return head + what + (
        "(CLIP score of each image against its prompt, and CLIP directional similarity, the paper's two metrics), "
        f"{where}, and its oracle figures and verdicts read \"not measured\". The images, maps and edits are this "
        "model's.")


def edit_scorer(pipe, clip=None) -> EditScorer:
    """The scorer the chapters use for edits: the Shapes oracle on a Shapes model (:func:`attnlens.is_shapes_model`),
    :class:`attnlens.CLIPMetrics` on any other, loaded from ``clip`` (a ``CLIPMetrics``, a ``CLIPModel`` or where to
    load one), else ``$ATTNLENS_CLIP`` (a local folder or hub id), else ``openai/clip-vit-large-patch14``.

    Raises:
        AttnlensError: not a Shapes model and no CLIP could be loaded; the message names ``$ATTNLENS_CLIP``.

    Example:
        >>> import attnlens
        >>> edit_scorer(attnlens.load_pipeline()).oracle
        True
    """
    return EditScorer(pipe, clip)
