#!/usr/bin/env bash
# Every GPU target (onnxruntime CUDA EP, onnxruntime TensorRT EP, native TensorRT when importable)
# on a small fixture, one JSON result with the hardware record:
#
#   scripts/gpu-check.sh WHEELDIR OUT.json
#
# For a bare CUDA machine with Python and torch: onnxruntime-gpu (and whatever else the auditor
# needs that the machine lacks) is installed from the wheels in WHEELDIR (`make gpu-wheels`
# prepares it; nothing is downloaded here) into a virtual environment that sees the machine's
# torch (build/gpu-venv, or $GPU_VENV). The fixture data-digits-cnn comes from $WMAUDIT_FIXTURES
# (default build/fixtures); it is built with torch when missing. Runs in under 8 minutes
# (GPU_CHECK_TIMEOUT seconds for the measurements, default 420).
#
# A missing piece (no GPU, no driver, no wheel, torch without CUDA, an install that fails, the
# CUDA provider not starting) stops it with one line on stderr and exit 2, before anything is
# written. A target that cannot run (TensorRT not installed) is recorded as not run, with why;
# no number is ever written for a target that did not run. Exit 1 when some target did not run.
set -uo pipefail

die() { echo "gpu-check: error: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: scripts/gpu-check.sh WHEELDIR OUT.json"
WHEELS=$1
OUT=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

[ -d "$WHEELS" ] || die "$WHEELS: no such folder (make gpu-wheels prepares it)"
case "$OUT" in
  *.json) ;;
  *) die "$OUT: the result must be a .json file" ;;
esac
[ -d "$(dirname -- "$OUT")" ] || die "$(dirname -- "$OUT"): no such folder for the result"
[ ! -d "$OUT" ] || die "$OUT is a folder"
WHEELS=$(cd -- "$WHEELS" && pwd)
OUT=$(cd -- "$(dirname -- "$OUT")" && pwd)/$(basename -- "$OUT")

command -v nvidia-smi >/dev/null 2>&1 || die "no NVIDIA GPU here: nvidia-smi not found (this check needs a CUDA GPU and its driver)"
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || die "no NVIDIA GPU here: nvidia-smi lists no device"

shopt -s nullglob
wheels=("$WHEELS"/onnxruntime_gpu-*.whl)
shopt -u nullglob
[ ${#wheels[@]} -ge 1 ] || die "no onnxruntime_gpu-*.whl in $WHEELS (make gpu-wheels downloads the version in requirements.lock)"
[ ${#wheels[@]} -eq 1 ] || die "several onnxruntime_gpu wheels in $WHEELS: keep the one matching requirements.lock"
# onnxruntime-gpu is not published for every release (1.32.0 is CPU-only on PyPI): a GPU wheel of
# another release is used and said so (the result records both versions; its reference runs on
# that same package's CPU provider, so every comparison in it is within one release)
want=$(grep -oE '^onnxruntime==[^ ]+' "$ROOT/requirements.lock" | cut -d= -f3)
have=$(basename "${wheels[0]}" | cut -d- -f2)
[ -z "$want" ] || [ "$have" = "$want" ] \
  || echo "gpu-check: note: $(basename "${wheels[0]}") is onnxruntime-gpu $have; requirements.lock has onnxruntime $want" >&2

command -v "$PY" >/dev/null 2>&1 || die "$PY not found (set PYTHON to the interpreter that has torch)"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 \
  || die "$PY has no torch with a usable CUDA device (torch.cuda.is_available() is false or torch is missing)"

VENV=${GPU_VENV:-$ROOT/build/gpu-venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 \
    || die "could not make the virtual environment $VENV (on Debian / Ubuntu: the python3-venv package)"
fi
# everything from WHEELDIR only (the machine may be offline); the venv's onnxruntime-gpu shadows
# a CPU onnxruntime of the system's site-packages
log=$(mktemp)
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${wheels[0]}" \
    numpy onnx jsonschema pillow onnxscript onnxconverter-common scipy >"$log" 2>&1 \
  || { line=$(grep -m1 -E 'ERROR|No matching' "$log"); rm -f "$log"; die "installing from $WHEELS failed: ${line:-see pip}"; }
rm -f "$log"

FIX=${WMAUDIT_FIXTURES:-$ROOT/build/fixtures}
mkdir -p "$FIX" && FIX=$(cd -- "$FIX" && pwd) || die "$FIX: cannot make the fixture folder"
if [ ! -f "$FIX/data-digits-cnn/.done" ]; then
  (cd "$ROOT" && "$VENV/bin/python" -m fixtures.build --out "$FIX" data-digits-cnn >/dev/null 2>&1) \
    || die "fixture data-digits-cnn is missing in $FIX and could not be built here (python -m fixtures.build needs the export extra: torch, scikit-learn, scikit-image)"
fi

cd "$ROOT" || die "$ROOT: cannot enter the repository"
limit=${GPU_CHECK_TIMEOUT:-420}
timeout "$limit" "$VENV/bin/python" scripts/gpu_check.py --fixtures "$FIX" --out "$OUT" \
  --onnxruntime-lock "${want:-unknown}"
rc=$?
[ $rc -ne 124 ] || die "the checks ran past ${limit} s and were stopped; nothing was written"
exit $rc
