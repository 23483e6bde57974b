"""Typed result objects: each wraps one ``wmaudit-result/1`` document.

The document is the artefact (what ``--json`` prints and ``-o`` writes); the classes
add typed access to the fields a pipeline branches on and keep every other field as
it is, including fields this version does not know (a newer tool's ``hardware`` or
``target`` records survive ``from_json`` -> ``to_json`` unchanged).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from auditor import results as _results
from auditor.errors import AuditError

SCHEMA = _results.SCHEMA


@dataclass(frozen=True)
class Result:
    """One result document. ``document`` is the JSON object; ``exit_code`` is what the CLI returns."""

    document: dict[str, Any] = field(repr=False)
    kind: ClassVar[str] = ""

    # ---------------------------------------------------------------- common fields
    @property
    def verdict(self) -> str:
        """The headline verdict string of the document (``detected``, ``pass``, ``survived`` ...)."""
        v = self.document.get("verdict")
        if isinstance(v, dict):
            v = v.get("verdict")
        if v is None and isinstance(self.document.get("result"), dict):
            v = self.document["result"].get("verdict")
        return str(v) if v is not None else ""

    @property
    def passed(self) -> bool:
        """True when the CLI would exit 0."""
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict in ("detected", "pass", "survived", "derived") else 1

    @property
    def model(self) -> dict[str, Any] | None:
        """{"path", "sha256"} of the audited model (path ``<onnx.ModelProto>`` for an in-memory model)."""
        m = self.document.get("model")
        return dict(m) if isinstance(m, dict) else None

    @property
    def command(self) -> str:
        return str(self.document.get("command", ""))

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the document."""
        return copy.deepcopy(self.document)

    def to_json(self) -> str:
        """The document as the CLI writes it (sorted keys, two-space indent, newline at the end)."""
        return _results.dumps(self.document)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the document atomically (the file is complete or absent); returns the path."""
        _results.write_result(path, self.document)
        return Path(path)

    def __getitem__(self, key: str) -> Any:
        return self.document[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.document.get(key, default)

    @classmethod
    def from_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> "Result":
        """A result from a document, its JSON text, or a file holding it; the class follows the
        document's ``kind`` (``Result`` for kinds without a class of their own)."""
        if isinstance(source, Mapping):
            doc = dict(source)
        else:
            text = str(source)
            if not text.lstrip().startswith("{"):
                p = Path(text)
                if not p.is_file():
                    raise AuditError(f"result file not found: {p}")
                text = p.read_text(encoding="utf-8")
            try:
                doc = json.loads(text)
            except ValueError as e:
                raise AuditError(f"not a result document: {e}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise AuditError(f"not a {SCHEMA} document (schema {doc.get('schema') if isinstance(doc, dict) else None!r})")
        kls = KINDS.get(str(doc.get("kind")), Result)
        if cls is not Result and not issubclass(kls, cls):
            raise AuditError(f"a {doc.get('kind')!r} result, not {cls.kind!r}")
        return kls(doc)


@dataclass(frozen=True)
class Mark:
    """One white-box mark's numbers, as extraction and the grid report them."""

    id: str
    n_bits: int
    matches: int
    ber: float
    p_value: float
    log10_p: float
    verdict: str

    @classmethod
    def of(cls, m: Mapping[str, Any]) -> "Mark":
        return cls(str(m.get("id", "")), int(m.get("n_bits", 0)), int(m.get("matches", 0)), float(m.get("ber", 1.0)),
                   float(m.get("p_value", 1.0)), float(m.get("log10_p", 0.0)), str(m.get("verdict", "")))


@dataclass(frozen=True)
class ExtractResult(Result):
    kind: ClassVar[str] = "extract"

    @property
    def exit_code(self) -> int:
        """0 detected, 2 the mark could not be read (nothing was judged), 1 not detected."""
        return 0 if self.verdict == "detected" else 2 if self.verdict == "could not read" else 1

    @property
    def marks(self) -> list[Mark]:
        return [Mark.of(m) for m in self.document["result"].get("marks", [])]

    @property
    def p_value(self) -> float:
        return float(self.document["result"].get("p_value", 1.0))


@dataclass(frozen=True)
class ConfigOutcome:
    """One attack config of a robustness grid."""

    name: str
    steps: str
    survived: bool            # the mark stayed detected
    usable: bool | None       # the model stayed usable (None: not measured)
    ber: float
    accuracy: float | None
    top1_agreement: float | None
    sqnr_db: float | None
    target: str | None        # the deployment target, when the grid has a target axis

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> "ConfigOutcome":
        fid = r.get("fidelity") or {}
        mk = (r.get("marks") or [{}])[0]
        sq = fid.get("sqnr_db")
        tgt = r.get("target")
        return cls(str(r["name"]), str(r.get("steps", "")), bool(r.get("survived")), r.get("usable"),
                   float(mk.get("ber", 1.0)), r.get("accuracy"), fid.get("top1_agreement"),
                   float(sq) if isinstance(sq, (int, float)) else None,
                   (tgt.get("name") if isinstance(tgt, dict) else tgt) if tgt is not None else None)


@dataclass(frozen=True)
class RobustnessResult(Result):
    kind: ClassVar[str] = "robustness"

    @property
    def exit_code(self) -> int:
        return 0 if self.document["summary"].get("all_survived") else 1

    @property
    def configs(self) -> list[ConfigOutcome]:
        return [ConfigOutcome.of(r) for r in self.document.get("configs", [])]

    @property
    def survived(self) -> int:
        """Configs that left the model usable and the mark detected."""
        return int(self.document["summary"]["survived"])

    @property
    def usable(self) -> int:
        return int(self.document["summary"].get("usable", self.document["summary"]["configs"]))

    @property
    def mark_lost(self) -> list[str]:
        """Usable configs under which the mark was not detected."""
        return list(self.document["summary"].get("broken", []))

    @property
    def model_broken(self) -> list[str]:
        """Configs that broke the model (not counted as survival)."""
        return list(self.document["summary"].get("model_broken", []))

    @property
    def headline(self) -> str:
        from auditor.gate.usability import headline

        return headline(self.document["summary"])


@dataclass(frozen=True)
class Requirement:
    id: str
    status: str
    message: str

    @classmethod
    def of(cls, r: Mapping[str, Any]) -> "Requirement":
        return cls(str(r.get("id", "")), str(r.get("status", "")), str(r.get("message", "")))


@dataclass(frozen=True)
class GateResult(Result):
    kind: ClassVar[str] = "gate"

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    @property
    def requirements(self) -> list[Requirement]:
        return [Requirement.of(r) for r in self.document.get("requirements", [])]

    @property
    def failed(self) -> list[Requirement]:
        return [r for r in self.requirements if r.status != "pass"]


@dataclass(frozen=True)
class ScanResult(Result):
    kind: ClassVar[str] = "scan"

    @property
    def exit_code(self) -> int:
        """0 detected, 2 the mark could not be read (nothing was judged), 1 not detected."""
        return 0 if self.verdict == "detected" else 2 if self.verdict == "could not read" else 1

    @property
    def detected(self) -> int:
        return int(self.document["result"].get("detected", 0))


@dataclass(frozen=True)
class ProvenanceResult(Result):
    kind: ClassVar[str] = "provenance"

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "derived" else 1

    @property
    def derived(self) -> bool:
        return self.verdict == "derived"


@dataclass(frozen=True)
class QueryResult(Result):
    kind: ClassVar[str] = "query"

    @property
    def exit_code(self) -> int:
        return int(self.document.get("exit_code", 0 if self.verdict == "detected" else 1))

    @property
    def p_value(self) -> float:
        return float(self.document["verdict"]["p_corrected"])


@dataclass(frozen=True)
class SweepResult(Result):
    kind: ClassVar[str] = "sweep"

    @property
    def exit_code(self) -> int:
        return 0   # a sweep reports; the per-file verdicts are in its results file

    @property
    def results_file(self) -> str:
        """The JSON-lines file holding one line per (file, key)."""
        return str(self.document["result"]["results"])

    @property
    def detected(self) -> list[dict[str, Any]]:
        """The (file, key) pairs where a mark was detected."""
        return list(self.document["result"].get("detected", []))


KINDS: dict[str, type[Result]] = {c.kind: c for c in (ExtractResult, RobustnessResult, GateResult, ScanResult,
                                                      ProvenanceResult, QueryResult, SweepResult)}
