#!/usr/bin/env bash
# `make report`: robustness grid on a marked CNN fixture, rendered as build/report/report.html.
# WMAUDIT_REPORT_FIXTURE picks the fixture (default: the marked SmallCNN, cnn-small-mean).
# Usage: scripts/make_report.sh [PYTHON] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=${2:-build/report}
FIXTURE=${WMAUDIT_REPORT_FIXTURE:-cnn-small-mean}
DIR=$("$PY" -c "from fixtures.build import ensure; print(ensure('$FIXTURE'))")
mkdir -p "$OUT"
# exit 1 means "the mark broke somewhere": still a result to report
"$PY" -m auditor robustness "$DIR/model.onnx" --key "$DIR/key.json" -o "$OUT/robustness" --heldout 1000 || [ $? -eq 1 ]
"$PY" -m auditor report "$OUT/robustness/results.json" -o "$OUT/report.html" --title "wmaudit robustness report: $FIXTURE"
echo "report: $OUT/report.html"
