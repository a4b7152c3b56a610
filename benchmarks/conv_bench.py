"""The op layer's CPU conv3d against torch, layer by layer: the causal 3x3x3 convs of the Hunyuan VAE decoder.

    python benchmarks/conv_bench.py                          # the decoder's layers for a (1, 16, 5, 16, 16) latent
    python benchmarks/conv_bench.py --threads 2 --rounds 3 --repeat 3 --budget-mb 256
    python benchmarks/conv_bench.py --layers 0 9 --rounds 2 --repeat 1     # a quick smoke run on two layers

Each row is one layer shape: MindSpore `opensora_ms.ops.conv.conv3d(x, w, b, pad=(1, 1, 1, 1, 2, 0),
pad_mode="replicate"[, upsample=(2, 2, 2)], settings=ConvSettings(...))` (the padding and the upsampler's nearest
upsampling fused into the conv) against torch's `F.conv3d(F.pad(x, ..., mode="replicate"))` (after `F.interpolate`
for the upsampler rows), same seeded inputs.

Fairness as `mmdit_bench.py`: each framework runs in its own fresh process with the same thread count (`--threads`,
default all cores: `OMP_NUM_THREADS`, `torch.set_num_threads`, MindSpore `op_tuning.threads_num`), optionally
pinned to the same cores (`--cpus`); the workers alternate torch, MindSpore, torch, MindSpore ... for `--rounds`
pairs. Each worker runs every layer once untimed (MindSpore: compiles the slab graphs), then `--repeat` timed calls.
Printed per layer: the median over all timed calls of each framework, min-max, the ratio of the medians and
MindSpore's GFLOP/s (the conv's multiply-adds only); then the totals weighted by calls per decode. The first
MindSpore worker also checks every layer against torch (torch imported in that worker for the reference only,
before anything is timed).
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

PADS = (1, 1, 1, 1, 2, 0)
# (C_in, C_out, T, H, W, upsample, calls per decode) of the decoder's 3x3x3 convs for a (1, 16, 5, 16, 16) latent
LAYERS = [
    (512, 512, 5, 16, 16, None, 10),  # mid block + up_blocks.0
    (512, 512, 5, 16, 16, (1, 2, 2), 1),  # up_blocks.0.upsamplers.0
    (512, 512, 5, 32, 32, None, 6),  # up_blocks.1
    (512, 512, 5, 32, 32, (2, 2, 2), 1),  # up_blocks.1.upsamplers.0
    (512, 256, 9, 64, 64, None, 1),  # up_blocks.2.resnets.0.conv1
    (256, 256, 9, 64, 64, None, 5),  # up_blocks.2
    (256, 256, 9, 64, 64, (2, 2, 2), 1),  # up_blocks.2.upsamplers.0
    (256, 128, 17, 128, 128, None, 1),  # up_blocks.3.resnets.0.conv1
    (128, 128, 17, 128, 128, None, 5),  # up_blocks.3
    (128, 3, 17, 128, 128, None, 1),  # conv_out
]


def layer_data(i: int):
    """Seeded (x, weight, bias) of layer `i`, the same in every worker whatever the layer subset."""
    ci, co, t, h, w, _, _ = LAYERS[i]
    rng = np.random.default_rng(i)
    x = rng.standard_normal((1, ci, t, h, w)).astype(np.float32)
    wt = (rng.standard_normal((co, ci, 3, 3, 3)) * (ci * 27) ** -0.5).astype(np.float32)
    return x, wt, rng.standard_normal(co).astype(np.float32)


def out_positions(i: int) -> int:
    _, _, t, h, w, up, _ = LAYERS[i]
    ft, fh, fw = up or (1, 1, 1)
    return (1 + ft * (t - 1)) * h * fh * w * fw


def flops(i: int) -> float:
    ci, co = LAYERS[i][:2]
    return 2.0 * ci * co * 27 * out_positions(i)


def torch_conv(i, xt, wt, bt):
    import torch
    import torch.nn.functional as F

    up = LAYERS[i][5]
    with torch.no_grad():
        v = xt
        if up:
            first = F.interpolate(v[:, :, :1], scale_factor=(1,) + tuple(up[1:]), mode="nearest")
            v = torch.cat([first, F.interpolate(v[:, :, 1:], scale_factor=up, mode="nearest")], 2)
        return F.conv3d(F.pad(v, PADS, mode="replicate"), wt, bt)


def _time(fn, repeat):
    fn()  # untimed first call (MindSpore: slab graph compiles)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------------------- workers


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    times = {}
    for i in args.layers:
        x, w, b = (torch.from_numpy(a) for a in layer_data(i))
        times[i] = _time(lambda: torch_conv(i, x, w, b), args.repeat)
    return {"times": times, "threads": torch.get_num_threads(), "version": torch.__version__, "pid": os.getpid(),
            "other_framework_loaded": "mindspore" in sys.modules}


def worker_ms(args) -> dict:
    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from opensora_ms.ops import conv as oc

    settings = oc.ConvSettings(budget_bytes=args.budget_mb << 20) if args.budget_mb else oc.DEFAULT_CONV_SETTINGS
    errs = {}
    if args.check:  # the reference first, so that nothing torch does overlaps a timed call
        import torch

        torch.set_num_threads(args.threads)
        for i in args.layers:
            x, w, b = layer_data(i)
            ref = torch_conv(i, *(torch.from_numpy(a) for a in (x, w, b))).numpy()
            got = oc.conv3d(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b), pad=PADS, pad_mode="replicate",
                            upsample=LAYERS[i][5], settings=settings).asnumpy()
            errs[i] = float(np.abs(got - ref).max() / np.abs(ref).max())
    times = {}
    for i in args.layers:
        x, w, b = (ms.Tensor(a) for a in layer_data(i))

        def run():
            y = oc.conv3d(x, w, b, pad=PADS, pad_mode="replicate", upsample=LAYERS[i][5], settings=settings)
            ms.runtime.synchronize()
            return y

        times[i] = _time(run, args.repeat)
    return {"times": times, "max_rel": errs, "budget_mb": settings.budget_bytes >> 20, "version": ms.__version__,
            "pid": os.getpid(), "other_framework_loaded": "torch" in sys.modules}


# ----------------------------------------------------------------------------------------------------------- parent


def _spawn(kind: str, args, check: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--repeat", str(args.repeat), "--threads", str(args.threads),
           "--layers", *map(str, args.layers)] + (["--budget-mb", str(args.budget_mb)] if args.budget_mb else []) + \
        (["--cpus", args.cpus] if args.cpus else []) + (["--check"] if check else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["times"] = {int(k): v for k, v in res["times"].items()}
    res["max_rel"] = {int(k): v for k, v in res.get("max_rel", {}).items()}
    return res


def compare(args) -> dict:
    runs = {"torch": {i: [] for i in args.layers}, "ms": {i: [] for i in args.layers}}
    errs, info, workers = {}, {}, []
    for r in range(args.rounds):
        for kind in ("torch", "ms"):
            res = _spawn(kind, args, check=kind == "ms" and r == 0)
            for i in args.layers:
                runs[kind][i] += res["times"][i]
            errs.update(res["max_rel"])
            info[kind] = res
            workers.append({"framework": kind, "pid": res["pid"], "other_framework_loaded": res["other_framework_loaded"]})
        print(f"round {r + 1} done", flush=True)
    print(f"\nconv3d per layer, fp32 CPU, {args.threads} threads each"
          f"{f' pinned to cores {args.cpus}' if args.cpus else ''}, each framework in its own process, "
          f"{args.rounds} interleaved pairs x {args.repeat} calls (torch {info['torch']['version']}, mindspore "
          f"{info['ms']['version']}, conv budget {info['ms']['budget_mb']} MiB); seconds: median (min-max)")
    print(f"{'C_in':>5} {'C_out':>5} {'input (T,H,W)':>15} {'up':>9} {'torch s':>22} {'MindSpore s':>22} "
          f"{'ratio':>6} {'MS GF/s':>8} {'max rel':>8}")
    rows, tot = [], {"torch": 0.0, "ms": 0.0}
    for i in args.layers:
        ci, co, t, h, w, up, calls = LAYERS[i]
        med = {k: statistics.median(runs[k][i]) for k in runs}
        span = {k: f"{med[k]:.3f} ({min(runs[k][i]):.3f}-{max(runs[k][i]):.3f})" for k in runs}
        for k in tot:
            tot[k] += calls * med[k]
        rows.append({"c_in": ci, "c_out": co, "input": [t, h, w], "upsample": up, "calls_per_decode": calls,
                     "torch_s": round(med["torch"], 4), "ms_s": round(med["ms"], 4),
                     "torch_min_max": [round(min(runs["torch"][i]), 4), round(max(runs["torch"][i]), 4)],
                     "ms_min_max": [round(min(runs["ms"][i]), 4), round(max(runs["ms"][i]), 4)],
                     "ratio": round(med["ms"] / med["torch"], 3), "ms_gflops": round(flops(i) / med["ms"] / 1e9, 1),
                     "max_rel": errs.get(i)})
        print(f"{ci:5d} {co:5d} {str((t, h, w)):>15} {str(up or '-'):>9} {span['torch']:>22} {span['ms']:>22} "
              f"{med['ms'] / med['torch']:6.2f} {flops(i) / med['ms'] / 1e9:8.0f} {errs.get(i, float('nan')):8.1e}")
    print(f"\nweighted by calls per decode (medians): torch {tot['torch']:.2f} s, MindSpore {tot['ms']:.2f} s, "
          f"ratio mindspore / torch = {tot['ms'] / tot['torch']:.2f}")
    return {"threads": args.threads, "cpus": args.cpus, "rounds": args.rounds, "repeat": args.repeat,
            "budget_mb": info["ms"]["budget_mb"], "layers": rows, "weighted_torch_s": round(tot["torch"], 3),
            "weighted_ms_s": round(tot["ms"], 3), "weighted_ratio": round(tot["ms"] / tot["torch"], 3),
            "workers": workers, "runs": {k: {str(i): [round(v, 5) for v in vs] for i, vs in d.items()}
                                         for k, d in runs.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per layer and worker")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (torch, mindspore) worker pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpus", default=None, help="pin both workers to these cores (e.g. '0' or '0,1')")
    ap.add_argument("--budget-mb", type=int, help="MindSpore conv slab budget (ConvSettings.budget_bytes; default 512)")
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(len(LAYERS))),
                    help=f"indices into LAYERS (0-{len(LAYERS) - 1})")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")
    if any(not 0 <= i < len(LAYERS) for i in args.layers):
        ap.error(f"--layers: indices 0-{len(LAYERS) - 1}")

    if serve_worker(args, worker_torch, worker_ms):
        return None
    res = compare(args)
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
