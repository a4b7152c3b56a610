"""Autoencoder decode speed and memory: MindSpore CPU (fp32) against the PyTorch reference CPU, same weights, for
the three autoencoders of the stack at their real widths.

    python benchmarks/vae_bench.py                                   # all three, default latents, 2 pairs x 3 decodes
    python benchmarks/vae_bench.py --model hunyuan --threads 2 --rounds 3 --repeat 3
    python benchmarks/vae_bench.py --model dc_ae --latent 1 128 2 8 8
    python benchmarks/vae_bench.py --preset tiny --rounds 1 --repeat 1   # a quick smoke run (tiny widths)

| `--model` | default latent | decoded | real widths |
|---|---|---|---|
| hunyuan (causal 3D VAE, Open-Sora v2 256/768 px) | (1, 16, 5, 16, 16) | (1, 3, 17, 128, 128) | 128, 256, 512, 512 |
| dc_ae (Video DC-AE F32T4C128, high compression) | (1, 128, 2, 8, 8) | (1, 3, 8, 256, 256) | 128 ... 1024 |
| flux_ae (FLUX.1-dev 2D AE, the t2i2v image step) | (1, 16, 1, 32, 32) | (1, 3, 1, 256, 256) | 128, 256, 512, 512 |

Speed. Each framework runs in its own fresh process (a MindSpore process keeps runtime threads that would slow
torch down in the same process), with the same thread count (`--threads`, default all cores: `OMP_NUM_THREADS`,
`torch.set_num_threads`, MindSpore `op_tuning.threads_num`), optionally pinned to the same cores (`--cpus`). The
workers alternate torch, MindSpore, torch, MindSpore ... for `--rounds` pairs so both see the same machine noise.
The first torch worker builds the model with the cases' seeded weights (`parity.adapters.<model>.build_torch`) and
writes its state dict to a temporary .npz; every worker loads that file (MindSpore converts it with the model's
mapping and `load_strict`, and never imports torch), decodes `--warmup` times untimed (MindSpore: the first call
compiles the conv slab graphs), then times `--repeat` decodes. Printed: per framework the median over all timed
decodes with min-max, each round's median, the ratio MindSpore / torch of the medians (lower is better), and
MindSpore's output against torch's.

Memory. Each worker resets its peak counter after loading the weights (converter.memory.PeakRSS: the kernel's
VmHWM where it can be reset, else sampling) and reports the peak resident set of its decodes: weights + runtime +
the decode's working set, the number a user compares with the machine's RAM. Also printed: the working set alone
(peak minus the RSS before the first decode). Ratios MindSpore / torch of both.

MindSpore runs its default model (PyNative orchestration, large convs as per-shape slab graphs); `--conv-jit`,
`--conv-budget-mb` build it with other `ConvSettings` (Hunyuan VAE and Flux AE); `--jit` runs the whole Hunyuan
decoder as one `ms.jit` graph (opt-in: at the real widths it needs more than 24 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from _worker import load_torch_state, serve_worker, write_torch_state  # noqa: E402  (benchmarks/)

HUNYUAN_REAL = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
                "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}
DEFAULT_LATENT = {"hunyuan": (1, 16, 5, 16, 16), "dc_ae": (1, 128, 2, 8, 8), "flux_ae": (1, 16, 1, 32, 32)}
TINY_LATENT = {"hunyuan": (1, None, 2, 4, 4), "dc_ae": (1, None, 1, 2, 2), "flux_ae": (1, None, 1, 8, 8)}
ADAPTER = {"hunyuan": "hunyuan_vae", "dc_ae": "dc_ae", "flux_ae": "flux_ae"}


def adapter(model: str):
    import importlib

    return importlib.import_module(f"parity.adapters.{ADAPTER[model]}")


def model_config(model: str, preset: str) -> dict:
    if model == "hunyuan" and preset == "real":
        return dict(HUNYUAN_REAL)
    return json.loads(json.dumps(adapter(model).PRESETS[preset]))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


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


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def _measure(run, args) -> dict:
    """Time the decodes of `run` with this process's peak RSS counted from here (weights already loaded)."""
    from converter.memory import PeakRSS, rss

    gc.collect()
    before = rss()
    peak = PeakRSS()
    out, first, times = _times(run, max(args.warmup, 1), args.repeat)
    p = peak.stop()
    return out, {"times": times, "first_call_s": first, "rss_loaded_mb": _mb(before), "decode_peak_mb": _mb(p),
                 "working_set_mb": _mb(p - before), "pid": os.getpid()}


