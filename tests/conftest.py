import os
import sys
from pathlib import Path

import pytest

# onnxruntime writes a telemetry database under HOME unless this is set before it is imported
# (auditor/__init__.py sets it for the auditor; the tests import onnxruntime directly too).
if os.environ.get("WMAUDIT_ALLOW_ORT_TELEMETRY") != "1":
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def build_fixture():
    """build_fixture(name) -> Path of a registered fixture (built on demand)."""
    from fixtures.build import ensure

    return ensure


def pytest_collection_modifyitems(config, items):
    # GPU / TensorRT tests skip cleanly where the hardware or package is absent.
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    try:
        import onnxruntime as ort
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA execution provider on this machine"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="TensorRT is not installed"))
