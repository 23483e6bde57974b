"""Structure-aware fuzzing of every file the auditor reads (hypothesis): valid ONNX models, keys
(with their .npy sidecar), exporter manifests, release policies and robustness grids are mutated
field by field, not byte by byte, and fed to the code that reads them. The rule checked: a
command ends in exit 0 / 1, or in exit 2 with exactly one line on stderr that is not an
"internal error"; a reader raises nothing but a one-line AuditError.

    python fuzz/fuzz_struct.py [--target onnx|key|manifest|policy|grid|data|all] [--seconds 600]
                               [--examples 300] [--seed S] [--out build/fuzz]

* ONNX: the ModelProto is walked through its protobuf descriptors; a mutation picks one field
  anywhere in the model (graph, node, attribute, tensor, external-data entry, type, function)
  and sets it to a value of its own type chosen to break assumptions (0, -1, 2^31, 2^63 - 1,
  NaN, another tensor's name, "..", an empty string), truncates or extends a bytes field,
  clears, duplicates, deletes or appends repeated entries. Seeds: the hostile corpus's base
  model, per-channel QDQ (opset 21), MatMulNBits, external data, nested If, Constant weights,
  a local function. Targets: the reading path (open, WeightStore, torch views, every array),
  `inspect` and `extract`.
* Data files: an .npy / .npz of inputs for the base model and labels (.npz `y`, .npy, text), each
  of a drawn shape (0-d, extra or missing axes, empty), dtype (float16 to complex, strings, bool)
  and value (NaN, Inf, 1e300, 2^62, negative labels). Target: the data layer (`load_data`).
* JSON and TOML files: a mutation picks a node of the document and replaces it by a value of
  another type or an extreme one, deletes it, or wraps it in a list; keys are recommitted half
  of the time (so the commitment check does not hide everything else). The key's projection
  sidecar is mutated too (0-d, 1-d, 3-d, empty, booleans, complex, huge or non-finite values).
  Targets: `key verify` and `extract` (keys, manifests), the policy and grid readers.

A failing input is shrunk by hypothesis and written to ``--out`` as ``struct-<target>-<hash>``
(`.onnx`, `.key.json` + `.X.npy`, `.manifest.json`, `.policy.toml`, `.grid.toml`); copy it to
tests/hostile_regressions/ where every regression input is replayed by the default tests and
run by every command of the hostile corpus. `make test` runs a fixed, derandomized sample of
each target (tests/test_fuzz_struct.py); `make fuzz` runs them for longer with fresh seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from auditor.errors import AuditError  # noqa: E402
from fixtures import hostile  # noqa: E402

TARGETS = ("onnx", "key", "manifest", "policy", "grid", "data")


class Broken(AssertionError):
    """An input made the auditor break its rule (a crash, a traceback, several lines, internal error)."""


# ------------------------------------------------------------------ running a command in-process

def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """auditor.cli.main(argv) in `cwd`; (exit code, stderr). Any exception escaping is a Broken."""
    from auditor import cli

    err, out = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = cli.main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
            except BaseException as e:  # noqa: BLE001 - escaping the CLI at all is the bug looked for
                raise Broken(f"{' '.join(argv[:1])}: {type(e).__name__} escaped the command line: {e}") from e
    finally:
        os.chdir(old)
    return rc, err.getvalue()


def check_cli(argv: list[str], cwd: Path, ok: set[int]) -> int:
    rc, err = run_cli(argv, cwd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc not in ok | {2}:
        raise Broken(f"{argv[0]}: exit {rc}: {err[-300:]}")
    if rc == 2:
        if len(lines) != 1:
            raise Broken(f"{argv[0]}: exit 2 with {len(lines)} lines on stderr: {err[-500:]!r}")
        if "internal error" in lines[0] or "Traceback" in err:
            raise Broken(f"{argv[0]}: {lines[0][:400]}")
    elif lines and argv[0] in ("inspect", "extract", "key"):
        raise Broken(f"{argv[0]}: exit {rc} but stderr has {len(lines)} lines: {err[-300:]!r}")
    return rc


def check_reader(fn: Callable[[], Any], what: str) -> None:
    """A reader returns or raises a one-line AuditError; anything else is Broken."""
    try:
        fn()
    except AuditError as e:
        if "\n" in str(e):
            raise Broken(f"{what}: AuditError of more than one line: {e!r}") from None
    except Broken:
        raise
    except RecursionError as e:
        raise Broken(f"{what}: RecursionError: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise Broken(f"{what}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ ONNX: protobuf-aware mutations

_FD = onnx.ModelProto.DESCRIPTOR.fields[0].__class__
INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 10, 16, 21, 255, 256, 2 ** 31 - 1, -2 ** 31, 2 ** 32, 2 ** 40, 2 ** 62,
        2 ** 63 - 1, -2 ** 63]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-30, 3.4e38, 1e308, math.nan, math.inf, -math.inf]
STRINGS = ["", "x", ".", "..", "../x.bin", "/etc/passwd", "w.bin", "input", "logits", "conv.weight",
           "fc.weight", "com.microsoft", "ai.onnx", "location", "offset", "length", "0", "-1", "1e3",
           "0x10", "Constant", "DequantizeLinear", "If", "Loop", "Gemm", "Conv", "\u00fc", "a" * 300]


def model_seeds() -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """Valid models (bytes) and the files beside them."""
    w = hostile.base_weights()
    seeds = {"base": (hostile.base_model().SerializeToString(), {}),
             "qdq": (hostile._qdq_model().SerializeToString(), {}),
             "nbits": (hostile._nbits_model().SerializeToString(), {}),
             "external": (hostile._external_model("w.bin").SerializeToString(), {"w.bin": w["conv.weight"].tobytes()}),
             "if3": (hostile._if_nest(3), {})}
    nodes = [helper.make_node("Constant", [], ["conv.weight"], name="k",
                              value=numpy_helper.from_array(w["conv.weight"], "kv")),
             helper.make_node("Constant", [], ["unused"], name="k2",  # read by nothing: its fields are free to break
                              value=numpy_helper.from_array(w["fc.weight"], "k2v"))] + hostile.base_nodes()
    inits = [numpy_helper.from_array(v, k) for k, v in w.items() if k != "conv.weight"]
    seeds["constant"] = (hostile.make_model(nodes=nodes, inits=inits).SerializeToString(), {})
    body = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(1, np.float32), "one")),
            helper.make_node("Mul", ["x", "k"], ["y"])]
    fn = helper.make_function("local", "Scale", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    nodes = hostile.base_nodes()
    nodes[1] = helper.make_node("Scale", ["c"], ["r"], domain="local", name="relu")
    m = hostile.make_model(nodes=nodes, extra_opsets=[("local", 1)])
    m.functions.append(fn)
    seeds["function"] = (m.SerializeToString(), {})
    return seeds


def _repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 6; older versions have label only
    return bool(rep) if rep is not None else fd.label == _FD.LABEL_REPEATED


def _slots(msg, out: list) -> list:
    """Every mutable place in `msg`, depth first: (message, field descriptor, index or None)."""
    for fd in msg.DESCRIPTOR.fields:
        if _repeated(fd):
            seq = getattr(msg, fd.name)
            out.append((msg, fd, None))
            for i in range(len(seq)):
                if fd.type == _FD.TYPE_MESSAGE:
                    _slots(seq[i], out)
                else:
                    out.append((msg, fd, i))
        elif fd.type == _FD.TYPE_MESSAGE:
            if msg.HasField(fd.name):
                out.append((msg, fd, None))
                _slots(getattr(msg, fd.name), out)
            else:
                out.append((msg, fd, None))
        else:
            out.append((msg, fd, None))
    return out


def _names(model: onnx.ModelProto) -> list[str]:
    names = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        names.update(n.input)
        names.update(n.output)
    return sorted(x for x in names if isinstance(x, str))


def _scalar(draw, fd, names: list[str]):
    t = fd.type
    if t in (_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE):
        return draw(st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True, width=32)))
    if t == _FD.TYPE_BOOL:
        return draw(st.booleans())
    if t == _FD.TYPE_STRING:
        return draw(st.one_of(st.sampled_from(STRINGS), st.sampled_from(names or ["x"]), st.text(max_size=12)))
    if t == _FD.TYPE_BYTES:
        return draw(st.binary(max_size=64))
    if t == _FD.TYPE_ENUM:
        return draw(st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.sampled_from(INTS)))
    return draw(st.one_of(st.sampled_from(INTS), st.integers(-3, 40)))


# Fields a reader interprets (structure, types, counts, storage): three mutations in four land on one.
HOT = {"input", "output", "op_type", "domain", "attribute", "node", "initializer", "dims", "data_type", "raw_data",
       "data_location", "external_data", "float_data", "int32_data", "int64_data", "double_data", "key", "value",
       "type", "i", "f", "ints", "floats", "t", "tensors", "g", "version", "opset_import", "functions",
       "elem_type", "dim_value", "sparse_initializer", "values", "indices"}


@st.composite
def onnx_cases(draw, seeds: dict[str, tuple[bytes, dict[str, bytes]]]):
    name = draw(st.sampled_from(sorted(seeds)))
    data, files = seeds[name]
    model = onnx.ModelProto()
    model.ParseFromString(data)
    names = _names(model)
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(model, [])
        hot = [x for x in slots if x[1].name in HOT]
        pool = hot if hot and draw(st.integers(0, 3)) else slots
        msg, fd, idx = pool[draw(st.integers(0, len(pool) - 1))]
        try:
            _mutate(draw, msg, fd, idx, names)
        except (ValueError, TypeError, OverflowError, AttributeError):
            pass  # a value the field's type cannot hold: protobuf itself refuses it
    files = dict(files)
    if files and draw(st.booleans()):  # the external file itself: shortened, lengthened, emptied
        k = sorted(files)[0]
        cut = draw(st.integers(0, len(files[k]) + 8))
        files[k] = (files[k] + b"\0" * 8)[:cut]
    return name, model.SerializeToString(), files


def _mutate(draw, msg, fd, idx, names) -> None:
    if _repeated(fd):
        seq = getattr(msg, fd.name)
        if idx is not None:  # one scalar element
            seq[idx] = _scalar(draw, fd, names)
            return
        op = draw(st.sampled_from(["clear", "append", "drop", "dup"]))
        if op == "clear":
            del seq[:]
        elif op == "drop" and len(seq):
            del seq[draw(st.integers(0, len(seq) - 1))]
        elif op == "dup" and len(seq):
            item = seq[draw(st.integers(0, len(seq) - 1))]
            if fd.type == _FD.TYPE_MESSAGE:
                seq.add().CopyFrom(item)
            else:
                seq.append(item)
        elif fd.type == _FD.TYPE_MESSAGE:
            seq.add()
        else:
            seq.append(_scalar(draw, fd, names))
        return
    if fd.type == _FD.TYPE_MESSAGE:
        if msg.HasField(fd.name) and draw(st.booleans()):
            msg.ClearField(fd.name)
        else:
            getattr(msg, fd.name).SetInParent()
        return
    if fd.type == _FD.TYPE_BYTES and getattr(msg, fd.name):
        raw = getattr(msg, fd.name)
        op = draw(st.sampled_from(["cut", "grow", "flip", "empty"]))
        if op == "cut":
            setattr(msg, fd.name, raw[:draw(st.integers(0, len(raw)))])
        elif op == "grow":
            setattr(msg, fd.name, raw + bytes(draw(st.integers(1, 16))))
        elif op == "flip":
            b = bytearray(raw)
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
            setattr(msg, fd.name, bytes(b))
        else:
            setattr(msg, fd.name, b"")
        return
    if draw(st.integers(0, 5)) == 0:
        msg.ClearField(fd.name)
    else:
        setattr(msg, fd.name, _scalar(draw, fd, names))


def onnx_key_text() -> str:
    return json.dumps(hostile.key_doc())


def check_onnx(case, work: Path) -> None:
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

    _, data, files = case
    _fresh(work)
    (work / "model.onnx").write_bytes(data)
    (work / "key.json").write_text(onnx_key_text())
    for k, v in files.items():
        (work / k).write_bytes(v)

    def read_all():
        store = WeightStore.open(work / "model.onnx")
        for v in torch_views(store):
            v.array()
        for w in store.weights:
            store.array(w.name)
    check_reader(read_all, "read")
    check_cli(["inspect", "model.onnx", "--json"], work, {0})
    check_cli(["extract", "model.onnx", "--key", "key.json", "--json"], work, {0, 1})


# ------------------------------------------------------------------ JSON / TOML documents

def _leaf_values(toml: bool):
    base = [st.sampled_from(INTS), st.integers(-5, 100), st.sampled_from(FLOATS),
            st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
            st.sampled_from(STRINGS + ["prune:0.5", "prune:nan", "prune:1.0", "prune:-0.1", "quantize:dynamic",
                                       "quantize:static-qdq", "fp16", "X.npy", "../X.npy", "generator", "npy",
                                       "numpy.default_rng.standard_normal", "mean", "flatten", "0101", "2",
                                       "ort-cpu", "fashion-mnist", "synthetic", "data.txt", "x.npy"]),
            st.text(max_size=8)]
    if not toml:
        base.append(st.none())
    return st.one_of(*base)


_FIELD_NAMES = st.sampled_from(STRINGS[:12] + ["id", "steps", "data", "kind", "path"])


def _containers(inner):
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(_FIELD_NAMES, inner, max_size=3))


def _values(toml: bool):
    return st.recursive(_leaf_values(toml), _containers, max_leaves=6)


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated_doc(draw, doc: dict, toml: bool):
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)[1:]
        if not paths:
            break
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent, last = _get(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "wrap", "add"]))
        if op == "replace":
            parent[last] = draw(_values(toml))
        elif op == "delete":
            del parent[last]
        elif op == "wrap":
            parent[last] = [parent[last]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "seed", "scale", "samples", "transposed", "sha256"]))] = draw(_values(toml))
        else:
            parent.append(draw(_values(toml)))
    return doc


def toml_text(doc: dict) -> str:
    """A TOML document for a dict (inline tables and arrays: every TOML reader accepts them)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def _toml_key(k) -> str:
    return json.dumps(str(k))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'


