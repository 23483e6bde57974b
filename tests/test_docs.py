"""The documentation site builds with --strict (every link and anchor resolves, every page is in
the navigation, every included example file exists), the command-line reference is the command
line's own help, and the README's links land on pages of the site."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    index = (tmp_path / "site" / "index.html").read_text()
    assert "wmaudit" in index
    for page in ("getting-started", "api", "guides/release-gate", "reference/cli", "reference/policy"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    # the policy page includes the shipped example as it is
    policy = (tmp_path / "site" / "reference" / "policy" / "index.html").read_text()
    assert "wmaudit-policy/1" in policy and "max_accuracy_drop" in policy


def test_cli_reference_is_current():
    r = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for name in ("extract", "robustness", "gate", "scan", "provenance", "query", "sweep", "keyed verify",
                 "phash survive"):
        assert f"## wmaudit {name}" in text
    assert "--mlflow TRACKING_URI" in text and "--min-top1-agreement" in text


def test_readme_links_land_on_the_site():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
