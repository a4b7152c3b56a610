"""`msconv verify OUT_DIR --parity`: prove a converted checkpoint at full size, one block at a time.

Nobody can hold the 11B MMDiT twice in fp32 on an ordinary machine (48 GB per framework), so each *unit* (the
embedders, every double / single block, the final layer) is checked on its own at the real config:

1. its tensors are read lazily, by key: the MindSpore ones from the converted files, the upstream ones they are
   made of (the mapping's plan says which) from the source checkpoint; every converted tensor must equal, byte for
   byte, what the mapping makes of the source bytes (the converter's in-memory path, independent of the streaming
   writer), after the dtype policy of the conversion. A difference names the tensor;
2. the torch reference block (`parity/reference`, transformers for T5/CLIP; upstream names, built on the meta
   device, source weights assigned, every key accounted for) runs on seeded inputs at the real width and is freed;
   then the MindSpore block (`opensora_ms`, built without initialising, loaded by `load_strict`) runs on the same
   inputs and is freed; the outputs are judged with the harness's metrics and thresholds (`parity/metrics.py`,
   `parity/thresholds.yaml`, the fp32 *layer* limit). The peak holds about one block in one framework plus the
   other's file bytes.

The report (`parity/report.py`: md, json, junit, html) has one row per unit output, plus one row per converted
tensor that differs from the mapped source. `Result.files_wrong` tells the CLI which exit status: 2 when a
converted tensor differs from the mapped source (the files are wrong), 1 when every tensor equals its mapped
source but a unit computes differently (the mapping or the port is wrong: msconv's bug).

Components (one planner each: config + units): mmdit, vae (Hunyuan), dc_ae, flux_ae, t5, clip. docs/parity.md,
"Proving a converted checkpoint at full size".
"""

from __future__ import annotations

import fnmatch
import gc
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from converter.errors import FormatError, UserError
from converter.memory import PeakRSS, rss as _rss
from parity.blockwise_units import COVERED, Unit, planners, target_file_config

MANIFEST_NAME = "msconv-manifest.json"
# component names on the command line -> model names of the mappings / converter.targets
COMPONENTS = {"mmdit": "mmdit", "vae": "hunyuan_vae", "dc_ae": "dc_ae", "t5": "t5", "clip": "clip",
              "flux_ae": "flux_ae"}


class BlockwiseError(UserError):
    """Bad input for the blockwise check (missing source, unknown component, unsupported model, ...)."""


@dataclass
class Component:
    name: str                # command-line name (mmdit, vae, ...)
    model: str               # converter.targets model name
    prefix: str              # key prefix of this component in the source and converted files ("" or "mmdit.")
    src_prefix: str          # the same in the source (detected: CLIPModel's "text_model.")
    config: dict
    mapping: object = None   # the (included) mapping that converts it


@dataclass
class Result:
    verdict: str             # pass | fail
    report: dict
    paths: dict
    files_wrong: bool        # a converted tensor differs from the mapped source
    first_failure: str | None
    seconds: float
    peak_rss: int            # bytes: this process's peak resident set during the run (`PeakRSS`)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------- manifest, sources
def _manifest(out: Path) -> dict:
    from converter.verify import _load_manifest

    return _load_manifest(out)


def _source_path(man: dict, out: Path, source) -> str:
    """The source checkpoint: `--source`, else the path recorded at conversion."""
    rec = man.get("source") or {}
    if source is None:
        p = rec.get("path")
        if not p:
            raise BlockwiseError(f"{out / MANIFEST_NAME}: records no source path; pass --source SRC")
        if not os.path.exists(p):
            raise BlockwiseError(f"{p}: no such file (the source recorded in {out / MANIFEST_NAME}); "
                                 "pass --source SRC")
        source = p
    source = os.fspath(source)
    if not os.path.exists(source):
        raise BlockwiseError(f"{source}: no such file (--source)")
    return source


def _check_source_sizes(man: dict, files: list[str]) -> list[str]:
    rec = [f.get("size") for f in (man.get("source") or {}).get("files") or [] if isinstance(f, dict)]
    have = [os.path.getsize(f) for f in files]
    if rec and sorted(rec) != sorted(have):
        return [f"the source's file sizes {sorted(have)} differ from those converted {sorted(rec)}: "
                "a different checkpoint? (converted tensors will differ from it)"]
    return []


