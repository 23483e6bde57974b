"""The gate as MLflow's validation step: register a model version only when the gate passes.

    from wmaudit.registry import register_if_gate_passes
    result, version = register_if_gate_passes("model.onnx", "key.json", "release-policy.toml",
                                              tracking_uri="sqlite:///mlflow.db",
                                              registered_model_name="classifier")

The gate run is logged either way (``wmaudit.tracking.log_result``); a failing gate raises
``GateFailed`` (an ``AuditError``) and registers nothing. MLflow is an optional dependency.
"""
from __future__ import annotations

import os
from typing import Any

from auditor.errors import AuditError

from wmaudit.api import gate
from wmaudit.results import GateResult
from wmaudit.tracking import _mlflow


class GateFailed(AuditError):
    """The gate did not pass, so the model was not registered (``.result`` holds the gate result)."""

    def __init__(self, result: GateResult):
        super().__init__(f"gate {result.verdict}: {len(result.failed)} requirement(s) not met "
                         f"({', '.join(r.id for r in result.failed[:10])}); the model was not registered")
        self.result = result


def register_if_gate_passes(model: str | os.PathLike[str], key: str | os.PathLike[str], policy: str | os.PathLike[str],
                            *, tracking_uri: str, registered_model_name: str, experiment: str = "wmaudit",
                            **gate_options: Any) -> tuple[GateResult, Any]:
    """Run the gate on the ONNX file ``model``; log the run; when it passes, log the model to that
    run (``mlflow.onnx``) and register it as a new version of ``registered_model_name``.
    Returns (gate result, model version); raises ``GateFailed`` (an AuditError) when the gate
    does not pass, with nothing registered."""
    mlflow = _mlflow()
    import onnx

    result = gate(model, key, policy, mlflow=tracking_uri, mlflow_experiment=experiment, **gate_options)
    if not result.passed:
        raise GateFailed(result)
    run_id = result.document["mlflow"]["run_id"]
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(model)), name="model")
    try:
        client.get_registered_model(registered_model_name)
    except Exception:
        client.create_registered_model(registered_model_name)
    version = client.create_model_version(registered_model_name, info.model_uri, run_id=run_id,
                                          tags={"wmaudit.verdict": result.verdict,
                                                "wmaudit.model_sha256": str(result.document["model"]["sha256"])})
    return result, version
