"""The mapping spec: parse `mappings/<name>.yaml`, plan (validate everything before a byte is written),
convert in memory, invert.

Semantics (full reference: docs/mappings.md):
* `{name}` in a key pattern matches one dotted segment; source and target of a rule use the same names.
* Rules apply in file order. A rule sees the keys left by the rules before it: source keys not yet consumed
  and keys produced by earlier rules, so a later rule can refine an earlier rule's output (e.g. permute the
  rows of a just-fused qkv). A key is consumed by the rule that matches it.
* At the end every source key must have been consumed by some rule (or dropped with a reason), no two rules
  may produce the same key, and — with a target inventory — the produced keys, shapes and dtype kinds must
  equal the inventory exactly.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .errors import MappingError, show, summarize
from .inventory import compress_keys, load_inventory
from .ops import Ctx, Op, parse_op
from .tensor import DTYPES, POLICY_DTYPES, as_storage, cast_storage, from_storage, policy_dtype

PROJECT = Path(__file__).resolve().parents[1]
MAPPINGS_DIR = PROJECT / "mappings"  # installed as the `mappings` package beside `converter`
MANIFESTS_DIR = MAPPINGS_DIR / "manifests"  # shipped copies of ../shared/upstream/manifests (tools/ship_manifests.py)

_PH = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# what one placeholder matches: one dotted segment of a module path (never a control character or a dot)
SEGMENT = r"[A-Za-z0-9_-]+"
TOP_KEYS = {"name", "version", "description", "source", "target", "vars", "rules", "align", "include", "notes"}
RULE_KEYS = {"source", "target", "ops", "drop", "note", "notes"}


def _placeholders(p: str) -> list[str]:
    return _PH.findall(p)


def _compile(pattern: str) -> re.Pattern:
    out, seen, pos = [], set(), 0
    for m in _PH.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        n = m.group(1)
        out.append(f"(?P={n})" if n in seen else f"(?P<{n}>{SEGMENT})")
        seen.add(n)
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def _fill(pattern: str, b: dict) -> str:
    return _PH.sub(lambda m: b[m.group(1)], pattern)


def _prefix_align(entry, sp: str, tp: str):
    """An included mapping's alignment entry with the include's prefixes on its torch / ms module paths."""
    if not isinstance(entry, dict) or not (sp or tp):
        return entry
    e = dict(entry)
    for k, pre in (("torch", sp), ("ms", tp)):
        v = e.get(k)
        if isinstance(v, str):
            e[k] = pre + v
        elif isinstance(v, list):
            e[k] = [pre + x if isinstance(x, str) else x for x in v]
    return e


@dataclass
class Scope:
    """The mapping a rule came from: its name, vars and key prefixes (for `include`)."""

    name: str
    vars: dict
    src_prefix: str = ""
    tgt_prefix: str = ""

    def swapped(self) -> "Scope":
        v = {}
        for k, spec in self.vars.items():
            if isinstance(spec, dict):
                spec = dict(spec)
                spec["source"], spec["target"] = spec.get("target"), spec.get("source")
                spec = {a: b for a, b in spec.items() if b is not None}
            v[k] = spec
        return Scope(self.name, v, self.tgt_prefix, self.src_prefix)


@dataclass
class Rule:
    sources: list[str]
    targets: list[str]
    ops: list[Op]
    drop: str | None
    scope: Scope
    index: int  # position in its own yaml (1-based) for messages

    def __post_init__(self):
        self.src_re = [_compile(p) for p in self.sources]

    @property
    def label(self) -> str:
        return f"{self.scope.name} rule {self.index} ({self.sources[0] if len(self.sources) == 1 else self.sources})"

    def spec(self) -> dict:
        d = {"source": self.sources[0] if len(self.sources) == 1 else list(self.sources)}
        if self.drop is not None:
            d["drop"] = self.drop
        else:
            d["target"] = self.targets[0] if len(self.targets) == 1 else list(self.targets)
        if self.ops:
            d["ops"] = [o.spec() for o in self.ops]
        return d


@dataclass(eq=False)
class Node:
    """A tensor in the plan: a source key (leaf) or the `index`-th output of an op over input nodes."""

    shape: tuple
    dtype: str
    key: str | None = None  # leaf
    op: Op | None = None
    inputs: list = field(default_factory=list)
    index: int = 0
    ctx: Ctx | None = None
    rule: Rule | None = None

    @property
    def is_leaf(self):
        return self.op is None

    def leaves(self) -> list[str]:
        if self.is_leaf:
            return [self.key]
        return [k for n in self.inputs for k in n.leaves()]


@dataclass
class _PlanState:
    """What planning carries from rule to rule: the keys present (source leaves and produced nodes) and the
    findings so far."""

    state: dict  # key -> Node
    dropped: dict = field(default_factory=dict)
    consumed_by: dict = field(default_factory=dict)  # source key -> rule label
    fired: set = field(default_factory=set)
    problems: list = field(default_factory=list)
    vars_cache: dict = field(default_factory=dict)


@dataclass
class Plan:
    """The validated conversion: every target key with the expression that produces it."""

    mapping: "Mapping"
    targets: dict  # key -> Node (ordered)
    dropped: dict  # source key -> reason
    unused_rules: list
    source_inventory: dict
    target_inventory: dict | None

    def inventory(self) -> dict:
        return {k: (n.shape, n.dtype) for k, n in self.targets.items()}

    def describe(self) -> list[str]:
        """One line per group of targets: `double_blocks.{0..18}.img_attn.qkv.weight ← cat(q_proj, k_proj, v_proj)`."""
        lines = sorted(f"{k} ← {render(n, k)}" for k, n in self.targets.items())
        out = compress_keys(lines)
        out += compress_keys([f"✗ {k} (dropped: {r})" for k, r in self.dropped.items()])
        return out


def _rel(leaf: str, target: str) -> str:
    a, b = leaf.split("."), target.split(".")
    i = 0
    while i < min(len(a), len(b)) - 1 and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i - 1 and a[-1 - j] == b[-1 - j]:
        j += 1
    return ".".join(a[i:len(a) - j]) or leaf


def render(n: Node, target: str, top=True) -> str:
    if n.is_leaf:
        if top:
            return "(unchanged)" if n.key == target else n.key
        return _rel(n.key, target)
    args = [render(i, target, False) for i in n.inputs]
    s = n.op.describe(args, n.ctx)
    if n.op.arity == "1->n":
        s += f"[{n.index}]"
    return s


class Mapping:
    """A parsed mapping spec (see module docstring)."""

    def __init__(self, data: dict, path: str | None = None, _stack=()):
        self.path = os.fspath(path) if path else None
        where = self.path or "<mapping>"
        if not isinstance(data, dict):
            raise MappingError(f"{where}: a mapping file is a YAML mapping, got {type(data).__name__}")
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise MappingError(f"{where}: unknown top-level field(s) {show(sorted(unknown, key=str))} (allowed: {sorted(TOP_KEYS)})")
        self.name = str(data.get("name") or (Path(path).stem if path else "mapping"))
        if path and self.name != Path(path).stem:
            raise MappingError(f"{where}: name {self.name!r} must equal the file stem {Path(path).stem!r}")
        self.version = data.get("version", 1)
        self.description = data.get("description", "")
        for k, kind in (("source", dict), ("target", dict), ("align", list), ("include", list), ("vars", dict)):
            if data.get(k) is not None and not isinstance(data[k], kind):
                raise MappingError(f"{where}: {k} must be a {'mapping' if kind is dict else 'list'}, got {show(data[k])}")
        self.source = dict(data.get("source") or {})
        self.target = dict(data.get("target") or {})
        for side, ref in (("source", "manifest"), ("target", "inventory"), ("target", "model")):
            v = getattr(self, side).get(ref)
            if v is not None and not (isinstance(v, str) and v):
                raise MappingError(f"{where}: {side}.{ref} must be a non-empty string, got {show(v)}")
        self.align = list(data.get("align") or [])
        vars_ = data.get("vars") or {}
        for k, v in vars_.items():
            if not _valid_var(k, v):
                raise MappingError(f"{where}: var {show(k)} must be an int or {{source: key, target: key, dim: n}} "
                                   f"(keys: strings, dim: an integer), got {show(v)}")
        self.scope = Scope(self.name, dict(vars_))
        self.includes: list[tuple[Mapping, str, str]] = []
        self.rules: list[Rule] = []
        self.inverted = False
        inc_align: list = []
        for inc in data.get("include") or []:
            if (not isinstance(inc, dict) or "mapping" not in inc
                    or not set(inc) <= {"mapping", "prefix", "source_prefix", "target_prefix"}
                    or not all(isinstance(v, str) for v in inc.values()) or not inc["mapping"]):
                raise MappingError(f"{where}: include entries are {{mapping: NAME, prefix: 'mmdit.'}} (or source_prefix/target_prefix; "
                                   f"strings), got {show(inc)}")
            sp = inc.get("source_prefix", inc.get("prefix", ""))
            tp = inc.get("target_prefix", inc.get("prefix", ""))
            ref = inc["mapping"]
            sub = load_mapping(ref, base=Path(self.path).parent if self.path else None, _stack=_stack + (self.name,))
            self.includes.append((sub, sp, tp))
            for r in sub.rules:
                sc = Scope(r.scope.name, r.scope.vars, sp + r.scope.src_prefix, tp + r.scope.tgt_prefix)
                self.rules.append(Rule([sp + s for s in r.sources], [tp + t for t in r.targets], r.ops, r.drop, sc, r.index))
            inc_align.extend(_prefix_align(a, sp, tp) for a in sub.align)
        self.align = inc_align + self.align
        rules = data.get("rules") or []
        if not isinstance(rules, list):
            raise MappingError(f"{where}: rules must be a list")
        for i, r in enumerate(rules, 1):
            self.rules.append(self._parse_rule(r, i, where))
        if not self.rules:
            raise MappingError(f"{where}: the mapping has no rules")

    def _parse_rule(self, r, i, where) -> Rule:
        w = f"{where} rule {i}"
        if not isinstance(r, dict):
            raise MappingError(f"{w}: a rule is a mapping with source/target/ops or source/drop, got {show(r)}")
        unknown = set(r) - RULE_KEYS
        if unknown:
            raise MappingError(f"{w}: unknown field(s) {show(sorted(unknown, key=str))} (allowed: {sorted(RULE_KEYS)})")
        if "source" not in r:
            raise MappingError(f"{w}: needs 'source'")
        src = r["source"] if isinstance(r["source"], list) else [r["source"]]
        if not src or not all(isinstance(s, str) and s for s in src):
            raise MappingError(f"{w}: source must be a key pattern or a list of them")
        if "drop" in r:
            if "target" in r or "ops" in r:
                raise MappingError(f"{w}: a drop rule has no target or ops")
            if not isinstance(r["drop"], str) or not r["drop"].strip():
                raise MappingError(f"{w}: drop needs a reason (a non-empty string)")
            tgt, ops, drop = [], [], r["drop"]
        else:
            if "target" not in r:
                raise MappingError(f"{w}: needs 'target' (or 'drop: <reason>')")
            tgt = r["target"] if isinstance(r["target"], list) else [r["target"]]
            if not tgt or not all(isinstance(t, str) and t for t in tgt):
                raise MappingError(f"{w}: target must be a key pattern or a list of them")
            if r.get("ops") is not None and not isinstance(r["ops"], list):
                raise MappingError(f"{w}: ops must be a list of {{op: {{params}}}}, got {show(r['ops'])}")
            ops = [parse_op(o, w) for o in (r.get("ops") or [])]
            for o in ops:  # every var an op names must be defined (a typo must not wait for a conversion)
                undefined = sorted(set(o.var_names()) - set(self.scope.vars))
                if undefined:
                    raise MappingError(f"{w}: op {o.name} uses var {undefined[0]!r} which the mapping does not define "
                                       f"(vars: {', '.join(self.scope.vars) or 'none'})")
            drop = None
        names = [set(_placeholders(p)) for p in src + tgt]
        if any(n != names[0] for n in names):
            raise MappingError(f"{w}: every pattern must use the same placeholders, got " + ", ".join(f"{p!r}" for p in src + tgt))
        if drop is None:
            n = len(src)
            for o in ops:
                if o.arity == "n->1":
                    n = 1
                elif o.arity == "1->n":
                    if n != 1:
                        raise MappingError(f"{w}: {o.name} takes one tensor, the rule has {n} at that point")
                    n = len(tgt)
            if n != len(tgt):
                raise MappingError(f"{w}: {len(src)} source(s) and ops {[o.name for o in ops]} give {n} tensor(s) for {len(tgt)} target(s)")
        return Rule(src, tgt, ops, drop, self.scope, i)

    # -- inventories named by the spec ------------------------------------------------------------------
    def _resolve_file(self, ref: str, manifests: bool) -> Path | None:
        if not ref:
            return None
        cands = []
        if self.path:
            cands.append(Path(self.path).parent / ref)  # relative to the yaml (an absolute ref stays itself)
        if manifests:
            cands.append(MANIFESTS_DIR / ref)
        if Path(ref).is_absolute():
            cands.append(Path(ref))
        for c in cands:
            if c.exists():
                return c
        return None

    def source_manifest(self) -> dict | None:
        """The upstream manifest this mapping is written for (None if the spec names none / it is absent)."""
        return self._inventory("source", manifests=True)

    def target_inventory(self) -> dict | None:
        """The MindSpore parameter inventory at the real config; a missing file means 'no target inventory'."""
        return self._inventory("target", manifests=False)

    def _inventory(self, side: str, manifests: bool) -> dict | None:
        """The file named by this spec's own source.manifest / target.inventory; without one, the prefixed union
        of the included mappings' inventories (None if any is missing)."""
        fwd = side if not self.inverted else ("target" if side == "source" else "source")
        if fwd == "source":
            ref, manifests = self.source.get("manifest"), True
        else:
            ref, manifests = self.target.get("inventory"), False
        if ref or not self.includes:
            p = self._resolve_file(ref, manifests) if ref else None
            return load_inventory(p) if p else None
        inv = {}
        for sub, sp, tp in self.includes:
            part = sub._inventory(side, manifests)
            if part is None:
                return None
            pre = sp if side == "source" else tp
            inv.update({pre + k: v for k, v in part.items()})
        return inv

    # -- planning ---------------------------------------------------------------------------------------
    def _vars(self, scope: Scope, src_inv: dict, tgt_inv: dict | None) -> dict:
        out = {}
        for name, spec in scope.vars.items():
            if isinstance(spec, int):
                out[name] = spec
                continue
            dim = spec.get("dim", 0)
            val = None
            for side, inv, pre in (("source", src_inv, scope.src_prefix), ("target", tgt_inv, scope.tgt_prefix)):
                k = spec.get(side)
                if k and inv and pre + k in inv:
                    shape = inv[pre + k][0]
                    if -len(shape) <= dim < len(shape):
                        val = int(shape[dim])
                        break
                    val = MappingError(f"{scope.name}: var {name!r}: dim {dim} is out of range for {pre}{k} "
                                       f"{list(shape)} ({side}, {len(shape)}-d)")
            if val is None:
                tried = [f"{pre}{spec[side]} ({side})" for side, pre in (("source", scope.src_prefix), ("target", scope.tgt_prefix))
                         if spec.get(side)]
                val = MappingError(f"{scope.name}: var {name!r} cannot be read: {' / '.join(tried)} not in the inventories")
            out[name] = val
        return out

    def _scopes(self) -> list[Scope]:
        """Every distinct var scope of the mapping: those of included mappings (with their prefixes), then its own."""
        out, seen = [], set()
        for sc in [r.scope for r in self.rules] + [self.scope]:
            k = (sc.name, sc.src_prefix, sc.tgt_prefix, id(sc.vars))
            if k not in seen:
                seen.add(k)
                out.append(sc)
        return out

    def resolve_vars(self, source_inventory: dict, target_inventory: dict | None = None) -> dict[str, int]:
        """The mapping's vars (its own and those of included mappings, keys read with the include prefixes)
        resolved against `source_inventory` ({key: shape} or {key: (shape, dtype)}) and, optionally, a target
        inventory, exactly as planning does. Raises MappingError naming the var and key when one cannot be read."""
        def norm(inv):
            if inv is None:
                return None
            out = {}
            for k, v in inv.items():
                if isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[1], str):
                    v = v[0]
                out[k] = (tuple(getattr(v, "shape", v)), None)
            return out
        src, tgt = norm(source_inventory), norm(target_inventory)
        out: dict[str, int] = {}
        for sc in self._scopes():
            for name, val in self._vars(sc, src, tgt).items():
                if isinstance(val, MappingError):
                    raise val
                out[name] = val
        return out

    def plan(self, source_inventory: dict, target_inventory: dict | None = None, *, where: str | None = None,
             check_dtypes: bool = False) -> Plan:
        """Validate the whole conversion of `source_inventory` ({key: (shape, dtype)}); raise MappingError
        listing every problem, or return the Plan."""
        src_inv = {k: (tuple(s), d) for k, (s, d) in source_inventory.items()}
        tgt_inv = None if target_inventory is None else {k: (tuple(s), d) for k, (s, d) in target_inventory.items()}
        st = _PlanState({k: Node(s, d, key=k) for k, (s, d) in src_inv.items()})
        for ri, rule in enumerate(self.rules):
            self._apply_rule(ri, rule, st, src_inv, tgt_inv)
        self._unconsumed(st, src_inv)
        if tgt_inv is not None:
            self._against_inventory(st, src_inv, tgt_inv, check_dtypes)
        if st.problems:
            head = f"{where}: " if where else ""
            raise MappingError(f"{head}mapping {self.name}: {len(st.problems)} problem(s): " + summarize(st.problems),
                               st.problems)
        unused = [r.label for i, r in enumerate(self.rules) if i not in st.fired]
        order = {k: i for i, k in enumerate(tgt_inv)} if tgt_inv else None
        targets = dict(sorted(st.state.items(), key=lambda kv: order[kv[0]])) if order else dict(st.state)
        return Plan(self, targets, st.dropped, unused, src_inv, tgt_inv)

    def _matches(self, rule: Rule, st: "_PlanState") -> list[tuple[dict, list[str]]]:
        """(placeholder values, source keys) of every match of `rule` among the keys present before it runs;
        incomplete multi-source matches and keys matched twice become problems."""
        bindings: dict[tuple, dict] = {}
        for rx in rule.src_re:
            for k in list(st.state):
                m = rx.match(k)
                if m:
                    b = m.groupdict()
                    bindings.setdefault(tuple(sorted(b.items())), b)
        matches, used = [], set()
        for b in bindings.values():
            srcs = [_fill(p, b) for p in rule.sources]
            absent = [s for s in srcs if s not in st.state]
            if absent:
                have = [s for s in srcs if s in st.state]
                st.problems.append(f"key {absent[0]!r} is needed by {rule.label} together with {have[0]!r} but is absent")
                for s in have:  # claimed by this rule: do not report them again as unknown
                    if s not in used:
                        st.consumed_by.setdefault(s, rule.label)
                        st.state.pop(s)
                continue
            dup = [s for s in srcs if s in used]
            if dup or len(set(srcs)) != len(srcs):
                st.problems.append(f"{rule.label}: key {(dup or srcs)[0]!r} is matched twice by the same rule")
                continue
            used.update(srcs)
            matches.append((b, srcs))
        return matches if bindings else None

    def _apply_rule(self, ri: int, rule: Rule, st: "_PlanState", src_inv: dict, tgt_inv: dict | None) -> None:
        """Consume the keys `rule` matches and add the nodes it produces (or record them as dropped)."""
        matches = self._matches(rule, st)
        if matches is None:
            return
        st.fired.add(ri)
        consumed = {s: st.state.pop(s) for _, srcs in matches for s in srcs}
        for s in consumed:
            if s in src_inv and s not in st.consumed_by:
                st.consumed_by[s] = rule.label
        if rule.drop is not None:
            for s in consumed:
                st.dropped[s] = rule.drop
            return
        if id(rule.scope) not in st.vars_cache:
            st.vars_cache[id(rule.scope)] = self._vars(rule.scope, src_inv, tgt_inv)
        vs = st.vars_cache[id(rule.scope)]
        for b, srcs in matches:
            tkeys = [_fill(t, b) for t in rule.targets]
            nodes = [consumed[s] for s in srcs]
            try:
                outs = self._apply_ops(rule, nodes, tkeys, vs, tgt_inv)
            except MappingError as e:
                st.problems.append(f"{srcs[0]} {list(nodes[0].shape)}: {e}")
                continue
            for tk, node in zip(tkeys, outs):
                if tk in st.state:
                    prev = st.state[tk]
                    by = prev.rule.label if prev.rule else "the source checkpoint (an unconsumed key)"
                    st.problems.append(f"two rules produce {tk!r}: {by} and {rule.label}")
                    continue
                st.state[tk] = node

    def _unconsumed(self, st: "_PlanState", src_inv: dict) -> None:
        """Source keys no rule consumed are problems (with a did-you-mean for the first few); they leave the state."""
        unknown = [k for k, n in st.state.items() if n.is_leaf and n.rule is None]
        known = list(st.consumed_by)
        for i, k in enumerate(unknown):
            near = difflib.get_close_matches(k, known, n=1, cutoff=0.6) if i < 20 else []  # difflib is quadratic
            hint = f" (did you mean {near[0]!r}, matched by {st.consumed_by[near[0]]}?)" if near else ""
            st.problems.append(f"key {k!r} {list(src_inv[k][0])} {src_inv[k][1]} matches no rule of mapping {self.name}{hint}")
        for k in unknown:
            del st.state[k]

    def _against_inventory(self, st: "_PlanState", src_inv: dict, tgt_inv: dict, check_dtypes: bool) -> None:
        """The produced keys must equal the target inventory: names, shapes, dtype kinds (or dtypes)."""
        for k in tgt_inv:
            if k not in st.state:
                st.problems.append(f"target {k!r} {list(tgt_inv[k][0])} is produced by no rule{self._needs_hint(k, src_inv)}")
        for k, n in st.state.items():
            if k not in tgt_inv:
                near = difflib.get_close_matches(k, list(tgt_inv), n=1, cutoff=0.5) if len(st.problems) < 20 else []
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                st.problems.append(f"{n.rule.label if n.rule else 'mapping'} produces {k!r} {list(n.shape)} which the "
                                   f"target inventory does not have{hint}")
                continue
            ts, td = tgt_inv[k]
            if tuple(n.shape) != ts:
                st.problems.append(f"{k!r} would be {list(n.shape)} but the target expects {list(ts)} (from {', '.join(n.leaves())})")
            if check_dtypes and n.dtype != td:
                st.problems.append(f"{k!r} would be {n.dtype} but the target expects {td}")
            elif DTYPES[n.dtype][3] != DTYPES.get(td, (0, 0, 0, "?"))[3]:
                st.problems.append(f"{k!r} is {n.dtype} but the target expects {td} (different kind)")

    def _needs_hint(self, target_key: str, src_inv: dict) -> str:
        """For a target nobody produced: which source keys would the rules need (first rule that fits)?"""
        for r in self.rules:
            for t in r.targets:
                m = _compile(t).match(target_key)
                if m:
                    need = [_fill(s, m.groupdict()) for s in r.sources]
                    absent = [s for s in need if s not in src_inv]
                    if absent:
                        return f"; it needs source key {absent[0]!r} which is absent"
        return ""

    def _apply_ops(self, rule: Rule, nodes: list[Node], tkeys: list[str], vs: dict, tgt_inv) -> list[Node]:
        if not rule.ops:
            return [Node(n.shape, n.dtype, key=n.key, op=n.op, inputs=n.inputs, index=n.index, ctx=n.ctx, rule=rule)
                    for n in nodes]
        cur = nodes
        for i, op in enumerate(rule.ops):
            last = i == len(rule.ops) - 1
            tshapes = [tgt_inv[k][0] if tgt_inv and k in tgt_inv else None for k in tkeys] if last else None
            ctx = Ctx(vs, tshapes, len(tkeys), rule.label)
            if op.arity == "n->1":
                shapes, dts = op.infer([n.shape for n in cur], [n.dtype for n in cur], ctx)
                cur = [Node(shapes[0], dts[0], op=op, inputs=list(cur), ctx=ctx, rule=rule)]
            elif op.arity == "1->n":
                shapes, dts = op.infer([cur[0].shape], [cur[0].dtype], ctx)
                src = cur[0]
                cur = [Node(s, d, op=op, inputs=[src], index=j, ctx=ctx, rule=rule) for j, (s, d) in enumerate(zip(shapes, dts))]
            else:
                new = []
                for n in cur:
                    shapes, dts = op.infer([n.shape], [n.dtype], ctx)
                    new.append(Node(shapes[0], dts[0], op=op, inputs=[n], ctx=ctx, rule=rule))
                cur = new
        return cur

    # -- in-memory conversion -------------------------------------------------------------------------------
    def convert(self, state: dict, target_inventory: dict | None = None, dtype: str = "keep") -> dict:
        """Convert a state dict of numpy arrays (or RawTensors for bf16) in memory; returns the same kinds."""
        storage = {}
        likes = {}
        for k, v in state.items():
            storage[k] = as_storage(v)
            likes[k] = v
        plan = self.plan({k: (a.shape, d) for k, (a, d) in storage.items()}, target_inventory)
        out = {}
        cache: dict = {}
        want = POLICY_DTYPES[dtype]
        dts = {k: policy_dtype(node.dtype, want, k) for k, node in plan.targets.items()}  # all checked before any cast
        for k, node in plan.targets.items():
            arr = evaluate(node, lambda key: storage[key][0], cache)
            dt = node.dtype
            if dts[k] != dt:
                arr, dt = cast_storage(arr, dt, dts[k], k), dts[k]
            leaves = node.leaves()
            out[k] = from_storage(arr, dt, like=likes.get(leaves[0]) if leaves else None)
        return out

    def invert(self) -> "Mapping":
        """The MindSpore -> PyTorch mapping: rules in reverse order, each op replaced by its inverse.

        Drop rules cannot be inverted (the values are gone); they are skipped and listed in `not_restored`.
        A `cast` without `from:` raises MappingError.
        """
        inv = Mapping.__new__(Mapping)
        inv.path, inv.name, inv.version = self.path, self.name, self.version
        inv.description = f"inverse of {self.name}"
        inv.source, inv.target, inv.align = dict(self.source), dict(self.target), list(self.align)
        inv.inverted = not self.inverted
        inv.includes = [(s.invert(), tp, sp) for s, sp, tp in self.includes]
        inv.scope = self.scope.swapped()
        scopes: dict[int, Scope] = {}
        inv.rules = []
        inv.not_restored = []
        for r in reversed(self.rules):
            if r.drop is not None:
                inv.not_restored.extend(r.sources)
                continue
            sc = scopes.setdefault(id(r.scope), r.scope.swapped())
            ops = [o.inverse() for o in reversed(r.ops)]
            inv.rules.append(Rule(list(r.targets), list(r.sources), ops, None, sc, r.index))
        return inv

    def __repr__(self):
        return f"Mapping({self.name!r}, {len(self.rules)} rules{', inverted' if self.inverted else ''})"


