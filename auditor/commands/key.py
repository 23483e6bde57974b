"""wmaudit key: import keys made by other tools, show and verify key files."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

from auditor import results
from auditor.errors import AuditError
from auditor.marks.keys import Key, check_capacity, load_key, make_mark, reduced_length, save_key, sha256_file

HELP = "import, show and verify key files"
DESCRIPTION = """Key files.

  wmaudit key import --matrix X.npy --bits bits.npy --param conv2.weight \\
                     --shape 64,32,3,3 --reduce mean -o key.json
      white-box key from another Uchida implementation: X is T x N (or N x T with
      --transposed), bits are 0/1, the shape is the torch layout of the parameter.
  wmaudit key import --seed 7 --bits bits.npy --param ... --shape ... --reduce ... -o key.json
      X rebuilt from numpy.random.default_rng(seed).standard_normal((T, N)).
  wmaudit key new --owner ACME --nonce 2026-q1-conv2 --date 2026-01-15 \\
                  --param conv2.weight --shape 32,32,3,3 --reduce mean --bits-count 256 -o key.json
      committed key: X and bits derived from the owner statement (owner, nonce, date,
      mark); the statement's commitment is what the owner records or timestamps.
  wmaudit key import ... --anchors-from REF.onnx -o key.json
      also store the BatchNorm that follows the marked conv in REF.onnx (the owner's
      model, BN kept) as anchors: BN folding is then undone without --reference.
  wmaudit key import --images keys.npy --labels labels.npy -o key.json
      black-box trigger set (images N x C x H x W .npy or a folder of PNGs).
  wmaudit key show KEY.json      summary (no secret material printed)
  wmaudit key verify KEY.json    schema, commitment and sidecar checks"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="key_command", metavar="ACTION", parser_class=type(p))
    imp = sub.add_parser("import", help="build a key from raw material made by another tool")
    imp.add_argument("--matrix", help="projection X as .npy (T x N, or N x T with --transposed)")
    imp.add_argument("--transposed", action="store_true", help="the matrix is N x T")
    imp.add_argument("--seed", type=int, help="rebuild X from the documented numpy generator with this seed")
    imp.add_argument("--scale", type=float, default=1.0, help="scale of the generated X (default 1)")
    imp.add_argument("--bits", help="bits as .npy of 0/1")
    imp.add_argument("--param", help="torch parameter name, e.g. conv2.weight")
    imp.add_argument("--shape", help="torch shape of the parameter, e.g. 64,32,3,3")
    imp.add_argument("--reduce", choices=["mean", "flatten"], help="mean over output channels, or all coefficients")
    imp.add_argument("--id", help="mark id (default: the parameter name)")
    imp.add_argument("--images", help="trigger images: .npy N x C x H x W, or a folder of PNGs")
    imp.add_argument("--labels", help="trigger labels: .npy or a text file, one integer per line")
    imp.add_argument("--num-classes", type=int, help="number of model outputs (for the 1/C null rate)")
    imp.add_argument("--anchors-from", metavar="REF.onnx",
                     help="store the BatchNorm anchors of the owner's model (exported with BatchNorm kept) in "
                          "the key, so that a BN-folded deployment needs no reference later")
    imp.add_argument("--append", action="store_true", help="add the mark to an existing key file -o")
    imp.add_argument("-o", "--output", required=True, help="key file to write")
    new = sub.add_parser("new", help="a committed white-box key derived from an owner statement")
    new.add_argument("--owner", required=True, help="owner id, as the owner states it")
    new.add_argument("--nonce", required=True, help="a string never used before for this owner (one per mark)")
    new.add_argument("--date", required=True, help="date of the statement, YYYY-MM-DD")
    new.add_argument("--param", required=True, help="torch parameter name, e.g. conv2.weight")
    new.add_argument("--shape", required=True, help="torch shape of the parameter, e.g. 32,32,3,3")
    new.add_argument("--reduce", required=True, choices=["mean", "flatten"])
    new.add_argument("--bits-count", type=int, default=256, help="number of bits T (default 256)")
    new.add_argument("--id", help="mark id (default: the parameter name)")
    new.add_argument("--append", action="store_true", help="add the mark to an existing key file -o")
    new.add_argument("-o", "--output", required=True, help="key file to write")
    show = sub.add_parser("show", help="summarise a key file")
    show.add_argument("key")
    show.add_argument("--json", action="store_true")
    ver = sub.add_parser("verify", help="check schema, commitment and sidecars of a key file")
    ver.add_argument("key")
    ver.add_argument("--json", action="store_true")