def _components(man: dict, mapping, tgt_inv: dict) -> list[Component]:
    """The models of this conversion with their configs: the manifest's recorded target parts, or (shipped real
    checkpoint) the config of the mapping's target inventory, or one inferred from the converted files."""
    from converter.targets import MODELS

    rec = man.get("target") or {}
    parts = rec.get("parts")
    if not parts:
        if mapping.includes:
            parts = [{"prefix": tp, "model": sub.target.get("model"), "config": None, "_mapping": sub, "_sp": sp}
                     for sub, sp, tp in mapping.includes]
        else:
            parts = [{"prefix": "", "model": mapping.target.get("model"), "config": None}]
    out = []
    for p in parts:
        pre = p.get("prefix", "")
        sub, sp = p.get("_mapping"), p.get("_sp", pre)
        if sub is None:
            sub, sp = mapping, pre
            for s, s_sp, s_tp in mapping.includes:
                if s_tp == pre:
                    sub, sp = s, s_sp
        model = p.get("model") or sub.target.get("model")
        cfg = p.get("config") or target_file_config(sub)
        if cfg is None:
            mine = {k[len(pre):]: v for k, v in tgt_inv.items() if k.startswith(pre)}
            entry = MODELS.get(model)
            if entry is None:
                raise BlockwiseError(f"no config for model {model!r} of mapping {sub.name}: it has no target "
                                     "inventory to read it from")
            from converter.targets import _resolve

            cfg = _resolve(entry.infer_config)(mine)
        name = next((k for k, v in COMPONENTS.items() if v == model), model)
        out.append(Component(name, model, pre, sp, dict(cfg), sub))
    return out


# ---------------------------------------------------------------------------------------------- one unit
def _source_prefix(plan, comp: Component) -> str:
    """The prefix the source keys carry beyond the converted ones (CLIPModel's "text_model.", a pipeline's
    "mmdit."): the most common one over the renamed tensors (one source, key ending with the target's)."""
    from collections import Counter

    seen = Counter()
    for k, node in plan.targets.items():
        if not k.startswith(comp.prefix):
            continue
        t = k[len(comp.prefix):]
        leaves = node.leaves()
        if len(leaves) == 1 and leaves[0].endswith(t) and (leaves[0] == t or leaves[0][-len(t) - 1] == "."):
            seen[leaves[0][: len(leaves[0]) - len(t)]] += 1
    return seen.most_common(1)[0][0] if seen else comp.src_prefix


def _owner(key: str, units: list[Unit]) -> Unit | None:
    for u in units:
        if u.prefixes and key.startswith(u.prefixes):
            return u
    return next((u for u in units if not u.prefixes), None)


def _torch_tensor(storage: np.ndarray, dtype: str):
    """Storage array -> fp32 torch tensor (bf16 decoded exactly by torch)."""
    import torch

    if dtype == "BF16":
        return torch.from_numpy(storage.view(np.int16)).view(torch.bfloat16).float()
    from converter.tensor import decode

    return torch.from_numpy(np.ascontiguousarray(decode(storage, dtype))).float()


def _ms_value(storage: np.ndarray, dtype: str):
    """What load_strict gets: bf16 decoded to fp32 by torch (faster than a numpy shift; exact), other floats
    as numpy values, FP8 as a RawTensor (load_strict refuses it with a clear message)."""
    from converter.tensor import RawTensor, decode

    if dtype == "BF16":
        return _torch_tensor(storage, dtype).numpy()
    if dtype.startswith("F8"):
        return RawTensor.from_storage(storage, dtype)
    return decode(storage, dtype)


