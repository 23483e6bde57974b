"""Isolation of onnxruntime: a crash, a hang or a memory blow-up in the child is one line in the parent."""
import os
import signal
import time

import numpy as np
import pytest

from auditor.backends import isolate
from auditor.errors import AuditError


def _segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def _sleep(seconds):
    time.sleep(seconds)


def _allocate(n_bytes):
    return np.ones(n_bytes, dtype=np.uint8).sum()


def _audit_error():
    raise AuditError("a bad\nmodel")


def _value_error():
    raise ValueError("line one\nline two")


def _add(a, b):
    return a + b


def test_result_and_errors_come_back_as_one_line():
    assert isolate.call(_add, 2, b=3) == 5
    with pytest.raises(AuditError) as e:
        isolate.call(_audit_error)
    assert str(e.value) == "a bad model"
    with pytest.raises(AuditError) as e:
        isolate.call(_value_error, what="onnxruntime")
    assert str(e.value) == "onnxruntime failed on this model: ValueError: line one"


def test_crash_hang_and_memory_are_contained():
    with pytest.raises(AuditError) as e:
        isolate.call(_segfault, what="onnxruntime")
    assert str(e.value) == "onnxruntime crashed (SIGSEGV) on this model"
    t0 = time.perf_counter()
    with pytest.raises(AuditError) as e:
        isolate.call(_sleep, 60, what="onnxruntime", timeout=3)
    assert str(e.value) == "onnxruntime ran out of time (3 s) on this model"
    assert time.perf_counter() - t0 < 20
    with pytest.raises(AuditError) as e:  # 3 GiB under a 1 GiB address-space limit
        isolate.call(_allocate, 3 << 30, what="onnxruntime", memory=1 << 30)
    assert str(e.value) == "onnxruntime ran out of memory (limit 1.0 GiB) on this model"
