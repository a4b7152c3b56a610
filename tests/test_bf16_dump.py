"""`msconv parity dump --dtype bfloat16` (issue 14): a case in the shared format with fp32 outputs plus `bf16/<name>`
outputs from the torch reference in bf16 (upstream's dtype policy, ATen kernels), as t5_tiny/clip_tiny store theirs.

Every covered model is dumped once at its tiny size (the VAE and the DC-AE decode only, the t2v pipeline for 3
steps); then on each dumped case:
* `parity replay --framework torch --dtype bfloat16` (in-process) must give the stored bf16 outputs back, <= 1 ulp;
* `parity replay --framework mindspore --device CPU-bf16` must pass against the float64 oracle and report its
  distance to the stored bf16 outputs. The op layer fixes its device at import and this pytest process imports it
  in fp32 CPU mode for other tests, so these replays run in two worker processes (the CLI command each time),
  started as soon as the cases exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
HOOKS = {"mmdit_tiny"}   # hooks are cheap there: one case also checks a hooked bf16 dump; the rest --no-hooks
FP32_ISLANDS = {"pe", "pe.0", "pe.1"}   # RoPE tables: fp32 in the bf16 run too (SPEC §g), stored F32
# case name -> (adapter, --config, --inputs key in the fixture's files or None)
CASES = {
    "mmdit_tiny": ("mmdit", "tiny", None),
    "mmdit_flux_tiny": ("mmdit", "flux_tiny", None),
    "mmdit_hc_tiny": ("mmdit", "hc_tiny", None),
    "hunyuan_vae_decode": ("hunyuan_vae", "tiny", "vae_z"),
    "dc_ae_decode": ("dc_ae", "tiny", "dc_ae_z"),
    "t5_tiny": ("t5", "tiny", None),
    "clip_tiny": ("clip", "tiny", None),
    "pipeline_t2v_3steps": ("pipeline", "t2v_3steps", None),
}

_WORKER = r"""
import json, sys
from typer.testing import CliRunner
import cli
res = {}
for prefix, report in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli.app, ["parity", "replay", prefix, "--framework", "mindspore", "--device", "CPU-bf16",
                                     "--no-hooks", "--report", report])
    res[prefix] = {"exit": r.exit_code, "output": r.output, "exception": repr(r.exception)}
