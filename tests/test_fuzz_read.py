"""The coverage-guided fuzz target of the reading path runs briefly in every test run
(`make fuzz` runs it for longer); its regression inputs read with AuditError or a result only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.errors import AuditError

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_read_short_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_read.py"), "-runs=5000", "-seed=1", "-max_len=4096",
                        "-timeout=20", "-rss_limit_mb=3000", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 5000 runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "hostile_regressions").glob("*.onnx")), ids=lambda p: p.name)
def test_regression_inputs(path, tmp_path):
    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        import fuzz_read
    finally:
        sys.path.pop(0)
    fuzz_read._MODEL = tmp_path / "model.onnx"
    fuzz_read.read_all(path.read_bytes())  # raises anything but a one-line AuditError
