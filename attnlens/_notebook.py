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


def oracle_notice(pipe):
    """In a chapter whose scores read images with the Shapes oracle: nothing on a Shapes model; on any
    other model a Markdown notice (shown as the set-up cell's output) that those readings do not apply
    and that :class:`attnlens.CLIPMetrics` is the measure there.

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
    return Markdown(
        f"**Not a Shapes model** (`{name}`): this chapter's scores read images with the Shapes oracle "
        "(`attnlens.shapes.oracle`), which knows only the Shapes world, so on this model its readings, "
        "verdicts and the numbers taken from them mean nothing. The images, maps and edits are this model's. "
        "Measure edits here with `attnlens.CLIPMetrics` (CLIP score and directional similarity, the paper's "
        "metrics); this chapter does not switch to it by itself.")