open(sys.argv[2], "w").write(json.dumps(res))
"""


def _msconv(*args):
    import cli

    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _headers(path):
    from parity.tensorio import read_header

    return read_header(path)[0]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, request) -> Path:
    """Every case of CASES dumped in bf16 into one folder (in-process: the dump is torch only). The MindSpore
    replays then start at once in their own process and run while the torch replays run here."""
    from parity.adapters import pipeline
    from parity.tensorio import save_dict

    d = tmp_path_factory.mktemp("bf16_cases")
    rng = np.random.default_rng(3)
    files = {"vae_z": d / "in" / "vae_z.safetensors", "dc_ae_z": d / "in" / "dc_ae_z.safetensors"}
    save_dict(files["vae_z"], {"z": rng.standard_normal((1, 16, 2, 1, 2)).astype(np.float32)})   # 5 frames 8x16
    save_dict(files["dc_ae_z"], {"z": rng.standard_normal((1, 32, 2, 1, 1)).astype(np.float32)})  # 8 frames 32x32
    t2v = json.loads(json.dumps(pipeline.PRESETS["tiny"]))   # the t2v preset (= pipeline_t2v_tiny), 3 steps
    t2v["SamplingOption"]["num_steps"] = 3
    (d / "in" / "t2v_3steps.json").write_text(json.dumps(t2v))
    for name, (model, config, inp) in CASES.items():
        cfg = d / "in" / f"{config}.json" if model == "pipeline" else config
        args = ["parity", "dump", model, "--config", cfg, "--out", d / "cases" / name, "--dtype", "bfloat16"]
        args += ["--inputs", files[inp]] if inp else []
        args += [] if name in HOOKS else ["--no-hooks"]
        r = _msconv(*args)
        assert r.exit_code == 0, (name, r.output, r.exception)
    assert sorted(n for names in MS_WORKERS for n in names) == sorted(CASES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for i, names in enumerate(MS_WORKERS):
        jobs = [(str(d / "cases" / n), str(d / "ms" / n)) for n in names]
        with open(d / f"ms_worker{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(jobs),
                                           str(d / f"ms_results{i}.json")],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    request.addfinalizer(lambda: [p.kill() for p in procs if p.poll() is None])
    _WORKERS[d / "cases"] = procs
    return d / "cases"


_WORKERS: dict[Path, list[subprocess.Popen]] = {}
# two MindSpore worker processes of about equal work (each pays the imports once): the cores are free again once
# the torch replays here are done
MS_WORKERS = [["pipeline_t2v_3steps", "t5_tiny", "clip_tiny", "mmdit_hc_tiny"],
              ["dc_ae_decode", "hunyuan_vae_decode", "mmdit_tiny", "mmdit_flux_tiny"]]


@pytest.fixture(scope="module")
def ms_replays(dumped) -> dict:
    """`msconv parity replay CASE --framework mindspore --device CPU-bf16 --no-hooks` on every dumped case (the
    workers `dumped` started): {case: (exit code, output, report.json)}."""
    d, res = dumped.parent, {}
    for i, proc in enumerate(_WORKERS[dumped]):
        assert proc.wait(timeout=600) == 0, (d / f"ms_worker{i}.log").read_text()[-3000:]
        res.update(json.loads((d / f"ms_results{i}.json").read_text()))
    reports = {}
    for n in CASES:
        r, rep = res[str(dumped / n)], d / "ms" / n / "report.json"
        reports[n] = (r["exit"], r["output"] + r["exception"], json.loads(rep.read_text()) if rep.is_file() else None)
    return reports


@pytest.mark.parametrize("name", CASES)
def test_dump_stores_bf16_outputs_as_the_shared_cases_do(dumped, name):
    """fp32 outputs as before, `bf16/<name>` for every floating output (BF16 values; the RoPE tables stay F32), a
    config field per bf16 output, fp32 weights (so the case replays in fp32 and in bf16). The bf16 outputs come
    from a bf16 run, not from rounding the fp32 ones."""
    import torch

    from parity.tensorio import SafetensorsReader

    prefix = dumped / name
    cfg = json.loads(prefix.with_name(f"{name}.config.json").read_text())
    heads = _headers(prefix.with_name(f"{name}.outputs.safetensors"))
    main = [k for k in heads if not k.startswith("bf16/")]
    floating = [k for k in main if heads[k]["dtype"] == "F32"]
    assert main and floating
    assert sorted(k for k in heads if k.startswith("bf16/")) == sorted(f"bf16/{k}" for k in floating)
    assert sorted(k for k in cfg if k.startswith("bf16/")) == sorted(f"bf16/{k}" for k in floating)
    assert all("bfloat16" in cfg[f"bf16/{k}"] for k in floating)
    for k in floating:
        want = "F32" if k in FP32_ISLANDS else "BF16"
        assert heads[f"bf16/{k}"]["dtype"] == want, (k, heads[f"bf16/{k}"])
    assert {v["dtype"] for v in _headers(prefix.with_name(f"{name}.weights.safetensors")).values()} <= {"F32", "I64"}
    rd = SafetensorsReader(prefix.with_name(f"{name}.outputs.safetensors"))
    differs = 0
    for k in floating:
        if k in FP32_ISLANDS:
            continue
        cast = torch.from_numpy(rd.get(k)).to(torch.bfloat16).float().numpy()
        differs += not np.array_equal(cast, rd.get(f"bf16/{k}"))
    assert differs > 0
    assert prefix.with_name(f"{name}.hooks.safetensors").is_file() == (name in HOOKS)
    if name == "pipeline_t2v_3steps":
        assert sorted({k.split("/")[0] for k in main if k.startswith("step")}) == ["step00", "step01", "step02"]
    if name in ("hunyuan_vae_decode", "dc_ae_decode"):
        assert main == ["decoded"]


@pytest.mark.parametrize("name", CASES)
def test_torch_bf16_replay_reproduces_the_stored_bf16_outputs(dumped, name, tmp_path):
    r = _msconv("parity", "replay", dumped / name, "--framework", "torch", "--dtype", "bfloat16", "--no-hooks",
                "--report", tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert r.exit_code == 0 and rep["verdict"] == "pass", (r.output, rep["notes"])
    stored = [k for k in _headers(dumped / f"{name}.outputs.safetensors") if k.startswith("bf16/")]
    assert sorted(rep["stored_lowp"]["compared"]) == sorted(stored)
    assert rep["stored_lowp"]["max_ulps"] <= 1
    rows = [t for t in rep["tensors"] if t["name"] in stored]
    assert len(rows) == len(stored) and all(t["verdict"] == "pass" and t["ulps"] <= 1 for t in rows)


@pytest.mark.parametrize("name", CASES)
def test_mindspore_cpu_bf16_replay_passes_the_oracle_and_reports_the_bf16_distance(ms_replays, dumped, name):
    code, output, rep = ms_replays[name]
    assert rep is not None, output
    assert code == 0 and rep["verdict"] == "pass", (output, rep["notes"], rep.get("first_divergence"))
    assert rep["device"] == "CPU-bf16" and rep["dtype"] == "bfloat16" and rep["verdict_metric"] == "oracle_ratio"
    stored = [k for k in _headers(dumped / f"{name}.outputs.safetensors") if k.startswith("bf16/")]
    rows = {t["name"]: t for t in rep["tensors"]}
    main = [n for n, t in rows.items() if t["kind"] == "output" and n not in stored]
    assert main and all(rows[n]["oracle"]["ratio"] <= 2 for n in main), {n: rows[n].get("oracle") for n in main}
    # the distance to the stored bf16 outputs is reported (ulps, and the fp64 error of both), every one compared
    # but the flux layout's `bf16/pe` (the port has no 6-D table: as optional as `pe`)
    optional = {"bf16/pe"} if name == "mmdit_flux_tiny" else set()
    assert set(rep["stored_lowp"]["compared"]) == set(stored) - optional
    assert set(rep["missing_optional_outputs"]) >= optional and not rep["missing_outputs"]
    for n in rep["stored_lowp"]["compared"]:
        t = rows[n]
        assert t["ulps"] >= 0 and t["oracle"]["vs"] == "stored" and t["oracle"]["err_test"] >= 0, t
        assert t["oracle"]["err_ref"] >= 0 and t["oracle"]["ratio"] > 0, t
        assert "bf16 ulps from the stored output" in t["reason"]
    assert "stored bf16 outputs: max" in output


def test_bad_dtype_is_a_one_line_user_error(tmp_path):
    r = _msconv("parity", "dump", "mmdit", "--config", "tiny", "--out", tmp_path / "x", "--dtype", "float16")
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --dtype must be one of float32, bfloat16")
    assert "'float16'" in lines[0] and not any(tmp_path.iterdir())


def test_fp32_dump_from_a_bf16_case_config_drops_its_bf16_fields(tmp_path):
    """t5_tiny's config describes its `bf16/last_hidden_state`; a float32 dump from it stores no bf16 output, so it
    must not carry that field either."""
    from conftest import TINY

    r = _msconv("parity", "dump", "t5", "--config", TINY / "t5_tiny.config.json", "--weights",
                TINY / "t5_tiny.weights.safetensors", "--out", tmp_path / "t5", "--no-hooks")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "t5.config.json").read_text())
    assert "T5Config" in cfg and not [k for k in cfg if k.startswith("bf16/")]
    assert not [k for k in _headers(tmp_path / "t5.outputs.safetensors") if k.startswith("bf16/")]
