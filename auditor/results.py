"""The one result model: every command's JSON output is an envelope of this shape.

JSON is the artefact; the terminal table, JUnit XML and HTML render from it.
Results are deterministic: apart from `created`, two runs of the same command
on the same inputs give byte-identical JSON (sorted keys, fixed float repr).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from auditor import __version__

SCHEMA = "wmaudit-result/1"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def command_line(argv: list[str] | None = None) -> str:
    """The command that produced a result, as the user could re-run it."""
    argv = sys.argv if argv is None else argv
    prog = "wmaudit" if argv and argv[0].endswith(("wmaudit", "cli.py", "__main__.py")) else (argv[0] if argv else "wmaudit")
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def envelope(kind: str, *, model_path: str | os.PathLike | None = None, key=None,
             command: str | None = None, **body: Any) -> dict[str, Any]:
    """A result document: schema, kind, tool, command, model provenance, key commitment, body."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "tool": {"name": "wmaudit", "version": __version__},
        "command": command if command is not None else command_line(),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if model_path is not None:
        doc["model"] = {"path": str(model_path), "sha256": file_sha256(model_path)}
    if key is not None:
        doc["key_commitment"] = key.commitment
        doc["evidence"] = key_evidence(key)
    doc.update(body)
    if doc.get("hardware") is None:  # where it was computed (auditor.backends.hardware)
        from auditor.backends.hardware import process_record

        doc["hardware"] = process_record()
    return doc


def key_evidence(key) -> dict[str, Any]:
    """committed | uncommitted, with the sentence every output carries (auditor.marks.evidence)."""
    if not hasattr(key, "whitebox"):
        return {"kind": "uncommitted", "sentence": "uncommitted evidence: not a wmaudit key", "marks": {}}
    from auditor.marks.evidence import key_evidence as _ke

    return _ke(key)


def _clean(x: Any) -> Any:
    """Make values JSON-safe and deterministic (numpy -> Python, non-finite -> string)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if np is not None and isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if np is not None and isinstance(x, np.generic):
        return _clean(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(_clean(doc), indent=2, sort_keys=True) + "\n"


def write_result(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Atomic write: the file is either the complete result or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(doc))
    os.replace(tmp, path)


def emit(doc: dict[str, Any], *, output: str | os.PathLike | None, as_json: bool, render) -> None:
    """What every result command does with its document: write it to ``output`` (atomically)
    when asked, then print it as JSON (``as_json``) or as ``render(doc)`` text."""
    import sys

    if output:
        write_result(output, doc)
    if as_json:
        sys.stdout.write(dumps(doc))
    else:
        print(render(doc))
