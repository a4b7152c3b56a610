"""The units of `msconv verify --parity` (parity/blockwise.py): per model, its config and its blocks.

A planner is `(config_fn, units_fn)`: `config_fn(recorded_cfg, mapping, kind) -> (cfg, notes)` completes what the
conversion recorded (what no parameter shape tells, from the mapping's real config); `units_fn(cfg, tokens) ->
(units, info)` lists the units in execution order, each a `Unit`: the keys it owns, how to build the torch
reference and the MindSpore block from nothing (meta device / no init; weights come next), its seeded inputs and
how to run each side. docs/parity.md, "Proving a converted checkpoint at full size".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Unit:
    """One piece checked on its own: which keys it owns (by prefix, per side), how to build both sides, how to run."""

    name: str
    prefixes: tuple          # key prefixes (within the component) owned by this unit; () = every key no other owns
    build_torch: Callable    # () -> torch module on the meta device, keys relative to the unit's prefix
    build_ms: Callable       # () -> MindSpore cell built without initialising
    inputs: Callable         # rng -> {name: np.ndarray}, the seeded inputs both sides get
    run_torch: Callable      # (torch module, inputs) -> [(output name, np.ndarray)] (under no_grad)
    run_ms: Callable         # (MindSpore cell, inputs) -> [(output name, np.ndarray)], same names and order
    strip: str = ""          # prefix removed from the MindSpore keys before loading (a block's "double_blocks.3.")
    src_strip: str | None = None  # the same for the source keys (default: `strip`; T5's embedding: "shared.")



# ---------------------------------------------------------------------------------------------- configs
def _manifest_config(mapping) -> dict:
    """The upstream config recorded in the mapping's source manifest (layout flags, RoPE axes), or {}."""
    from converter.mapping import MANIFESTS_DIR

    ref = mapping.source.get("manifest")
    if not ref:
        return {}
    for c in ([Path(mapping.path).parent / ref] if mapping.path else []) + [MANIFESTS_DIR / ref]:
        if c.is_file():
            try:
                d = json.loads(c.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
            return dict(d.get("config") or {})
    return {}


def target_file_config(mapping) -> dict | None:
    ref = mapping.target.get("inventory")
    if not ref or not mapping.path:
        return None
    p = Path(mapping.path).parent / ref
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("config")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------------- shared helpers
def _meta(fn):
    """() -> fn() built on torch's meta device (no memory; the unit's weights are assigned after picking)."""
    def build():
        import torch

        with torch.device("meta"):
            return fn()
    return build


def _noinit(fn):
    def build():
        from mindspore.nn.utils import no_init_parameters

        with no_init_parameters():
            cell = fn()
        cell.set_train(False)
        return cell
    return build


def _pick_torch(root, paths: list[str], strip: str):
    """The module at `strip` (one path) or a container of the modules at `paths` named relative to `strip`."""
    import torch

    if len(paths) == 1 and paths[0] + "." == strip:
        return root.get_submodule(paths[0])
    box = torch.nn.Module()
    for p in paths:
        setattr(box, p[len(strip):], root.get_submodule(p))
    return box


def _pick_ms(root, paths: list[str], strip: str):
    """Like `_pick_torch` for a MindSpore net; the picked Parameters are renamed to their paths relative to the
    result (MindSpore names a Parameter by its path in the net it was built in, and load_strict matches a cell's own
    relative names; the net is thrown away after the unit)."""
    from mindspore import nn as msnn

    def get(path):
        c = root
        for part in path.split("."):
            c = c[int(part)] if part.isdigit() else getattr(c, part)
        return c

    if len(paths) == 1 and paths[0] + "." == strip:
        cell = get(paths[0])
    else:
        cell = msnn.Cell()
        for p in paths:
            setattr(cell, p[len(strip):], get(p))
    for n, prm in cell.parameters_and_names():
        prm.name = n
    cell.set_train(False)
    return cell


def _input_shapes(model, run) -> dict:
    """{module path: shape of its first input} on the first call, from `run(model)` on the meta device."""
    import torch

    shapes: dict = {}

    def grab(name):
        def hook(mod, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the args stay
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _ae_unit(name, paths, strip, shape, troot, mroot, tcall=None, mcall=None) -> Unit:
    """A unit of modules picked from a whole (meta / no-init) autoencoder, on one N(0, 1) input of `shape`;
    `tcall(module, x)` / `mcall(cell, x)` default to calling the module."""
    import mindspore as ms
    import torch

    tcall = tcall or (lambda m, a: m(a))
    mcall = mcall or (lambda m, a: m(a))
    return Unit(name, tuple(p + "." for p in paths), lambda: _pick_torch(troot(), paths, strip),
                lambda: _pick_ms(mroot(), paths, strip),
                lambda rng: {"x": rng.standard_normal(shape, dtype=np.float32)},
                lambda tm, x: [("", tcall(tm, torch.from_numpy(x["x"])).numpy())],
                lambda mc, x: [("", mcall(mc, ms.Tensor(x["x"])).asnumpy())], strip)


def _known_fields(cls):
    def config(cfg: dict, mapping, kind: str | None = None) -> tuple[dict, list[str]]:
        known = set(cls.__dataclass_fields__)
        return {k: v for k, v in cfg.items() if k in known}, []
    return config


# ---------------------------------------------------------------------------------------------- MMDiT
def mmdit_config(cfg: dict, mapping, kind: str | None = None) -> tuple[dict, list[str]]:
    """The reference config: the converted model's sizes, the source layout's flags (fused_qkv, use_liger_rope)
    and RoPE axes from the mapping's upstream manifest (an inferred config cannot know the axes split)."""
    from opensora_ms.configs import MMDiTConfig

    base = _manifest_config(mapping)
    c = {k: v for k, v in cfg.items() if k not in ("type",)}
    notes = []
    for k in ("fused_qkv", "use_liger_rope"):
        if k in base:
            c[k] = base[k]
    head_dim = c["hidden_size"] // c["num_heads"]
    ax = base.get("axes_dim")
    if ax and sum(ax) == head_dim and list(c.get("axes_dim", [])) != list(ax):
        notes.append(f"RoPE axes_dim {list(ax)} and theta {base.get('theta', 10000)} from the upstream manifest "
                     f"(the converted files cannot tell the split of head_dim {head_dim})")
        c["axes_dim"], c["theta"] = list(ax), base.get("theta", c.get("theta", 10000))
    known = set(MMDiTConfig.__dataclass_fields__)
    return {k: v for k, v in c.items() if k in known}, notes


def _ids(n_txt: int, n_img: int, n_axes: int) -> np.ndarray:
    """Position ids (1, L, n_axes), text first: text 0, image tokens on a (t, 16, 16) grid (last axes; one axis:
    the token index)."""
    ids = np.zeros((1, n_txt + n_img, n_axes), np.float32)
    n = np.arange(n_img)
    grid = [n % 16, (n // 16) % 16, n // 256] if n_axes > 1 else [n]
    for a, v in enumerate(grid[:n_axes]):
        ids[0, n_txt:, n_axes - 1 - a] = v
    return ids


def mmdit_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """Units of the MMDiT: embedders, every double and single block, the final layer. Inputs: 1 sample,
    `tokens` image tokens and tokens // 4 text tokens (at least 1), N(0, 1) hidden states at the real width."""
    import mindspore as ms
    import torch
    from mindspore import nn as msnn

    from opensora_ms.models import mmdit as M
    from opensora_ms.ops import nn as onn
    from parity.adapters.mmdit import teacher_adapt
    from parity.reference import mmdit as R

    C = R.MMDiTConfig.from_dict(cfg)
    h, heads, ratio = C.hidden_size, C.num_heads, C.mlp_ratio
    n_img, n_txt = tokens, max(1, tokens // 4)
    ids = _ids(n_txt, n_img, len(C.axes_dim))
    emb_cls = R.LigerEmbedND if C.use_liger_rope else R.EmbedND
    with torch.no_grad():
        pe = emb_cls(h // heads, C.theta, C.axes_dim)(torch.from_numpy(ids))
    pe_ms = tuple(ms.Tensor(p.numpy()) for p in pe) if isinstance(pe, tuple) else ms.Tensor(pe.numpy())
    f32 = np.float32
    T = torch.from_numpy
    W = ms.Tensor

    def normal(rng, *shape):
        return rng.standard_normal(shape, dtype=f32)

    # double / single blocks and the final layer: one output each (a double block's (txt, img), text first)
    def in_double(rng):
        return {"img": normal(rng, 1, n_img, h), "txt": normal(rng, 1, n_txt, h), "vec": normal(rng, 1, h)}

    def torch_double(tm, x):
        ti, tt = tm(T(x["img"]), T(x["txt"]), T(x["vec"]), pe)
        return [("", torch.cat((tt, ti), 1).numpy())]

    def ms_double(mc, x):
        args, _ = teacher_adapt("double_blocks.", (W(x["img"]), W(x["txt"]), W(x["vec"]), pe_ms), {})
        mi, mt = mc(*args)
        return [("", np.concatenate([mt.asnumpy(), mi.asnumpy()], 1))]

    def in_single(rng):
        return {"x": normal(rng, 1, n_txt + n_img, h), "vec": normal(rng, 1, h)}

    def torch_single(tm, x):
        return [("", tm(T(x["x"]), T(x["vec"]), pe).numpy())]

    def ms_single(mc, x):
        args, _ = teacher_adapt("single_blocks.", (W(x["x"]), W(x["vec"]), pe_ms), {})
        return [("", mc(*args).asnumpy())]

    def in_final(rng):
        return {"x": normal(rng, 1, n_img, h), "vec": normal(rng, 1, h)}

    def torch_final(tm, x):
        return [("", tm(T(x["x"]), T(x["vec"])).numpy())]

    def ms_final(mc, x):
        return [("", mc(W(x["x"]), W(x["vec"])).asnumpy())]

    # embedders: each top-level input layer on its own seeded input (plus the RoPE table, liger layout)
    class TorchTop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img_in = torch.nn.Linear(C.in_channels, h)
            self.time_in = R.MLPEmbedder(256, h)
            self.vector_in = R.MLPEmbedder(C.vec_in_dim, h)
            if C.guidance_embed:
                self.guidance_in = R.MLPEmbedder(256, h)
            if C.cond_embed:
                self.cond_in = torch.nn.Linear(C.in_channels + C.patch_size ** 2, h)
            self.txt_in = torch.nn.Linear(C.context_in_dim, h)

    class MsTop(msnn.Cell):
        def __init__(self):
            super().__init__()
            self.img_in = onn.Linear(C.in_channels, h)
            self.time_in = M.MLPEmbedder(256, h)
            self.vector_in = M.MLPEmbedder(C.vec_in_dim, h)
            if C.guidance_embed:
                self.guidance_in = M.MLPEmbedder(256, h)
            if C.cond_embed:
                self.cond_in = onn.Linear(C.in_channels + C.patch_size ** 2, h)
            self.txt_in = onn.Linear(C.context_in_dim, h)

    def in_top(rng):
        x = {"img_in": normal(rng, 1, n_img, C.in_channels)}
        if C.cond_embed:
            x["cond_in"] = normal(rng, 1, n_img, C.in_channels + C.patch_size ** 2)
        x["time_in"] = rng.uniform(0.05, 1.0, (1,)).astype(f32)
        if C.guidance_embed:
            x["guidance_in"] = rng.uniform(1.0, 5.0, (1,)).astype(f32)
        x["vector_in"] = normal(rng, 1, C.vec_in_dim)
        x["txt_in"] = normal(rng, 1, n_txt, C.context_in_dim)
        return x

    def torch_top(tm, x):
        out = []
        for name, v in x.items():  # time_in / guidance_in take the sinusoidal embedding of t
            arg = R.timestep_embedding(T(v), 256) if name in ("time_in", "guidance_in") else T(v)
            out.append((name, getattr(tm, name)(arg).numpy()))
        if C.use_liger_rope:
            out.append(("pe_embedder", np.stack([p.numpy() for p in pe])))
        return out

    def ms_top(mc, x):
        out = []
        for name, v in x.items():
            arg = M.timestep_embedding(W(v)) if name in ("time_in", "guidance_in") else W(v)
            out.append((name, getattr(mc, name)(arg).asnumpy()))
        if C.use_liger_rope:  # the port's table equals liger's (cos, sin); Flux's 6-D table has no counterpart
            cos, sin = onn.rope_cos_sin(W(ids), tuple(C.axes_dim), C.theta)
            out.append(("pe_embedder", np.stack([cos.asnumpy(), sin.asnumpy()])))
        return out

    units = [Unit("embedders", (), _meta(TorchTop), _noinit(MsTop), in_top, torch_top, ms_top)]
    for i in range(C.depth):
        units.append(Unit(
            f"double_blocks.{i}", (f"double_blocks.{i}.",),
            _meta(lambda: R.DoubleStreamBlock(h, heads, ratio, qkv_bias=C.qkv_bias, fused_qkv=C.fused_qkv)),
            _noinit(lambda: M.DoubleStreamBlock(h, heads, ratio, C.qkv_bias)), in_double, torch_double, ms_double,
            f"double_blocks.{i}."))
    for i in range(C.depth_single_blocks):
        units.append(Unit(
            f"single_blocks.{i}", (f"single_blocks.{i}.",),
            _meta(lambda: R.SingleStreamBlock(h, heads, ratio, fused_qkv=C.fused_qkv)),
            _noinit(lambda: M.SingleStreamBlock(h, heads, ratio)), in_single, torch_single, ms_single,
            f"single_blocks.{i}."))
    units.append(Unit("final_layer", ("final_layer.",), _meta(lambda: R.LastLayer(h, 1, C.in_channels)),
                      _noinit(lambda: M.LastLayer(h, C.in_channels)), in_final, torch_final, ms_final, "final_layer."))
    info = {"tokens": {"image": n_img, "text": n_txt}}
    info["unaligned"] = {} if C.use_liger_rope else {
        "pe_embedder": "Flux's interleaved (B, 1, L, D/2, 2, 2) table has no rotate-half counterpart; every block "
                       "gets it converted (parity.adapters.mmdit.teacher_adapt)"}
    return units, info


# ---------------------------------------------------------------------------------------------- autoencoders
VAE_INPUT = (1, 9, 64, 64)       # Hunyuan VAE: (batch, frames, height, width) the units' inputs are sized from
DC_AE_INPUT = (1, 8, 64, 64)     # video DC-AE: 8 frames -> 2 latent frames, 64 px -> 2 latent px
FLUX_AE_INPUT = (1, 64, 64)      # Flux 2D AE: one image (upstream runs it frame by frame)


def vae_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """Hunyuan causal VAE: encoder conv_in, each down block, mid block (under its frame-causal mask), norm + SiLU
    + conv_out, quant_conv; post_quant_conv, then the decoder likewise -- each on the shape it sees when a
    1 x 3 x 9 x 64 x 64 video is encoded and its latent decoded. `tokens` does not apply."""
    import torch

    from opensora_ms.models import hunyuan_vae as M
    from parity.reference import hunyuan_vae as R

    C = R.AutoEncoder3DConfig.from_dict(cfg)
    b, t, hh, ww = VAE_INPUT
    troot, mroot = _meta(lambda: R.AutoencoderKLCausal3D(C)), _noinit(lambda: M.AutoencoderKLCausal3D(C))
    lat = {}

    def run(m):
        x = torch.empty(b, C.in_channels, t, hh, ww, device="meta")
        lat["z"] = m.quant_conv(m.encoder(x))[:, :C.latent_channels]
        m.decoder(m.post_quant_conv(lat["z"]))

    shapes = _input_shapes(troot(), run)

    def mask_for(x):
        _, _, f, h, w = x.shape
        return R.prepare_causal_attention_mask(f, h * w, x.dtype, batch_size=x.shape[0])

    def head(m, a):
        return m.conv_out(m.conv_act(m.conv_norm_out(a)))

    def unit(path, tcall=None, mcall=None):
        return _ae_unit(path, [path], path + ".", shapes[path], troot, mroot, tcall, mcall)

    units = []
    for side, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        mid = unit(f"{side}.mid_block", lambda m, a: m(a, mask_for(a) if m.add_attention else None))
        level = [unit(f"{side}.{blocks}.{i}") for i in range(len(C.block_out_channels))]
        out = _ae_unit(f"{side}.conv_out", [f"{side}.conv_norm_out", f"{side}.conv_act", f"{side}.conv_out"],
                       f"{side}.", shapes[f"{side}.conv_norm_out"], troot, mroot, head, head)
        if side == "encoder":
            units += [unit("encoder.conv_in")] + level + [mid, out, unit("quant_conv")]
        else:
            units += [unit("post_quant_conv"), unit("decoder.conv_in"), mid] + level + [out]
    return units, {"input": {"video": [b, C.in_channels, t, hh, ww], "latent": list(lat["z"].shape)}, "unaligned": {}}


def dc_ae_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """Video DC-AE: encoder project_in, every non-empty stage, project_out; then the decoder's (stages deepest
    first) -- each on the shape it sees for a 1 x 3 x 8 x 64 x 64 video. `tokens` does not apply."""
    import torch

    from opensora_ms.models import dc_ae as M
    from parity.reference import dc_ae as R

    C = R.DCAEConfig.from_dict(cfg)
    b, t, hh, ww = DC_AE_INPUT
    troot, mroot = _meta(lambda: R.DCAE(C)), _noinit(lambda: M.DCAE(C))
    lat, meta = {}, troot()

    def run(m):
        lat["z"] = m.encoder(torch.empty(b, C.in_channels, t, hh, ww, device="meta"))
        m.decoder(lat["z"])

    shapes = _input_shapes(meta, run)
    units = []
    for side in ("encoder", "decoder"):
        stages = [i for i, st in enumerate(getattr(meta, side).stages) if len(st.op_list)]
        paths = [f"{side}.project_in"] + [f"{side}.stages.{i}" for i in (stages if side == "encoder" else stages[::-1])]
        units += [_ae_unit(p, [p], p + ".", shapes[p], troot, mroot) for p in paths + [f"{side}.project_out"]]
    return units, {"input": {"video": [b, C.in_channels, t, hh, ww], "latent": list(lat["z"].shape)}, "unaligned": {}}


def flux_ae_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """Flux 2D AE: encoder conv_in, each `down.{i}` level (its resnets, then its downsample), `mid` (block_1,
    attn_1, block_2), norm_out + SiLU + conv_out; the decoder likewise (`up.{i}` in execution order) -- each on the
    shape it sees for a 1 x 3 x 64 x 64 image. `tokens` does not apply."""
    import torch
    import torch.nn.functional as F

    from opensora_ms.models import flux_ae as M
    from opensora_ms.ops.nn import silu
    from parity.reference import flux_ae as R

    C = R.AutoEncoderConfig.from_dict(cfg)
    b, hh, ww = FLUX_AE_INPUT
    troot, mroot = _meta(lambda: R.AutoEncoder(C)), _noinit(lambda: M.AutoEncoder(C))
    lat = {}

    def run(m):
        lat["z"] = m.encoder(torch.empty(b, C.in_channels, hh, ww, device="meta"))[:, :C.z_channels]
        m.decoder(lat["z"])

    shapes = _input_shapes(troot(), run)

    def level(m, h, resample):
        for blk in m.block:
            h = blk(h)
        return getattr(m, resample)(h) if hasattr(m, resample) else h

    def mid(m, h):
        return m.block_2(m.attn_1(m.block_1(h)))

    n = len(C.ch_mult)
    units = []
    for side, lv, resample, order in (("encoder", "down", "downsample", range(n)),
                                      ("decoder", "up", "upsample", reversed(range(n)))):
        u_in = _ae_unit(f"{side}.conv_in", [f"{side}.conv_in"], f"{side}.conv_in.", shapes[f"{side}.conv_in"],
                        troot, mroot)
        u_mid = _ae_unit(f"{side}.mid", [f"{side}.mid"], f"{side}.mid.", shapes[f"{side}.mid.block_1"], troot, mroot,
                         mid, mid)
        levels = [_ae_unit(f"{side}.{lv}.{i}", [f"{side}.{lv}.{i}"], f"{side}.{lv}.{i}.",
                           shapes[f"{side}.{lv}.{i}.block.0"], troot, mroot,
                           lambda m, a, r=resample: level(m, a, r), lambda m, a, r=resample: level(m, a, r))
                  for i in order]
        u_out = _ae_unit(f"{side}.conv_out", [f"{side}.norm_out", f"{side}.conv_out"], f"{side}.",
                         shapes[f"{side}.norm_out"], troot, mroot,
                         lambda m, a: m.conv_out(F.silu(m.norm_out(a))), lambda m, a: m.conv_out(silu(m.norm_out(a))))
        units += [u_in] + (levels + [u_mid] if side == "encoder" else [u_mid] + levels) + [u_out]
    return units, {"input": {"image": [b, C.in_channels, hh, ww], "latent": list(lat["z"].shape)}, "unaligned": {}}


# ---------------------------------------------------------------------------------------------- T5 / CLIP text encoders
# fields no parameter shape tells (an inferred config guesses them): taken from the mapping's real config when the
# converted model has its width
_GUESSED = {"clip": ("hidden_size", ("num_attention_heads", "hidden_act", "layer_norm_eps", "eos_token_id")),
            "t5": ("d_model", ("layer_norm_epsilon", "relative_attention_max_distance", "feed_forward_proj"))}


def text_config(cfg: dict, mapping, kind: str | None = None) -> tuple[dict, list[str]]:
    c = {k: v for k, v in cfg.items() if k not in ("model", "note")}
    model = mapping.target.get("model")
    real = target_file_config(mapping) or {}
    notes = []
    if kind == "inferred" and model in _GUESSED:
        width, fields = _GUESSED[model]
        if real.get(width) == c.get(width):
            took = {k: real[k] for k in fields if k in real and c.get(k) != real[k]}
            c.update({k: real[k] for k in fields if k in real})
            if took:
                notes.append(f"{', '.join(f'{k}={v}' for k, v in took.items())} from the real config "
                             "(no parameter shape tells them)")
    return c, notes


def t5_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """T5 encoder, layer by layer: the token embedding, every `encoder.block.{i}` (block 0 computes the relative
    position bias from its own table; later blocks get a seeded N(0, 1) bias, as they would get block 0's), the
    final RMS norm. Reference: transformers' `T5EncoderModel` (eager). `tokens` = sequence length."""
    import mindspore as ms
    import torch
    import transformers

    from opensora_ms.models import t5 as M
    from parity.adapters.t5 import hf_config

    hc = hf_config(cfg)
    n, d, heads = tokens, hc.d_model, hc.num_heads
    troot = _meta(lambda: transformers.T5EncoderModel(hc))
    mroot = _noinit(lambda: M.build(cfg))

    def unit(name, tpath, mpath, inputs, tcall, mcall):
        return Unit(name, (mpath + ".",), lambda: _pick_torch(troot(), [tpath], tpath + "."),
                    lambda: _pick_ms(mroot(), [mpath], mpath + "."), inputs,
                    lambda tm, x: [("", tcall(tm, x).numpy())], lambda mc, x: [("", mcall(mc, x).asnumpy())],
                    mpath + ".", tpath + ".")

    def ids(rng):
        return {"ids": rng.integers(0, hc.vocab_size, (1, n))}

    def hidden(first):
        def inputs(rng):
            x = {"h": rng.standard_normal((1, n, d), dtype=np.float32)}
            if not first:
                x["bias"] = rng.standard_normal((1, heads, n, n), dtype=np.float32)
            return x
        return inputs

    def tblock(m, x):
        return m(torch.from_numpy(x["h"]), None, torch.from_numpy(x["bias"]) if "bias" in x else None)[0]

    def mblock(m, x):
        return m(ms.Tensor(x["h"]), None, ms.Tensor(x["bias"]) if "bias" in x else None)[0]

    units = [unit("encoder.embed_tokens", "shared", "encoder.embed_tokens", ids,
                  lambda m, x: m(torch.from_numpy(x["ids"]).long()),
                  lambda m, x: m(ms.Tensor(x["ids"].astype(np.int32))))]
    for i in range(hc.num_layers):
        p = f"encoder.block.{i}"
        units.append(unit(p, p, p, hidden(i == 0), tblock, mblock))
    units.append(unit("encoder.final_layer_norm", "encoder.final_layer_norm", "encoder.final_layer_norm",
                      hidden(True), lambda m, x: m(torch.from_numpy(x["h"])), lambda m, x: m(ms.Tensor(x["h"]))))
    return units, {"tokens": n, "unaligned": {}}


def clip_units(cfg: dict, tokens: int) -> tuple[list[Unit], dict]:
    """CLIP text model, layer by layer: the embeddings (token + position), every `encoder.layers.{i}` under the
    causal mask (transformers' additive finfo.min above the diagonal), the final LayerNorm. Reference: transformers'
    `CLIPTextModel` (eager). Sequence length min(`tokens`, max_position_embeddings)."""
    import mindspore as ms
    import torch
    import transformers

    from opensora_ms.models import clip as M
    from parity.adapters.clip import hf_config

    hc = hf_config(cfg)
    n, d = min(tokens, hc.max_position_embeddings), hc.hidden_size
    mask = np.triu(np.full((n, n), np.finfo(np.float32).min, np.float32), 1).reshape(1, 1, n, n)
    troot = _meta(lambda: transformers.CLIPTextModel(hc))
    mroot = _noinit(lambda: M.build(cfg))

    def pick_torch(path):
        def build():
            m = _pick_torch(troot(), [path], path + ".")
            if path == "embeddings":  # a non-persistent buffer: the meta build leaves it unset
                m.register_buffer("position_ids", torch.arange(hc.max_position_embeddings).expand((1, -1)),
                                  persistent=False)
            return m
        return build

    def unit(path, inputs, tcall, mcall):
        return Unit(path, (path + ".",), pick_torch(path), lambda: _pick_ms(mroot(), [path], path + "."), inputs,
                    lambda tm, x: [("", tcall(tm, x).numpy())], lambda mc, x: [("", mcall(mc, x).asnumpy())],
                    path + ".")

    def hidden(rng):
        return {"h": rng.standard_normal((1, n, d), dtype=np.float32)}

    units = [unit("embeddings", lambda rng: {"ids": rng.integers(0, hc.vocab_size, (1, n))},
                  lambda m, x: m(input_ids=torch.from_numpy(x["ids"]).long()),
                  lambda m, x: m(ms.Tensor(x["ids"].astype(np.int32))))]
    for i in range(hc.num_hidden_layers):
        units.append(unit(f"encoder.layers.{i}", hidden,
                          lambda m, x: m(torch.from_numpy(x["h"]), torch.from_numpy(mask)),
                          lambda m, x: m(ms.Tensor(x["h"]), ms.Tensor(mask))))
    units.append(unit("final_layer_norm", hidden, lambda m, x: m(torch.from_numpy(x["h"])),
                      lambda m, x: m(ms.Tensor(x["h"]))))
    return units, {"tokens": n, "unaligned": {}}


# ---------------------------------------------------------------------------------------------- planners
def planners() -> dict:
    """converter.targets model name -> (config_fn, units_fn)."""
    from opensora_ms.configs import AutoEncoder3DConfig, AutoEncoderConfig, DCAEConfig

    return {"mmdit": (mmdit_config, mmdit_units), "t5": (text_config, t5_units), "clip": (text_config, clip_units),
            "hunyuan_vae": (_known_fields(AutoEncoder3DConfig), vae_units),
            "dc_ae": (_known_fields(DCAEConfig), dc_ae_units),
            "flux_ae": (_known_fields(AutoEncoderConfig), flux_ae_units)}


COVERED = ("mmdit", "hunyuan_vae", "dc_ae", "flux_ae", "t5", "clip")
