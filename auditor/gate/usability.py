"""Did the attack leave the model usable? A mark that survives in a model that no longer
works is no evidence of robustness, so a robustness grid counts survival only on the
configs that kept the model usable, and lists the others as having broken the model.

Usable = every measure the grid took stays within the user's bounds:
  * top-1 agreement with the unattacked model on the same inputs >= ``min_top1_agreement``
    (label-free; measured whenever the grid has evaluation data);
  * accuracy drop (unattacked minus attacked, in percentage points as the release policy's
    threshold of the same name) <= ``max_accuracy_drop`` (measured when the data has labels).
A grid run without evaluation data (``--no-accuracy``) cannot tell: every config is
``usable: null`` and the headline says that usability was not measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from auditor.errors import AuditError

# int8 and fp16 deployments of a working classifier agree with it on >= 95 % of inputs in
# every grid this project measured; 0.90 leaves room for small or noisy evaluation sets.
DEFAULT_MIN_TOP1_AGREEMENT = 0.90
DEFAULT_MAX_ACCURACY_DROP = 5.0   # percentage points


@dataclass(frozen=True)
class Usability:
    """The bounds within which an attacked model still counts as usable."""

    min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise AuditError(f"minimum top-1 agreement must be in [0, 1], got {self.min_top1_agreement!r}")
        if not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise AuditError(f"maximum accuracy drop must be in [0, 100] percentage points, "
                             f"got {self.max_accuracy_drop!r}")

    def describe(self) -> dict[str, float]:
        return {"min_top1_agreement": self.min_top1_agreement, "max_accuracy_drop": self.max_accuracy_drop}

    def judge(self, row: dict[str, Any]) -> tuple[bool | None, list[str]]:
        """(usable, reasons it is not): None when the row measured neither agreement nor accuracy.
        A row measured on several targets (``row["targets"]``) is usable only where it is usable on
        every target; each reason names its target."""
        per = row.get("targets")
        if isinstance(per, dict) and per:
            verdicts = {t: self.judge(cell) for t, cell in per.items() if isinstance(cell, dict)}
            measured = [ok for ok, _ in verdicts.values() if ok is not None]
            why_all = [f"on {t}: {w}" for t, (_, ws) in verdicts.items() for w in ws]
            return (all(measured) if measured else None), why_all
        why: list[str] = []
        measured = False
        agree = (row.get("fidelity") or {}).get("top1_agreement")
        if isinstance(agree, (int, float)):
            measured = True
            if agree < self.min_top1_agreement:
                why.append(f"top-1 agreement {agree:.3f} < {self.min_top1_agreement:g}")
        drop = row.get("accuracy_drop")  # a fraction in the grid's rows
        if isinstance(drop, (int, float)):
            measured = True
            if 100.0 * drop > self.max_accuracy_drop:
                why.append(f"accuracy drop {100.0 * drop:.1f} points > {self.max_accuracy_drop:g}")
        return (not why) if measured else None, why


def judge_grid(configs: list[dict[str, Any]], baseline_detected: bool, summary: dict[str, Any],
               usability: Usability | None = None) -> dict[str, Any]:
    """Mark each config ``usable`` (with ``unusable_because``) and return the summary with survival
    counted on usable configs only: ``survived`` (mark detected, model usable), ``usable``,
    ``broken`` (model usable, mark lost), ``model_broken`` (the attack broke the model; whatever the
    mark did there is listed, not counted), ``all_survived`` (baseline detected and no usable config
    lost the mark)."""
    u = usability or Usability()
    usable_names, model_broken, mark_lost, survived_broken = [], [], [], []
    measured = False
    for row in configs:
        for cell in (row.get("targets") or {}).values():  # each target's own usability
            if isinstance(cell, dict):
                cell["usable"] = u.judge(cell)[0]
        ok, why = u.judge(row)
        row["usable"] = ok
        if why:
            row["unusable_because"] = why
        measured |= ok is not None
        if ok is False:
            model_broken.append(row["name"])
            if row.get("survived"):
                survived_broken.append(row["name"])
            continue
        usable_names.append(row["name"])
        if not row.get("survived"):
            mark_lost.append(row["name"])
    out = dict(summary)
    out.update({"configs": len(configs), "usable": len(usable_names),
                "survived": len(usable_names) - len(mark_lost), "broken": mark_lost,
                "model_broken": model_broken, "survived_in_broken_model": survived_broken,
                "usability": dict(u.describe(), measured=measured),
                "all_survived": baseline_detected and not mark_lost})
    return out


def headline(summary: dict[str, Any]) -> str:
    """One line: survival on the usable configs, then what broke the mark and what broke the model."""
    u = summary.get("usability") or {}
    if "usable" not in summary:  # a result written before usability was judged
        return (f"survived {summary.get('survived', '?')}/{summary.get('configs', '?')}"
                + (f"; broken by: {', '.join(summary['broken'])}" if summary.get("broken") else ""))
    if not u.get("measured"):
        s = (f"survived {summary['survived']}/{summary['configs']} (model usability not measured: "
             f"no evaluation data)")
    else:
        s = (f"survived {summary['survived']}/{summary['usable']} configs that left the model usable "
             f"(top-1 agreement >= {u['min_top1_agreement']:g}, accuracy drop <= {u['max_accuracy_drop']:g} points)")
    if summary.get("broken"):
        s += f"; mark lost under: {_names(summary['broken'])}"
    if summary.get("model_broken"):
        s += f"; {len(summary['model_broken'])} broke the model (not counted): {_names(summary['model_broken'])}"
    return s


def _names(names: list[str], most: int = 4) -> str:
    """The first ``most`` names, then how many more (the result lists them all)."""
    head = ", ".join(names[:most])
    return head if len(names) <= most else f"{head} and {len(names) - most} more"
