"""The RNN and overhead benches in their quick form (slow: about 2 minutes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_rnn_quick_reads_every_mark_from_onnx(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_rnn.py"), "--out", str(tmp_path), "--quick"],
                   check=True, capture_output=True)
    doc = json.loads((tmp_path / "bench_rnn.json").read_text())
    assert doc["command"].startswith("python bench/bench_rnn.py") and doc["seed"] == 0
    for section in ("sine_simple_rnn", "noisy_sine_lstm", "char_lstm"):
        rows = doc[section]["results"]
        assert "unmarked" in rows
        for name, row in rows.items():
            for mark in row.get("marks", {}).values():
                assert mark["detected_fraction"] == 1.0, (section, name, mark)
                assert mark["via"] == "auditor.marks.whitebox.extract"
    assert doc["sine_simple_rnn"]["results"]["kernel"]["weights"] == {"rnn.weight_ih_l0": 20, "rnn.weight_hh_l0": 400}
    assert doc["noisy_sine_lstm"]["results"]["kernel"]["weights"] == {"rnn.weight_ih_l0": 1200,
                                                                      "rnn.weight_hh_l0": 360000}


@pytest.mark.slow
def test_bench_embed_overhead_quick_is_small_for_the_cnn(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_embed_overhead.py"), "--out", str(tmp_path), "--quick"],
                   check=True, capture_output=True)
    doc = json.loads((tmp_path / "bench_embed_overhead.json").read_text())
    assert doc["results"]["SmallCNN"]["overhead_percent"] < 5.0
    assert doc["results"]["SmallCNN"]["marks"] == [{"param": "features.conv2.weight", "reduce": "mean", "bits": 256,
                                                    "coefficients": 288}]