# keys ------------------------------------------------------------

def key_seed() -> tuple[dict, bytes]:
    """A key whose mark's projection is an .npy sidecar (so both the JSON and the array are fuzzed)."""
    doc = hostile.key_doc()
    X = np.random.default_rng(7).standard_normal((32, 72))
    buf = io.BytesIO()
    np.save(buf, X)
    raw = buf.getvalue()
    doc["whitebox"][0]["projection"] = {"kind": "npy", "path": "X.npy", "sha256": hashlib.sha256(raw).hexdigest()}
    from auditor.marks.keys import commitment_of

    doc.pop("commitment")
    doc["commitment"] = commitment_of(doc)
    return doc, raw


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


SIDECARS = {"0d": lambda: np.array(3.0), "1d": lambda: np.ones(72), "3d": lambda: np.ones((32, 72, 1)),
            "empty": lambda: np.zeros((0, 72)), "bool": lambda: np.ones((32, 72), bool),
            "complex": lambda: np.ones((32, 72), complex), "huge": lambda: np.full((32, 72), 1e300),
            "nan": lambda: np.full((32, 72), np.nan), "int8": lambda: np.ones((32, 72), np.int8),
            "transposed": lambda: np.ones((72, 32)), "float16": lambda: np.ones((32, 72), np.float16),
            "tiny": lambda: np.full((32, 72), 5e-324), "strings": lambda: np.array([["a"] * 72] * 32)}


