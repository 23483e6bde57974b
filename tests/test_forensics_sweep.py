"""wmaudit sweep: a corpus of fixtures, third-party files and hostile files against three keys.

Verdicts are checked pair by pair (the marked fixtures detected, their unmarked
twins and every third-party file not, every hostile file an error line), a sweep
killed three times (twice after a chosen number of lines, once at a random
moment) and resumed ends with exactly the lines of an uninterrupted sweep, and
a file over the time or memory limit fails alone.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from auditor.errors import AuditError
from auditor.forensics.sweep import ERROR, KILL_AFTER_ENV, Limits, find_corpus, sweep
from auditor.marks.keys import Key, load_key, make_mark, save_key

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("WMAUDIT_DATA", ROOT / "build" / "data"))
KEY_FIXTURES = ["cnn-small-mean", "seq-lstm-dynamo", "attacks-tinycnn-marked"]
MODEL_FIXTURES = ["cnn-small-mean", "cnn-small-unmarked", "seq-lstm-dynamo", "seq-lstm-legacy",
                  "seq-gru-legacy", "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"]
# (model fixture, key fixture) pairs that carry the mark; every other fixture pair is clean.
MARKED = {("cnn-small-mean", "cnn-small-mean"), ("seq-lstm-dynamo", "seq-lstm-dynamo"),
          ("seq-lstm-legacy", "seq-lstm-dynamo"), ("attacks-tinycnn-marked", "attacks-tinycnn-marked")}
HOSTILE = ["truncated.onnx", "garbage.onnx", "dir.onnx", "fifo.onnx", "dotdot/model.onnx", "empty.onnx",
           r'x<script>alert(1)<\script>.onnx']


def _model(initializers, n_in: int, ir: int = 10) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = ir
    return m


def _external(name: str, dims: list[int], location: str, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def make_hostile(folder: Path, donor: Path) -> list[Path]:
    """Hostile files of several kinds, in `folder` (the donor is a real model to cut)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = donor.read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (folder / "garbage.onnx").write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "empty.onnx").write_bytes(b"")
    (folder / r'x<script>alert(1)<\script>.onnx').write_bytes(b"not a model <b>bold</b>\n" * 10)
    (folder / "dir.onnx").mkdir(exist_ok=True)
    if not (folder / "fifo.onnx").exists():
        os.mkfifo(folder / "fifo.onnx")
    (folder / "dotdot").mkdir(exist_ok=True)
    (folder / "outside.bin").write_bytes(b"\0" * 64)
    m = _model([_external("w", [4, 4], "../outside.bin", 64)], 4)
    (folder / "dotdot" / "model.onnx").write_bytes(m.SerializeToString())
    return [folder / h for h in HOSTILE]


