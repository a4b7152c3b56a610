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

from .errors import FormatError

Inventory = dict  # {key: (shape tuple, dtype str)}


def load_inventory(path: str | os.PathLike) -> Inventory:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{p}: no such inventory file") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    items = d.get("tensors") if isinstance(d, dict) else None
    if isinstance(items, dict):  # the compact form of the shipped manifests: {key: [shape, dtype]}
        try:
            items = [{"key": k, "shape": v[0], "dtype": v[1]} for k, v in items.items()]
        except (TypeError, IndexError, KeyError):
            raise FormatError(f"{p}: a 'tensors' object maps each key to [shape, dtype]") from None
    if not isinstance(items, list):
        raise FormatError(f"{p}: inventory needs a 'tensors' list of {{key, shape, dtype}} (or {{key: [shape, dtype]}})")
    inv: Inventory = {}
    for i, t in enumerate(items):
        try:
            k, shape, dt = t["key"], tuple(int(s) for s in t["shape"]), str(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{p}: tensors[{i}] needs key, shape and dtype") from None
        if k in inv:
            raise FormatError(f"{p}: key {k!r} listed twice")
        inv[k] = (shape, dt)
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
