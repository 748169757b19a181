"""Interactive widgets for Jupyter (ipywidgets): an attention explorer and an editing lab.

They need a running kernel to react; in a static HTML page (the built book) they show the state they
had when the page was executed. Both are ``ipywidgets.VBox`` subclasses: display them as the last
expression of a cell. Their controls and outputs are attributes, so a script (or a test) can set
values and read what changed.

Example:
    >>> from attnlens._testing import tiny_pipeline
    >>> explorer = AttentionExplorer(tiny_pipeline(), "a red star", num_inference_steps=2)
    >>> explorer.word.options
    ('a', 'red', 'star')
    >>> before = explorer.heat.value
    >>> explorer.word.value = "a"
    >>> explorer.heat.value != before  # the map and its scale are redrawn for the new word
    True
"""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as w
import torch
from PIL import Image

from ._methods import METHODS as _EDIT_METHODS
from ._errors import AttnlensError, choices
from ._layers import layers as list_layers
from .viz import as_image, overlay, with_colour_bar

__all__ = ["AttentionExplorer", "EditingLab", "METHODS", "USES_CONTROLS", "reading_table"]

METHODS: tuple[str, ...] = tuple(_EDIT_METHODS)
"""The editing methods the lab offers, which are those of :func:`attnlens.edit`."""

ALL = "all"


def _png(image: Image.Image, tile: int) -> bytes:
    buf = io.BytesIO()
    resample = Image.NEAREST if image.size[0] < tile else Image.BILINEAR
    image.convert("RGB").resize((tile, tile), resample).save(buf, format="PNG")
    return buf.getvalue()


