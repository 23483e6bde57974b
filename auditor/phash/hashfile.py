"""The hash file ``wmaudit-phash/1`` (schema ``auditor/schemas/phash.schema.json``).

It binds a centroid and a radius R to one model (its sha256) and one tensor
(``layer``), with the reduction from features to latents: ``none``, ``pca``
(mean and K x D components stored inline) or ``encoder`` (an ONNX file in the
hash file's folder, checked by sha256). Loading refuses a malformed file, a
radius R <= 0, an encoder outside the folder or with another sha256.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError

FORMAT = "wmaudit-phash/1"
SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "phash.schema.json"


@dataclass
class PerceptualHash:
    model_sha256: str
    input_name: str
    input_shape: list
    layer: str | None
    reduce: dict[str, Any]
    centroid: np.ndarray
    radius: float
    radius_rule: dict[str, Any]
    feature_dim: int | None = None
    signal: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where the file lives (encoder paths are relative to it)

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT,
               "model": {"sha256": self.model_sha256, "input": self.input_name, "input_shape": list(self.input_shape)},
               "layer": self.layer, "reduce": self.reduce,
               "centroid": [float(v) for v in np.asarray(self.centroid, np.float64)],
               "radius": float(self.radius), "radius_rule": self.radius_rule}
        if self.feature_dim is not None:
            doc["feature_dim"] = int(self.feature_dim)
        for k in ("signal", "noise"):
            if getattr(self, k) is not None:
                doc[k] = getattr(self, k)
        if self.build:
            doc["build"] = self.build
        return doc

    def encoder_path(self) -> Path:
        if self.reduce.get("kind") != "encoder":
            raise AuditError("this hash has no encoder")
        return inside(self.folder or Path("."), self.reduce["path"])


def inside(folder: Path, rel: str) -> Path:
    """``folder/rel``, refused when it leaves ``folder`` (absolute, ``..``, symlinks out)."""
    if os.path.isabs(rel):
        raise AuditError(f"encoder path {rel!r} is absolute; it must be relative to the hash file's folder")
    base = Path(folder).resolve()
    p = (base / rel).resolve()
    if base != p and base not in p.parents:
        raise AuditError(f"encoder path {rel!r} leaves the hash file's folder")
    return p


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(doc: Any) -> None:
    import jsonschema

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AuditError(f"not a {FORMAT} hash file")
    if isinstance(doc.get("radius"), (int, float)) and doc["radius"] <= 0:
        raise AuditError(f"hash radius R = {doc['radius']} must be > 0")
    try:
        jsonschema.validate(doc, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise AuditError(f"hash file does not follow {FORMAT}: {where}: {e.message}") from None
    red = doc["reduce"]
    dim = len(doc["centroid"])
    if red["kind"] == "pca":
        comps = red["components"]
        if len(comps) != red["k"] or red["k"] != dim or any(len(r) != len(red["mean"]) for r in comps):
            raise AuditError("hash file: PCA components, k and centroid disagree in shape")
    if red["kind"] == "none" and doc.get("feature_dim") not in (None, dim):
        raise AuditError("hash file: centroid length differs from feature_dim")


def load_hash(path: str | os.PathLike) -> PerceptualHash:
    from auditor.marks.keys import read_json

    p = Path(path)
    if not p.exists():
        raise AuditError(f"{p}: no such hash file")
    doc = read_json(p, "hash file")   # a bounded regular file; NaN / Infinity refused
    validate(doc)
    h = PerceptualHash(model_sha256=doc["model"]["sha256"], input_name=doc["model"]["input"],
                       input_shape=doc["model"]["input_shape"], layer=doc["layer"], reduce=doc["reduce"],
                       centroid=np.asarray(doc["centroid"], np.float64), radius=float(doc["radius"]),
                       radius_rule=doc["radius_rule"], feature_dim=doc.get("feature_dim"),
                       signal=doc.get("signal"), noise=doc.get("noise"), build=doc.get("build", {}),
                       folder=p.resolve().parent)
    if h.reduce["kind"] == "encoder":
        from auditor.results import file_sha256

        enc = h.encoder_path()
        if not enc.is_file():
            raise AuditError(f"encoder {h.reduce['path']} named by the hash file is missing")
        if file_sha256(enc) != h.reduce["sha256"]:
            raise AuditError(f"encoder {h.reduce['path']} does not match the sha256 recorded in the hash file")
    return h


def save_hash(h: PerceptualHash, path: str | os.PathLike) -> Path:
    """Validate and write atomically."""
    from auditor.results import dumps

    doc = h.to_json()
    validate(json.loads(dumps(doc)))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(doc))
    os.replace(tmp, p)
    return p
