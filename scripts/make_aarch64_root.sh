#!/usr/bin/env bash
# An arm64 root for the `aarch64` target: Debian's arm64 Python 3.11 (the same release as this
# machine's Debian) and the aarch64 wheels of onnxruntime, numpy and archspec, run by
# qemu-aarch64 -L ROOT. Debian packages come from `apt-get download` (the arm64 architecture is
# added to dpkg's list for that; nothing arm64 is installed on this machine) and are unpacked
# with dpkg -x; the wheels are pip-installed for the aarch64 platform into ROOT/site.
# usage: make_aarch64_root.sh ROOT PYTHON   (PYTHON: an x86 Python with pip, used only to fetch wheels)
set -euo pipefail
root=${1:?usage: make_aarch64_root.sh ROOT PYTHON}
py=${2:?usage: make_aarch64_root.sh ROOT PYTHON}
ORT=${AARCH64_ONNXRUNTIME:-1.27.0}
NUMPY=${AARCH64_NUMPY:-2.4.6}
ARCHSPEC=${AARCH64_ARCHSPEC:-0.2.7}
PKGS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1
      libuuid1 libsqlite3-0 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib"
command -v qemu-aarch64 >/dev/null || {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq --no-install-recommends qemu-user >/dev/null \
    || { echo "error: qemu-aarch64 is missing (apt-get install qemu-user)" >&2; exit 2; }; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  [ "$(id -u)" = 0 ] || { echo "error: run as root once (dpkg --add-architecture arm64) to fetch arm64 packages" >&2; exit 2; }
  dpkg --add-architecture arm64
fi
(cd "$tmp" && apt-get download $(for p in $PKGS; do echo "$p:arm64"; done) >/dev/null 2>&1) || {
  [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1
  (cd "$tmp" && apt-get download $(for p in $PKGS; do echo "$p:arm64"; done) >/dev/null) ; }
rm -rf "$root.tmp"
mkdir -p "$root.tmp"
for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$root.tmp"; done
# Debian's usrmerge layout: the loader is looked up under /lib
[ -e "$root.tmp/lib" ] || ln -s usr/lib "$root.tmp/lib"
"$py" -m pip install -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
  --target "$root.tmp/site" "onnxruntime==$ORT" "numpy==$NUMPY" "archspec==$ARCHSPEC" 2>&1 | grep -v "^WARNING: Location" || true
ls "$root.tmp/site/onnxruntime" >/dev/null
ls "$tmp"/*.deb | xargs -n1 basename > "$root.tmp/debs.txt"
printf '{"onnxruntime": "%s", "numpy": "%s", "archspec": "%s"}\n' "$ORT" "$NUMPY" "$ARCHSPEC" > "$root.tmp/versions.json"
# the proof that it runs: onnxruntime imports under the emulator
QEMU_LD_PREFIX="$root.tmp" PYTHONPATH="$root.tmp/site" timeout 300 qemu-aarch64 -L "$root.tmp" "$root.tmp/usr/bin/python3.11" -s -c \
  "import platform, numpy, onnxruntime as o; assert platform.machine() == 'aarch64'; print('aarch64 root:', platform.machine(), 'onnxruntime', o.__version__, 'numpy', numpy.__version__)"
touch "$root.tmp/.done"
rm -rf "$root"
mv "$root.tmp" "$root"
