"""Forward-hook capture on torch modules and MindSpore cells, streamed to safetensors on disk.

Naming (the case format): the module path (`double_blocks.0.img_attn.q_proj`; the root is `__root__`), then
`#n` for the n-th *later* call of the same module (first call: no suffix), then one segment per level of a
structured output: `.0/.1` for tuple/list items, `.shift/.scale/.gate` for dataclass or namedtuple fields,
`.key` for dict items. `None` and non-tensor leaves are skipped.

MindSpore hooks run only in PyNative (notes/mindspore-cpu.md §11: silently ignored under `ms.jit`/GRAPH_MODE), so
layer capture requires PyNative; `Capture` raises if asked to capture a MindSpore cell in GRAPH_MODE.

Teacher forcing: `TeacherRecorder` stores the positional and keyword inputs of selected modules (forward
pre-hooks, `with_kwargs=True`) of the torch reference; `TeacherForcer` installs forward pre-hooks on the
candidate (torch module or MindSpore cell) that *replace* the inputs of the same call (`path#n`) by the recorded
ones. So the whole model runs in one pass, every block starts from the torch block's inputs, and hooks inside
the block still capture its sub-layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from parity.tensorio import SafetensorsReader, SafetensorsWriter

ROOT = "__root__"


# ---------------------------------------------------------------------------------------------- frameworks
class _Torch:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def is_tensor(self, x) -> bool:
        return isinstance(x, self.torch.Tensor)

    def to_numpy(self, t) -> tuple[np.ndarray, str]:
        t = t.detach()
        dtype = str(t.dtype).replace("torch.", "")
        if t.dtype == self.torch.bfloat16:
            t = t.float()   # exact: every bf16 value is a float32 value
        return t.cpu().numpy(), dtype

    def from_numpy(self, a: np.ndarray, dtype: str):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        want = getattr(self.torch, dtype, None)
        return t.to(want) if want is not None and t.dtype != want else t

    def named_modules(self, model):
        return model.named_modules()

    def forward_hook(self, m, fn):
        return m.register_forward_hook(lambda mod, args, out: fn(out))

    def pre_hook(self, m, fn):
        return m.register_forward_pre_hook(lambda mod, args, kwargs: fn(args, kwargs), with_kwargs=True)

    def identity(self, t):
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))


class _MindSpore:
    name = "mindspore"

    def __init__(self):
        import mindspore as ms

        self.ms = ms

    def is_tensor(self, x) -> bool:
        return isinstance(x, self.ms.Tensor)

    def to_numpy(self, t) -> tuple[np.ndarray, str]:
        dtype = str(t.dtype).lower()
        dtype = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16", "float64": "float64"}.get(dtype, dtype)
        if t.dtype == self.ms.bfloat16:
            t = t.astype(self.ms.float32)
        return t.asnumpy(), dtype

    def from_numpy(self, a: np.ndarray, dtype: str):
        t = self.ms.Tensor(np.ascontiguousarray(a))
        want = getattr(self.ms, dtype, None)
        return t.astype(want) if want is not None and t.dtype != want else t

    def named_modules(self, model):
        return model.cells_and_names()

    def forward_hook(self, m, fn):
        return m.register_forward_hook(lambda cell, args, out: fn(out))

    def pre_hook(self, m, fn):
        return m.register_forward_pre_hook(lambda cell, args, kwargs: fn(args, kwargs), with_kwargs=True)

    def identity(self, t):
        return None


def framework_of(model) -> Any:
    mod = type(model).__module__
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return _Torch()
    except ImportError:
        pass
    import mindspore as ms

    if isinstance(model, ms.nn.Cell):
        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            raise RuntimeError("layer capture on MindSpore needs PyNative mode (hooks are ignored under jit/GRAPH_MODE)")
        return _MindSpore()
    raise TypeError(f"not a torch module or MindSpore cell: {type(model)} ({mod})")


# ---------------------------------------------------------------------------------------------- naming
def flatten(obj, is_tensor: Callable[[Any], bool], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(suffix, tensor) leaves of a module output, with the case-format suffixes."""
    if is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)
        for i, v in enumerate(obj):
            yield from flatten(v, is_tensor, f"{prefix}.{fields[i] if fields else i}")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from flatten(getattr(obj, f.name), is_tensor, f"{prefix}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, is_tensor, f"{prefix}.{k}")


def module_depth(path: str) -> int:
    return 0 if path in ("", ROOT) else path.count(".") + 1


def compile_pattern(pattern: str) -> re.Pattern:
    """Module path pattern: `{name}` or `*` = one dotted segment, `**` = anything; else literal."""
    out = []
    for tok in re.split(r"(\{[A-Za-z_]\w*\}|\*\*|\*)", pattern):
        if not tok:
            continue
        if tok == "**":
            out.append(".*")
        elif tok == "*":
            out.append(r"[^.]+")
        elif tok.startswith("{"):
            out.append(rf"(?P<{tok[1:-1]}>[^.]+)")
        else:
            out.append(re.escape(tok))
    return re.compile("^" + "".join(out) + "$")


@dataclasses.dataclass
class ModuleFilter:
    """Which module paths to capture: include/exclude globs (fnmatch on the path; root = `__root__`) + depth."""
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_depth: int | None = None

    def __call__(self, path: str) -> bool:
        name = path or ROOT
        if self.max_depth is not None and module_depth(path) > self.max_depth:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        if self.exclude and any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return True


# ---------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass
class Record:
    name: str        # full hook name (module + suffix)
    module: str      # module path (ROOT for the root)
    suffix: str      # "#n" and/or ".0/.shift/..." part
    shape: tuple
    dtype: str       # framework dtype of the captured tensor (bf16 is stored upcast to float32)


class Sink:
    """Streams captured tensors to one safetensors file; keeps only the record list in RAM.

    `dedupe=True` (torch only) stores a tensor once when a later module returns the very same tensor
    (same storage pointer, shape, stride, dtype and bytes) and records the later name in `aliases`, like the
    upstream cases' `hooks_aliases.json`.
    """

    def __init__(self, path: str | Path, dedupe: bool = False, metadata: dict | None = None):
        self.path = Path(path)
        self.writer = SafetensorsWriter(self.path, metadata)
        self.records: list[Record] = []
        self.aliases: dict[str, str] = {}
        self.dedupe = dedupe
        self._seen: dict[tuple, str] = {}

    def add(self, module: str, suffix: str, arr: np.ndarray, dtype: str, identity=None) -> None:
        name = module + suffix
        if name in self.writer or name in self.aliases:
            raise ValueError(f"hook name {name!r} captured twice")
        if self.dedupe and identity is not None:
            key = identity + (hashlib.sha1(np.ascontiguousarray(arr).view(np.uint8).data).hexdigest(),)
            if key in self._seen:
                self.aliases[name] = self._seen[key]
                self.records.append(Record(name, module, suffix, tuple(arr.shape), dtype))
                return
            self._seen[key] = name
        self.writer.add(name, arr)
        self.records.append(Record(name, module, suffix, tuple(arr.shape), dtype))

    def close(self) -> Path:
        return self.writer.close()

    def abort(self) -> None:
        """Drop the capture (no temporary left behind, no file under the final name)."""
        self.writer.abort()

    def reader(self) -> SafetensorsReader:
        self.close()
        return SafetensorsReader(self.path)


class Capture:
    """Context manager: forward hooks on every module passing `filt`; outputs streamed to `sink`."""

    def __init__(self, model, sink: Sink, filt: ModuleFilter | None = None):
        self.model, self.sink, self.filt = model, sink, filt or ModuleFilter()
        self.fw = framework_of(model)
        self._handles = []
        self._calls: dict[str, int] = defaultdict(int)

    def _hook(self, path: str):
        module = path or ROOT

        def fn(out):
            n = self._calls[module]
            self._calls[module] += 1
            base = f"#{n}" if n else ""
            for suffix, t in flatten(out, self.fw.is_tensor):
                arr, dtype = self.fw.to_numpy(t)
                self.sink.add(module, base + suffix, arr, dtype, self.fw.identity(t))
            return None
        return fn

    def __enter__(self):
        for path, m in self.fw.named_modules(self.model):
            if self.filt(path):
                self._handles.append(self.fw.forward_hook(m, self._hook(path)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---------------------------------------------------------------------------------------------- teacher forcing
class TeacherRecorder:
    """Records the inputs (args, kwargs) of every call of the modules matching `patterns` (torch)."""

    def __init__(self, model, patterns: Iterable[str], path: str | Path):
        self.model = model
        self.fw = framework_of(model)
        self.regexes = [compile_pattern(p) for p in patterns]
        self.writer = SafetensorsWriter(path)
        self.path = Path(path)
        self.calls: dict[str, tuple] = {}      # "path#n" -> (args_struct, kwargs_struct)
        self.order: list[str] = []
        self._n: dict[str, int] = defaultdict(int)
        self._handles = []

    def _encode(self, obj, key: str):
        if self.fw.is_tensor(obj):
            arr, dtype = self.fw.to_numpy(obj)
            self.writer.add(key, arr)
            return {"__tensor__": key, "dtype": dtype}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*[self._encode(v, f"{key}.{i}") for i, v in enumerate(obj)])
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._encode(v, f"{key}.{i}") for i, v in enumerate(obj))
        if isinstance(obj, dict):
            return {k: self._encode(v, f"{key}.{k}") for k, v in obj.items()}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return ("__dataclass__", type(obj), {f.name: self._encode(getattr(obj, f.name), f"{key}.{f.name}")
                                                for f in dataclasses.fields(obj)})
        return obj

    def _pre(self, path: str):
        def fn(args, kwargs):
            n = self._n[path]
            self._n[path] += 1
            call = path + (f"#{n}" if n else "")
            self.calls[call] = (self._encode(tuple(args), f"{call}/args"), self._encode(dict(kwargs), f"{call}/kwargs"))
            self.order.append(call)
            return None
        return fn

    def __enter__(self):
        for path, m in self.fw.named_modules(self.model):
            if path and any(r.match(path) for r in self.regexes):
                self._handles.append(self.fw.pre_hook(m, self._pre(path)))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc_type is None:
            self.writer.close()
        else:
            self.writer.abort()

    def inputs(self) -> "TeacherInputs":
        return TeacherInputs(SafetensorsReader(self.path), self.calls, self.order)


@dataclasses.dataclass
class TeacherInputs:
    reader: SafetensorsReader
    calls: dict[str, tuple]
    order: list[str]

    def modules(self) -> list[str]:
        return sorted({c.split("#")[0] for c in self.calls})

    def decode(self, struct, from_numpy: Callable[[np.ndarray, str], Any]):
        if isinstance(struct, dict) and "__tensor__" in struct:
            return from_numpy(self.reader.get(struct["__tensor__"]), struct["dtype"])
        if isinstance(struct, tuple) and len(struct) == 3 and struct[0] == "__dataclass__":
            return struct[1](**{k: self.decode(v, from_numpy) for k, v in struct[2].items()})
        if isinstance(struct, tuple) and hasattr(struct, "_fields"):
            return type(struct)(*[self.decode(v, from_numpy) for v in struct])
        if isinstance(struct, (tuple, list)):
            return type(struct)(self.decode(v, from_numpy) for v in struct)
        if isinstance(struct, dict):
            return {k: self.decode(v, from_numpy) for k, v in struct.items()}
        return struct


class TeacherForcer:
    """Replaces the inputs of candidate modules by the recorded torch inputs of the same call.

    `path_map`: torch module path -> candidate module path (identity unless the mapping renames blocks).
    `adapt(torch_path, args, kwargs) -> (args, kwargs)`: optional adapter hook for blocks whose input format
    differs between frameworks (called with numpy-decoded framework tensors already).
    `dtype`: cast floating inputs to this dtype (the candidate's compute dtype), None keeps the recorded one.
    """

    def __init__(self, model, teacher: TeacherInputs, path_map: Callable[[str], str] | None = None,
                 adapt: Callable | None = None, dtype: str | None = None):
        self.model, self.teacher = model, teacher
        self.fw = framework_of(model)
        self.path_map = path_map or (lambda p: p)
        self.adapt = adapt
        self.dtype = dtype
        self.forced: list[str] = []
        self.missing: list[str] = []
        self._n: dict[str, int] = defaultdict(int)
        self._handles = []

    def _from_numpy(self, a: np.ndarray, dtype: str):
        if self.dtype and dtype in ("float32", "float64", "bfloat16", "float16"):
            dtype = self.dtype
        return self.fw.from_numpy(a, dtype)

    def _pre(self, torch_path: str):
        def fn(args, kwargs):
            n = self._n[torch_path]
            self._n[torch_path] += 1
            call = torch_path + (f"#{n}" if n else "")
            rec = self.teacher.calls.get(call)
            if rec is None:
                self.missing.append(call)
                return None
            new_args = tuple(self.teacher.decode(rec[0], self._from_numpy))
            new_kwargs = dict(self.teacher.decode(rec[1], self._from_numpy))
            if self.adapt is not None:
                new_args, new_kwargs = self.adapt(torch_path, new_args, new_kwargs)
            self.forced.append(call)
            return new_args, new_kwargs
        return fn

    def __enter__(self):
        mods = dict(self.fw.named_modules(self.model))
        for tpath in self.teacher.modules():
            cpath = self.path_map(tpath)
            if cpath not in mods:
                self.missing.append(f"{tpath} (no candidate module {cpath!r})")
                continue
            self._handles.append(self.fw.pre_hook(mods[cpath], self._pre(tpath)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