@st.composite
def key_cases(draw):
    doc, raw = key_seed()
    if draw(st.booleans()):
        doc = draw(mutated_doc(doc, toml=False))
    if draw(st.integers(0, 2)) == 0:
        raw = _npy(SIDECARS[draw(st.sampled_from(sorted(SIDECARS)))]())
        if isinstance(doc.get("whitebox"), list) and doc["whitebox"] and isinstance(doc["whitebox"][0], dict) \
                and isinstance(doc["whitebox"][0].get("projection"), dict):
            doc["whitebox"][0]["projection"]["sha256"] = hashlib.sha256(raw).hexdigest()
    if draw(st.booleans()) and isinstance(doc, dict):
        from auditor.marks.keys import commitment_of

        try:
            doc.pop("commitment", None)
            doc["commitment"] = commitment_of(doc)
        except Exception:  # noqa: BLE001 - a document commitment_of cannot hash stays as it is
            pass
    return json.dumps(doc, allow_nan=True), raw


def check_key(case, work: Path) -> None:
    text, raw = case
    _fresh(work)
    (work / "model.onnx").write_bytes(hostile.base_model().SerializeToString())
    (work / "key.json").write_text(text)
    (work / "X.npy").write_bytes(raw)
    check_cli(["key", "verify", "key.json"], work, {0})
    check_cli(["extract", "model.onnx", "--key", "key.json", "--json"], work, {0, 1})


