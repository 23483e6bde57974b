"""The robustness report as a person sees it, screenshot in headless Chromium: one headline,
the attack x target survival matrix before any chart, and line charts whose coinciding
series (identical quantization curves) each stay visible in their own colour."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import wmaudit
from auditor.report import html, plots


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


GRID = '[grid]\nprune_rates = [0.0, 0.3, 0.9]\nquantize = ["none", "dynamic", "fp16"]\n'


@pytest.fixture(scope="module")
def grid_doc(build_fixture, tmp_path_factory):
    d = build_fixture("attacks-tinycnn-marked")
    tmp = tmp_path_factory.mktemp("shot")
    (tmp / "grid.toml").write_text(GRID)
    r = wmaudit.robustness(d / "model.onnx", d / "key.json", grid=tmp / "grid.toml", samples=300, jobs=1)
    return r.document, tmp


def test_page_order_and_one_headline(grid_doc):
    doc, _ = grid_doc
    page = html.render([doc])
    cls, line = html.verdict_of(doc)
    assert page.count(html._e(line)) == 1 and page.count('<div class="verdict') == 1
    assert "broke the model" in line or "configs that left the model usable" in line
    matrix = page.index('<table class="matrix">')
    assert matrix < page.index("<svg") and matrix < page.index("Provenance")
    for row in doc["configs"]:   # every config in the matrix, with the model's state
        assert html._e(row["name"]) in page[matrix:page.index("</table>", matrix)]


def test_coinciding_series_are_told_apart(grid_doc):
    doc, _ = grid_doc
    page = html.render([doc])
    ber = page[page.index("Bit error rate vs pruning rate"):]
    ber = ber[:ber.index("</svg>")]
    lines = re.findall(r"<polyline [^>]*>", ber)
    assert len(lines) == 3
    styles = {(re.search(r'stroke="([^"]+)"', s).group(1), (re.search(r'stroke-dasharray="([^"]+)"', s) or
                                                             re.match("", "")).group(0)) for s in lines}
    assert len(styles) == 3                       # a colour and a dash pattern of its own each
    widths = [float(re.search(r'stroke-width="([\d.]+)"', s).group(1)) for s in lines]
    assert widths == sorted(widths, reverse=True)  # earlier series wider, underneath
    # a series identical to an earlier one (fp16 and int8 often read the same bits as float at
    # every pruning rate) is named as such in the legend
    from auditor.report import grid_rows

    curves: dict[str, list] = {}
    for r in grid_rows(doc):
        if r.get("mark") and r.get("ber") is not None:
            curves.setdefault(r["precision"], []).append((r["prune_rate"], r["ber"]))
    order = [p for p in ("float", "dynamic", "fp16") if p in curves]
    for i, p in enumerate(order):
        twin = next((q for q in order[:i] if sorted(set(curves[q])) == sorted(set(curves[p]))), None)
        assert (f"{p} (= {twin})" in ber) == (twin is not None), p


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make browser)")
def test_screenshot_shows_every_series(grid_doc):
    from PIL import Image

    doc, tmp = grid_doc
    page = tmp / "report.html"
    page.write_text(html.render([doc]), encoding="utf-8")
    shot = tmp / "shot.png"
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    # each of the three series' colours is on screen (none hidden under another)
    for color in plots.PALETTE[:3]:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.int16)
        assert int((np.abs(px - rgb).max(axis=1) <= 24).sum()) > 50, color
    # the matrix' cell colours: survived (green) and model broken (grey) are both drawn
    for rgb in ((0xd8, 0xf0, 0xdc), (0xe6, 0xe6, 0xe6)):
        assert int((np.abs(px - np.array(rgb, np.int16)).max(axis=1) <= 3).sum()) > 500
