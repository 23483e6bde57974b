#!/usr/bin/env bash
# Fetch real ONNX files written by others into $1 (default build/data/thirdparty).
# Each comes from a PyPI wheel at a pinned version; only the .onnx files are
# extracted (none of these models uses external data), then checked against the
# sha256 recorded below. Idempotent: a file already present with the right
# sha256 is not fetched again. See docs/thirdparty.md for what each file exercises.
set -euo pipefail
out=${1:-build/data/thirdparty}
mkdir -p "$out"

# package==version | wheel platform (or "any") | member in the wheel | local name | sha256
files=(
  "rapidocr-onnxruntime==1.4.4|any|rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx|ppocr_cls.onnx|e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
  "silero-vad==6.2.3|any|silero_vad/data/silero_vad.onnx|silero_vad.onnx|1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
  "silero-vad==6.2.3|any|silero_vad/data/silero_vad_16k_op15.onnx|silero_vad_16k_op15.onnx|7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"
  "magika==1.0.3|manylinux_2_28_x86_64|magika/models/standard_v3_3/model.onnx|magika_v3_3.onnx|fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"
  "captcha-whisperer==0.1.0|any|captcha_whisperer/models/captcha_crnn.onnx|captcha_crnn.onnx|7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b"
)

sha() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for entry in "${files[@]}"; do
  IFS='|' read -r pkg plat member name want <<<"$entry"
  dst="$out/$name"
  if [ -f "$dst" ] && [ "$(sha "$dst")" = "$want" ]; then
    echo "$want  $dst"
    continue
  fi
  wdir="$tmp/${pkg//=/_}"
  if [ ! -d "$wdir" ]; then
    # A platform wheel (magika) is asked for by tag so the same file comes on any host.
    opts=()
    [ "$plat" != any ] && opts=(--only-binary=:all: --platform "$plat" --python-version 3.11 --implementation cp)
    python3 -m pip download -q --no-deps "${opts[@]}" -d "$wdir" "$pkg" >/dev/null 2>&1 \
      || { echo "error: cannot download $pkg from PyPI" >&2; exit 2; }
  fi
  python3 - "$wdir" "$member" "$dst" <<'PY' || { echo "error: $member not found in the $pkg wheel" >&2; exit 2; }
import glob, os, sys, zipfile
wdir, member, dst = sys.argv[1:]
wheel = glob.glob(os.path.join(wdir, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read(member)
tmp = dst + ".part"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, dst)
PY
  got=$(sha "$dst")
  if [ "$got" != "$want" ]; then
    rm -f "$dst"
    echo "error: sha256 of $name from $pkg is $got, expected $want" >&2
    exit 2
  fi
  echo "$got  $dst"
done
