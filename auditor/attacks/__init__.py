"""Deployment attacks on ONNX models: each is ``f(model, **params) -> AttackResult``.

Every attack deep-copies its input (the caller's ModelProto is never
modified), returns the attacked model, the parameters it used, notes on what
was done (pre-processing, skipped weights) and whether any part was only
simulated (``simulated=True``: a numeric round-trip onnxruntime would not do
itself, e.g. int8 on GRU/RNN weights).

Modules: ``quantize`` (onnxruntime dynamic / static QDQ / QOperator),
``precision`` (fp16, int4 weight-only MatMulNBits), ``prune`` (magnitude,
global, random, L1 filter / channel on the initializers), ``simulate``
(int8 quantize->dequantize round-trip of weights onnxruntime cannot
quantize), ``compose`` (a sequence of the above).
"""
from __future__ import annotations

import contextlib
import os
import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import onnx

# onnxruntime 1.31 rejects models with an IR version above 10.
MAX_IR_VERSION = 10


@dataclass
class AttackResult:
    """An attacked model and how it was made."""

    model: onnx.ModelProto
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    simulated: bool = False


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: attacks work on this, never on the caller's model."""
    return copy.deepcopy(model)


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the IR version loadable by onnxruntime (in place on a copy the attack owns)."""
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A private temporary folder (onnxruntime's quantizers work on files)."""
    with tempfile.TemporaryDirectory(prefix="wmaudit-attack-") as d:
        yield Path(d)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Save as one file when it fits in a protobuf, else with external data next to it."""
    if model.ByteSize() < 2_000_000_000 - 1_000_000:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    return path


def write_model(model: onnx.ModelProto, out: str | os.PathLike) -> Path:
    """Write ``model`` to the user's path atomically: a temporary name in the same folder, then
    renamed (external data, for a model over protobuf's 2 GB, is renamed first), so an
    interrupted write never leaves a partial file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as d:
        tmp = save(model, Path(d) / out.name)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():
            os.replace(data, out.with_name(out.name + ".data"))
        os.replace(tmp, out)
    return out


def load(path: Path) -> onnx.ModelProto:
    """Load a model written in a work folder, external data included (the folder is temporary)."""
    return onnx.load(str(path), load_external_data=True)


__all__ = ["AttackResult", "copy_model", "cap_ir_version", "workdir", "save", "write_model", "load",
           "MAX_IR_VERSION"]


def load_model(path) -> onnx.ModelProto:
    """A user's model with its external data, after auditor.read.graph's safety checks."""
    from auditor.read.graph import load_external, model_dir, open_model
    from auditor.read.weights import WeightStore

    m = open_model(path)
    WeightStore(m, model_dir(path))  # quantization parameters checked before any attack runs
    return load_external(m, model_dir(path))
