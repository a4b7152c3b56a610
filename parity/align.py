"""Which candidate (MindSpore) capture is compared with which torch tensor, from the mapping's `align:` section.

docs/architecture.md "Hooks and alignment": a torch module aligns with the MindSpore cell of the same path
unless an `align:` entry says otherwise:

```yaml
align:
  - torch: ["double_blocks.{i}.img_attn.q_proj", "double_blocks.{i}.img_attn.k_proj", "double_blocks.{i}.img_attn.v_proj"]
    ms: "double_blocks.{i}.img_attn.qkv"
    concat: -1           # torch outputs concatenated on this axis equal the MindSpore output
    ops: [...]           # optional, applied to the (concatenated) torch tensor before comparing
  - {torch: "double_blocks.{i}.img_attn", ms: null, reason: "no single output tensor"}
  - {ms: "some.cell", torch: null, reason: "a MindSpore-only cell (e.g. a fused op) with no torch module"}
```

A torch tensor or a MindSpore capture that aligns with nothing fails the verdict unless an entry like the last two
declares it, with its reason.

Everything is expressed on the *torch* side: the reference tensor for a candidate capture `ms_path + suffix` is
built from torch hook names `torch_path + suffix` (concatenated, then `ops`), so one lookup function serves the
stored case hooks, a float64 oracle run and a same-dtype torch run alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from parity.capture import compile_pattern

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


@dataclass
class AlignEntry:
    torch: list[str]
    ms: str | None
    concat: int | None = None
    ops: list = field(default_factory=list)
    reason: str | None = None

    def __post_init__(self):
        self.ms_re = compile_pattern(self.ms) if self.ms else None
        self.torch_res = [compile_pattern(t) for t in self.torch]

    @classmethod
    def parse(cls, d: dict) -> "AlignEntry":
        torch = d.get("torch")
        torch = [torch] if isinstance(torch, str) else list(torch or [])
        if not torch and not (d.get("ms") and d.get("reason")):
            raise ValueError(f"align entry without torch (an MindSpore-only capture needs `ms` and `reason`): {d}")
        if len(torch) > 1 and d.get("ms") and d.get("concat") is None:
            raise ValueError(f"align entry with {len(torch)} torch modules needs `concat`: {d}")
        return cls(torch=torch, ms=d.get("ms"), concat=d.get("concat"), ops=list(d.get("ops") or []),
                   reason=d.get("reason"))

    def torch_names(self, bindings: dict[str, str]) -> list[str]:
        return [_PLACEHOLDER.sub(lambda m: bindings[m.group(1)], t) for t in self.torch]


@dataclass
class Expected:
    torch_names: list[str]          # the torch hook names the reference is built from
    array: np.ndarray | None        # None when some are missing
    missing: list[str]
    entry: AlignEntry | None


class Aligner:
    def __init__(self, entries: list[dict] | None = None, vars: dict[str, int] | None = None):
        self.entries = [AlignEntry.parse(e) for e in (entries or [])]
        self.vars = dict(vars or {})

    # ---- candidate -> torch
    def _candidates(self, ms_module: str):
        for e in self.entries:
            if e.ms_re is not None and e.torch:
                m = e.ms_re.match(ms_module)
                if m:
                    yield e, m.groupdict()

    def expected(self, ms_module: str, suffix: str, has: Callable[[str], bool],
                 get: Callable[[str], np.ndarray]) -> Expected:
        """Reference tensor for candidate capture `ms_module + suffix`, built from torch tensors via `get`."""
        options = list(self._candidates(ms_module))
        chosen = None
        for e, b in options:
            names = [n + suffix for n in e.torch_names(b)]
            if all(has(n) for n in names):
                chosen = (e, names)
                break
        if chosen is None and options:
            e, b = options[0]
            names = [n + suffix for n in e.torch_names(b)]
            return Expected(names, None, [n for n in names if not has(n)], e)
        if chosen is None:
            name = ms_module + suffix
            if not has(name):
                return Expected([name], None, [name], None)
            return Expected([name], get(name), [], None)
        e, names = chosen
        arrays = [get(n) for n in names]
        arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=e.concat)
        return Expected(names, apply_ops(arr, e.ops, self.vars), [], e)

    # ---- torch -> candidate (module paths, for teacher forcing)
    def ms_path(self, torch_path: str) -> str:
        for e in self.entries:
            if e.ms and len(e.torch) == 1 and not e.ops:
                m = e.torch_res[0].match(torch_path)
                if m:
                    return _PLACEHOLDER.sub(lambda g: m.groupdict()[g.group(1)], e.ms)
        return torch_path

    def explicit_ms_reason(self, ms_module: str) -> str | None:
        """Reason of a `{ms: ..., torch: null, reason: ...}` entry: a MindSpore cell with no torch counterpart."""
        for e in self.entries:
            if not e.torch and e.ms_re is not None and e.ms_re.match(ms_module):
                return e.reason
        return None

    def explicit_reason(self, torch_module: str) -> str | None:
        """Reason of an `ms: null` entry covering this torch module, if any."""
        for e in self.entries:
            if e.ms is None and any(r.match(torch_module) for r in e.torch_res):
                return e.reason or "declared unaligned in the mapping"
        return None


def split_hook_name(name: str, module_paths: set[str] | None) -> tuple[str, str]:
    """(module path, suffix) of a case hook name. With the torch module paths known, the longest path that
    prefixes the name wins; without them, the `#n` marker (if any) separates the two."""
    if module_paths:
        best = None
        for p in [name] + [name[:i] for i, ch in enumerate(name) if ch in ".#"]:
            if p in module_paths:
                if best is None or len(p) > len(best):
                    best = p
        if best is not None:
            return best, name[len(best):]
    if "#" in name:
        i = name.index("#")
        return name[:i], name[i:]
    return name, ""


# ---------------------------------------------------------------------------------------------- ops (activations)
def apply_ops(x: np.ndarray, ops: list, vars: dict[str, int], where: str = "align") -> np.ndarray:
    """Apply the mapping's op vocabulary (converter.ops: transpose, reshape, permute_rows with `axis`, cast) to
    an activation on the torch side. `concat` is the entry's own key; `split` cannot build one tensor.

    The array travels as the converter's storage array and dtype name (`converter.tensor.as_storage`, bf16 as
    raw bits): a dtype safetensors has no name for raises TypeError instead of being taken for float32."""
    from converter.ops import Ctx, parse_op
    from converter.tensor import as_storage, from_storage

    if not ops:
        return x
    ctx = Ctx(vars, None, 1, where)
    storage, dt = as_storage(x)
    for spec in ops:
        op = parse_op(spec, where)
        if op.name in ("concat", "split"):
            raise ValueError(f"{where}: op {op.name} is not allowed in align ops (use the entry's `concat:`)")
        _, (dt_out,) = op.infer([storage.shape], [dt], ctx)
        (storage,) = op.apply([storage], [dt], ctx)
        dt = dt_out
    out = from_storage(storage, dt, like=x)
    return out.to_float32() if hasattr(out, "to_float32") else out
