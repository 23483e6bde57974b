"""The pre-release gate: policy -> requirements -> pass / fail with reasons.

``run_gate(model_path, key, policy)`` applies every attack the policy names
(through ``auditor.attacks``, never re-implemented here) to a copy of the
model, extracts the white-box marks from each attacked model
(``auditor.marks.whitebox``), measures task accuracy on every backend the policy
names (``auditor.data.accuracy``) and, when the key carries black-box evidence,
queries it (``auditor.marks.blackbox``). Each piece of evidence becomes one
*requirement* with its measured numbers, the thresholds it was held to, and
the reasons it failed. The gate passes when every requirement passes.

Requirement ids: ``<attack>/whitebox/<mark>`` (or ``<attack>/whitebox`` for
``any-mark``), ``<attack>/<backend>/accuracy``, ``<attack>/<backend>/<evidence>``
for black-box evidence. ``original`` is the unattacked model.

Statuses: ``pass``; ``fail`` (a threshold not met); ``error`` (the evidence
could not be produced: a backend not available here, an attack that failed).
Errors fail the gate too: a release cannot pass on evidence nobody measured.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from auditor import results
from auditor.errors import AuditError
from auditor.report import fmt_p
from auditor.marks.keys import Key
from auditor.gate.policy import BASELINE_ID, AttackSpec, Policy

PASS, FAIL, ERROR = "pass", "fail", "error"
# The mark's weight was not read (layer not located, layout not understood): the requirement is not
# met, and the record says so apart from a mark read and found too weak.
UNREADABLE = "could not read"


@dataclass
class Requirement:
    id: str
    attack: str
    evidence: str                 # whitebox | accuracy | trigger | logo | ...
    backend: str | None = None
    mark: str | None = None
    status: str = PASS
    measured: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """One line: why it failed (or what it measured when it passed)."""
        if self.reasons:
            return "; ".join(self.reasons)
        return "met: " + ", ".join(f"{k} = {_num(v)}" for k, v in sorted(self.measured.items())
                                   if isinstance(v, (int, float)) and not isinstance(v, bool))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "attack": self.attack, "evidence": self.evidence, "backend": self.backend,
                "mark": self.mark, "status": self.status, "measured": self.measured,
                "thresholds": self.thresholds, "reasons": list(self.reasons), "message": self.message}


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.3e}"
    return str(v)


# ------------------------------------------------------------------ judging evidence
def judge_mark(attack_id: str, mark: dict[str, Any], thresholds: dict[str, float]) -> Requirement:
    """One white-box mark of one attacked model against the thresholds.

    p is the mark's p-value corrected for the candidate tensors tried
    (``p_corrected``); the margin held to ``min_margin`` is the *signed* minimum
    margin min_i (2 b_i - 1) x_i . w, negative as soon as one bit is wrong;
    ``min_normalized_margin`` holds min_i (2 b_i - 1) x_i . w / (|x_i| |w|), the
    same margin without the weight's units (one threshold for BN-folded and
    BN-kept exports).
    """
    mid = str(mark.get("id") or mark.get("param"))
    if mark.get("verdict") == UNREADABLE:
        req = Requirement(id=f"{attack_id}/whitebox/{mid}", attack=attack_id, evidence="whitebox", mark=mid,
                          measured={"n_bits": int(mark["n_bits"]), "verdict": UNREADABLE},
                          thresholds={k: v for k, v in thresholds.items()
                                      if k in ("max_p_value", "max_ber", "min_margin", "min_normalized_margin")})
        req.reasons.append(f"the mark could not be read: {mark.get('reason', '')}")
        req.status = UNREADABLE
        return req
    p = float(mark.get("p_corrected", mark.get("p_value", 1.0)))
    measured = {"n_bits": int(mark["n_bits"]), "matches": int(mark["matches"]), "ber": float(mark["ber"]),
                "p_value": p, "log10_p": float(mark.get("log10_p", math.log10(p) if p > 0 else -math.inf)),
                "margin_min": float(mark.get("margin_min", 0.0)),
                "margin_median": float(mark.get("margin_median", 0.0)),
                "signed_margin_min": float(mark.get("signed_margin_min", 0.0)),
                "normalized_margin_min": float(mark.get("normalized_margin_min", 0.0)),
                "normalized_margin_median": float(mark.get("normalized_margin_median", 0.0)),
                "verdict": mark.get("verdict", "")}
    loc = mark.get("location") or {}
    if loc:
        measured["weight"] = loc.get("weight")
        measured["located_by"] = loc.get("how")
    bn = mark.get("batchnorm") or {}
    if bn.get("status") not in (None, "not-applicable"):
        measured["batchnorm"] = bn["status"]
    req = Requirement(id=f"{attack_id}/whitebox/{mid}", attack=attack_id, evidence="whitebox", mark=mid,
                      measured=measured, thresholds={k: v for k, v in thresholds.items()
                                                     if k in ("max_p_value", "max_ber", "min_margin",
                                                              "min_normalized_margin")})
    if not loc:
        req.reasons.append(f"marked parameter not found: {mark.get('reason', 'no candidate tensor')}")
    if "max_p_value" in thresholds and not p < thresholds["max_p_value"]:
        req.reasons.append(f"p = {fmt_p(p, measured['log10_p'])} >= max_p_value {thresholds['max_p_value']:g} "
                           f"({measured['matches']}/{measured['n_bits']} bits match)")
    if "max_ber" in thresholds and measured["ber"] > thresholds["max_ber"]:
        req.reasons.append(f"BER = {measured['ber']:.4f} > max_ber {thresholds['max_ber']:g}")
    if "min_margin" in thresholds and measured["signed_margin_min"] < thresholds["min_margin"]:
        req.reasons.append(f"signed margin min = {measured['signed_margin_min']:.4g} < min_margin "
                           f"{thresholds['min_margin']:g}")
    if "min_normalized_margin" in thresholds and \
            measured["normalized_margin_min"] < thresholds["min_normalized_margin"]:
        req.reasons.append(f"normalised margin min = {measured['normalized_margin_min']:.4g} < min_normalized_margin "
                           f"{thresholds['min_normalized_margin']:g}")
    if req.reasons and bn.get("status") in ("probably-folded", "unknown") and loc:
        req.reasons.append(bn.get("detail", ""))
    req.status = FAIL if req.reasons else PASS
    return req


def judge_any_mark(attack_id: str, marks: list[dict[str, Any]], thresholds: dict[str, float]) -> Requirement:
    """`any-mark` evidence: one requirement, met when at least one mark meets every threshold."""
    each = [judge_mark(attack_id, m, thresholds) for m in marks]
    best = next((r for r in each if r.status == PASS), None)
    if best is None:
        best = min(each, key=lambda r: r.measured["p_value"])
    req = Requirement(id=f"{attack_id}/whitebox", attack=attack_id, evidence="whitebox", mark=best.mark,
                      status=best.status, measured=best.measured, thresholds=best.thresholds)
    if best.status != PASS:
        req.reasons = [f"no mark meets the thresholds; best {best.mark}: " + "; ".join(best.reasons)]
    return req


def judge_accuracy(attack_id: str, backend: str, acc: float, ref: float, n: int,
                   thresholds: dict[str, float]) -> Requirement:
    """Accuracy drop in percentage points against the unattacked model on the same backend."""
    # accuracies are counts over n samples: round away float noise (0.797 - 0.777 = 0.02000000000000001)
    drop = round(100.0 * (ref - acc), 9)
    req = Requirement(id=f"{attack_id}/{backend}/accuracy", attack=attack_id, evidence="accuracy",
                      backend=backend,
                      measured={"accuracy": acc, "reference_accuracy": ref, "accuracy_drop": drop, "samples": n},
                      thresholds={"max_accuracy_drop": thresholds["max_accuracy_drop"]})
    if drop > thresholds["max_accuracy_drop"]:
        req.status = FAIL
        req.reasons.append(f"accuracy {100 * acc:.2f}% vs {100 * ref:.2f}% unattacked: drop {drop:.2f} "
                           f"points > max_accuracy_drop {thresholds['max_accuracy_drop']:g}")
    return req


def judge_fidelity(attack_id: str, backend: str, fid: dict[str, Any], n: int,
                   thresholds: dict[str, float]) -> Requirement:
    """Label-free fidelity against the unattacked model on the same backend and inputs
    (auditor.data.fidelity): worst top-1 agreement and worst SQNR over the outputs."""
    keys = ("top1_agreement", "cosine", "sqnr_db")
    req = Requirement(id=f"{attack_id}/{backend}/fidelity", attack=attack_id, evidence="fidelity", backend=backend,
                      measured={**{k: fid[k] for k in keys if k in fid}, "samples": n},
                      thresholds={k: thresholds[k] for k in ("min_top1_agreement", "min_sqnr_db") if k in thresholds})
    if fid.get("error"):
        req.reasons.append(fid["error"])
    t = thresholds.get("min_top1_agreement")
    if t is not None:
        if "top1_agreement" not in fid:
            req.reasons.append("no classifier output (floating point, last axis >= 2) to measure top-1 agreement on")
        elif fid["top1_agreement"] < t:
            req.reasons.append(f"top-1 agreement with the unattacked model {fid['top1_agreement']:.4f} < "
                               f"min_top1_agreement {t:g}")
    t = thresholds.get("min_sqnr_db")
    if t is not None and isinstance(fid.get("sqnr_db"), (int, float)) and fid["sqnr_db"] < t:
        req.reasons.append(f"SQNR {fid['sqnr_db']:.2f} dB < min_sqnr_db {t:g}")
    req.status = FAIL if req.reasons else PASS
    return req


def error_requirement(rid: str, attack_id: str, evidence: str, why: str, backend: str | None = None) -> Requirement:
    return Requirement(id=rid, attack=attack_id, evidence=evidence, backend=backend, status=ERROR, reasons=[why])


# ------------------------------------------------------------------ running attacks
def needs_calibration(policy: Policy) -> bool:
    return any("quantize:static" in a.steps for a in policy.attacks)


def make_calibration(policy: Policy, model, preprocess=None):
    """Calibration data for static quantization (auditor.data.inputs), as the policy names it (seeded)."""
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    return Calibration(load_data(policy.calibration_data or policy.data_source, model, purpose="calibration",
                                 samples=policy.calibration_samples, seed=policy.calibration_seed,
                                 preprocess=preprocess))


def make_evaluation(policy: Policy, model, preprocess=None):
    """The data accuracy / fidelity are measured on, checked against the policy's thresholds."""
    from auditor.data.inputs import load_data

    data = load_data(policy.data_source, model, purpose="evaluation", samples=policy.accuracy_samples,
                     seed=policy.accuracy_seed, labels=policy.data_labels, preprocess=preprocess)
    wants_labels = "max_accuracy_drop" in policy.thresholds or any("max_accuracy_drop" in a.thresholds
                                                                   for a in policy.attacks)
    if wants_labels and data.labels is None:
        raise AuditError(f"the policy sets max_accuracy_drop but {data.source} has no labels: give --labels, "
                         f"or gate on min_top1_agreement / min_sqnr_db (no labels needed)")
    return data