def run(args) -> int:
    if args.key_command == "import":
        return _import(args)
    if args.key_command == "new":
        return _new(args)
    if args.key_command == "show":
        return _show(args, verify=False)
    if args.key_command == "verify":
        return _show(args, verify=True)
    raise AuditError("missing action: import, show or verify (see wmaudit key --help)")


def parse_shape(s: str) -> tuple[int, ...]:
    compact = re.sub(r"\s+", "", s)
    if not re.fullmatch(r"\d+([,x×]\d+)*", compact):
        raise AuditError(f"--shape must be integers separated by commas, got {s!r}")
    shape = tuple(int(x) for x in re.split(r"[,x×]", compact))
    if any(d <= 0 for d in shape):
        raise AuditError(f"--shape must be positive integers, got {s!r}")
    return shape


def _load_npy(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"{what} file not found: {path}")
    try:
        return np.load(p, allow_pickle=False)
    except Exception as e:
        raise AuditError(f"cannot read {what} {path} as .npy: {e}") from None


def load_bits(path: str) -> np.ndarray:
    b = _load_npy(path, "bits").reshape(-1)
    if b.dtype == bool:
        b = b.astype(np.uint8)
    if b.size == 0 or not np.isin(b, (0, 1)).all():
        raise AuditError(f"bits in {path} must be 0/1 (found values {sorted(set(np.unique(b).tolist()))[:5]})")
    return b.astype(np.uint8)


def _import(args) -> int:
    out = Path(args.output)
    if args.images or args.labels:
        if not (args.images and args.labels):
            raise AuditError("a trigger-set import needs both --images and --labels")
        try:
            from auditor.marks.blackbox import import_trigger_key
        except ImportError:
            raise AuditError("black-box keys are not available in this build") from None
        import_trigger_key(args.images, args.labels, out, num_classes=args.num_classes)
        print(f"wrote {out}")
        return 0
    missing = [f"--{n}" for n in ("bits", "param", "shape", "reduce") if getattr(args, n) is None]
    if missing:
        raise AuditError(f"a white-box import needs {', '.join(missing)}")
    if (args.matrix is None) == (args.seed is None):
        raise AuditError("give exactly one of --matrix X.npy or --seed S")
    shape = parse_shape(args.shape)
    if args.reduce == "mean" and len(shape) < 2:
        raise AuditError("--reduce mean needs a parameter with at least 2 axes")
    bits = load_bits(args.bits)
    T, N = bits.size, reduced_length(shape, args.reduce)
    check_capacity(args.param, shape, args.reduce, T)
    if args.anchors_from is not None and len(shape) != 4:
        raise AuditError(f"--anchors-from: BatchNorm anchors apply to a conv weight (4 axes), {args.param} "
                         f"has shape {list(shape)}")
    key = load_key(out) if args.append else Key(whitebox=[], model={})
    mark_id = args.id or args.param
    if any(m.id == mark_id for m in key.whitebox):
        raise AuditError(f"the key already has a mark {mark_id!r} (use --id)")
    sidecar_tmp = None
    if args.seed is not None:
        if args.seed < 0:
            raise AuditError("--seed must be >= 0")
        mark = make_mark(args.param, shape, args.reduce, bits, seed=args.seed, scale=args.scale, id=mark_id)
    else:
        X = _load_npy(args.matrix, "matrix")
        if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
            raise AuditError(f"matrix must be a 2-D numeric array, got shape {list(X.shape)} {X.dtype}")
        if args.transposed:
            X = X.T
        if X.shape != (T, N):
            hint = " (it looks N x T: add --transposed)" if X.shape == (N, T) else ""
            raise AuditError(f"matrix is {X.shape[0]}x{X.shape[1]}, expected {T}x{N} = bits x reduced length of "
                             f"{list(shape)} with reduce={args.reduce}{hint}")
        if not np.isfinite(X).all():
            raise AuditError("matrix has non-finite values")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", mark_id)
        name = f"{out.stem}.{safe}.X.npy"
        out.parent.mkdir(parents=True, exist_ok=True)
        sidecar_tmp = out.parent / f".{name}.tmp{os.getpid()}"
        with open(sidecar_tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(X.astype(np.float64)))
        mark = make_mark(args.param, shape, args.reduce, bits, matrix_path=name,
                         matrix_sha256=sha256_file(sidecar_tmp), id=mark_id)
    mark.extra["imported"] = {"matrix": Path(args.matrix).name if args.matrix else None,
                              "bits": Path(args.bits).name}
    if args.anchors_from is not None:
        mark.batchnorm = anchors_from(args.anchors_from, mark)
        mark.extra["imported"]["anchors_from"] = {"model": Path(args.anchors_from).name,
                                                  "sha256": sha256_file(Path(args.anchors_from))}
    key.whitebox.append(mark)
    try:
        if sidecar_tmp is not None:
            os.replace(sidecar_tmp, out.parent / mark.projection["path"])
        save_key(key, out)
    finally:
        if sidecar_tmp is not None and sidecar_tmp.exists():
            sidecar_tmp.unlink()
    print(f"wrote {out} ({T} bits on {args.param} {list(shape)}, reduce={args.reduce})")
    return 0


