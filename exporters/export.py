"""torch -> ONNX with every marked tensor recoverable, validated, with key and manifest.

Two exporters (torch 2.13):

* ``dynamo`` (default): ``torch.onnx.export(dynamo=True, optimize=False)``.
  The default ``optimize=True`` folds BatchNorm into the conv weights and keeps
  the name ``conv.weight``, so the mark would be hidden behind a per-channel
  scale. Unoptimised, parameters are initializers under their torch names
  (conv, linear, LSTM/GRU/RNN ``weight_ih_l0`` / ``weight_hh_l0``; recurrent
  W/R are built at run time by Slice/Concat/Mul). ``optimize="keep-batchnorm"``
  runs onnxscript's constant folding and default rewrite rules minus the
  BatchNorm fusions; it is meant for CNNs: on recurrent models constant folding
  replaces the named weights by folded W/R and fixes the sequence length, and
  duplicate-initializer removal may merge equal tensors, so it is not the
  default. The Elman ``nn.RNN`` is unrolled by dynamo into MatMul + Tanh with
  the example's sequence length (the time axis stays static even when asked to
  be dynamic); the manifest records that under ``static_axes``.
* ``legacy``: ``torch.onnx.export(dynamo=False, training=TrainingMode.PRESERVE)``
  on the model in eval mode keeps BatchNormalization nodes and ONNX
  LSTM/GRU/RNN nodes with dynamic sequence length; recurrent weights become
  anonymous initializers with reordered gates, found by value.

The file is written self-contained (no ``model.onnx.data``) unless the
parameters exceed 2 GB or ``external_data=True``. After writing, outputs are
compared with torch on real inputs through onnxruntime (fails beyond atol)
and every marked parameter is located in the file and checked bit-identical.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from auditor.marks import keys

MANIFEST_FORMAT = "wmaudit-manifest/1"
TWO_GB = 2 * 1024 ** 3
# Gate blocks of an ONNX recurrent weight, in torch order (see auditor/layout.py):
# LSTM ONNX i,o,f,c -> torch i,f,g,o ; GRU ONNX z,r,h -> torch r,z,n.
GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}


class ExportError(RuntimeError):
    """Export produced a file that does not meet its promises (outputs, marked tensors)."""


@dataclass
class ExportResult:
    onnx_path: Path
    manifest: dict[str, Any]
    key: dict[str, Any] | None


# ------------------------------------------------------------------ export
def _keep_batchnorm_optimize(ir_model) -> None:
    """onnxscript's optimize_ir pass list with the BatchNorm fusion rules removed (in place)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in _fuse_batchnorm.rules]
    passes = [
        common.InlinePass(),
        ir.passes.PassManager([
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        ], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ]
    ir.passes.Sequential(*passes)(ir_model)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                exporter: str = "dynamo", dynamic_axes: dict[int, str] | None = None,
                optimize: str = "none", opset: int | None = None,
                external_data: bool | None = None) -> dict[str, Any]:
    """Write ``model`` (eval mode, one input ``input``, one output ``output``) to ``path``.

    Returns the exporter description for the manifest. ``dynamic_axes`` maps
    input axes to names (e.g. {0: "batch", 1: "time"}); the output's batch
    axis follows. The model is put in eval mode and not otherwise changed.
    """
    path = Path(path)
    model.eval()
    dynamic_axes = dict(dynamic_axes or {})
    n_params = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = n_params > TWO_GB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            if optimize not in ("none", "keep-batchnorm"):
                raise ValueError(f"optimize must be 'none' or 'keep-batchnorm', got {optimize!r}")
            opset = opset or 18
            shapes = ({ax: torch.export.Dim(name) for ax, name in dynamic_axes.items()},) if dynamic_axes else None
            prog = torch.onnx.export(model, (example,), dynamo=True, optimize=False, opset_version=opset,
                                     dynamic_shapes=shapes, input_names=["input"], output_names=["output"],
                                     verbose=False)
            if optimize == "keep-batchnorm":
                _keep_batchnorm_optimize(prog.model)
            prog.save(path, external_data=bool(external_data))
        elif exporter == "legacy":
            if optimize != "none":
                raise ValueError("the legacy exporter takes optimize='none' (constant folding keeps BN in PRESERVE mode)")
            opset = opset or 17
            axes = {"input": dynamic_axes, "output": {0: dynamic_axes[0]} if 0 in dynamic_axes else {}}
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"],
                              output_names=["output"], dynamic_axes=axes or None)
            if external_data:
                m = onnx.load(str(path))
                onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data")
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'legacy', got {exporter!r}")
    # "optimize" as in docs/architecture.md (torch's flag, always False here);
    # "passes" names what ran afterwards ("none" or onnxscript minus BN fusion).
    return {"name": exporter, "dynamo": exporter == "dynamo", "optimize": False, "passes": optimize,
            **batchnorm_provenance(model, path), "opset": opset, "torch": torch.__version__.split("+")[0],
            "external_data": bool(external_data)}


