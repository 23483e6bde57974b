"""Release policy (``wmaudit-policy/1``): what a model must survive before it ships.

A policy is a TOML file (read with tomllib) naming

* the attacks the watermark must survive (``[[attacks]]``: an id and
  ``steps`` in the syntax of ``auditor.attacks.compose``, e.g.
  ``"prune:0.5,quantize:static-qdq-per-channel"``, plus ``options`` such as
  ``calibration_method``);
* the targets the attacked models must run on (``targets``: ``native``, the
  emulated CPUs ``x86-64-v3``, ``x86-64-v2``, ``aarch64``, the GPU targets
  ``ort-cuda``, ``ort-trt``, ``tensorrt``; see ``auditor.backends.targets``;
  ``backends`` is the old name of this field and ``ort-cpu`` of ``native``),
  with thresholds per target where one target's arithmetic deserves its own
  (``[target_thresholds.NAME]``);
* the thresholds every piece of evidence must meet (``[thresholds]``:
  ``max_p_value``, ``min_margin``, ``min_normalized_margin`` (scale-free), ``max_ber``,
  ``max_accuracy_drop`` in percentage points (needs labels), ``min_top1_agreement`` and
  ``min_sqnr_db`` (fidelity against the unattacked model, no labels
  needed)), optionally tightened or relaxed per attack;
* the evidence required (``[evidence]``: white-box marks, trigger set /
  logo, task accuracy / fidelity);
* the data the model runs on (``[data]``: source, labels, preprocess, as
  ``--data`` / ``--labels`` / ``--preprocess`` take them; paths relative to the
  policy file; the command line overrides them), how many examples measure
  the task (``[accuracy]``: samples, seed) and calibrate static quantization
  (``[calibration]``: samples, seed, and optionally its own data).

``load_policy(path)`` validates everything before any model is touched: an
unknown field, a wrong type, a missing field, an unknown attack step, backend
or attack option is an ``AuditError`` naming the problem in one line.
See ``examples/release-policy.toml`` for a documented example.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from auditor.errors import AuditError

FORMAT = "wmaudit-policy/1"

# The names auditor.backends.targets uses (and ort-cpu, the old name of native).
from auditor.backends.targets import CHOICES as BACKENDS  # noqa: E402
WHITEBOX_MODES = ("all-marks", "any-mark", "none")
BLACKBOX_MODES = ("if-key-has", "required", "none")

# name -> (python type(s), check, description of a valid value)
_THRESHOLDS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "max_p_value": ("a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "min_margin": ("a finite number", lambda v: math.isfinite(v)),
    "min_normalized_margin": ("a number in [-1, 1]", lambda v: -1.0 <= v <= 1.0),
    "max_ber": ("a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "max_accuracy_drop": ("a number of percentage points in [0, 100]", lambda v: 0.0 <= v <= 100.0),
    "min_top1_agreement": ("a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "min_sqnr_db": ("a finite number of dB", lambda v: math.isfinite(v)),
}
# Thresholds that need the model run on data (auditor.data): accuracy needs labels, fidelity does not.
TASK_THRESHOLDS = ("max_accuracy_drop", "min_top1_agreement", "min_sqnr_db")
DEFAULT_THRESHOLDS = {"max_p_value": 1e-6}

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BASELINE_ID = "original"


# Options auditor.attacks.compose reads, with their TOML types.
ATTACK_OPTIONS: dict[str, tuple[type, ...]] = {
    "prune_mode": (str,), "prune_seed": (int,), "reduce_range": (bool,), "weight_type": (str,),
    "pre_process": (bool,), "keep_batchnorm": (bool,), "activation_type": (str,),
    "calibration_method": (str,), "obfuscate_layer": (str,), "obfuscate_seed": (int,),
}


@dataclass(frozen=True)
class AttackSpec:
    """One entry of ``[[attacks]]``: an id, compose steps, their options, threshold overrides."""

    id: str
    steps: str                      # compose syntax, "" for the unattacked model
    options: dict[str, Any]
    thresholds: dict[str, float]
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "steps": self.steps, "options": dict(sorted(self.options.items())),
                             "thresholds": dict(sorted(self.thresholds.items()))}
        if self.description:
            d["description"] = self.description
        return d


@dataclass(frozen=True)
class Policy:
    name: str
    backends: tuple[str, ...]  # the targets, as the policy names them
    thresholds: dict[str, float]
    attacks: tuple[AttackSpec, ...]
    target_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    whitebox: str = "all-marks"
    blackbox: str = "if-key-has"
    accuracy: bool = True
    accuracy_samples: int = 1000
    accuracy_seed: int = 0
    calibration_data: str | None = None
    data_source: str | None = None
    data_labels: str | None = None
    data_preprocess: str | None = None
    calibration_samples: int = 128
    calibration_seed: int = 0
    seed: int = 0
    description: str = ""
    path: str | None = field(default=None, compare=False)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.backends

    def thresholds_for(self, attack_id: str, target: str | None = None) -> dict[str, float]:
        """Global thresholds, then the target's, then the attack's overrides."""
        t = dict(self.thresholds)
        if target is not None:
            t.update(self.target_thresholds.get(target, {}))
        for a in self.attacks:
            if a.id == attack_id:
                t.update(a.thresholds)
        return t

    def to_json(self) -> dict[str, Any]:
        """The policy as applied; data, accuracy and calibration settings only where they apply
        (accuracy when the task is measured, calibration when an attack quantizes statically)."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "targets": list(self.backends),
            "seed": self.seed,
            "thresholds": dict(sorted(self.thresholds.items())),
            "evidence": {"whitebox": self.whitebox, "blackbox": self.blackbox, "accuracy": self.accuracy},
            "attacks": [a.to_json() for a in self.attacks],
        }
        if self.target_thresholds:
            d["target_thresholds"] = {k: dict(sorted(v.items())) for k, v in sorted(self.target_thresholds.items())}
        static = any("quantize:static" in a.steps for a in self.attacks)
        if self.accuracy or static:
            d["data"] = {k: v for k, v in (("source", self.data_source), ("labels", self.data_labels),
                                           ("preprocess", self.data_preprocess)) if v is not None}
        if self.accuracy:
            d["accuracy"] = {"samples": self.accuracy_samples, "seed": self.accuracy_seed}
        if static:
            d["calibration"] = {"samples": self.calibration_samples, "seed": self.calibration_seed,
                                **({"data": self.calibration_data} if self.calibration_data else {})}
        return d


