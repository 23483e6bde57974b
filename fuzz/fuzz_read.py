"""Coverage-guided fuzzing of the reading path (atheris): bytes -> open_model -> WeightStore ->
torch_views -> every weight's array. The only exception allowed out is AuditError.

    python fuzz/fuzz_read.py -runs=2000 [-max_len=4096] [CORPUS_DIR ...]   # make fuzz runs it longer

Seeds: the hostile corpus's base model and a few valid variants (built in memory). A crash
(any other exception, a hang past -timeout, memory past -rss_limit_mb) writes the input to
crash-<hash>; such inputs become regression cases in tests/test_hostile.py.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["auditor"]):
    from auditor.errors import AuditError
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

_DIR = Path(tempfile.mkdtemp(prefix="wmaudit-fuzz-"))
_MODEL = _DIR / "model.onnx"


def read_all(data: bytes) -> None:
    """What every command does first with a file: open, list weights, views, read each weight."""
    _MODEL.write_bytes(data)
    try:
        store = WeightStore.open(_MODEL)
        for v in torch_views(store):
            v.array()
        for w in store.weights:
            store.array(w.name)
    except AuditError as e:
        if "\n" in str(e):
            raise AssertionError(f"AuditError of more than one line: {e!r}") from None


def seeds() -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fixtures import hostile

    out = [hostile.base_model().SerializeToString(), hostile._qdq_model().SerializeToString(),
           hostile._nbits_model().SerializeToString(), hostile._if_nest(3)]
    return out


def main() -> None:
    args = list(sys.argv)
    dirs = [a for a in args[1:] if not a.startswith("-")]
    if not dirs:  # a private corpus folder
        dirs = [tempfile.mkdtemp(prefix="wmaudit-fuzz-seeds-")]
        args.append(dirs[0])
    if os.path.isdir(dirs[0]) and not any(Path(dirs[0]).iterdir()):  # seed an empty corpus folder
        for i, b in enumerate(seeds()):
            (Path(dirs[0]) / f"seed{i}").write_bytes(b)
    atheris.Setup(args, lambda data: read_all(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
