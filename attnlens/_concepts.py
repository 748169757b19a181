"""Concept maps on joint-attention transformers (SD3, Flux): :func:`concept_map`.

ConceptAttention's idea (Helbling et al., ICML 2025), implemented here from the paper's description: a map
read in the attention *output* space instead of from the attention weights. What this implementation does:

* Each concept word is encoded alone by the pipeline's T5 encoder (SD3's ``text_encoder_3``, Flux's
  ``text_encoder_2``), its word tokens' embeddings (all but the end token) averaged into one token, and
  that token projected by the transformer's own ``context_embedder``: one concept token per word.
* The concept tokens form a residual stream of their own through the joint blocks (SD3's MMDiT blocks,
  Flux's double-stream blocks). After each block's real call, the block is called a second time (a *side
  pass*) on the same image states with the concept tokens in place of the text: each block's text-side
  modules (norms, q/k/v projections, feed-forward) update the concept tokens, whose queries attend to the
  image tokens and to each other. Every output of the side pass except the concept stream is discarded,
  and no real token ever attends to a concept token, so **the concepts do not change the generation**.
  Flux's single-stream blocks are not used (the concept stream ends with the double-stream blocks, as it
  does for SD3 with its last block).
* In each chosen layer and step, ``o_img`` ``(image tokens, heads * dim)`` is the layer's attention output
  for the image tokens in the real call (text-conditioned, before the output projection) and ``o_c``
  ``(concepts, heads * dim)`` the concepts' attention output in the side pass; the layer's map is
  ``softmax over concepts of o_img o_c^T`` per image token. The maps are averaged over the chosen layers and
  steps (each image token's row sums to 1 over the concepts) and read for the conditional branch.

A side pass costs one more call of each joint block at each chosen step (the image tokens are recomputed
and discarded); the real pass keeps its fused attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ._errors import AttnlensError
from ._layers import layers as list_layers
from ._select import Selector

__all__ = ["ConceptMaps", "concept_map"]


@dataclass
class ConceptMaps:
    """The result of :func:`concept_map`.

    Attributes:
        concepts: the concept words, in order.
        maps: ``(concepts, h, w)`` float32 on the CPU: at each image token, the concepts' shares (they sum to 1).
        image: the generated image (unchanged by the concepts); ``pixels``: it as ``(3, H, W)`` floats in [0, 1].
        layers: the joint-attention layers (``joint.{i}``) averaged; ``steps``: the steps averaged.
    """

    concepts: list[str]
    maps: torch.Tensor
    image: Image.Image
    pixels: torch.Tensor
    layers: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __getitem__(self, concept: str) -> torch.Tensor:
        """The ``(h, w)`` map of one concept."""
        if concept not in self.concepts:
            raise AttnlensError(f"no concept {concept!r}; the concepts are {self.concepts}")
        return self.maps[self.concepts.index(concept)]


class _Quiet:
    """A hook that records nothing: it installs the hooked joint processors the taps need."""

    def on_attention(self, *args: Any, **kwargs: Any) -> None:
        return None


def _encoder(pipe: Any) -> tuple[Any, Any]:
    """``(tokenizer, T5 encoder)`` whose embeddings the transformer's ``context_embedder`` takes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model = getattr(pipe, "transformer", None)
    if isinstance(model, FluxTransformer2DModel):
        names = ("tokenizer_2", "text_encoder_2")
    elif isinstance(model, SD3Transformer2DModel):
        names = ("tokenizer_3", "text_encoder_3")
    else:
        from ._layers import get_denoiser

        denoiser = get_denoiser(pipe)  # an unsupported pipeline: the error naming what is supported
        raise AttnlensError(f"concept maps need joint attention (SD3, Flux); this pipeline's denoiser is "
                            f"{type(denoiser).__name__}, whose cross-attention word maps capture(...).word_map gives")
    tok, enc = (getattr(pipe, n, None) for n in names)
    if tok is None or enc is None:
        raise AttnlensError(f"concept maps encode the concepts with the pipeline's T5 encoder (pipe.{names[1]}), "
                            "which this pipeline does not have")
    return tok, enc


