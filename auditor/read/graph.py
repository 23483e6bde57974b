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
]


def open_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse `path` as an ONNX model, external data not loaded, references checked.

    Raises AuditError (one line) for a missing file, a directory, a file that
    is not an ONNX protobuf, or an external-data reference that is unsafe or
    points at a missing / too short file.
    """
    p = Path(path)
    if not p.exists():
        raise AuditError(f"{p}: no such file")
    if p.is_dir():
        raise AuditError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise AuditError(f"{p}: not an ONNX model ({type(e).__name__})") from None
    if not model.opset_import and len(model.graph.node) == 0 and len(model.graph.initializer) == 0:
        # Protobuf parsing is permissive: random bytes can decode to an empty message.
        raise AuditError(f"{p}: not an ONNX model (no graph, no opset)")
    base = model_dir(p)
    for tensor, _where in iter_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            resolve_external(tensor, base, check_size=True)
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


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The external_data key/value entries of a tensor (location, offset, length, ...)."""
    return {e.key: e.value for e in tensor.external_data}


def resolve_external(tensor: onnx.TensorProto, base_dir: str | os.PathLike, *, check_size: bool = False) -> tuple[Path, int, int | None]:
    """(file, offset, length) of an external tensor, the file proven to lie inside base_dir.

    Refuses absolute locations, locations that climb out of the folder, and
    locations whose real path (symlinks resolved) is outside it.
    """
    info = external_info(tensor)
    loc = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not loc:
        raise AuditError(f"tensor {name!r}: external data without a location")
    # Windows-style absolute paths are refused too: the file may travel.
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise AuditError(f"tensor {name!r}: external data location {loc!r} is absolute; refusing to read outside the model's folder")
    parts = loc.replace("\\", "/").split("/")
    if ".." in parts:
        raise AuditError(f"tensor {name!r}: external data location {loc!r} contains '..'; refusing to read outside the model's folder")
    base = Path(base_dir).resolve()
    target = (base / loc)
    real = target.resolve()
    if real != base and base not in real.parents:
        raise AuditError(f"tensor {name!r}: external data location {loc!r} resolves to {real}, outside the model's folder {base}")
    if not real.is_file():
        raise AuditError(f"tensor {name!r}: external data file {loc!r} not found next to the model")
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise AuditError(f"tensor {name!r}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise AuditError(f"tensor {name!r}: negative external data offset/length")
    if check_size:
        size = real.stat().st_size
        need = offset + (length if length is not None else 0)
        if need > size:
            raise AuditError(f"tensor {name!r}: external data {loc!r} is {size} bytes, tensor needs bytes up to {need}")
    return real, offset, length


def external_files(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data locations the model refers to, in order of first use."""
    seen: dict[str, None] = {}
    for t, _ in iter_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            seen.setdefault(external_info(t).get("location", ""), None)
    return list(seen)


def tensor_shape(tensor: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the raw little-endian encoding, or None for packed sub-byte types."""
    n = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in _PACKED:
        return None
    return n * itemsize


# 4-bit (and 2-bit) types are packed in raw data; numpy_helper unpacks them.
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}
# Types numpy reads directly from raw bytes (everything else goes through numpy_helper).
_PLAIN = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def _read_exact(path: Path, offset: int, nbytes: int, name: str) -> np.ndarray:
    """Read nbytes at offset into a fresh uint8 buffer (no mmap kept open)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
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


def tensor_array(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The values of one tensor as numpy, in its stored dtype.

    External data is read with one seek and one read of exactly its bytes;
    the rest of the external file is never touched.
    """
    name = tensor.name or "<unnamed>"
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        try:
            return numpy_helper.to_array(tensor)
        except Exception as e:
            raise AuditError(f"tensor {name!r}: cannot decode ({type(e).__name__}: {e})") from None
    if base_dir is None:
        raise AuditError(f"tensor {name!r}: external data needs the model's folder")
    path, offset, length = resolve_external(tensor, base_dir)
    expected = _nbytes(tensor)
    if tensor.data_type in _PLAIN and expected is not None:
        if length is not None and length != expected:
            raise AuditError(f"tensor {name!r}: external data length {length} != {expected} bytes for shape {list(tensor.dims)}")
        raw = _read_exact(path, offset, expected, name)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        arr = raw.view(dtype).reshape(tensor_shape(tensor))
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)
    # Packed / exotic types: hand exactly the tensor's bytes to numpy_helper.
    if length is None:
        length = path.stat().st_size - offset
    raw = _read_exact(path, offset, length, name)
    t = onnx.TensorProto()
    t.CopyFrom(tensor)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw.tobytes()
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise AuditError(f"tensor {name!r}: cannot decode external data ({type(e).__name__}: {e})") from None
