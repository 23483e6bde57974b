"""A sequence of attacks in the order asked: ``prune:0.8,quantize:static-qdq-per-channel``.

Step syntax (comma separated, applied left to right):

* ``prune:RATE`` or ``prune:RATE:MODE`` (MODE one of prune.MODES, default magnitude)
* ``quantize:MODE`` (quantize.MODES) -- static modes use the shared calibration;
  ``quantize:MODE:reduce-range`` (7-bit weights) and ``quantize:MODE:uint8-weights`` (QUInt8
  weights) are the remedies for int8 on x86 CPUs without VNNI
* ``fp16``, ``int4``
* ``simulate`` or ``simulate:per-tensor`` / ``simulate:per-channel`` (GRU/RNN int8 round-trip)
* ``obfuscate:STEPS`` with STEPS joined by ``+`` (``obfuscate:perm-in+perm-out+split:4``):
  function-preserving obfuscation (auditor.attacks.obfuscate), on the layer given by the
  option ``obfuscate_layer`` (default: every traceable layer), seeded by ``obfuscate_seed``
* ``ort-optimize:basic|extended|all``, ``ort-format`` (``ort-format:LEVEL``), ``transformers-optimize``
  (``transformers-optimize:fp16``), ``simplify`` (``simplify:onnxsim``): the files onnxruntime and its
  tools write for deployment (auditor.attacks.runtime)
* ``prune-filters:K``: structured pruning that removes the K filters of smallest L1 norm
  (with their BatchNorm entries and next-layer columns) from ``obfuscate_layer`` or every layer

Options that apply to a kind of step (``calibration`` method, ``reduce_range``,
``weight_type``, ``prune_seed``, ...) are passed as keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from auditor.errors import AuditError
from auditor.attacks import AttackResult, obfuscate, precision, prune, quantize, runtime, simulate


# ``quantize:MODE:QUALIFIER``: the remedies for int8 on CPUs without VNNI, where onnxruntime's u8s8
# kernels can saturate their 16-bit intermediate sums (7-bit weights, or unsigned 8-bit weights).
QUANTIZE_QUALIFIERS: dict[str, dict[str, Any]] = {"reduce-range": {"reduce_range": True},
                                                  "uint8-weights": {"weight_type": "uint8"}}


@dataclass(frozen=True)
class Step:
    kind: str  # prune | prune-filters | quantize | fp16 | int4 | simulate | obfuscate | ort-optimize | ...
    args: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ":".join((self.kind, *self.args))


def parse_steps(spec: str) -> list[Step]:
    """Parse ``prune:0.8,quantize:dynamic`` into steps (AuditError on bad syntax)."""
    steps = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        kind, *args = part.split(":")
        if kind == "prune-filters":
            if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
                raise AuditError(f"step {part!r}: expected prune-filters:K with K a positive integer")
        elif kind == "obfuscate":
            if not args:
                raise AuditError(f"step {part!r}: expected obfuscate:STEP[+STEP...]")
            args = [":".join(args)]
            obfuscate.parse(args[0])
        elif kind == "prune":
            if len(args) not in (1, 2):
                raise AuditError(f"step {part!r}: expected prune:RATE[:MODE]")
            try:
                rate = float(args[0])
            except ValueError:
                raise AuditError(f"step {part!r}: pruning rate {args[0]!r} is not a number") from None
            if not 0 <= rate < 1:  # checked with the syntax: a grid or policy fails before anything runs
                raise AuditError(f"step {part!r}: pruning rate must be in [0, 1), got {args[0]}")
            if len(args) == 2 and args[1] not in prune.MODES:
                raise AuditError(f"step {part!r}: pruning mode must be one of {', '.join(prune.MODES)}")
        elif kind == "quantize":
            if len(args) not in (1, 2) or args[0] not in quantize.MODES:
                raise AuditError(f"step {part!r}: expected quantize:MODE[:QUALIFIER] with MODE one of "
                                 f"{', '.join(quantize.MODES)}")
            if len(args) == 2 and args[1] not in QUANTIZE_QUALIFIERS:
                raise AuditError(f"step {part!r}: the qualifier must be one of {', '.join(QUANTIZE_QUALIFIERS)}")
        elif kind in ("fp16", "int4"):
            if args:
                raise AuditError(f"step {part!r}: {kind} takes no arguments")
        elif kind == "ort-optimize":
            if len(args) != 1 or args[0] not in runtime.LEVELS:
                raise AuditError(f"step {part!r}: expected ort-optimize:LEVEL with LEVEL one of {', '.join(runtime.LEVELS)}")
        elif kind == "ort-format":
            if len(args) > 1 or (args and args[0] not in runtime.LEVELS):
                raise AuditError(f"step {part!r}: expected ort-format[:LEVEL] with LEVEL one of {', '.join(runtime.LEVELS)}")
        elif kind == "transformers-optimize":
            if len(args) > 1 or (args and args[0] not in runtime.TRANSFORMER_MODES):
                raise AuditError(f"step {part!r}: expected transformers-optimize[:fp16]")
        elif kind == "simplify":
            if len(args) > 1 or (args and args[0] not in runtime.SIMPLIFIERS):
                raise AuditError(f"step {part!r}: expected simplify[:{'|'.join(runtime.SIMPLIFIERS)}]")
        elif kind == "simulate":
            if len(args) > 1 or (args and args[0] not in simulate.GRANULARITIES):
                raise AuditError(f"step {part!r}: expected simulate[:per-tensor|per-channel]")
        else:
            raise AuditError(f"unknown attack step {part!r} (prune, prune-filters, quantize, fp16, int4, simulate, "
                            f"obfuscate, ort-optimize, ort-format, transformers-optimize, simplify)")
        steps.append(Step(kind, tuple(args)))
    if not steps:
        raise AuditError("no attack steps given")
    return steps


def apply_step(model: onnx.ModelProto, step: Step, calibration=None, **options: Any) -> AttackResult:
    """One step on a copy of ``model``."""
    if step.kind == "prune":
        mode = step.args[1] if len(step.args) > 1 else options.get("prune_mode", "magnitude")
        return prune.prune(model, float(step.args[0]), mode=mode, seed=options.get("prune_seed", 0))
    if step.kind == "quantize":
        mode = step.args[0]
        kw = {k: options[k] for k in ("reduce_range", "weight_type", "pre_process", "keep_batchnorm")
              if k in options}
        if len(step.args) > 1:  # the step's own qualifier wins over the options
            kw.update(QUANTIZE_QUALIFIERS[step.args[1]])
        if mode in quantize.STATIC_MODES:
            kw.update({k: options[k] for k in ("activation_type",) if k in options})
            kw["method"] = options.get("calibration_method", "minmax")
        return quantize.quantize(model, mode, calibration, **kw)
    if step.kind == "fp16":
        return precision.to_fp16(model)
    if step.kind == "int4":
        return precision.to_int4(model)
    if step.kind == "prune-filters":
        return obfuscate.remove_filters(model, int(step.args[0]), layer=options.get("obfuscate_layer"))
    if step.kind == "obfuscate":
        return obfuscate.obfuscate(model, step.args[0], layer=options.get("obfuscate_layer"),
                                   seed=options.get("obfuscate_seed", 0))
    if step.kind == "ort-optimize":
        return runtime.ort_optimize(model, step.args[0])
    if step.kind == "ort-format":
        return runtime.ort_format(model, step.args[0] if step.args else "basic")
    if step.kind == "transformers-optimize":
        return runtime.transformers_optimize(model, step.args[0] if step.args else None)
    if step.kind == "simplify":
        return runtime.simplify(model, step.args[0] if step.args else "onnxslim")
    if step.kind == "simulate":
        return simulate.simulate_int8(model, granularity=step.args[0] if step.args else "per-channel")
    raise AuditError(f"unknown attack step {step}")  # parse_steps prevents this


def compose(model: onnx.ModelProto, steps: str | list[Step], calibration=None, **options: Any) -> AttackResult:
    """Apply ``steps`` in order; params hold each step's params, notes are prefixed by the step."""
    if isinstance(steps, str):
        steps = parse_steps(steps)
    current, params, notes, simulated = model, [], [], False
    for step in steps:
        r = apply_step(current, step, calibration, **options)
        current = r.model
        params.append({"step": str(step), **r.params})
        notes.extend(f"{step}: {n}" for n in r.notes)
        simulated = simulated or r.simulated
    if current is model:  # no step ran (cannot happen after parse_steps); never hand back the input
        current = onnx.ModelProto()
        current.CopyFrom(model)
    return AttackResult(current, {"steps": params, "order": [str(s) for s in steps]}, notes, simulated)
