"""What a keyed model delivers, measured with onnxruntime (``wmaudit keyed verify``).

On labelled inputs x: parity (keyed model on encrypted x vs plain model on x:
max |logit diff| and top-1 agreement); accuracy of the plain model on x, of the
keyed model with the right key, on plain images, and with k random wrong keys
(same geometry and variant, seeds drawn from ``default_rng(seed)``; mean and
worst). Then the same under deployment attacks, each applied to the plain and
to the keyed float model the way a deployer would (onnxruntime int8 in every
mode, fp16, magnitude pruning; static modes calibrate the plain model on plain
and the keyed model on encrypted calibration images): accuracy of both, their
difference (does the orthogonal mixing make int8 better or worse?), and the
parity of the two attacked models; an exact McNemar test on the paired
predictions says whether the accuracy difference is more than chance.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from auditor.keyed import cipher, keys
from auditor.keyed import model as km
from auditor.keyed.keys import KeyedKey

ATTACKS = ("quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel", "quantize:static-qop",
           "quantize:static-qop-per-channel", "fp16", "prune:0.5")


def wrong_keys(key: KeyedKey, k: int, seed: int = 0) -> list[KeyedKey]:
    """k random keys of the same geometry and variant (seeds from default_rng(seed), never the key's own)."""
    own = {key.doc.get("block_permutation", {}).get("seed")}
    seeds = [int(s) for s in np.random.default_rng(seed).integers(0, 2 ** 31 - 2, size=k + 1) if int(s) not in own][:k]
    return [keys.parse(keys.generate(image_size=(key.height, key.width), channels=key.channels, block=key.block,
                                     seed=s, variant=key.variant)) for s in seeds]


def _acc(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def _compare(a: np.ndarray, b: np.ndarray, atol: float) -> dict[str, Any]:
    diff = float(np.abs(a.astype(np.float64) - b).max())
    agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    return {"max_abs_diff": diff, "top1_agreement": agree, "samples": int(len(a)), "atol": atol,
            "holds": bool(diff <= atol and agree == 1.0)}


def accuracies(plain, keyed, key: KeyedKey, x: np.ndarray, y: np.ndarray, *, n_wrong: int = 5, seed: int = 0,
               atol: float = km.PARITY_ATOL, target: str = "native") -> dict[str, Any]:
    """Parity and the accuracy table on float models (see the module docstring), run on ``target``."""
    xe = cipher.encrypt(x, key)
    lp, lk = km.run(plain, x, target=target), km.run(keyed, xe, target=target)
    wrong = [_acc(km.run(keyed, cipher.encrypt(x, w), target=target), y) for w in wrong_keys(key, n_wrong, seed)]
    n = int(len(y))
    return {
        "parity": _compare(lp, lk, atol),
        "accuracy": {
            "plain_model_plain_images": {"accuracy": _acc(lp, y), "samples": n},
            "keyed_model_right_key": {"accuracy": _acc(lk, y), "samples": n},
            "keyed_model_plain_images": {"accuracy": _acc(km.run(keyed, x, target=target), y), "samples": n},
            "keyed_model_wrong_keys": {"keys": len(wrong), "samples_per_key": n, "seed": int(seed),
                                       "mean": float(np.mean(wrong)) if wrong else None,
                                       "worst": float(np.max(wrong)) if wrong else None,
                                       "each": wrong},
            "chance": 1.0 / lp.shape[1],
        },
    }


def under_attacks(plain, keyed, key: KeyedKey, x: np.ndarray, y: np.ndarray, calibration_inputs: np.ndarray, *,
                  attacks=ATTACKS, calibration_seed: int = 0, target: str = "native") -> list[dict[str, Any]]:
    """Each attack on both float models: accuracies, their difference, parity of the attacked pair
    (the models run on ``target``)."""
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import from_arrays

    plain_m, keyed_m = _proto(plain), _proto(keyed)
    cal_plain = Calibration(from_arrays(plain_m, calibration_inputs, source="plain calibration inputs",
                                        seed=calibration_seed))
    cal_keyed = Calibration(from_arrays(keyed_m, cipher.encrypt(calibration_inputs, key),
                                        source="encrypted calibration inputs", seed=calibration_seed))
    xe = cipher.encrypt(x, key)
    lp0, lk0 = km.run(plain_m, x, target=target), km.run(keyed_m, xe, target=target)
    rows = []
    for step in attacks:
        ap = compose(plain_m, step, cal_plain)
        ak = compose(keyed_m, step, cal_keyed)
        lp, lk = km.run(ap.model, x, target=target), km.run(ak.model, xe, target=target)
        acc_p, acc_k = _acc(lp, y), _acc(lk, y)
        rows.append({"attack": step, "samples": int(len(y)),
                     "plain_accuracy": acc_p, "keyed_accuracy": acc_k, "keyed_minus_plain": acc_k - acc_p,
                     "paired_test": mcnemar(lp.argmax(1) == y, lk.argmax(1) == y),
                     "plain_agreement_with_float": float(np.mean(lp.argmax(1) == lp0.argmax(1))),
                     "keyed_agreement_with_float": float(np.mean(lk.argmax(1) == lk0.argmax(1))),
                     "parity": _compare(lp, lk, km.PARITY_ATOL), "simulated": bool(ak.simulated)})
    return rows


def mcnemar(right_plain: np.ndarray, right_keyed: np.ndarray) -> dict[str, Any]:
    """Exact two-sided McNemar test on the same inputs: H0 = plain and keyed attacked models are
    equally accurate (each discordant input favours either with probability 1/2)."""
    from auditor.marks import stats

    b = int(np.sum(right_plain & ~right_keyed))
    c = int(np.sum(right_keyed & ~right_plain))
    p = 1.0 if b == c else min(1.0, 2 * stats.binom_tail_half(b + c, max(b, c)))
    return {"test": "exact McNemar (two-sided)", "plain_only_right": b, "keyed_only_right": c, "p_value": p}


def _proto(m):
    import onnx

    if isinstance(m, onnx.ModelProto):
        return m
    from auditor.attacks import load_model

    return load_model(m)
