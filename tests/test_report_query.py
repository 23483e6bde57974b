"""A real black-box query result (logo key on the marked WRN) rendered as HTML:
the decoded logos for 1/3/5/10/20 key images are embedded, equal to the JSON's decoded maps."""
import base64
import io
import json
import re

import numpy as np
from PIL import Image

from auditor.cli import main


def test_query_logos_embedded_in_report(build_fixture, tmp_path, capsys):
    d = build_fixture("bb-logo-wrn")
    rc = main(["query", str(d / "marked.onnx"), "--key", str(d / "key.json"), "--backend", "ort-cpu",
               "--permutations", "200", "--json"])
    out = capsys.readouterr().out
    (tmp_path / "query.json").write_text(out)
    doc = json.loads(out)
    assert rc == 0  # the marked model: the logo is detected (the banner below says so)
    assert main(["report", str(tmp_path / "query.json"), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    figs = re.findall(r'<img alt="decoded logo, (\d+) key images" src="data:image/png;base64,([^"]+)"', html)
    assert [int(k) for k, _ in figs] == [1, 3, 5, 10, 20]
    assert "embedded logo" in html
    # the verdict banner reads the query's verdict object, not its Python repr
    assert "query: watermark detected" in html and "{&#x27;alpha" not in html
    assert "http://" not in html and "https://" not in html  # self-contained
    # every embedded PNG is a picture of the decoded map in the JSON (same ordering of pixels)
    maps = doc["logo"]["decoded"]
    for k, b64 in figs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            img = np.asarray(im.convert("L"), dtype=np.float64)
        m = np.asarray(maps[k] if k in maps else maps[int(k)], dtype=np.float64)
        up = img.shape[0] // m.shape[0]
        small = img[::up, ::up][: m.shape[0], : m.shape[1]]
        r = np.corrcoef(small.ravel(), m.ravel())[0, 1]
        assert r > 0.99, (k, r)


def _dicts(x):
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from _dicts(v)
    elif isinstance(x, list):
        for v in x:
            yield from _dicts(v)


def test_p_values_never_round_across_a_power_of_ten():
    from auditor.report import fmt_p

    assert fmt_p(9.99999e-07) == "9.99999e-07"   # not "1.00e-06", which reads as >= 1e-6
    assert fmt_p(1.2345e-05) == "1.23e-05"
    assert fmt_p(0.0, -77.06) == "8.71e-78"
