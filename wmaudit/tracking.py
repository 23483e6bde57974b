"""MLflow: one run per gate or robustness result, and the gate as a step before registration.

``log_result(result, tracking_uri)`` creates one MLflow run holding

* metrics per attack and target: for a robustness grid ``ber/<config>``, ``log10_p/<config>``,
  ``survived/<config>`` (1/0), ``usable/<config>``, ``accuracy/<config>``,
  ``top1_agreement/<config>``, ``sqnr_db/<config>`` (``.../<config>/<target>`` where the grid
  has a target axis); for a gate the same per attack and backend, and every requirement's
  measured values under ``<requirement id>/<measure>``; plus the summary counts;
* the result JSON (``result.json``) and the HTML report (``report.html``) as artifacts;
* the verdict as the tag ``wmaudit.verdict`` (with ``wmaudit.kind``, the model's sha256 and
  the key's commitment, never the key).

``wmaudit.registry.register_if_gate_passes`` runs the gate on an ONNX file and registers it
in the MLflow model registry only when the gate passes (the validation step before registration).

MLflow is an optional dependency (``pip install 'wmaudit[mlflow]'``).
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from auditor.errors import AuditError

from wmaudit.results import GateResult, Result, RobustnessResult

_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise AuditError("MLflow is not installed: pip install 'wmaudit[mlflow]'") from None
    return mlflow


def metric_name(*parts: str) -> str:
    """An MLflow metric key (alphanumerics, _ - . space : / only; others become _)."""
    return "/".join(_BAD.sub("_", str(p)) for p in parts if p)[:250]


def public_uri(uri: str) -> str:
    """The tracking URI without user name or password (what results record)."""
    s = urlsplit(uri)
    if s.username or s.password:
        host = s.hostname or ""
        if s.port:
            host += f":{s.port}"
        return urlunsplit((s.scheme, host, s.path, s.query, s.fragment))
    return uri


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
        return float(v)
    return None


def _target_of(row: dict[str, Any]) -> str:
    t = row.get("target")
    if isinstance(t, dict):
        return str(t.get("name") or t.get("id") or "")
    return str(t) if t else ""


def metrics_of(result: Result) -> dict[str, float]:
    """The numbers one run records (see the module docstring)."""
    doc = result.document
    out: dict[str, float] = {}

    def put(value: Any, *parts: str) -> None:
        v = _num(value)
        if v is not None:
            out[metric_name(*parts)] = v

    if isinstance(result, RobustnessResult):
        for row in doc.get("configs", []):
            name, tgt = row["name"], _target_of(row)
            mk = (row.get("marks") or [{}])[0]
            fid = row.get("fidelity") or {}
            put(mk.get("ber"), "ber", name, tgt)
            put(mk.get("log10_p_corrected", mk.get("log10_p")), "log10_p", name, tgt)
            put(row.get("survived"), "survived", name, tgt)
            put(row.get("usable"), "usable", name, tgt)
            put(row.get("accuracy"), "accuracy", name, tgt)
            put(row.get("accuracy_drop"), "accuracy_drop", name, tgt)
            put(fid.get("top1_agreement"), "top1_agreement", name, tgt)
            put(fid.get("sqnr_db"), "sqnr_db", name, tgt)
        base = doc.get("baseline") or {}
        put(((base.get("marks") or [{}])[0]).get("ber"), "ber", "baseline")
        put(base.get("accuracy"), "accuracy", "baseline")
        s = doc.get("summary", {})
        for k in ("configs", "usable", "survived"):
            put(s.get(k), "summary", k)
        put(len(s.get("broken", [])), "summary", "mark_lost")
        put(len(s.get("model_broken", [])), "summary", "model_broken")
    elif isinstance(result, GateResult):
        for cell in doc.get("attacks", []):
            aid = cell.get("id", "")
            marks = ((cell.get("whitebox") or {}).get("marks")) or []
            if marks:
                best = min(marks, key=lambda m: m.get("log10_p", 0.0))
                put(best.get("ber"), "ber", aid)
                put(best.get("log10_p"), "log10_p", aid)
            for backend, acc in (cell.get("accuracy") or {}).items():
                if isinstance(acc, dict):
                    put(acc.get("accuracy"), "accuracy", aid, backend)
                    put(acc.get("accuracy_drop"), "accuracy_drop", aid, backend)
                    put((acc.get("fidelity") or {}).get("top1_agreement"), "top1_agreement", aid, backend)
                    put((acc.get("fidelity") or {}).get("sqnr_db"), "sqnr_db", aid, backend)
        for r in doc.get("requirements", []):
            put(r.get("status") == "pass", "requirement", r.get("id", ""))
            for k, v in (r.get("measured") or {}).items():
                put(v, r.get("id", ""), k)
        for k, v in (doc.get("summary") or {}).items():
            put(v, "summary", k)
    return out


def _tags(result: Result) -> dict[str, str]:
    doc = result.document
    tags = {"wmaudit.kind": str(doc.get("kind", "")), "wmaudit.verdict": result.verdict,
            "wmaudit.passed": "true" if result.passed else "false",
            "wmaudit.schema": str(doc.get("schema", "")), "wmaudit.version": str((doc.get("tool") or {}).get("version", ""))}
    if isinstance(doc.get("model"), dict):
        tags["wmaudit.model_sha256"] = str(doc["model"].get("sha256", ""))
    if doc.get("key_commitment"):
        tags["wmaudit.key_commitment"] = str(doc["key_commitment"])
    return tags


def _batches(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_result(result: Result, tracking_uri: str, *, experiment: str = "wmaudit", run_name: str | None = None,
               html: bool = True) -> str:
    """Log ``result`` as one finished MLflow run in ``experiment`` at ``tracking_uri``; returns the run id.

    The result's document gains ``mlflow`` = {tracking_uri (without credentials), experiment,
    run_id} before its JSON is logged, so the artifact names its own run."""
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param, RunTag

    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise AuditError("mlflow: give a tracking URI (e.g. sqlite:///mlflow.db or http://host:5000)")
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        doc = result.document
        name = run_name or f"{doc.get('kind')} {Path(str((doc.get('model') or {}).get('path', ''))).name}".strip()
        run = client.create_run(exp_id, run_name=name, tags=_tags(result))
    except AuditError:
        raise
    except Exception as e:  # MLflow raises many types for an unreachable or malformed store
        raise AuditError(f"mlflow: cannot start a run at {public_uri(tracking_uri)}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    run_id = run.info.run_id
    status = "FAILED"
    try:
        doc["mlflow"] = {"tracking_uri": public_uri(tracking_uri), "experiment": experiment, "run_id": run_id}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in sorted(metrics_of(result).items())]
        params = [Param("command", doc.get("command", "")[:6000])]
        if isinstance(doc.get("model"), dict):
            params.append(Param("model", str(doc["model"].get("path", ""))[:6000]))
        for b in _batches(metrics, 1000):
            client.log_batch(run_id, metrics=b)
        client.log_batch(run_id, params=params, tags=[RunTag("mlflow.note.content", _headline(result))])
        with tempfile.TemporaryDirectory(prefix="wmaudit-mlflow-") as d:
            result.save(Path(d) / "result.json")
            client.log_artifact(run_id, str(Path(d) / "result.json"))
            if html:
                from auditor.report.html import render

                (Path(d) / "report.html").write_text(render([doc]), encoding="utf-8")
                client.log_artifact(run_id, str(Path(d) / "report.html"))
        status = "FINISHED"
    except Exception as e:
        raise AuditError(f"mlflow: logging run {run_id} failed: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    finally:
        client.set_terminated(run_id, status=status)
    return run_id


def _headline(result: Result) -> str:
    if isinstance(result, RobustnessResult):
        return result.headline
    if isinstance(result, GateResult):
        failed = result.failed
        return f"gate {result.verdict.upper()}" + (f": {len(failed)} requirement(s) not met: "
                                                  + ", ".join(r.id for r in failed[:20]) if failed else "")
    return result.verdict
