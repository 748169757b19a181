"""The one error type of attnlens."""

from __future__ import annotations


class AttnlensError(ValueError):
    """Raised for any input attnlens cannot work with.

    The message always names what was wrong and what would be valid. It subclasses
    :class:`ValueError` so existing ``except ValueError`` handlers still catch it.
    """


def choices(values) -> str:
    """Format a collection of valid values for an error message."""
    return ", ".join(repr(v) for v in values)


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int; an :class:`AttnlensError` naming argument ``name`` unless it is an integer (not a bool)
    of at least ``minimum``.

    Example:
        >>> check_int("num_inference_steps", 4, minimum=1)
        4
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AttnlensError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise AttnlensError(f"{name} must be >= {minimum}, not {value!r}")
    return int(value)
