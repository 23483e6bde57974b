"""Black-box queries as data: run a key's trigger set and logo test on a model and judge them
(what ``wmaudit query`` reports, with no printing). Below the command line and the API."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from auditor import results
from auditor.errors import AuditError
from auditor.marks import stats


def query_model(model: str, key_path: str, *, backend: str = "native", references=(), attack: str | None = None,
                attack_seed: int = 0, batch_size: int = 64, n_perm: int = 10_000, seed: int = 0,
                alpha: float = stats.DEFAULT_ALPHA, logo_out: str | None = None, targets=None) -> dict[str, Any]:
    """Everything ``wmaudit query`` reports, as data (no printing). ``targets``: the targets to
    query on (default: [backend]); the first target's answers are the document's top level,
    every target's are under ``targets``."""
    from auditor.marks import blackbox as bb
    from auditor.backends import hardware, targets as targets_mod
    from auditor.marks.keys import load_key
    from auditor.attacks.query import parse_attack

    names = [targets_mod.resolve(t).name for t in (targets or [backend])]
    names = list(dict.fromkeys(names))
    if not Path(model).is_file():
        raise AuditError(f"model not found: {model}")
    if attack:
        parse_attack(attack)  # bad specs fail before any session starts
    key = load_key(key_path)
    sections = key.blackbox or {}
    if not sections.get("triggers") and not sections.get("logo"):
        raise AuditError(f"key {key_path} has no black-box section (blackbox.triggers or blackbox.logo)")
    triggers = bb.load_triggers(key) if sections.get("triggers") else None
    logo = bb.load_logo(key) if sections.get("logo") else None
    check_key_images(model, [("trigger", triggers), ("logo", logo)])
    if references and triggers is None:
        raise AuditError("--reference needs a trigger set in the key (the logo test needs no reference)")
    for ref in references:
        if not Path(ref).is_file():
            raise AuditError(f"reference model not found: {ref}")
    targets_mod.check_available(names)
    per_target = {}
    for i, t in enumerate(names):
        per_target[t] = _query_on(t, model, triggers, logo, references=references, attack=attack,
                                  attack_seed=attack_seed, batch_size=batch_size, n_perm=n_perm, seed=seed,
                                  alpha=alpha, logo_out=(logo_out if i == 0 else (f"{logo_out}/{t}" if logo_out
                                                                                  else None)))
    first = per_target[names[0]]
    body: dict[str, Any] = {k: v for k, v in first.items() if k != "hardware"}
    body.update({"backend": names[0], "target": names[0], "query_attack": attack,
                 "attack_seed": attack_seed if attack else None})
    if len(names) > 1:
        body["targets"] = {t: {k: v for k, v in r.items() if k != "hardware"} for t, r in per_target.items()}
        worst = max(names, key=lambda t: per_target[t]["verdict"]["p_corrected"])
        ok = all(per_target[t]["verdict"]["verdict"] == stats.DETECTED for t in names)
        v = dict(per_target[worst]["verdict"])
        v["verdict"] = stats.DETECTED if ok else per_target[worst]["verdict"]["verdict"]
        v["reason"] = (f"detected on every target ({', '.join(names)})" if ok else
                       f"on {worst}: {per_target[worst]['verdict']['reason']}")
        v["worst_target"] = worst
        body["verdict"] = v
        body["exit_code"] = stats.exit_code(v["verdict"])
    body["hardware"] = hardware.combine({t: r["hardware"] for t, r in per_target.items()})
    return results.envelope("query", model_path=model, key=key, **body)


def _query_on(target: str, model: str, triggers, logo, *, references, attack, attack_seed, batch_size, n_perm,
              seed, alpha, logo_out) -> dict[str, Any]:
    """The black-box answers of ``model`` on one target (the model runs in the target's child)."""
    from auditor.marks import blackbox as bb
    from auditor.backends import open_runner, hardware, targets as targets_mod

    body: dict[str, Any] = {}
    null_rate = None
    if references and triggers is not None:
        hits = []
        for ref in references:
            with open_runner(ref, target) as r:
                hits.append(bb.trigger_hits(r, triggers, batch_size))
        null_rate = bb.null_rate_from_references(hits, len(triggers.labels), [Path(x).name for x in references])
        null_rate["per_reference_hits"] = hits
    marks = []
    with open_runner(model, target) as runner:
        body["runner"] = runner.describe()
        body["hardware"] = getattr(runner, "hardware", None) or hardware.gpu_target_record(
            targets_mod.resolve(target))
        if triggers is not None:
            t = bb.evaluate_triggers(runner, triggers, null_rate=null_rate, batch_size=batch_size,
                                     attack=attack, attack_seed=attack_seed, alpha=alpha)
            body["triggers"] = t
            marks.append(("triggers", t["p_value"], t["best_possible_p"]))
        if logo is not None:
            lg = bb.evaluate_logo(runner, logo, n_perm=n_perm, seed=seed, batch_size=batch_size,
                                  attack=attack, attack_seed=attack_seed, alpha=alpha)
            maps = lg.pop("maps")
            lg["target"] = lg["target"].round(6)
            lg["decoded"] = {str(k): m.round(6) for k, m in maps.items()}
            if logo_out:
                written = bb.write_logo_pngs(maps, logo_out)
                lg["png"] = {str(k): w["path"] for k, w in written.items()}
            body["logo"] = lg
            marks.append(("logo", lg["p_value"], lg["resolution_limit"]))
    # Several marks tested at once: the best one is reported, Bonferroni-corrected.
    m = len(marks)
    name, p, _ = min(marks, key=lambda t: t[1])
    best_possible = stats.bonferroni(min(b for _, _, b in marks), m)
    d = stats.decide(stats.bonferroni(p, m), best_possible, alpha)
    body["verdict"] = {"verdict": d.verdict, "alpha": alpha, "reason": d.reason, "marks_tested": m,
                       "best_mark": name, "p_value": p, "p_corrected": stats.bonferroni(p, m)}
    body["exit_code"] = stats.exit_code(d.verdict)
    return body


def check_key_images(model: str, sets) -> None:
    """The key's images, preprocessed as the key says, against the model's declared input
    (auditor.data.inputs): a mismatch is one line naming both shapes, before any session starts."""
    from auditor.data.inputs import check_array, model_inputs
    from auditor.read.graph import open_model

    specs = model_inputs(open_model(model))
    if len(specs) != 1:
        raise AuditError(f"black-box queries feed one image input; the model has {len(specs)} inputs "
                         f"({', '.join(s.name for s in specs)})")
    for what, s in sets:
        if s is not None:
            check_array(specs[0], s.preprocess.model_input(s.images[:1]), f"key {what} images")
