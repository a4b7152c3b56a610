"""CLIP text model (transformers' `CLIPTextModel`) in MindSpore: upstream's pooled text encoder
(openai/clip-vit-large-patch14, text tower).

Cell paths and parameter names are transformers 5's `CLIPTextModel` (`embeddings.token_embedding.weight`,
`encoder.layers.{i}.self_attn.q_proj.weight`, `final_layer_norm.weight`); full CLIP checkpoints prefix them with
`text_model.` and carry the vision tower and projections, which `mappings/clip_text.yaml` strips / drops.

Numerics follow transformers: causal additive mask, scores scaled by head_dim^-0.5, softmax in fp32 cast back,
quick-GELU (`hidden_act`), LayerNorm statistics in fp32. Pooling: with the legacy `eos_token_id == 2` (the openai
hub config) the pooled row is at `argmax(input_ids)` — the first EOT, the highest id — otherwise at the first
position equal to `eos_token_id` (transformers' rule since PR #24773); both use the first-occurrence argmax.

`encoder` additionally returns every layer's input/output when asked (transformers 4.x's `CLIPEncoder` did;
transformers 5 collects them at the root with hooks, which MindSpore graphs do not run), so the root can return
`hidden_states` in one graph; `mappings/clip_text.yaml`'s `align:` compares them with the root's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from opensora_ms.ops import nn as onn
from opensora_ms.ops import text as otext
from opensora_ms.ops.device import model_dtype

from .t5 import ACTS, Act, Embedding, as_ids, finfo_min, hf_config_fields, inv_count, inv_shape, make_jit, to_numpy

__all__ = ["CLIPTextConfig", "CLIPTextModel", "build", "param_inventory", "infer_config", "run", "pooled_positions"]


@dataclass
class CLIPTextConfig:
    """The text-model fields of transformers' `CLIPTextConfig` (same names and defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    # fields of a CLIP text config that the text model's forward does not use (projection head, training)
    _IGNORED = frozenset({"projection_dim", "attention_dropout", "dropout", "hidden_dropout", "projection_size"})

    def __post_init__(self):
        if self.hidden_act not in ACTS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} not supported ({', '.join(ACTS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("CLIPTextConfig: hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        return cls(**hf_config_fields(cls, d, cls._IGNORED))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig, dtype):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype)
        self.position_ids = Tensor(np.arange(cfg.max_position_embeddings, dtype=np.int32).reshape(1, -1))

    def construct(self, input_ids):
        n = input_ids.shape[-1]
        if n > self.position_ids.shape[1]:
            raise ValueError(f"Sequence length must be less than max_position_embeddings (got {n} > "
                             f"{self.position_ids.shape[1]})")
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :n])


class CLIPAttention(nn.Cell):
    """Returns (output, probs) as transformers' eager `CLIPAttention`."""

    def __init__(self, cfg: CLIPTextConfig, dtype):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.k_proj = onn.Linear(d, d, dtype=dtype)
        self.v_proj = onn.Linear(d, d, dtype=dtype)
        self.q_proj = onn.Linear(d, d, dtype=dtype)
        self.out_proj = onn.Linear(d, d, dtype=dtype)

    def _heads(self, x, b, n):
        return x.reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def construct(self, hidden_states, attention_mask=None):
        b, n, d = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states), b, n)
        k = self._heads(self.k_proj(hidden_states), b, n)
        v = self._heads(self.v_proj(hidden_states), b, n)
        out, probs = otext.attention_with_probs(q, k, v, attention_mask, self.scale)
        return self.out_proj(out.permute(0, 2, 1, 3).reshape(b, n, d)), probs


class CLIPMLP(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig, dtype):
        super().__init__()
        self.activation_fn = Act(cfg.hidden_act)
        self.fc1 = onn.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        self.fc2 = onn.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)

    def construct(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """(hidden_states, attention_mask) -> hidden_states; teacher forcing feeds transformers' recorded pair."""

    def __init__(self, cfg: CLIPTextConfig, dtype):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, dtype)
        self.layer_norm1 = onn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype)
        self.layer_norm2 = onn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def construct(self, hidden_states, attention_mask=None):
        a, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        h = hidden_states + a
        return h + self.mlp(self.layer_norm2(h))


class CLIPEncoder(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])

    def construct(self, inputs_embeds, attention_mask=None, output_hidden_states=False):
        h = inputs_embeds
        states = [h]
        for layer in self.layers:
            h = layer(h, attention_mask)
            states.append(h)
        if output_hidden_states:
            return {"last_hidden_state": h, "hidden_states": tuple(states)}
        return {"last_hidden_state": h}


def pooled_positions(input_ids, eos_token_id: int):
    """Row index of the pooled token per sequence: first maximum id for the legacy `eos_token_id == 2`, else the
    first position holding `eos_token_id`."""
    if eos_token_id == 2:
        return otext.first_argmax(input_ids)
    return otext.first_argmax((input_ids == eos_token_id).astype(ms.int32))


