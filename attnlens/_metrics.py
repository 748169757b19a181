"""CLIP metrics of the paper: CLIP score and CLIP directional similarity, with transformers' ``CLIPModel``.

Real weights (for example ``openai/clip-vit-large-patch14``) are loaded only when the user has them
(a hub id with network access or a local folder; safetensors only). Tests use a tiny random config.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ._errors import AttnlensError

_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPMetrics:
    """CLIP score and directional similarity.

    Args:
        model: a ``transformers.CLIPModel``, or a hub id / local folder to load one from (safetensors only).
        tokenizer: a CLIP tokenizer (default: loaded from the same place, else attnlens' own CLIP tokenizer).
        device: where to run (default: the model's device).

    ``score(images, prompts)``: ``100 * max(cos(image, text), 0)`` per pair (the usual CLIP score).
    ``directional(sources, edits, source_prompts, target_prompts)``: cosine between the change in
    image embedding and the change in text embedding (Gal et al.; the paper's second metric).

    Example:
        >>> from transformers import CLIPConfig, CLIPModel
        >>> cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        ...                                   num_attention_heads=2, vocab_size=49408),
        ...                  vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        ...                                     num_attention_heads=2, image_size=32, patch_size=8),
        ...                  projection_dim=16)
        >>> m = CLIPMetrics(CLIPModel(cfg))
        >>> m.score([Image.new("RGB", (64, 64), "red")], ["a red square"]).shape
        (1,)
    """

    def __init__(self, model: Any = "openai/clip-vit-large-patch14", tokenizer: Any = None,
                 device: str | torch.device | None = None) -> None:
        from transformers import CLIPModel

        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            try:
                loaded = CLIPModel.from_pretrained(str(model), use_safetensors=True, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise AttnlensError(f"could not load a CLIP model from {str(model)!r} (safetensors only): {exc}") from exc
            if tokenizer is None:
                from transformers import CLIPTokenizer

                try:
                    tokenizer = CLIPTokenizer.from_pretrained(str(model))
                except (OSError, ValueError):
                    tokenizer = None
            model = loaded
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise AttnlensError(f"model must be a transformers CLIPModel or where to load one, not {type(model).__name__}")
        if tokenizer is None:
            from ._tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.size = int(model.config.vision_config.image_size)

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        out = []
        for img in images:
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).astype(np.uint8))
            if not isinstance(img, Image.Image):
                raise AttnlensError(f"images must be PIL images or arrays, not {type(img).__name__}")
            img = img.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
            out.append((x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None])
        return torch.stack(out).to(self.device, next(self.model.parameters()).dtype)

    @staticmethod
    def _tensor(x: Any) -> torch.Tensor:
        # transformers 5 returns a model output from get_*_features; 4.x returns the tensor
        return x if torch.is_tensor(x) else getattr(x, "pooler_output", None) if getattr(x, "pooler_output", None) is not None else x[0]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Any]) -> torch.Tensor:
        """``(n, d)`` unit-norm image embeddings."""
        e = self._tensor(self.model.get_image_features(pixel_values=self._pixels(images))).float()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` unit-norm text embeddings."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise AttnlensError("prompts must be a list of strings")
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        e = self._tensor(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                     attention_mask=tok.attention_mask.to(self.device))).float()
        return e / e.norm(dim=-1, keepdim=True)

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        """CLIP score per (image, prompt) pair: ``100 * max(cos, 0)``, shape ``(n,)``."""
        if len(images) != len(prompts):
            raise AttnlensError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (100 * cos.clamp_min(0)).cpu().numpy()

    def directional(self, sources: Sequence[Any], edits: Sequence[Any], source_prompts: Sequence[str],
                    target_prompts: Sequence[str]) -> np.ndarray:
        """CLIP directional similarity per edit, in [-1, 1], shape ``(n,)``."""
        n = len(sources)
        if not (len(edits) == len(source_prompts) == len(target_prompts) == n):
            raise AttnlensError("sources, edits, source_prompts and target_prompts must have the same length")
        di = self.image_embeddings(edits) - self.image_embeddings(sources)
        dt = self.text_embeddings(target_prompts) - self.text_embeddings(source_prompts)
        cos = (di * dt).sum(-1) / (di.norm(dim=-1) * dt.norm(dim=-1)).clamp_min(1e-12)
        return cos.cpu().numpy()
