"""The mapping's tensor operations: small, named, each with an exact inverse (except `cast`).

Ops work on *storage arrays* (bf16 as uint16), so every layout op is bit-exact. Each op knows how to
infer shapes (for `Mapping.plan`, before any byte is read), apply itself, invert itself and describe itself
for `--dry-run`. Integer parameters may name a mapping var (`head_dim`) or a small expression (`3*hidden`).
"""
from __future__ import annotations

import ast
import math
import operator

import numpy as np

from .errors import MappingError, show
from .tensor import DTYPES, can_decode, cast_storage


class Ctx:
    """What an op needs at plan time: resolved vars, the rule's target shapes (if a target inventory is
    known), how many outputs the rule has, and a label for error messages."""

    def __init__(self, vars: dict, target_shapes: list | None, n_out: int, where: str):
        self.vars = vars
        self.target_shapes = target_shapes
        self.n_out = n_out
        self.where = where

    def fail(self, msg):
        raise MappingError(f"{self.where}: {msg}")


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
MAX_EXPR = 200  # characters: an integer expression is a few vars and numbers, never a program


def parse_int_expr(v, where: str, what: str) -> list[str]:
    """Check an integer parameter at load time: an int, or an expression of ints and var names with + - * // and
    unary minus; returns the var names it uses. MappingError naming the parameter otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise MappingError(f"{where}: {what} must be an integer, a var name or an expression, got {show(v)}")
    if isinstance(v, int):
        return []
    if len(v) > MAX_EXPR:
        raise MappingError(f"{where}: {what}: expression longer than {MAX_EXPR} characters ({show(v, 40)})")
    try:
        tree = ast.parse(v, mode="eval")
        nodes = list(ast.walk(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise MappingError(f"{where}: {what}: cannot parse {show(v)}") from None
    names = []
    for n in nodes:
        if isinstance(n, ast.Name):
            names.append(n.id)
        elif isinstance(n, ast.Constant):
            if not isinstance(n.value, int) or isinstance(n.value, bool):
                raise MappingError(f"{where}: {what}: only integers, var names and + - * // are allowed, got {show(v)}")
        elif not isinstance(n, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.USub, *_BIN)):
            raise MappingError(f"{where}: {what}: only integers, var names and + - * // are allowed, got {show(v)}")
    return names


def resolve_int(v, ctx: Ctx, what: str) -> int:
    """An int, a var name or an expression of ints and vars with + - * //."""
    if isinstance(v, bool):
        ctx.fail(f"{what} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        ctx.fail(f"{what} must be an integer or a var name, got {show(v)}")
    if len(v) > MAX_EXPR:
        ctx.fail(f"{what}: expression longer than {MAX_EXPR} characters")

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            val = ctx.vars.get(n.id)
            if val is None:
                ctx.fail(f"{what} uses var {n.id!r} which is not defined or could not be read off the inventories")
            if isinstance(val, Exception):
                raise val
            return val
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            left, right = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.FloorDiv) and right == 0:
                ctx.fail(f"{what}: division by zero in {v!r}")
            return _BIN[type(n.op)](left, right)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        ctx.fail(f"{what}: unsupported expression {show(v)}")

    try:
        tree = ast.parse(v, mode="eval")
        return int(ev(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        ctx.fail(f"{what}: cannot parse {show(v)}")


class Op:
    name = "?"
    arity = "1->1"  # "n->1" (concat), "1->n" (split) or "1->1" applied to each tensor
    params: dict

    def __init__(self, params: dict | None, where: str):
        self.params = dict(params or {})
        self.where = where
        unknown = set(self.params) - set(self.allowed)
        if unknown:
            raise MappingError(f"{where}: op {self.name} does not take {show(sorted(unknown, key=str))} (allowed: {sorted(self.allowed)})")
        for r in self.required:
            if r not in self.params:
                raise MappingError(f"{where}: op {self.name} needs {r!r}")
        for k in self.lists:
            if k in self.params and not isinstance(self.params[k], list) and not (k == "sizes" and self.params[k] is None):
                raise MappingError(f"{where}: op {self.name}.{k} must be a list, got {show(self.params[k])}")
        # integer parameters are checked now, in both directions (`concat.sizes` is only used by the inverse)
        self._vars = []
        for k in self.ints:
            v = self.params.get(k)
            for i, x in enumerate(v if isinstance(v, list) else [] if v is None else [v]):
                self._vars += parse_int_expr(x, where, f"{self.name}.{k}" + (f"[{i}]" if isinstance(v, list) else ""))

    ints: tuple = ("axis", "sizes", "axes", "shape", "inverse", "rows", "head_dim", "parts")

    def var_names(self) -> list[str]:
        """The mapping vars this op's integer parameters use."""
        return list(self._vars)

    lists: tuple = ("sizes", "axes", "shape", "inverse", "rows")
    allowed: tuple = ()
    required: tuple = ()

    def spec(self) -> dict:
        return {self.name: dict(self.params)}

    def _axis(self, ndim: int, ctx: Ctx) -> int:
        a = resolve_int(self.params.get("axis", 0), ctx, f"{self.name}.axis")
        if not -ndim <= a < ndim:
            ctx.fail(f"{self.name}: axis {a} out of range for a {ndim}-d tensor")
        return a % ndim

    # shapes/dtypes -> shapes/dtypes (lists, one per tensor)
    def infer(self, shapes, dtypes, ctx: Ctx):
        raise NotImplementedError

    def apply(self, arrays, dtypes, ctx: Ctx):
        raise NotImplementedError

    def inverse(self) -> "Op":
        raise NotImplementedError

    def describe(self, args: list[str], ctx: Ctx | None = None) -> str:
        return f"{self.name}({', '.join(args)})"


class Concat(Op):
    """n tensors -> 1 along `axis` (fusing q/k/v). Optional `sizes` are only used by the inverse split."""

    name, arity, allowed = "concat", "n->1", ("axis", "sizes")

    def infer(self, shapes, dtypes, ctx):
        ax = self._axis(len(shapes[0]), ctx)
        for s, d in zip(shapes[1:], dtypes[1:]):
            if len(s) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != ax):
                ctx.fail(f"concat: shapes {[list(x) for x in shapes]} differ outside axis {ax}")
            if d != dtypes[0]:
                ctx.fail(f"concat: dtypes {dtypes} differ")
        out = list(shapes[0])
        out[ax] = sum(s[ax] for s in shapes)
        if self.params.get("sizes") is not None:  # what the inverse split will cut: must be these inputs
            sizes = [resolve_int(x, ctx, "concat.sizes") for x in self.params["sizes"]]
            if sizes != [s[ax] for s in shapes]:
                ctx.fail(f"concat.sizes {sizes} do not match the inputs' sizes {[s[ax] for s in shapes]} along axis {ax}")
        return [tuple(out)], [dtypes[0]]

    def apply(self, arrays, dtypes, ctx):
        return [np.concatenate(arrays, axis=self._axis(arrays[0].ndim, ctx))]

    def inverse(self):
        return Split({k: v for k, v in self.params.items()}, self.where)

    def describe(self, args, ctx=None):
        ax = self.params.get("axis", 0)
        return f"cat({', '.join(args)}" + (f", axis={ax})" if ax not in (0, "0") else ")")


class Split(Op):
    """1 tensor -> n along `axis`; sizes from `sizes` (ints/vars) or from the target inventory."""

    name, arity, allowed = "split", "1->n", ("axis", "sizes")

    def sizes(self, shape, ctx: Ctx) -> list[int]:
        ax = self._axis(len(shape), ctx)
        if "sizes" in self.params and self.params["sizes"] is not None:
            sizes = [resolve_int(s, ctx, "split.sizes") for s in self.params["sizes"]]
        elif ctx.target_shapes and all(t is not None for t in ctx.target_shapes):
            sizes = [t[ax] for t in ctx.target_shapes]
        else:
            ctx.fail(f"split of a {list(shape)} tensor needs 'sizes' or a target inventory to know the part sizes")
        if len(sizes) != ctx.n_out:
            ctx.fail(f"split gives {len(sizes)} parts but the rule has {ctx.n_out} targets")
        if sum(sizes) != shape[ax]:
            ctx.fail(f"split sizes {sizes} sum to {sum(sizes)} but axis {ax} of {list(shape)} is {shape[ax]}")
        return sizes

    def infer(self, shapes, dtypes, ctx):
        (shape,) = shapes
        ax = self._axis(len(shape), ctx)
        out = []
        for s in self.sizes(shape, ctx):
            o = list(shape)
            o[ax] = s
            out.append(tuple(o))
        return out, [dtypes[0]] * len(out)

    def apply(self, arrays, dtypes, ctx):
        (a,) = arrays
        ax = self._axis(a.ndim, ctx)
        cuts = np.cumsum(self.sizes(a.shape, ctx))[:-1]
        return list(np.split(a, cuts, axis=ax))

    def inverse(self):
        return Concat(dict(self.params), self.where)

    def describe(self, args, ctx=None):
        return f"split({', '.join(args)})"


def rope_permutation(head_dim: int, convention: str) -> np.ndarray:
    """Index array `idx` with new = old[idx] inside one head.

    half_to_interleave (rotate-half/liger -> interleaved): new[2i] = old[i], new[2i+1] = old[i + D/2].
    interleaved_to_half is its inverse:                    new[i] = old[2i], new[i + D/2] = old[2i+1].
    """
    d2 = head_dim // 2
    j = np.arange(head_dim)
    if convention == "half_to_interleave":
        return j // 2 + (j % 2) * d2
    if convention == "interleaved_to_half":
        return np.where(j < d2, 2 * j, 2 * (j - d2) + 1)
    raise ValueError(convention)


class PermuteRows(Op):
    """Per-head permutation of one axis (RoPE convention change of q/k rows and QK-norm scales).

    `parts` splits the axis into equal parts (3 for a fused qkv) and `rows: [first, end)` selects the parts
    the permutation applies to (q and k: [0, 2]); `axis` defaults to 0.
    """

    name, allowed, required = "permute_rows", ("head_dim", "convention", "rows", "parts", "axis"), ("head_dim", "convention")
    CONVENTIONS = ("interleaved_to_half", "half_to_interleave")

    def __init__(self, params, where):
        super().__init__(params, where)
        if self.params["convention"] not in self.CONVENTIONS:
            raise MappingError(f"{where}: permute_rows.convention must be one of {self.CONVENTIONS}, got {show(self.params['convention'])}")
        if "rows" in self.params and len(self.params["rows"]) != 2:
            raise MappingError(f"{where}: permute_rows.rows is [first_part, end_part], got {show(self.params['rows'])}")

    def _index(self, shape, ctx) -> tuple[int, np.ndarray]:
        ax = self._axis(len(shape), ctx)
        d = resolve_int(self.params["head_dim"], ctx, "permute_rows.head_dim")
        parts = resolve_int(self.params.get("parts", 1), ctx, "permute_rows.parts")
        first, end = self.params.get("rows", [0, parts])
        first, end = resolve_int(first, ctx, "permute_rows.rows"), resolve_int(end, ctx, "permute_rows.rows")
        n = shape[ax]
        if d <= 0 or d % 2:
            ctx.fail(f"permute_rows: head_dim {d} must be a positive even number")
        if parts <= 0 or n % parts or (n // parts) % d:
            ctx.fail(f"permute_rows: axis {ax} of {list(shape)} ({n}) is not {parts} part(s) of whole heads of {d}")
        if not 0 <= first <= end <= parts:
            ctx.fail(f"permute_rows: rows [{first}, {end}] outside [0, {parts}]")
        plen = n // parts
        idx = np.arange(n)
        head = rope_permutation(d, self.params["convention"])
        sel = np.arange(first * plen, end * plen).reshape(-1, d)
        idx[first * plen:end * plen] = (sel[:, :1] + head[None, :]).reshape(-1)
        return ax, idx

    def infer(self, shapes, dtypes, ctx):
        for s in shapes:
            self._index(s, ctx)
        return list(shapes), list(dtypes)

    def apply(self, arrays, dtypes, ctx):
        out = []
        for a in arrays:
            ax, idx = self._index(a.shape, ctx)
            out.append(np.take(a, idx, axis=ax))
        return out

    def inverse(self):
        p = dict(self.params)
        p["convention"] = "half_to_interleave" if p["convention"] == "interleaved_to_half" else "interleaved_to_half"
        return PermuteRows(p, self.where)

    def describe(self, args, ctx=None):
        p = self.params
        extra = ""
        if "parts" in p:
            r = p.get("rows", [0, p["parts"]])
            extra = f", parts {r[0]}..{r[1]}/{p['parts']}"
        hd = p["head_dim"]
        if ctx is not None and isinstance(hd, str) and isinstance(ctx.vars.get(hd), int):
            hd = ctx.vars[hd]
        return f"permute_rows({', '.join(args)}, {p['convention']}, head_dim={hd}{extra})"


class Transpose(Op):
    name, allowed, required = "transpose", ("axes",), ("axes",)

    def _axes(self, ndim, ctx):
        axes = [resolve_int(a, ctx, "transpose.axes") for a in self.params["axes"]]
        if len(axes) != ndim or sorted(a % ndim for a in axes) != list(range(ndim)):
            ctx.fail(f"transpose: axes {axes} are not a permutation of {ndim} axes")
        return [a % ndim for a in axes]

    def infer(self, shapes, dtypes, ctx):
        out = []
        for s in shapes:
            ax = self._axes(len(s), ctx)
            out.append(tuple(s[a] for a in ax))
        return out, list(dtypes)

    def apply(self, arrays, dtypes, ctx):
        return [np.require(np.transpose(a, self._axes(a.ndim, ctx)), requirements="C") for a in arrays]

    def inverse(self):
        axes = self.params["axes"]
        if all(isinstance(a, int) for a in axes):
            n = len(axes)
            inv = [0] * n
            for i, a in enumerate(axes):
                inv[a % n] = i
            return Transpose({"axes": inv}, self.where)
        raise MappingError(f"{self.where}: transpose axes must be integers to be invertible")

    def describe(self, args, ctx=None):
        return f"transpose({', '.join(args)}, {list(self.params['axes'])})"


class Reshape(Op):
    """Reshape (C order, so bytes are unchanged). `inverse: [...]` gives the shape to go back to; without
    it the inverse takes the shape from the target inventory."""

    name, allowed, required = "reshape", ("shape", "inverse"), ()

    def _shape(self, src, ctx):
        spec = self.params.get("shape")
        if spec is None:
            if ctx.target_shapes and ctx.target_shapes[0] is not None and ctx.n_out == 1:
                return tuple(ctx.target_shapes[0])
            ctx.fail(f"reshape of a {list(src)} tensor has no 'shape' and no target inventory to take it from")
        dims = [resolve_int(s, ctx, "reshape.shape") for s in spec]
        total = math.prod(src)
        if dims.count(-1) > 1:
            ctx.fail(f"reshape: more than one -1 in {dims}")
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1) or 1
            if total % known:
                ctx.fail(f"reshape: cannot reshape {list(src)} into {dims}")
            dims[dims.index(-1)] = total // known
        if math.prod(dims) != total or any(d < 0 for d in dims):
            ctx.fail(f"reshape: cannot reshape {list(src)} into {dims}")
        return tuple(dims)

    def infer(self, shapes, dtypes, ctx):
        return [self._shape(s, ctx) for s in shapes], list(dtypes)

    def apply(self, arrays, dtypes, ctx):
        return [a.reshape(self._shape(a.shape, ctx)) for a in arrays]

    def inverse(self):
        p = {}
        if "inverse" in self.params:
            p["shape"] = self.params["inverse"]
        if "shape" in self.params:
            p["inverse"] = self.params["shape"]
        return Reshape(p, self.where)

    def describe(self, args, ctx=None):
        return f"reshape({', '.join(args)}, {self.params.get('shape', 'target')})"


class Cast(Op):
    """Explicit dtype change (values decoded). Not invertible unless `from` names the original dtype."""

    name, allowed, required = "cast", ("dtype", "from", "allow_lossy"), ("dtype",)

    def __init__(self, params, where):
        super().__init__(params, where)
        for k in ("dtype", "from"):
            if k in self.params and not (isinstance(self.params[k], str) and self.params[k] in DTYPES):
                raise MappingError(f"{where}: cast.{k} {show(self.params[k])} is not a dtype ({', '.join(DTYPES)})")
        if not isinstance(self.params.get("allow_lossy", False), bool):
            raise MappingError(f"{where}: cast.allow_lossy must be true or false, got {show(self.params['allow_lossy'])}")

    def infer(self, shapes, dtypes, ctx):
        if "from" in self.params:
            for d in dtypes:
                if d != self.params["from"]:
                    ctx.fail(f"cast expects {self.params['from']} input, got {d}")
        dst = self.params["dtype"]
        for d in dtypes:
            # float <-> int <-> bool changes the values themselves (F32 -> I64 turns weights into 0)
            if DTYPES[d][3] != DTYPES[dst][3] and not self.params.get("allow_lossy", False):
                ctx.fail(f"cast from {d} ({DTYPES[d][3]}) to {dst} ({DTYPES[dst][3]}) changes the kind of the values; "
                         "add 'allow_lossy: true' to the cast if that is intended")
            bad = [x for x in (d, dst) if not can_decode(x)] if d != dst else []
            if bad:
                ctx.fail(f"cast from {d} to {dst}: msconv cannot decode or encode {bad[0]} values")
        return list(shapes), [self.params["dtype"]] * len(shapes)

    def apply(self, arrays, dtypes, ctx):
        return [cast_storage(a, d, self.params["dtype"], ctx.where) for a, d in zip(arrays, dtypes)]

    def inverse(self):
        if "from" not in self.params:
            raise MappingError(f"{self.where}: cast to {self.params['dtype']} is not invertible (add 'from: <dtype>' to allow it)")
        p = {"dtype": self.params["from"], "from": self.params["dtype"]}
        if "allow_lossy" in self.params:
            p["allow_lossy"] = self.params["allow_lossy"]
        return Cast(p, self.where)

    def describe(self, args, ctx=None):
        return f"cast({', '.join(args)}, {self.params['dtype']})"


OPS = {c.name: c for c in (Concat, Split, PermuteRows, Transpose, Reshape, Cast)}


def parse_op(spec, where: str) -> Op:
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        ((name, params),) = spec.items()
        params = params or {}
        if not isinstance(params, dict):
            raise MappingError(f"{where}: op {show(name)} parameters must be a mapping, got {show(params)}")
    else:
        raise MappingError(f"{where}: an op is written {{name: {{params}}}}, got {show(spec)}")
    if not isinstance(name, str) or name not in OPS:
        raise MappingError(f"{where}: unknown op {show(name)} (known: {', '.join(OPS)})")
    return OPS[name](params, where)
