"""Hunyuan VAE decode speed and memory: MindSpore CPU (fp32) against the PyTorch reference CPU, same weights.

    python benchmarks/vae_bench.py                    # speed: decode (1, 16, 5, 16, 16) at widths (128, 256, 512, 512)
    python benchmarks/vae_bench.py --latent 1 16 2 32 32 --repeat 1     # another latent
    python benchmarks/vae_bench.py --memory torch --latent 1 16 2 32 32  # peak RSS of one decode (run per framework)

Speed: weights are the cases' seeded recipe (parity.adapters.hunyuan_vae.init_weights_), converted with
`mappings/hunyuan_vae.yaml` and loaded with `load_strict`. Both frameworks run in this process with their default
threads; each is warmed up once (MindSpore: graph compilations), then the median of `--repeat` timed decodes is
reported, interleaving the two frameworks to share the machine's noise. MindSpore modes:
  * `pynative`: PyNative orchestration, convolutions >= 5e8 FLOPs as cached per-shape graphs (the default model);
  * `jit`: the whole decoder as one `ms.jit` graph (`model.set_jit(True)`); opt-in: at the real widths it
    needs more than the 24 GB of this project's machines (the process was OOM-killed at 24 GB RSS).
The ratio printed is MindSpore time / torch time (lower is better).

Memory (`--memory torch|mindspore`): peak resident set (ru_maxrss) of a fresh process that builds the model at
real widths and decodes one latent; `--memory-base` reports the same process without the decode, so the difference
is the decode's working set (activations + conv columns), the number docs/vae.md extrapolates per tile.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REAL = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def build_pair(cfg, seed=0):
    import torch

    from opensora_ms.models import hunyuan_vae as M
    from parity.adapters import hunyuan_vae as A

    tm = A.build_torch(cfg, dtype=torch.float32, seed=seed)
    net = M.build(cfg, jit=False)
    A.load_ms_from_torch(net, tm, cfg)
    return tm, net


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory(framework: str, latent, base: bool) -> dict:
    cfg = dict(REAL)
    z = np.random.default_rng(0).standard_normal(latent).astype(np.float32)
    if framework == "torch":
        import torch

        from parity.adapters import hunyuan_vae as A

        model = A.build_torch(cfg)
        before = peak_rss_mb()
        if not base:
            with torch.no_grad():
                out = model.decode(torch.from_numpy(z))
            shape = list(out.shape)
        else:
            shape = None
    else:
        import mindspore as ms

        from opensora_ms.models import hunyuan_vae as M

        model = M.build(cfg, jit=False)
        for _, p in model.parameters_and_names():  # materialise the weights like a loaded checkpoint
            p.asnumpy()
        before = peak_rss_mb()
        if not base:
            out = model.decode(ms.Tensor(z))
            shape = list(out.shape)
            out.asnumpy()
        else:
            shape = None
    extra = {}
    if framework == "mindspore":
        from opensora_ms.ops import conv as oc

        extra = {"conv_jit": oc._USE_JIT[0], "conv_budget_mb": oc.get_cpu_conv_budget() >> 20}
    return {"framework": framework, "latent": list(latent), **extra, "output": shape, "rss_before_decode_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "decode_working_set_mb": round(peak_rss_mb() - before, 1)}


def speed(latent, repeat: int, modes) -> dict:
    import torch

    import mindspore as ms

    cfg = dict(REAL)
    t0 = time.time()
    tm, net = build_pair(cfg)
    print(f"built both models at real widths in {time.time() - t0:.1f}s", flush=True)
    z = np.random.default_rng(0).standard_normal(latent).astype(np.float32)
    zt, zm = torch.from_numpy(z), ms.Tensor(z)

    def run_torch():
        with torch.no_grad():
            return tm.decode(zt).numpy()

    def run_ms(mode):
        net.set_jit(mode == "jit")
        return net.decode(zm).asnumpy()

    res = {"latent": list(latent), "widths": cfg["block_out_channels"], "torch_threads": torch.get_num_threads()}
    t = time.time()
    ref = run_torch()
    res["torch_first_s"] = round(time.time() - t, 3)
    outs = {}
    for mode in modes:
        t = time.time()
        outs[mode] = run_ms(mode)
        res[f"ms_{mode}_first_s"] = round(time.time() - t, 3)  # includes graph compilation
        res[f"ms_{mode}_max_rel_vs_torch"] = rel(outs[mode], ref)
        print(f"warm-up {mode}: {res[f'ms_{mode}_first_s']}s, max_rel vs torch {res[f'ms_{mode}_max_rel_vs_torch']:.2e}",
              flush=True)
    times = {"torch": [], **{m: [] for m in modes}}
    for _ in range(repeat):
        t = time.time()
        run_torch()
        times["torch"].append(time.time() - t)
        for mode in modes:
            t = time.time()
            run_ms(mode)
            times[mode].append(time.time() - t)
    res["torch_s"] = round(statistics.median(times["torch"]), 3)
    for mode in modes:
        res[f"ms_{mode}_s"] = round(statistics.median(times[mode]), 3)
        res[f"ratio_{mode}"] = round(res[f"ms_{mode}_s"] / res["torch_s"], 2)
    res["runs"] = {k: [round(v, 3) for v in vs] for k, vs in times.items()}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, nargs=5, default=[1, 16, 5, 16, 16], metavar=("B", "C", "T", "H", "W"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["pynative"], choices=["pynative", "jit"])
    ap.add_argument("--memory", choices=["torch", "mindspore"])
    ap.add_argument("--memory-base", action="store_true", help="with --memory: build only, no decode")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--conv-jit", choices=["auto", "on", "off"], default="auto",
                    help="MindSpore CPU conv3d graphs (opensora_ms.ops.conv.set_cpu_conv_jit)")
    ap.add_argument("--conv-budget-mb", type=int, help="MindSpore CPU conv3d column budget (set_cpu_conv_budget)")
    args = ap.parse_args(argv)
    if args.conv_jit != "auto" or args.conv_budget_mb:
        from opensora_ms.ops import conv as oc

        oc.set_cpu_conv_jit({"auto": "auto", "on": True, "off": False}[args.conv_jit])
        if args.conv_budget_mb:
            oc.set_cpu_conv_budget(args.conv_budget_mb << 20)
    if args.memory:
        res = memory(args.memory, tuple(args.latent), args.memory_base)
    else:
        res = speed(tuple(args.latent), args.repeat, args.modes)
        print(f"\ndecode {tuple(args.latent)} at widths {res['widths']} (fp32, CPU)")
        print(f"  torch reference      : {res['torch_s']:.3f} s")
        for m in args.modes:
            print(f"  MindSpore {m:<10} : {res[f'ms_{m}_s']:.3f} s   ratio MS/torch = {res[f'ratio_{m}']:.2f}x"
                  f"   (first call {res[f'ms_{m}_first_s']:.1f} s)")
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
