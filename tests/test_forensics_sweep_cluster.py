"""wmaudit sweep --executor ray --address on a simulated two-node Ray cluster
(ray.cluster_utils.Cluster: two raylets of 1 CPU each on this machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")

from test_forensics_sweep import (KEY_FIXTURES, MARKED, MODEL_FIXTURES, ROOT, make_hostile,  # noqa: E402
                                  make_oversized, read_lines, write_list)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_sweep_joins_a_two_node_cluster(cluster, tmp_path, build_fixture):
    models = [build_fixture(n) / "model.onnx" for n in MODEL_FIXTURES]
    hostile = make_hostile(tmp_path / "hostile", models[0])[:3]
    big, big_key = make_oversized(tmp_path / "big")  # over the memory limit, on whichever node
    hostile.append(big / "model.onnx")
    listing = write_list(tmp_path / "corpus.txt", models + hostile)
    keys = [build_fixture(n) / "key.json" for n in KEY_FIXTURES] + [big_key]
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "auditor", "sweep", str(listing), "-o", str(out), "--json",
                        "--executor", "ray", "--address", cluster.address, "--memory", "512"]
                       + [a for k in keys for a in ("--key", str(k))],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    run = json.loads(p.stdout)["result"]["run"]
    assert (run["nodes"], run["cpus"]) == (2, 2)
    assert len(run["files_per_node"]) == 2 and sum(run["files_per_node"].values()) == len(models) + 4
    lines = read_lines(out)
    assert len({(ln["file"], ln["key"]) for ln in lines}) == len(lines) == 4 * (len(models) + 4)
    commit = {}
    for n, k in zip(KEY_FIXTURES, keys):
        commit[json.loads(k.read_text())["commitment"]] = n
    big_commitment = json.loads(big_key.read_text())["commitment"]
    for ln in lines:
        f = ln["file"]
        if f == str(big / "model.onnx") and ln["key"] == big_commitment:
            assert ln["error"] == "memory limit of 512 MB exceeded", ln
        if f in map(str, hostile):
            assert ln["verdict"] == "error"
            continue
        if ln["key"] == big_commitment:
            assert ln["verdict"] == "not detected", ln
            continue
        name = MODEL_FIXTURES[[str(m) for m in models].index(f)]
        want = "detected" if (name, commit[ln["key"]]) in MARKED else "not detected"
        assert ln["verdict"] == want, ln
