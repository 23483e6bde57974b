"""The one way to get model inputs: every command that runs a model reads data here.

``load_data(spec, model, ...)`` returns a ``Dataset`` bound to the model's
declared inputs (names, dtypes, shapes; symbolic dimensions accepted), checked
before anything runs. Sources (``spec``):

* ``PATH.npy``   one array, the model's only input (examples on axis 0);
* ``PATH.npz``   one array per model input, named after the ONNX input (a
  single-input model also accepts the archive's only non-label array);
  labels under ``y`` (or ``labels``), or from ``labels=FILE``;
* a folder of PNG / JPEG images (read with Pillow; class sub-folders give the
  labels, sorted by name), preprocessed as ``Preprocess`` says;
* ``PATH.gz`` / ``*-ubyte`` IDX files (images [n, H, W] get the preprocessing
  of images; other arrays are taken as they are); the labels of ``*-images-idx3-*``
  come from the sibling ``*-labels-idx1-*`` file when there is one;
* ``fashion-mnist`` (built in; only for ``[N, 1, 28, 28]`` float inputs; the
  train split for calibration, the test split for evaluation;
  ``fashion-mnist:train`` / ``fashion-mnist:test`` name the split);
* ``synthetic``: seeded noise of each input's shape and dtype (float: standard
  normal; integer: uniform in {0, 1}; inputs named ``*mask*``: ones; symbolic
  non-batch dimensions: ``SYNTHETIC_DIM``). Flagged ``synthetic`` in every
  output: its activation ranges do not reflect deployment.

A fixed batch dimension is honoured: batches have exactly that size; a last
batch that the examples do not fill is padded with repeats of its own examples,
whose outputs are discarded (``padded`` in ``describe()``; nothing is dropped). Bad data (shape or dtype mismatch, NaN/Inf,
an empty file, a label count that does not match, an unreadable image, an
``.npz`` missing an input) is an ``AuditError`` with one line.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from auditor.errors import AuditError

FASHION = "fashion-mnist"
SYNTHETIC = "synthetic"
SYNTHETIC_DIM = 16
SYNTHETIC_CAVEAT = "synthetic inputs: activation ranges and outputs do not reflect deployment data"
DEFAULT_BATCH = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_KEYS = ("y", "labels")

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.BOOL: np.bool_,
}


# ------------------------------------------------------------------ the model's declared inputs
@dataclass(frozen=True)
class InputSpec:
    """One declared model input: dims are ints (fixed), strings (symbolic) or None (unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple

    @property
    def fixed_batch(self) -> int | None:
        d = self.dims[0] if self.dims else None
        return d if isinstance(d, int) and d > 0 else None

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"

    def describe(self) -> dict:
        return {"name": self.name, "dtype": np.dtype(self.dtype).name,
                "shape": ["?" if d is None else d for d in self.dims]}


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller feeds (initializers listed as inputs are not fed)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = _ONNX_TO_NP.get(tt.elem_type)
        if dtype is None:
            raise AuditError(f"model input {vi.name!r} has an element type wmaudit cannot feed "
                             f"({onnx.TensorProto.DataType.Name(tt.elem_type)})")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out.append(InputSpec(vi.name, np.dtype(dtype), dims))
    if not out:
        raise AuditError("the model declares no inputs to feed")
    return out


def _model_of(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from auditor.read.graph import open_model

    return open_model(model)


def input_specs(model) -> list[InputSpec]:
    """The declared inputs of ``model``: a ModelProto, a path, or already a list of ``InputSpec``
    (for a command that knows the input without a model file, e.g. from a keyed model's key)."""
    if isinstance(model, (list, tuple)) and all(isinstance(s, InputSpec) for s in model):
        if not model:
            raise AuditError("no model inputs to feed")
        return list(model)
    return model_inputs(_model_of(model))


# ------------------------------------------------------------------ image preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: resize to ``size`` (H, W), ``channels`` (1 = grey, 3 = RGB),
    divide by ``scale``, subtract ``mean`` and divide by ``std`` per channel, ``layout`` nchw | nhwc.
    Fields left None are taken from the model's declared input shape."""

    size: tuple[int, int] | None = None
    layout: str | None = None
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: int | None = None

    def resolved(self, spec: InputSpec) -> "Preprocess":
        """Fill size / layout / channels from a rank-4 (or rank-3 single-channel) declared input."""
        dims = spec.dims
        layout, size, ch = self.layout, self.size, self.channels
        if len(dims) == 4:
            if layout is None:
                layout = "nhwc" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "nchw"
            c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
        elif len(dims) == 3:
            layout, c, h, w = layout or "nhw", 1, dims[1], dims[2]
        else:
            raise AuditError(f"images cannot feed input {spec.name!r} of shape {spec.shape_text()} "
                             f"(expected [N, C, H, W], [N, H, W, C] or [N, H, W])")
        if ch is None:
            ch = c if isinstance(c, int) else 3
        if size is None:
            if not (isinstance(h, int) and isinstance(w, int)):
                raise AuditError(f"input {spec.name!r} has symbolic height/width {spec.shape_text()}: "
                                 f"give --image-size")
            size = (h, w)
        return replace(self, size=tuple(size), layout=layout, channels=ch)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8-valued [n, H, W, C] -> float32 in ``layout``."""
        x = pixels.astype(np.float32) / np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if np.any(std == 0):
            raise AuditError("preprocessing std must not be 0")
        x = (x - mean) / std
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        elif self.layout == "nhw":
            x = x[..., 0]
        return np.ascontiguousarray(x, dtype=np.float32)

    def describe(self) -> dict:
        return {"size": list(self.size) if self.size else None, "layout": self.layout, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std), "channels": self.channels}


def parse_preprocess(text: str | None) -> Preprocess:
    """``size=32x32,layout=nchw,scale=255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,channels=3``."""
    if not text:
        return Preprocess()
    kw: dict = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        k, _, v = part.partition("=")
        try:
            if k == "size":
                h, _, w = v.lower().partition("x")
                kw["size"] = (int(h), int(w or h))
            elif k == "layout":
                if v.lower() not in ("nchw", "nhwc"):
                    raise ValueError
                kw["layout"] = v.lower()
            elif k == "scale":
                kw["scale"] = float(v)
            elif k in ("mean", "std"):
                kw[k] = tuple(float(t) for t in v.split("/"))
            elif k == "channels":
                kw["channels"] = int(v)
                if kw["channels"] not in (1, 3):
                    raise ValueError
            else:
                raise AuditError(f"--preprocess: unknown field {k!r} (size, layout, scale, mean, std, channels)")
        except ValueError:
            raise AuditError(f"--preprocess: bad value {part!r}") from None
    return Preprocess(**kw)


# ------------------------------------------------------------------ the data set
@dataclass(frozen=True)
class Dataset:
    """Inputs bound to a model: {input name: array with examples on axis 0}, optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    seed: int = 0
    synthetic: bool = False
    batch_size: int = DEFAULT_BATCH
    fixed_batch: bool = False
    dropped: int = 0
    specs: tuple = field(default=(), repr=False)
    preprocess: dict | None = None

    @property
    def n(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def digest(self) -> str:
        h = hashlib.sha256(str(self.batch_size).encode())
        for name in sorted(self.inputs):
            a = np.ascontiguousarray(self.inputs[name])
            h.update(str((name, a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        d = {"source": self.source, "samples": self.n, "seed": int(self.seed), "batch_size": int(self.batch_size),
             "labels": self.labels is not None, "sha256": self.digest,
             "inputs": [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape[1:])}
                        for k, v in self.inputs.items()]}
        if self.fixed_batch:
            d["fixed_batch"] = True
            d["dropped"] = int(self.dropped)
            d["padded"] = int(self.padded)
            d["remainder"] = ("padded: the last batch is filled with repeats of its own examples, whose "
                              "outputs are discarded" if self.padded else "none")
        if self.synthetic:
            d["synthetic"] = True
            d["caveat"] = SYNTHETIC_CAVEAT
        if self.preprocess:
            d["preprocess"] = self.preprocess
        return d

    @property
    def padded(self) -> int:
        """Examples repeated to fill the last batch of a fixed-batch model (0 otherwise)."""
        return (-self.n) % self.batch_size if self.fixed_batch else 0

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` examples, in order. A fixed batch never gets a short one: its last
        batch is filled with repeats of that batch's own examples (see ``counted_batches``)."""
        for feed, _ in self.counted_batches():
            yield feed

    def counted_batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feed, n): the feeds of ``batches`` with how many of their first rows are real examples."""
        for s in range(0, self.n, self.batch_size):
            feed = {k: v[s: s + self.batch_size] for k, v in self.inputs.items()}
            n = len(next(iter(feed.values())))
            if self.fixed_batch and n < self.batch_size:
                idx = np.arange(self.batch_size) % n
                feed = {k: v[idx] for k, v in feed.items()}
            yield feed, n

    def without_remainder(self) -> "Dataset":
        """For a fixed batch: the examples that fill whole batches (the rest dropped and counted in
        ``dropped``), or the data set itself when it fills none or has no fixed batch."""
        keep = self.n - self.n % self.batch_size
        if not self.fixed_batch or keep in (0, self.n):
            return self
        return replace(self, inputs={k: v[:keep] for k, v in self.inputs.items()},
                       labels=self.labels[:keep] if self.labels is not None else None,
                       dropped=self.dropped + self.n - keep)

    def with_batch(self, batch_size: int) -> "Dataset":
        """The same data fed in batches of ``batch_size`` (ignored for a fixed batch)."""
        if self.fixed_batch:
            return self
        return replace(self, batch_size=int(batch_size))


def _subset(arrays: dict[str, np.ndarray], labels, n: int | None, seed: int):
    total = next(iter(arrays.values())).shape[0]
    if n is None or n >= total:
        return arrays, labels
    idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return {k: v[idx] for k, v in arrays.items()}, (labels[idx] if labels is not None else None)


def _kind_ok(arr_dtype: np.dtype, want: np.dtype) -> bool:
    if np.issubdtype(want, np.floating):
        return np.issubdtype(arr_dtype, np.floating)
    if want == np.bool_:
        return arr_dtype == np.bool_ or np.issubdtype(arr_dtype, np.integer)
    return np.issubdtype(arr_dtype, np.integer) or arr_dtype == np.bool_


def _shape_text(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def check_array(spec: InputSpec, a: np.ndarray, where: str) -> np.ndarray:
    """Cast ``a`` to the input's dtype after checking kind, rank, fixed dims and finiteness."""
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise AuditError(f"{where}: {a.dtype} array cannot feed input {spec.name!r} ({spec.dtype.name})")
    if a.ndim == 0 or a.shape[0] == 0:
        raise AuditError(f"{where}: no examples (shape {_shape_text(a)})")
    # a single-channel input fed without its channel axis: [n, H, W] for [N, 1, H, W]
    if a.ndim + 1 == len(spec.dims) and len(spec.dims) == 4 and spec.dims[1] == 1 and a.shape[1:] == tuple(
            d for d in spec.dims[2:]):
        a = a[:, None]
    ok = a.ndim == len(spec.dims) and all(not isinstance(d, int) or d <= 0 or d == s
                                          for d, s in zip(spec.dims[1:], a.shape[1:]))
    if not ok:
        raise AuditError(f"{where}: shape {_shape_text(a)} does not fit input {spec.name!r} "
                         f"{spec.shape_text()} (first axis = examples)")
    if not _kind_ok(a.dtype, spec.dtype):
        raise AuditError(f"{where}: dtype {a.dtype.name} does not fit input {spec.name!r} ({spec.dtype.name})")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        raise AuditError(f"{where}: {bad} NaN/Inf values")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=spec.dtype)
    if np.issubdtype(spec.dtype, np.floating) and not np.all(np.isfinite(out)):
        bad = int(np.sum(~np.isfinite(out)))
        raise AuditError(f"{where}: {bad} values beyond the range of {spec.dtype.name} (the model's input type)")
    if np.issubdtype(spec.dtype, np.integer) and np.issubdtype(a.dtype, np.integer) and a.size:
        info = np.iinfo(spec.dtype)
        if a.min() < info.min or a.max() > info.max:
            raise AuditError(f"{where}: values outside the range of {spec.dtype.name} (the model's input type)")
    return out


def bind(arrays: dict[str, np.ndarray], labels, specs: list[InputSpec], *, source: str, seed: int = 0,
         samples: int | None = None, batch_size: int = DEFAULT_BATCH, synthetic: bool = False,
         preprocess: dict | None = None) -> Dataset:
    """Check arrays against the declared inputs and make the Dataset (seeded subset, fixed batch)."""
    counts = {k: int(v.shape[0]) if getattr(v, "ndim", 0) else 0 for k, v in arrays.items()}
    checked = {}
    for spec in specs:
        if spec.name not in arrays:
            raise AuditError(f"{source}: no array for model input {spec.name!r} (have {sorted(arrays)})")
        checked[spec.name] = check_array(spec, np.asarray(arrays[spec.name]), f"{source}[{spec.name}]")
    n = {a.shape[0] for a in checked.values()}
    if len(n) != 1:
        raise AuditError(f"{source}: inputs have different numbers of examples {counts}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise AuditError(f"{source}: labels must be a 1-D integer array, got {labels.dtype} "
                             f"{_shape_text(labels)}")
        if len(labels) != next(iter(n)):
            raise AuditError(f"{source}: {len(labels)} labels for {next(iter(n))} examples")
        if labels.size and (labels.min() < 0 or (labels.dtype == np.uint64 and labels.max() > 2 ** 63 - 1)):
            raise AuditError(f"{source}: labels must be class indices >= 0, got {labels.min()}..{labels.max()}")
        labels = labels.astype(np.int64)
    checked, labels = _subset(checked, labels, samples, seed)
    fixed = {s.fixed_batch for s in specs}
    fb = next(iter(fixed)) if len(fixed) == 1 else None
    dropped = 0
    if fb is not None:
        batch_size = fb   # a short last batch is padded (Dataset.counted_batches), nothing dropped
    return Dataset(checked, labels, source, seed, synthetic, batch_size, fb is not None, dropped, tuple(specs),
                   preprocess)


def from_arrays(model, arrays, *, source: str, seed: int = 0, samples: int | None = None,
                batch_size: int = DEFAULT_BATCH, labels=None) -> Dataset:
    """A Dataset of in-memory inputs for ``model`` (a ModelProto, a path or its ``InputSpec`` list):
    ``arrays`` is {input name: array}, or one array for a model with one input; checked like every
    source (labels too, when given)."""
    specs = input_specs(model)
    if not isinstance(arrays, dict):
        if len(specs) != 1:
            raise AuditError(f"{source}: one array for a model with {len(specs)} inputs")
        arrays = {specs[0].name: arrays}
    return bind(arrays, labels, specs, source=source, seed=seed, samples=samples, batch_size=batch_size)


def only_input(ds: Dataset) -> np.ndarray:
    """The one input array of a single-input data set (perceptual hashes, keyed models)."""
    if len(ds.inputs) != 1:
        raise AuditError(f"{ds.source}: expected one model input, got {len(ds.inputs)}")
    return next(iter(ds.inputs.values()))


# ------------------------------------------------------------------ sources
def _load_npy(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise AuditError(f"{path}: empty file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files
        raise AuditError(f"cannot read {path} as .npy: {' '.join(str(e).split())}") from None


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels from .npy, IDX (.gz / -ubyte) or a text file with one integer per line."""
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"labels not found: {p}")
    if p.stat().st_size == 0:
        raise AuditError(f"{p}: empty file")
    if p.suffix == ".npy":
        return _load_npy(p)
    if _is_idx(p):
        from auditor.data.datasets import read_idx

        return read_idx(p)
    try:
        return np.array([int(t) for t in p.read_text().split()], dtype=np.int64)
    except (ValueError, UnicodeDecodeError):
        raise AuditError(f"{p}: labels must be integers, one per line") from None
    except OverflowError:
        raise AuditError(f"{p}: a label does not fit a 64-bit integer") from None


def _is_idx(p: Path) -> bool:
    return p.suffix == ".gz" or "ubyte" in p.name or p.suffix == ".idx"


def check_source_form(spec: str, what: str) -> None:
    """A data source named in a file (a policy) has one of the documented forms, whether or not the
    command ends up reading it: 'fashion-mnist', 'synthetic', an image folder, .npy, .npz or IDX.
    A file of another kind (a text file, a pickle) is refused by name, before anything runs."""
    if spec in (FASHION, SYNTHETIC):
        return
    p = Path(spec)
    if p.is_dir():
        return
    if p.suffix in (".npy", ".npz") or _is_idx(p):
        if p.exists() and not p.is_file():
            raise AuditError(f"{what} {p.name!r} is not a regular file")
        return
    if not p.exists() and not p.suffix:
        return  # an image folder still to be made: load_data says so when it is read
    raise AuditError(f"{what} {p.name!r} is not data the auditor reads (a .npy, .npz, image folder or IDX "
                     f"file, '{FASHION}' or '{SYNTHETIC}')")


def _image_files(folder: Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if files or not classes:
        return files, None, []
    out, labels = [], []
    for i, c in enumerate(classes):
        fs = sorted(f for f in (folder / c).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        out += fs
        labels += [i] * len(fs)
    return out, np.array(labels, np.int64), classes


def _read_images(files: list[Path], pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w = pre.size
    mode = "L" if pre.channels == 1 else "RGB"
    out = np.empty((len(files), h, w, pre.channels), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im, np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise AuditError(f"cannot read image {f}: {' '.join(str(e).split())}") from None
        out[i] = a.reshape(h, w, pre.channels)
    return out


def synthetic(specs: list[InputSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded noise of each input's shape and dtype (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = [n] + [d if isinstance(d, int) and d > 0 else SYNTHETIC_DIM for d in s.dims[1:]]
        if np.issubdtype(s.dtype, np.floating):
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif "mask" in s.name.lower():
            out[s.name] = np.ones(shape, s.dtype)
        else:
            out[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
    return out


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as every exporter model expects it: float32 [N, 1, 28, 28], labels int64."""
    from auditor.data import datasets

    images, labels = datasets.fashion_mnist(split)
    return np.ascontiguousarray(datasets.fashion_mnist_normalized(images), np.float32), labels


def takes_fashion_mnist(specs: list[InputSpec]) -> bool:
    return (len(specs) == 1 and np.issubdtype(specs[0].dtype, np.floating) and len(specs[0].dims) == 4
            and tuple(specs[0].dims[1:]) == (1, 28, 28))


def load_data(spec: str | None, model, *, purpose: str = "evaluation", samples: int | None = None,
              seed: int = 0, labels: str | os.PathLike | None = None, preprocess: Preprocess | None = None,
              batch_size: int = DEFAULT_BATCH) -> Dataset:
    """Inputs for ``model`` (a ModelProto or a path) from ``spec``; see the module docstring.

    ``purpose`` is ``calibration`` or ``evaluation`` (the built-in Fashion-MNIST uses its
    train split for calibration and its test split for evaluation). ``spec=None`` means
    Fashion-MNIST when the model takes [N, 1, 28, 28] float, else an AuditError asking for --data.
    """
    specs = input_specs(model)
    pre = preprocess or Preprocess()
    split = None
    if spec is not None and spec.startswith(FASHION + ":"):
        spec, split = FASHION, spec.split(":", 1)[1]
        if split not in ("train", "test"):
            raise AuditError(f"{FASHION}:{split}: the built-in set has the splits train and test")
    if spec is None:
        if not takes_fashion_mnist(specs):
            shapes = ", ".join(f"{s.name} {s.shape_text()} {s.dtype.name}" for s in specs)
            raise AuditError(f"the model takes {shapes}, not Fashion-MNIST images: give --data "
                             f"(.npy, .npz, an image folder, IDX, or 'synthetic')")
        spec = FASHION
    kw = dict(seed=seed, samples=samples, batch_size=batch_size)
    if spec == SYNTHETIC:
        if labels is not None:
            raise AuditError("--labels cannot be combined with synthetic data")
        return bind(synthetic(specs, samples or 256, seed), None, specs, source=SYNTHETIC, synthetic=True, **kw)
    if spec == FASHION:
        split = split or ("train" if purpose == "calibration" else "test")
        x, y = fashion_mnist_arrays(split)
        if len(specs) != 1:
            raise AuditError(f"fashion-mnist feeds one input; the model has {len(specs)}")
        return bind({specs[0].name: x}, y, specs, source=f"{FASHION}:{split}", **kw)
    path = Path(spec)
    if not path.exists():
        raise AuditError(f"data not found: {path} (a .npy, .npz, image folder or IDX file, "
                         f"'{FASHION}' or '{SYNTHETIC}')")
    y = None
    pre_desc = None
    if path.is_dir():
        if len(specs) != 1:
            raise AuditError(f"an image folder feeds one input; the model has {len(specs)}")
        files, y, _ = _image_files(path)
        if not files:
            raise AuditError(f"{path}: no PNG or JPEG images")
        p = pre.resolved(specs[0])
        arrays = {specs[0].name: p.apply(_read_images(files, p))}
        pre_desc = p.describe()
        source = f"images:{path.name}"
    elif path.suffix == ".npz":
        if path.stat().st_size == 0:
            raise AuditError(f"{path}: empty file")
        try:
            with np.load(path, allow_pickle=False) as z:
                arch = {k: z[k] for k in z.files}
        except Exception as e:
            raise AuditError(f"cannot read {path} as .npz: {' '.join(str(e).split())}") from None
        names = [s.name for s in specs]
        for k in LABEL_KEYS:
            if k in arch and k not in names:  # a model input may itself be called y
                y = arch.pop(k)
                break
        if len(specs) == 1 and names[0] not in arch and len(arch) == 1:
            arch = {names[0]: next(iter(arch.values()))}
        missing = [n for n in names if n not in arch]
        if missing:
            raise AuditError(f"{path}: no array for model input {missing[0]!r} (the archive has "
                             f"{sorted(arch) or 'no input arrays'}; name arrays after the model's inputs)")
        arrays = {n: arch[n] for n in names}
        source = f"npz:{path.name}"
    elif path.suffix == ".npy" or _is_idx(path):
        if len(specs) != 1:
            raise AuditError(f"{path.name} holds one array; the model has {len(specs)} inputs "
                             f"({', '.join(s.name for s in specs)}): use an .npz with one array per input")
        if path.suffix == ".npy":
            a = _load_npy(path)
            source = f"npy:{path.name}"
        else:
            if path.stat().st_size == 0:
                raise AuditError(f"{path}: empty file")
            from auditor.data.datasets import read_idx

            a = read_idx(path)
            source = f"idx:{path.name}"
            sibling = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
            if labels is None and sibling != path and sibling.is_file():
                y = read_idx(sibling)  # the labels file that IDX image sets ship beside their images
            if a.dtype == np.uint8 and a.ndim == 3 and np.issubdtype(specs[0].dtype, np.floating):
                p = pre.resolved(specs[0])
                if p.channels != 1:
                    p = replace(p, channels=1)
                a = p.apply(a[..., None])
                pre_desc = p.describe()
        arrays = {specs[0].name: a}
    else:
        raise AuditError(f"{path}: unknown data format (.npy, .npz, an image folder or IDX .gz/-ubyte)")
    if labels is not None:
        y = load_labels(labels)
    return bind(arrays, y, specs, source=source, preprocess=pre_desc, **kw)


def preprocess_from_args(args) -> Preprocess:
    """--preprocess SPEC, then the single flags (--image-size, --layout, --scale, --mean, --std)."""
    pre = parse_preprocess(getattr(args, "preprocess", None))
    kw = {}
    if getattr(args, "image_size", None):
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", args.image_size)
        if not m:
            raise AuditError(f"--image-size must be N or HxW, got {args.image_size!r}")
        kw["size"] = (int(m.group(1)), int(m.group(2) or m.group(1)))
    if getattr(args, "layout", None):
        kw["layout"] = args.layout
    if getattr(args, "scale", None) is not None:
        kw["scale"] = float(args.scale)
    for k in ("mean", "std"):
        v = getattr(args, k, None)
        if v:
            try:
                kw[k] = tuple(float(t) for t in v.replace(",", "/").split("/"))
            except ValueError:
                raise AuditError(f"--{k} must be numbers separated by '/', got {v!r}") from None
    return replace(pre, **kw) if kw else pre


def add_data_arguments(p) -> None:
    """The data flags every command that runs a model takes."""
    g = p.add_argument_group("data (see docs/reference/data.md)")
    g.add_argument("--data", metavar="SPEC",
                   help="inputs: a .npy / .npz / image folder / IDX file, 'fashion-mnist' or 'synthetic' "
                        "(default: fashion-mnist when the model takes [N,1,28,28] float)")
    g.add_argument("--labels", metavar="FILE", help="labels (.npy, IDX, or one integer per line)")
    add_preprocess_arguments(g)


def add_preprocess_arguments(g) -> None:
    """The image preprocessing flags (for commands whose data options have other names)."""
    g.add_argument("--preprocess", metavar="SPEC",
                   help="images: size=HxW,layout=nchw|nhwc,scale=255,mean=a/b/c,std=a/b/c,channels=1|3")
    g.add_argument("--image-size", metavar="HxW", help="images: resize to H x W (default: the model's)")
    g.add_argument("--layout", choices=("nchw", "nhwc"), help="images: tensor layout (default: the model's)")
    g.add_argument("--scale", type=float, help="images: divide pixels by this (default 255)")
    g.add_argument("--mean", help="images: per-channel mean, e.g. 0.485/0.456/0.406")
    g.add_argument("--std", help="images: per-channel std, e.g. 0.229/0.224/0.225")


def fashion_mnist(purpose: str = "evaluation", samples: int | None = None, seed: int = 0, model=None,
                  batch_size: int = DEFAULT_BATCH) -> Dataset:
    """The built-in Fashion-MNIST as a Dataset (train split for calibration, test split otherwise),
    bound to ``model``'s input, or to an input named ``input`` [N, 1, 28, 28] when no model is given."""
    if model is not None:
        return load_data(FASHION, model, purpose=purpose, samples=samples, seed=seed, batch_size=batch_size)
    spec = InputSpec("input", np.dtype(np.float32), ("N", 1, 28, 28))
    split = "train" if purpose == "calibration" else "test"
    x, y = fashion_mnist_arrays(split)
    return bind({"input": x}, y, [spec], source=f"{FASHION}:{split}", seed=seed, samples=samples,
                batch_size=batch_size)
