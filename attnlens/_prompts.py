"""Prompt tokens and the batch layout: the one home of words, token positions, alignment and CFG rows.

* :func:`tokenize`: a pipeline tokenizer's padded tokens of each prompt (what the text encoder sees);
* :func:`words` and :func:`token_indices`: a prompt's words and the token positions of a word or phrase
  (used by the cache's :meth:`~attnlens.AttentionCache.word_map`, by editing and by collection);
* :func:`alignment`: Prompt-to-Prompt's token alignment of a target prompt to its source;
* :func:`token_weights`: one-hot token weights of a word per prompt (collection's word features);
* :func:`batch_row`: the classifier-free-guidance batch layout ``[uncond prompts, cond prompts]``.

Imports only ``_errors``; imported by the cache, selection, control, methods, editing and collection.
"""

from __future__ import annotations

import difflib
import unicodedata
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

from ._errors import AttnlensError

SPECIAL = {"<start>": "start", "<|startoftext|>": "start", "<end>": "end", "<|endoftext|>": "end", "<pad>": "pad"}
END_TOKEN = "<|endoftext|>"


# ------------------------------------------------------------------------------------------ tokens
def token_ids(tokenizer: Any, prompts: str | Sequence[str]) -> list[list[int]]:
    """The padded token ids the pipeline encodes, one list of ``model_max_length`` (77) ids per prompt.

    Example:
        >>> from attnlens._tokenizer import load_tokenizer
        >>> token_ids(load_tokenizer(), "a red star")[0][:6]
        [49406, 320, 736, 1565, 49407, 49407]
    """
    if tokenizer is None:
        raise AttnlensError("the pipeline has no tokenizer, so words cannot be found in the prompts")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [list(row) for row in tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                            truncation=True).input_ids]


def tokenize(tokenizer: Any, prompts: str | Sequence[str]) -> list[list[str]]:
    """The padded tokens of each prompt, as strings (start token first).

    Example:
        >>> from attnlens._tokenizer import load_tokenizer
        >>> tokenize(load_tokenizer(), ["a red star"])[0][:5]
        ['<|startoftext|>', 'a</w>', 'red</w>', 'star</w>', '<|endoftext|>']
    """
    return [tokenizer.convert_ids_to_tokens(row) for row in token_ids(tokenizer, prompts)]


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The inverse of byte-level BPE's byte-to-character table: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def decode_word(text: str) -> str:
    """The text of a word written in byte-level BPE characters (``'cafÃ©'`` is ``'café'``); a string that is
    not byte-level BPE (a test's plain tokens) comes back unchanged.

    Example:
        >>> decode_word("cafÃ©"), decode_word("æĺŁ"), decode_word("star")
        ('café', '星', 'star')
    """
    table = _byte_of_char()
    if not all(c in table for c in text):
        return text
    return bytes(table[c] for c in text).decode("utf-8", errors="replace")


def _normal(text: str) -> str:
    """How words are compared: Unicode NFC, lower case."""
    return unicodedata.normalize("NFC", text).lower()