def apply_attack(model, spec: AttackSpec, policy: Policy, calibration=None) -> tuple[Any, dict[str, Any]]:
    """Run the spec's steps through auditor.attacks.compose on the model (never modified);
    (attacked model, record of the parameters each step used, notes, simulated)."""
    from auditor.attacks.compose import compose

    options = dict(spec.options)
    options.setdefault("prune_seed", policy.seed)  # random pruning draws from the policy's seed
    try:
        res = compose(model, spec.steps, calibration, **options)
    except AuditError as e:
        raise AuditError(f"attack '{spec.id}' ({spec.steps}) cannot be applied: {e}") from None
    record = {"steps": spec.steps, "options": dict(sorted(options.items())),
              "params": results._clean(res.params), "notes": [str(n) for n in res.notes],
              "simulated": bool(res.simulated)}
    return res.model, record


def load_model_full(path: str | Path):
    """The model with its external data, after graph.open_model's safety checks."""
    from auditor.attacks import load_model

    return load_model(path)


def _save(model, path: Path) -> Path:
    from auditor.attacks import save

    return save(model, path)


# ------------------------------------------------------------------ measurement adapters
def measure_task(model_path: Path, backend: str, evaluation) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every output of the model on the evaluation data on one target (auditor.data.accuracy.outputs),
    and its accuracy when the data has labels; ``doc["hardware"]`` is where it ran."""
    from auditor.data import accuracy

    outs, hw = accuracy.outputs(str(model_path), evaluation, backend=backend, with_hardware=True)
    doc: dict[str, Any] = {"samples": evaluation.n, "hardware": hw}
    if evaluation.labels is not None:
        doc["accuracy"] = accuracy.accuracy_of(next(iter(outs.values())), evaluation.labels)
    return outs, doc


def _error_text(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------ the gate
def run_gate(model_path: str | Path, key: Key, policy: Policy, *, manifest: dict | None = None,
             progress=None, reference: str | Path | None = None, preprocess=None) -> dict[str, Any]:
    """Evaluate the policy on the model; the body of a ``gate`` result document.

    BatchNorm folding (the model's own, or ``keep_batchnorm = false`` / quant_pre_process
    in an attacked copy) is undone with the owner's ``reference`` (BN kept), else the
    key's anchors, else the unattacked model where a BN still follows the marked conv.

    Returns {"verdict": "pass"|"fail", "summary", "requirements", "attacks", "policy"}.
    Raises AuditError for bad input (unreadable model, an attack that cannot be applied).
    """
    from auditor.marks.whitebox import extract, resolve_anchors

    model_path = Path(model_path)
    original = load_model_full(model_path)
    anchors = resolve_anchors(key, reference, unattacked=model_path) if policy.whitebox != "none" else {}
    want_blackbox = policy.blackbox == "required" or (policy.blackbox == "if-key-has" and bool(key.blackbox))

    specs: list[AttackSpec] = [AttackSpec(BASELINE_ID, "", {}, {})] + list(policy.attacks)
    # data first: bad data is reported before any attack runs
    evaluation = make_evaluation(policy, original, preprocess) if policy.accuracy else None
    calibration = make_calibration(policy, original, preprocess) if needs_calibration(policy) else None
    reqs: list[Requirement] = []
    cells: list[dict[str, Any]] = []
    reference_acc: dict[str, dict[str, Any] | str] = {}
    baseline_out: dict[str, dict[str, Any]] = {}
    hardware_seen: dict[str, dict[str, Any]] = {}

    with tempfile.TemporaryDirectory(prefix="wmaudit-gate-") as tmp:
        for i, spec in enumerate(specs):
            if progress is not None:
                progress.set_note(spec.id)
            thresholds = policy.thresholds_for(spec.id)
            if spec.steps:
                attacked, record = apply_attack(original, spec, policy, calibration)
                cell_dir = Path(tmp) / f"{i:03d}"
                cell_dir.mkdir()
                path = _save(attacked, cell_dir / "model.onnx")
                sha = results.file_sha256(path)
            else:
                record, path, sha = {"steps": "", "notes": [], "simulated": False}, model_path, None
            cell: dict[str, Any] = {"id": spec.id, **record, "thresholds": thresholds}
            if sha is not None:
                cell["model_sha256"] = sha
            if spec.description:
                cell["description"] = spec.description

            # white-box evidence: read off the weights, the same on every backend
            if policy.whitebox != "none":
                ex = extract(path, key, manifest=manifest, alpha=thresholds.get("max_p_value", 1e-6),
                             anchors=anchors).to_json()
                cell["whitebox"] = ex
                if policy.whitebox == "all-marks":
                    reqs.extend(judge_mark(spec.id, m, thresholds) for m in ex["marks"])
                else:
                    reqs.append(judge_any_mark(spec.id, ex["marks"], thresholds))

            # task accuracy and fidelity: per backend, against the unattacked model on that backend
            if policy.accuracy:
                from auditor.data.fidelity import compare

                cell["accuracy"] = {}
                for backend in policy.backends:
                    on_target = policy.thresholds_for(spec.id, backend)
                    try:
                        outs, acc = measure_task(path, backend, evaluation)
                        hardware_seen.setdefault(backend, acc.pop("hardware"))
                    except AuditError as e:
                        acc_err = _error_text(e)
                        cell["accuracy"][backend] = {"error": acc_err}
                        if spec.id == BASELINE_ID:
                            reference_acc[backend] = acc_err
                        else:
                            reqs.append(error_requirement(f"{spec.id}/{backend}/accuracy", spec.id, "accuracy",
                                                          acc_err, backend))
                        continue
                    if spec.id == BASELINE_ID:
                        reference_acc[backend] = acc
                        baseline_out[backend] = outs
                        cell["accuracy"][backend] = acc
                        continue
                    ref = reference_acc.get(backend)
                    if not isinstance(ref, dict):
                        reqs.append(error_requirement(f"{spec.id}/{backend}/accuracy", spec.id, "accuracy",
                                                      f"no reference outputs of the unattacked model: {ref}",
                                                      backend))
                        cell["accuracy"][backend] = acc
                        continue
                    fid = compare(baseline_out[backend], outs)
                    acc["fidelity"] = fid
                    if "accuracy" in acc and "max_accuracy_drop" in on_target:
                        r = judge_accuracy(spec.id, backend, float(acc["accuracy"]), float(ref["accuracy"]),
                                           int(acc["samples"]), on_target)
                        acc["accuracy_drop"] = r.measured["accuracy_drop"]
                        reqs.append(r)
                    if "min_top1_agreement" in on_target or "min_sqnr_db" in on_target:
                        reqs.append(judge_fidelity(spec.id, backend, fid, int(acc["samples"]), on_target))
                    cell["accuracy"][backend] = acc

            if want_blackbox:
                cell["blackbox"] = {}
                for backend in policy.backends:
                    on_target = policy.thresholds_for(spec.id, backend)
                    bb_reqs, bb = judge_blackbox(spec.id, path, key, backend, on_target, policy)
                    if bb.get("hardware"):
                        hardware_seen.setdefault(backend, bb.pop("hardware"))
                    cell["blackbox"][backend] = bb
                    reqs.extend(bb_reqs)
            cells.append(cell)
            if progress is not None:
                progress.advance(note=spec.id)

    # baseline backend failures are listed once, as their own requirement
    for backend, ref in sorted(reference_acc.items()):
        if isinstance(ref, str):
            reqs.insert(0, error_requirement(f"{BASELINE_ID}/{backend}/accuracy", BASELINE_ID, "accuracy",
                                             ref, backend))

    summary = {"requirements": len(reqs), "passed": sum(r.status == PASS for r in reqs),
               "failed": sum(r.status == FAIL for r in reqs), "errors": sum(r.status == ERROR for r in reqs)}
    if any(r.status == UNREADABLE for r in reqs):  # recorded only when a mark could not be read
        summary["unreadable"] = sum(r.status == UNREADABLE for r in reqs)
    verdict = PASS if summary["passed"] == len(reqs) and reqs else FAIL
    data: dict[str, Any] = {}
    if calibration is not None and (calibration.computed or calibration.reused):
        data["calibration"] = calibration.data.describe()  # only when a static mode calibrated
    if evaluation is not None:
        data["evaluation"] = evaluation.describe()
    from auditor.backends import hardware
    from auditor.backends.targets import resolve

    per_target = {resolve(b).name: hardware_seen[b] for b in policy.backends if b in hardware_seen}
    return {"verdict": verdict, "summary": summary, "data": data,
            "failing": [r.id for r in reqs if r.status != PASS],
            "requirements": [r.to_json() for r in reqs], "attacks": cells,
            "targets": list(policy.backends), "matrix": target_matrix(reqs, specs, policy.backends),
            "hardware": hardware.combine(per_target) if per_target else hardware.process_record()}


def target_matrix(reqs: list[Requirement], specs, targets) -> dict[str, Any]:
    """Attack x target at a glance: the worst status of the requirements that hold there (white-box
    requirements hold on every target: they are read off the weights)."""
    order = {PASS: 0, FAIL: 1, ERROR: 2}
    rows = []
    for spec in specs:
        cells = {}
        for t in targets:
            mine = [r for r in reqs if r.attack == spec.id and r.backend in (t, None)]
            cells[t] = max((r.status for r in mine), key=order.__getitem__) if mine else None
        rows.append({"attack": spec.id, "cells": cells})
    return {"targets": list(targets), "rows": rows}


def judge_blackbox(attack_id: str, model_path: Path, key: Key, backend: str, thresholds: dict[str, float],
                   policy: Policy) -> tuple[list[Requirement], dict[str, Any]]:
    """Black-box evidence of one model on one backend: the trigger set and the logo
    the key holds, each one requirement held to ``max_p_value``."""
    rid = f"{attack_id}/{backend}/blackbox"
    bb = key.blackbox or {}
    if not (bb.get("triggers") or bb.get("logo")):
        return [error_requirement(rid, attack_id, "blackbox",
                                  "the policy requires black-box evidence but the key holds none", backend)], {}
    from auditor.marks import blackbox
    from auditor.backends import open_runner

    alpha = thresholds["max_p_value"]
    doc: dict[str, Any] = {}
    reqs: list[Requirement] = []
    try:
        with open_runner(model_path, backend) as runner:
            if getattr(runner, "hardware", None):
                doc["hardware"] = runner.hardware
            if bb.get("triggers"):
                doc["triggers"] = blackbox.evaluate_triggers(runner, blackbox.load_triggers(key), alpha=alpha)
            if bb.get("logo"):
                doc["logo"] = blackbox.evaluate_logo(runner, blackbox.load_logo(key), seed=policy.seed, alpha=alpha)
    except AuditError as e:
        return [error_requirement(rid, attack_id, "blackbox", _error_text(e), backend)], {"error": _error_text(e)}
    if "triggers" in doc:
        t = doc["triggers"]
        r = Requirement(id=f"{attack_id}/{backend}/triggers", attack=attack_id, evidence="triggers",
                        backend=backend, thresholds={"max_p_value": alpha},
                        measured={"hits": t["hits"], "n": t["n"], "trigger_accuracy": t["trigger_accuracy"],
                                  "null_rate": t["null_rate"], "p_value": t["p_value"], "log10_p": t["log10_p"]})
        if not t["p_value"] < alpha:
            r.status = FAIL
            r.reasons.append(f"trigger set: {t['hits']}/{t['n']} hits, p = {fmt_p(t['p_value'], t['log10_p'])} "
                             f">= max_p_value {alpha:g} (null rate {t['null_rate']:.3g})")
        reqs.append(r)
    if "logo" in doc:
        lg = doc["logo"]
        r = Requirement(id=f"{attack_id}/{backend}/logo", attack=attack_id, evidence="logo", backend=backend,
                        thresholds={"max_p_value": alpha},
                        measured={"k": lg["k"], "r": lg["r"], "p_value": lg["p_value"], "n_perm": lg["n_perm"],
                                  "p_method": lg.get("p_method", "")})
        if not lg["p_value"] < alpha:
            r.status = FAIL
            r.reasons.append(f"logo: r = {lg['r']:.3f} with {lg['k']} key images, {lg.get('p_method', 'permutation')} p = "
                             f"{fmt_p(lg['p_value'])} >= max_p_value {alpha:g}"
                             + (" (the test cannot reach max_p_value)" if lg["resolution_limit"] >= alpha
                                else ""))
        reqs.append(r)
    return reqs, doc


def gate_document(model_path: str | Path, key: Key, policy: Policy, *, policy_path: str | Path,
                  manifest: dict | None = None, progress=None, command: str | None = None,
                  reference: str | Path | None = None, preprocess=None) -> dict[str, Any]:
    """The full ``gate`` result envelope (deterministic apart from ``created``)."""
    body = run_gate(model_path, key, policy, manifest=manifest, progress=progress, reference=reference,
                    preprocess=preprocess)
    if reference is not None:
        body["reference"] = {"path": str(reference), "sha256": results.file_sha256(reference)}
    pol = policy.to_json()
    pol["path"] = str(policy_path)
    pol["sha256"] = results.file_sha256(policy_path)
    return results.envelope("gate", model_path=model_path, key=key, command=command, policy=pol, **body)


def exit_code(doc: dict[str, Any]) -> int:
    return 0 if doc.get("verdict") == PASS else 1


def requirements_from(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The requirement records of a gate document (for renderers)."""
    return list(doc.get("requirements", []))


__all__ = ["Requirement", "judge_mark", "judge_any_mark", "judge_accuracy", "run_gate", "gate_document",
           "exit_code", "apply_attack", "PASS", "FAIL", "ERROR", "UNREADABLE"]
