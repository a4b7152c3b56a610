"""One denoising step of the sampling loop: MindSpore (CPU, fp32, MMDiT under ms.jit) against the torch reference
pipeline (CPU, fp32, eager) on the same weights and inputs.

A step is upstream's loop body (`I2VDenoiser.denoise`): the 3-way CFG batch [x, x, x] with [cond, cond, 0]
through the MMDiT, the oscillating text/image guidance with the i2v temporal ramp, the Euler update -- i2v_head
conditions, so every term of the step is live. Sizes:

- `tiny`: the pipeline cases' models and shapes (MMDiT hidden 64, 2+2 blocks; latent 16x3x4x6, 7 text tokens);
- `mid`: MMDiT hidden 512, 8 heads, 4+4 blocks (parity/adapters/mmdit.py PRESETS["bench"]), 256px 16:9, 33 frames
  (latent 16x9x24x42 -> 2268 image tokens) + upstream's 512 T5 tokens, batch 1 (3 rows with CFG).

Fairness: each framework runs in its own fresh process with the same thread count (`--threads`): OMP_NUM_THREADS,
`torch.set_num_threads` and MindSpore's `threads_num`; MindSpore's oneDNN GEMMs ignore `threads_num`, so
`--cpus 0` pins both workers to the same core(s) (os.sched_setaffinity) for a strictly equal share. Each worker
runs `--warmup + --runs` steps of one schedule
(the first MindSpore step compiles the graph; graph calls return before they have run, so the first execution's cost
lands in the second step: `--warmup` defaults to 2) and reports every timed step; the workers alternate for
`--rounds`. The MindSpore worker never imports torch: the torch worker hands it the seeded weights as an .npz.
Reported: the median step time per framework and their ratio; the MindSpore worker also reports the relative
difference of its final latent from the torch one (same weights, same inputs). Not a test.

    .venv/bin/python benchmarks/pipeline_bench.py [--size tiny|mid|both] [--runs 3] [--rounds 1] [--threads 2]
                                                  [--cpus 0]
"""

from __future__ import annotations

import argparse
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

SIZES = {
    "tiny": {"mmdit": "tiny", "latent": (16, 3, 4, 6), "n_txt": 7},
    "mid": {"mmdit": "bench", "latent": (16, 9, 24, 42), "n_txt": 512},
}