def words(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Group a prompt's tokens (start token first) into words: ``[(word, token positions)]``.

    Words are decoded text: a CLIP token is a string of byte-level BPE characters (``'cafÃ©</w>'``),
    whose UTF-8 bytes are decoded here (``'café'``), so words with non-ASCII letters are found.

    Example:
        >>> words(['<|startoftext|>', 'a</w>', 'red</w>', 'st', 'ar</w>', '<|endoftext|>'])
        [('a', [1]), ('red', [2]), ('star', [3, 4])]
        >>> words(['<|startoftext|>', 'a</w>', 'æĺ', 'Ł</w>', 'cafÃ©</w>', '<|endoftext|>'])
        [('a', [1]), ('星', [2, 3]), ('café', [4])]
    """
    out: list[tuple[str, list[int]]] = []
    current, pos = "", []
    for i, tok in enumerate(tokens[1:], start=1):
        if tok == END_TOKEN:
            break
        current += tok.replace("</w>", "")
        pos.append(i)
        if tok.endswith("</w>"):
            out.append((decode_word(current), pos))
            current, pos = "", []
    if pos:
        out.append((decode_word(current), pos))
    return out


def token_indices(tokens: list[str], word: str | int, prompt: int = 0, occurrence: int = 0) -> list[int]:
    """Token positions of ``word`` in a prompt's ``tokens`` (several for a multi-token word or a phrase).

    ``word`` may be a word or phrase of the prompt (case-insensitive), ``"<start>"``, ``"<end>"``,
    ``"<pad>"`` (every position after the end token), or a token index. ``prompt`` only names the prompt
    in the error, which lists the prompt's words.

    Example:
        >>> toks = ['<|startoftext|>', 'a</w>', 'big</w>', 'red</w>', 'star</w>', '<|endoftext|>', '<|endoftext|>']
        >>> token_indices(toks, "red star"), token_indices(toks, "<end>"), token_indices(toks, "<pad>")
        ([3, 4], [5], [6])
    """
    if isinstance(word, bool) or not isinstance(word, (str, int, np.integer)):
        raise AttnlensError(f"word must be a word or phrase of the prompt (str), '<start>', '<end>', '<pad>' or a "
                            f"token index (int), not {type(word).__name__} {word!r}")
    ws = words(tokens)
    end = 1 + sum(len(p) for _, p in ws)
    if isinstance(word, (int, np.integer)):
        if not 0 <= word < len(tokens):
            raise AttnlensError(f"token index {word} out of range 0..{len(tokens) - 1}")
        return [int(word)]
    special = SPECIAL.get(word.strip().lower())
    if special == "start":
        return [0]
    if special == "end":
        return [end]
    if special == "pad":
        return list(range(end + 1, len(tokens)))
    want = _normal(word).split()
    if not want:
        raise AttnlensError(f"word {word!r} is empty; give a word or phrase of prompt {prompt}, '<start>', '<end>', "
                            "'<pad>' or a token index")
    have = [w for w, _ in ws]
    low = [_normal(w) for w in have]
    found = [i for i in range(len(low) - len(want) + 1) if low[i : i + len(want)] == want]
    if len(found) <= occurrence:
        raise AttnlensError(
            f"{word!r} is not a word of prompt {prompt} (occurrence {occurrence}); its words: {have}; its tokens: "
            f"{tokens[: end + 1]}; also valid: '<start>', '<end>', '<pad>' or a token index"
        )
    i = found[occurrence]
    return [p for _, pos in ws[i : i + len(want)] for p in pos]


def token_weights(tokens: list[list[str]], per_prompt: Sequence[str | int]) -> tuple[np.ndarray, list[int]]:
    """``(weights (n, tokens) float32, missing)``: 1 at the tokens of ``per_prompt[i]`` in prompt ``i``; the
    prompts that lack their word are listed in ``missing`` (their row stays 0).

    Example:
        >>> from attnlens._tokenizer import load_tokenizer
        >>> w, missing = token_weights(tokenize(load_tokenizer(), ["a red star", "a circle"]), ["star", "star"])
        >>> w.shape, w[0].nonzero()[0].tolist(), missing
        ((2, 77), [3], [1])
    """
    w = np.zeros((len(tokens), len(tokens[0]) if tokens else 0), dtype=np.float32)
    missing = []
    for i, word in enumerate(per_prompt):
        try:
            w[i, token_indices(tokens[i], word, prompt=i)] = 1.0
        except AttnlensError:
            missing.append(i)
    return w, missing


def _end(ids: list[int], end_id: int) -> int:
    """Index of the end token."""
    return ids.index(end_id, 1) if end_id in ids[1:] else len(ids) - 1


def alignment(tokenizer: Any, source: str, target: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(mapper, alpha, mode)``: for each target token, the source token whose map it takes and whether it does.

    ``mode`` ``"replace"`` (same token count: token ``i`` takes token ``i``), ``"refine"`` (tokens aligned by
    a diff of the two prompts; new words keep their own map) or ``"auto"`` (replace when the counts match).
    ``mapper`` and ``alpha`` are ``(77,)``; the returned mode has ``"auto"`` resolved.

    Example:
        >>> from attnlens._tokenizer import load_tokenizer
        >>> mapper, alpha, mode = alignment(load_tokenizer(), "a red star", "a big red star", "auto")
        >>> mode, mapper[:6].tolist(), alpha[:6].tolist()
        ('refine', [0, 1, 2, 2, 3, 4], [1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    """
    s, t = token_ids(tokenizer, source)[0], token_ids(tokenizer, target)[0]
    end_id = tokenizer.eos_token_id
    es, et = _end(s, end_id), _end(t, end_id)
    n = len(t)
    if mode == "auto":
        mode = "replace" if es == et else "refine"
    if mode == "replace":
        if es != et:
            raise AttnlensError(
                f"p2p mode 'replace' needs prompts with the same number of tokens (source {es - 1}, target {et - 1}); "
                "use mode='refine' (or 'auto')")
        return torch.arange(n), torch.ones(n), mode
    mapper, alpha = torch.arange(n), torch.zeros(n)
    mapper[0], alpha[0] = 0, 1.0
    for block in difflib.SequenceMatcher(None, s[1:es], t[1:et], autojunk=False).get_matching_blocks():
        for j in range(block.size):
            mapper[1 + block.b + j], alpha[1 + block.b + j] = 1 + block.a + j, 1.0
    for p in range(et, n):  # end and padding tokens follow the source's end and padding
        mapper[p], alpha[p] = min(len(s) - 1, es + (p - et)), 1.0
    return mapper, alpha, mode


# ------------------------------------------------------------------------------------------ batch layout
def batch_row(prompt: int, branch: str, n_prompts: int, cfg: bool) -> int:
    """Row of ``prompt`` in ``branch`` of a UNet batch: ``[uncond 0..n-1, cond 0..n-1]`` with classifier-free
    guidance, ``[prompt 0..n-1]`` without.

    Example:
        >>> batch_row(1, "cond", 2, True), batch_row(1, "uncond", 2, True), batch_row(1, "cond", 2, False)
        (3, 1, 1)
    """
    if branch == "uncond":
        if not cfg:
            raise AttnlensError("this run has no unconditional branch (guidance_scale <= 1)")
        return prompt
    return prompt + (n_prompts if cfg else 0)


def check_prompt(name: str, prompt: Any) -> None:
    """An :class:`~attnlens.AttnlensError` unless ``prompt`` is a string (``name`` is the argument's name)."""
    if not isinstance(prompt, str):
        raise AttnlensError(f"{name} must be a string, not {type(prompt).__name__}")
