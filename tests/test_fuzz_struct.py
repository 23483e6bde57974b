"""The structure-aware fuzzer (fuzz/fuzz_struct.py) in every test run: a fixed, derandomized sample
of ONNX models, keys (with their .npy sidecar), manifests, policies and grids, each mutated field by
field, through the readers and commands that take them (`make fuzz` runs it longer, with fresh
seeds). The rule: exit 0 / 1, or exit 2 with one line that is not an internal error; a reader
raises nothing but a one-line AuditError. Every kept regression input is replayed."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))
import fuzz_struct  # noqa: E402

sys.path.pop(0)

from auditor.read import limits  # noqa: E402

REGRESSIONS = ROOT / "tests" / "hostile_regressions"
# inputs per target in the default run (WMAUDIT_FUZZ_EXAMPLES overrides): about 40 s on 2 cores
EXAMPLES = {"onnx": 80, "key": 30, "manifest": 25, "policy": 80, "grid": 80, "data": 80}


@pytest.mark.parametrize("target", fuzz_struct.TARGETS)
def test_struct_fuzz_sample(target, tmp_path):
    n = int(os.environ.get("WMAUDIT_FUZZ_EXAMPLES", EXAMPLES[target]))
    fuzz_struct.run(target, n, out=tmp_path)  # raises Broken naming the saved, shrunk input


@pytest.mark.parametrize("target,path", fuzz_struct.regression_files(REGRESSIONS) +
                         [("onnx", p) for p in sorted(REGRESSIONS.glob("*.onnx"))],
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_regression_inputs_replayed(target, path):
    fuzz_struct.replay(target, path)


def test_mutations_reach_the_fields(tmp_path):
    """The ONNX strategy changes fields deep in the model (not only the bytes): over a fixed sample,
    mutated models still parse, and differ from their seed in nodes, attributes, tensors or opsets."""
    import onnx
    from hypothesis import HealthCheck, given, settings

    seeds = fuzz_struct.model_seeds()
    seen = {"parsed": 0, "changed": 0}

    @settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzz_struct.onnx_cases(seeds))
    def prop(case):
        name, data, _ = case
        m = onnx.ModelProto()
        try:
            m.ParseFromString(data)
        except Exception:
            return
        seen["parsed"] += 1
        seen["changed"] += data != seeds[name][0]
    prop()
    assert seen["parsed"] >= 30 and seen["changed"] >= 20, seen


def test_oracle_flags_a_reader_that_trusts_a_count(monkeypatch, tmp_path):
    """The check the fuzzer applies is not vacuous: with the reader's schema checks switched off
    (node arity, attribute types), the independent corpus's Constant without an output crashes a
    command (node.output[0]) and the check says so; with them on, the same input is one line."""
    from fixtures import hostile

    cases = {c["id"]: c for c in hostile.build(tmp_path / "corpus")}
    case = cases["fields/constant-no-output"]
    data = (tmp_path / "corpus" / case["id"] / "model.onnx").read_bytes()
    fuzz_struct.check_onnx(("fields", data, {}), _work(tmp_path / "on"))
    monkeypatch.setattr(limits, "_check_node", lambda *a, **k: None)
    monkeypatch.setattr(limits, "_check_attribute", lambda *a, **k: None)
    with pytest.raises(fuzz_struct.Broken, match="IndexError|internal error"):
        fuzz_struct.check_onnx(("fields", data, {}), _work(tmp_path / "off"))


def _work(p: Path) -> Path:
    p.mkdir()
    return p
