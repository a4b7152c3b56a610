"""The speed benchmarks compare fairly: a smoke run of benchmarks/conv_bench.py on its smallest-FLOP layer (no
timing assertion: CI machines vary) checks that every worker is its own process holding one framework, that torch
and MindSpore alternate, and that the printed medians and ratio are those of the recorded runs."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from conftest import ROOT


def test_conv_bench_runs_each_framework_in_its_own_process(tmp_path):
    out = tmp_path / "conv.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_bench.py"), "--layers", "9", "--rounds", "2",
                        "--repeat", "2", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    workers = res["workers"]
    assert [w["framework"] for w in workers] == ["torch", "ms", "torch", "ms"]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 4 and os.getpid() not in pids
    assert not any(w["other_framework_loaded"] for w in workers if w["framework"] == "torch")
    assert res["threads"] == 1
    (row,) = res["layers"]
    runs = {k: res["runs"][k]["9"] for k in ("torch", "ms")}
    assert all(len(v) == 4 for v in runs.values())   # 2 rounds x 2 timed calls each
    assert abs(row["torch_s"] - statistics.median(runs["torch"])) < 1e-4
    assert abs(row["ms_s"] - statistics.median(runs["ms"])) < 1e-4
    assert abs(row["ms_min_max"][0] - min(runs["ms"])) < 1e-4 and abs(row["ms_min_max"][1] - max(runs["ms"])) < 1e-4
    assert abs(row["ratio"] - row["ms_s"] / row["torch_s"]) < 1e-2
    assert row["max_rel"] is not None and row["max_rel"] < 1e-5   # MindSpore's conv checked against torch
    assert "ratio mindspore / torch" in p.stdout
