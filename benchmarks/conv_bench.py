"""The op layer's CPU conv3d against torch, layer by layer: the causal 3x3x3 convs of the Hunyuan VAE decoder.

    python benchmarks/conv_bench.py                 # the decoder's layers for a (1, 16, 5, 16, 16) latent
    python benchmarks/conv_bench.py --budget-mb 256 --repeat 3

Each row is one layer shape: MindSpore `opensora_ms.ops.conv.conv3d(x, w, b, pad=(1, 1, 1, 1, 2, 0),
pad_mode="replicate"[, upsample=(2, 2, 2)])` (the padding and the upsampler's nearest upsampling fused into the
conv) against torch's `F.conv3d(F.pad(x, ..., mode="replicate"))` (after `F.interpolate` for the upsampler rows),
same inputs, both in this process with their default threads, warmed up once (MindSpore: slab graph compiles),
best of `--repeat`. GFLOP/s counts the conv's multiply-adds only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PADS = (1, 1, 1, 1, 2, 0)
# (C_in, C_out, T, H, W, upsample) of the decoder's 3x3x3 convs for a (1, 16, 5, 16, 16) latent; x calls per decode
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


def best(fn, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--budget-mb", type=int, help="opensora_ms.ops.conv.set_cpu_conv_budget (default: the module's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    import mindspore as ms

    from opensora_ms.ops import conv as oc

    if args.budget_mb:
        oc.set_cpu_conv_budget(args.budget_mb << 20)
    rng = np.random.default_rng(0)
    rows, tot_ms, tot_t = [], 0.0, 0.0
    print(f"{'C_in':>5} {'C_out':>5} {'input (T,H,W)':>15} {'up':>9} {'torch s':>8} {'MS s':>8} {'ratio':>6} {'MS GF/s':>8} {'max rel':>8}")
    for ci, co, t, h, w, up, calls in LAYERS:
        x = rng.standard_normal((1, ci, t, h, w)).astype(np.float32)
        wt = (rng.standard_normal((co, ci, 3, 3, 3)) * (ci * 27) ** -0.5).astype(np.float32)
        b = rng.standard_normal(co).astype(np.float32)
        xt, wtt, bt = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b)
        xm, wm, bm = ms.Tensor(x), ms.Tensor(wt), ms.Tensor(b)

        def run_torch():
            with torch.no_grad():
                v = xt
                if up:
                    first = F.interpolate(v[:, :, :1], scale_factor=(1,) + tuple(up[1:]), mode="nearest")
                    v = torch.cat([first, F.interpolate(v[:, :, 1:], scale_factor=up, mode="nearest")], 2)
                return F.conv3d(F.pad(v, PADS, mode="replicate"), wtt, bt)

        def run_ms():
            y = oc.conv3d(xm, wm, bm, pad=PADS, pad_mode="replicate", upsample=up)
            ms.runtime.synchronize()
            return y

        ref = run_torch().numpy()
        got = run_ms().asnumpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        tt, tm = best(run_torch, args.repeat), best(run_ms, args.repeat)
        flops = 2.0 * ci * co * 27 * ref.shape[2] * ref.shape[3] * ref.shape[4]
        rows.append({"c_in": ci, "c_out": co, "input": [t, h, w], "upsample": up, "calls_per_decode": calls,
                     "torch_s": round(tt, 4), "ms_s": round(tm, 4), "ratio": round(tm / tt, 2),
                     "ms_gflops": round(flops / tm / 1e9, 1), "max_rel": err})
        tot_ms += calls * tm
        tot_t += calls * tt
        print(f"{ci:5d} {co:5d} {str((t, h, w)):>15} {str(up or '-'):>9} {tt:8.3f} {tm:8.3f} {tm / tt:6.2f} "
              f"{flops / tm / 1e9:8.0f} {err:8.1e}", flush=True)
    print(f"\nweighted by calls per decode: torch {tot_t:.2f} s, MindSpore {tot_ms:.2f} s, ratio {tot_ms / tot_t:.2f}x "
          f"(conv budget {oc.get_cpu_conv_budget() >> 20} MiB)")
    res = {"budget_mb": oc.get_cpu_conv_budget() >> 20, "layers": rows, "weighted_torch_s": round(tot_t, 3),
           "weighted_ms_s": round(tot_ms, 3), "weighted_ratio": round(tot_ms / tot_t, 2)}
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
