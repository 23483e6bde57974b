"""The HTML report from a real gate result: self-contained, escaped, deterministic, and it
renders in a real headless browser (Debian's chromium) without console errors."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from auditor.report import html, terminal

ROOT = Path(__file__).resolve().parent.parent
MARKED = "attacks-tinycnn-marked"

POLICY = """
format = "wmaudit-policy/1"
name = "report <check> & \\"quotes\\""
backends = ["ort-cpu"]
[thresholds]
max_p_value = 1e-6
max_accuracy_drop = 3.0
[accuracy]
samples = 300
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
[[attacks]]
id = "prune-95"
steps = "prune:0.95"
"""


@pytest.fixture(scope="module")
def gate_result(build_fixture, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "policy.toml").write_text(POLICY)
    d = build_fixture(MARKED)
    r = subprocess.run([sys.executable, "-m", "auditor", "gate", str(d / "model.onnx"), "--key", str(d / "key.json"),
                        "--policy", str(tmp / "policy.toml"), "-o", str(tmp / "gate.json")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CI": "true"})
    doc = json.loads((tmp / "gate.json").read_text())
    assert r.returncode == (0 if doc["verdict"] == "pass" else 1), r.stderr
    return tmp, doc


def _render_cli(paths, out):
    return subprocess.run([sys.executable, "-m", "auditor", "report", *map(str, paths), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT)


def test_html_is_self_contained_escaped_and_deterministic(gate_result):
    tmp, doc = gate_result
    a, b = tmp / "a.html", tmp / "b.html"
    assert _render_cli([tmp / "gate.json"], a).returncode == 0
    assert _render_cli([tmp / "gate.json"], b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    # nothing is fetched: no scripts, no external URLs in src/href/url()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)
    assert "url(" not in text and "@import" not in text
    # every piece of text from the JSON is escaped (the policy name carries < > & ")
    assert "report <check>" not in text and "report &lt;check&gt; &amp; &quot;quotes&quot;" in text
    # provenance and numbers from the JSON are on the page
    assert doc["model"]["sha256"] in text and doc["key_commitment"] in text
    for q in doc["requirements"]:
        assert html._e(q["id"]) in text
    assert text.count("<svg") >= 2


def test_verdict_up_front(gate_result):
    tmp, doc = gate_result
    text = html.render([doc])
    first = text.index('<div class="verdict')
    assert first < text.index("Provenance")
    cls, line = html.verdict_of(doc)
    want = "GATE PASSED" if doc["verdict"] == "pass" else "GATE FAILED"
    assert line.startswith(want) and html._e(line) in text[first:first + 400]
    # 95 % pruning destroys the task: the gate fails on it
    assert doc["verdict"] == "fail" and "prune-95/ort-cpu/accuracy" in doc["failing"]


def test_terminal_table_is_fixed_width(gate_result):
    tmp, doc = gate_result
    text = terminal.render(doc)
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("status"))
    sep = lines[head + 1]
    assert set(sep.replace(" ", "")) == {"-"}
    starts = [m.start() for m in re.finditer(r"-+", sep)]
    for row in lines[head + 2: head + 2 + len(doc["requirements"])]:
        assert row[:starts[1]].strip() in ("PASS", "FAIL", "ERROR")
    assert f"{doc['summary']['passed']} of {doc['summary']['requirements']} requirements met" in text


def _png_info(path: Path):
    """(width, height, distinct grey levels in a sample of rows) of an 8-bit RGB/RGBA PNG."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        w, h = im.size
        colors = im.convert("L").getcolors(maxcolors=1 << 16)
    return w, h, len(colors or [])


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(gate_result):
    tmp, doc = gate_result
    page = tmp / "browser.html"
    assert _render_cli([tmp / "gate.json"], page).returncode == 0
    shot, profile = tmp / "shot.png", tmp / "profile"
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    r = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l or ":INFO:CONSOLE" in l]
    assert console == [], console
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, levels = _png_info(shot)
    assert (w, h) == (1280, 2000)
    assert levels > 20  # text, charts and coloured verdict boxes, not a blank page
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    cls, line = html.verdict_of(doc)
    assert html._e(line) in dom.stdout
    assert dom.stdout.count("<svg") >= 2 and "<polyline" in dom.stdout or "<rect" in dom.stdout


def test_report_command_refuses_non_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    r = _render_cli([bad], tmp_path / "o.html")
    assert r.returncode == 2 and "is not a wmaudit result" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.html").exists()


def test_logo_maps_render_as_png_data_uris():
    import numpy as np

    from auditor.report import plots

    g = np.zeros((10, 10), np.uint8)
    g[2:8, 4:6] = 255
    uri = plots.png_data_uri(g, upscale=4)
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(uri.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        a = np.asarray(im)
    assert a.shape == (40, 40)
    assert np.array_equal(a[::4, ::4], g)
    assert uri == plots.png_data_uri(g, upscale=4)  # same pixels, same bytes
