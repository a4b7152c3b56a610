"""What MindSpore 2.10's CPU memory pool does with the memory of PyNative ops and compiled graphs: the facts behind
docs/vae.md "Memory". MindSpore only, one process per probe (a fresh pool each), RSS deltas in MB.

    python benchmarks/ms_pool_probe.py                 # the three pool probes (~1 min)
    python benchmarks/ms_pool_probe.py --flux          # + Flux AE decode (1,16,1,32,32) at real widths, RSS after
                                                       #   every resnet block, conv graphs on vs off (~1 min more)

1. `graphs`: four distinct compiled graphs with the same buffer sizes, one after another: does each keep its own
   buffers (RSS +n x per graph) or do they share the pool (RSS flat after the first)?
2. `sizes`: one graph called with new, growing input sizes, then the old ones: the pool's high-water mark.
3. `release`: a PyNative tensor freed, then `ms.runtime.empty_cache()`: does RSS come down on CPU?
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    from converter.memory import rss

    return rss() / 2**20


def probe_graphs():
    import mindspore as ms
    from mindspore import Tensor, ops

    mm = ops.MatMul()
    x = Tensor(np.ones((1024, 1024), np.float32))
    y = Tensor(np.ones((200 * 256, 1024), np.float32)) + 0  # 200 MB, already in the pool
    y.asnumpy()
    r0 = _rss_mb()
    out = []
    for i in range(4):
        c = float(i + 2)

        def g(a, b):
            z = mm(a, b) * c   # three 200 MB buffers inside the graph, a scalar out
            w = z + 1.0
            return (w * z).sum()

        ms.jit(g)(y, x).asnumpy()
        out.append(round(_rss_mb() - r0))
    return {"rss_after_each_distinct_graph_mb": out}


def probe_sizes():
    import mindspore as ms
    from mindspore import Tensor, ops

    mm = ops.MatMul()

    def g(a, b):
        z = mm(a, b)
        return z * 2.0 + z

    jg = ms.jit(g)
    x = Tensor(np.ones((1024, 1024), np.float32))
    ys = {n: Tensor(np.ones((n * 256, 1024), np.float32)) + 0 for n in (100, 120, 140, 160)}
    for v in ys.values():
        v.asnumpy()
    gc.collect()
    r0 = _rss_mb()
    out = []
    for n in (100, 120, 140, 160, 100, 120):
        o = jg(ys[n], x)
        o.asnumpy()
        del o
        gc.collect()
        out.append([n, round(_rss_mb() - r0)])
    return {"graph_buffers_mb_vs_rss_mb": out}


def probe_release():
    import mindspore as ms
    from mindspore import Tensor, mint

    x = Tensor(np.ones((1024, 1024), np.float32))
    r0 = _rss_mb()
    a = mint.broadcast_to(x[:1], (500 * 256, 1024)) * 2.0   # 500 MB
    a.asnumpy()
    held = _rss_mb() - r0
    del a
    gc.collect()
    freed = _rss_mb() - r0
    ms.runtime.empty_cache()
    return {"rss_with_500mb_tensor": round(held), "after_del": round(freed), "after_empty_cache": round(_rss_mb() - r0)}


def probe_flux(jit: str):
    import mindspore as ms

    import vae_bench as vb  # noqa: E402  (benchmarks/, the script's own folder)
    import opensora_ms.models.flux_ae as F
    from opensora_ms.ops.conv import ConvSettings, apply_conv_settings

    ms.device_context.cpu.op_tuning.threads_num(2)
    net = F.build(vb.model_config("flux_ae", "real"))
    apply_conv_settings(net, ConvSettings(jit={"on": True, "off": False, "auto": "auto"}[jit]))
    trace, orig = [], F.ResnetBlock.construct

    def traced(self, h):
        y = orig(self, h)
        y.asnumpy()
        trace.append([list(y.shape), round(_rss_mb() - r0)])
        return y

    F.ResnetBlock.construct = traced
    z = ms.Tensor(np.random.default_rng(0).standard_normal((1, 16, 1, 32, 32)).astype(np.float32))
    gc.collect()
    r0 = _rss_mb()
    t = time.perf_counter()
    net.decode(z).asnumpy()
    first = time.perf_counter() - t
    return {"conv_graphs": jit, "first_decode_s": round(first, 1), "rss_after_each_resnet_mb": trace}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flux", action="store_true", help="also the Flux AE decode trace, conv graphs on and off")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        import mindspore as ms

        ms.set_device("CPU")
        name, _, arg = args.probe.partition(":")
        fn = {"graphs": probe_graphs, "sizes": probe_sizes, "release": probe_release}.get(name)
        print("RESULT " + json.dumps(fn() if fn else probe_flux(arg)))
        return None
    probes = ["graphs", "sizes", "release"] + (["flux:auto", "flux:off"] if args.flux else [])
    res = {}
    for p in probes:
        r = subprocess.run([sys.executable, __file__, "--probe", p], capture_output=True, text=True, cwd=str(ROOT))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            raise SystemExit(f"probe {p} failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
        res[p] = json.loads(lines[-1][len("RESULT "):])
        print(f"{p}: {json.dumps(res[p])}", flush=True)
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