def _valid_var(k, v) -> bool:
    if not isinstance(k, str):
        return False
    if isinstance(v, int):
        return not isinstance(v, bool)
    return (isinstance(v, dict) and ("source" in v or "target" in v) and set(v) <= {"source", "target", "dim"}
            and all(isinstance(v[s], str) and v[s] for s in ("source", "target") if s in v)
            and isinstance(v.get("dim", 0), int) and not isinstance(v.get("dim", 0), bool))


def evaluate(node: Node, leaf, cache: dict | None = None) -> np.ndarray:
    """Storage array of a plan node; `leaf(key)` gives source storage arrays. `cache` memoizes op results
    (so a split's input is computed once)."""
    if node.is_leaf:
        return leaf(node.key)
    key = (id(node.op), tuple(id(i) for i in node.inputs))
    if cache is not None and key in cache:
        outs = cache[key]
    else:
        ins = [evaluate(i, leaf, cache) for i in node.inputs]
        outs = node.op.apply(ins, [i.dtype for i in node.inputs], node.ctx)
        if cache is not None and node.op.arity == "1->n":
            cache[key] = outs
    return outs[node.index]


def find_mapping(name: str, base: Path | None = None) -> Path:
    p = Path(name)
    cands = [p] if p.suffix in (".yaml", ".yml") else []
    if base:
        cands += [base / name, base / f"{name}.yaml"]
    cands.append(MAPPINGS_DIR / f"{name}.yaml")
    for c in cands:
        if c.is_file():
            return c
    known = sorted(x.stem for x in MAPPINGS_DIR.glob("*.yaml"))
    near = difflib.get_close_matches(name, known, n=1)
    raise MappingError(f"mapping {name!r} not found (known: {', '.join(known) or 'none'})" + (f"; did you mean {near[0]!r}?" if near else ""))


def load_mapping(name_or_path, base: Path | None = None, _stack=()) -> Mapping:
    """Load `mappings/<name>.yaml` (or a path); MappingError with the file name on any problem."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise MappingError(f"a mapping is named by a string, got {show(name_or_path)}")
    path = find_mapping(os.fspath(name_or_path), base)
    if path.stem in _stack:
        raise MappingError(f"{path}: include cycle {' -> '.join(_stack + (path.stem,))}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise MappingError(f"{path}: invalid YAML ({(str(e).splitlines() or [''])[0]})") from None
    except OSError as e:
        raise MappingError(f"{path}: cannot read the mapping: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise MappingError(f"{path}: not a YAML text file (not UTF-8: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise MappingError(f"{path}: invalid YAML (nested too deeply)") from None
    return Mapping(data, path, _stack)
