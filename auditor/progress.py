"""Progress bars for long runs (rich), drawn on stderr only for a person watching.

``with Progress(n, "gate") as p: p.advance(note=...)``. Off (does nothing) when stderr is
not a terminal or ``CI`` is set to a true value, so logs, pipes and ``--json`` stay clean.
Below every stage that reports progress (the gate, robustness grids, sweeps).
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Draw progress only for a person watching: a TTY, and not under CI."""
    stream = stream if stream is not None else sys.stderr
    ci = os.environ.get("CI", "").strip().lower()
    if ci and ci not in ("0", "false", "no"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """One bar: ``total`` steps (0 = unknown, settable later), a label and a note."""

    def __init__(self, total: int, label: str = "", *, stream: TextIO | None = None,
                 enabled: bool | None = None):
        self._total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(self.stream) if enabled is None else bool(enabled)
        self.done = 0
        self.note = ""
        self._bar: Any = None
        self._task: Any = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Progress":
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if not self.enabled or self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _Rich

        self._bar = _Rich(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                          console=Console(file=self.stream, stderr=self.stream is sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=self._total or None, note="")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ---------------------------------------------------------------- updates
    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, n: int) -> None:
        self._total = max(0, int(n))
        if self._bar is not None:
            self._bar.update(self._task, total=self._total or None)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done = min(self._total, self.done + n) if self._total else self.done + n
        if note:
            self.note = note
        self._start()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=self.note[:60])

    def step(self, note: str) -> None:
        """One step done, with what it was."""
        self.advance(1, note)

    def set_note(self, note: str) -> None:
        self.note = note
        if self._bar is not None:
            self._bar.update(self._task, note=note[:60])

    def line(self) -> str:
        """The state as one line of text (for logs and tests)."""
        s = f"{self.label} {self.done}/{self._total}"
        return f"{s} {self.note}" if self.note else s