# ------------------------------------------------------------------ attack steps
def check_steps(steps: str, ctx: str) -> str:
    """Validate compose step syntax (auditor.attacks.compose.parse_steps); the normalised string."""
    from auditor.attacks.compose import parse_steps

    try:
        return ",".join(str(st) for st in parse_steps(steps))
    except AuditError as e:
        raise AuditError(f"'{ctx}': {e}") from None


# ------------------------------------------------------------------ validation helpers
def _where(ctx: str, key: str) -> str:
    return f"{ctx}.{key}" if ctx else key


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "table"}.get(type(v), type(v).__name__)


def _check_keys(table: dict[str, Any], allowed: set[str], required: set[str], ctx: str) -> None:
    for k in table:
        if k not in allowed:
            raise AuditError(f"unknown field '{_where(ctx, k)}' (allowed: {', '.join(sorted(allowed))})")
    for k in sorted(required):
        if k not in table:
            raise AuditError(f"missing field '{_where(ctx, k)}'")


def _get(table: dict[str, Any], key: str, types: tuple[type, ...], ctx: str, default: Any = None) -> Any:
    if key not in table:
        return default
    v = table[key]
    # bool is an int in Python; a policy that says `seed = true` is wrong.
    if isinstance(v, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(v, types)
    if not ok:
        names = ["number"] if set(types) == {int, float} else [_type_name(t()) for t in types]
        want = " or ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names)
        raise AuditError(f"'{_where(ctx, key)}' must be {want}, got {_type_name(v)} {v!r}")
    return v


def _number(table: dict[str, Any], key: str, ctx: str) -> float:
    return float(_get(table, key, (int, float), ctx))


def _thresholds(table: Any, ctx: str) -> dict[str, float]:
    if not isinstance(table, dict):
        raise AuditError(f"'{ctx}' must be a table, got {_type_name(table)}")
    _check_keys(table, set(_THRESHOLDS), set(), ctx)
    out: dict[str, float] = {}
    for k in sorted(table):
        v = _number(table, k, ctx)
        desc, ok = _THRESHOLDS[k]
        if not ok(v):
            raise AuditError(f"'{_where(ctx, k)}' must be {desc}, got {v!r}")
        out[k] = v
    return out


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], ctx: str, default: str) -> str:
    v = _get(table, key, (str,), ctx, default)
    if v not in choices:
        raise AuditError(f"'{_where(ctx, key)}' must be one of {', '.join(choices)}, got {v!r}")
    return v


