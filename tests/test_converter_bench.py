"""The 1 GB smoke version of benchmarks/convert_bench.py (no timing assertion: CI machines vary)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_convert_bench_smoke(tmp_path):
    work = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_bench.py"), "--limit-gb", "1", "--workdir", str(work),
                        "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert 0.5e9 < res["source_bytes"] <= 1e9 and res["output_bytes"] <= res["source_bytes"]
    assert not res["mapping_fallback"]  # the real mmdit_opensora_v2 mapping
    assert res["convert_s"] > 0 and res["cat_s"] > 0 and res["throughput_ratio_vs_cat"] > 0
    assert 0 < res["peak_rss_mb"] < 1500
    assert not any(work.iterdir())  # outputs and the sparse source are deleted afterwards
