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
