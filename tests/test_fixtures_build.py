"""fixtures/build.py: a built fixture is reused only while its `.done` records the fingerprint
of what would build it now (builder source, torch / onnx / onnxruntime / numpy versions)."""
from __future__ import annotations

import importlib
import json
import sys
from importlib.metadata import version

import pytest

from fixtures import build

BUILDER = '''
from pathlib import Path

from fixtures.build import fixture

CALLS = []


@fixture("{name}")
def _build(out: Path) -> None:
    CALLS.append(out)
    (out / "data.txt").write_text("{text}")
'''


@pytest.fixture
def area(tmp_path, monkeypatch):
    """A builder module of its own (in tmp_path) and an empty fixture folder."""
    name = f"fp-test-{tmp_path.name}"
    mod_name = f"fp_area_{abs(hash(str(tmp_path)))}"
    src = tmp_path / "src" / f"{mod_name}.py"
    src.parent.mkdir()
    src.write_text(BUILDER.format(name=name, text="one"))
    monkeypatch.syspath_prepend(str(src.parent))
    monkeypatch.setenv("WMAUDIT_FIXTURES", str(tmp_path / "fixtures"))
    mod = importlib.import_module(mod_name)
    yield name, src, mod
    build.REGISTRY.pop(name, None)
    sys.modules.pop(mod_name, None)


def test_built_once_then_reused(area):
    name, _, mod = area
    out = build.ensure(name)
    assert (out / "data.txt").read_text() == "one" and len(mod.CALLS) == 1
    done = json.loads((out / ".done").read_text())
    fp = done["fingerprint"]
    assert fp == build.fingerprint(name) and done["seconds"] >= 0
    assert fp["torch"] == version("torch") and fp["onnx"] == version("onnx")
    assert fp["onnxruntime"] == version("onnxruntime") and fp["numpy"] == version("numpy")
    assert len(fp["source_sha256"]) == 64 and fp["builder"].endswith("._build")
    assert build.ensure(name) == out and len(mod.CALLS) == 1


def test_edited_builder_source_rebuilds(area):
    name, src, mod = area
    out = build.ensure(name)
    before = build.recorded(out)
    src.write_text(BUILDER.format(name=name, text="one") + "\n# an edit\n")
    assert not build.is_current(name)
    build.ensure(name)
    assert len(mod.CALLS) == 2 and build.recorded(out)["source_sha256"] != before["source_sha256"]
    assert build.is_current(name)


def test_older_done_and_other_versions_rebuild(area, monkeypatch):
    name, _, mod = area
    out = build.ensure(name)
    (out / ".done").write_text("12.3s\n")  # the record an older build.py left: no fingerprint
    assert build.recorded(out) is None
    build.ensure(name)
    assert len(mod.CALLS) == 2
    # another torch release (as an upgrade of the venv would give): rebuilt, and the record says so
    real = build.fingerprint
    monkeypatch.setattr(build, "fingerprint", lambda n: {**real(n), "torch": "0.0.1"})
    assert not build.is_current(name)
    build.ensure(name)
    assert len(mod.CALLS) == 3 and build.recorded(out)["torch"] == "0.0.1"
    assert (out / "data.txt").read_text() == "one" and not (out.parent / f".{name}.tmp").exists()


def test_every_fixture_the_tests_use_records_what_built_it(build_fixture):
    out = build_fixture("attacks-tinycnn-marked")
    assert build.recorded(out) == build.fingerprint("attacks-tinycnn-marked")
    assert build.recorded(out)["builder"].startswith("fixtures.")
