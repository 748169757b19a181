"""Checkers for the book's implement-it exercises (the course's, not part of the attnlens runtime).

Each chapter of the book has at least one exercise in which you implement a mechanism yourself (the
sampling loop, an attention map, a capture processor, an ablation, a grouped probe, the Prompt-to-Prompt
and Free-Prompt-Editing swaps, a DDIM inversion step, the benchmark's IoU, FPE's layer rule). Write your
function or class in the chapter's stub cell, then call its checker:

    >>> from attnlens_exercises import check_inversion_step
    >>> def my_step(x, eps, alpha_from, alpha_to):
    ...     raise NotImplementedError  # your code here
    >>> check_inversion_step(my_step)
    check_inversion_step: not attempted yet (the function raised NotImplementedError); write your code and run it again.
    False

A checker runs your implementation on a tiny random Stable Diffusion pipeline
(:func:`attnlens._testing.tiny_pipeline`) or on small tensors, compares it with attnlens' own
implementation (the reference), prints ``passed`` and returns ``True``; a wrong answer raises
:class:`ExerciseFailed` saying what differed. Reference solutions are in :mod:`attnlens_exercises.solutions`
(the book's hidden cells run every checker on them; the test suite also checks that each checker
rejects a wrong implementation).
"""

from ._checks import (
    CHECKERS,
    ExerciseFailed,
    check_attention_probs,
    check_capture_processor,
    check_fpe_controller,
    check_fpe_rule,
    check_grouped_probe,
    check_inversion_step,
    check_mask_iou,
    check_p2p_replace,
    check_sampler,
    check_self_attention_ablation,
    show,
)

__all__ = ["CHECKERS", "ExerciseFailed", "check_attention_probs", "check_capture_processor", "check_fpe_controller",
           "check_fpe_rule", "check_grouped_probe", "check_inversion_step", "check_mask_iou", "check_p2p_replace",
           "check_sampler", "check_self_attention_ablation", "show"]
