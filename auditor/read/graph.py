"""Opening ONNX files safely, and reading one tensor at a time.

`open_model` parses the protobuf without loading external data, then checks
that every external-data reference stays inside the model's folder (no
absolute paths, no `..` escapes, no symlinks pointing out) and that the file
it names exists and is long enough. `tensor_array` reads one tensor: inline
data through onnx.numpy_helper, external data by seeking to its offset and
reading only its bytes, so one weight never costs the whole model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from auditor.errors import AuditError
from auditor.read import limits

__all__ = [
    "open_model",
    "model_dir",
    "iter_graphs",
    "iter_tensors",
    "external_info",
    "resolve_external",
    "external_files",
    "tensor_array",
    "tensor_shape",
    "load_external",
    "model_tensors",
]


def open_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse `path` as an ONNX model, external data not loaded, everything checked.

    The file is read under auditor.read.limits (a regular file, not too large),
    parsed, then validated in one linear pass (graph and opset present, tensor
    sizes backed by their bytes, names defined once and before use, subgraph
    depth and node count bounded, external data under onnx's rules). Raises
    AuditError (one line) on the first problem.
    """
    p = Path(path)
    data = limits.read_model_bytes(p)
    from auditor.read import ortformat

    if ortformat.is_ort_format(data):
        # onnxruntime's ORT format (.ort): its flatbuffer rebuilt as an ONNX model, then checked the same way
        model = ortformat.to_onnx(data, str(p))
        limits.check_model(model, model_dir(p), where=str(p))
        return model
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError and friends (nesting too deep included)
        if "MaxDepth" in str(e) or "recursion" in str(e).lower():
            raise AuditError(f"{p}: messages nested deeper than the protobuf reader allows (100 levels: "
                             f"about 32 levels of subgraphs)") from None
        raise AuditError(f"{p}: not an ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    if not model.HasField("graph") and not model.opset_import:
        # Protobuf parsing is permissive: random bytes can decode to an empty message.
        raise AuditError(f"{p}: not an ONNX model (no graph, no opset)")
    limits.check_model(model, model_dir(p), where=str(p))
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_external(model: onnx.ModelProto, base_dir: str | os.PathLike) -> onnx.ModelProto:
    """Bring every external tensor of an opened model into memory (in place), through the same
    checked reader as `tensor_array`: no path outside the folder, no link, no device, exact bytes."""
    for tensor, _ in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            path, offset, length = resolve_external(tensor, base_dir, check_size=True)
            raw = _read_exact(path, offset, length, tensor.name or "<unnamed>")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw.tobytes()
    return model


def model_dir(path: str | os.PathLike) -> Path:
    """The folder external-data locations are relative to."""
    return Path(path).resolve().parent


def iter_graphs(graph: onnx.GraphProto, owner: str | None = None) -> Iterator[tuple[onnx.GraphProto, str | None]]:
    """The graph and all its subgraphs (If/Loop/Scan bodies), recursively,
    each with the name of the node that owns it (None for the main graph)."""
    yield graph, owner
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, node.name or node.op_type)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g, node.name or node.op_type)


