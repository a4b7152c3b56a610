"""`msconv verify OUT_DIR`: is a converted folder still exactly what `msconv convert` wrote, and does it fit the
model it was converted for?

* every shard listed in `msconv-manifest.json` exists with its size, header bytes (sha256) and tensors (key,
  dtype, shape), and every tensor's data bytes hash to the recorded sha256 (computed by the converter from the
  bytes it handed to the writer); the index's weight_map, `model.ckpt` (when recorded) and stray
  `*.safetensors` files are checked too;
* the files' headers are compared with the expected MindSpore parameter inventory the conversion was checked
  against (rebuilt from the manifest's `target` record: the shipped inventory, or the model's `param_inventory`
  at the recorded config; nothing is allocated): names and shapes exactly, dtypes by kind (a bf16 file for an
  fp32 net is what `load_strict` casts). A conversion made with `--allow-partial` skips this step and says so.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError, UserError, summarize
from .safetensors_io import SafetensorsFile
from .tensor import DTYPES

MANIFEST_NAME = "msconv-manifest.json"
INDEX_NAME = "model.safetensors.index.json"
READ = 8 << 20


class VerifyError(UserError):
    """The output folder differs from its manifest or from the model's inventory."""


@dataclass
class Verified:
    out: str
    files: int
    tensors: int
    bytes: int
    inventory: str
    notes: list = field(default_factory=list)


def _sha256_range(path: str, offset: int, n: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < n:
            b = os.pread(f.fileno(), min(READ, n - pos), offset + pos)
            if not b:
                break
            h.update(b)
            pos += len(b)
    return h.hexdigest()


def _file_sha256(path) -> str:
    return _sha256_range(os.fspath(path), 0, os.path.getsize(path))


def _load_manifest(out: Path) -> dict:
    p = out / MANIFEST_NAME
    if not out.is_dir():
        raise FormatError(f"{out}: not a folder")
    if not p.is_file():
        raise FormatError(f"{out}: no {MANIFEST_NAME} (not an msconv output)")
    try:
        man = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list) or not isinstance(man.get("tensors"), list):
        raise FormatError(f"{p}: needs 'shards' and 'tensors' lists")
    return man


def _check_shard(out: Path, shard: dict, recorded: dict, problems: list) -> dict:
    """Header and data of one shard against the manifest; returns its {key: (shape, dtype)}."""
    name = shard.get("file")
    path = out / str(name)
    if not path.is_file():
        problems.append(f"{path}: listed in {MANIFEST_NAME} but missing")
        return {}
    if "size" in shard and path.stat().st_size != shard["size"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {shard['size']}")
    try:
        f = SafetensorsFile(path)
    except FormatError as e:
        problems.append(str(e))
        return {}
    if shard.get("header_sha256"):
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        if _sha256_range(str(path), 0, 8 + n) != shard["header_sha256"]:
            problems.append(f"{path}: header bytes differ from those written (sha256)")
    mine = {k: t for k, t in recorded.items() if t.get("file") == name}
    for k in sorted(set(mine) - set(f.tensors)):
        problems.append(f"{path}: tensor {k!r} is recorded in the manifest but absent from the file")
    for k in sorted(set(f.tensors) - set(mine)):
        problems.append(f"{path}: tensor {k!r} is in the file but not recorded in the manifest")
    for k in sorted(set(mine) & set(f.tensors)):
        t, info = mine[k], f.tensors[k]
        if list(info.shape) != list(t.get("shape", [])) or info.dtype != t.get("dtype"):
            problems.append(f"{path}: tensor {k!r} is {info.dtype}{list(info.shape)}, the manifest says "
                            f"{t.get('dtype')}{t.get('shape')}")
            continue
        if _sha256_range(str(path), info.offset, info.nbytes) != t.get("sha256"):
            problems.append(f"{path}: tensor {k!r} data differ from the bytes written (sha256)")
    return f.inventory()


def _check_inventory(man: dict, have: dict, problems: list) -> str:
    from .targets import recorded_inventory

    if man.get("allow_partial"):
        n = len(man.get("partial_problems") or [])
        return f"not checked: converted with --allow-partial ({n} problem(s) recorded)"
    rec = man.get("target")
    if not isinstance(rec, dict):
        problems.append(f"{MANIFEST_NAME} records no target inventory (written by an msconv without verify); convert again")
        return "unknown"
    mapping = man.get("mapping") or {}
    try:
        want = recorded_inventory(rec, mapping.get("name"), mapping.get("path"))
    except UserError as e:
        problems.append(f"cannot rebuild the target inventory: {e}")
        return "unavailable"
    if want is None:
        problems.append(f"{MANIFEST_NAME}: the conversion had no target inventory but --allow-partial is not recorded")
        return "none"
    for k in [k for k in want if k not in have]:
        problems.append(f"parameter {k!r} {list(want[k][0])} of the model is in no file")
    for k in [k for k in have if k not in want]:
        problems.append(f"tensor {k!r} {list(have[k][0])} is not a parameter of the model")
    for k in [k for k in want if k in have]:
        (hs, hd), (ws, wd) = have[k], want[k]
        if tuple(hs) != tuple(ws):
            problems.append(f"tensor {k!r} is {list(hs)} but the model expects {list(ws)}")
        elif DTYPES.get(hd, (0, 0, 0, "?"))[3] != DTYPES.get(wd, (0, 0, 0, "?"))[3]:
            problems.append(f"tensor {k!r} is {hd} but the model expects {wd} (different kind)")
    return f"{rec.get('description', rec.get('kind'))}: {len(want)} parameters"


def verify_output(out_dir) -> Verified:
    """Check `out_dir` (see the module docstring); raises VerifyError with one line naming the first problems."""
    out = Path(out_dir)
    man = _load_manifest(out)
    recorded = {}
    for t in man["tensors"]:
        if not isinstance(t, dict) or "key" not in t:
            raise FormatError(f"{out / MANIFEST_NAME}: tensors entries need key, shape, dtype, file, sha256")
        recorded[t["key"]] = t
    problems: list[str] = []
    have: dict = {}
    shard_names = set()
    for shard in man["shards"]:
        shard_names.add(shard.get("file"))
        have.update(_check_shard(out, shard, recorded, problems))
    for k, t in recorded.items():
        if t.get("file") not in shard_names:
            problems.append(f"tensor {k!r}: its file {t.get('file')!r} is not a shard of the manifest")
    for p in sorted(out.glob("*.safetensors")):
        if p.name not in shard_names:
            problems.append(f"{p}: a safetensors file the manifest does not list")
    idx = out / INDEX_NAME
    if idx.is_file():
        try:
            wmap = json.loads(idx.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            wmap = None
        if wmap != {k: t.get("file") for k, t in recorded.items()}:
            problems.append(f"{idx}: weight_map differs from the manifest's tensors")
    else:
        problems.append(f"{idx}: missing")
    ck = man.get("ckpt")
    if ck:
        p = out / ck["file"]
        if not p.is_file():
            problems.append(f"{p}: listed in {MANIFEST_NAME} but missing")
        elif _file_sha256(p) != ck.get("sha256"):
            problems.append(f"{p}: differs from the file written (sha256)")
    inv_desc = _check_inventory(man, have, problems)
    if problems:
        raise VerifyError(f"{out}: {len(problems)} problem(s): " + summarize(problems), problems)
    size = sum(os.path.getsize(out / s["file"]) for s in man["shards"])
    return Verified(str(out), len(man["shards"]) + (1 if ck else 0), len(recorded), size, inv_desc)
