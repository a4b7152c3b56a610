"""Inventories ({key: (shape, dtype)}), their JSON files, exact comparison and compact key lists.

The JSON form is shared by the upstream manifests (`../shared/upstream/manifests/*.json`) and the target
inventories (`mappings/targets/<mapping>.json`): `{"tensors": [{"key": ..., "shape": [...], "dtype": "F32"}]}`;
other fields are ignored. The manifests shipped in the package (`mappings/manifests/*.json`) use the compact
form `{"tensors": {key: [shape, dtype]}}`, read the same way.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from .errors import FormatError, show
from .tensor import DTYPES

Inventory = dict  # {key: (shape tuple, dtype str)}


def load_inventory(path: str | os.PathLike) -> Inventory:
    """{key: (shape, dtype)} of an inventory / manifest JSON file; FormatError naming the file and entry."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise FormatError(f"{p}: is a directory, expected an inventory JSON file")
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{p}: no such inventory file") from None
    except OSError as e:
        raise FormatError(f"{p}: cannot read the inventory file: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8 (a binary file), nesting too deep
        raise FormatError(f"{p}: not a valid JSON inventory ({e.__class__.__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    items = d.get("tensors") if isinstance(d, dict) else None
    if isinstance(items, dict):  # the compact form of the shipped manifests: {key: [shape, dtype]}
        if not all(isinstance(v, list) and len(v) == 2 for v in items.values()):
            raise FormatError(f"{p}: a 'tensors' object maps each key to [shape, dtype]")
        items = [{"key": k, "shape": v[0], "dtype": v[1]} for k, v in items.items()]
    if not isinstance(items, list):
        raise FormatError(f"{p}: inventory needs a 'tensors' list of {{key, shape, dtype}} (or {{key: [shape, dtype]}})")
    inv: Inventory = {}
    for i, t in enumerate(items):
        if not isinstance(t, dict) or not {"key", "shape", "dtype"} <= set(t):
            raise FormatError(f"{p}: tensors[{i}] needs key, shape and dtype")
        k, shape, dt = t["key"], t["shape"], t["dtype"]
        if not isinstance(k, str) or not k:
            raise FormatError(f"{p}: tensors[{i}]: key must be a non-empty string, got {show(k)}")
        # a shape is a list of ints: "96" must not be read as [9, 6], nor 2.5 as 2
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise FormatError(f"{p}: tensor {k!r}: shape must be a list of non-negative integers, got {show(shape)}")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise FormatError(f"{p}: tensor {k!r}: dtype must be one of {', '.join(DTYPES)}, got {show(dt)}")
        if k in inv:
            raise FormatError(f"{p}: key {k!r} listed twice")
        inv[k] = (tuple(shape), dt)
    return inv


def diff_inventories(actual: Inventory, expected: Inventory, dtypes: bool = True) -> dict:
    """Exact differences: keys missing from `actual`, extra keys, shape and dtype mismatches."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    shape, dtype = [], []
    for k in sorted(set(actual) & set(expected)):
        (sa, da), (se, de) = actual[k], expected[k]
        if tuple(sa) != tuple(se):
            shape.append({"key": k, "actual": list(sa), "expected": list(se)})
        if dtypes and da != de:
            dtype.append({"key": k, "actual": da, "expected": de})
    return {"missing": missing, "extra": extra, "shape": shape, "dtype": dtype}


_NUM = re.compile(r"(?:(?<=\.)|^)(\d+)(?=\.|$)")


def _ranges(nums: list[int]) -> str:
    nums = sorted(set(nums))
    if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{nums[0]}..{nums[-1]}"
    return ",".join(map(str, nums))


def compress_keys(keys) -> list[str]:
    """['a.0.b', 'a.1.b', 'a.2.b'] -> ['a.{0..2}.b']: numeric dotted segments are folded into ranges.

    Only full cartesian products are folded, so every printed line means exactly the keys it came from.
    """
    groups: dict[str, list[tuple]] = defaultdict(list)
    for k in keys:
        nums = tuple(int(m.group(1)) for m in _NUM.finditer(k))
        groups[_NUM.sub("#", k)].append(nums)
    out = []

    def fold(tmpl: str, rows: list[tuple]):
        if not rows[0]:
            out.append(tmpl)
            return
        n = len(rows[0])
        # slots that always hold the same value ("blk.3.out <- blk.3.proj") are one variable
        rep = [next(j for j in range(n) if all(r[j] == r[i] for r in rows)) for i in range(n)]
        free = sorted(set(rep))
        sets = {i: sorted({r[i] for r in rows}) for i in free}
        total = 1
        for s in sets.values():
            total *= len(s)
        if total == len(set(rows)):
            parts = iter("{" + _ranges(sets[rep[i]]) + "}" if len(sets[rep[i]]) > 1 else str(sets[rep[i]][0]) for i in range(n))
            out.append(re.sub("#", lambda _: next(parts), tmpl))
            return
        # not a product: fix the first slot's value and fold the rest
        for v in sets[0]:
            sub = [r for r in rows if r[0] == v]
            t = tmpl
            for i in range(n):
                if rep[i] == 0:
                    t = t.replace("#", "\0", 1)
                else:
                    t = t.replace("#", "\1", 1)
            t = t.replace("\0", str(v)).replace("\1", "#")
            fold(t, [tuple(x for i, x in enumerate(r) if rep[i] != 0) for r in sub])

    for tmpl, rows in groups.items():
        fold(tmpl, rows)
    return out