def iter_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto held by the graph: initializers and node attributes,
    subgraphs included, each with a short description of where it is."""
    for g, owner in iter_graphs(graph):
        for t in g.initializer:
            yield t, f"initializer {t.name!r}" + (f" in subgraph of {owner!r}" if owner else "")
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t, f"attribute {attr.name!r} of node {node.name or node.op_type!r}"
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t, f"attribute {attr.name!r} of node {node.name or node.op_type!r}"


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto of the model: the graph's (iter_tensors) and those in the bodies of its
    local functions (onnx's external-data loader reads both)."""
    yield from iter_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                where = f"attribute {attr.name!r} of node {node.name or node.op_type!r} in function {fn.name!r}"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t, where
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t, where
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from iter_tensors(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from iter_tensors(g)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The external_data key/value entries of a tensor (location, offset, length, ...)."""
    return {e.key: e.value for e in tensor.external_data}


def resolve_external(tensor: onnx.TensorProto, base_dir: str | os.PathLike, *, check_size: bool = False) -> tuple[Path, int, int]:
    """(file, offset, length in bytes) of an external tensor, checked under onnx's rules
    (auditor.read.limits.check_external): relative, inside base_dir, no symlink on the way,
    a regular file with one link, offset + length inside it. The length is always the
    tensor's exact size in bytes."""
    offset, length = limits.check_external(tensor, base_dir)
    loc, _, _ = limits.external_ranges(tensor)
    return ExternalFile(Path(base_dir), loc), offset, length


class ExternalFile:
    """An external-data file named by the model's folder and the relative location inside it
    (every read reopens it from the folder, component by component, without following links)."""

    def __init__(self, base: Path, loc: str):
        self.base, self.loc = base, loc

    @property
    def name(self) -> str:
        return self.loc

    def __fspath__(self) -> str:
        return str(self.base / self.loc)

    def __str__(self) -> str:
        return self.__fspath__()

    def __repr__(self) -> str:
        return f"ExternalFile({str(self)!r})"


def external_files(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data locations the model refers to, in order of first use."""
    seen: dict[str, None] = {}
    for t, _ in model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            seen.setdefault(external_info(t).get("location", ""), None)
    return list(seen)


def tensor_shape(tensor: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


# 4-bit (and 2-bit) types are packed in raw data; numpy_helper unpacks them.
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}
# Types numpy reads directly from raw bytes (everything else goes through numpy_helper).
_PLAIN = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


class BufferPool:
    """Buffers of arrays a caller released, reused by the next external reads of the same size:
    reading into memory that is already mapped costs a plain read; fresh memory costs a page
    fault every 4 KiB on top. Holds at most `limit` buffers; thread-safe (the prefetch thread reads)."""

    def __init__(self, limit: int = 2):
        import threading

        self.limit = limit
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            lst = self._free.get(nbytes)
            return lst.pop() if lst else None

    def give(self, buf: np.ndarray) -> None:
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous or not buf.flags.writeable:
            return
        with self._lock:
            if sum(len(v) for v in self._free.values()) < self.limit:
                self._free.setdefault(buf.nbytes, []).append(buf)


def _read_exact(path: "ExternalFile", offset: int, nbytes: int, name: str,
                pool: BufferPool | None = None) -> np.ndarray:
    """Read nbytes at offset into a uint8 buffer (a fresh one, or one of `pool`'s), the file opened
    under onnx's rules (auditor.read.limits.open_external: no symlink, regular file, one hard link).
    A file shorter than the tensor needs (truncated since it was opened) is an AuditError."""
    try:
        buf = pool.take(nbytes) if pool is not None else None
        if buf is None:
            buf = np.empty(nbytes, dtype=np.uint8)
    except MemoryError:
        raise AuditError(f"tensor {name!r}: its {nbytes} bytes of external data do not fit in this process's "
                         f"memory") from None
    with limits.open_external(path.base, path.loc, name) as f:
        if nbytes >= (8 << 20) and hasattr(os, "posix_fadvise"):
            try:  # ask the kernel to read the whole range ahead: faster on a cold cache
                os.posix_fadvise(f.fileno(), offset, nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
        f.seek(offset)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise AuditError(f"tensor {name!r}: external data {path.name!r} ends after {got} of {nbytes} bytes")
            got += n
    return buf


def tensor_array(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None = None,
                 pool: BufferPool | None = None) -> np.ndarray:
    """The values of one tensor as numpy, in its stored dtype.

    External data is read with one seek and one read of exactly its bytes;
    the rest of the external file is never touched.
    """
    name = tensor.name or "<unnamed>"
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        try:
            return numpy_helper.to_array(tensor)
        except Exception as e:
            raise AuditError(f"tensor {name!r}: cannot decode ({type(e).__name__}: {_first_line(e)})") from None
    if base_dir is None:
        raise AuditError(f"tensor {name!r}: external data needs the model's folder")
    path, offset, length = resolve_external(tensor, base_dir)
    raw = _read_exact(path, offset, length, name, pool if tensor.data_type in _PLAIN else None)
    if tensor.data_type in _PLAIN:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        arr = raw.view(dtype).reshape(tensor_shape(tensor))
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)
    # Packed / exotic types: hand exactly the tensor's bytes to numpy_helper.
    t = onnx.TensorProto()
    t.CopyFrom(tensor)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw.tobytes()
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise AuditError(f"tensor {name!r}: cannot decode external data ({type(e).__name__}: {_first_line(e)})") from None
