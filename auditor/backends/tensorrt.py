"""Native TensorRT backend (placeholder until the engine runner lands)."""
from __future__ import annotations

import importlib.util


def availability() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    return False, "the native TensorRT runner is not built in this version"