def _state_file(args) -> Path:
    return Path(args.tmp) / f"state_{args.model}_{args.preset}.npz"


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    cfg = model_config(args.model, args.preset)
    model = adapter(args.model).build_torch(cfg, dtype=torch.float32, seed=0)   # the cases' seeded recipe: the same in every worker
    write_torch_state(_state_file(args), model)   # ... and, converted, MindSpore's
    z = torch.from_numpy(latent(args))

    def run():
        with torch.no_grad():
            return model.decode(z).numpy()

    out, res = _measure(run, args)
    ref = Path(args.tmp) / f"decoded_{args.model}.npy"
    if not ref.exists():
        np.save(ref, out)
    return {**res, "threads": torch.get_num_threads(), "version": torch.__version__,
            "mindspore_loaded": "mindspore" in sys.modules}


def worker_ms(args) -> dict:
    import importlib

    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from opensora_ms.ops.conv import apply_conv_settings

    cfg = model_config(args.model, args.preset)
    settings = conv_settings(args)
    M = importlib.import_module(f"opensora_ms.models.{ADAPTER[args.model]}")
    net = M.build(cfg, jit=args.jit) if args.model == "hunyuan" else M.build(cfg)
    apply_conv_settings(net, settings)
    mapping = adapter(args.model).mapping_name(cfg)
    load_torch_state(net, _state_file(args), mapping)
    z = ms.Tensor(latent(args))
    out, res = _measure(lambda: net.decode(z).asnumpy(), args)
    res.update({"version": ms.__version__, "conv_budget_mb": settings.budget_bytes >> 20, "conv_jit": settings.jit,
                "torch_loaded": "torch" in sys.modules})
    ref = Path(args.tmp) / f"decoded_{args.model}.npy"
    if ref.exists():
        res["rel"] = rel(out, np.load(ref))
    return res


# ----------------------------------------------------------------------------------------------------------- parent


