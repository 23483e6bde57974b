"""Survival grid: attack a marked model many ways, measure the mark and the task each time.

A grid is a list of configs; each config is a sequence of attack steps
(``auditor.attacks.compose`` syntax). From TOML::

    [grid]
    prune_rates = [0.0, 0.5, 0.8]          # crossed with every quantize mode
    prune_mode = "magnitude"
    quantize = ["none", "dynamic", "static-qdq-per-channel", "fp16"]
    calibration = "minmax"                  # minmax | entropy | percentile

    [[config]]                              # extra configs, any order of steps
    name = "prune then int8 QOperator"
    steps = "prune:0.8,quantize:static-qop"

Per config: the attack's params and notes, ``simulated``, every white-box
mark's BER / p (raw and corrected for the candidate tensors tried, as
``extract`` reports it) / margins / verdict (``auditor.marks.whitebox.extract``),
and, with evaluation data (``auditor.data.inputs``), fidelity against the
unattacked model on the same inputs (``auditor.data.fidelity``: top-1
agreement, cosine, SQNR) plus accuracy and its drop when the data has labels.
The mark survives a config when the verdict stays "detected".

Calibration: before the configs run, every distinct float model that a
static quantization step will see (the unattacked model, or its pruned
variants) is calibrated once per method, in parallel; the configs then read
the cached ranges (``auditor.data.calibration``). Configs run in a process pool
(workers = min(cores, configs, jobs)); results are ordered as the grid lists
them, so the JSON is identical across runs apart from ``created``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from auditor.marks import stats
from auditor.attacks import compose as compose_mod
from auditor.attacks import quantize as quantize_mod
from auditor.errors import AuditError
from auditor.progress import Progress
# manifest.json beside the model, under the name the grid's callers use
from auditor.marks.manifest import manifest_beside as load_manifest  # noqa: F401

DEFAULT_PRUNE_RATES = (0.0, 0.5, 0.8, 0.9)
DEFAULT_QUANTIZE = ("none", "dynamic", "static-qdq", "static-qdq-per-channel", "static-qop", "fp16")


@dataclass(frozen=True)
class Config:
    name: str
    steps: str  # compose syntax; "" = the unattacked model


@dataclass(frozen=True)
class Grid:
    configs: tuple[Config, ...]
    calibration: str = "minmax"
    prune_seed: int = 0

    def describe(self) -> dict:
        return {"calibration": self.calibration, "prune_seed": self.prune_seed,
                "configs": [{"name": c.name, "steps": c.steps} for c in self.configs]}


def _cross(rates, mode: str, quants) -> list[Config]:
    out = []
    for q in quants:
        if q != "none" and q not in quantize_mod.MODES and q not in ("fp16", "int4"):
            raise AuditError(f"grid: unknown quantization {q!r}")
        for r in rates:
            steps = []
            if float(r) > 0:
                steps.append(f"prune:{float(r):g}:{mode}")
            if q in ("fp16", "int4"):
                steps.append(q)
            elif q != "none":
                steps.append(f"quantize:{q}")
            if steps:
                out.append(Config(",".join(steps), ",".join(steps)))
    return out


MAX_CONFIGS = 256  # a grid is run in one go; larger sweeps are several grids


def default_grid() -> Grid:
    """Pruning rates x quantization modes x fp16 (the unattacked model is the baseline)."""
    return Grid(tuple(_cross(DEFAULT_PRUNE_RATES, "magnitude", DEFAULT_QUANTIZE)))


_GRID_KEYS = {"prune_rates", "prune_mode", "prune_seed", "quantize", "calibration"}


def grid_from_dict(doc: dict, where: str = "grid") -> Grid:
    # unknown fields are errors: a typo must not silently shrink the grid
    unknown = sorted(set(doc) - {"grid", "config"})
    if unknown:
        raise AuditError(f"{where}: unknown field {unknown[0]!r} (expected [grid] and [[config]])")
    g = doc.get("grid", {})
    if not isinstance(g, dict):
        raise AuditError(f"{where}: [grid] must be a table")
    unknown = sorted(set(g) - _GRID_KEYS)
    if unknown:
        raise AuditError(f"{where}: unknown field grid.{unknown[0]} (expected {', '.join(sorted(_GRID_KEYS))})")
    if not isinstance(doc.get("config", []), list):
        raise AuditError(f"{where}: config must be an array of tables ([[config]])")
    configs = []
    if g:
        rates = g.get("prune_rates", [0.0])
        quants = g.get("quantize", ["none"])
        if not isinstance(rates, list) or not isinstance(quants, list):
            raise AuditError(f"{where}: prune_rates and quantize must be lists")
        for r in rates:
            if not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise AuditError(f"{where}: pruning rate {r!r} is not in [0, 1)")
        configs += _cross(rates, g.get("prune_mode", "magnitude"), quants)
    for i, c in enumerate(doc.get("config", [])):
        if not isinstance(c, dict) or "steps" not in c:
            raise AuditError(f"{where}: [[config]] #{i + 1} needs steps = \"...\"")
        if set(c) - {"name", "steps"} or not isinstance(c["steps"], str):
            raise AuditError(f"{where}: [[config]] #{i + 1} takes name and steps (a string) only")
        compose_mod.parse_steps(c["steps"])  # validate now, not inside a worker
        configs.append(Config(str(c.get("name", c["steps"])), str(c["steps"])))
    for c in configs:
        compose_mod.parse_steps(c.steps)
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AuditError(f"{where}: duplicate config name {dup[0]!r}")
    if not configs:
        raise AuditError(f"{where}: no configs")
    if len(configs) > MAX_CONFIGS:
        raise AuditError(f"{where}: {len(configs)} configs, more than {MAX_CONFIGS}; split the grid")
    method = g.get("calibration", "minmax")
    from auditor.data.calibration import METHODS

    if method not in METHODS:
        raise AuditError(f"{where}: calibration must be one of {', '.join(METHODS)}")
    seed = g.get("prune_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise AuditError(f"{where}: prune_seed must be an integer in [0, 2^63), got {seed!r}")
    return Grid(tuple(configs), method, seed)


def load_grid(path: str | os.PathLike) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"grid file not found: {path}")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AuditError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise AuditError(f"{path}: not valid TOML: nested too deep") from None
    return grid_from_dict(doc, str(path))


# ---------------------------------------------------------------- one config
_STATE: dict[str, Any] = {}


def _init_worker(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)
    from auditor.attacks import load_model

    _STATE["model"] = load_model(state["model_path"])


def _static_prefix(steps: str) -> tuple[str, bool] | None:
    """Steps before the first static quantization, or None when the config has none."""
    parsed = compose_mod.parse_steps(steps) if steps else []
    for i, s in enumerate(parsed):
        if s.kind == "quantize" and s.args[0] in quantize_mod.STATIC_MODES:
            return ",".join(str(p) for p in parsed[:i]), True
    return None


def _calibrate(prefix: str) -> str:
    """Calibrate the float model a static step will see (runs in a worker)."""
    m = _STATE["model"]
    if prefix:
        m = compose_mod.compose(m, prefix, _STATE["calibration"], prune_seed=_STATE["prune_seed"]).model
    pre, _ = quantize_mod.preprocess(m)
    return str(_STATE["calibration"].ranges(pre, _STATE["method"]))


def corrected_log10_p(mk) -> float:
    """log10 of the p-value corrected for the candidate tensors tried (what extract reports)."""
    import math

    m = mk.location.candidates if mk.location else 1
    return min(0.0, mk.log10_p + math.log10(max(1, m)))


def measure(path: str | os.PathLike, key, manifest: dict | None, evaluation, threads: int = 0,
            baseline_outputs: dict | None = None, anchors: dict | None = None, targets=("native",)) -> dict:
    """White-box marks of one model file and, with evaluation data, what the task lost on each
    target: accuracy (labelled data) and fidelity against ``baseline_outputs`` ({target: outputs of
    the unattacked model on that target}). The first target's measures are the row's top level;
    every target's are under ``targets``; ``_hardware`` holds each target's hardware record.
    ``anchors``: BN anchors per mark id (``auditor.marks.whitebox.resolve_anchors``)."""
    from auditor.marks import whitebox

    res = whitebox.extract(path, key, manifest=manifest, anchors=anchors)
    marks = []
    for mk in res.marks:
        # per-bit values (bits, signed margins) stay out: they give the key away
        marks.append({"id": mk.id, "n_bits": mk.n_bits, "matches": mk.matches, "ber": mk.ber,
                      "p_value": mk.p_value, "log10_p": mk.log10_p, "p_corrected": mk.p_corrected,
                      "log10_p_corrected": corrected_log10_p(mk),
                      "candidates": mk.location.candidates if mk.location else 0,
                      "margin_min": mk.margin_min,
                      "margin_median": mk.margin_median, "signed_margin_min": mk.signed_margin_min,
                      "normalized_margin_min": mk.normalized_margin_min,
                      "normalized_margin_median": mk.normalized_margin_median,
                      "margin_histogram": mk.margin_histogram, "verdict": mk.verdict,
                      "weight": mk.location.weight if mk.location else None,
                      "located_by": mk.location.how if mk.location else None,
                      "quant": mk.location.quant if mk.location else None,
                      "batchnorm": mk.batchnorm.get("status") if mk.batchnorm else None,
                      "notes": list(mk.notes),
                      "evidence": {"kind": mk.evidence.get("kind")},
                      "null": {"kind": mk.null.get("kind"), "reason": mk.null.get("reason")}})
    out = {"verdict": res.verdict, "p_value": res.p_value, "marks": marks}
    if evaluation is not None:
        per: dict[str, dict] = {}
        hardware: dict[str, dict] = {}
        raw: dict[str, dict] = {}
        for t in targets:
            outs, hardware[t] = evaluate_outputs(path, evaluation, threads, target=t)
            d: dict = {}
            if evaluation.labels is not None:
                from auditor.data.accuracy import accuracy_of

                d["accuracy"] = accuracy_of(next(iter(outs.values())), evaluation.labels)
            if baseline_outputs is not None:
                from auditor.data.fidelity import compare

                d["fidelity"] = compare(baseline_outputs[t], outs)
            else:
                raw[t] = outs
            per[t] = d
        out.update(per[targets[0]])
        if len(targets) > 1:
            out["targets"] = per
        out["_hardware"] = hardware
        if baseline_outputs is None:
            out["_outputs"] = raw
    return out


def evaluate_outputs(path, evaluation, threads: int = 0, target: str = "native") -> tuple[dict, dict]:
    """(every output of the model on the evaluation data, the hardware record) on ``target``."""
    from auditor.data.accuracy import outputs

    return outputs(path, evaluation, threads, backend=target, with_hardware=True)


def _run_config(cfg: Config) -> dict:
    t0 = time.perf_counter()
    r = compose_mod.compose(_STATE["model"], cfg.steps, _STATE["calibration"],
                            calibration_method=_STATE["method"], prune_seed=_STATE["prune_seed"])
    models_dir = _STATE.get("models_dir")
    with tempfile.TemporaryDirectory(prefix="wmaudit-grid-") as d:
        path = Path(d) / "model.onnx"
        onnx.save_model(r.model, str(path))
        m = measure(path, _STATE["key"], _STATE["manifest"], _STATE["evaluation"], _STATE["threads"],
                    _STATE.get("baseline_outputs"), _STATE.get("anchors"), _STATE.get("targets", ("native",)))
        m.pop("_hardware", None)
        if models_dir:
            dst = Path(models_dir) / f"{_safe(cfg.name)}.onnx"
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            onnx.save_model(r.model, str(tmp))
            os.replace(tmp, dst)
    return {"name": cfg.name, "steps": cfg.steps, "params": r.params, "notes": r.notes,
            "simulated": r.simulated, **m, "_seconds": time.perf_counter() - t0}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------- the grid
def run_grid(model_path: str | os.PathLike, key, grid: Grid, calibration=None, evaluation=None,
             manifest: dict | None = None, jobs: int | None = None, models_dir: str | os.PathLike | None = None,
             progress: bool = True, command: str | None = None, reference: str | os.PathLike | None = None,
             usability=None, targets=("native",)) -> dict:
    """Run every config of ``grid`` on the model; returns the result document (envelope 'robustness').

    Survival is counted on the configs that left the model usable (``usability``: an
    ``auditor.gate.usability.Usability``, default bounds when None); the others are listed.

    BatchNorm folding is undone in every attacked copy with the owner's ``reference``
    (BN kept), else the key's anchors, else the unattacked model where a BN still
    follows the marked conv (``auditor.marks.whitebox.resolve_anchors``).

    ``targets``: where the task is measured (``auditor.backends.targets``); every row holds
    each target's accuracy and fidelity (against the unattacked model on that target), and
    the document the attack x target matrix and the hardware record of every target."""
    from auditor.marks.whitebox import resolve_anchors
    from auditor.results import envelope

    model_path = Path(model_path)
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, len(grid.configs), jobs or cores))
    threads = 1 if workers > 1 else 0
    from auditor.backends import targets as targets_mod

    targets = tuple(dict.fromkeys(t.name for t in targets_mod.check_available(targets)))
    if evaluation is None and targets != ("native",):
        raise AuditError("--target measures the task on each target: it needs evaluation data "
                         "(drop --no-accuracy)")
    state = {"model_path": str(model_path), "key": key, "manifest": manifest, "evaluation": evaluation,
             "targets": targets,
             "calibration": calibration, "method": grid.calibration, "prune_seed": grid.prune_seed,
             "threads": threads, "models_dir": str(models_dir) if models_dir else None,
             "anchors": resolve_anchors(key, reference, unattacked=model_path)}
    if models_dir:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
    _init_worker(state)
    baseline = measure(model_path, key, manifest, evaluation, anchors=state["anchors"], targets=targets)
    state["baseline_outputs"] = _STATE["baseline_outputs"] = baseline.pop("_outputs", None)
    hardware_seen = baseline.pop("_hardware", None)
    prefixes = sorted({p[0] for c in grid.configs if (p := _static_prefix(c.steps)) is not None})
    if prefixes and calibration is None:
        raise AuditError("the grid has static quantization configs but no calibration data was given")
    # a bar for a person watching (off when stderr is not a terminal, or when progress=False)
    bar = Progress(len(grid.configs), "robustness", enabled=None if progress else False)
    rows: dict[str, dict] = {}
    if workers == 1:
        for p in prefixes:
            _calibrate(p)
        for c in grid.configs:
            rows[c.name] = _run_config(c)
            bar.step(f"{c.name} ({rows[c.name]['_seconds']:.1f}s)")
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding onnxruntime threads
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(state,)) as ex:
            list(ex.map(_calibrate, prefixes))
            futs = {ex.submit(_run_config, c): c for c in grid.configs}
            for f in cf.as_completed(futs):
                c = futs[f]
                rows[c.name] = f.result()
                bar.step(f"{c.name} ({rows[c.name]['_seconds']:.1f}s)")
    bar.close()
    seconds = time.perf_counter() - t0
    configs = []
    base_acc = baseline.get("accuracy")
    for c in grid.configs:  # grid order, whatever order the workers finished in
        row = dict(rows[c.name])
        row.pop("_seconds")
        if base_acc is not None:
            row["accuracy_drop"] = base_acc - row["accuracy"]
            for t, d in (row.get("targets") or {}).items():
                d["accuracy_drop"] = baseline["targets"][t]["accuracy"] - d["accuracy"]
        row["survived"] = row["verdict"] == stats.DETECTED
        configs.append(row)
    # a config whose mark could not be read neither survived nor broke it: listed apart
    unread = [r["name"] for r in configs if r["verdict"] == stats.UNREADABLE]
    broken = [r["name"] for r in configs if not r["survived"] and r["name"] not in unread]
    summary = {"configs": len(configs), "survived": len(configs) - len(broken) - len(unread), "broken": broken,
               "calibrated_models": len(prefixes),
               "baseline_detected": baseline["verdict"] == stats.DETECTED,
               "all_survived": not broken and baseline["verdict"] == stats.DETECTED}
    from auditor.gate.usability import judge_grid

    summary = judge_grid(configs, summary["baseline_detected"], summary, usability)
    if unread:  # recorded only when a mark could not be read: neither lost nor kept
        summary["unreadable"] = unread
        summary["broken"] = [n for n in summary["broken"] if n not in unread]
        summary["all_survived"] = False
    if progress:
        print(f"robustness: {len(configs)} configs in {seconds:.1f}s with {workers} workers; "
              f"calibrations: {len(prefixes)}", file=sys.stderr)
    data: dict = {}
    if prefixes:  # recorded only when a static mode actually calibrated
        data["calibration"] = calibration.data.describe()
    if evaluation is not None:
        data["evaluation"] = dict(evaluation.describe(), measures=(["accuracy"] if evaluation.labels is not None
                                                                   else []) + ["fidelity"])
    from auditor.backends import hardware as hardware_mod
    from auditor.gate.targets import fidelity_gaps, matrix

    extra: dict = {"targets": list(targets)}
    if evaluation is not None:
        extra["matrix"] = matrix(configs, targets)
        extra["hardware"] = hardware_mod.combine(hardware_seen or {})
        gaps = fidelity_gaps([(r["name"], r["steps"], r.get("targets") or {targets[0]: r}) for r in configs],
                             hardware_seen or {})
        if gaps:
            extra["hardware_notes"] = gaps
    return envelope("robustness", model_path=model_path, key=key, command=command,
                    grid=grid.describe(), **data, **extra,
                    reference=({"path": str(reference), "sha256": _sha(reference)} if reference else None),
                    baseline=baseline, configs=configs, summary=summary,
                    verdict="survived" if summary["all_survived"] else "broken")


def _sha(path) -> str:
    from auditor.results import file_sha256

    return file_sha256(path)
