"""Black-box queries as data: run a key's trigger set and logo test on a model and judge them
(what ``wmaudit query`` reports, with no printing). Below the command line and the API."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from auditor import results
from auditor.errors import AuditError
from auditor.marks import stats


def query_model(model: str, key_path: str, *, backend: str = "ort-cpu", references=(), attack: str | None = None,
                attack_seed: int = 0, batch_size: int = 64, n_perm: int = 10_000, seed: int = 0,
                alpha: float = stats.DEFAULT_ALPHA, logo_out: str | None = None) -> dict[str, Any]:
    """Everything ``wmaudit query`` reports, as data (no printing)."""
    from auditor.marks import blackbox as bb
    from auditor.backends import open_runner
    from auditor.marks.keys import load_key
    from auditor.attacks.query import parse_attack

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
    body: dict[str, Any] = {"backend": backend, "query_attack": attack,
                            "attack_seed": attack_seed if attack else None}
    null_rate = None
    if references and triggers is not None:
        hits = []
        for ref in references:
            if not Path(ref).is_file():
                raise AuditError(f"reference model not found: {ref}")
            with open_runner(ref, backend) as r:
                hits.append(bb.trigger_hits(r, triggers, batch_size))
        null_rate = bb.null_rate_from_references(hits, len(triggers.labels), [Path(x).name for x in references])
        null_rate["per_reference_hits"] = hits
    elif references:
        raise AuditError("--reference needs a trigger set in the key (the logo test needs no reference)")
    marks = []
    with open_runner(model, backend) as runner:
        body["runner"] = runner.describe()
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
    return results.envelope("query", model_path=model, key=key, **body)


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