def _check_concepts(concepts: Any) -> list[str]:
    if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
        raise AttnlensError(f"concepts must be a non-empty list of words, e.g. ['star', 'background'], not {concepts!r}")
    out = []
    for c in concepts:
        if not isinstance(c, str) or not c.strip():
            raise AttnlensError(f"each concept must be a non-empty string, not {c!r} (concepts: {list(concepts)})")
        if c in out:
            raise AttnlensError(f"concept {c!r} is given twice (concepts: {list(concepts)})")
        out.append(c)
    return out


@torch.no_grad()
def _concept_tokens(pipe: Any, concepts: list[str]) -> torch.Tensor:
    """``(concepts, joint dim)``: each concept's T5 word tokens averaged, projected by the ``context_embedder``."""
    tok, enc = _encoder(pipe)
    device = next(enc.parameters()).device
    rows = []
    for c in concepts:
        ids = tok(c, return_tensors="pt").input_ids
        words = [i for i, t in enumerate(ids[0].tolist()) if t not in (tok.eos_token_id, tok.pad_token_id)]
        if not words:
            raise AttnlensError(f"concept {c!r} has no word token under pipe's T5 tokenizer")
        hidden = enc(ids.to(device))[0][0]
        rows.append(hidden[words].mean(dim=0))
    model = pipe.transformer
    return model.context_embedder(torch.stack(rows).to(model.device, model.dtype))


