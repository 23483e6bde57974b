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


def add_target_argument(p: argparse.ArgumentParser) -> None:
    """``--target`` (repeatable; default native) and ``--backend``, its old name."""
    from auditor.backends.targets import NAMES, target_name

    p.add_argument("--target", action="append", type=target_name, default=None, metavar="TARGET",
                   help=f"where the model runs (repeatable): {', '.join(NAMES)}; default native. "
                        "`wmaudit targets` lists which are available here")
    p.add_argument("--backend", action="append", type=target_name, dest="target", help=argparse.SUPPRESS)


def targets_of(args) -> list[str]:
    """The targets a command was given, in order, each once (aliases resolved)."""
    from auditor.backends.targets import resolve

    names = [resolve(t).name for t in (getattr(args, "target", None) or ["native"])]
    return list(dict.fromkeys(names))


def say_unreadable(command: str, items: list[dict]) -> None:
    """The one stderr line of a 'could not read' verdict (exit 2: nothing was judged): the reason of
    the first of `items` (a result's marks or findings) that could not be read."""
    import sys

    from auditor.marks import stats

    reason = next((i for i in items if i.get("verdict") == stats.UNREADABLE), {}).get("reason", "")
    print(f"wmaudit {command}: the mark could not be read: {' '.join(str(reason).split())}", file=sys.stderr)
