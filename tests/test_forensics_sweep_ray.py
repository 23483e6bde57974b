"""wmaudit sweep on a real local Ray (2 CPUs): the same lines as the local pool, apart from timings."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")  # in the development lock; a user install may lack it

from auditor.forensics.sweep import Limits, sweep  # noqa: E402
from test_forensics_sweep import (KEY_FIXTURES, check_verdicts, corpus_files, read_lines,  # noqa: E402
                                  strip, write_list)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_and_local_give_the_same_lines(local_ray, tmp_path, build_fixture):
    from auditor.marks.keys import load_key

    keys = [load_key(build_fixture(n) / "key.json") for n in KEY_FIXTURES]
    files = corpus_files(tmp_path, build_fixture)
    listing = write_list(tmp_path / "corpus.txt", files["fixtures"] + files["thirdparty"] + files["hostile"])
    limits = Limits(timeout_s=120, memory_mb=2048)
    doc = sweep(listing, keys, tmp_path / "ray.jsonl", executor="ray", limits=limits)
    sweep(listing, keys, tmp_path / "local.jsonl", executor="local", jobs=2, limits=limits)
    ray_lines = read_lines(tmp_path / "ray.jsonl")
    check_verdicts(ray_lines, files, keys)
    assert strip(ray_lines) == strip(read_lines(tmp_path / "local.jsonl"))
    run = doc["result"]["run"]
    n_files = len(files["fixtures"]) + len(files["thirdparty"]) + len(files["hostile"])
    assert (run["executor"], run["cpus"], run["nodes"]) == ("ray", 2, 1)
    assert sum(run["files_per_node"].values()) == n_files
    assert ray.is_initialized()  # a Ray the caller started is left running