# manifests ------------------------------------------------------

MANIFEST = {"format": "wmaudit-manifest/1", "onnx": "model.onnx",
            "params": {"conv.weight": {"onnx": "conv.weight", "transform": "identity", "onnx_shape": [8, 1, 3, 3]}}}


def manifest_cases():
    return mutated_doc(MANIFEST, toml=False).map(lambda d: json.dumps(d, allow_nan=True))


def check_manifest(case, work: Path) -> None:
    _fresh(work)
    (work / "model.onnx").write_bytes(hostile.base_model().SerializeToString())
    (work / "key.json").write_text(onnx_key_text())
    (work / "manifest.json").write_text(case)
    check_cli(["extract", "model.onnx", "--key", "key.json", "--manifest", "manifest.json", "--json"], work, {0, 1})


# policies and grids ---------------------------------------------

POLICY = {"format": "wmaudit-policy/1", "name": "fuzz", "backends": ["ort-cpu"], "seed": 0,
          "thresholds": {"max_p_value": 1e-6, "max_ber": 0.05, "min_margin": 0.0},
          "evidence": {"whitebox": "all-marks", "blackbox": "none", "accuracy": False},
          "data": {"source": "x.npy"}, "calibration": {"data": "x.npy", "samples": 16, "seed": 0},
          "accuracy": {"samples": 100, "seed": 0},
          "attacks": [{"id": "prune-50", "steps": "prune:0.5", "options": {"prune_seed": 0}},
                      {"id": "int8", "steps": "quantize:static-qdq-per-channel"}]}
