"""The CI examples (examples/ci): valid YAML whose wmaudit commands parse with the real
command line, run on a real model in the order the job runs them, and publish the JUnit
file the gate writes (valid against the CI JUnit schema)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from auditor.cli import build_parser, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
XSD = Path(__file__).resolve().parent / "junit.xsd"
POLICY = """
format = "wmaudit-policy/1"
name = "ci example"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
max_accuracy_drop = 3.0
[accuracy]
samples = 200
seed = 0
[[attacks]]
id = "fp16"
steps = "fp16"
"""


def _shell_lines(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        for line in t.replace("\\\n", " ").splitlines():
            if line.strip():
                out.append(line.strip())
    return out


def _github(doc: dict) -> tuple[dict, list[str], list[str]]:
    assert doc.get("on", doc.get(True)), "a workflow needs triggers"
    env = dict(doc.get("env", {}))
    runs, junit = [], []
    for job in doc["jobs"].values():
        assert job["runs-on"] and job["steps"]
        env.update(job.get("env", {}))
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"unpinned action {step['uses']}"
                if "junit" in step["uses"]:
                    junit.append(step["with"]["report_paths"])
            else:
                runs.append(step["run"])
    return env, _shell_lines(runs), junit


def _gitlab(doc: dict) -> tuple[dict, list[str], list[str]]:
    jobs = {k: v for k, v in doc.items() if isinstance(v, dict) and "script" in v}
    assert jobs, "a GitLab CI file needs a job with a script"
    env, runs, junit = {}, [], []
    for job in jobs.values():
        env.update(job.get("variables", {}))
        runs += job["script"] + job.get("after_script", [])
        assert job["artifacts"]["when"] == "always"
        junit.append(job["artifacts"]["reports"]["junit"])
    return env, _shell_lines(runs), junit


@pytest.mark.parametrize("name,reader", [("github-actions.yml", _github), ("gitlab-ci.yml", _gitlab)])
def test_ci_example_runs_the_gate_and_publishes_junit(name, reader, build_fixture, tmp_path, monkeypatch, capsys):
    import xmlschema

    doc = yaml.safe_load((ROOT / "examples" / "ci" / name).read_text())
    env, lines, junit = reader(doc)
    commands = [ln for ln in lines if ln.startswith("wmaudit ")]
    assert [shlex.split(c)[1] for c in commands] == ["gate", "report"]
    assert any("pip install" in ln and "$WMAUDIT_INSTALL" in ln for ln in lines)

    fx = build_fixture("attacks-tinycnn-marked")
    (tmp_path / "release-policy.toml").write_text(POLICY)
    env = {k: str(v) for k, v in env.items()}
    env.update(MODEL=str(fx / "model.onnx"), WMAUDIT_KEY_FILE=str(fx / "key.json"),
               POLICY=str(tmp_path / "release-policy.toml"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / env["OUT"]).mkdir(parents=True)
    for c in commands:
        # the job's variables, as the runner's shell expands them
        argv = shlex.split(re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env[m.group(1) or m.group(2)], c))[1:]
        build_parser().parse_args(argv)  # real subcommand, real options
        assert main(argv) == 0, capsys.readouterr().err
    for j in junit:
        path = tmp_path / j
        assert path.is_file(), f"{name} publishes {j}, which the gate did not write"
        assert xmlschema.XMLSchema(str(XSD)).is_valid(str(path))
    assert (tmp_path / env["OUT"] / "gate.html").is_file()
