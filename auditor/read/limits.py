"""Limits on what a model file may ask of the auditor, checked before work is done.

Every ONNX file is treated as written by a stranger. Before the protobuf is
parsed, the file itself is checked (a regular file, not a FIFO, device or
folder, and no larger than ``max_model_bytes``). After parsing, and before
any tensor is read or any graph is walked by other code, ``check_model``
validates the structure in one linear pass:

* a graph and an opset are present; subgraphs nest at most ``max_depth``
  levels below the main graph; at most ``max_nodes`` nodes and ``max_tensors`` stored tensors in all;
* every tensor has a known element type, no negative dims, a declared size
  that does not overflow and stays below ``max_tensor_bytes``, and exactly the
  bytes that back it (raw data, typed data fields, or external data);
* no name is defined twice in one graph, every node input is defined before
  it is used (so a dangling input or a cycle is refused) and every graph
  output is defined.

External data follows onnx's rules (``onnx.external_data_helper``, shaped by
CVE-2022-25882, CVE-2024-27318 and later symlink / length CVEs): the location
is relative, never climbs out of the model's folder, no path component is a
symbolic link, the file is a regular file with one hard link, opened with
O_NOFOLLOW, and offset + length lie inside it.

Defaults can be changed with environment variables ``WMAUDIT_MAX_MODEL_BYTES``,
``WMAUDIT_MAX_TENSOR_BYTES``, ``WMAUDIT_MAX_NODES``, ``WMAUDIT_MAX_DEPTH``,
``WMAUDIT_MAX_FOLDED_BYTES`` (one tensor computed by constant folding).
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx

from auditor.errors import AuditError

__all__ = ["Limits", "limits", "read_model_bytes", "check_model", "open_external", "check_external",
           "element_count", "element_size", "SUPPORTED_TYPES", "type_name"]

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = 2 * GiB       # the protobuf format's own ceiling
    max_tensor_bytes: int = 16 * GiB     # one tensor, declared size (external data included)
    max_nodes: int = 1_000_000           # nodes in all graphs together
    max_tensors: int = 1_000_000         # stored tensors in all graphs together
    max_depth: int = 32                  # subgraph nesting (If / Loop / Scan bodies)
    max_folded_bytes: int = 1 * GiB      # one tensor computed by constant folding (at 8 bytes a value)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        raise AuditError(f"{name}={v!r} is not an integer") from None
    if n < 1:
        raise AuditError(f"{name} must be >= 1, got {n}")
    return n


def limits() -> Limits:
    """The limits in force (defaults, or the environment's)."""
    d = Limits()
    return Limits(max_model_bytes=_env_int("WMAUDIT_MAX_MODEL_BYTES", d.max_model_bytes),
                  max_tensor_bytes=_env_int("WMAUDIT_MAX_TENSOR_BYTES", d.max_tensor_bytes),
                  max_nodes=_env_int("WMAUDIT_MAX_NODES", d.max_nodes),
                  max_tensors=_env_int("WMAUDIT_MAX_NODES", d.max_tensors),
                  max_depth=_env_int("WMAUDIT_MAX_DEPTH", d.max_depth),
                  max_folded_bytes=_env_int("WMAUDIT_MAX_FOLDED_BYTES", d.max_folded_bytes))


# ---------------------------------------------------------------------------- files

def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_model_bytes(path: str | os.PathLike, lim: Limits | None = None, expected: str = "an .onnx file",
                     limit_name: str = "WMAUDIT_MAX_MODEL_BYTES") -> bytes:
    """The bytes of a model file (or of any file named by `expected`: a key, a policy): a regular
    file no larger than the limit.

    The file is opened non-blocking (a FIFO cannot stall the audit) and checked
    with fstat on the open descriptor, so what is checked is what is read.
    """
    lim = lim or limits()
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuditError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise AuditError(f"{p}: is a directory, expected {expected}") from None
    except OSError as e:
        raise AuditError(f"{p}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise AuditError(f"{p}: is a directory, expected {expected}")
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"{p}: is {_kind(st.st_mode)}, expected {expected}")
        if st.st_size > lim.max_model_bytes:
            raise AuditError(f"{p}: {st.st_size} bytes, over the limit of {lim.max_model_bytes} "
                             f"({limit_name})")
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 64 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _safe_location(loc: str, name: str) -> list[str]:
    """The components of a relative external-data location, refused when it could leave the folder."""
    if not loc:
        raise AuditError(f"tensor {name!r}: external data without a location")
    if "\x00" in loc:
        raise AuditError(f"tensor {name!r}: external data location contains a NUL byte")
    # Windows-style absolute paths are refused too: the file may travel.
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise AuditError(f"tensor {name!r}: external data location {loc!r} is absolute; "
                         f"refusing to read outside the model's folder")
    parts = [c for c in loc.replace("\\", "/").split("/") if c not in ("", ".")]
    if ".." in parts:
        raise AuditError(f"tensor {name!r}: external data location {loc!r} contains '..'; "
                         f"refusing to read outside the model's folder")
    if not parts:
        raise AuditError(f"tensor {name!r}: external data location {loc!r} names no file")
    return parts


def open_external(base_dir: str | os.PathLike, loc: str, name: str) -> BinaryIO:
    """Open an external-data file for reading under onnx's rules; the caller closes it.

    Every component is opened relative to the folder before it with O_NOFOLLOW,
    so no symlink is ever followed (a symlink is refused, even one pointing
    inside the folder: where it points can change between the check and the read).
    The file must be regular with a single hard link.
    """
    parts = _safe_location(loc, name)
    base = Path(base_dir)
    flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise AuditError(f"tensor {name!r}: cannot open the model's folder ({e.strerror})") from None
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, flags_dir, dir_fd=dfd)
            except OSError as e:
                raise AuditError(_why_refused(name, loc, e)) from None
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise AuditError(_why_refused(name, loc, e)) from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"tensor {name!r}: external data {loc!r} is {_kind(st.st_mode)}; only regular files are read")
        if st.st_nlink > 1:
            raise AuditError(f"tensor {name!r}: external data {loc!r} has {st.st_nlink} hard links; "
                             f"refusing a file that may be shared with another folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _why_refused(name: str, loc: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return (f"tensor {name!r}: external data location {loc!r} goes through a symbolic link; "
                f"refusing to follow links out of (or within) the model's folder")
    if e.errno == errno.ENOENT:
        return f"tensor {name!r}: external data file {loc!r} not found next to the model"
    if e.errno == errno.ENOTDIR:
        return (f"tensor {name!r}: external data location {loc!r} goes through something that is not a "
                f"folder (a symbolic link?); refusing it")
    return f"tensor {name!r}: cannot open external data {loc!r} ({e.strerror or type(e).__name__})"