class _Checker:
    """State shared by the units of one run: readers, plan, thresholds, rows."""

    def __init__(self, src, tgt, plan, policy: str | None, mapping_name: str, src_name: str, th, dtype="float32"):
        self.src, self.tgt, self.plan, self.policy = src, tgt, plan, policy
        self.mapping_name, self.src_name = mapping_name, src_name
        self.th, self.dtype = th, dtype
        self.tcfg = th.for_dtype(dtype)

    def judge(self, name: str, kind: str, x: np.ndarray, ref: np.ndarray, limit: float | None = None) -> dict:
        from parity.metrics import compare_arrays, verdict

        limit = self.th.limit(name, kind, self.dtype) if limit is None else limit
        m = compare_arrays(x, ref, elem_limit=limit)   # as parity/engine.py judges a hook
        v, reason = verdict(m, limit, float(self.tcfg.get("warn_fraction", 0.5)),
                            elem_max_fraction=self.tcfg.get("elem_max_fraction"))
        row = {"name": name, "kind": kind, **m, "limit": limit, "verdict": v, "reason": reason}
        row["score"] = (m["max_rel"] / limit if limit else (0.0 if m["max_rel"] == 0 else math.inf)) \
            if not m.get("shape_mismatch") else math.inf
        return row

    # -- weights: converted bytes == mapping(source bytes)
    def check_weights(self, src_store: dict, tgt_store: dict) -> tuple[int, list[dict]]:
        """(tensors compared, a failing row per converted tensor that is not the mapping of its source bytes)."""
        from converter.mapping import evaluate
        from converter.tensor import cast_storage, decode, policy_dtype

        rows = []

        def leaf(k):
            if k not in src_store:
                from converter.safetensors_io import read_storage

                src_store[k] = read_storage(self.src.tensors[k])
            return src_store[k]

        cache: dict = {}
        n = 0
        for k, got in tgt_store.items():
            node = self.plan.targets.get(k)
            info = self.tgt.tensors[k]
            if node is None:
                rows.append(self._weight_row(k, "the mapping produces no such tensor from the source"))
                continue
            exp = evaluate(node, leaf, cache)
            want = policy_dtype(node.dtype, self.policy, k)
            if want != node.dtype:
                exp = cast_storage(exp, node.dtype, want, k)
            n += 1
            if info.dtype != want or tuple(info.shape) != tuple(exp.shape):
                rows.append(self._weight_row(k, f"is {info.dtype}{list(info.shape)}, the mapping gives "
                                                f"{want}{list(exp.shape)}"))
                continue
            if np.array_equal(got.reshape(-1).view(np.uint8), np.ascontiguousarray(exp).reshape(-1).view(np.uint8)):
                continue
            off = np.count_nonzero(got.reshape(-1) != np.ascontiguousarray(exp).reshape(-1)) / max(got.size, 1)
            row = self.judge(k, "weight", decode(got, want).astype(np.float32), decode(exp, want).astype(np.float32),
                             limit=0.0)
            row["verdict"] = "fail"
            row["reason"] = (f"converted tensor differs from the source through mapping {self.mapping_name} "
                             f"(max_rel {row['max_rel']:.3g}, {100 * off:.3g}% of the elements)")
            rows.append(row)
        cache.clear()
        return n, rows

    def _weight_row(self, key: str, reason: str) -> dict:
        return {"name": key, "kind": "weight", "shape": list(self.tgt.tensors[key].shape), "verdict": "fail",
                "reason": f"converted tensor {reason}", "score": math.inf}


def _no_conv_graphs(cell) -> None:
    """Each conv shape runs once here: per-shape conv graphs (the op layer's default for big convs) would cost a
    compilation each and keep their buffers (RSS grew to 8 GB over the real-width VAE with them, 2.1 GB without)."""
    from opensora_ms.ops.conv import ConvSettings, apply_conv_settings

    apply_conv_settings(cell, ConvSettings(jit=False))


