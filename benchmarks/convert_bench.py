"""Conversion benchmark: wall time, peak RSS and throughput against `cat` for the same bytes.

Builds a sparse checkpoint with exactly the tensor list of the real Open-Sora v2 MMDiT
(../shared/upstream/manifests/mmdit_open_sora_v2.json, 23.8 GB bf16; sparse, so it costs no disk), converts it
with the real `mmdit_opensora_v2` mapping in a child process (peak RSS = the child's ru_maxrss), and times
`cat SRC > DST` on the same machine in the same run (`--repeat N` alternates the two and reports medians). `--limit-gb` / `--scale` keep the non-block tensors and
the first double/single blocks up to that size (a structurally complete, smaller model).

    python benchmarks/convert_bench.py                 # full 23.8 GB (needs ~24 GB free disk at a time)
    python benchmarks/convert_bench.py --limit-gb 1    # the 1 GB smoke version (run by the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter.inventory import load_inventory  # noqa: E402
from converter.safetensors_io import build_header  # noqa: E402
from converter.tensor import nbytes  # noqa: E402

MANIFEST = ROOT.parent / "shared" / "upstream" / "manifests" / "mmdit_open_sora_v2.json"


def select(inv: dict, limit: int | None) -> dict:
    """All tensors, or the non-block ones plus whole double/single blocks (alternating) up to `limit` bytes."""
    if limit is None:
        return inv
    blocks: dict[tuple, list] = {}
    rest = []
    for k in inv:
        m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.", k)
        (blocks.setdefault((m.group(1), int(m.group(2))), []) if m else rest).append(k)
    size = lambda keys: sum(nbytes(*inv[k]) for k in keys)  # noqa: E731
    keep, total = list(rest), size(rest)
    doubles = sorted(b for b in blocks if b[0] == "double_blocks")
    singles = sorted(b for b in blocks if b[0] == "single_blocks")
    order = [b for pair in zip(doubles, singles) for b in pair] + doubles[len(singles):] + singles[len(doubles):]
    for b in order:
        s = size(blocks[b])
        if total + s > limit and total > 0:
            break
        keep += blocks[b]
        total += s
    return {k: inv[k] for k in inv if k in set(keep)}


def build_sparse(inv: dict, path: Path) -> int:
    """A valid safetensors file whose data section is a hole (reads as zeros, occupies no disk)."""
    header, offs = build_header([(k, d, s) for k, (s, d) in inv.items()], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + (offs[-1][1] if offs else 0))
    return os.path.getsize(path)


def identity_mapping(inv: dict, path: Path) -> Path:
    depths = sorted({len(k.split(".")) for k in inv})
    rules = "".join(f'  - {{source: "{p}", target: "{p}"}}\n'
                    for p in (".".join("{%s}" % chr(97 + i) for i in range(n)) for n in depths))
    path.write_text(f"name: {path.stem}\nversion: 1\ndescription: identity over the manifest keys (benchmark fallback)\nrules:\n{rules}")
    return path


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from converter.engine import convert_checkpoint
t = time.perf_counter()
r = convert_checkpoint({src!r}, {mapping!r}, {out!r}, shard_size={shard!r}, hash_source={hash_source!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "bytes": r.bytes, "tensors": r.tensors, "files": len(r.files),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime}}))
"""


def timed(cmd, shell=False) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True)
    return time.perf_counter() - t


