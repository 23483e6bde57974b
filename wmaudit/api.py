"""The Python API: what each ``wmaudit`` command does, as functions that return typed results.

Every function takes a model as a path or an in-memory ``onnx.ModelProto``, a key as a
path or a loaded key, and returns a result object (``wmaudit.results``) whose
``document`` is the same ``wmaudit-result/1`` JSON the command prints with ``--json``.
Bad input raises ``wmaudit.AuditError`` (one line of text), never anything else; the
command line turns it into that line on stderr and exit code 2.

``command`` (every function): the text recorded as the result's ``command``; by default
the Python call that made it (``wmaudit.extract(model='m.onnx', key='k.json')``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import onnx

from auditor import results as _results
from auditor.errors import AuditError
from auditor.marks import stats as _stats
from auditor.marks.keys import Key

from wmaudit.results import (ExtractResult, GateResult, ProvenanceResult, QueryResult, RobustnessResult,
                             ScanResult, SweepResult)

PathLike = Union[str, "os.PathLike[str]"]
ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]
KeyLike = Union[str, "os.PathLike[str]", Key]
IN_MEMORY = "<onnx.ModelProto>"
DEFAULT_ALPHA = _stats.DEFAULT_ALPHA
_PROTO_LIMIT = 2 ** 31 - 1  # protobuf's own limit on one serialized message


# ---------------------------------------------------------------- inputs
@contextlib.contextmanager
def _model_file(model: ModelLike, what: str = "model") -> Iterator[tuple[Path, bool]]:
    """(path, in_memory): a path as given, or an in-memory model written to a private temporary
    folder for the duration of the call (the library reads files, as the command line does)."""
    if isinstance(model, onnx.ModelProto):
        size = model.ByteSize()
        if size > _PROTO_LIMIT:
            raise AuditError(f"{what}: an in-memory model of {size} bytes is over protobuf's 2 GiB limit; "
                             f"save it with external data and pass the path")
        with tempfile.TemporaryDirectory(prefix="wmaudit-api-") as d:
            path = Path(d) / "model.onnx"
            path.write_bytes(model.SerializeToString())
            yield path, True
        return
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.is_file():
            raise AuditError(f"{what} not found: {p}")
        yield p, False
        return
    raise AuditError(f"{what}: expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _key(key: KeyLike) -> Key:
    from auditor.marks.keys import load_key

    if isinstance(key, Key):
        return key
    if isinstance(key, (str, os.PathLike)):
        return load_key(key)
    raise AuditError(f"key: expected a path or a loaded key, got {type(key).__name__}")


def _keys(keys: KeyLike | Sequence[KeyLike] | None, folder: PathLike | None = None) -> list[Key]:
    from auditor.marks.keys import load_keys

    if keys is None:
        given: list[KeyLike] = []
    elif isinstance(keys, (str, os.PathLike, Key)):
        given = [keys]
    else:
        given = list(keys)
    loaded = [k for k in given if isinstance(k, Key)]
    paths = [k for k in given if not isinstance(k, Key)]
    return loaded + load_keys(paths, folder) if (paths or folder or not loaded) else loaded


def _manifest(manifest: PathLike | dict[str, Any] | None) -> dict[str, Any] | None:
    from auditor.marks.manifest import check_manifest, load_manifest

    if manifest is None or isinstance(manifest, (str, os.PathLike)):
        return load_manifest(manifest)
    return check_manifest(manifest, "(in memory)")


def _existing(path: PathLike | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"{what} not found: {p}")
    return p


def _shown(v: Any) -> str:
    if isinstance(v, onnx.ModelProto):
        return IN_MEMORY
    if isinstance(v, Key):
        return f"<key {v.commitment[:19]}>"
    if isinstance(v, (str, os.PathLike)):
        return repr(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    return repr(v)


def _call(fn: str, args: dict[str, Any]) -> str:
    """The Python call that made a result (arguments left at None are not shown)."""
    return f"wmaudit.{fn}(" + ", ".join(f"{k}={_shown(v)}" for k, v in args.items() if v is not None) + ")"


def _finish(doc: dict[str, Any], in_memory: bool, command: str) -> dict[str, Any]:
    doc["command"] = command
    if in_memory and isinstance(doc.get("model"), dict):
        doc["model"]["path"] = IN_MEMORY
    return doc


# ---------------------------------------------------------------- extract
def extract(model: ModelLike, key: KeyLike, *, manifest: PathLike | dict[str, Any] | None = None,
            reference: PathLike | None = None, marks: Sequence[str] | None = None,
            alpha: float = DEFAULT_ALPHA, null_corpus: Sequence[PathLike] | None = None,
            reveal_bits: bool = False, command: str | None = None) -> ExtractResult:
    """White-box marks of ``key`` read off ``model``, with exact binomial p-values (``wmaudit extract``).

    Detected when the corrected p < ``alpha``. ``null_corpus``: unrelated models for the empirical
    null of keys that fail the fair-coin checks. ``reveal_bits`` puts the extracted bits in the result."""
    from auditor.marks.whitebox import extract as _extract

    _alpha(alpha)
    k = _key(key)
    man = _manifest(manifest)
    ref = _existing(reference, "reference model")
    corpus = [str(p) for p in null_corpus] if null_corpus else None
    if corpus:
        from auditor.marks.evidence import expand_corpus

        expand_corpus(corpus)  # a missing path is an error even when no key needs the null
    with _model_file(model) as (path, mem):
        res = _extract(path, k, manifest=man, alpha=alpha, reference=ref,
                       marks=list(marks) if marks else None, null_corpus=corpus)
        doc = _results.envelope("extract", model_path=path, key=k, result=res.to_json(reveal_bits=reveal_bits))
    return ExtractResult(_finish(doc, mem, command or _call("extract", dict(
        model=model, key=key, manifest=manifest if not isinstance(manifest, dict) else "<dict>",
        reference=reference, marks=marks, alpha=alpha if alpha != DEFAULT_ALPHA else None,
        null_corpus=null_corpus, reveal_bits=reveal_bits or None))))


def _alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise AuditError(f"alpha must be in (0, 1), got {alpha!r}")


# ---------------------------------------------------------------- robustness
def robustness(model: ModelLike, key: KeyLike, *, grid: PathLike | Any | None = None, data: str | None = None,
               labels: PathLike | None = None, preprocess: Any = None, samples: int = 2000,
               calibration_samples: int = 256, accuracy: bool = True,
               manifest: PathLike | dict[str, Any] | None = None, reference: PathLike | None = None,
               seed: int = 0, jobs: int | None = None, output_dir: PathLike | None = None,
               save_models: bool = False, min_top1_agreement: float | None = None,
               max_accuracy_drop: float | None = None, mlflow: str | None = None,
               mlflow_experiment: str = "wmaudit", progress: bool = False,
               command: str | None = None, targets: Sequence[str] | None = None) -> RobustnessResult:
    """Attack ``model`` with every config of ``grid`` (a TOML path, an ``auditor.gate.robustness.Grid``,
    or None for the default grid), extract the marks of ``key`` from each attacked model and measure
    what the task lost on ``data`` (``wmaudit robustness``).

    Survival is counted on the configs that left the model usable: top-1 agreement with the
    unattacked model >= ``min_top1_agreement`` (default 0.90) and accuracy drop <=
    ``max_accuracy_drop`` percentage points (default 5, the unit of the release policy's threshold). ``output_dir``: also write ``results.json`` there
    (and the attacked models with ``save_models``). ``mlflow``: a tracking URI to log the run to.
    ``preprocess``: an ``auditor.data.inputs.Preprocess`` or its text form. ``targets``: where the
    task is measured (default native; auditor.backends.targets): rows become attack x target."""
    from auditor.attacks import load_model
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data
    from auditor.gate.robustness import Grid, _static_prefix, default_grid, load_grid, run_grid
    from auditor.gate.usability import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_TOP1_AGREEMENT, Usability
    from auditor.marks.manifest import manifest_beside
    from auditor.read.weights import WeightStore

    for name, v in (("samples", samples), ("calibration_samples", calibration_samples)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise AuditError(f"{name} must be an integer >= 1, got {v!r}")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise AuditError(f"jobs must be an integer >= 1, got {jobs!r}")
    if isinstance(model, (str, os.PathLike)):
        _existing(model, "model")  # before the key: the model is the first thing named
    from auditor.backends.targets import check_available

    target_names = [t.name for t in check_available(list(targets or ["native"]))]  # one line, before any work
    usability = Usability(DEFAULT_MIN_TOP1_AGREEMENT if min_top1_agreement is None else float(min_top1_agreement),
                          DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else float(max_accuracy_drop))
    k = _key(key)
    if grid is None:
        g = default_grid()
    elif isinstance(grid, Grid):
        g = grid
    elif isinstance(grid, (str, os.PathLike)):
        g = load_grid(grid)
    else:
        raise AuditError(f"grid: expected a TOML path or a Grid, got {type(grid).__name__}")
    _existing(reference, "reference model")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise AuditError(f"output folder {out} exists and is not a folder")
    if save_models and out is None:
        raise AuditError("save_models needs an output folder")
    pre = _preprocess(preprocess)
    with _model_file(model) as (path, mem):
        WeightStore.open(path)  # a malformed model is refused before any data set is loaded
        man = _manifest(manifest) if manifest is not None else (None if mem else manifest_beside(path))
        proto = load_model(path)
        evaluation = None if not accuracy else load_data(data, proto, purpose="evaluation", samples=samples,
                                                         seed=seed, labels=labels, preprocess=pre)
        calibration = None
        if any(_static_prefix(c.steps) is not None for c in g.configs):
            calibration = Calibration(load_data(data, proto, purpose="calibration", samples=calibration_samples,
                                                seed=seed, labels=None, preprocess=pre))
        del proto
        doc = run_grid(path, k, g, calibration, evaluation=evaluation, manifest=man, jobs=jobs,
                       models_dir=out / "models" if (out is not None and save_models) else None,
                       reference=reference, progress=progress, usability=usability, targets=target_names)
    _finish(doc, mem, command or _call("robustness", dict(
        model=model, key=key, grid=grid if not isinstance(grid, Grid) else "<Grid>", data=data, labels=labels,
        preprocess=str(preprocess) if preprocess is not None else None,
        samples=samples if samples != 2000 else None, accuracy=None if accuracy else False, seed=seed or None,
        output_dir=output_dir, min_top1_agreement=min_top1_agreement, max_accuracy_drop=max_accuracy_drop,
        targets=target_names if target_names != ["native"] else None)))
    result = RobustnessResult(doc)
    if mlflow:
        from wmaudit.tracking import log_result

        log_result(result, mlflow, experiment=mlflow_experiment)
    if out is not None:
        result.save(out / "results.json")
    return result


def _preprocess(preprocess: Any) -> Any:
    from auditor.data.inputs import Preprocess, parse_preprocess

    if preprocess is None or isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        return parse_preprocess(preprocess)
    raise AuditError(f"preprocess: expected a Preprocess or its text form, got {type(preprocess).__name__}")


# ---------------------------------------------------------------- gate
def gate(model: ModelLike, key: KeyLike, policy: PathLike, *, manifest: PathLike | dict[str, Any] | None = None,
         reference: PathLike | None = None, data: str | None = None, labels: PathLike | None = None,
         preprocess: Any = None, samples: int | None = None, seed: int | None = None,
         output: PathLike | None = None, junit: PathLike | None = None, mlflow: str | None = None,
         mlflow_experiment: str = "wmaudit", progress: Any = None, command: str | None = None,
         targets: list[str] | None = None) -> GateResult:
    """Hold ``model`` to the release ``policy`` (TOML): every attack it names, every threshold
    (``wmaudit gate``). ``data`` / ``labels`` / ``samples`` / ``seed`` replace the policy's
    [data] and [accuracy] settings; ``preprocess`` (text) replaces the policy's preprocessing, a
    ``Preprocess`` object overrides the fields it sets. ``output`` / ``junit``: also write the
    result JSON / JUnit XML there. ``mlflow``: a tracking URI to log the run to. ``targets``: run
    the attacked models on these targets too (added to the policy's, never replacing them)."""
    from auditor.gate.gate import gate_document
    from auditor.gate.policy import load_policy
    from auditor.marks.manifest import default_manifest

    pol = load_policy(Path(policy))  # a malformed policy is reported before any model work starts
    pol = _with_data(pol, data=data, labels=labels, preprocess=preprocess, samples=samples, seed=seed)
    if targets:
        from auditor.backends.targets import resolve

        have = {resolve(t).name for t in pol.backends}
        extra = tuple(dict.fromkeys(resolve(t).name for t in targets if resolve(t).name not in have))
        pol = dataclasses.replace(pol, backends=pol.backends + extra)
    k = _key(key)
    ref = _existing(reference, "reference model")
    with _model_file(model) as (path, mem):
        man = _manifest(manifest) if manifest is not None else (None if mem else default_manifest(path))
        doc = gate_document(path, k, pol, policy_path=Path(policy), manifest=man, progress=progress,
                            reference=ref, preprocess=_gate_preprocess(pol, preprocess))
    _finish(doc, mem, command or _call("gate", dict(
        model=model, key=key, policy=policy, reference=reference, data=data, labels=labels,
        preprocess=str(preprocess) if preprocess is not None else None, samples=samples, seed=seed)))
    result = GateResult(doc)
    if mlflow:
        from wmaudit.tracking import log_result

        log_result(result, mlflow, experiment=mlflow_experiment)
    if output is not None:
        result.save(output)
    if junit is not None:
        from auditor.report import junit as _junit

        _write_text(Path(junit), _junit.render(result.document))
    return result


def _with_data(policy: Any, *, data: str | None, labels: PathLike | None, preprocess: Any, samples: int | None,
               seed: int | None) -> Any:
    """The policy with the caller's data settings in place of its [data] table."""
    kw: dict[str, Any] = {}
    if data:
        kw["data_source"] = data
        kw["calibration_data"] = None
    if labels:
        kw["data_labels"] = str(labels)
    if isinstance(preprocess, str) and preprocess:
        kw["data_preprocess"] = preprocess
    if samples is not None:
        if not isinstance(samples, int) or samples < 1:
            raise AuditError("samples must be >= 1")
        kw["accuracy_samples"] = samples
    if seed is not None:
        kw["accuracy_seed"] = kw["calibration_seed"] = seed
    return dataclasses.replace(policy, **kw) if kw else policy


def _gate_preprocess(policy: Any, preprocess: Any) -> Any:
    """Text replaces the policy's preprocessing; a Preprocess object overrides the fields it sets."""
    from auditor.data.inputs import Preprocess, parse_preprocess

    if isinstance(preprocess, str):
        return parse_preprocess(preprocess)
    base = parse_preprocess(policy.data_preprocess) if policy.data_preprocess else Preprocess()
    if preprocess is None:
        return base
    if not isinstance(preprocess, Preprocess):
        raise AuditError(f"preprocess: expected a Preprocess or its text form, got {type(preprocess).__name__}")
    changed = {f.name: getattr(preprocess, f.name) for f in dataclasses.fields(preprocess)
               if getattr(preprocess, f.name) != f.default}
    return dataclasses.replace(base, **changed)


def _write_text(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


# ---------------------------------------------------------------- scan, provenance, query, sweep
def scan(model: ModelLike, keys: KeyLike | Sequence[KeyLike] | None = None, *, keys_dir: PathLike | None = None,
         references: Sequence[PathLike] = (), alpha: float = DEFAULT_ALPHA,
         command: str | None = None) -> ScanResult:
    """Every white-box mark of every key searched for in ``model``, undoing renames, permutations,
    scalings and BN folding, the p-value corrected for everything tried (``wmaudit scan``)."""
    from auditor.forensics.scan import scan as _scan

    _alpha(alpha)
    ks = _keys(keys, keys_dir)
    refs = [str(_existing(r, "reference model")) for r in references]
    with _model_file(model) as (path, mem):
        body = _scan(path, ks, references=tuple(refs), alpha=alpha)
        doc = _results.envelope("scan", model_path=path, key_commitments=[k.commitment for k in ks],
                                references=[{"path": r, "sha256": _results.file_sha256(r)} for r in refs],
                                result=body)
    return ScanResult(_finish(doc, mem, command or _call("scan", dict(
        model=model, keys=keys, keys_dir=keys_dir, references=list(references) or None,
        alpha=alpha if alpha != DEFAULT_ALPHA else None))))


def provenance(model: ModelLike, reference: ModelLike, *, null_models: Sequence[PathLike] = (),
               method: str = "weights", alpha: float | None = None, rho0: float | None = None,
               all_layers: bool = False, probes: str | None = None, layer: str | None = None,
               suspect_layer: str | None = None, threshold: float | None = None,
               command: str | None = None) -> ProvenanceResult:
    """Is ``model`` derived from ``reference``? ``method="weights"`` aligns layers and tests row
    correlations against ``rho0`` (combined p below ``alpha``); ``method="phash"`` compares the
    behaviour of both models on ``probes`` (``wmaudit provenance``)."""
    from auditor.forensics import provenance as _prov
    from auditor.forensics import provenance_phash as _pp

    nulls = [str(_existing(n, "model")) for n in null_models]
    if method not in ("weights", "phash"):
        raise AuditError(f"method must be weights or phash, got {method!r}")
    if method == "phash":
        given = [o for o, v in (("all_layers", all_layers), ("alpha", alpha is not None), ("rho0", rho0 is not None))
                 if v]
        if given:
            raise AuditError(f"{', '.join(given)}: only with method weights")
        if not probes:
            raise AuditError("method phash needs probes (the probe inputs both models are run on)")
    else:
        given = [o for o, v in (("probes", probes), ("layer", layer), ("suspect_layer", suspect_layer),
                                ("threshold", threshold)) if v is not None]
        if given:
            raise AuditError(f"{', '.join(given)}: only with method phash")
        a = _prov.DEFAULT_ALPHA if alpha is None else alpha
        _alpha(a)
        r0 = _prov.RHO0 if rho0 is None else rho0
        if not 0.0 <= r0 < 1.0:
            raise AuditError("rho0 must be in [0, 1)")
    with _model_file(model) as (path, mem), _model_file(reference, "reference model") as (ref, ref_mem):
        if method == "phash":
            thr = _pp.DEFAULT_THRESHOLD if threshold is None else threshold
            body = _pp.provenance(path, ref, probes, layer=layer, suspect_layer=suspect_layer,
                                  null_models=tuple(nulls), threshold=thr)
        else:
            body = {"method": "weights", **_prov.provenance(path, ref, null_models=tuple(nulls), alpha=a, rho0=r0,
                                                            all_layers=all_layers)}
        rec = {"path": IN_MEMORY if ref_mem else str(ref), "sha256": _results.file_sha256(ref)}
        doc = _results.envelope("provenance", model_path=path, reference=rec, result=body)
    return ProvenanceResult(_finish(doc, mem, command or _call("provenance", dict(
        model=model, reference=reference, null_models=list(null_models) or None,
        method=method if method != "weights" else None, alpha=alpha, rho0=rho0, all_layers=all_layers or None,
        probes=probes, layer=layer, suspect_layer=suspect_layer, threshold=threshold))))


def query(model: ModelLike, key: PathLike, *, backend: str = "ort-cpu", references: Sequence[PathLike] = (),
          attack: str | None = None, attack_seed: int = 0, batch_size: int = 64, permutations: int = 10_000,
          seed: int = 0, alpha: float = DEFAULT_ALPHA, logo_out: PathLike | None = None,
          command: str | None = None, targets: Sequence[str] | None = None) -> QueryResult:
    """Black-box verification: the key's trigger set and / or logo test run on ``backend``, or on
    every target of ``targets`` (``wmaudit query``: detected only where detected on all); ``attack``
    processes the key images first (e.g. ``jpeg:50``)."""
    from auditor.backends.targets import resolve
    from auditor.marks.query import query_model

    _alpha(alpha)
    names = [resolve(t).name for t in (targets or [backend])]
    if not isinstance(key, (str, os.PathLike)):
        raise AuditError("query: key must be a path (its trigger and logo images sit beside it)")
    with _model_file(model) as (path, mem):
        doc = query_model(str(path), str(key), targets=names, references=[str(r) for r in references],
                          attack=attack, attack_seed=attack_seed, batch_size=batch_size, n_perm=permutations,
                          seed=seed, alpha=alpha, logo_out=str(logo_out) if logo_out else None)
    return QueryResult(_finish(doc, mem, command or _call("query", dict(
        model=model, key=key, targets=names if names != ["native"] else None,
        references=list(references) or None, attack=attack, seed=seed or None,
        alpha=alpha if alpha != DEFAULT_ALPHA else None))))


def sweep(corpus: PathLike, keys: KeyLike | Sequence[KeyLike] | None, output: PathLike, *,
          keys_dir: PathLike | None = None, executor: str = "local", jobs: int | None = None,
          address: str | None = None, resume: bool = False, alpha: float = DEFAULT_ALPHA,
          timeout: float | None = None, memory_mb: int | None = None, policy: PathLike | None = None,
          progress: Any = None, command: str | None = None) -> SweepResult:
    """Every ONNX file of ``corpus`` (a folder, glob or list file) audited against every key, each
    file in its own process with limits (``wmaudit sweep``); one JSON line per (file, key) in
    ``output``, the summary returned (and written beside it)."""
    from auditor.forensics.sweep import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, Limits, load_sweep_keys
    from auditor.forensics.sweep import sweep as _sweep

    _alpha(alpha)
    if address and executor != "ray":
        raise AuditError("address needs executor ray")
    pol = None
    if policy is not None:
        from auditor.gate.policy import load_policy

        pol = load_policy(Path(policy))
    given = [keys] if isinstance(keys, (str, os.PathLike, Key)) else list(keys or [])
    ks = [k for k in given if isinstance(k, Key)] + (
        load_sweep_keys([k for k in given if not isinstance(k, Key)], keys_dir)
        if any(not isinstance(k, Key) for k in given) or keys_dir or not given else [])
    limits = Limits(timeout_s=DEFAULT_TIMEOUT_S if timeout is None else timeout,
                    memory_mb=DEFAULT_MEMORY_MB if memory_mb is None else memory_mb)
    call = command or _call("sweep", dict(corpus=corpus, keys=keys, output=output, keys_dir=keys_dir,
                                          executor=executor if executor != "local" else None, jobs=jobs,
                                          resume=resume or None, policy=policy))
    doc = _sweep(str(corpus), ks, str(output), executor=executor, jobs=jobs, address=address, resume=resume,
                 alpha=alpha, limits=limits, policy=pol, progress=progress, command=call)
    return SweepResult(doc)


__all__ = ["extract", "robustness", "gate", "scan", "provenance", "query", "sweep", "IN_MEMORY", "ModelLike",
           "KeyLike"]