# ---------------------------------------------------------------------------- tensors

_T = onnx.TensorProto
# Element size in bytes (None: sub-byte, packed two or four per byte; 0: variable, strings).
_SIZES: dict[int, int | None] = {
    _T.FLOAT: 4, _T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.INT32: 4, _T.INT64: 8,
    _T.STRING: 0, _T.BOOL: 1, _T.FLOAT16: 2, _T.DOUBLE: 8, _T.UINT32: 4, _T.UINT64: 8,
    _T.COMPLEX64: 8, _T.COMPLEX128: 16, _T.BFLOAT16: 2,
}
for _n, _s in (("FLOAT8E4M3FN", 1), ("FLOAT8E4M3FNUZ", 1), ("FLOAT8E5M2", 1), ("FLOAT8E5M2FNUZ", 1),
               ("FLOAT8E8M0", 1), ("UINT4", None), ("INT4", None), ("FLOAT4E2M1", None),
               ("UINT2", None), ("INT2", None)):
    if hasattr(_T, _n):
        _SIZES[getattr(_T, _n)] = _s
_BITS = {getattr(_T, n): b for n, b in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2))
         if hasattr(_T, n)}
SUPPORTED_TYPES = frozenset(_SIZES)

# Which typed field holds the values of each element type when raw_data is not used.
_FIELD = {_T.FLOAT: "float_data", _T.DOUBLE: "double_data", _T.INT64: "int64_data", _T.UINT32: "uint64_data",
          _T.UINT64: "uint64_data", _T.STRING: "string_data", _T.COMPLEX64: "float_data",
          _T.COMPLEX128: "double_data"}


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def type_name(data_type: int) -> str:
    try:
        return _T.DataType.Name(data_type).lower()
    except ValueError:
        return f"unknown type {data_type}"