def _run_unit(ck: _Checker, comp: Component, unit: Unit, src_keys: list[str], tgt_keys: list[str], seed: int) -> dict:
    """Read and check the unit's tensors, then run the torch side and free it, then the MindSpore side and free
    it (so the peak holds one framework's block plus the other's file bytes); judge the outputs."""
    import torch

    from converter.safetensors_io import read_storage
    from opensora_ms.loading import LoadError, load_strict

    t0 = time.perf_counter()
    phases = {}

    def lap(name):
        nonlocal t0
        t = time.perf_counter()
        phases[name] = round(t - t0, 2)
        t0 = t

    where = comp.prefix + unit.name
    strip_s = comp.src_prefix + (unit.strip if unit.src_strip is None else unit.src_strip)
    strip_t = comp.prefix + unit.strip
    odd = [k for k in src_keys if not k.startswith(strip_s)]
    if odd:
        raise BlockwiseError(f"{where}: source tensor(s) {', '.join(odd[:3])} are outside {strip_s!r}*, where the "
                             f"reference block's weights live (mapping {ck.mapping_name})")
    src_store = {k: read_storage(ck.src.tensors[k]) for k in src_keys}
    tgt_store = {k: read_storage(ck.tgt.tensors[k]) for k in tgt_keys}
    lap("read")
    n_checked, wrows = ck.check_weights(src_store, tgt_store)
    lap("weights")
    x = unit.inputs(np.random.default_rng([seed, zlib.crc32(unit.name.encode())]))

    tm = unit.build_torch()
    state = {k[len(strip_s):]: _torch_tensor(src_store.pop(k), ck.src.tensors[k].dtype) for k in src_keys}
    try:
        missing, unexpected = tm.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes
        msg = " ".join(str(e).split())
        raise BlockwiseError(f"{ck.src_name}: the source tensors of {where} do not fit the reference block "
                             f"({type(tm).__name__}): {msg[:400]}") from None
    if missing or unexpected:
        what = [f"missing {strip_s}{k}" for k in missing] + [f"unexpected {strip_s}{k}" for k in unexpected]
        raise BlockwiseError(f"{ck.src_name}: the source tensors of {where} do not fit the reference block "
                             f"({type(tm).__name__}): {len(what)} problem(s): {', '.join(what[:4])}"
                             f"{' ...' if len(what) > 4 else ''}")
    del state, src_store
    left = [n for n, t in list(tm.named_parameters()) + list(tm.named_buffers()) if t.is_meta]
    if left:  # a planner bug (a buffer the meta build left unset)
        raise RuntimeError(f"{where}: reference tensors left on the meta device: {', '.join(left[:4])}")
    lap("torch_load")
    with torch.no_grad():
        ref = unit.run_torch(tm.eval(), x)
    del tm
    gc.collect()
    lap("torch_run")

    mc = unit.build_ms()
    _no_conv_graphs(mc)
    values = {k[len(strip_t):]: _ms_value(tgt_store.pop(k), ck.tgt.tensors[k].dtype) for k in tgt_keys}
    try:
        load_strict(mc, values)
    except LoadError as e:
        raise BlockwiseError(f"converted tensors of {where} ({strip_t}*): {e} (is the config right? --config "
                             "FILE.json overrides the recorded one)") from None
    del values, tgt_store
    gc.collect()
    lap("ms_load")
    got = unit.run_ms(mc, x)
    del mc
    gc.collect()
    lap("ms_run")
    rows = []
    if [n for n, _ in got] != [n for n, _ in ref]:
        raise RuntimeError(f"{where}: the two sides produced {[n for n, _ in got]} and {[n for n, _ in ref]}")
    for (sub, a), (_, r) in zip(got, ref):
        name = comp.prefix + (unit.name + ("." + sub if sub else "") if unit.prefixes else sub)
        rows.append(ck.judge(name, "layer", a, r))
    return {"rows": rows, "weight_rows": wrows, "weights": n_checked, "seconds": sum(phases.values()),
            "phases": phases}


def _run_all(ck: _Checker, todo: list, seed: int, say, rows: list, units_done: list, t_start: float,
             peak_rss: PeakRSS) -> None:
    """Run every unit in order, printing one progress line each (and the reasons of its failures)."""
    n = len(todo)
    width = max(len(c.prefix + u.name) for c, u, _, _ in todo)
    for i, (c, u, sk, tk) in enumerate(todo, 1):
        res = _run_unit(ck, c, u, sk, tk, seed)
        urows = res["rows"] + res["weight_rows"]
        rows += urows
        bad = [r for r in urows if r["verdict"] == "fail"]
        worst = max((r.get("max_rel") or 0.0 for r in res["rows"]), default=0.0)
        units_done.append({"name": c.prefix + u.name, "seconds": round(res["seconds"], 2), "phases": res["phases"],
                           "rss": _rss(),
                           "weights_checked": res["weights"], "weights_differ": len(res["weight_rows"]),
                           "verdict": "fail" if bad else "pass"})
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (n - i)
        same = res["weights"] - len(res["weight_rows"])
        line = (f"[{i:>{len(str(n))}}/{n}] {c.prefix + u.name:<{width}} {'FAIL' if bad else 'pass'}  "
                f"max_rel {worst:.2e}  weights {same}/{res['weights']} = source  {res['seconds']:5.1f} s  "
                f"RSS {_gb(_rss())} (peak {_gb(peak_rss.peak())})  ETA {eta / 60:.1f} min")
        say(line)
        for r in bad:
            say(f"    {r['name']}: {r['reason']}")