# ------------------------------------------------------------------ entry points
def parse_policy(doc: dict[str, Any], *, path: str | None = None) -> Policy:
    """Validate a parsed TOML document and return the Policy; AuditError names the first problem."""
    top = {"format", "name", "description", "targets", "backends", "seed", "thresholds", "target_thresholds",
           "evidence", "accuracy", "calibration", "attacks", "data"}
    _check_keys(doc, top, {"format", "name", "attacks"}, "")
    fmt = _get(doc, "format", (str,), "")
    if fmt != FORMAT:
        raise AuditError(f"'format' must be \"{FORMAT}\", got {fmt!r}")
    name = _get(doc, "name", (str,), "")
    if not name.strip():
        raise AuditError("'name' must not be empty")
    description = _get(doc, "description", (str,), "", "")
    seed = _get(doc, "seed", (int,), "", 0)

    if "targets" in doc and "backends" in doc:
        raise AuditError("give 'targets' or its old name 'backends', not both")
    if "targets" not in doc and "backends" not in doc:
        raise AuditError("missing field 'targets'")
    field_name = "targets" if "targets" in doc else "backends"
    backends = _get(doc, field_name, (list,), "")
    if not backends:
        raise AuditError(f"'{field_name}' must name at least one target")
    from auditor.backends.targets import resolve

    for i, b in enumerate(backends):
        if not isinstance(b, str):
            raise AuditError(f"'{field_name}[{i}]' must be a string, got {_type_name(b)} {b!r}")
        if b not in BACKENDS:
            try:
                resolve(b)
            except AuditError:
                raise AuditError(f"unknown target '{b}' in '{field_name}' (known: {', '.join(BACKENDS)}; "
                                 f"TARGET+x64quantprecision adds that session option)") from None
    if len({resolve(b).name for b in backends}) != len(backends):
        raise AuditError(f"'{field_name}' names a target twice")
    raw_tt = _get(doc, "target_thresholds", (dict,), "", {})
    target_thresholds: dict[str, dict[str, float]] = {}
    for t in raw_tt:
        if t not in backends:
            raise AuditError(f"'target_thresholds.{t}' names a target the policy does not run on "
                             f"(its targets: {', '.join(backends)})")
        target_thresholds[t] = _thresholds(raw_tt[t], f"target_thresholds.{t}")

    thresholds = dict(DEFAULT_THRESHOLDS)
    thresholds.update(_thresholds(_get(doc, "thresholds", (dict,), "", {}), "thresholds"))

    ev = _get(doc, "evidence", (dict,), "", {})
    _check_keys(ev, {"whitebox", "blackbox", "accuracy"}, set(), "evidence")
    whitebox = _choice(ev, "whitebox", WHITEBOX_MODES, "evidence", "all-marks")
    blackbox = _choice(ev, "blackbox", BLACKBOX_MODES, "evidence", "if-key-has")
    task_set = any(t in th for th in [thresholds, *target_thresholds.values()] for t in TASK_THRESHOLDS)
    accuracy = _get(ev, "accuracy", (bool,), "evidence", task_set)
    if accuracy and not task_set:
        raise AuditError("'evidence.accuracy' is true but none of 'thresholds.max_accuracy_drop', "
                         "'thresholds.min_top1_agreement', 'thresholds.min_sqnr_db' is set")

    def _rel(v: str | None, name: str) -> str | None:
        # paths are relative to the policy file, as a reader expects, and stay inside its folder (a
        # policy may come with a model from a stranger); built-in names stay as they are
        if v is None or v in ("fashion-mnist", "synthetic"):
            return v
        base = (Path(path).parent if path is not None else Path(".")).resolve()
        if "\0" in v or Path(v).is_absolute() or ".." in v.replace("\\", "/").split("/"):
            raise AuditError(f"'{name}' = {v!r} leaves the policy's folder: data a policy names must lie "
                             f"next to it (give other data with --data)")
        resolved = (base / v).resolve()
        if resolved != base and base not in resolved.parents:
            raise AuditError(f"'{name}' = {v!r} leads outside the policy's folder through a symbolic link")
        return str(base / v)

    dat = _get(doc, "data", (dict,), "", {})
    _check_keys(dat, {"source", "labels", "preprocess"}, set(), "data")
    from auditor.data.inputs import check_source_form

    data_source = _rel(_get(dat, "source", (str,), "data"), "data.source")
    if data_source is not None:
        check_source_form(data_source, "'data.source'")
    data_labels = _rel(_get(dat, "labels", (str,), "data"), "data.labels")
    data_preprocess = _get(dat, "preprocess", (str,), "data")
    if data_preprocess:
        from auditor.data.inputs import parse_preprocess

        parse_preprocess(data_preprocess)
    if whitebox == "none" and blackbox == "none":
        raise AuditError("'evidence' requires neither white-box nor black-box evidence: nothing to gate on")

    acc = _get(doc, "accuracy", (dict,), "", {})
    _check_keys(acc, {"samples", "seed"}, set(), "accuracy")
    samples = _get(acc, "samples", (int,), "accuracy", 1000)
    if not 0 < samples <= MAX_SAMPLES:
        raise AuditError(f"'accuracy.samples' must be an integer in 1..{MAX_SAMPLES}, got {samples}")
    acc_seed = _get(acc, "seed", (int,), "accuracy", 0)

    cal = _get(doc, "calibration", (dict,), "", {})
    _check_keys(cal, {"data", "samples", "seed"}, set(), "calibration")
    cal_data = _rel(_get(cal, "data", (str,), "calibration"), "calibration.data")
    if cal_data is not None:
        check_source_form(cal_data, "'calibration.data'")
    cal_samples = _get(cal, "samples", (int,), "calibration", 128)
    if not 0 < cal_samples <= MAX_SAMPLES:
        raise AuditError(f"'calibration.samples' must be an integer in 1..{MAX_SAMPLES}, got {cal_samples}")
    cal_seed = _get(cal, "seed", (int,), "calibration", 0)

    raw_attacks = _get(doc, "attacks", (list,), "")
    attacks: list[AttackSpec] = []
    seen = {BASELINE_ID}
    for i, a in enumerate(raw_attacks):
        ctx = f"attacks[{i}]"
        if not isinstance(a, dict):
            raise AuditError(f"'{ctx}' must be a table, got {_type_name(a)}")
        _check_keys(a, {"id", "steps", "options", "thresholds", "description"}, {"id", "steps"}, ctx)
        aid = _get(a, "id", (str,), ctx)
        if not _ID.match(aid):
            raise AuditError(f"'{ctx}.id' must be 1-64 letters, digits, '.', '_' or '-', got {aid!r}")
        if aid in seen:
            raise AuditError(f"'{ctx}.id' {aid!r} is used twice" if aid != BASELINE_ID
                             else f"'{ctx}.id' may not be {BASELINE_ID!r} (reserved for the unattacked model)")
        seen.add(aid)
        raw_steps = _get(a, "steps", (str, list), ctx)
        if isinstance(raw_steps, list):
            for j, st in enumerate(raw_steps):
                if not isinstance(st, str):
                    raise AuditError(f"'{ctx}.steps[{j}]' must be a string, got {_type_name(st)} {st!r}")
            raw_steps = ",".join(raw_steps)
        steps = check_steps(raw_steps, f"{ctx}.steps")
        options = _get(a, "options", (dict,), ctx, {})
        _check_keys(options, set(ATTACK_OPTIONS), set(), f"{ctx}.options")
        for k in options:
            _get(options, k, ATTACK_OPTIONS[k], f"{ctx}.options")
        over = _thresholds(_get(a, "thresholds", (dict,), ctx, {}), f"{ctx}.thresholds")
        attacks.append(AttackSpec(aid, steps, dict(options), over, _get(a, "description", (str,), ctx, "")))

    return Policy(name=name, backends=tuple(backends), thresholds=thresholds, attacks=tuple(attacks),
                  target_thresholds=target_thresholds,
                  whitebox=whitebox, blackbox=blackbox, accuracy=accuracy, accuracy_samples=samples,
                  accuracy_seed=acc_seed, calibration_data=cal_data, calibration_samples=cal_samples,
                  data_source=data_source, data_labels=data_labels, data_preprocess=data_preprocess,
                  calibration_seed=cal_seed, seed=seed, description=description, path=path)


MAX_POLICY_BYTES = 16 << 20
MAX_SAMPLES = 1_000_000  # more examples than any data set the gate reads


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy TOML file (AuditError on any problem)."""
    from auditor.read.limits import Limits, read_model_bytes

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise AuditError(f"policy file not found: {p}")
    try:  # a regular file of bounded size (a FIFO or device cannot stall the gate)
        raw = read_model_bytes(p, Limits(max_model_bytes=MAX_POLICY_BYTES), expected="a policy file (TOML)",
                               limit_name="the largest policy read")
    except AuditError as e:
        raise AuditError(f"policy: {e}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AuditError(f"policy {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"policy {p} is not valid TOML: {e}") from None
    except RecursionError:
        raise AuditError(f"policy {p} is not valid TOML: nested too deep") from None
    try:
        return parse_policy(doc, path=str(p))
    except AuditError as e:
        raise AuditError(f"policy {p}: {e}") from None
