"""Does a perceptual hash still decide the same after deployment attacks on its model?

The hash's tensor is exposed as a graph output first (so every quantizer keeps
it as a float output of the same name), then each attack of ``auditor.attacks``
(onnxruntime int8 in all modes, fp16, pruning, compositions) is applied to the
model; the encoder, if any, stays as built. Per attack: decision flips on the
Signal and Noise images, TPR / FPR before and after, the drift of the Signal
images' centroid caused by the attack (``centroid_drift_r``), its offset from
the hash's centroid (``centroid_offset_r``) and the mean / max latent shift of
an image, all in units of R.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from auditor.errors import AuditError
from auditor.phash import features as F
from auditor.phash import hashing
from auditor.phash.hashfile import PerceptualHash

DEFAULT_ATTACKS = (
    "quantize:dynamic",
    "quantize:static-qdq",
    "quantize:static-qdq-per-channel",
    "quantize:static-qop",
    "quantize:static-qop-per-channel",
    "fp16",
    "prune:0.3",
    "prune:0.5",
    "prune:0.5,quantize:static-qdq-per-channel",
)


def _latents_at(model: onnx.ModelProto, out: str, x: np.ndarray, h: PerceptualHash, encoder,
                target: str = "native", hardware: dict | None = None) -> np.ndarray:
    f = F.run(model, x, out, target=target, hardware=hardware)
    return hashing.reduce_features(f, h.reduce, encoder)


def survive(model: onnx.ModelProto, h: PerceptualHash, signal: np.ndarray, noise: np.ndarray,
            calibration_inputs: np.ndarray | None = None, attacks=DEFAULT_ATTACKS, *,
            calibration_source: str = "signal+noise", seed: int = 0, target: str = "native") -> dict[str, Any]:
    """Survival table of ``h`` on ``model`` (the model the hash was built for), the models run on
    ``target``; ``hardware`` in the result is where they ran."""
    from auditor.attacks.compose import compose, parse_steps
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import from_arrays

    for spec in attacks:
        parse_steps(spec)  # bad syntax is the user's error, before any work
    exposed, out = F.expose(model, h.layer)
    encoder = hashing.load_encoder(h)
    if calibration_inputs is None:
        calibration_inputs = np.concatenate([signal, noise])
    calibration = Calibration(from_arrays(model, np.ascontiguousarray(calibration_inputs, np.float32),
                                          source=calibration_source, seed=seed))
    hw: dict[str, Any] = {}
    z_s0 = _latents_at(exposed, out, signal, h, encoder, target, hw)
    z_n0 = _latents_at(exposed, out, noise, h, encoder, target)
    d_s0, d_n0 = hashing.distances(z_s0, h), hashing.distances(z_n0, h)
    before = {"tpr": float(np.mean(d_s0 <= 1)), "fpr": float(np.mean(d_n0 <= 1)),
              "auc": hashing.auc(-d_s0, -d_n0),
              "centroid_offset_r": float(np.linalg.norm(z_s0.mean(0) - h.centroid) / h.radius)}
    rows = []
    for spec in attacks:
        row: dict[str, Any] = {"attack": spec}
        try:
            r = compose(exposed, spec, calibration, prune_seed=seed)
            z_s = _latents_at(r.model, out, signal, h, encoder, target)
            z_n = _latents_at(r.model, out, noise, h, encoder, target)
        except AuditError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        d_s, d_n = hashing.distances(z_s, h), hashing.distances(z_n, h)
        row.update({
            "tpr": float(np.mean(d_s <= 1)), "fpr": float(np.mean(d_n <= 1)), "auc": hashing.auc(-d_s, -d_n),
            "flips_signal": int(((d_s <= 1) != (d_s0 <= 1)).sum()),
            "flips_noise": int(((d_n <= 1) != (d_n0 <= 1)).sum()),
            "centroid_drift_r": float(np.linalg.norm(z_s.mean(0) - z_s0.mean(0)) / h.radius),
            "centroid_offset_r": float(np.linalg.norm(z_s.mean(0) - h.centroid) / h.radius),
            "latent_shift_r": {"mean": float(np.mean(np.linalg.norm(np.concatenate([z_s - z_s0, z_n - z_n0]), axis=1)) / h.radius),
                               "max": float(np.max(np.linalg.norm(np.concatenate([z_s - z_s0, z_n - z_n0]), axis=1)) / h.radius)},
            "notes": r.notes, "simulated": r.simulated})
        row["flips"] = row["flips_signal"] + row["flips_noise"]
        rows.append(row)
    return {"n_signal": int(len(signal)), "n_noise": int(len(noise)), "before": before, "attacks": rows,
            "calibration": calibration.data.describe(), "target": target, "hardware": hw,
            "survived": all("error" not in r and r["flips"] == 0 for r in rows)}
