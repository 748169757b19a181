"""Derive the CLIP tokenizer files that transformers' ``CLIPTokenizer`` reads from the BPE merges list.

The merges list ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, OpenAI CLIP) ships inside PyPI's
``open-clip-torch`` wheel. This script reads it from a downloaded wheel (no install needed)::

    pip download --no-deps open-clip-torch -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl attnlens/tokenizer

and writes ``vocab.json`` (49,408 tokens, the ids of Stable Diffusion 1.x's tokenizer) and
``merges.txt`` (48,894 merges). The vocabulary is built as CLIP builds it: the 256 byte symbols,
the same symbols with the end-of-word marker ``</w>``, one token per merge in merge order, then
``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the list


def byte_symbols() -> list[str]:
    """The printable stand-in for each of the 256 byte values, in GPT-2/CLIP order.

    Printable bytes stand for themselves and come first; the others are mapped, in byte order,
    to code points from 256 on and come after.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        lines = gzip.decompress(zf.read(name)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {target}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