def _png_keep(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` at its own size (a map with its colour bar is not square)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _captioned(image: w.Image, caption: str) -> w.VBox:
    return w.VBox([w.HTML(f"<b>{html.escape(caption)}</b>"), image])


def _generator(seed: int) -> torch.Generator:
    """A CPU generator: the same start noise on any device, as :func:`attnlens.edit` draws it."""
    return torch.Generator().manual_seed(int(seed))


class AttentionExplorer(w.VBox):
    """Generate an image, then pick a step, a cross-attention layer and a word to see its map.

    Controls: ``prompt`` (Text), ``seed`` (IntText), ``generate_button`` (Button); ``step``, ``layer``
    and ``word`` (Dropdowns; ``"all"`` averages over steps or layers). Outputs: ``image`` (the
    generation), ``overlay`` (the contours of the word's map over it, so the object keeps its colours) and
    ``heat`` (the map alone with a colour bar, at the chosen layer's resolution or the largest one), all ``ipywidgets.Image`` PNGs, and ``caption`` (HTML).
    After :meth:`generate`, ``cache`` is the :class:`~attnlens.AttentionCache` and ``generated`` the
    PIL image.

    Args:
        pipe: a Stable Diffusion-family pipeline (:func:`attnlens.load_pipeline`).
        prompt, seed: the first generation's prompt and seed.
        num_inference_steps, guidance_scale: passed to the pipeline.
        tile: display size of each picture, in pixels.
        generate: generate at once (otherwise on the first button click or :meth:`generate`).
    """

    def __init__(self, pipe: Any, prompt: str = "a large red star on the left", seed: int = 0, *,
                 num_inference_steps: int = 20, guidance_scale: float = 7.5, tile: int = 192, generate: bool = True) -> None:
        prompt_box = w.Text(value=prompt, description="prompt", layout=w.Layout(width="32em"))
        seed_box = w.IntText(value=seed, description="seed", layout=w.Layout(width="12em"))
        button = w.Button(description="generate", button_style="primary")
        step = w.Dropdown(description="step", options=[ALL], layout=w.Layout(width="14em"))
        layer = w.Dropdown(description="layer", options=[ALL], layout=w.Layout(width="22em"))
        word = w.Dropdown(description="word", options=[], layout=w.Layout(width="16em"))
        image, over, heat = (w.Image(format="png") for _ in range(3))
        caption = w.HTML()
        super().__init__(children=[
            w.HBox([prompt_box, seed_box, button]),
            w.HBox([word, step, layer]),
            w.HBox([_captioned(image, "generated"), _captioned(over, "the word map's contours over the image"),
                    _captioned(heat, "the map alone, with its scale")]),
            caption,
        ])
        self.pipe, self.tile = pipe, tile
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.prompt, self.seed, self.generate_button = prompt_box, seed_box, button
        self.step, self.layer, self.word = step, layer, word
        self.image, self.overlay, self.heat, self.caption = image, over, heat, caption
        self.cache = None
        self.generated: Image.Image | None = None
        self._updating = False
        button.on_click(lambda _: self.generate())
        for control in (step, layer, word):
            control.observe(lambda _: self.refresh(), names="value")
        if generate:
            self.generate()

    def generate(self) -> None:
        """Generate ``prompt`` with ``seed``, capturing every cross-attention layer at every step."""
        from ._capture import capture

        self.generate_button.disabled = True
        self.caption.value = "<i>generating…</i>"
        try:
            with capture(self.pipe) as cache:
                out = self.pipe(self.prompt.value, num_inference_steps=self.num_inference_steps,
                                guidance_scale=self.guidance_scale, generator=_generator(self.seed.value))
        finally:
            self.generate_button.disabled = False
        self.cache, self.generated = cache, out.images[0]
        words = cache.words()
        if not words:
            raise AttnlensError(f"the prompt {self.prompt.value!r} has no words to show")
        self._updating = True
        try:
            keep = self.word.value if self.word.value in words else next((x for x in words if x not in ("a", "an", "the")), words[0])
            self.word.options = words
            self.word.value = keep
            self.step.options = [(ALL, ALL)] + [(str(s), s) for s in cache.steps]
            self.step.value = ALL
            infos = [i for i in cache.layers.values() if i.kind == "cross"]
            self.layer.options = [(ALL, ALL)] + [(f"{i.name} ({i.resolution[0]}x{i.resolution[1]})", i.name) for i in infos]
            self.layer.value = ALL
        finally:
            self._updating = False
        self.image.value = _png(self.generated, self.tile)
        self.refresh()

    def refresh(self) -> None:
        """Redraw the overlay and the map for the current word, step and layer."""
        if self._updating or self.cache is None or self.word.value is None:
            return
        steps = None if self.step.value == ALL else [self.step.value]
        every = [n for n, i in self.cache.layers.items() if i.kind == "cross"]
        layers = every if self.layer.value == ALL else [self.layer.value]
        heat = self.cache.word_map(self.word.value, layers=layers, steps=steps)
        scale = (0.0, max(float(heat.max()), 1e-12))  # attention is a probability: the bar starts at 0
        self.overlay.value = _png(overlay(self.generated, heat, scale=scale), self.tile)
        self.heat.value = _png_keep(with_colour_bar(as_image(heat, size=self.tile, scale=scale), scale))
        where = "all cross-attention layers" if self.layer.value == ALL else layers[0]
        when = f"all {len(self.cache.steps)} steps" if steps is None else f"step {steps[0]}"
        self.caption.value = (f"<code>{html.escape(self.word.value)}</code> in “{html.escape(self.prompt.value)}” "
                              f"(seed {self.seed.value}): {html.escape(where)}, {when}, map {heat.shape[0]}x{heat.shape[1]}")


def _resolution_options(pipe: Any) -> list[tuple[str, int]]:
    """(label, side) for each self-attention query-grid side of the model, largest first."""
    sides: dict[int, int] = {}
    for info in list_layers(pipe):
        if info.kind == "self":
            side = max(info.resolution)
            sides[side] = sides.get(side, 0) + 1
    out, total = [], 0
    for side in sorted(sides):
        total += sides[side]
        out.append((f"≤ {side}x{side} ({total} layer{'s' if total > 1 else ''})", side))
    return out[::-1]


class EditingLab(w.VBox):
    """Edit a generation with :func:`attnlens.edit` and read both images with the Shapes oracle.

    Controls: ``source`` and ``target`` (Text), ``method`` (Dropdown of :data:`METHODS`),
    ``resolution`` (Dropdown: self-attention layers whose query grid side is at most this are edited),
    ``step_fraction`` (FloatSlider: the first fraction of the denoising steps is edited), ``seed``
    (IntText), ``run_button``. Outputs: ``source_image`` and ``edited_image`` (``ipywidgets.Image``),
    ``readings`` (HTML table of :func:`attnlens.shapes.oracle.read` on both, changes in bold), and
    ``settings`` (HTML). After :meth:`run`, ``result`` is what :func:`attnlens.edit` returned.

    ``resolution`` defaults to every level but the highest-resolution one (the paper's rule);
    ``resolution`` and ``step_fraction`` are passed to the methods that use them (see
    :data:`USES_CONTROLS`; the others' controls are disabled).
    """

    def __init__(self, pipe: Any, source: str = "a large red star on the left",
                 target: str = "a large blue star on the left", method: str = "fpe", seed: int = 0, *,
                 resolution: int | None = None, step_fraction: float = 0.8, num_inference_steps: int = 20,
                 tile: int = 192, run: bool = True) -> None:
        if method not in METHODS:
            raise AttnlensError(f"method must be one of {choices(METHODS)}, not {method!r}")
        sides = _resolution_options(pipe)
        if not sides:
            raise AttnlensError("the model has no self-attention layer to edit")
        valid = [s for _, s in sides]
        if resolution is None:
            resolution = valid[1] if len(valid) > 1 else valid[0]
        if resolution not in valid:
            raise AttnlensError(f"resolution must be one of the model's self-attention grid sides {valid}, not {resolution!r}")
        if not 0.0 <= step_fraction <= 1.0:
            raise AttnlensError(f"step_fraction must be in [0, 1], not {step_fraction}")
        src = w.Text(value=source, description="source", layout=w.Layout(width="30em"))
        tgt = w.Text(value=target, description="target", layout=w.Layout(width="30em"))
        meth = w.Dropdown(description="method", options=list(METHODS), value=method, layout=w.Layout(width="14em"))
        res = w.Dropdown(description="resolution", options=sides, value=resolution, layout=w.Layout(width="20em"),
                         style={"description_width": "initial"})
        frac = w.FloatSlider(description="step fraction", value=step_fraction, min=0.0, max=1.0, step=0.05,
                             readout_format=".2f", style={"description_width": "initial"})
        seed_box = w.IntText(value=seed, description="seed", layout=w.Layout(width="12em"))
        button = w.Button(description="edit", button_style="primary")
        src_img, edit_img = w.Image(format="png"), w.Image(format="png")
        readings, settings = w.HTML(), w.HTML()
        super().__init__(children=[
            w.HBox([src, seed_box]), w.HBox([tgt, button]), w.HBox([meth, res, frac]),
            w.HBox([_captioned(src_img, "source"), _captioned(edit_img, "edited"), readings]),
            settings,
        ])
        self.pipe, self.tile, self.num_inference_steps = pipe, tile, num_inference_steps
        self.source, self.target, self.method, self.resolution = src, tgt, meth, res
        self.step_fraction, self.seed, self.run_button = frac, seed_box, button
        self.source_image, self.edited_image, self.readings, self.settings = src_img, edit_img, readings, settings
        self.result: Any = None
        button.on_click(lambda _: self.run())
        meth.observe(lambda _: self._enable_controls(), names="value")
        self._enable_controls()
        if run:
            self.run()

    def _enable_controls(self) -> None:
        used = USES_CONTROLS.get(self.method.value, ())
        self.resolution.disabled = "resolution" not in used
        self.step_fraction.disabled = "step_fraction" not in used

    def options(self) -> dict[str, Any]:
        """The keyword options :meth:`run` passes to :func:`attnlens.edit` for the current controls."""
        return _edit_options(self.method.value, self.resolution.value, self.step_fraction.value, self.num_inference_steps)

    def run(self) -> None:
        """Run the edit with the current controls and show both images and their readings."""
        from ._editing import edit
        from .shapes.oracle import read

        self.run_button.disabled = True
        self.settings.value = "<i>editing…</i>"
        try:
            self.result = edit(self.pipe, self.source.value, self.target.value, method=self.method.value,
                                        seed=self.seed.value, **self.options())
        finally:
            self.run_button.disabled = False
        self.source_image.value = _png(self.result.source, self.tile)
        self.edited_image.value = _png(self.result.edited, self.tile)
        self.readings.value = reading_table(read(self.result.source), read(self.result.edited))
        self.settings.value = settings_html(getattr(self.result, "settings", None) or self.options())


USES_CONTROLS: dict[str, tuple[str, ...]] = {
    "fpe": ("resolution", "step_fraction"), "p2p": ("resolution", "step_fraction"), "cross": ("step_fraction",),
    "masactrl": (), "none": (),
}
"""Which of the lab's two schedule controls each method reads (``masactrl`` keeps its own schedule)."""


def _edit_options(method: str, resolution: int, step_fraction: float, num_inference_steps: int) -> dict[str, Any]:
    """Translate the lab's controls into :func:`attnlens.edit` keywords for ``method``.

    - ``fpe``: ``max_resolution`` = resolution, ``steps`` = the first ``step_fraction`` of the schedule;
    - ``p2p``: ``cross_replace_steps`` = step_fraction, ``self_max_resolution`` = resolution (its
      self-attention copy keeps its own step default);
    - ``cross``: ``cross_replace_steps`` = step_fraction;
    - ``masactrl`` and ``none``: their defaults.

    Example:
        >>> _edit_options("fpe", 8, 0.5, 20)
        {'num_inference_steps': 20, 'max_resolution': 8, 'steps': (0.0, 0.5)}
    """
    opts: dict[str, Any] = {"num_inference_steps": int(num_inference_steps)}
    frac = float(step_fraction)
    if method == "fpe":
        opts.update(max_resolution=int(resolution), steps=(0.0, frac))
    elif method == "p2p":
        opts.update(cross_replace_steps=frac, self_max_resolution=int(resolution))
    elif method == "cross":
        opts.update(cross_replace_steps=frac)
    elif method not in METHODS:
        raise AttnlensError(f"method must be one of {choices(METHODS)}, not {method!r}")
    return opts


def settings_html(settings: dict[str, Any]) -> str:
    """One line of ``key=value`` for an edit's settings (prompts left out; edited layers counted)."""
    parts = []
    for key, value in settings.items():
        if key in ("source_prompt", "target_prompt"):
            continue
        if key.endswith("layers") and isinstance(value, (list, tuple)):
            value = f"{len(value)} layers"
        elif key.endswith("layers") and isinstance(value, dict):
            value = ", ".join(f"{k}: {len(v)} layers" if isinstance(v, (list, tuple)) else f"{k}: {v}" for k, v in value.items())
        parts.append(f"<code>{html.escape(str(key))}={html.escape(str(value))}</code>")
    return "settings: " + ", ".join(parts)


def reading_table(source: Any, edited: Any) -> str:
    """An HTML table of two oracle readings side by side; attributes that differ are in bold."""
    if not source.found or not edited.found:
        rows = [("found", str(source.found) + (f" ({source.reason})" if not source.found else ""),
                 str(edited.found) + (f" ({edited.reason})" if not edited.found else ""))]
    else:
        rows = [(k, source.attributes[k], edited.attributes.get(k, "")) for k in source.attributes]
    cells = []
    for name, a, b in rows:
        b_html = f"<b>{html.escape(b)}</b>" if a != b else html.escape(b)
        cells.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(a)}</td><td>{b_html}</td></tr>")
    return ("<table><thead><tr><th>oracle reads</th><th>source</th><th>edited</th></tr></thead><tbody>"
            + "".join(cells) + "</tbody></table>")