def element_count(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def element_size(data_type: int) -> int | None:
    return _SIZES.get(data_type)


def nbytes(data_type: int, count: int) -> int | None:
    """Bytes of `count` elements in raw little-endian form (None for strings)."""
    size = _SIZES[data_type]
    if size == 0:
        return None
    if size is None:
        return (count * _BITS[data_type] + 7) // 8
    return count * size


def _check_tensor(t: onnx.TensorProto, where: str, lim: Limits) -> None:
    name = t.name or where
    if t.data_type == _T.UNDEFINED:
        raise AuditError(f"tensor {name!r}: no element type")
    if t.data_type not in _SIZES:
        raise AuditError(f"tensor {name!r}: unknown element type {t.data_type}")
    for d in t.dims:
        if d < 0:
            raise AuditError(f"tensor {name!r}: negative dimension {d} in {list(t.dims)}")
    count = element_count(t.dims)
    size = nbytes(t.data_type, count)
    if size is not None and size > lim.max_tensor_bytes:
        raise AuditError(f"tensor {name!r}: shape {list(t.dims)} declares {size} bytes, over the limit of "
                         f"{lim.max_tensor_bytes} (WMAUDIT_MAX_TENSOR_BYTES)")
    present = [f for f in _TYPED_FIELDS if len(getattr(t, f))]
    if t.data_location == _T.EXTERNAL:
        if t.HasField("raw_data") or present:
            raise AuditError(f"tensor {name!r}: is stored as external data and also holds "
                             f"{', '.join((['raw_data'] if t.HasField('raw_data') else []) + present)}; the ONNX "
                             f"spec allows one storage per tensor")
        return  # checked against the file in check_external
    if t.external_data:
        raise AuditError(f"tensor {name!r}: has external_data entries but is not marked as external")
    if t.HasField("raw_data") and present:
        raise AuditError(f"tensor {name!r}: holds both raw_data and {', '.join(present)}; the ONNX spec allows "
                         f"one storage per tensor (raw_data or the typed field of its element type)")
    wrong = [f for f in present if f != _FIELD.get(t.data_type, "int32_data")]
    if wrong:
        raise AuditError(f"tensor {name!r}: {type_name(t.data_type)} values stored in {', '.join(wrong)}; the "
                         f"ONNX spec keeps them in {'raw_data or ' if t.data_type != _T.STRING else ''}"
                         f"{_FIELD.get(t.data_type, 'int32_data')}")
    if t.data_type == _T.STRING:
        if len(t.string_data) != count:
            raise AuditError(f"tensor {name!r}: {len(t.string_data)} strings for shape {list(t.dims)}")
        return
    if t.HasField("raw_data"):
        if len(t.raw_data) != size:
            raise AuditError(f"tensor {name!r}: {len(t.raw_data)} bytes of raw data, its shape "
                             f"{list(t.dims)} ({type_name(t.data_type)}) needs {size}")
        return
    field = _FIELD.get(t.data_type, "int32_data")
    have = len(getattr(t, field))
    # complex values are stored as (real, imaginary) pairs; sub-byte values packed per int32 entry
    want = count * 2 if t.data_type in (_T.COMPLEX64, _T.COMPLEX128) else (
        (count * _BITS[t.data_type] + 7) // 8 if t.data_type in _BITS else count)
    if have != want:
        raise AuditError(f"tensor {name!r}: {have} values in {field}, its shape {list(t.dims)} "
                         f"({type_name(t.data_type)}) needs {want}")


def external_ranges(t: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor, the numbers checked."""
    name = t.name or "<unnamed>"
    info: dict[str, str] = {}
    for e in t.external_data:
        _texts(f"tensor {name!r}: external data entry", e.key, e.value)
        if e.key in info:
            raise AuditError(f"tensor {name!r}: external data key {e.key!r} given twice")
        info[e.key] = e.value
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise AuditError(f"tensor {name!r}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise AuditError(f"tensor {name!r}: negative external data offset/length")
    return info.get("location", ""), offset, length


def check_external(t: onnx.TensorProto, base_dir: str | os.PathLike, lim: Limits | None = None) -> tuple[int, int]:
    """Check an external tensor against its file; (offset, length of its bytes) on success."""
    lim = lim or limits()
    name = t.name or "<unnamed>"
    loc, offset, length = external_ranges(t)
    with open_external(base_dir, loc, name) as f:
        fsize = os.fstat(f.fileno()).st_size
    expected = None if t.data_type == _T.STRING else nbytes(t.data_type, element_count(t.dims))
    if t.data_type == _T.STRING:
        raise AuditError(f"tensor {name!r}: string tensors cannot be stored as external data")
    if length is not None and length != expected:
        raise AuditError(f"tensor {name!r}: external data length {length} != {expected} bytes "
                         f"for shape {list(t.dims)} ({type_name(t.data_type)})")
    need = expected
    if offset + need > fsize:
        raise AuditError(f"tensor {name!r}: external data {loc!r} is {fsize} bytes, tensor needs bytes "
                         f"{offset}..{offset + need}")
    return offset, need


# ---------------------------------------------------------------------------- structure

def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _texts(where: str, *values) -> None:
    """Protobuf hands back bytes for a string field that is not UTF-8: refuse the model there."""
    for v in values:
        if not isinstance(v, str):
            raise AuditError(f"{where}: a name or string field is not valid UTF-8 text ({bytes(v)[:40]!r})")


# ---------------------------------------------------------------------------- nodes against the spec

_A = onnx.AttributeProto
# The one value field each attribute type may carry (AttributeProto keeps every field).
_ATTR_FIELD = {_A.FLOAT: "f", _A.INT: "i", _A.STRING: "s", _A.TENSOR: "t", _A.GRAPH: "g",
               _A.SPARSE_TENSOR: "sparse_tensor", _A.TYPE_PROTO: "tp", _A.FLOATS: "floats", _A.INTS: "ints",
               _A.STRINGS: "strings", _A.TENSORS: "tensors", _A.GRAPHS: "graphs",
               _A.SPARSE_TENSORS: "sparse_tensors", _A.TYPE_PROTOS: "type_protos"}
_SINGULAR = ("f", "i", "s", "t", "g", "sparse_tensor", "tp")
_SCHEMAS: dict[tuple[str, str, int], object] = {}  # (op, domain, opset) -> _Spec | None


@dataclass(frozen=True)
class _Spec:
    """What check_model needs of one operator's schema (built once per operator and opset)."""
    min_in: int
    max_in: int
    min_out: int
    max_out: int
    attrs: dict            # attribute name -> AttributeProto type
    formal: tuple          # (name, type_str, variadic, homogeneous) per formal input
    allowed: dict          # type parameter -> allowed "tensor(...)" strings


def _schema(op: str, domain: str, version: int) -> "_Spec | None":
    """onnx's schema of an operator at the model's opset (None: not an operator onnx defines)."""
    key = (op, domain, version)
    if key not in _SCHEMAS:
        try:
            sch = onnx.defs.get_schema(op, version, domain)
        except Exception:  # not an onnx operator, or defined only in later opsets than the model imports
            sch = None
        if sch is not None:
            variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
            sch = _Spec(sch.min_input, sch.max_input, sch.min_output, sch.max_output,
                        {k: a.type for k, a in sch.attributes.items()},
                        tuple((f.name, f.type_str, f.option == variadic, f.is_homogeneous) for f in sch.inputs),
                        {c.type_param_str: frozenset(c.allowed_type_strs) for c in sch.type_constraints})
        _SCHEMAS[key] = sch
    return _SCHEMAS[key]


def _tensor_type(data_type: int) -> str:
    return f"tensor({_T.DataType.Name(data_type).lower()})" if data_type in _SIZES else f"type {data_type}"


def _check_attribute(a: onnx.AttributeProto, where: str, label: str) -> None:
    """An attribute carries the value of its declared type and nothing else."""
    if a.ref_attr_name:
        return  # a function body's reference to its caller's attribute
    own = _ATTR_FIELD.get(a.type)
    if own is None:
        raise AuditError(f"{where}: node {label!r}: attribute {a.name!r} has no known type ({a.type})")
    others = [f for f in _ATTR_FIELD.values() if f != own and (a.HasField(f) if f in _SINGULAR else len(getattr(a, f)))]
    if others:
        raise AuditError(f"{where}: node {label!r}: attribute {a.name!r} is {_A.AttributeType.Name(a.type)} but also "
                         f"carries {', '.join(others)}; an attribute holds one value")


def _check_node(n: onnx.NodeProto, opsets: dict[str, int], dtypes: dict[str, int], where: str, label: str) -> None:
    """Input / output counts, attribute types and the element types of stored inputs against onnx's
    schema of the operator at the model's opset (operators onnx does not define are left to the runtime)."""
    domain = "" if n.domain in ("", "ai.onnx") else n.domain
    version = opsets.get(domain)
    if version is None:
        return
    sch = _schema(n.op_type, domain, version)
    if sch is None:
        return
    n_in, n_out = len(n.input), len(n.output)
    if not sch.min_in <= n_in <= sch.max_in:
        raise AuditError(f"{where}: node {label!r} ({n.op_type}, opset {version}) has {n_in} inputs; the ONNX spec "
                         f"allows {_range(sch.min_in, sch.max_in)}")
    if not sch.min_out <= n_out <= sch.max_out:
        raise AuditError(f"{where}: node {label!r} ({n.op_type}, opset {version}) has {n_out} outputs; the ONNX "
                         f"spec allows {_range(sch.min_out, sch.max_out)}")
    what = f"{where}: node {label!r} ({n.op_type}, opset {version})"
    for a in n.attribute:
        want = sch.attrs.get(a.name)
        if want is not None and not a.ref_attr_name and a.type != want:
            raise AuditError(f"{what}: attribute {a.name!r} is {_A.AttributeType.Name(a.type)}; the ONNX spec "
                             f"says {_A.AttributeType.Name(want)}")
    if not sch.formal or not dtypes:
        return
    bound: dict[str, tuple] = {}
    for i, x in enumerate(n.input):
        if not x or x not in dtypes:
            continue
        name, type_str, variadic, homogeneous = sch.formal[min(i, len(sch.formal) - 1)]
        if i >= len(sch.formal) and not variadic:
            continue
        have = _tensor_type(dtypes[x])
        allowed = sch.allowed.get(type_str, frozenset((type_str,)))
        if have not in allowed:
            ok = ", ".join(sorted(t[7:-1] if t.startswith("tensor(") else t for t in allowed))
            raise AuditError(f"{what}: input {i} ({name}) {x!r} is {have[7:-1] if have.startswith('tensor(') else have}; "
                             f"the ONNX spec allows {ok} there")
        if type_str in sch.allowed and homogeneous:
            first = bound.setdefault(type_str, (i, have, name, x))
            if first[1] != have:
                raise AuditError(f"{what}: input {i} ({name}) {x!r} is {have[7:-1]} but input {first[0]} "
                                 f"({first[2]}) {first[3]!r} is {first[1][7:-1]}; the ONNX spec gives them one "
                                 f"element type ({type_str})")


def _range(lo: int, hi: int) -> str:
    if lo == hi:
        return str(lo)
    return f"at least {lo}" if hi >= 2 ** 31 - 1 else f"{lo} to {hi}"


def check_model(model: onnx.ModelProto, base_dir: str | os.PathLike | None, where: str = "model",
                lim: Limits | None = None) -> None:
    """Validate structure, tensors and external data in one linear pass; AuditError on the first problem."""
    lim = lim or limits()
    if not model.HasField("graph"):
        raise AuditError(f"{where}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise AuditError(f"{where}: no opset_import (which operator set the graph uses is unknown)")
    _texts(where, model.producer_name, model.producer_version, model.domain, model.graph.name)
    seen_domains = set()
    opsets: dict[str, int] = {}
    for o in model.opset_import:
        _texts(where, o.domain)
        d = o.domain or "ai.onnx"
        if d in seen_domains:
            raise AuditError(f"{where}: opset for domain {d!r} imported twice")
        seen_domains.add(d)
        if o.version < 1:
            raise AuditError(f"{where}: opset version {o.version} for domain {d!r}")
        opsets["" if d == "ai.onnx" else d] = int(o.version)
    nodes = tensors = 0
    # Iterative walk: (graph, the name sets of its enclosing scopes, depth). A subgraph sees its
    # enclosing graphs' sets by reference (no copies: linear time however many subgraphs there are).
    # depth: how many subgraph levels lie between a graph and the main graph (the main graph is 0)
    stack: list[tuple[onnx.GraphProto, tuple[set, ...], int, str]] = [(model.graph, (), 0, "main graph")]
    while stack:
        g, outer, depth, gname = stack.pop()
        if depth > lim.max_depth:
            raise AuditError(f"{where}: subgraphs nested more than {lim.max_depth} deep (WMAUDIT_MAX_DEPTH)")
        defined: set[str] = set()
        for vi in list(g.input) + list(g.output):
            _texts(where, vi.name)
        for vi in g.input:
            if vi.name in defined:
                raise AuditError(f"{where}: {gname}: input {vi.name!r} declared twice")
            defined.add(vi.name)
        init_names: set[str] = set()
        for t in g.initializer:
            tensors += 1
            _texts(where, t.name)
            if not t.name:
                raise AuditError(f"{where}: {gname}: an initializer has no name")
            if t.name in init_names:
                raise AuditError(f"{where}: {gname}: initializer {t.name!r} defined twice")
            init_names.add(t.name)
            _check_tensor(t, "initializer", lim)
        defined |= init_names
        dtypes = {t.name: t.data_type for t in g.initializer}
        for st in g.sparse_initializer:
            tensors += 2
            _check_tensor(st.values, "sparse initializer values", lim)
            _check_tensor(st.indices, "sparse initializer indices", lim)
            if st.values.name:
                defined.add(st.values.name)
        produced_later = {o for n in g.node for o in n.output if o}
        for n in g.node:
            nodes += 1
            if nodes > lim.max_nodes:
                raise AuditError(f"{where}: more than {lim.max_nodes} nodes (WMAUDIT_MAX_NODES)")
            _texts(where, n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute))
            label = n.name or n.op_type or "<unnamed node>"
            for x in n.input:
                if x and x not in defined and not any(x in s for s in outer):
                    if x in produced_later:
                        raise AuditError(f"{where}: {gname}: node {label!r} reads {x!r} before it is computed "
                                         f"(a cycle, or nodes not in topological order)")
                    raise AuditError(f"{where}: {gname}: node {label!r} reads {x!r}, which nothing defines")
            for a in n.attribute:
                _check_attribute(a, f"{where}: {gname}", label)
                for t in _attribute_tensors(a):
                    tensors += 1
                    _check_tensor(t, f"attribute {a.name} of {label}", lim)
            _check_node(n, opsets, dtypes, f"{where}: {gname}", label)
            if tensors > lim.max_tensors:
                raise AuditError(f"{where}: more than {lim.max_tensors} stored tensors")
            subs = list(_subgraphs(n))
            for sg in subs:
                stack.append((sg, outer + (defined,), depth + 1, f"subgraph of {label!r}"))
            for o in n.output:
                if not o:
                    continue
                if o in defined:
                    raise AuditError(f"{where}: {gname}: {o!r} is defined twice (node {label!r})")
                defined.add(o)
        for vo in g.output:
            if vo.name not in defined and not any(vo.name in s for s in outer):
                raise AuditError(f"{where}: {gname}: output {vo.name!r} is not computed by the graph")
    for fn in model.functions:
        _texts(where, fn.name, fn.domain)
        fname = f"function {fn.domain}:{fn.name}"
        for n in fn.node:
            nodes += 1
            if nodes > lim.max_nodes:
                raise AuditError(f"{where}: more than {lim.max_nodes} nodes (WMAUDIT_MAX_NODES)")
            _texts(where, n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute))
            label = n.name or n.op_type or "<unnamed node>"
            for a in n.attribute:
                _check_attribute(a, f"{where}: {fname}", label)
                for t in _attribute_tensors(a):
                    tensors += 1
                    _check_tensor(t, f"attribute {a.name} of {label} in {fname}", lim)
            if tensors > lim.max_tensors:
                raise AuditError(f"{where}: more than {lim.max_tensors} stored tensors")
    if base_dir is not None:
        for g in _all_graphs(model.graph):
            for t in _stored(g):
                if t.data_location == _T.EXTERNAL:
                    check_external(t, base_dir, lim)
        for fn in model.functions:  # onnx's external-data loader reads function bodies' tensors too
            for g in _all_graphs(fn):
                for t in _stored(g, initializers=g is not fn):
                    if t.data_location == _T.EXTERNAL:
                        check_external(t, base_dir, lim)


def _attribute_tensors(a: onnx.AttributeProto) -> list[onnx.TensorProto]:
    """The tensors a TENSOR or TENSORS attribute stores (none for other kinds)."""
    return [a.t] if a.type == _A.TENSOR else list(a.tensors) if a.type == _A.TENSORS else []


def _all_graphs(graph: onnx.GraphProto):
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            stack.extend(_subgraphs(n))


def _stored(g: onnx.GraphProto, initializers: bool = True):
    if initializers:
        yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
