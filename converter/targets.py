"""The MindSpore parameter inventory a conversion must produce (docs/mappings.md, "Target inventory").

Every conversion is checked against the inventory of the model the checkpoint implies:

* the **shipped** inventory (`mappings/targets/<mapping>.json`) when the source has exactly the keys and shapes of
  the mapping's source manifest (the real checkpoint);
* otherwise the model's inventory at a **config**: given (`--config FILE.json`) or **inferred** from the shapes and
  block counts of what the mapping produces (MindSpore names, so one inference per model serves every layout);
  the inventory comes from the model's own `param_inventory(cfg)`, which builds no weight;
* a model without an entry in `MODELS` has no inventory: the conversion fails unless `--allow-partial`.

A model plugs in with one entry in `MODELS`: `param_inventory` ("module:function", cfg dict -> {name: (shape,
dtype)} without allocating) and `infer_config` (a function or "module:function", {MindSpore name: (shape, dtype)}
-> cfg dict; raise `MappingError` naming the key it cannot read).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import FormatError, MappingError, UserError, show
from .inventory import load_inventory


# -- config inference (MindSpore parameter names) ----------------------------------------------------------
def _shape(inv: dict, key: str, model: str) -> tuple:
    if key not in inv:
        raise MappingError(f"cannot infer the {model} config from the checkpoint: {key!r} is absent "
                           "(pass --config FILE.json, or --allow-partial)")
    return tuple(inv[key][0])


def _count(inv: dict, prefix: str) -> int:
    """1 + the largest N of `<prefix>.N.*` keys (0 if there is none): a gap shows up as missing keys later."""
    rx = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    nums = [int(m.group(1)) for k in inv for m in [rx.match(k)] if m]
    return max(nums) + 1 if nums else 0


def infer_mmdit_config(inv: dict) -> dict:
    """MMDiTConfig of `opensora_ms.models.mmdit` from its parameter shapes. RoPE (axes_dim, theta) has no
    parameters: axes_dim is [head_dim] (any split summing to head_dim gives the same inventory)."""
    m = "mmdit"
    hidden, in_ch = _shape(inv, "img_in.weight", m)
    depth, single = _count(inv, "double_blocks"), _count(inv, "single_blocks")
    if depth:
        head_dim = _shape(inv, "double_blocks.0.img_attn.norm.query_norm.scale", m)[0]
        mlp_hidden = _shape(inv, "double_blocks.0.img_mlp.0.weight", m)[0]
    elif single:
        head_dim = _shape(inv, "single_blocks.0.norm.query_norm.scale", m)[0]
        mlp_hidden = _shape(inv, "single_blocks.0.linear2.weight", m)[1] - hidden
    else:
        head_dim, mlp_hidden = hidden, 4 * hidden
    if not head_dim or hidden % head_dim:
        raise MappingError(f"cannot infer the mmdit config: hidden size {hidden} is not a multiple of the QK-norm "
                           f"size {head_dim} (head_dim)")
    patch = 2
    if "cond_in.weight" in inv:
        p2 = inv["cond_in.weight"][0][1] - in_ch
        patch = math.isqrt(max(p2, 0))
        if patch * patch != p2 or patch == 0:
            raise MappingError(f"cannot infer the mmdit config: cond_in.weight {list(inv['cond_in.weight'][0])} is not "
                               f"[hidden, in_channels + patch_size**2] with in_channels {in_ch}")
    return {"in_channels": in_ch, "vec_in_dim": _shape(inv, "vector_in.in_layer.weight", m)[1],
            "context_in_dim": _shape(inv, "txt_in.weight", m)[1], "hidden_size": hidden,
            "mlp_ratio": mlp_hidden / hidden, "num_heads": hidden // head_dim, "depth": depth,
            "depth_single_blocks": single, "axes_dim": [head_dim], "theta": 10000,
            "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in inv or not depth,
            "guidance_embed": any(k.startswith("guidance_in.") for k in inv),
            "cond_embed": any(k.startswith("cond_in.") for k in inv), "patch_size": patch}


def infer_hunyuan_vae_config(inv: dict) -> dict:
    """AutoEncoder3DConfig of `opensora_ms.models.hunyuan_vae` from its parameter shapes. The compression ratios
    only decide which blocks hold a down/up-sampler; the first (time, space) pair giving the source's pattern is
    used (upstream's 4, 8 first)."""
    from opensora_ms.configs import sampling_plan  # framework-free

    m = "hunyuan_vae"
    n = _count(inv, "encoder.down_blocks")
    if not n:
        raise MappingError("cannot infer the hunyuan_vae config from the checkpoint: no 'encoder.down_blocks.N.*' key "
                           "(pass --config FILE.json, or --allow-partial)")
    ch = [_shape(inv, f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight", m)[0] for i in range(n)]
    layers = _count(inv, "encoder.down_blocks.0.resnets")
    has = [any(k.startswith(f"encoder.down_blocks.{i}.downsamplers.") for k in inv) for i in range(n)]
    ratios = None
    for t in (4, 8):
        for s in (8, 16, 4, 2, 32, 1):
            try:
                plan = sampling_plan(n, t, s)
            except ValueError:
                continue
            if [a or b for a, b in plan] == has:
                ratios = (t, s)
                break
        if ratios:
            break
    if ratios is None:
        raise MappingError(f"cannot infer the hunyuan_vae config: down-samplers in blocks {[i for i, h in enumerate(has) if h]} "
                           f"of {n} fit no (time, spatial) compression ratio; pass --config FILE.json")
    return {"in_channels": _shape(inv, "encoder.conv_in.conv.weight", m)[1],
            "out_channels": _shape(inv, "decoder.conv_out.conv.weight", m)[0],
            "latent_channels": _shape(inv, "decoder.conv_in.conv.weight", m)[1],
            "layers_per_block": layers, "block_out_channels": ch,
            "time_compression_ratio": ratios[0], "spatial_compression_ratio": ratios[1],
            "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in inv)}


# -- the registry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEntry:
    """How to get a model's parameter inventory at a config without allocating (see the module docstring)."""

    param_inventory: str | Callable  # "module:function": cfg dict -> {name: (shape, dtype)}
    infer_config: str | Callable     # {name: (shape, dtype)} -> cfg dict
    config_name: str | None = None   # the config's key in a case file (`{"MMDiTConfig": {...}}`), for --config


MODELS: dict[str, ModelEntry] = {
    "mmdit": ModelEntry("opensora_ms.models.mmdit:param_inventory", infer_mmdit_config, "MMDiTConfig"),
    "hunyuan_vae": ModelEntry("opensora_ms.models.hunyuan_vae:param_inventory", infer_hunyuan_vae_config,
                              "AutoEncoder3DConfig"),
    "dc_ae": ModelEntry("opensora_ms.models.dc_ae:param_inventory", "opensora_ms.models.dc_ae:infer_config",
                        "DCAEConfig"),
    "flux_ae": ModelEntry("opensora_ms.models.flux_ae:param_inventory", "opensora_ms.models.flux_ae:infer_config",
                          "AutoEncoderConfig"),
    "t5": ModelEntry("opensora_ms.models.t5:param_inventory", "opensora_ms.models.t5:infer_config", "T5Config"),
    "clip": ModelEntry("opensora_ms.models.clip:param_inventory", "opensora_ms.models.clip:infer_config",
                       "CLIPTextConfig"),
}


def _resolve(fn):
    if callable(fn):
        return fn
    mod, _, name = fn.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except ImportError as e:
        raise MappingError(f"cannot import {mod} to build the parameter inventory ({e}); install it, or pass "
                           "--target-inventory FILE.json / --allow-partial") from None


# Config fields that repeat blocks (ints, or lists of ints for per-stage depths): a parameter inventory is
# affine in each of them, so its size at a huge count is extrapolated from counts 1 and 2 instead of enumerated.
COUNT_FIELDS = ("depth", "depth_single_blocks", "num_layers", "num_hidden_layers", "layers_per_block",
                "num_res_blocks", "depth_list")
MAX_TENSORS = 200_000  # real models have ~100-2000 parameter tensors
CONFIG_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                 RuntimeError, RecursionError)


def _counts(cfg, path=()):
    """(path, value) of every count field of a (nested) config dict (see COUNT_FIELDS)."""
    if not isinstance(cfg, dict):
        return
    for k, v in cfg.items():
        if k in COUNT_FIELDS and isinstance(v, int) and not isinstance(v, bool):
            yield path + (k,), v
        elif k in COUNT_FIELDS and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, int) and not isinstance(x, bool):
                    yield path + (k, i), x
        elif isinstance(v, dict):
            yield from _counts(v, path + (k,))


def _with(cfg, path, value):
    """A copy of the nested config `cfg` with the field at `path` set to `value`."""
    cfg = dict(cfg) if isinstance(cfg, dict) else list(cfg)
    if len(path) == 1:
        cfg[path[0]] = value
    else:
        cfg[path[0]] = _with(cfg[path[0]], path[1:], value)
    return cfg


def inventory_size(fn, config: dict, big: int = 64) -> tuple[int, int]:
    """(number of tensors, number of parameters) of the inventory `fn(config)` without enumerating huge block
    counts: every count field above `big` is set to 1 and 2 and the size extrapolated (exact: inventories are
    affine in each count). Raises what `fn` raises for a bad config."""
    def size(c):
        inv = fn(c)
        return len(inv), sum(math.prod(int(x) for x in s) for s, _ in inv.values())

    huge = [(p, v) for p, v in _counts(config) if v > big]
    if not huge:
        return size(config)
    base = config
    for p, _ in huge:
        base = _with(base, p, 1)
    n0, p0 = size(base)
    n, params = n0, p0
    for p, v in huge:
        n2, p2 = size(_with(base, p, 2))
        n, params = n + (n2 - n0) * (v - 1), params + (p2 - p0) * (v - 1)
    return n, params


def model_inventory(model: str, config: dict) -> dict:
    """{name: (shape, dtype)} of `model` at `config` (nothing allocated); UserError naming a bad config field."""
    entry = MODELS.get(model)
    if entry is None:
        raise MappingError(no_inventory_message(model))
    if not isinstance(config, dict):
        raise MappingError(f"a {model} config is a JSON object of fields, got {type(config).__name__}")
    try:
        fn = _resolve(entry.param_inventory)
        n, _ = inventory_size(fn, dict(config))
        if n > MAX_TENSORS:
            counts = ", ".join(f"{'.'.join(map(str, p))}={v}" for p, v in _counts(config) if v > 64)
            raise MappingError(f"the {model} config describes about {n} parameter tensors ({counts}); no checkpoint "
                               f"has that many (limit {MAX_TENSORS}): check the config")
        inv = fn(dict(config))
    except UserError:
        raise
    except CONFIG_ERRORS as e:
        raise MappingError(f"cannot build the {model} parameter inventory at config {_short(config)}: "
                           f"{e.__class__.__name__}: {str(e)[:300]}") from None
    return {k: (tuple(int(x) for x in s), d) for k, (s, d) in inv.items()}


def no_inventory_message(model: str | None) -> str:
    what = f"model {model!r}" if model else "this mapping (its yaml names no target.model)"
    return (f"no inventory for {what} (known: {', '.join(sorted(MODELS))}): add it to converter.targets.MODELS, "
            "pass --target-inventory FILE.json, or use --allow-partial")


def _short(cfg: dict) -> str:
    try:
        s = json.dumps(cfg, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        s = show(cfg, 200)
    return s if len(s) < 200 else s[:197] + "..."


def read_config(path, model: str) -> dict:
    """A config for `--config`: a bare config object, a case config (`{"MMDiTConfig": {...}, ...}`) or an
    inventory/manifest file's `config`."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise FormatError(f"{p}: is a directory, expected a config JSON file")
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{p}: no such config file") from None
    except OSError as e:
        raise FormatError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8, nesting too deep
        raise FormatError(f"{p}: not valid JSON ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{p}: a config file is a JSON object")
    name = MODELS[model].config_name if model in MODELS else None
    if name and isinstance(d.get(name), dict):
        return dict(d[name])
    if isinstance(d.get("config"), dict) and "tensors" in d:
        return dict(d["config"])
    return d


# -- choosing and recording the expected inventory ---------------------------------------------------------
@dataclass
class Target:
    """The expected target inventory of one conversion and how it was obtained (recorded in the manifest)."""

    inventory: dict | None
    kind: str            # shipped | inferred | config | file | none
    description: str
    parts: list = field(default_factory=list)  # [{"prefix", "model", "config"}] for inferred / config
    file: str | None = None
    reason: str | None = None  # why there is none

    def record(self) -> dict:
        d = {"kind": self.kind, "description": self.description}
        if self.parts:
            d["parts"] = self.parts
        if self.file:
            d["file"] = self.file
        if self.reason:
            d["reason"] = self.reason
        return d


def _same_keys_and_shapes(a: dict | None, b: dict) -> bool:
    return a is not None and {k: tuple(s) for k, (s, _) in a.items()} == {k: tuple(s) for k, (s, _) in b.items()}


def _model_parts(mapping, produced: dict, config: dict | None, tp: str = "") -> tuple[dict, list]:
    """The expected inventory of `mapping` at the config of what it produced (or `config`): one model per
    mapping, or the prefixed union of the included mappings' for a mapping without target.model."""
    model = mapping.target.get("model")
    if model is None and mapping.includes:
        if config is not None:
            raise UserError(f"--config describes one model; mapping {mapping.name} includes "
                            f"{', '.join(s.name for s, _, _ in mapping.includes)} (their configs are inferred)")
        inv, parts = {}, []
        for sub, _sp, sub_tp in mapping.includes:
            pre = tp + sub_tp
            mine = {k[len(sub_tp):]: v for k, v in produced.items() if k.startswith(sub_tp)}
            sub_inv, sub_parts = _model_parts(sub, mine, None, pre)
            inv.update({sub_tp + k: v for k, v in sub_inv.items()})
            parts += sub_parts
        return inv, parts
    if model not in MODELS:
        raise MappingError(no_inventory_message(model))
    if config is not None:
        cfg = config
    else:
        try:
            cfg = _resolve(MODELS[model].infer_config)(produced)
        except CONFIG_ERRORS as e:   # a tensor of an unexpected rank/shape: the checkpoint's fault, named
            raise MappingError(f"cannot infer the {model} config from the checkpoint ({type(e).__name__}: {e}); "
                               "pass --config FILE.json, or --allow-partial") from None
    return model_inventory(model, cfg), [{"prefix": tp, "model": model, "config": cfg}]


def expected_target(mapping, src_inv: dict, spec="auto", config_path=None, structural=None) -> Target:
    """The inventory a conversion of `src_inv` with `mapping` must produce.

    `spec`: "auto" (shipped / inferred, see the module docstring), "none" (no inventory), or a JSON path.
    `config_path`: a model config file (`--config`), used instead of inferring. `structural`: a function
    returning the plan's produced inventory without a target (called only when a config is inferred).
    Raises MappingError when no inventory can be had (the caller decides whether --allow-partial accepts it)."""
    if spec in (None, "none"):
        return Target(None, "none", "none (--target-inventory none)", reason="--target-inventory none")
    if spec != "auto":
        return Target(load_inventory(spec), "file", os.fspath(spec), file=os.path.abspath(os.fspath(spec)))
    model = mapping.target.get("model")
    if config_path is not None:
        if model is None:
            _model_parts(mapping, {}, {}, "")  # raises the right message
        cfg = read_config(config_path, model)
        inv, parts = _model_parts(mapping, {}, cfg)
        return Target(inv, "config", f"{model} at the config of {os.fspath(config_path)}", parts)
    shipped = mapping.target_inventory()
    if shipped is not None and _same_keys_and_shapes(mapping.source_manifest(), src_inv):
        return Target(shipped, "shipped", f"{mapping.name} target inventory (the real checkpoint)")
    produced = structural() if structural is not None else mapping.plan(src_inv).inventory()
    inv, parts = _model_parts(mapping, produced, None)
    desc = "; ".join(f"{p['model']}{' (keys ' + p['prefix'] + '*)' if p['prefix'] else ''} at the config inferred "
                     f"from the checkpoint ({_brief(p['config'])})" for p in parts)
    return Target(inv, "inferred", desc, parts)


def _brief(cfg: dict) -> str:
    keys = [k for k in ("hidden_size", "depth", "depth_single_blocks", "in_channels", "block_out_channels",
                        "layers_per_block") if k in cfg]
    return ", ".join(f"{k}={cfg[k]}" for k in keys) or _short(cfg)


def recorded_inventory(record: dict, mapping_name: str | None, mapping_path: str | None = None) -> dict | None:
    """Rebuild the expected inventory from a manifest's `target` record (for `msconv verify`); None for "none"."""
    kind = record.get("kind")
    if kind == "none":
        return None
    if kind == "shipped":
        from .mapping import load_mapping

        ref = mapping_path if mapping_path and os.path.isfile(mapping_path) else mapping_name
        inv = load_mapping(ref).target_inventory()
        if inv is None:
            raise MappingError(f"mapping {mapping_name}: its target inventory file is gone")
        return inv
    if kind == "file":
        return load_inventory(record["file"])
    if kind in ("inferred", "config"):
        inv = {}
        for p in record.get("parts", []):
            inv.update({p["prefix"] + k: v for k, v in model_inventory(p["model"], p["config"]).items()})
        return inv
    raise FormatError(f"unknown target inventory kind {kind!r} in the manifest")