def _new(args) -> int:
    from auditor.marks.evidence import commit_seed, committed_mark

    out = Path(args.output)
    shape = parse_shape(args.shape)
    if args.reduce == "mean" and len(shape) < 2:
        raise AuditError("--reduce mean needs a parameter with at least 2 axes")
    key = load_key(out) if args.append else Key(whitebox=[], model={})
    mark = committed_mark(args.owner, args.nonce, args.date, param=args.param, shape=shape, reduce=args.reduce,
                          n_bits=args.bits_count, id=args.id or args.param)
    if any(m.id == mark.id for m in key.whitebox):
        raise AuditError(f"the key already has a mark {mark.id!r} (use --id)")
    if any(m.projection.get("seed") == commit_seed(args.owner, args.nonce) for m in key.whitebox):
        raise AuditError("the key already has a mark from this owner and nonce: use a new --nonce per mark")
    key.whitebox.append(mark)
    save_key(key, out)
    st = mark.extra["statement"]
    print(f"wrote {out} ({mark.n_bits} bits on {args.param} {list(shape)}, reduce={args.reduce})\n"
          f"statement {st['commitment']} (owner {args.owner!r}, nonce {args.nonce!r}, {args.date}): "
          f"record or timestamp this commitment")
    return 0


def anchors_from(path: str, mark) -> dict:
    """gamma, beta, running_mean, running_var, eps of the BatchNorm after the marked conv in `path`."""
    from auditor.marks.whitebox import reference_batchnorm

    if not Path(path).is_file():
        raise AuditError(f"--anchors-from: model not found: {path}")
    bn = reference_batchnorm(path, mark)
    return {"gamma": [float(v) for v in bn["gamma"]], "beta": [float(v) for v in bn["beta"]],
            "running_mean": [float(v) for v in bn["running_mean"]],
            "running_var": [float(v) for v in bn["running_var"]], "eps": float(bn["eps"])}


def _show(args, verify: bool) -> int:
    from auditor.marks.evidence import classify_mark, statement_problems

    key = load_key(args.key)
    marks = []
    for m in key.whitebox:
        if verify:
            m.matrix()  # checks sidecar presence, sha256 and shape
            if "statement" in m.extra:
                problems = statement_problems(m)
                if problems:
                    raise AuditError(f"mark {m.id!r}: {problems[0]}")
        ev = classify_mark(m)
        marks.append({"id": m.id, "param": m.param, "shape": list(m.shape), "reduce": m.reduce,
                      "n_bits": m.n_bits, "projection": m.projection.get("kind"),
                      "batchnorm_anchors": m.batchnorm is not None, "evidence": ev["kind"],
                      "statement": ev.get("statement"), "date": ev.get("date")})
    if verify and key.blackbox:
        try:
            from auditor.marks.blackbox import verify_blackbox_key
        except ImportError:
            verify_blackbox_key = None
        if verify_blackbox_key is not None:
            verify_blackbox_key(key)
    doc = {"key": str(args.key), "commitment": key.commitment, "whitebox": marks,
           "blackbox": sorted(key.blackbox) if key.blackbox else [], "verified": verify}
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print(f"key {args.key}\ncommitment {key.commitment}")
        for m in marks:
            print(f"  white-box {m['id']}: {m['param']} {m['shape']} reduce={m['reduce']} {m['n_bits']} bits, "
                  f"X by {m['projection']}{', BN anchors' if m['batchnorm_anchors'] else ''}; {m['evidence']}"
                  + (f" (statement {m['statement'][:19]}…, {m['date']})" if m["statement"] else ""))
        for k in doc["blackbox"]:
            print(f"  black-box {k}")
        if verify:
            print("verified: schema, commitment, sidecars and statement derivations are consistent")
    return 0