def concept_map(pipe: Any, prompt: str, concepts: Sequence[str], *, layers: Any = None, steps: Any = None,
                seed: int = 0, num_inference_steps: int | None = None,
                pipe_kwargs: dict | None = None) -> ConceptMaps:
    """Generate ``prompt`` and read concept maps from the attention output space (SD3 and Flux).

    The concepts ride along in a side pass and do not change the image (see the module docstring for the
    method). ``layers``: which joint-attention layers to average (a :class:`Selector` layer spec over names
    such as ``"joint.1*"``; either view of a joint layer names it; default every joint block); ``steps``: which
    denoising steps (a :class:`Selector` step spec; default all). ``pipe_kwargs``: more keyword arguments of the
    pipeline call (``guidance_scale``, ``max_sequence_length``, ``height``, ...).

    Returns a :class:`ConceptMaps` whose ``maps`` are ``(concepts, h, w)`` on the token grid, each image
    token's shares summing to 1 over the concepts.

    Example:
        >>> from attnlens._testing import tiny_flux_pipeline
        >>> cm = concept_map(tiny_flux_pipeline(), "a red star", ["star", "background"], num_inference_steps=2,
        ...                  pipe_kwargs={"max_sequence_length": 16})
        >>> cm.maps.shape, cm["star"].shape, cm.layers
        (torch.Size([2, 4, 4]), torch.Size([4, 4]), ['joint.0'])
    """
    from ._prompts import check_prompt as _check_prompt
    from ._errors import check_int
    from ._hooks import attach
    from ._images import to_pil
    from ._joint import _JointBase

    _check_prompt("prompt", prompt)
    concepts = _check_concepts(concepts)
    seed = check_int("seed", seed, minimum=0)
    if num_inference_steps is not None:
        check_int("num_inference_steps", num_inference_steps, minimum=1)
    if pipe_kwargs is not None and not isinstance(pipe_kwargs, dict):
        raise AttnlensError(f"pipe_kwargs must be None or a dict of pipeline keyword arguments, not "
                            f"{type(pipe_kwargs).__name__}")
    _encoder(pipe)  # the pipeline kind, before anything runs
    table = list_layers(pipe)
    joint = [i for i in table if i.stream == "joint"]
    valid = sorted({i.name.rsplit(".", 1)[0] for i in joint}, key=lambda n: int(n.split(".")[1]))
    if layers is None:
        paths = {i.path for i in joint}
    else:
        picked = Selector(layers=layers).match(table)
        wrong = [i.name for i in picked if i.stream != "joint"]
        if wrong:
            raise AttnlensError(f"concept maps read joint-attention layers; {wrong} are not ({'; '.join(valid)} are)")
        paths = {i.path for i in picked}
    step_sel = Selector(steps=steps)
    embeds = _concept_tokens(pipe, concepts)

    model = pipe.transformer
    blocks = list(model.transformer_blocks)
    state: dict[str, Any] = {"stream": None, "img": {}, "sum": None, "count": 0, "inside": False, "cfg": False,
                             "hw": None, "steps": set(), "layers": set(), "wanted": None}
    clock, detach = attach(pipe, joint, hook=_Quiet())

    def active() -> bool:
        if clock.step < 0 or clock.repeat:
            return False
        if state["wanted"] is None:
            state["wanted"] = step_sel.step_indices(clock.n_steps)
        return clock.step in state["wanted"]

    def tap(proc: Any, out: torch.Tensor, image: slice, text: slice, side: bool) -> None:
        if proc.info.path not in paths or not active():
            return
        if not side:
            state["img"][proc.info.path] = out[:, image].float()
            return
        o_img = state["img"].pop(proc.info.path, None)
        if o_img is None:
            return
        o_c = out[:, text].float()
        shares = torch.softmax(o_img @ o_c.transpose(1, 2), dim=-1)  # (batch, image tokens, concepts)
        state["sum"] = shares if state["sum"] is None else state["sum"] + shares
        state["count"] += 1
        state["cfg"], state["hw"] = clock.cfg, proc.info.grid(clock.latent_hw)
        state["steps"].add(clock.step)
        state["layers"].add(proc.info.name.rsplit(".", 1)[0])

    def side_pass(index: int) -> Any:
        def hook(block: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if state["inside"] or not active():
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if index == 0:
                state["stream"] = embeds[None].expand(hidden.shape[0], -1, -1)
            stream = state["stream"]
            if stream is None:
                return
            extra = {"joint_attention_kwargs": kwargs.get("joint_attention_kwargs")}
            rope = kwargs.get("image_rotary_emb")
            if rope is not None:  # Flux: text positions first (all at id 0), then the image's
                n_text = kwargs["encoder_hidden_states"].shape[1]
                n = stream.shape[1]
                extra["image_rotary_emb"] = tuple(torch.cat([r[:1].expand(n, -1), r[n_text:]]) for r in rope)
            procs = [m.processor for m in block.modules() if isinstance(getattr(m, "processor", None), _JointBase)]
            state["inside"] = True
            for p in procs:
                p.side = True
            try:
                context, _ = block(hidden_states=hidden, encoder_hidden_states=stream, temb=kwargs["temb"], **extra)
            finally:
                for p in procs:
                    p.side = False
                state["inside"] = False
            state["stream"] = context  # None after SD3's last block (context_pre_only): the stream ends

        return hook

    procs = [b.attn.processor for b in blocks]
    handles = []
    try:
        for p in procs:
            p.taps.append(tap)
        handles = [b.register_forward_hook(side_pass(i), with_kwargs=True) for i, b in enumerate(blocks)]
        call = dict(pipe_kwargs or {})
        if num_inference_steps is not None:
            call["num_inference_steps"] = num_inference_steps
        pixels = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **call).images
    finally:
        for h in handles:
            h.remove()
        for p in procs:
            if tap in p.taps:
                p.taps.remove(tap)
        detach()
    if not state["count"]:
        raise AttnlensError("no concept map was recorded: the chosen steps were not run")
    mean = state["sum"] / state["count"]
    row = mean.shape[0] // 2 if state["cfg"] else 0  # the prompt's conditional row
    h, w = state["hw"]
    maps = mean[row].reshape(h, w, len(concepts)).permute(2, 0, 1).contiguous().cpu()
    names = sorted(state["layers"], key=lambda n: int(n.split(".")[1]))
    return ConceptMaps(concepts, maps, to_pil(pixels[:1])[0], pixels[0].float().cpu(), names, sorted(state["steps"]))
