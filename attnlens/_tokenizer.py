"""The CLIP tokenizer of Stable Diffusion 1.x, shipped with the package (no hub access needed).

``attnlens/tokenizer/vocab.json`` and ``merges.txt`` were derived from OpenAI CLIP's BPE merges list
(MIT licence; see ``attnlens/tokenizer/LICENSE``) by ``scripts/derive_clip_tokenizer.py``. They give
the same 49,408 token ids as the tokenizer of SD 1.x.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407


@lru_cache(maxsize=1)
def load_tokenizer():
    """The shipped ``transformers.CLIPTokenizer`` (model_max_length 77).

    Example:
        >>> load_tokenizer()("a red star").input_ids
        [49406, 320, 736, 1565, 49407]
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"),
        str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
