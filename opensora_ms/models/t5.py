"""T5-v1.1 encoder (transformers' `T5EncoderModel`) in MindSpore: upstream's text encoder (google/t5-v1_1-xxl).

Cell paths and parameter names are transformers' (`encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...), so the
mapping (`mappings/t5_encoder.yaml`) only carries the one real layout change: transformers ties `shared.weight`
and `encoder.embed_tokens.weight` (one tensor under two names); the port holds it once, as
`encoder.embed_tokens.weight`. Every module transformers calls has a cell of the same path (dropouts are identity
cells: inference only), and each returns what transformers' module returns (tuples included), so parity hooks
align by path.

Numerics follow transformers: gated-GELU with NewGELU (`gelu_new`: in bf16 the same chain of rounded ops as torch,
`ops.text.gelu_new`), bidirectional relative position
buckets (exact integer table, see `bucket_table`), no 1/sqrt(d) scaling, `T5LayerNorm` (RMS in fp32, cast to the
weight's dtype when that is half). transformers' `_keep_in_fp32_modules = ["wo"]` applies to float16 only
(`from_pretrained(torch_dtype=bfloat16)` gives a bf16 `wo`, checked on transformers 5.24, as upstream's bf16 load
does), so `build(..., dtype=ms.bfloat16)` is bf16 throughout and `build(..., dtype=ms.float16)` keeps `wo` fp32;
the FF input is cast to `wo`'s dtype as `T5DenseGatedActDense` does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from opensora_ms.ops import nn as onn
from opensora_ms.ops import text as otext
from opensora_ms.ops.device import model_dtype

__all__ = ["T5Config", "T5EncoderModel", "build", "param_inventory", "infer_config", "run", "make_jit", "bucket_table",
           "hf_config_fields"]

# transformers' generic `PretrainedConfig` fields (5.x and the larger 4.x set that old config.json files carry):
# bookkeeping, tokenizer ids and generation defaults that do not change the encoder's computation.
HF_GENERIC_FIELDS = frozenset("""
_name_or_path architectures chunk_size_feed_forward dtype torch_dtype id2label label2id is_encoder_decoder model_type
output_attentions output_hidden_states problem_type return_dict transformers_version torchscript use_bfloat16
tf_legacy_loss pruned_heads tie_word_embeddings is_decoder cross_attention_hidden_size add_cross_attention
tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
begin_suppress_tokens finetuning_task tokenizer_class prefix bos_token_id pad_token_id eos_token_id sep_token_id
decoder_start_token_id task_specific_params gradient_checkpointing _commit_hash _attn_implementation_autoset
use_cache initializer_factor initializer_range
""".split())


def hf_config_fields(cls, d: dict, extra_ignored: frozenset = frozenset()) -> dict:
    """The dataclass fields of a transformers config dict; generic / known-irrelevant fields are dropped by name,
    anything else unknown raises (a typo or an unsupported variant must not be ignored silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - HF_GENERIC_FIELDS - extra_ignored)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    return {k: v for k, v in d.items() if k in names}


