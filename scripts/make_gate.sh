#!/usr/bin/env bash
# `make gate`: the example release policy on a marked fixture; JSON, JUnit XML and HTML in build/gate.
# Exit status is the gate's: 0 pass, 1 fail, 2 error.
# Usage: scripts/make_gate.sh [PYTHON] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=${2:-build/gate}
FIXTURE=${WMAUDIT_GATE_FIXTURE:-cnn-small-mean}
POLICY=${WMAUDIT_GATE_POLICY:-examples/release-policy.toml}
DIR=$("$PY" -c "from fixtures.build import ensure; print(ensure('$FIXTURE'))")
mkdir -p "$OUT"
rc=0
"$PY" -m auditor gate "$DIR/model.onnx" --key "$DIR/key.json" --policy "$POLICY" \
    -o "$OUT/gate.json" --junit "$OUT/junit.xml" || rc=$?
if [ -f "$OUT/gate.json" ]; then
    "$PY" -m auditor report "$OUT/gate.json" -o "$OUT/gate.html" --title "wmaudit release gate: $FIXTURE"
fi
exit $rc
