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


def non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _number_in(s: str, lo: float, hi: float, hi_closed: bool) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (lo < v <= hi if hi_closed else lo < v < hi):
        raise argparse.ArgumentTypeError(f"must be in ({lo:g}, {hi:g}{']' if hi_closed else ')'}")
    return v


def open_fraction(s: str) -> float:
    """A fraction in (0, 1)."""
    return _number_in(s, 0.0, 1.0, False)


def fraction_to_one(s: str) -> float:
    """A fraction in (0, 1]."""
    return _number_in(s, 0.0, 1.0, True)
