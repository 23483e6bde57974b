"""MLflow: gate and robustness log one run each to a real local tracking store (SQLite, made
here), read back with MLflow's own client; the gate guards registration in the model registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra (pip install 'wmaudit[mlflow]')")

import wmaudit  # noqa: E402
from auditor.cli import main  # noqa: E402
from wmaudit.registry import GateFailed, register_if_gate_passes  # noqa: E402
from wmaudit.tracking import metric_name, public_uri  # noqa: E402

MARKED, UNMARKED = "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"

POLICY = """
format = "wmaudit-policy/1"
name = "mlflow test"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
max_accuracy_drop = 3.0
[accuracy]
samples = 300
seed = 0
[[attacks]]
id = "fp16"
steps = "fp16"
"""


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _client(uri: str):
    return mlflow.MlflowClient(tracking_uri=uri)


def _artifact(client, run_id: str, name: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, name, str(dst)))


def test_gate_cli_logs_one_run(build_fixture, tmp_path, store, capsys):
    d = build_fixture(MARKED)
    (tmp_path / "policy.toml").write_text(POLICY)
    rc = main(["gate", str(d / "model.onnx"), "--key", str(d / "key.json"), "--policy", str(tmp_path / "policy.toml"),
               "--mlflow", store, "--mlflow-experiment", "release", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["verdict"] == "pass"
    client = _client(store)
    exp = client.get_experiment_by_name("release")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == doc["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["wmaudit.verdict"] == "pass" and run.data.tags["wmaudit.kind"] == "gate"
    assert run.data.tags["wmaudit.key_commitment"] == doc["key_commitment"]
    m = run.data.metrics
    # per attack and backend: the numbers the document holds
    fp16 = next(c for c in doc["attacks"] if c["id"] == "fp16")
    assert m["accuracy/fp16/ort-cpu"] == pytest.approx(fp16["accuracy"]["ort-cpu"]["accuracy"])
    assert m["ber/fp16"] == pytest.approx(fp16["whitebox"]["marks"][0]["ber"])
    assert m["summary/passed"] == doc["summary"]["passed"] and m["summary/failed"] == 0
    logged = json.loads(_artifact(client, run.info.run_id, "result.json", tmp_path).read_text())
    assert logged == doc
    html = _artifact(client, run.info.run_id, "report.html", tmp_path).read_text()
    assert "<html" in html and "PASS" in html.upper()


def test_robustness_api_logs_metrics_per_config(build_fixture, tmp_path, store):
    d = build_fixture(MARKED)
    (tmp_path / "grid.toml").write_text('[grid]\nprune_rates = [0.5]\nquantize = ["none", "fp16"]\n')
    r = wmaudit.robustness(d / "model.onnx", d / "key.json", grid=tmp_path / "grid.toml", samples=300, jobs=1,
                           mlflow=store)
    run = _client(store).get_run(r.document["mlflow"]["run_id"])
    assert run.data.tags["wmaudit.verdict"] == r.verdict and run.data.tags["wmaudit.kind"] == "robustness"
    for row in r.document["configs"]:
        name = row["name"]
        assert run.data.metrics[metric_name("ber", name)] == pytest.approx(row["marks"][0]["ber"])
        assert run.data.metrics[metric_name("top1_agreement", name)] == pytest.approx(
            row["fidelity"]["top1_agreement"])
        assert run.data.metrics[metric_name("usable", name)] == float(row["usable"])
    assert run.data.metrics["summary/survived"] == r.survived
    assert "," not in " ".join(run.data.metrics)  # MLflow refuses commas in metric names


def test_gate_guards_registration(build_fixture, tmp_path, store):
    d, twin = build_fixture(MARKED), build_fixture(UNMARKED)
    (tmp_path / "policy.toml").write_text(POLICY)
    result, version = register_if_gate_passes(d / "model.onnx", d / "key.json", tmp_path / "policy.toml",
                                              tracking_uri=store, registered_model_name="classifier")
    assert result.passed and str(version.version) == "1" and version.run_id == result.document["mlflow"]["run_id"]
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    with pytest.raises(GateFailed) as e:
        register_if_gate_passes(twin / "model.onnx", d / "key.json", tmp_path / "policy.toml",
                                tracking_uri=store, registered_model_name="classifier")
    assert isinstance(e.value, wmaudit.AuditError) and not e.value.result.passed
    versions = client.search_model_versions("name='classifier'")
    assert [str(v.version) for v in versions] == ["1"]          # the failing model was not registered
    # the failing gate is still on record, as its own run with the verdict tag
    runs = client.search_runs([client.get_experiment_by_name("wmaudit").experiment_id])
    assert sorted(r.data.tags["wmaudit.verdict"] for r in runs) == ["fail", "pass"]


def test_unreachable_store_is_one_line(build_fixture, tmp_path, capsys):
    d = build_fixture(MARKED)
    (tmp_path / "policy.toml").write_text(POLICY)
    (tmp_path / "file").write_text("")
    rc = main(["gate", str(d / "model.onnx"), "--key", str(d / "key.json"), "--policy", str(tmp_path / "policy.toml"),
               "--mlflow", f"sqlite:///{tmp_path / 'file' / 'no.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "mlflow" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_credentials_never_recorded():
    assert public_uri("https://user:secret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert public_uri("sqlite:///m.db") == "sqlite:///m.db"
