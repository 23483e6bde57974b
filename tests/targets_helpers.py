"""Helpers of the target tests: skip where a target is missing, run the command line."""
import subprocess
import sys

import pytest

from auditor.backends.targets import availability


def needs(name: str) -> None:
    """Skip the calling test where target ``name`` is not available, saying how to get it."""
    ok, why, fix = availability(name)
    if not ok:
        pytest.skip(f"target {name} is not available here: {why} (run: {fix})")


def wmaudit(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """`wmaudit ARGS` in a fresh process, output captured."""
    return subprocess.run([sys.executable, "-m", "auditor", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