def sync() -> float:
    return timed(["sync"])


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache, so every measured run starts cold (as after a
    download too large to stay cached) instead of whichever ran second reading from memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(args) -> dict:
    full = load_inventory(args.manifest)
    limit = None
    if args.limit_gb is not None:
        limit = int(args.limit_gb * 1e9)
    elif args.scale is not None:
        limit = int(args.scale * sum(nbytes(s, d) for s, d in full.values()))
    inv = select(full, limit)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out, copy = work / "Open_Sora_v2.safetensors", work / "ms_out", work / "cat_copy.safetensors"
    for p in (out, copy):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    mapping = ROOT / "mappings" / "mmdit_opensora_v2.yaml"
    fallback = not mapping.is_file()
    if fallback:
        mapping = identity_mapping(inv, work / "bench_identity.yaml")
    size = build_sparse(inv, src)
    res = {"source_bytes": size, "tensors": len(inv), "mapping": str(mapping), "mapping_fallback": fallback,
           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    try:
        cats, convs, cat_cpu = [], [], []
        for rep in range(args.repeat):  # alternate, so page-cache state favours neither side
            sync()
            evict(src)
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            c = timed(f"cat '{src}' > '{copy}'", shell=True)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cat_cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            cats.append((c, sync()))
            copy.unlink()
            sync()
            evict(src)
            code = CHILD.format(root=str(ROOT), src=str(src), mapping=str(mapping), out=str(out), shard=args.shard_size,
                                hash_source=not args.no_source_hash)
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"conversion failed:\n{p.stderr[-3000:]}")
            child = json.loads(p.stdout.strip().splitlines()[-1])
            convs.append((child["seconds"], sync(), child))
            shutil.rmtree(out)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731  (upper median)
        res["runs"] = [{"cat_s": a, "cat_sync_s": b, "cat_cpu_s": cc, "convert_s": c, "convert_sync_s": d,
                        "convert_cpu_s": ch["cpu_s"], "peak_rss_mb": ch["maxrss_kb"] / 1024}
                       for (a, b), cc, (c, d, ch) in zip(cats, cat_cpu, convs)]
        res["cat_s"], res["cat_sync_s"] = med([a for a, _ in cats]), med([b for _, b in cats])
        res["convert_s"], res["convert_sync_s"] = med([c for c, _, _ in convs]), med([d for _, d, _ in convs])
        child = convs[-1][2]
        res.update({"output_bytes": child["bytes"], "output_files": child["files"],
                    "peak_rss_mb": max(ch["maxrss_kb"] for _, _, ch in convs) / 1024})
        res["loadavg_after"] = os.getloadavg()
        cat_total = res["cat_s"] + res["cat_sync_s"]
        conv_total = res["convert_s"] + res["convert_sync_s"]
        res["cat_MBps"] = size / cat_total / 1e6
        res["convert_MBps"] = size / conv_total / 1e6
        res["throughput_ratio_vs_cat"] = cat_total / conv_total
    finally:
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if not args.keep_source:
            src.unlink(missing_ok=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(MANIFEST))
    ap.add_argument("--limit-gb", type=float, default=None, help="convert a structurally complete subset of about this size")
    ap.add_argument("--scale", type=float, default=None, help="same, as a fraction of the full checkpoint (0.05 ~ 1.2 GB)")
    ap.add_argument("--workdir", default=None, help="where the sparse source and the outputs go (default: a temp dir)")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--repeat", type=int, default=1, help="alternate cat / convert this many times; report medians")
    ap.add_argument("--no-source-hash", action="store_true", help="skip the source sha256 in the manifest")
    ap.add_argument("--keep-source", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"source: {res['tensors']} tensors, {res['source_bytes'] / 1e9:.2f} GB (sparse), mapping {Path(res['mapping']).name}"
              f"{' (identity fallback)' if res['mapping_fallback'] else ''}")
        for i, r in enumerate(res["runs"]):
            print(f"  run {i + 1}: cat {r['cat_s']:.1f} s (cpu {r['cat_cpu_s']:.1f} s), convert {r['convert_s']:.1f} s "
                  f"(cpu {r['convert_cpu_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"cat:     {res['cat_s']:.1f} s + sync {res['cat_sync_s']:.1f} s  = {res['cat_MBps']:.0f} MB/s")
        print(f"convert: {res['convert_s']:.1f} s + sync {res['convert_sync_s']:.1f} s  = {res['convert_MBps']:.0f} MB/s, "
              f"peak RSS {res['peak_rss_mb']:.0f} MB, {res['output_files']} files")
        print(f"throughput ratio vs cat: {res['throughput_ratio_vs_cat']:.2f}  (load avg before {res['loadavg_before'][0]:.2f}, "
              f"after {res['loadavg_after'][0]:.2f}, {res['cpus']} CPUs)")
    return res


if __name__ == "__main__":
    main()
