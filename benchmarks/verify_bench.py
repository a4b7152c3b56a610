"""Blockwise verification benchmark: a full-size synthetic Open-Sora v2 MMDiT through `msconv convert` and
`msconv verify --parity`, each in its own child process; wall time and peak RSS (the child's ru_maxrss) printed.

The source has exactly the real checkpoint's tensor list (../shared/upstream/manifests/mmdit_open_sora_v2.json:
1082 bf16 tensors, 23.8 GB, all 19 double + 38 single blocks) with seeded values, written tensor by tensor (never
more than one tensor in memory). `--double N --single M` keeps the first N / M blocks (the CI test's size is
1 + 1). Values: bf16 with a random sign, mantissa and one of four exponents around 1/sqrt(fan_in) for matrices
(from the generator's raw bits: 23.8 GB in well under a minute), 1 + 0.1 N(0, 1) for norm scales / gains,
0.05 N(0, 1) for biases -- never zeros, every tensor different.

    OMP_NUM_THREADS=2 python benchmarks/verify_bench.py                     # the full model (needs ~48 GB disk)
    python benchmarks/verify_bench.py --double 1 --single 1 --json         # the CI size
    python benchmarks/verify_bench.py --model vae                          # Hunyuan VAE (0.5 GB)
    python benchmarks/verify_bench.py --model t5 --layers 2                # T5-XXL, 2 of its 24 blocks
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter.safetensors_io import build_header  # noqa: E402
from converter.tensor import encode  # noqa: E402

def _manifest(name: str) -> Path:
    if name.startswith("targets/"):
        return ROOT / "mappings" / name
    p = ROOT.parent / "shared" / "upstream" / "manifests" / name
    return p if p.is_file() else ROOT / "mappings" / "manifests" / name


# --model: (manifest of the real checkpoint -- or, for the text encoders, which have none, the shipped MindSpore
# inventory at the real config with transformers' names --, mapping)
MODELS = {"mmdit": ("mmdit_open_sora_v2.json", "mmdit_opensora_v2"), "vae": ("hunyuan_vae.json", "hunyuan_vae"),
          "t5": ("targets/t5_encoder.json", "t5_encoder"), "clip": ("targets/clip_text.json", "clip_text"),
          "flux_ae": ("flux1_dev_ae.json", "flux_ae"), "dc_ae": ("video_dc_ae_f32t4c128.json", "video_dc_ae")}
MANIFEST = _manifest(MODELS["mmdit"][0])
RENAME = {"encoder.embed_tokens.weight": "shared.weight"}  # T5: transformers' tie source (the port's name differs)


def manifest_inventory(double: int | None = None, single: int | None = None, manifest: Path = MANIFEST,
                       layers: int | None = None) -> dict:
    """{key: (shape, "BF16")} of the real checkpoint, keeping the first `double` / `single` MMDiT blocks and the
    first `layers` T5 blocks / CLIP layers (None: all)."""
    with open(manifest, encoding="utf-8") as f:
        tensors = json.load(f)["tensors"]
    out = {}
    for t in tensors:
        m = re.match(r"(double_blocks|single_blocks|encoder\.block|encoder\.layers)\.(\d+)\.", t["key"])
        if m:
            keep = {"double_blocks": double, "single_blocks": single}.get(m.group(1), layers)
            if keep is not None and int(m.group(2)) >= keep:
                continue
        out[RENAME.get(t["key"], t["key"])] = (tuple(t["shape"]), "BF16")
    return out


def values(key: str, shape: tuple, seed: int) -> np.ndarray:
    """bf16 storage (uint16) of one tensor, seeded by (seed, key)."""
    n = math.prod(shape)
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(key.encode())]))
    if len(shape) >= 2:
        # sign and mantissa random, exponent one of 4 octaves: rms ~ 7.04 * 2^(e0 - 127); aim at 1/sqrt(fan_in)
        e0 = 127 + round(math.log2(1.0 / math.sqrt(math.prod(shape[1:])) / 7.04))
        u = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
        bits = (u & np.uint16(0x807F)) | ((np.uint16(e0) + ((u >> np.uint16(7)) & np.uint16(3))) << np.uint16(7))
        return bits.reshape(shape)
    v = rng.standard_normal(n, dtype=np.float32)
    v = 1 + 0.1 * v if key.endswith((".scale", ".weight")) else 0.05 * v  # 1-D weights: norm gains
    return encode(v.astype(np.float32), "BF16").reshape(shape)


def write_synthetic(path, double: int | None = None, single: int | None = None, seed: int = 0,
                    manifest: Path = MANIFEST, layers: int | None = None) -> int:
    """Write the synthetic checkpoint to `path` (streaming); returns its size in bytes."""
    inv = manifest_inventory(double, single, manifest, layers)
    header, _ = build_header([(k, d, s) for k, (s, d) in inv.items()], {"format": "pt"})
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        for k, (s, d) in inv.items():
            f.write(values(k, s, seed).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
    return os.path.getsize(path)


def child(args: list[str], log=None) -> dict:
    """Run `msconv ARGS` (cli.py) in a fresh process, its progress lines passed to `log` live; returns rc, wall
    seconds, peak RSS (the child's own ru_maxrss, from wait4) and its output."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *[str(a) for a in args]], cwd=str(ROOT),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if log:
            log(line.rstrip())
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "seconds": time.perf_counter() - t, "peak_rss": ru.ru_maxrss * 1024,
            "output": "".join(lines)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="mmdit", help="which real checkpoint to imitate")
    ap.add_argument("--double", type=int, default=None, help="keep the first N double blocks (default: all 19)")
    ap.add_argument("--single", type=int, default=None, help="keep the first N single blocks (default: all 38)")
    ap.add_argument("--layers", type=int, default=None, help="t5 / clip: keep the first N blocks / layers")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--only", default=None, help="verify only these blocks (globs, comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the source and output go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args(argv)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else (lambda s: print(s, flush=True))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="verify_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    src, out, rep = work / "source.safetensors", work / "converted", work / "report"
    try:
        t = time.perf_counter()
        manifest, mapping = MODELS[a.model]
        size = write_synthetic(src, a.double, a.single, a.seed, _manifest(manifest), a.layers)
        gen_s = time.perf_counter() - t
        log(f"source: {size / 1e9:.2f} GB written in {gen_s:.1f} s")
        conv = child(["convert", src, "--mapping", mapping, "--out", out], log)
        if conv["rc"] != 0:
            log(conv["output"][-2000:])
            return 1
        log(f"convert: {conv['seconds']:.1f} s, peak RSS {conv['peak_rss'] / 1e9:.2f} GB")
        ver = child(["verify", out, "--parity", "--tokens", a.tokens, "--report", rep]
                    + (["--only", a.only] if a.only else []), log)
        res = {"model": a.model, "double": a.double, "single": a.single, "source_bytes": size, "generate_s": round(gen_s, 1),
               "convert_s": round(conv["seconds"], 1), "convert_peak_rss": conv["peak_rss"],
               "verify_rc": ver["rc"], "verify_s": round(ver["seconds"], 1), "verify_peak_rss": ver["peak_rss"],
               "threads": os.environ.get("OMP_NUM_THREADS", "unset"), "load_avg": os.getloadavg()}
        if (rep / "report.json").is_file():
            r = json.loads((rep / "report.json").read_text())
            res["blocks"] = r["counts"]["blocks"]
            res["verdict"] = r["verdict"]
            res["worst_max_rel"] = max((t.get("max_rel") or 0) for t in r["tensors"])
            units = r["blockwise"]["units"]
            res["per_block_s"] = {k: round(float(np.median([u["seconds"] for u in units if u["name"].startswith(k)])), 1)
                                  for k in ("double_blocks", "single_blocks") if any(u["name"].startswith(k) for u in units)}
            res["slowest_block"] = max(units, key=lambda u: u["seconds"])["name"]
        if a.json:
            print(json.dumps(res))
        else:
            log(f"verify --parity: rc {ver['rc']}, {res.get('blocks')} blocks, {ver['seconds'] / 60:.1f} min, peak RSS "
                f"{ver['peak_rss'] / 1e9:.2f} GB, worst max_rel {res.get('worst_max_rel', float('nan')):.2e} "
                f"(median per double block {res.get('per_block_s', {}).get('double_blocks')} s, single "
                f"{res.get('per_block_s', {}).get('single_blocks')} s; OMP_NUM_THREADS={res['threads']}, "
                f"load avg at end {res['load_avg'][0]:.1f})")
        return 0 if ver["rc"] == 0 else 1
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(rep, ignore_errors=True)
            src.unlink(missing_ok=True)
            if a.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