@dataclass
class T5Config:
    """The encoder-relevant fields of transformers' `T5Config` (same names and defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None      # derived from feed_forward_proj as transformers does when absent
    is_gated_act: bool | None = None

    # decoder / head fields a full T5 config carries; the encoder does not use them
    _IGNORED = frozenset({"num_decoder_layers", "classifier_dropout", "scale_decoder_outputs", "output_past",
                          "n_positions"})

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config: feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        if self.is_gated_act is None:
            self.is_gated_act = parts[0] == "gated"
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if self.dense_act_fn not in ACTS:
            raise ValueError(f"T5Config: activation {self.dense_act_fn!r} not supported ({', '.join(ACTS)})")

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return cls(**hf_config_fields(cls, d, cls._IGNORED))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# transformers' ACT2FN names the port runs (`Act` dispatches on them): NewGELU (T5-v1.1's gated-gelu, a chain of ops
# in bf16), quick-GELU (CLIP), exact GELU, torch's fused tanh GELU, ReLU (original T5), SiLU
ACTS = ("gelu_new", "quick_gelu", "gelu", "gelu_pytorch_tanh", "relu", "silu")


def bucket_table(num_buckets: int, max_distance: int, bidirectional: bool = True) -> np.ndarray:
    """Bucket of every relative position r = key - query in [-max_distance, max_distance] (index r + max_distance).

    transformers' `_relative_position_bucket` saturates at |r| >= max_distance, so clipping r to that range and
    looking the bucket up is exact for any length. Computed with transformers' float32 formula (log in float32,
    truncation), which tests compare with transformers for every r."""
    r = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    out = np.zeros_like(r)
    if bidirectional:
        num_buckets //= 2
        out += (r > 0).astype(np.int64) * num_buckets
        n = np.abs(r)
    else:
        n = -np.minimum(r, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        large = max_exact + (np.log(n.astype(np.float32) / np.float32(max_exact))
                             / np.float32(math.log(max_distance / max_exact))
                             * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (out + np.where(n < max_exact, n, large)).astype(np.int32)


# ------------------------------------------------------------------------------------------------------ cells
def _param(shape, init, dtype):
    return Parameter(initializer(init, shape, dtype))


class Embedding(nn.Cell):
    """torch.nn.Embedding with a torch-named `weight` [num, dim]."""

    def __init__(self, num, dim, dtype=ms.float32):
        super().__init__()
        self.weight = _param((num, dim), "normal", dtype)

    def construct(self, ids):
        return otext.embedding(ids, self.weight)


class T5LayerNorm(nn.Cell):
    def __init__(self, dim, eps=1e-6, dtype=ms.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = _param((dim,), "ones", dtype)

    def construct(self, x):
        return otext.t5_rms_norm(x, self.weight, self.eps)


class Act(nn.Cell):
    """transformers' `ACT2FN[name]` as a cell (its own hook, as in torch); the name is folded by `ms.jit`."""

    def __init__(self, name):
        super().__init__()
        if name not in ACTS:
            raise ValueError(f"activation {name!r} not supported ({', '.join(ACTS)})")
        self.name = name

    def construct(self, x):
        if self.name == "gelu_new":
            return otext.gelu_new(x)
        if self.name == "quick_gelu":
            return otext.quick_gelu(x)
        if self.name == "gelu":
            return onn.gelu(x, "none")
        if self.name == "gelu_pytorch_tanh":
            return onn.gelu(x, "tanh")
        if self.name == "relu":
            return onn.relu(x)
        return onn.silu(x)


def _linear(i, o, dtype):
    return onn.Linear(i, o, bias=False, dtype=dtype)


class T5DenseGatedActDense(nn.Cell):
    def __init__(self, cfg: T5Config, dtype, wo_dtype):
        super().__init__()
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, dtype)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, dtype)
        self.wo = _linear(cfg.d_ff, cfg.d_model, wo_dtype)
        self.dropout = onn.Identity()
        self.act = Act(cfg.dense_act_fn)

    def construct(self, h):
        g = self.act(self.wi_0(h))
        h = g * self.wi_1(h)
        h = self.dropout(h)
        if h.dtype != self.wo.weight.dtype:
            h = h.astype(self.wo.weight.dtype)
        return self.wo(h)


class T5DenseActDense(nn.Cell):
    def __init__(self, cfg: T5Config, dtype, wo_dtype):
        super().__init__()
        self.wi = _linear(cfg.d_model, cfg.d_ff, dtype)
        self.wo = _linear(cfg.d_ff, cfg.d_model, wo_dtype)
        self.dropout = onn.Identity()
        self.act = Act(cfg.dense_act_fn)

    def construct(self, h):
        h = self.dropout(self.act(self.wi(h)))
        if h.dtype != self.wo.weight.dtype:
            h = h.astype(self.wo.weight.dtype)
        return self.wo(h)