def _spawn(kind: str, args, model: str, lat, tmp: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--preset", args.preset, "--latent",
           *map(str, lat), "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--tmp", tmp, "--conv-jit", args.conv_jit] + \
        (["--conv-budget-mb", str(args.conv_budget_mb)] if args.conv_budget_mb else []) + \
        (["--jit"] if args.jit else []) + (["--cpus", args.cpus] if args.cpus else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{model} {kind} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _line(name, ts):
    return (f"  {name:<44} median {statistics.median(ts):8.3f} s  (min {min(ts):.3f}, max {max(ts):.3f}, "
            f"{len(ts)} decodes)")


def bench(args, model: str) -> dict:
    """Interleaved worker pairs for one model; prints its block and returns its numbers."""
    lat = tuple(args.latent) if args.latent else (DEFAULT_LATENT if args.preset == "real" else TINY_LATENT)[model]
    if lat[1] is None:   # the preset's latent channels
        cfg = model_config(model, args.preset)
        lat = (lat[0], cfg.get("latent_channels", cfg.get("z_channels"))) + lat[2:]
    runs = {"torch": [], "ms": []}
    rounds, last, workers = [], {}, []
    mem = {"torch": [], "ms": []}
    with tempfile.TemporaryDirectory(prefix="vae_bench_") as tmp:
        for r in range(args.rounds):
            for kind in ("torch", "ms"):
                last[kind] = _spawn(kind, args, model, lat, tmp)
                runs[kind] += last[kind]["times"]
                mem[kind].append(last[kind])
                workers.append({"framework": kind, "pid": last[kind]["pid"],
                                "other_framework_loaded": last[kind].get("mindspore_loaded",
                                                                         last[kind].get("torch_loaded"))})
            rounds.append({k: statistics.median(last[k]["times"]) for k in runs})
            print(f"{model} round {r + 1}: torch median {rounds[-1]['torch']:.3f} s, mindspore median "
                  f"{rounds[-1]['ms']:.3f} s (ratio {rounds[-1]['ms'] / rounds[-1]['torch']:.2f})", flush=True)
    t, m = statistics.median(runs["torch"]), statistics.median(runs["ms"])
    peak = {k: max(w["decode_peak_mb"] for w in mem[k]) for k in mem}
    work = {k: max(w["working_set_mb"] for w in mem[k]) for k in mem}
    loaded = {k: max(w["rss_loaded_mb"] for w in mem[k]) for k in mem}
    mode = "whole-decoder ms.jit" if args.jit else "PyNative + conv slab graphs"
    print(f"\n{model} decode {lat} ({args.preset} widths), fp32 CPU, {args.threads} threads each"
          f"{f' pinned to cores {args.cpus}' if args.cpus else ''}, each framework in its own process, "
          f"{args.rounds} interleaved pairs x {args.repeat} decodes (torch {last['torch']['version']}, mindspore "
          f"{last['ms']['version']}; conv budget {last['ms']['conv_budget_mb']} MiB, conv graphs "
          f"{last['ms']['conv_jit']})")
    print(_line("torch reference", runs["torch"]))
    print(_line(f"mindspore ({mode})", runs["ms"]) + f"; first call {last['ms']['first_call_s']:.1f} s")
    print("  round ratios: " + ", ".join(f"{x['ms'] / x['torch']:.2f}" for x in rounds))
    print(f"  output max rel diff mindspore vs torch: {last['ms'].get('rel', float('nan')):.2e}")
    for k, name in (("torch", "torch"), ("ms", "mindspore")):
        print(f"  {name:<10} RSS with weights loaded {loaded[k]:8.1f} MB, decode peak {peak[k]:8.1f} MB, "
              f"working set {work[k]:8.1f} MB")
    print(f"{model}: time ratio mindspore / torch (medians) = {m / t:.2f}; peak memory ratio = "
          f"{peak['ms'] / peak['torch']:.2f} (working set {work['ms'] / max(work['torch'], 1e-9):.2f})")
    return {"model": model, "latent": list(lat), "preset": args.preset, "threads": args.threads, "cpus": args.cpus,
            "rounds": args.rounds, "repeat": args.repeat, "jit": args.jit,
            "conv_budget_mb": last["ms"]["conv_budget_mb"], "conv_jit": last["ms"]["conv_jit"],
            "torch_s": round(t, 3), "ms_s": round(m, 3), "ratio": round(m / t, 3),
            "torch_min_max": [round(min(runs["torch"]), 3), round(max(runs["torch"]), 3)],
            "ms_min_max": [round(min(runs["ms"]), 3), round(max(runs["ms"]), 3)],
            "round_ratios": [round(x["ms"] / x["torch"], 3) for x in rounds],
            "ms_first_call_s": round(last["ms"]["first_call_s"], 2), "max_rel_vs_torch": last["ms"].get("rel"),
            "decode_peak_mb": peak, "working_set_mb": work, "rss_loaded_mb": loaded,
            "memory_ratio": round(peak["ms"] / peak["torch"], 3),
            "working_set_ratio": round(work["ms"] / max(work["torch"], 1e-9), 3),
            "runs": {k: [round(v, 3) for v in vs] for k, vs in runs.items()}, "workers": workers}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", *DEFAULT_LATENT], default="all")
    ap.add_argument("--preset", choices=["real", "tiny"], default="real", help="model widths (tiny: a smoke run)")
    ap.add_argument("--latent", type=int, nargs=5, metavar=("B", "C", "T", "H", "W"),
                    help="the latent to decode (default: per model, see above)")
    ap.add_argument("--repeat", type=int, default=3, help="timed decodes per worker")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes first (at least the first call)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (torch, mindspore) worker pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpus", default=None, help="pin both workers to these cores (e.g. '0' or '0,1')")
    ap.add_argument("--jit", action="store_true", help="MindSpore Hunyuan VAE: the whole decoder as one ms.jit graph")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--conv-jit", choices=["auto", "on", "off"], default="auto",
                    help="MindSpore CPU conv slab graphs (opensora_ms.ops.conv.ConvSettings.jit)")
    ap.add_argument("--conv-budget-mb", type=int, help="MindSpore CPU conv slab budget (ConvSettings.budget_bytes)")
    ap.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")
    if args.latent and args.model == "all":
        ap.error("--latent needs one --model")

    if serve_worker(args, worker_torch, worker_ms):
        return None
    models = list(DEFAULT_LATENT) if args.model == "all" else [args.model]
    res = {"models": [bench(args, m) for m in models]}
    if len(models) > 1:
        print("\nsummary (MindSpore / torch; targets <= 2x time, <= 2x peak memory):")
        for r in res["models"]:
            print(f"  {r['model']:<8} {tuple(r['latent'])}: time {r['ratio']:.2f}x, peak memory "
                  f"{r['memory_ratio']:.2f}x (working set {r['working_set_ratio']:.2f}x), max rel {r['max_rel_vs_torch']:.1e}")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