def _setup(size: str, steps: int):
    """Seeded inputs (numpy) and the recipe shared by both workers."""
    from opensora_ms.pipeline import plan
    from parity.adapters import mmdit as adapter

    s = SIZES[size]
    cfg = adapter.PRESETS[s["mmdit"]]
    C, T, H, W = s["latent"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, C, T, H, W), dtype=np.float32)
    ref = rng.standard_normal((C, 1, H, W), dtype=np.float32)
    masks, masked = plan.inference_condition(z.shape, "i2v_head", [[ref]], causal=True)
    txt = rng.standard_normal((3, s["n_txt"], cfg["context_in_dim"]), dtype=np.float32)
    vec = rng.standard_normal((3, cfg["vec_in_dim"]), dtype=np.float32)
    ts = plan.schedule(steps, H * W // 4, T)
    opt = dict(guidance=7.5, guidance_img=3.0, text_osci=True, image_osci=True)
    return cfg, z, masks, masked, txt, vec, ts, opt


def _state_file(args) -> Path:
    return Path(args.out).with_name(f"state_{args.size}.npz")


def _stamps():
    marks = [time.perf_counter()]
    return marks, lambda i: marks.append(time.perf_counter())


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from opensora_ms.pipeline import plan
    from parity.adapters import mmdit as adapter
    from parity.reference import pipeline as R

    cfg, z, masks, masked, txt, vec, ts, opt = _setup(args.size, args.warmup + args.runs)
    model = adapter.build_torch(cfg, seed=0)
    write_torch_state(_state_file(args), model)   # for the MindSpore worker (which never imports torch)
    C, T, H, W = z.shape[1:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    marks, tick = _stamps()
    x = R.denoise_i2v(model, R.pack(t(z), 2), t(plan.img_ids(T, H // 2, W // 2, 3)), t(txt),
                      torch.zeros(3, txt.shape[1], 3), t(vec), ts, masks=t(masks), masked_ref=t(masked),
                      scale_temporal_osci=True, patch_size=2, progress=tick, **opt)
    np.save(args.out, x.numpy())
    steps = np.diff(marks).tolist()
    return {"times": steps[args.warmup:], "first_step_s": steps[0], "version": torch.__version__}


def worker_ms(args) -> dict:
    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_device("CPU")
    from opensora_ms.pipeline import plan
    from opensora_ms.pipeline import sampling as S
    from parity.adapters import mmdit as adapter

    cfg, z, masks, masked, txt, vec, ts, opt = _setup(args.size, args.warmup + args.runs)
    net = load_torch_state(adapter.build_ms(cfg), _state_file(args), adapter.mapping_name(cfg))
    C, T, H, W = z.shape[1:]
    cond = plan.pack(np.concatenate([masks, masked], 1), 2)
    marks, tick = _stamps()
    x = S.denoise_i2v(net, plan.pack(z, 2), plan.img_ids(T, H // 2, W // 2, 3), txt,
                      np.zeros((3, txt.shape[1], 3), np.float32), vec, ts, cond=cond, temporal=(1, C, T, H, W, 2),
                      progress=tick, jit=True, **opt)
    x = S._np(x)
    steps = np.diff(marks).tolist()
    res = {"times": steps[args.warmup:], "first_step_s": steps[0], "version": ms.__version__,
           "torch_loaded": "torch" in sys.modules}
    if args.ref and Path(args.ref).is_file():
        r = np.load(args.ref)
        res["rel"] = float(np.abs(x - r).max() / np.abs(r).max())
    return res


def _spawn(kind: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--size", args.size, "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--out", str(out), "--ref", str(out)] + \
        (["--cpus", args.cpus] if args.cpus else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench(size: str, args) -> float:
    args.size = size
    t_all, m_all, info = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch_x.npy"
        for r in range(args.rounds):
            t = _spawn("torch", args, out)
            m = _spawn("ms", args, out)
            t_all += t["times"]
            m_all += m["times"]
            info = {"torch": t["version"], "ms": m["version"], "rel": m.get("rel"), "first": m["first_step_s"],
                    "torch_in_ms": m.get("torch_loaded")}
            print(f"[{size}] round {r + 1}: torch median {statistics.median(t['times']) * 1e3:.1f} ms, "
                  f"mindspore median {statistics.median(m['times']) * 1e3:.1f} ms", flush=True)
    tt, mt = statistics.median(t_all), statistics.median(m_all)
    s = SIZES[size]
    print(f"[{size}] one denoising step (3-way CFG batch, i2v): MMDiT preset {s['mmdit']!r}, latent {s['latent']}, "
          f"{s['n_txt']} text tokens, fp32, {args.threads} thread(s) each"
          f"{f' pinned to cores {args.cpus}' if args.cpus else ''}, own processes "
          f"(torch {info['torch']}, mindspore {info['ms']}); {args.rounds} round(s) x {args.runs} steps")
    print(f"  torch      eager            median {tt * 1e3:9.1f} ms  "
          f"(min {min(t_all) * 1e3:.1f}, max {max(t_all) * 1e3:.1f})")
    print(f"  mindspore  MMDiT ms.jit     median {mt * 1e3:9.1f} ms  "
          f"(min {min(m_all) * 1e3:.1f}, max {max(m_all) * 1e3:.1f}); "
          f"first step (compile) {info['first']:.1f} s; torch imported in the mindspore worker: "
          f"{info['torch_in_ms']}")
    if info.get("rel") is not None:
        print(f"  final latent max rel diff mindspore vs torch: {info['rel']:.2e}")
    print(f"[{size}] ratio mindspore / torch = {mt / tt:.2f}  (target <= 1.5)")
    return mt / tt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "mid", "both"], default="both")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first: MindSpore's first step compiles, and as calls return before their "
                         "graph has run, its first execution (several times a step) lands in the next step's time")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cpus", default=None, help="pin both workers to these cores, e.g. '0' or '0,1'")
    ap.add_argument("--worker", choices=["torch", "ms"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if serve_worker(args, worker_torch, worker_ms):
        return None
    return {s: bench(s, args) for s in (["tiny", "mid"] if args.size == "both" else [args.size])}


if __name__ == "__main__":
    main()
