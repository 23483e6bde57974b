"""wmaudit: audit deep-network watermarks in ONNX files, from Python.

    import wmaudit

    r = wmaudit.gate("model.onnx", key="key.json", policy="release-policy.toml")
    if not r.passed:
        raise SystemExit(r.failed)

Every function mirrors one ``wmaudit`` command and returns a typed result
(``wmaudit.results``) that serializes to the same ``wmaudit-result/1`` JSON the
command prints with ``--json``. Bad input raises ``wmaudit.AuditError``.
The command line is a thin layer over these functions.
"""
from auditor import __version__
from auditor.errors import AuditError

from wmaudit.api import extract, gate, provenance, query, robustness, scan, sweep
from wmaudit.results import (ExtractResult, GateResult, ProvenanceResult, QueryResult, Result, RobustnessResult,
                             ScanResult, SweepResult)

__all__ = ["__version__", "AuditError", "extract", "robustness", "gate", "scan", "provenance", "query", "sweep",
           "Result", "ExtractResult", "RobustnessResult", "GateResult", "ScanResult", "ProvenanceResult",
           "QueryResult", "SweepResult"]