GRID = {"grid": {"prune_rates": [0.0, 0.5], "quantize": ["none", "dynamic"], "prune_mode": "magnitude",
                 "calibration": "minmax", "prune_seed": 0},
        "config": [{"name": "fp16", "steps": "fp16"}]}


def policy_cases():
    return mutated_doc(POLICY, toml=True).map(toml_text)


def grid_cases():
    return mutated_doc(GRID, toml=True).map(toml_text)


def check_policy(case, work: Path) -> None:
    from auditor.gate.policy import load_policy

    _fresh(work)
    np.save(work / "x.npy", np.zeros((4, 1, 28, 28), np.float32))
    (work / "policy.toml").write_text(case)
    check_reader(lambda: load_policy(work / "policy.toml"), "policy")


def check_grid(case, work: Path) -> None:
    from auditor.gate.robustness import load_grid

    _fresh(work)
    (work / "grid.toml").write_text(case)
    check_reader(lambda: load_grid(work / "grid.toml"), "grid")


# data files ------------------------------------------------------

DTYPES = ["float32", "float64", "float16", "int64", "int8", "uint8", "bool", "complex64", "<U2", "int32", "uint64"]


@st.composite
def data_cases(draw):
    """An .npy or .npz of inputs for the base model ([N, 1, 28, 28] float32), and labels, each of a
    drawn shape, dtype and value (0-d, extra axes, empty, NaN, 1e300, strings, negative labels)."""
    shape = draw(st.one_of(st.just([4, 1, 28, 28]), st.just([4, 28, 28]),
                           st.lists(st.sampled_from([0, 1, 2, 3, 4, 28]), max_size=5)))
    dtype = draw(st.sampled_from(DTYPES))
    value = draw(st.sampled_from([0.0, 1.0, -1.0, 0.5, 255.0, 1e300, math.nan, math.inf, 2.0 ** 62]))
    with np.errstate(all="ignore"):
        try:
            x = np.full(shape, value).astype(dtype)
        except (ValueError, OverflowError):
            x = np.zeros(shape, dtype)
    labels = None
    form = draw(st.sampled_from(["none", "npz-y", "npy", "txt"]))
    if form != "none":
        n = draw(st.sampled_from([0, 1, 3, 4, 5]))
        lab = draw(st.sampled_from([0, 1, 9, -1, 2 ** 40, 2 ** 63 - 1]))
        ldtype = draw(st.sampled_from(["int64", "float64", "uint8", "bool", "int8"]))
        lshape = draw(st.sampled_from([[n], [], [n, 1]]))
        with np.errstate(all="ignore"):
            try:
                labels = (form, np.full(lshape, lab).astype(ldtype))
            except (ValueError, OverflowError):
                labels = (form, np.zeros(lshape, ldtype))
        if form == "txt":
            labels = (form, draw(st.sampled_from(["1\n2\n3\n4\n", "x\n", "-1\n0\n0\n0\n", "9" * 30 + "\n1\n1\n1\n",
                                                  "1 2 3 4", "\u00fc\n", "1.5\n2\n3\n4\n"])))
    return draw(st.sampled_from(["npy", "npz"])), x, labels


