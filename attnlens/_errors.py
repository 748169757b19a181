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
