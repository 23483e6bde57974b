"""Measure every deployed form of the test fixtures: `python scripts/deployed_forms.py` prints the
markdown table of docs/deployed-forms.md (marks read, p, candidates paid for, twins);
`python scripts/deployed_forms.py FIXTURE...` only those fixtures' rows;
`python scripts/deployed_forms.py --provenance` the provenance table (each suspect as exported and
saved by this machine's onnxruntime at ORT_ENABLE_ALL, against its reference);
`python scripts/deployed_forms.py --qoperator` the provenance table of the residual CNN's int8 files
in onnxruntime's QOperator and dynamic forms (as quantized, and saved at ORT_ENABLE_EXTENDED / ALL).

Each form is made by auditor.attacks.compose (the grid / policy steps) from the fixture's exporter
file, then read by `wmaudit extract`'s code path (auditor.marks.whitebox.extract). Deterministic:
the fixtures are seeded and onnxruntime's graph rewrites are deterministic.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMS = ("", "ort-optimize:basic", "ort-optimize:extended", "ort-optimize:all", "ort-format", "ort-format:all",
         "simplify", "simplify:onnxsim", "transformers-optimize", "transformers-optimize:fp16")
# fixture, model, twin, key, reference (BatchNorm anchors), forms
CASES = (
    ("data-digits-cnn", "model.onnx", None, "key.json", None, FORMS[:8]),
    ("arch-mobilenet", "default.onnx", "twin.onnx", "key.json", None, FORMS[:8]),
    ("arch-resnet", "default.onnx", "twin.onnx", "key.json", "kept.onnx", FORMS[:8]),
    ("arch-vit", "default.onnx", "twin.onnx", "key.json", None, FORMS),
    ("arch-bert", "default.onnx", "twin.onnx", "key.json", None, FORMS),
    ("deploy-bert-attention", "model.onnx", "twin.onnx", "key-query.json", None, FORMS),
    ("deploy-bert-attention", "model.onnx", "twin.onnx", "key-value.json", None, FORMS),
    # MultiHeadAttention's per-head packed QKV / KV (onnxruntime's UNet attention fusion, in the fixture)
    *(("deploy-packed-attention", model, "twin-packed.onnx", f"key-{k}.json", None, forms)
      for k in ("attn1-to_q", "attn1-to_k", "attn1-to_v", "attn2-to_k", "attn2-to_v")
      for model, forms in (("packed.onnx", ("", "quantize:dynamic")), ("packed-fp16.onnx", ("",)))),
)
# suspect, reference (fixture-relative), for --provenance
PROVENANCE = (
    ("data-digits-cnn/model.onnx", "data-digits-cnn/model.onnx"),
    ("arch-resnet/default.onnx", "arch-resnet/kept.onnx"),
    ("arch-mobilenet/default.onnx", "arch-mobilenet/kept.onnx"),
    ("forensics-resnet-obfuscated/default/all.onnx", "arch-resnet/kept.onnx"),
    ("forensics-resnet-obfuscated/kept/dummy-4.onnx", "arch-resnet/kept.onnx"),
    ("forensics-resnet-twin/model.onnx", "arch-resnet/kept.onnx"),
    ("forensics-resnet-obfuscated/twin/all.onnx", "arch-resnet/kept.onnx"),
)


def _read(path: Path, key, reference):
    from auditor.marks.whitebox import extract

    return extract(path, key, reference=reference)


def _fixture_path(rel: str) -> Path:
    """FIXTURE/relative/path -> the file in the built fixture."""
    from fixtures.build import ensure

    name, rest = rel.split("/", 1)
    return ensure(name) / rest


def provenance_table() -> int:
    from auditor.forensics.provenance import provenance
    from fixtures.deploy import ort_save

    path = _fixture_path
    print("| suspect | reference | as exported: verdict, log10 p | ORT_ENABLE_ALL: verdict, log10 p | readings |")
    print("|---|---|---|---|---|")
    for sus, ref in PROVENANCE:
        with tempfile.TemporaryDirectory() as tmp:
            a = provenance(path(sus), path(ref))
            b = provenance(ort_save(path(sus), Path(tmp) / "all.onnx", "all"), path(ref))
        print(f"| {sus} | {ref} | {a['verdict']}, {a['log10_p_combined']:.2f} | {b['verdict']}, "
              f"{b['log10_p_combined']:.2f} | {b.get('nchwc_readings', 1)} |", flush=True)
    return 0


# suspect, reference (fixture-relative), for --qoperator (calibration: the reference fixture's calib.npy)
QOPERATOR = (
    ("arch-resnet/default.onnx", "arch-resnet/kept.onnx"),
    ("forensics-resnet-obfuscated/default/all.onnx", "arch-resnet/kept.onnx"),
    ("arch-mobilenet/default.onnx", "arch-mobilenet/kept.onnx"),
    ("forensics-resnet-twin/model.onnx", "arch-resnet/kept.onnx"),
    ("forensics-resnet-obfuscated/twin/all.onnx", "arch-resnet/kept.onnx"),
)


def qoperator_table() -> int:
    from auditor.attacks import load_model, save
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data
    from auditor.forensics.provenance import provenance

    path = _fixture_path
    print("| suspect | reference | as exported | int8 form | as quantized | ORT_ENABLE_EXTENDED | ORT_ENABLE_ALL |")
    print("|---|---|---|---|---|---|---|")
    for sus, ref in QOPERATOR:
        d = path(ref).parent
        cal = Calibration(load_data(str(d / "calib.npy"), d / "default.onnx", purpose="calibration",
                                    samples=64, seed=0))
        m = load_model(path(sus))
        base = provenance(path(sus), path(ref))
        # static-qdq-per-channel: QDQ as quantized; onnxruntime fuses it into QOperator nodes when it saves
        for mode in ("static-qop", "static-qop-per-channel", "dynamic", "static-qdq-per-channel"):
            q = compose(m, f"quantize:{mode}", cal).model
            cells = []
            with tempfile.TemporaryDirectory() as tmp:
                for level in ("", "extended", "all"):
                    f = save(q if not level else compose(q, f"ort-optimize:{level}").model, Path(tmp) / "m.onnx")
                    r = provenance(f, path(ref))
                    cells.append(f"{r['verdict']}, {r['log10_p_combined']:.2f}")
            print(f"| {sus} | {ref} | {base['verdict']}, {base['log10_p_combined']:.2f} | quantize:{mode} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


def main() -> int:
    if "--provenance" in sys.argv[1:]:
        return provenance_table()
    if "--qoperator" in sys.argv[1:]:
        return qoperator_table()
    from fixtures.build import ensure
    from auditor.attacks import load_model, save
    from auditor.attacks.compose import compose
    from auditor.marks.keys import load_key

    print("| fixture (key) | form | marks k/T | log10 p | log10 p corrected | candidates | located by | twin |")
    print("|---|---|---|---|---|---|---|---|")
    only = [a for a in sys.argv[1:] if not a.startswith("-")]   # fixture names, to measure only those
    for fixture, model, twin, key_name, ref, forms in CASES:
        if only and fixture not in only:
            continue
        d = ensure(fixture)
        key = load_key(d / key_name)
        reference = d / ref if ref else None
        for form in forms:
            with tempfile.TemporaryDirectory() as tmp:
                res, twin_res = [], None
                for name in (model, twin):
                    if name is None:
                        continue
                    path = d / name
                    if form:
                        path = save(compose(load_model(d / name), form).model, Path(tmp) / name)
                    r = _read(path, key, reference)
                    if name == model:
                        res = r
                    else:
                        twin_res = r
            ks = ", ".join(f"{m.matches}/{m.n_bits}" for m in res.marks)
            lp = ", ".join(f"{m.log10_p:.2f}" for m in res.marks)
            lpc = ", ".join(f"{math.log10(m.p_corrected) if m.p_corrected > 0 else m.log10_p:.2f}" for m in res.marks)
            cands = ", ".join(str(m.location.candidates if m.location else 0) for m in res.marks)
            how = ", ".join(f"{m.location.how} [{m.location.transform}]" if m.location else m.verdict for m in res.marks)
            tw = "-" if twin_res is None else twin_res.verdict
            label = form or "exporter file"
            if model not in ("model.onnx", "default.onnx"):  # a form the fixture made (onnxruntime's fusion)
                label = model + (f", {form}" if form else "")
            print(f"| {fixture} ({key_name}) | {label} | {ks} | {lp} | {lpc} | {cands} | {how} | "
                  f"{tw} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