def check_data(case, work: Path) -> None:
    from auditor.data.inputs import load_data

    kind, x, labels = case
    _fresh(work)
    (work / "model.onnx").write_bytes(hostile.base_model().SerializeToString())
    arrays = {"input": x}
    label_path = None
    if labels is not None:
        form, lab = labels
        if form == "npz-y":
            arrays["y"] = lab
        elif form == "npy":
            np.save(work / "y.npy", lab)
            label_path = work / "y.npy"
        else:
            (work / "y.txt").write_text(lab)
            label_path = work / "y.txt"
    if kind == "npy":
        np.save(work / "x.npy", x)
        spec = work / "x.npy"
    else:
        np.savez(work / "x.npz", **arrays)
        spec = work / "x.npz"
    model = hostile.base_model()
    got = {}
    check_reader(lambda: got.setdefault("ds", load_data(str(spec), model, labels=label_path, batch_size=4)), "data")
    ds = got.get("ds")
    if ds is not None:  # what the layer accepts, a model can be fed: finite inputs, class indices as labels
        for k, a in ds.inputs.items():
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise Broken(f"data: input {k!r} accepted with non-finite values")
        if ds.labels is not None and ds.labels.size and ds.labels.min() < 0:
            raise Broken("data: negative labels accepted")


# ------------------------------------------------------------------ the runner

def _fresh(work: Path) -> None:
    for p in work.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (work / "out").mkdir()


def strategy(target: str, seeds: list[str] | None = None):
    if target == "onnx":
        return onnx_cases({k: v for k, v in model_seeds().items() if seeds is None or k in seeds})
    return {"key": key_cases, "manifest": manifest_cases, "policy": policy_cases, "grid": grid_cases,
            "data": data_cases}[target]()


CHECKS = {"onnx": check_onnx, "key": check_key, "manifest": check_manifest, "policy": check_policy,
          "grid": check_grid, "data": check_data}


def save_case(target: str, case, out: Path) -> list[Path]:
    """Write a failing input where a regression can be made of it (tests/hostile_regressions/ form)."""
    out.mkdir(parents=True, exist_ok=True)
    blob = repr(case).encode()
    tag = f"struct-{target}-{hashlib.sha256(blob).hexdigest()[:12]}"
    if target == "onnx":
        _, data, files = case
        paths = [out / f"{tag}.onnx"]
        paths[0].write_bytes(data)
        if files:
            for k, v in files.items():
                (out / f"{tag}.{k}").write_bytes(v)
                paths.append(out / f"{tag}.{k}")
        return paths
    if target == "key":
        (out / f"{tag}.key.json").write_text(case[0])
        (out / f"{tag}.X.npy").write_bytes(case[1])
        return [out / f"{tag}.key.json", out / f"{tag}.X.npy"]
    if target == "data":
        kind, x, labels = case
        np.save(out / f"{tag}.data.npy", x)
        paths = [out / f"{tag}.data.npy"]
        if labels is not None:
            form, lab = labels
            p = out / (f"{tag}.labels.txt" if form == "txt" else f"{tag}.labels.npy")
            p.write_text(lab) if form == "txt" else np.save(p, lab)
            paths.append(p)
        return paths
    suffix = {"manifest": ".manifest.json", "policy": ".policy.toml", "grid": ".grid.toml"}[target]
    (out / f"{tag}{suffix}").write_text(case)
    return [out / f"{tag}{suffix}"]


