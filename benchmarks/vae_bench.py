"""Hunyuan VAE decode speed and memory: MindSpore CPU (fp32) against the PyTorch reference CPU, same weights.

    python benchmarks/vae_bench.py                        # decode (1, 16, 5, 16, 16) at widths (128, 256, 512, 512)
    python benchmarks/vae_bench.py --threads 2 --rounds 3 --repeat 3
    python benchmarks/vae_bench.py --latent 1 16 1 8 8 --rounds 2 --repeat 1 --warmup 0   # a quick smoke run
    python benchmarks/vae_bench.py --memory torch --latent 1 16 2 32 32  # peak RSS of one decode (run per framework)

Speed. Fairness as `mmdit_bench.py`: each framework runs in its own fresh process (a MindSpore process keeps
runtime threads that would slow torch down in the same process), with the same thread count (`--threads`, default
all cores: `OMP_NUM_THREADS`, `torch.set_num_threads`, MindSpore `op_tuning.threads_num`), optionally pinned to the
same cores (`--cpus`). The workers alternate torch, MindSpore, torch, MindSpore ... for `--rounds` pairs so both
see the same machine noise; each worker builds the model at real widths with the cases' seeded weights
(`parity.adapters.hunyuan_vae.init_weights_`; MindSpore converts them with `mappings/hunyuan_vae.yaml` and
`load_strict`), decodes `--warmup` times untimed (MindSpore: the first call compiles the conv slab graphs), then
times `--repeat` decodes. Printed: per framework the median over all timed decodes with min-max, each round's
median, the ratio MindSpore / torch of the medians (lower is better), and MindSpore's output against torch's.

MindSpore runs its default model (PyNative orchestration, large convs as cached per-shape graphs); `--conv-jit`,
`--conv-budget-mb` build it with other `ConvSettings`; `--jit` runs the whole decoder as one `ms.jit` graph
(opt-in: at the real widths it needs more than 24 GB).

Memory (`--memory torch|mindspore`): peak resident set (ru_maxrss) of a fresh process that builds the model at
real widths and decodes one latent; `--memory-base` reports the same process without the decode, so the difference
is the decode's working set (activations + conv columns), the number docs/vae.md extrapolates per tile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _worker import serve_worker  # noqa: E402  (benchmarks/, the script's own folder)

REAL = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def conv_settings(args):
    from opensora_ms.ops.conv import DEFAULT_CONV_SETTINGS, ConvSettings

    jit = {"auto": "auto", "on": True, "off": False}[args.conv_jit]
    budget = args.conv_budget_mb << 20 if args.conv_budget_mb else DEFAULT_CONV_SETTINGS.budget_bytes
    return ConvSettings(budget_bytes=budget, jit=jit)


def latent(args) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(tuple(args.latent)).astype(np.float32)


def _times(fn, warmup, runs):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, first, times


# ---------------------------------------------------------------------------------------------------------- workers


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from parity.adapters import hunyuan_vae as A

    model = A.build_torch(dict(REAL), dtype=torch.float32, seed=0)
    z = torch.from_numpy(latent(args))

    def run():
        with torch.no_grad():
            return model.decode(z).numpy()

    out, first, times = _times(run, max(args.warmup, 1), args.repeat)
    if args.ref_out and not Path(args.ref_out).exists():
        np.save(args.ref_out, out)
    return {"times": times, "first_call_s": first, "threads": torch.get_num_threads(), "version": torch.__version__,
            "peak_rss_mb": round(peak_rss_mb(), 1), "pid": os.getpid(), "mindspore_loaded": "mindspore" in sys.modules}


def worker_ms(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from opensora_ms.models import hunyuan_vae as M
    from parity.adapters import hunyuan_vae as A

    cfg = dict(REAL)
    settings = conv_settings(args)
    tm = A.build_torch(cfg, dtype=torch.float32, seed=0)   # the seeded weights, converted by the mapping
    net = M.build(cfg, jit=args.jit, conv_settings=settings)
    A.load_ms_from_torch(net, tm, cfg)
    del tm
    z = ms.Tensor(latent(args))
    out, first, times = _times(lambda: net.decode(z).asnumpy(), max(args.warmup, 1), args.repeat)
    res = {"times": times, "first_call_s": first, "version": ms.__version__, "peak_rss_mb": round(peak_rss_mb(), 1),
           "conv_budget_mb": settings.budget_bytes >> 20, "conv_jit": settings.jit, "pid": os.getpid()}
    if args.ref_out and Path(args.ref_out).exists():
        res["rel"] = rel(out, np.load(args.ref_out))
    return res


def memory(args) -> dict:
    z = latent(args)
    if args.memory == "torch":
        import torch

        from parity.adapters import hunyuan_vae as A

        model = A.build_torch(dict(REAL))
        before = peak_rss_mb()
        shape = None
        if not args.memory_base:
            with torch.no_grad():
                shape = list(model.decode(torch.from_numpy(z)).shape)
        extra = {}
    else:
        import mindspore as ms

        from opensora_ms.models import hunyuan_vae as M

        settings = conv_settings(args)
        model = M.build(dict(REAL), jit=False, conv_settings=settings)
        for _, p in model.parameters_and_names():  # materialise the weights like a loaded checkpoint
            p.asnumpy()
        before = peak_rss_mb()
        shape = None
        if not args.memory_base:
            out = model.decode(ms.Tensor(z))
            shape = list(out.shape)
            out.asnumpy()
        extra = {"conv_jit": settings.jit, "conv_budget_mb": settings.budget_bytes >> 20}
    return {"framework": args.memory, "latent": list(args.latent), **extra, "output": shape,
            "rss_before_decode_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "decode_working_set_mb": round(peak_rss_mb() - before, 1)}


# ----------------------------------------------------------------------------------------------------------- parent


def _spawn(kind: str, args, ref_out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--latent", *map(str, args.latent), "--repeat",
           str(args.repeat), "--warmup", str(args.warmup), "--threads", str(args.threads), "--ref-out", ref_out,
           "--conv-jit", args.conv_jit] + (["--conv-budget-mb", str(args.conv_budget_mb)] if args.conv_budget_mb
                                             else []) + (["--jit"] if args.jit else []) + \
        (["--cpus", args.cpus] if args.cpus else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _line(name, ts):
    return (f"  {name:<44} median {statistics.median(ts):8.3f} s  (min {min(ts):.3f}, max {max(ts):.3f}, "
            f"{len(ts)} decodes)")


def speed(args) -> dict:
    runs = {"torch": [], "ms": []}
    rounds, last, workers = [], {}, []
    with tempfile.TemporaryDirectory(prefix="vae_bench_") as tmp:
        ref_out = str(Path(tmp) / "torch_decoded.npy")
        for r in range(args.rounds):
            for kind in ("torch", "ms"):
                last[kind] = _spawn(kind, args, ref_out)
                runs[kind] += last[kind]["times"]
                workers.append({"framework": kind, "pid": last[kind]["pid"]})
            rounds.append({k: statistics.median(last[k]["times"]) for k in runs})
            print(f"round {r + 1}: torch median {rounds[-1]['torch']:.3f} s, mindspore median {rounds[-1]['ms']:.3f} s"
                  f" (ratio {rounds[-1]['ms'] / rounds[-1]['torch']:.2f})", flush=True)
    t, m = statistics.median(runs["torch"]), statistics.median(runs["ms"])
    mode = "whole-decoder ms.jit" if args.jit else "PyNative + conv slab graphs"
    print(f"\nHunyuan VAE decode {tuple(args.latent)} at widths {REAL['block_out_channels']}, fp32 CPU, "
          f"{args.threads} threads each{f' pinned to cores {args.cpus}' if args.cpus else ''}, each framework in its "
          f"own process, {args.rounds} interleaved pairs x {args.repeat} decodes (torch {last['torch']['version']}, "
          f"mindspore {last['ms']['version']}; conv budget {last['ms']['conv_budget_mb']} MiB, conv graphs "
          f"{last['ms']['conv_jit']})")
    print(_line("torch reference (oneDNN conv3d)", runs["torch"]))
    print(_line(f"mindspore ({mode})", runs["ms"]) + f"; first call {last['ms']['first_call_s']:.1f} s")
    print("  round ratios: " + ", ".join(f"{x['ms'] / x['torch']:.2f}" for x in rounds))
    print(f"  output max rel diff mindspore vs torch: {last['ms'].get('rel', float('nan')):.2e}")
    print(f"ratio mindspore / torch (medians) = {m / t:.2f}")
    return {"latent": list(args.latent), "widths": REAL["block_out_channels"], "threads": args.threads,
            "cpus": args.cpus, "rounds": args.rounds, "repeat": args.repeat, "jit": args.jit,
            "conv_budget_mb": last["ms"]["conv_budget_mb"], "conv_jit": last["ms"]["conv_jit"],
            "torch_s": round(t, 3), "ms_s": round(m, 3), "ratio": round(m / t, 3),
            "torch_min_max": [round(min(runs["torch"]), 3), round(max(runs["torch"]), 3)],
            "ms_min_max": [round(min(runs["ms"]), 3), round(max(runs["ms"]), 3)],
            "round_ratios": [round(x["ms"] / x["torch"], 3) for x in rounds],
            "ms_first_call_s": round(last["ms"]["first_call_s"], 2), "max_rel_vs_torch": last["ms"].get("rel"),
            "runs": {k: [round(v, 3) for v in vs] for k, vs in runs.items()}, "workers": workers}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, nargs=5, default=[1, 16, 5, 16, 16], metavar=("B", "C", "T", "H", "W"))
    ap.add_argument("--repeat", type=int, default=3, help="timed decodes per worker")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes first (at least the first call)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (torch, mindspore) worker pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpus", default=None, help="pin both workers to these cores (e.g. '0' or '0,1')")
    ap.add_argument("--jit", action="store_true", help="MindSpore: the whole decoder as one ms.jit graph")
    ap.add_argument("--memory", choices=["torch", "mindspore"])
    ap.add_argument("--memory-base", action="store_true", help="with --memory: build only, no decode")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--conv-jit", choices=["auto", "on", "off"], default="auto",
                    help="MindSpore CPU conv slab graphs (opensora_ms.ops.conv.ConvSettings.jit)")
    ap.add_argument("--conv-budget-mb", type=int, help="MindSpore CPU conv slab budget (ConvSettings.budget_bytes)")
    ap.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    ap.add_argument("--ref-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")

    if serve_worker(args, worker_torch, worker_ms):
        return None
    res = memory(args) if args.memory else speed(args)
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