class CLIPTextModel(nn.Cell):
    def __init__(self, cfg: CLIPTextConfig, dtype=ms.float32):
        super().__init__()
        self.config = cfg
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, dtype)
        self.encoder = CLIPEncoder(cfg, dtype)
        self.final_layer_norm = onn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        # transformers' causal mask: the dtype's min above the diagonal, in the activations' dtype (every value is
        # representable in it, so building it in fp32 and casting is exact)
        p, self.mask_min = cfg.max_position_embeddings, finfo_min(dtype)
        self.causal = Tensor(np.triu(np.full((p, p), self.mask_min, np.float32), 1).reshape(1, 1, p, p))

    def construct(self, input_ids, attention_mask=None, output_hidden_states=False):
        b, n = input_ids.shape
        h = self.embeddings(input_ids)
        mask = self.causal[:, :, :n, :n]
        if attention_mask is not None:   # transformers' causal mask with padding (upstream passes none)
            keep = attention_mask.reshape(b, 1, 1, n) != 0
            mask = ops.where(keep, mask, ops.full((), self.mask_min, dtype=ms.float32))
        mask = mask.astype(h.dtype)
        enc = self.encoder(h, mask, output_hidden_states)
        last = self.final_layer_norm(enc["last_hidden_state"])
        idx = pooled_positions(input_ids, self.eos_token_id)
        rows = idx + ops.arange(b, dtype=ms.int32) * n
        pooled = otext.embedding(rows, last.reshape(b * n, -1))   # row gather (any dtype)
        if output_hidden_states:
            return {"last_hidden_state": last, "pooler_output": pooled, "hidden_states": enc["hidden_states"]}
        return {"last_hidden_state": last, "pooler_output": pooled}


# ------------------------------------------------------------------------------------------------------ helpers
def _cfg(cfg) -> CLIPTextConfig:
    return cfg if isinstance(cfg, CLIPTextConfig) else CLIPTextConfig.from_dict(dict(cfg))


def build(cfg, dtype=None, init: bool = True) -> CLIPTextModel:
    """The text model with parameters in `dtype` (default: the op layer's `model_dtype()`: fp32 on CPU, bf16 on
    Ascend and in CPU-bf16); `init=False` skips the random initialisation (weights are loaded next)."""
    cfg, dtype = _cfg(cfg), dtype or model_dtype()
    if init:
        net = CLIPTextModel(cfg, dtype)
    else:
        from mindspore.nn.utils import no_init_parameters

        with no_init_parameters():
            net = CLIPTextModel(cfg, dtype)
    net.set_train(False)
    return net


def param_inventory(cfg, dtype: str = "F32") -> dict:
    """{name: (shape, dtype)} of the port's parameters, computed without allocating them."""
    c = _cfg(cfg)
    d, f = c.hidden_size, c.intermediate_size
    inv = {"embeddings.token_embedding.weight": ((c.vocab_size, d), dtype),
           "embeddings.position_embedding.weight": ((c.max_position_embeddings, d), dtype)}
    for i in range(c.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            inv[f"{p}self_attn.{n}.weight"] = ((d, d), dtype)
            inv[f"{p}self_attn.{n}.bias"] = ((d,), dtype)
        for n in ("layer_norm1", "layer_norm2"):
            inv[f"{p}{n}.weight"] = ((d,), dtype)
            inv[f"{p}{n}.bias"] = ((d,), dtype)
        inv[f"{p}mlp.fc1.weight"] = ((f, d), dtype)
        inv[f"{p}mlp.fc1.bias"] = ((f,), dtype)
        inv[f"{p}mlp.fc2.weight"] = ((d, f), dtype)
        inv[f"{p}mlp.fc2.bias"] = ((d,), dtype)
    inv["final_layer_norm.weight"] = ((d,), dtype)
    inv["final_layer_norm.bias"] = ((d,), dtype)
    return inv


def infer_config(inv: dict) -> dict:
    """A `CLIPTextConfig` dict from the port's parameter shapes (for `converter.targets`). The head count, the
    activation and the EOS rule have no parameter: heads = hidden / 64 when that divides (openai's CLIP), else 1."""
    shape = lambda k: inv_shape(inv, k, "clip")  # noqa: E731
    vocab, d = shape("embeddings.token_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    layers = inv_count(inv, "encoder.layers")
    ff = shape("encoder.layers.0.mlp.fc1.weight")[0] if layers else 4 * d
    return {"vocab_size": vocab, "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": d // 64 if d % 64 == 0 else 1, "max_position_embeddings": positions}


def run(model: CLIPTextModel, input_ids, output_hidden_states: bool = True, jit: bool = False) -> dict:
    """Upstream's call (`HFEmbedder`: input ids only) -> numpy float32 outputs by transformers' names:
    `last_hidden_state`, `pooler_output`, `hidden_states.<i>`. `jit=True` compiles the call first (no hooks)."""
    ids = as_ids(input_ids)
    out = make_jit(model, output_hidden_states)(ids) if jit else model(ids, None, output_hidden_states)
    res = {"last_hidden_state": to_numpy(out["last_hidden_state"]), "pooler_output": to_numpy(out["pooler_output"])}
    for i, h in enumerate(out["hidden_states"] if output_hidden_states else ()):
        res[f"hidden_states.{i}"] = to_numpy(h)
    return res
