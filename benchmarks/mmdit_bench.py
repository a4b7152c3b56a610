"""MMDiT speed: the MindSpore port (CPU, fp32, ms.jit) against the PyTorch reference (CPU, fp32) on the same weights.

Config (issue 4): hidden 512, 8 heads (head_dim 64, axes [8, 28, 28]), 4 double + 4 single blocks, Open-Sora v2
layout (seeded upstream-layout weights, converted by mappings/mmdit_opensora_v2.yaml and loaded with load_strict;
rotate-half RoPE, cond_in), batch 1, 1024 image tokens (a 4x16x16 latent grid) + 128 text tokens.

Fairness: each framework runs in its own fresh process (a MindSpore process keeps runtime threads that would
slow torch down in the same process), with the same thread count (`--threads`, default: all cores):
`torch.set_num_threads(N)` and `ms.device_context.cpu.op_tuning.threads_num(N)`. The two workers alternate for
`--rounds` rounds; each round times `--runs` calls after `--warmup` calls (MindSpore: the first call compiles
the jit graph). Reported: the median over all timed calls of each framework, and their ratio. The MindSpore
worker also checks the output against the torch reference on the same weights. Not a test.

Note: MindSpore's CPU GEMMs run on oneDNN's own thread pool, which ignores `threads_num`; only `--cpus` really
limits MindSpore to fewer cores. torch's OpenMP threads degrade badly when another process competes for a core.

    .venv/bin/python benchmarks/mmdit_bench.py [--runs 5] [--rounds 2] [--threads N] [--cpus 0] [--pynative]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _worker import serve_worker  # noqa: E402  (benchmarks/, the script's own folder)

PRESET = "bench"     # parity/adapters/mmdit.py PRESETS["bench"]
GRID = (4, 16, 16)   # 1024 image tokens
N_TXT = 128


def _times(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def worker_ms(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from opensora_ms.models import mmdit as M
    from parity.adapters import mmdit as adapter

    cfg = adapter.PRESETS[PRESET]
    inputs = adapter.make_inputs(cfg, seed=0, grid=GRID, n_txt=N_TXT, batch=1)
    tmodel = adapter.build_torch(cfg, seed=0)
    with torch.no_grad():
        ref = tmodel(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    net = adapter.build_ms(cfg)
    adapter.load_ms_from_torch(net, tmodel, cfg)   # mapping convert + load_strict
    del tmodel

    fwd = M.jit_forward(net)
    margs = [None if inputs.get(n) is None else ms.Tensor(inputs[n]) for n in M.INPUT_NAMES]
    t0 = time.perf_counter()
    out = fwd(*margs).asnumpy()
    first = time.perf_counter() - t0
    res = {"times": _times(lambda: fwd(*margs).asnumpy(), args.warmup, args.runs), "first_call_s": first,
           "rel": float(np.abs(out - ref).max() / np.abs(ref).max()), "version": ms.__version__}
    if args.pynative:
        res["pynative_times"] = _times(lambda: net(*margs).asnumpy(), 1, max(2, args.runs // 2))
    return res


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from parity.adapters import mmdit as adapter

    cfg = adapter.PRESETS[PRESET]
    inputs = adapter.make_inputs(cfg, seed=0, grid=GRID, n_txt=N_TXT, batch=1)
    tmodel = adapter.build_torch(cfg, seed=0)
    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run():
        with torch.no_grad():
            return tmodel(**tin)

    return {"times": _times(run, args.warmup, args.runs), "threads": torch.get_num_threads(),
            "version": torch.__version__}


def _spawn(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--pynative"] if args.pynative else []) + \
        (["--cpus", args.cpus] if args.cpus else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpus", default=None,
                    help="pin both workers to these cores (e.g. '0' or '0,1'; os.sched_setaffinity) -- on a shared "
                         "machine, '--cpus 0 --threads 1' gives both frameworks exactly one core")
    ap.add_argument("--pynative", action="store_true", help="also time MindSpore PyNative (slow)")
    ap.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if serve_worker(args, worker_torch, worker_ms):
        return None

    t_all, m_all, p_all, info = [], [], [], {}
    for r in range(args.rounds):
        t = _spawn("torch", args)
        m = _spawn("ms", args)
        t_all += t["times"]
        m_all += m["times"]
        p_all += m.get("pynative_times", [])
        info = {"torch": t["version"], "ms": m["version"], "rel": m["rel"], "first": m["first_call_s"]}
        print(f"round {r + 1}: torch median {statistics.median(t['times']) * 1e3:.1f} ms, "
              f"mindspore median {statistics.median(m['times']) * 1e3:.1f} ms", flush=True)
    tt, mt = statistics.median(t_all), statistics.median(m_all)
    cfg = {"hidden": 512, "heads": 8, "double": 4, "single": 4}
    print(f"MMDiT hidden {cfg['hidden']}, {cfg['heads']} heads, {cfg['double']}+{cfg['single']} blocks, "
          f"{int(np.prod(GRID))} image + {N_TXT} text tokens, batch 1, fp32, {args.threads} threads each"
          f"{f' pinned to cores {args.cpus}' if args.cpus else ''} "
          f"(torch {info['torch']}, mindspore {info['ms']}); {args.rounds} rounds x {args.runs} runs, each "
          f"framework in its own process")
    print(f"  torch      CPU eager (SDPA)      median {tt * 1e3:8.1f} ms  (min {min(t_all) * 1e3:.1f}, max {max(t_all) * 1e3:.1f})")
    print(f"  mindspore  CPU ms.jit            median {mt * 1e3:8.1f} ms  (min {min(m_all) * 1e3:.1f}, max {max(m_all) * 1e3:.1f}); "
          f"first call (compile) {info['first']:.1f} s")
    if p_all:
        print(f"  mindspore  CPU PyNative          median {statistics.median(p_all) * 1e3:8.1f} ms")
    print(f"  output max rel diff mindspore vs torch: {info['rel']:.2e}")
    print(f"ratio mindspore(jit) / torch = {mt / tt:.2f}  (target <= 1.5)")
    return mt / tt


if __name__ == "__main__":
    main()