# ---------------------------------------------------------------------------------------------- the run
def read_config_file(path) -> dict:
    """A model config for --config: a bare config, a case config ({"<Name>Config": {...}, ...}) or a manifest /
    inventory file's "config"."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise BlockwiseError(f"{p}: no such config file (--config)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BlockwiseError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BlockwiseError(f"{p}: a config file is a JSON object")
    named = [v for k, v in d.items() if k.endswith("Config") and isinstance(v, dict)]
    if len(named) == 1:
        return dict(named[0])
    if isinstance(d.get("config"), dict):
        return dict(d["config"])
    return d


def verify_parity(out_dir, source=None, components=None, tokens: int = 256, seed: int = 0, only=None,
                  report_dir=None, progress: Callable[[str], None] | None = None, config=None) -> Result:
    """Blockwise parity of the converted folder `out_dir` against its source checkpoint (module docstring).
    `components`: names to check (default: every component of the conversion); `only`: unit-name globs;
    `config`: a config file for the (single) component, when the conversion recorded none or a wrong one."""
    peak_rss = PeakRSS()
    try:
        return _verify(out_dir, source, components, tokens, seed, only, report_dir, progress, config, peak_rss)
    finally:
        peak_rss.stop()


def _verify(out_dir, source, components, tokens, seed, only, report_dir, progress, config, peak_rss) -> Result:
    t_start = time.perf_counter()
    say = progress or (lambda s: None)
    out = Path(out_dir)
    man = _manifest(out)
    if tokens < 1:
        raise BlockwiseError(f"--tokens must be at least 1, got {tokens}")
    src_path = _source_path(man, out, source)

    from converter.mapping import load_mapping
    from converter.sources import Source

    mrec = man.get("mapping") or {}
    mref = mrec.get("path") if mrec.get("path") and os.path.isfile(mrec["path"]) else mrec.get("name")
    if not mref:
        raise FormatError(f"{out / MANIFEST_NAME}: records no mapping")
    mapping = load_mapping(mref)
    src = Source(src_path)
    tgt = Source(out)
    notes = _check_source_sizes(man, src.files)
    plan = mapping.plan(src.inventory(), where=src_path)  # the source must be what this mapping converts
    comps = _components(man, mapping, tgt.inventory())
    wanted = [c.strip() for c in (components or []) if c.strip()]
    if wanted:
        bad = [c for c in wanted if c not in COMPONENTS]
        if bad:
            raise BlockwiseError(f"--components: unknown {', '.join(bad)} (known: {', '.join(COMPONENTS)})")
        have = {c.name for c in comps}
        absent = [c for c in wanted if c not in have]
        if absent:
            raise BlockwiseError(f"--components {', '.join(absent)}: not in this conversion (it holds "
                                 f"{', '.join(sorted(have))}; mapping {mapping.name})")
        comps = [c for c in comps if c.name in wanted]
    if config is not None:
        if len(comps) != 1:
            raise BlockwiseError(f"--config describes one model; this check covers {', '.join(c.name for c in comps)} "
                                 "(choose one with --components)")
        comps[0].config = read_config_file(config)
        notes.append(f"{comps[0].name}: config from {os.fspath(config)}")
    for c in comps:
        if c.model not in COVERED:
            raise BlockwiseError(f"blockwise parity covers {', '.join(COVERED)} so far; {c.name} ({c.model}) is not "
                                 "covered yet (use --components to check the others)")

    from parity.engine import setup_mindspore

    setup_mindspore("CPU")
    from parity.metrics import Thresholds

    th = Thresholds.load()
    from converter.tensor import POLICY_DTYPES

    policy = POLICY_DTYPES.get(man.get("dtype_policy", "keep"))
    ck = _Checker(src, tgt, plan, policy, mapping.name, src_path, th)

    todo = []
    unaligned, reasons, infos, orphans = [], {}, {}, []
    plans = planners()
    for c in comps:
        cfg_fn, units_fn = plans[c.model]
        kind = None if config is not None else (man.get("target") or {}).get("kind")
        c.config, cnotes = cfg_fn(c.config, c.mapping, kind)
        notes += [f"{c.name}: {n}" for n in cnotes]
        try:
            units, info = units_fn(c.config, tokens)
        except ValueError as e:
            how = (man.get("target") or {}).get("kind")
            raise BlockwiseError(f"{c.name}: cannot build the reference at the recorded config ({e})"
                                 + ("; the conversion inferred it from the shapes -- convert again with --config "
                                    "FILE.json" if how == "inferred" else "")) from None
        infos[c.name] = {k: v for k, v in info.items() if k != "blocks"} | {"config": c.config}
        for k, r in info.get("unaligned", {}).items():
            unaligned.append(c.prefix + k)
            reasons[c.prefix + k] = r
        tgt_keys = {u.name: [] for u in units}
        for k in tgt.tensors:
            if k.startswith(c.prefix):
                u = _owner(k[len(c.prefix):], units)
                if u is None:  # a planner gap: say so instead of skipping the tensor silently
                    orphans.append({"name": k, "kind": "unchecked", "shape": list(tgt.tensors[k].shape),
                                    "verdict": "fail", "score": math.inf,
                                    "reason": "no block of the blockwise check loads this tensor (not verified)"})
                else:
                    tgt_keys[u.name].append(k)
        # a unit's source tensors: those its converted tensors are made of (the mapping's plan), in file order
        order = {k: i for i, k in enumerate(src.tensors)}
        src_keys = {}
        for u in units:
            leaves = {leaf for k in tgt_keys[u.name] if k in plan.targets for leaf in plan.targets[k].leaves()}
            src_keys[u.name] = sorted(leaves, key=order.__getitem__)
        c.src_prefix = _source_prefix(plan, c)
        for u in units:
            if only and not any(fnmatch.fnmatchcase(c.prefix + u.name, g) for g in only):
                continue
            todo.append((c, u, src_keys[u.name], tgt_keys[u.name]))
    if not todo:
        raise BlockwiseError(f"--only {','.join(only or [])}: matches no block (names like embedders, "
                             "double_blocks.0, single_blocks.0, final_layer)")

    say(f"verify --parity: {out} against {src_path} ({mapping.name}); {len(todo)} block(s) of "
        f"{', '.join(c.name for c in comps)}; --tokens {tokens}; RSS {_gb(_rss())}")
    for note in notes:
        say(f"note: {note}")
    rows, units_done = list(orphans), []
    _run_all(ck, todo, seed, say, rows, units_done, t_start, peak_rss)

    from parity.report import environment, write_reports

    fails = [r for r in rows if r["verdict"] == "fail"]
    files_wrong = any(r["kind"] == "weight" for r in fails)
    first = None
    if fails:
        f = fails[0]
        blk = next((d["name"] for d in units_done if f["name"] == d["name"] or f["name"].startswith(d["name"] + ".")),
                   f["name"])
        wrong = [r["name"] for r in fails if r["kind"] == "weight" and r["name"].startswith(blk + ".")] or \
                [r["name"] for r in fails if r["kind"] == "weight"]
        first = f"{blk}: {f['reason']}" + (f"; converted tensor(s) differing from the mapped source: "
                                           f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}" if wrong else
                                           "; every converted tensor equals the mapped source: the mapping or the "
                                           "MindSpore port computes differently")
    seconds = time.perf_counter() - t_start
    peak = peak_rss.stop()
    notes = [f"blockwise: each block built alone at the real config (torch reference on the meta device + assigned "
             f"source weights; MindSpore without init + load_strict of the converted tensors), seeded inputs "
             f"(--tokens {tokens}: MMDiT image tokens, T5/CLIP sequence length; the autoencoders: a small video "
             f"or image, docs/parity.md); {len(units_done)} block(s) in {seconds:.0f} s, peak RSS {_gb(peak)}"] + notes
    tcfg = th.for_dtype("float32")
    rep = {
        "verdict": "fail" if fails else "pass", "case": f"verify {out.name}", "framework": "mindspore",
        "device": "CPU", "mode": "blockwise", "dtype": "float32", "oracle": False, "verdict_metric": "max_rel",
        "thresholds": {"dtype": "float32", **tcfg, "metric": "max_rel", "weights": "bit-exact",
                       "overrides": th.raw.get("overrides") or []},
        "first_divergence": ({"name": fails[0]["name"], "kind": fails[0]["kind"], "index": rows.index(fails[0]),
                              "max_rel": fails[0].get("max_rel"), "reason": fails[0].get("reason")} if fails else None),
        "tensors": rows,
        "counts": {"compared": len(rows), "fail": len(fails), "warn": sum(r["verdict"] == "warn" for r in rows),
                   "blocks": len(units_done), "weights_checked": sum(d["weights_checked"] for d in units_done),
                   "weights_differ": sum(d["weights_differ"] for d in units_done)},
        "unaligned": unaligned, "unaligned_reasons": reasons, "unaligned_candidate": [],
        "missing_outputs": [], "environment": environment("CPU"), "notes": notes,
        "blockwise": {"out": str(out), "source": src_path, "mapping": mapping.name, "tokens": tokens, "seed": seed,
                      "components": infos, "units": units_done, "seconds": round(seconds, 2), "peak_rss": peak,
                      "first_failure": first},
    }
    paths = write_reports(rep, report_dir) if report_dir is not None else {}
    return Result(rep["verdict"], rep, paths, files_wrong, first, seconds, peak)
