"""The package's layers stay in order: nothing below the command line imports it, no two
modules import each other, and the auditor never imports torch (read from the source)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    mods = {}
    for f in (ROOT / package).rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[m].update(n for n in names if n != m and (n in mods or n.split(".")[0] in ("torch",)))
    return edges


def test_nothing_below_the_cli_imports_it():
    edges = _imports(_modules("auditor") | _modules("wmaudit"))
    top = ("auditor.cli", "auditor.commands", "auditor.__main__", "wmaudit")
    bad = sorted((m, n) for m, ns in edges.items() for n in ns
                 if not m.startswith(top) and n.startswith(("auditor.cli", "auditor.commands")))
    assert bad == [], f"modules below the command line import it: {bad}"


def test_no_two_modules_import_each_other():
    edges = _imports(_modules("auditor") | _modules("wmaudit"))
    mutual = sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, ())
                    and not (b.startswith(a + ".") or a.startswith(b + ".")))
    assert mutual == [], f"modules that import each other: {mutual}"


def test_the_library_never_imports_torch():
    edges = _imports(_modules("auditor") | _modules("wmaudit"))
    assert sorted(m for m, ns in edges.items() if "torch" in ns or any(n.startswith("torch.") for n in ns)) == []


def test_the_check_sees_a_real_cycle(tmp_path, monkeypatch):
    # the detector itself: two modules importing each other are found
    pkg = tmp_path / "auditor"
    (pkg / "x").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x" / "__init__.py").write_text("")
    (pkg / "x" / "a.py").write_text("from auditor.x import b\n")
    (pkg / "x" / "b.py").write_text("def f():\n    from auditor.x.a import g\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    edges = _imports(_modules("auditor"))
    assert "auditor.x.b" in edges["auditor.x.a"] and "auditor.x.a" in edges["auditor.x.b"]