def make_oversized(folder: Path) -> tuple[Path, Path]:
    """A valid model whose MatMul weight (400000 x 300 float32, 480 MB) lives in a sparse
    external-data file (nothing on disk), and a key with a mark on that weight: auditing
    it needs far more than 512 MB. Returns (model folder, key file)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, m = 400_000, 300
    with open(folder / "w.bin", "wb") as f:
        f.truncate(n * m * 4)
    (folder / "model.onnx").write_bytes(_model([_external("w", [n, m], "w.bin", n * m * 4)], n).SerializeToString())
    mark = make_mark("w", (n, m), "mean", np.random.default_rng(3).integers(0, 2, 64), seed=5)
    save_key(Key(whitebox=[mark], model={"name": "oversized"}), folder.parent / f"{folder.name}-key.json")
    return folder, folder.parent / f"{folder.name}-key.json"


def corpus_files(tmp: Path, build_fixture) -> dict[str, list[Path]]:
    fixtures = [build_fixture(n) / "model.onnx" for n in MODEL_FIXTURES]
    third = sorted((DATA / "thirdparty").glob("*.onnx"))
    assert len(third) == 5, f"third-party files missing under {DATA / 'thirdparty'} (make data)"
    hostile = make_hostile(tmp / "hostile", fixtures[0])
    return {"fixtures": fixtures, "thirdparty": third, "hostile": hostile}


def write_list(path: Path, files: list[Path]) -> Path:
    path.write_text("# corpus\n" + "".join(f"{f}\n" for f in files))
    return path


def strip(lines: list[dict]) -> list[str]:
    """Lines without their timings, canonical and sorted: what two sweeps must share."""
    return sorted(json.dumps({k: v for k, v in ln.items() if k != "timings"}, sort_keys=True) for ln in lines)


def read_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(x) for x in raw.split(b"\n") if x]


def check_verdicts(lines: list[dict], files: dict[str, list[Path]], keys: list[Key]) -> None:
    by = {(ln["file"], ln["key"]): ln for ln in lines}
    every = files["fixtures"] + files["thirdparty"] + files["hostile"]
    assert len(lines) == len(by) == len(every) * len(keys)  # exactly one line per (file, key)
    commit = {n: k.commitment for n, k in zip(KEY_FIXTURES, keys)}
    for name, f in zip(MODEL_FIXTURES, files["fixtures"]):
        for kname, c in commit.items():
            ln = by[(str(f), c)]
            want = "detected" if (name, kname) in MARKED else "not detected"
            assert ln["verdict"] == want, (name, kname, ln)
            assert ln["sha256"].startswith("sha256:") and ln["size"] == f.stat().st_size
            if want == "detected":
                assert ln["p"] < 1e-20 and ln["where"], ln
    for f in files["thirdparty"]:
        for c in commit.values():
            assert by[(str(f), c)]["verdict"] == "not detected", by[(str(f), c)]
    for f in files["hostile"]:
        for c in commit.values():
            ln = by[(str(f), c)]
            assert ln["verdict"] == ERROR and ln["error"] and "\n" not in ln["error"], ln
            assert "Traceback" not in ln["error"] and "internal error" not in ln["error"]


# ---------------------------------------------------------------- module corpus
@pytest.fixture(scope="module")
def keys(build_fixture) -> list[Key]:
    return [load_key(build_fixture(n) / "key.json") for n in KEY_FIXTURES]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, build_fixture):
    tmp = tmp_path_factory.mktemp("sweep")
    files = corpus_files(tmp, build_fixture)
    listing = write_list(tmp / "corpus.txt", files["fixtures"] + files["thirdparty"] + files["hostile"])
    return tmp, listing, files


@pytest.fixture(scope="module")
def local_run(corpus, keys):
    tmp, listing, files = corpus
    out = tmp / "local" / "results.jsonl"
    doc = sweep(listing, keys, out, executor="local", jobs=2, limits=Limits(timeout_s=120, memory_mb=2048))
    return out, doc


# ---------------------------------------------------------------- tests
def test_local_sweep_verdicts_summary_and_index(corpus, keys, local_run):
    tmp, listing, files = corpus
    out, doc = local_run
    lines = read_lines(out)
    check_verdicts(lines, files, keys)
    r = doc["result"]
    n_files = len(files["fixtures"]) + len(files["thirdparty"]) + len(files["hostile"])
    assert (r["files"], r["pairs"], r["lines"], r["complete"]) == (n_files, 3 * n_files, 3 * n_files, True)
    assert r["verdicts"] == {"detected": 4, "error": 3 * len(HOSTILE), "not detected": 3 * n_files - 4 - 3 * len(HOSTILE)}
    assert sorted(r["files_with_errors"]) == sorted(str(f) for f in files["hostile"])
    assert json.loads((out.parent / "results.summary.json").read_text())["result"]["verdicts"] == r["verdicts"]
    page = (out.parent / "results.html").read_text()
    assert "default-src 'none'" in page and "<script" not in page and "&lt;script&gt;" in page
    assert page.count('class="detected"') == 2 * 4  # detected table + full table
    # the errors say what is wrong with each file, in one line
    err = {Path(ln["file"]).name: ln["error"] for ln in lines if ln["verdict"] == ERROR}
    assert "directory" in err["dir.onnx"] and "FIFO" in err["fifo.onnx"]
    assert ".." in err["model.onnx"]


def test_killed_three_times_then_resumed_loses_nothing_and_duplicates_nothing(corpus, keys, local_run):
    tmp, listing, files = corpus
    expected = strip(read_lines(local_run[0]))
    out = tmp / "killed" / "results.jsonl"
    cmd = [sys.executable, "-m", "auditor", "sweep", str(listing), "-o", str(out), "--jobs", "2",
           "--memory", "2048"] + [a for k in keys for a in ("--key", str(k.path))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # 1, 2: SIGKILL right after the 7th and the 11th new line
    for i, n in enumerate((7, 11)):
        p = subprocess.run(cmd + (["--resume"] if i else []), env={**env, KILL_AFTER_ENV: str(n)},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr
        assert len(read_lines(out)) == 7 + (11 if i else 0)
    # 3: SIGKILL at a random moment (seeded)
    before = len(read_lines(out))
    proc = subprocess.Popen(cmd + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(random.Random(12).uniform(0.8, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    mid = out.read_bytes()
    assert len([x for x in mid.split(b"\n")[:-1] if x]) >= before
    # without --resume an existing results file is refused, one line, untouched
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--resume" in p.stderr
    assert out.read_bytes() == mid
    # finish
    p = subprocess.run(cmd + ["--resume", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = read_lines(out)
    assert strip(lines) == expected  # exactly one line per pair, same content as the uninterrupted sweep
    check_verdicts(lines, files, keys)
    summary = json.loads(p.stdout)["result"]
    assert summary["complete"] and summary["run"]["resumed_lines"] >= before


def test_torn_last_line_is_cut_and_redone(corpus, keys, local_run, tmp_path):
    tmp, listing, files = corpus
    src = local_run[0].read_bytes().split(b"\n")[:-1]
    out = tmp_path / "r.jsonl"
    # the first 20 lines, then half of the 21st (a write cut by a power loss)
    out.write_bytes(b"\n".join(src[:20]) + b"\n" + src[20][: len(src[20]) // 2])
    doc = sweep(listing, keys, out, resume=True, jobs=2, limits=Limits(timeout_s=120, memory_mb=2048))
    assert doc["result"]["run"]["resumed_lines"] == 20
    assert strip(read_lines(out)) == strip(read_lines(local_run[0]))
    # a damaged line in the middle is not silently dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(src[0] + b"\n{not json\n" + src[1] + b"\n")
    with pytest.raises(AuditError, match="line 2"):
        sweep(listing, keys, bad, resume=True)


def test_time_and_memory_limits_fail_one_file_alone(tmp_path, build_fixture):
    good = build_fixture("cnn-small-mean")
    key = load_key(good / "key.json")
    big, wkey_path = make_oversized(tmp_path / "big")
    wkey = load_key(wkey_path)
    # a 1 TiB sparse file: reading it takes far longer than the time limit
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)
    listing = write_list(tmp_path / "c.txt", [good / "model.onnx", big / "model.onnx", huge])
    out = tmp_path / "r.jsonl"
    t0 = time.monotonic()
    # 10 s: the good file's scan takes well under a second, but its child may wait for a core
    sweep(listing, [key, wkey], out, jobs=2, limits=Limits(timeout_s=10, memory_mb=512))
    assert time.monotonic() - t0 < 90
    lines = read_lines(out)
    assert len({(ln["file"], ln["key"]) for ln in lines}) == len(lines) == 6
    assert [ln["error"] for ln in lines if ln["file"] == str(huge)] == ["time limit of 10 s exceeded"] * 2
    mem = [ln for ln in lines if ln["file"] == str(big / "model.onnx") and ln["key"] == wkey.commitment]
    assert mem[0]["verdict"] == ERROR and "memory limit of 512 MB" in mem[0]["error"], mem
    ok = [ln for ln in lines if ln["file"] == str(good / "model.onnx") and ln["key"] == key.commitment]
    assert ok[0]["verdict"] == "detected" and ok[0]["p"] < 1e-20, ok


def test_corpus_forms(tmp_path, build_fixture):
    hostile = make_hostile(tmp_path / "c" / "sub", build_fixture("cnn-small-mean") / "model.onnx")
    os.symlink("/etc/hostname", tmp_path / "c" / "out.onnx")
    os.symlink("sub/garbage.onnx", tmp_path / "c" / "in.onnx")
    entries = find_corpus(tmp_path / "c")
    names = [os.path.relpath(e.file, tmp_path / "c") for e in entries]
    assert names == sorted(["in.onnx", "out.onnx"] + [os.path.relpath(h, tmp_path / "c") for h in hostile])
    refused = {os.path.basename(e.file): e.refused for e in entries if e.refused}
    assert refused == {"out.onnx": "symbolic link leading outside the corpus folder"}
    assert len(find_corpus(str(tmp_path / "c" / "**" / "*.onnx"))) == len(entries)
    with pytest.raises(AuditError, match="matches no file"):
        find_corpus(str(tmp_path / "nothing-*.onnx"))
    with pytest.raises(AuditError, match="corpus not found"):
        find_corpus(tmp_path / "missing")


def _cli(*args, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, "-m", "auditor", "sweep", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_usage_errors_are_one_line(tmp_path, build_fixture, monkeypatch, capsys):
    from auditor import cli

    key = build_fixture("cnn-small-mean") / "key.json"
    model = build_fixture("cnn-small-mean") / "model.onnx"
    out = tmp_path / "r.jsonl"
    cases = [([model, "-o", out], "no key given"),
             ([tmp_path / "missing", "--key", key, "-o", out], "corpus not found"),
             ([model, "--key", tmp_path / "nokey.json", "-o", out], "key file not found"),
             ([model, "--key", key, "-o", out, "--address", "x:1"], "--address needs --executor ray"),
             ([model, "--key", key, "-o", out, "--timeout", "-1"], "positive number")]
    for argv, msg in cases:
        try:
            rc = cli.main(["sweep", *map(str, argv)])
        except SystemExit as e:  # argparse errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and msg in err, (argv, err)
    assert not out.exists()
    # a user without Ray: one line saying how to install it, nothing written
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)
        rc = cli.main(["sweep", str(model), "--key", str(key), "-o", str(out), "--executor", "ray"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'wmaudit[ray]'" in err
    assert not out.exists()
    # an unreachable cluster: one line, no empty results file left behind
    pytest.importorskip("ray")
    rc = cli.main(["sweep", str(model), "--key", str(key), "-o", str(out), "--executor", "ray",
                   "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot reach Ray at 127.0.0.1:1" in err, err
    assert not out.exists()


POLICY = """
format = "wmaudit-policy/1"
name = "survives pruning"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
min_margin = 0.0
[evidence]
whitebox = "all-marks"
blackbox = "none"
accuracy = false
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
"""


def test_policy_is_applied_per_file(tmp_path, build_fixture):
    marked, unmarked = build_fixture("attacks-tinycnn-marked"), build_fixture("attacks-tinycnn-unmarked")
    key = marked / "key.json"
    (tmp_path / "policy.toml").write_text(POLICY)
    (tmp_path / "garbage.onnx").write_bytes(b"\0garbage" * 64)
    listing = write_list(tmp_path / "c.txt", [marked / "model.onnx", unmarked / "model.onnx", tmp_path / "garbage.onnx"])
    p = _cli(listing, "--key", key, "-o", tmp_path / "r.jsonl", "--policy", tmp_path / "policy.toml", "--json")
    assert p.returncode == 0, p.stderr
    by = {Path(ln["file"]).parent.name: ln for ln in read_lines(tmp_path / "r.jsonl")}
    assert by["attacks-tinycnn-marked"]["gate"] == {"verdict": "pass", "requirements": 2, "failed": []}
    g = by["attacks-tinycnn-unmarked"]["gate"]
    assert g["verdict"] == "fail" and g["requirements"] == 2 and len(g["failed"]) == 2
    assert by[tmp_path.name]["verdict"] == ERROR and "gate" not in by[tmp_path.name]
    assert json.loads(p.stdout)["result"]["gate"] == {"fail": 1, "pass": 1}
    # a malformed policy is a usage error before anything is written
    (tmp_path / "bad.toml").write_text(POLICY.replace("max_ber", "max_bre"))
    p = _cli(listing, "--key", key, "-o", tmp_path / "r2.jsonl", "--policy", tmp_path / "bad.toml")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and not (tmp_path / "r2.jsonl").exists()