def batchnorm_provenance(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """What the written graph has, not what the exporter was asked for: the model's BatchNorm
    modules, the graph's BatchNormalization nodes, and keep_batchnorm = True only when every
    module is still a node (None when the model has no BatchNorm, False when any was folded)."""
    modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    g = onnx.load(str(path), load_external_data=False).graph
    nodes = sum(n.op_type == "BatchNormalization" for n in g.node)
    return {"keep_batchnorm": None if modules == 0 else nodes >= modules,
            "batchnorm_modules": int(modules), "batchnorm_nodes": int(nodes)}


# ------------------------------------------------------------------ validation
def onnx_input_dims(path: str | os.PathLike) -> list[int | str]:
    m = onnx.load(str(path), load_external_data=False)
    return [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]


def validate_outputs(model: torch.nn.Module, path: str | os.PathLike, inputs: Sequence[torch.Tensor], *,
                     atol: float = 1e-4, rtol: float = 1e-4) -> dict[str, Any]:
    """Run torch and onnxruntime (CPU) on each input; raise ExportError when |diff| > atol + rtol*|torch|."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst, shapes = 0.0, []
    model.eval()
    for x in inputs:
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{path}: output shape {got.shape} != torch {ref.shape} for input {tuple(x.shape)}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= atol + rtol * np.abs(ref)):
            raise ExportError(f"{path}: onnxruntime output differs from torch by {diff.max():.3g} "
                              f"(atol {atol}, rtol {rtol}) for input {tuple(x.shape)}")
        shapes.append(list(x.shape))
    return {"max_abs_diff": worst, "atol": atol, "rtol": rtol, "input_shapes": shapes}


# ------------------------------------------------------------------ locating marked tensors
def _initializers(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # loads external data too (files this module wrote)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _rnn_candidates(path: Path) -> list[tuple[str, str, int, np.ndarray]]:
    """(initializer, transform label, direction, torch-layout array) for LSTM/GRU/RNN W and R inputs."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    out = []
    for node in m.graph.node:
        if node.op_type not in GATE_ORDER:
            continue
        for idx, role in ((1, "W"), (2, "R")):
            if idx >= len(node.input) or node.input[idx] not in inits:
                continue
            a = numpy_helper.to_array(inits[node.input[idx]])  # [D, G*H, in]
            g = len(GATE_ORDER[node.op_type])
            for d in range(a.shape[0]):
                blocks = np.split(a[d], g, axis=0)
                torch_layout = np.concatenate([blocks[i] for i in GATE_ORDER[node.op_type]], axis=0)
                out.append((node.input[idx], f"rnn:{node.op_type}:{role}:dir={d}", d, torch_layout))
    return out


def _locate_with_layout(path: Path, want: dict[str, np.ndarray]) -> dict[str, dict] | None:
    """Use auditor.read.layout.torch_views when that module is available; None otherwise."""
    try:
        from auditor.read import layout
        from auditor.read import weights
    except ImportError:
        return None
    store = weights.WeightStore.open(path)
    found: dict[str, dict] = {}
    for view in layout.torch_views(store):
        arr = np.asarray(view.array())
        for param, ref in want.items():
            if param in found or tuple(view.shape) != ref.shape:
                continue
            if np.array_equal(arr.astype(np.float32), ref):
                found[param] = {"onnx": view.weight.name, "transform": view.transform,
                                "onnx_shape": [int(s) for s in view.weight.shape], "located_by": "auditor.read.layout"}
    return found


def locate_params(path: str | os.PathLike, model: torch.nn.Module, params: Sequence[str]) -> dict[str, dict]:
    """For each torch parameter, the ONNX tensor and layout transform under which the values are
    bit-identical. Raises ExportError when one is not found.

    Uses ``auditor.read.layout.torch_views`` when available; otherwise initializers
    by exact name, then by value (identity, transpose, recurrent gate reorder).
    """
    path = Path(path)
    named = dict(model.named_parameters())
    want = {p: named[p].detach().cpu().numpy().astype(np.float32) for p in params}
    found: dict[str, dict] = {}
    try:
        found = _locate_with_layout(path, want) or {}
    except Exception as e:  # the auditor is checked by its own tests; fall back to the plain search here
        warnings.warn(f"auditor.read.layout could not map {path.name}: {e}; using initializer search")
        found = {}
    missing = [p for p in params if p not in found]
    if missing:
        inits = _initializers(path)
        rnn = _rnn_candidates(path)
        for p in missing:
            ref = want[p]
            hit = None
            if p in inits and inits[p].shape == ref.shape and np.array_equal(inits[p], ref):
                hit = (p, "identity", "name")
            for name, arr in inits.items():
                if hit:
                    break
                if arr.shape == ref.shape and np.array_equal(arr, ref):
                    hit = (name, "identity", "value")
                elif arr.ndim == 2 and arr.T.shape == ref.shape and np.array_equal(arr.T, ref):
                    hit = (name, "transpose", "value")
            for name, label, _, arr in rnn:
                if hit:
                    break
                if arr.shape == ref.shape and np.array_equal(arr, ref):
                    hit = (name, label, "value")
            if hit:
                found[p] = {"onnx": hit[0], "transform": hit[1], "onnx_shape": list(inits[hit[0]].shape),
                            "located_by": hit[2]}
    missing = [p for p in params if p not in found]
    if missing:
        raise ExportError(f"{path}: marked parameter(s) {missing} not found bit-identical in the ONNX file")
    return found


def batchnorm_kept(path: str | os.PathLike, onnx_weight: str) -> bool:
    """True when the Conv reading ``onnx_weight`` feeds a BatchNormalization node."""
    m = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for conv in consumers.get(onnx_weight, []):
        if conv.op_type == "Conv" and any(c.op_type == "BatchNormalization" for c in consumers.get(conv.output[0], [])):
            return True
    return False


# ------------------------------------------------------------------ one call
def export_marked(model: torch.nn.Module, out_dir: str | os.PathLike, example: torch.Tensor,
                  validation_inputs: Sequence[torch.Tensor], *, key: keys.Key | None = None,
                  params: Sequence[str] | None = None, exporter: str = "dynamo",
                  dynamic_axes: dict[int, str] | None = None, optimize: str = "none", atol: float = 1e-4,
                  rtol: float = 1e-4, inputs_description: str = "", external_data: bool | None = None,
                  onnx_name: str = "model.onnx") -> ExportResult:
    """Export, validate, locate the marked parameters, write model.onnx, key.json, manifest.json.

    ``params`` defaults to the key's marked parameters. Files are built in a
    temporary folder inside ``out_dir`` and moved in place one by one with
    os.replace, so an ``ExportError`` leaves ``out_dir`` without partial files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = list(params if params is not None else ([m.param for m in key.whitebox] if key else []))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp = Path(tmp)
        path = tmp / onnx_name
        info = export_onnx(model, example, path, exporter=exporter, dynamic_axes=dynamic_axes,
                           optimize=optimize, external_data=external_data)
        dims = onnx_input_dims(path)
        static = [name for ax, name in (dynamic_axes or {}).items() if not isinstance(dims[ax], str)]
        usable = [x for x in validation_inputs
                  if all(isinstance(d, str) or d == s for d, s in zip(dims, x.shape))]
        if not usable:
            raise ExportError(f"no validation input fits the exported input shape {dims}")
        validation = validate_outputs(model, path, usable, atol=atol, rtol=rtol)
        validation["inputs"] = inputs_description
        located = locate_params(path, model, params)
        for p, loc in located.items():
            loc["batchnorm_kept"] = batchnorm_kept(path, loc["onnx"]) if loc["transform"] == "identity" and \
                dict(model.named_parameters())[p].ndim == 4 else None
        manifest = {"format": MANIFEST_FORMAT, "onnx": onnx_name, "exporter": info,
                    "input_dims": dims, "static_axes": static, "validation": validation, "params": located}
        keys.write_json_atomic(tmp / "manifest.json", manifest)
        key_doc = keys.save_key(key, tmp / "key.json") if key is not None else None
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    return ExportResult(out_dir / onnx_name, manifest, key_doc)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
