"""argparse value types shared by the subcommands (one error message each)."""
from __future__ import annotations

import argparse


def alpha(s: str) -> float:
    """A detection threshold on p-values, in (0, 1)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError("alpha must be in (0, 1)")
    return v


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v
