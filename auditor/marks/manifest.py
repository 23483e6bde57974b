"""The exporter's manifest: which ONNX tensor (and layout transform) holds each torch parameter.

A JSON object whose ``params`` maps torch names to ``{"onnx": str, "transform": str, ...}``
(written by ``exporters/``). Read here, below the commands and the gate, so that every
stage that locates a mark reads it the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from auditor.errors import AuditError


def load_manifest(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The manifest at ``path`` (None when ``path`` is None); AuditError (one line) otherwise."""
    if path is None:
        return None
    from auditor.marks.keys import read_json

    p = Path(path)
    if not p.exists():
        raise AuditError(f"manifest not found: {path}")
    doc = read_json(p, "manifest")
    return check_manifest(doc, str(path))


def check_manifest(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("params", {}), dict):
        raise AuditError(f"manifest {where} has no 'params' mapping")
    for name, entry in doc.get("params", {}).items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k, ""), str) for k in ("onnx", "transform")):
            raise AuditError(f"manifest {where}: params[{name!r}] must be an object with string 'onnx' and 'transform'")
    return doc


def manifest_beside(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """manifest.json next to the model, when there is one (checked as ``load_manifest`` does)."""
    p = Path(model_path).parent / "manifest.json"
    if not p.exists() and not p.is_symlink():
        return None
    return load_manifest(p)


def default_manifest(model: str | os.PathLike) -> dict[str, Any] | None:
    """manifest.json beside the model, when it names this model file (the gate's default);
    a file there that is not a manifest of ours is ignored (the gate locates weights without it)."""
    m = Path(model).with_name("manifest.json")
    if not m.is_file():
        return None
    try:
        doc = load_manifest(m)
    except AuditError:
        return None
    if doc is not None and doc.get("onnx") in (None, Path(model).name) and isinstance(doc.get("params"), dict):
        return doc
    return None