class T5LayerFF(nn.Cell):
    def __init__(self, cfg: T5Config, dtype, wo_dtype):
        super().__init__()
        cls = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = cls(cfg, dtype, wo_dtype)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.dropout = onn.Identity()

    def construct(self, h):
        f = self.DenseReluDense(self.layer_norm(h))
        return h + self.dropout(f)


class T5Attention(nn.Cell):
    """Bidirectional self-attention with T5's relative position bias; returns (output, position_bias, probs) as
    transformers' eager `T5Attention` does. Only the first block owns `relative_attention_bias`."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, dtype):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.has_relative_attention_bias = has_relative_attention_bias
        self.max_distance = cfg.relative_attention_max_distance
        self.q = _linear(cfg.d_model, cfg.inner_dim, dtype)
        self.k = _linear(cfg.d_model, cfg.inner_dim, dtype)
        self.v = _linear(cfg.d_model, cfg.inner_dim, dtype)
        self.o = _linear(cfg.inner_dim, cfg.d_model, dtype)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, dtype)
            self.buckets = Tensor(bucket_table(cfg.relative_attention_num_buckets, self.max_distance))

    def compute_bias(self, length):
        """(1, H, L, L) bias: bucket of clip(key - query) looked up in the integer table, then the embedding."""
        pos = ops.arange(length, dtype=ms.int32)
        rel = pos.reshape(1, length) - pos.reshape(length, 1)
        idx = ops.clamp(rel, -self.max_distance, self.max_distance) + self.max_distance
        bucket = ops.gather(self.buckets, idx, 0)
        values = self.relative_attention_bias(bucket)             # (L, L, H)
        return values.permute(2, 0, 1).unsqueeze(0)

    def _heads(self, x, b, n):
        return x.reshape(b, n, self.n_heads, self.d_kv).permute(0, 2, 1, 3)

    def construct(self, hidden_states, mask=None, position_bias=None):
        b, n, _ = hidden_states.shape
        q = self._heads(self.q(hidden_states), b, n)
        k = self._heads(self.k(hidden_states), b, n)
        v = self._heads(self.v(hidden_states), b, n)
        if position_bias is None:
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(n)
            else:
                position_bias = ops.zeros((1, self.n_heads, n, n), q.dtype)
        bias = position_bias if mask is None else position_bias + mask
        out, probs = otext.attention_with_probs(q, k, v, bias, 1.0)
        out = out.permute(0, 2, 1, 3).reshape(b, n, self.n_heads * self.d_kv)
        return self.o(out), position_bias, probs


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, dtype):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, dtype)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.dropout = onn.Identity()

    def construct(self, hidden_states, attention_mask=None, position_bias=None):
        a, position_bias, probs = self.SelfAttention(self.layer_norm(hidden_states), attention_mask, position_bias)
        return hidden_states + self.dropout(a), position_bias, probs


class T5Block(nn.Cell):
    """(hidden_states, attention_mask, position_bias) -> (hidden_states, position_bias): transformers' `T5Block`
    encoder call (its third output, the cross-attention bias, is None in an encoder). Teacher forcing feeds it
    transformers' recorded (hidden_states, mask, position_bias)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, dtype, wo_dtype):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(cfg, has_relative_attention_bias, dtype),
                                  T5LayerFF(cfg, dtype, wo_dtype)])

    def construct(self, hidden_states, attention_mask=None, position_bias=None):
        hidden_states, position_bias, _ = self.layer[0](hidden_states, attention_mask, position_bias)
        return self.layer[1](hidden_states), position_bias


