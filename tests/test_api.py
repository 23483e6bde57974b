"""The Python API (``import wmaudit``): each function on real fixtures gives the document the
command prints with --json (apart from ``created`` and ``command``), takes in-memory models,
keeps fields it does not know, and raises ``wmaudit.AuditError`` for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import wmaudit
from auditor.cli import main

MARKED, UNMARKED = "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"

GRID = """
[grid]
prune_rates = [0.5, 0.97]
quantize = ["none"]

[[config]]
name = "fp16"
steps = "fp16"
"""

POLICY = """
format = "wmaudit-policy/1"
name = "api test"
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
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
"""


def _same(api_doc: dict, cli_doc: dict) -> None:
    a, c = dict(api_doc), dict(cli_doc)
    for d in (a, c):
        d.pop("created", None)
        d.pop("command", None)
    assert json.dumps(a, sort_keys=True) == json.dumps(c, sort_keys=True)


def _cli_json(capsys, argv: list[str]) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, json.loads(out.out)


def test_extract_matches_the_cli_and_takes_a_model_proto(build_fixture, capsys):
    d = build_fixture(MARKED)
    r = wmaudit.extract(d / "model.onnx", d / "key.json")
    rc, doc = _cli_json(capsys, ["extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json"])
    _same(r.document, doc)
    assert isinstance(r, wmaudit.ExtractResult) and r.passed and r.exit_code == rc == 0
    assert r.verdict == "detected" and r.p_value < 1e-6 and r.marks[0].ber < 0.05
    assert r.command.startswith("wmaudit.extract(model=")
    mem = wmaudit.extract(onnx.load(str(d / "model.onnx")), d / "key.json")
    assert mem.model is not None and mem.model["path"] == "<onnx.ModelProto>"
    assert mem.document["result"] == r.document["result"]
    twin = build_fixture(UNMARKED)
    assert not wmaudit.extract(twin / "model.onnx", d / "key.json").passed


@pytest.fixture(scope="module")
def grid_runs(build_fixture, tmp_path_factory):
    d = build_fixture(MARKED)
    tmp = tmp_path_factory.mktemp("grid")
    (tmp / "grid.toml").write_text(GRID)
    api = wmaudit.robustness(d / "model.onnx", d / "key.json", grid=tmp / "grid.toml", samples=400, jobs=1,
                             output_dir=tmp / "api")
    rc = main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--grid", str(tmp / "grid.toml"),
               "--samples", "400", "--jobs", "1", "-o", str(tmp / "cli")])
    return api, rc, json.loads((tmp / "cli" / "results.json").read_text()), tmp


def test_robustness_matches_the_cli(grid_runs):
    api, rc, cli, tmp = grid_runs
    _same(api.document, cli)
    assert api.exit_code == rc
    assert json.loads((tmp / "api" / "results.json").read_text())["summary"] == api.document["summary"]


def test_robustness_counts_survival_only_where_the_model_still_works(grid_runs):
    api, _, _, _ = grid_runs
    s = api.document["summary"]
    thr = s["usability"]
    assert thr["measured"] and thr["min_top1_agreement"] == 0.9 and thr["max_accuracy_drop"] == 5.0
    usable = 0
    survived = 0
    for row in api.document["configs"]:
        agree = row["fidelity"]["top1_agreement"]
        ok = agree >= 0.9 and 100 * row["accuracy_drop"] <= 5.0
        assert row["usable"] is ok
        usable += ok
        survived += ok and row["survived"]
        if not ok:
            assert row["name"] in s["model_broken"] and row["unusable_because"]
    assert s["usable"] == usable == api.usable and s["survived"] == survived == api.survived
    # pruning 97 % of the weights leaves a classifier no better than a few points above chance:
    # the mark may still read, but that is listed as a broken model, never counted as survival
    by = {c.name: c for c in api.configs}
    p97 = by["prune:0.97:magnitude"]
    assert p97.usable is False and p97.top1_agreement is not None and p97.top1_agreement < 0.5
    assert "prune:0.97:magnitude" in api.model_broken and "broke the model" in api.headline
    assert by["fp16"].usable is True and by["fp16"].survived
    if p97.survived:
        assert "prune:0.97:magnitude" in s["survived_in_broken_model"]


def test_robustness_thresholds_are_the_users(build_fixture, tmp_path, capsys):
    d = build_fixture(MARKED)
    (tmp_path / "g.toml").write_text('[[config]]\nname = "prune-97"\nsteps = "prune:0.97"\n')
    loose = wmaudit.robustness(d / "model.onnx", d / "key.json", grid=tmp_path / "g.toml", samples=200, jobs=1,
                               min_top1_agreement=0.0, max_accuracy_drop=100.0)
    assert loose.usable == 1 and loose.model_broken == []
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--min-top1-agreement", "1.5",
              "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "must be in [0, 1]" in err and len(err.strip().splitlines()) == 1


def test_gate_matches_the_cli_and_writes_junit(build_fixture, tmp_path, capsys):
    d = build_fixture(MARKED)
    (tmp_path / "policy.toml").write_text(POLICY)
    api = wmaudit.gate(d / "model.onnx", d / "key.json", tmp_path / "policy.toml", junit=tmp_path / "api.xml",
                       output=tmp_path / "api.json")
    rc, cli = _cli_json(capsys, ["gate", str(d / "model.onnx"), "--key", str(d / "key.json"), "--policy",
                                 str(tmp_path / "policy.toml"), "--junit", str(tmp_path / "cli.xml"), "--json"])
    _same(api.document, cli)
    assert isinstance(api, wmaudit.GateResult) and api.exit_code == rc == 0 and api.failed == []
    def junit(name: str) -> list[str]:  # every line but the recorded command
        return [ln for ln in (tmp_path / name).read_text().splitlines() if 'name="command"' not in ln]

    assert junit("api.xml") == junit("cli.xml") and "<testcase" in (tmp_path / "api.xml").read_text()
    assert json.loads((tmp_path / "api.json").read_text())["verdict"] == "pass"
    mem = wmaudit.gate(onnx.load(str(d / "model.onnx")), d / "key.json", tmp_path / "policy.toml")
    assert mem.passed and mem.document["model"]["path"] == "<onnx.ModelProto>"
    twin = wmaudit.gate(build_fixture(UNMARKED) / "model.onnx", d / "key.json", tmp_path / "policy.toml")
    assert not twin.passed and twin.exit_code == 1 and twin.failed


def test_scan_provenance_query_sweep_match_the_cli(build_fixture, tmp_path, capsys):
    d, twin = build_fixture(MARKED), build_fixture(UNMARKED)
    r = wmaudit.scan(d / "model.onnx", [d / "key.json"])
    rc, cli = _cli_json(capsys, ["scan", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json"])
    _same(r.document, cli)
    assert r.exit_code == rc == 0 and r.detected >= 1

    der, ref = build_fixture("forensics-derived"), build_fixture("cnn-small-mean")
    p = wmaudit.provenance(der / "pruned50.onnx", ref / "model.onnx")
    rc, cli = _cli_json(capsys, ["provenance", str(der / "pruned50.onnx"), "--reference", str(ref / "model.onnx"),
                                 "--json"])
    _same(p.document, cli)
    assert p.derived and p.exit_code == rc == 0

    bb = build_fixture("bb-trigger")
    q = wmaudit.query(bb / "marked.onnx", bb / "key.json", references=[bb / "unmarked.onnx"])
    rc, cli = _cli_json(capsys, ["query", str(bb / "marked.onnx"), "--key", str(bb / "key.json"),
                                 "--reference", str(bb / "unmarked.onnx"), "--json"])
    _same(q.document, cli)
    assert q.exit_code == rc == 0 and q.p_value < 1e-6

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(d / "model.onnx", corpus / "marked.onnx")
    shutil.copy(twin / "model.onnx", corpus / "twin.onnx")
    s = wmaudit.sweep(corpus, [d / "key.json"], tmp_path / "api.jsonl", jobs=1)
    rc, cli = _cli_json(capsys, ["sweep", str(corpus), "--key", str(d / "key.json"), "-o",
                                 str(tmp_path / "cli.jsonl"), "--jobs", "1", "--json"])
    assert rc == 0 and s.exit_code == 0
    assert [x["file"] for x in s.detected] == [x["file"] for x in cli["result"]["detected"]]
    assert [Path(x["file"]).name for x in s.detected] == ["marked.onnx"]
    assert s.document["result"]["verdicts"] == cli["result"]["verdicts"]


def test_bad_input_is_one_documented_exception(build_fixture, tmp_path):
    d = build_fixture(MARKED)
    (tmp_path / "bad.toml").write_text('format = "wmaudit-policy/1"\nname = 3\n')
    cases = [
        lambda: wmaudit.extract(tmp_path / "missing.onnx", d / "key.json"),
        lambda: wmaudit.extract(d / "model.onnx", tmp_path / "missing.json"),
        lambda: wmaudit.extract(d / "model.onnx", 42),  # type: ignore[arg-type]
        lambda: wmaudit.extract(d / "model.onnx", d / "key.json", alpha=2.0),
        lambda: wmaudit.robustness(d / "model.onnx", d / "key.json", grid=3.5),
        lambda: wmaudit.robustness(d / "model.onnx", d / "key.json", samples=0),
        lambda: wmaudit.robustness(d / "model.onnx", d / "key.json", min_top1_agreement=1.5),
        lambda: wmaudit.gate(d / "model.onnx", d / "key.json", tmp_path / "bad.toml"),
        lambda: wmaudit.scan(d / "model.onnx", []),
        lambda: wmaudit.provenance(d / "model.onnx", d / "model.onnx", method="nope"),
        lambda: wmaudit.query(d / "model.onnx", d / "key.json", backend="nope"),
    ]
    for case in cases:
        with pytest.raises(wmaudit.AuditError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value)


def test_results_keep_fields_they_do_not_know(build_fixture, tmp_path):
    d = build_fixture(MARKED)
    doc = wmaudit.extract(d / "model.onnx", d / "key.json").to_dict()
    doc["hardware"] = {"cpu": "some future CPU", "isa": ["avx2"]}
    doc["result"]["target"] = {"name": "qemu-aarch64"}
    r = wmaudit.Result.from_json(json.dumps(doc))
    assert isinstance(r, wmaudit.ExtractResult)
    assert json.loads(r.to_json()) == doc
    path = r.save(tmp_path / "r.json")
    back = wmaudit.ExtractResult.from_json(path)
    assert back.document == doc and back.passed
    with pytest.raises(wmaudit.AuditError, match="not 'gate'"):
        wmaudit.GateResult.from_json(path)
    with pytest.raises(wmaudit.AuditError, match="wmaudit-result/1"):
        wmaudit.Result.from_json({"schema": "other"})
