#!/usr/bin/env bash
# `make report`: robustness grid on a marked CNN fixture plus the decoded logos of the
# black-box logo fixture, rendered as one self-contained build/report/report.html.
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
# black-box evidence: the logo key of the marked Wide ResNet, decoded from 1/3/5/10/20 key images
LOGO=$("$PY" -c "from fixtures.build import ensure; print(ensure('bb-logo-wrn'))")
"$PY" -m auditor query "$LOGO/marked.onnx" --key "$LOGO/key.json" --backend ort-cpu --json \
    --logo-out "$OUT/logos" > "$OUT/query.json.tmp" || [ $? -eq 1 ]
mv "$OUT/query.json.tmp" "$OUT/query.json"
"$PY" -m auditor report "$OUT/robustness/results.json" "$OUT/query.json" -o "$OUT/report.html" \
    --title "wmaudit robustness report: $FIXTURE + logo key on bb-logo-wrn"
echo "report: $OUT/report.html"