class T5Stack(nn.Cell):
    def __init__(self, cfg: T5Config, dtype, wo_dtype):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, dtype)
        self.block = nn.CellList([T5Block(cfg, i == 0, dtype, wo_dtype) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype)
        self.dropout = onn.Identity()
        self.mask_min = finfo_min(dtype)   # transformers' mask value (exact in `dtype`)

    def construct(self, input_ids, attention_mask=None, output_hidden_states=False):
        """`hidden_states` as transformers 5 records them: the embeddings, every block's output but the last, and
        the final norm's output (num_layers + 1 tensors)."""
        emb = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None:   # transformers' bidirectional padding mask (upstream passes none)
            keep = attention_mask.reshape(attention_mask.shape[0], 1, 1, -1) != 0
            mask = ops.where(keep, ops.zeros((), ms.float32), ops.full((), self.mask_min, dtype=ms.float32))
            mask = mask.astype(emb.dtype)
        h = self.dropout(emb)
        states = [h]
        position_bias = None
        for blk in self.block:
            h, position_bias = blk(h, mask, position_bias)
            states.append(h)
        h = self.dropout(self.final_layer_norm(h))
        if output_hidden_states:
            states[-1] = h
            return {"last_hidden_state": h, "hidden_states": tuple(states)}
        return {"last_hidden_state": h}


def finfo_min(dtype) -> float:
    """torch.finfo(dtype).min (transformers' mask value) for the port's float dtypes."""
    return {ms.float32: float(np.finfo(np.float32).min), ms.float16: float(np.finfo(np.float16).min),
            ms.bfloat16: -3.3895313892515355e38}.get(dtype, float(np.finfo(np.float32).min))


class T5EncoderModel(nn.Cell):
    """transformers' `T5EncoderModel`; `shared` is the same cell as `encoder.embed_tokens` (tied, held once)."""

    def __init__(self, cfg: T5Config, dtype=ms.float32, wo_dtype=None):
        super().__init__()
        self.config = cfg
        self.encoder = T5Stack(cfg, dtype, wo_dtype or dtype)

    @property
    def shared(self):
        return self.encoder.embed_tokens

    def construct(self, input_ids, attention_mask=None, output_hidden_states=False):
        return self.encoder(input_ids, attention_mask, output_hidden_states)


# ------------------------------------------------------------------------------------------------------ helpers
def _cfg(cfg) -> T5Config:
    return cfg if isinstance(cfg, T5Config) else T5Config.from_dict(dict(cfg))


def build(cfg, dtype=None, init: bool = True) -> T5EncoderModel:
    """The encoder with parameters in `dtype` (default: the op layer's `model_dtype()`: fp32 on CPU, bf16 on Ascend
    and in CPU-bf16, upstream's policy); `wo` stays fp32 for float16 only, as transformers' `_keep_in_fp32_modules`
    does (bf16 loads keep a bf16 `wo`). `init=False` skips the random initialisation (the weights are loaded next:
    the XXL encoder's 4.8 B parameters take minutes to draw)."""
    cfg = _cfg(cfg)
    dtype = dtype or model_dtype()
    wo_dtype = ms.float32 if dtype == ms.float16 else dtype
    if init:
        net = T5EncoderModel(cfg, dtype, wo_dtype)
    else:
        from mindspore.nn.utils import no_init_parameters

        with no_init_parameters():
            net = T5EncoderModel(cfg, dtype, wo_dtype)
    net.set_train(False)
    return net


def param_inventory(cfg, dtype: str = "F32") -> dict:
    """{name: (shape, dtype)} of the port's parameters, computed without allocating them."""
    c = _cfg(cfg)
    inv = {"encoder.embed_tokens.weight": ((c.vocab_size, c.d_model), dtype)}
    for i in range(c.num_layers):
        p = f"encoder.block.{i}.layer."
        for n in ("q", "k", "v"):
            inv[f"{p}0.SelfAttention.{n}.weight"] = ((c.inner_dim, c.d_model), dtype)
        inv[f"{p}0.SelfAttention.o.weight"] = ((c.d_model, c.inner_dim), dtype)
        if i == 0:
            inv[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (
                (c.relative_attention_num_buckets, c.num_heads), dtype)
        inv[f"{p}0.layer_norm.weight"] = ((c.d_model,), dtype)
        for n in (("wi_0", "wi_1") if c.is_gated_act else ("wi",)):
            inv[f"{p}1.DenseReluDense.{n}.weight"] = ((c.d_ff, c.d_model), dtype)
        inv[f"{p}1.DenseReluDense.wo.weight"] = ((c.d_model, c.d_ff), dtype)
        inv[f"{p}1.layer_norm.weight"] = ((c.d_model,), dtype)
    inv["encoder.final_layer_norm.weight"] = ((c.d_model,), dtype)
    return inv


def infer_config(inv: dict) -> dict:
    """A `T5Config` dict from the port's parameter shapes (for `converter.targets`): every field the inventory
    depends on. The activation and the maximum distance have no parameter (defaults: gated-GELU / ReLU, 128)."""
    shape = lambda k: inv_shape(inv, k, "t5")  # noqa: E731
    vocab, d_model = shape("encoder.embed_tokens.weight")
    p = "encoder.block.0.layer."
    inner = shape(p + "0.SelfAttention.q.weight")[0]
    buckets, heads = shape(p + "0.SelfAttention.relative_attention_bias.weight")
    gated = p + "1.DenseReluDense.wi_0.weight" in inv
    d_ff = shape(p + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"))[0]
    return {"vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": d_ff,
            "num_layers": inv_count(inv, "encoder.block"), "num_heads": heads,
            "relative_attention_num_buckets": buckets, "feed_forward_proj": "gated-gelu" if gated else "relu"}


def inv_shape(inv: dict, key: str, model: str) -> tuple:
    if key not in inv:
        from converter.errors import MappingError

        raise MappingError(f"cannot infer the {model} config from the checkpoint: {key!r} is absent "
                           "(pass --config FILE.json, e.g. the model's config.json)")
    return tuple(int(x) for x in inv[key][0])


def inv_count(inv: dict, prefix: str) -> int:
    """1 + the largest N of `<prefix>.N.*` keys (0 if none)."""
    nums = [int(k[len(prefix) + 1:].split(".", 1)[0]) for k in inv
            if k.startswith(prefix + ".") and k[len(prefix) + 1:].split(".", 1)[0].isdigit()]
    return max(nums) + 1 if nums else 0


def as_ids(input_ids) -> Tensor:
    """Token ids as an int64 Tensor (numpy / lists / Tensors accepted)."""
    return input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids, dtype=np.int64))


def make_jit(model, output_hidden_states: bool = False):
    """`ids -> model(ids, None, output_hidden_states)` (upstream's call, no attention mask) compiled with `ms.jit`;
    hooks do not run there. Keep the function: a new function object compiles again."""
    ohs = bool(output_hidden_states)

    def forward(ids):
        return model(ids, None, ohs)

    return ms.jit(forward)


def run(model: T5EncoderModel, input_ids, output_hidden_states: bool = True, jit: bool = False) -> dict:
    """Upstream's call (`HFEmbedder`: input ids only, no attention mask) -> numpy float32 outputs by transformers'
    names: `last_hidden_state`, `hidden_states.<i>`. `jit=True` compiles the call first (no hooks)."""
    ids = as_ids(input_ids)
    out = make_jit(model, output_hidden_states)(ids) if jit else model(ids, None, output_hidden_states)
    res = {"last_hidden_state": to_numpy(out["last_hidden_state"])}
    for i, h in enumerate(out["hidden_states"] if output_hidden_states else ()):
        res[f"hidden_states.{i}"] = to_numpy(h)
    return res


def to_numpy(t) -> np.ndarray:
    """A Tensor as numpy float32 (bf16 has no numpy dtype; the upcast is exact)."""
    return (t.astype(ms.float32) if t.dtype in (ms.bfloat16, ms.float16) else t).asnumpy()