def run(target: str, examples: int, *, seed: int | None = None, out: Path | None = None,
        seeds: list[str] | None = None) -> None:
    """Run `examples` generated inputs of one target (derandomized unless a seed is given; ONNX
    models from `seeds` only, when given); raises Broken with the saved path(s) of the shrunk
    failing input."""
    work = Path(tempfile.mkdtemp(prefix=f"wmaudit-fuzz-{target}-"))
    last: dict[str, Any] = {}
    check = CHECKS[target]

    @settings(max_examples=examples, derandomize=seed is None, database=None, deadline=None, print_blob=False,
              report_multiple_bugs=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(strategy(target, seeds))
    def prop(case):
        try:
            check(case, work)
        except Broken:
            last["case"] = case
            raise

    if seed is not None:
        prop = hyp_seed(seed)(prop)
    try:
        prop()
    except Broken as e:
        saved = save_case(target, last["case"], out or ROOT / "build" / "fuzz") if "case" in last else []
        raise Broken(f"{e} -> input saved as {', '.join(str(p) for p in saved)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ regression replay

def regression_files(folder: Path) -> list[tuple[str, Path]]:
    """(target, file) for every kept regression input of a structured kind."""
    out = []
    for p in sorted(folder.iterdir()):
        for suffix, target in ((".key.json", "key"), (".manifest.json", "manifest"), (".policy.toml", "policy"),
                               (".grid.toml", "grid"), (".data.npy", "data")):
            if p.name.endswith(suffix):
                out.append((target, p))
    return out


def replay(target: str, path: Path) -> None:
    """Run one kept regression input through its target's check (Broken if it breaks the rule again)."""
    work = Path(tempfile.mkdtemp(prefix="wmaudit-replay-"))
    try:
        if target == "key":
            side = path.with_name(path.name[: -len(".key.json")] + ".X.npy")
            check_key((path.read_text(), side.read_bytes() if side.exists() else b""), work)
        elif target == "onnx":
            stem = path.name[: -len(".onnx")]
            files = {q.name[len(stem) + 1:]: q.read_bytes() for q in path.parent.glob(f"{stem}.*") if q != path}
            check_onnx(("replay", path.read_bytes(), files), work)
        elif target == "data":
            stem = path.name[: -len(".data.npy")]
            labels = None
            for name, form in ((f"{stem}.labels.npy", "npy"), (f"{stem}.labels.txt", "txt")):
                if (path.parent / name).exists():
                    q = path.parent / name
                    labels = (form, q.read_text() if form == "txt" else np.load(q, allow_pickle=False))
            check_data(("npy", np.load(path, allow_pickle=False), labels), work)
        else:
            CHECKS[target](path.read_text(), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=TARGETS + ("all",), default="all")
    ap.add_argument("--seconds", type=float, default=600.0, help="time for all targets together")
    ap.add_argument("--examples", type=int, default=300, help="inputs per round (a round: one target, one seed)")
    ap.add_argument("--seed", type=int, help="first seed (default: from the clock, printed)")
    ap.add_argument("--out", default=str(ROOT / "build" / "fuzz"))
    a = ap.parse_args(argv)
    targets = TARGETS if a.target == "all" else (a.target,)
    seed = a.seed if a.seed is not None else int(time.time()) % 1_000_000
    print(f"fuzz_struct: targets {', '.join(targets)}, {a.examples} inputs a round, first seed {seed}", flush=True)
    end = time.monotonic() + a.seconds
    rounds = failures = 0
    while time.monotonic() < end:
        for t in targets:
            if time.monotonic() >= end:
                break
            try:
                run(t, a.examples, seed=seed, out=Path(a.out))
                print(f"  {t} seed {seed}: {a.examples} inputs, no rule broken", flush=True)
            except Broken as e:
                failures += 1
                print(f"  {t} seed {seed}: BROKEN {str(e)[:600]}", flush=True)
            rounds += 1
        seed += 1
    print(f"fuzz_struct: {rounds} rounds, {failures} broken", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
