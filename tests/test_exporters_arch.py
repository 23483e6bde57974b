"""exporters: the manifest's BatchNorm provenance is what the written graph has."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from exporters import arch  # noqa: E402
from exporters.export import batchnorm_provenance  # noqa: E402


def test_batchnorm_provenance_reads_the_graph(build_fixture):
    d = build_fixture("arch-resnet")
    model = arch.ResNetS()  # 8 BatchNorm modules
    assert batchnorm_provenance(model, d / "kept.onnx") == {"keep_batchnorm": True, "batchnorm_modules": 8,
                                                            "batchnorm_nodes": 8}
    # torch's default export folded every one: "BatchNorm kept" must not be claimed
    assert batchnorm_provenance(model, d / "default.onnx") == {"keep_batchnorm": False, "batchnorm_modules": 8,
                                                               "batchnorm_nodes": 0}
    # a model without BatchNorm: nothing to keep or fold
    assert batchnorm_provenance(arch.ViTS(), build_fixture("arch-vit") / "kept.onnx")["keep_batchnorm"] is None


def test_exporter_cli_refuses_more_bits_than_coefficients(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # SmallCNN's features.conv2.weight [32, 32, 3, 3] under mean: 288 values
    r = subprocess.run([sys.executable, "-m", "exporters", "embed", "--model", "small-cnn", "--bits", "300",
                        "--reduce", "mean", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "has 288 coefficients for 300 bits" in lines[0]
    assert not (tmp_path / "out" / "model.onnx").exists() and not (tmp_path / "out" / "key.json").exists()
