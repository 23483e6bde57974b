"""Scan every file of the `forensics-blocks` fixture without a reference, and measure what
`provenance` calls derived on models of other initialisations and of the same initialisation.

Part 1, per block (basic, bottleneck, inverted, mlp; inverted-se from `forensics-blocks-se`, attention from
`forensics-blocks-attention`) and file (each obfuscation step alone, all
together, all but the permutation, torch-level, several rounds, the twins'): matches k/T, verdict,
corrected log10 p, whether a permutation search was left out, what was undone. BatchNorm-kept files
are scanned with the plain key, folded ones with the key carrying the BatchNorm anchors.

Part 2 (`forensics-blocks-seeds`): `provenance` of BasicNet models against the marked basic block
(forensics-blocks/basic/default.onnx): trained from other initialisations (init-*.onnx), from the
marked model's initialisation with other batch orders (order-*.onnx), and the twin (same
initialisation and order). Reports the rate called derived at alpha = 1e-6 in each set.

    python bench/bench_blocks.py --out build/bench [--quick]

--quick: part 1 only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def scan_rows(fx: Path, attn: Path, se: Path) -> list[dict]:
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    rows = []
    for block, d in ([(b, fx / b) for b in ("basic", "bottleneck", "inverted", "mlp")]
                     + [("inverted-se", se / "inverted-se"), ("attention", attn)]):
        anch = d / "key-anchors.json"
        ka, kp = load_key(anch if anch.exists() else d / "key.json"), load_key(d / "key.json")
        files = sorted(str(p.relative_to(d)) for p in d.glob("*.onnx")) + sorted(
            str(p.relative_to(d)) for p in list(d.glob("graph/*.onnx")) + list(d.glob("torch/*.onnx"))
            + list(d.glob("rounds/*.onnx")))
        for rel in files:
            kept = "kept" in rel
            t0 = time.perf_counter()
            f = scan(d / rel, [kp if kept else ka])["findings"][0]
            rows.append({"block": block, "file": rel, "key": "plain" if kept else "anchors" if anch.exists() else "plain",
                         "matches": f.get("matches"), "bits": f["n_bits"], "verdict": f["verdict"],
                         "log10_p_corrected": round(f.get("log10_p_corrected", 0.0), 1),
                         "not_searched": bool(f.get("not_searched")), "undone": f.get("undone", []),
                         "seconds": round(time.perf_counter() - t0, 3)})
    return rows


def _category(rel: str) -> tuple[str, str]:
    """(source, kind) of a fixture file: source default / kept / twin; kind the column of the summary."""
    name = rel.split("/")[-1][:-len(".onnx")]
    src = "twin" if "twin" in name else ("kept" if "kept" in name else "default")
    if "/" not in rel:
        return src, "as exported"
    top = rel.split("/")[0]
    step = name.replace("twin-", "").replace("kept-", "").replace("default-", "")
    if top == "rounds":
        return src, "rounds: " + step.replace("twice", "same layer twice")
    if top == "torch":
        return src, "torch level"
    if step.startswith("stream-"):
        return src, "residual stream (output side)"
    if step in ("perm", "all", "clean"):
        return src, {"perm": "permutation", "all": "all steps", "clean": "all but permutation"}[step]
    return src, "each other step alone"


def summary(rows: list[dict]) -> str:
    """Markdown: per block and export, the weakest result of each kind of file (k/T, corrected log10 p)."""
    kinds = ["as exported", "each other step alone", "permutation", "all but permutation", "all steps",
             "torch level", "residual stream (output side)"]
    out = ["| block | file (key) | " + " | ".join(kinds) + " | rounds | twins: best |",
           "|" + "---|" * (len(kinds) + 4)]
    for block in dict.fromkeys(r["block"] for r in rows):
        rs = [r for r in rows if r["block"] == block]
        for src, label in (("default", "default export"), ("kept", "BN kept")):
            sel = [(r, _category(r["file"])[1]) for r in rs if _category(r["file"])[0] == src]
            if not sel:
                continue
            key = sel[0][0]["key"]

            def cell(rr):
                if not rr:
                    return ""
                w = max(rr, key=lambda r: (r["log10_p_corrected"], -(r["matches"] or 0)))
                k = "-" if w["matches"] is None else w["matches"]
                tail = " NS" if w["not_searched"] and w["verdict"] != "detected" else ""
                return f"{k}/{w['bits']} ({w['log10_p_corrected']:.1f}){'' if w['verdict'] == 'detected' else ' n.d.'}{tail}"

            cells = [cell([r for r, k in sel if k == kind]) for kind in kinds]
            rounds = "; ".join(f"{k[8:]} {cell([r])}" for r, k in sel if k.startswith("rounds:"))
            tw = [r for r in rs if _category(r["file"])[0] == "twin" and (("kept" in r["file"]) == (src == "kept"))]
            best = max(tw, key=lambda r: (r["matches"] or 0)) if tw else None
            twc = f"{best['matches']}/{best['bits']}, none detected" if best and not any(
                r["verdict"] == "detected" for r in tw) else ("DETECTED" if tw else "")
            out.append(f"| {block} | {label} ({key}) | " + " | ".join(cells) + f" | {rounds} | {twc} |")
    return "\n".join(out)


def provenance_rates(fx: Path, seeds: Path) -> dict:
    from auditor.forensics.provenance import provenance

    ref = fx / "basic" / "default.onnx"
    out = {}
    for label, files in (("different initialisation", sorted(seeds.glob("init-*.onnx"))),
                         ("same initialisation, other batch order", sorted(seeds.glob("order-*.onnx"))),
                         ("same initialisation and order (the twin)", [fx / "basic" / "twin.onnx"])):
        res = []
        for f in files:
            r = provenance(f, ref)
            res.append({"file": f.name, "log10_p": round(r["log10_p_combined"], 1), "verdict": r["verdict"],
                        "median_r": [round(l["median_r"], 3) for l in r["layers"]]})
        n = sum(1 for r in res if r["verdict"] == "derived")
        out[label] = {"derived": n, "n": len(res), "rate": n / len(res), "models": res}
    return out


def main(argv=None) -> int:
    from fixtures.build import ensure

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    fx = ensure("forensics-blocks")
    t0 = time.perf_counter()
    rows = scan_rows(fx, ensure("forensics-blocks-attention"), ensure("forensics-blocks-se"))
    doc = {"scan": rows, "scan_seconds": round(time.perf_counter() - t0, 1)}
    for r in rows:
        print(f"{r['block']:10s} {r['file']:30s} {r['key']:7s} {r['matches']}/{r['bits']} {r['verdict']:12s} "
              f"{r['log10_p_corrected']:7.1f} {'not searched' if r['not_searched'] else ''}")
    doc["summary_markdown"] = summary(rows)
    print(doc["summary_markdown"])
    if not a.quick:
        doc["provenance"] = provenance_rates(fx, ensure("forensics-blocks-seeds"))
        for label, v in doc["provenance"].items():
            ps = [m["log10_p"] for m in v["models"]]
            print(f"provenance, {label}: {v['derived']}/{v['n']} derived; log10 p {min(ps):.1f} .. {max(ps):.1f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "blocks.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / 'blocks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
