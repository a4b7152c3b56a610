"""Parity adapter for the T5-v1.1 text encoder (docs/architecture.md "Parity adapters"; docs/text_encoders.md).

Torch side: transformers' own `T5EncoderModel` (attn_implementation='eager') IS the reference, called as upstream's
`HFEmbedder` calls it: `model(input_ids=ids, attention_mask=None)` (padding is not masked). MindSpore side:
`opensora_ms/models/t5.py` (transformers' module paths), weights converted by `mappings/t5_encoder.yaml`.

Outputs: `last_hidden_state` and `hidden_states.<i>` (output_hidden_states=True: 0 = embeddings, the last = after
the final RMS norm). Teacher forcing: every `encoder.block.{i}` gets transformers' recorded
(hidden_states, attention_mask, position_bias); see `teacher_adapt`.
"""

from __future__ import annotations

import numpy as np

from parity.adapters.base import cfg_dict, init_weights_

CONFIG_NAME = "T5Config"
TEACHER_BLOCKS = ["encoder.block.{i}"]

PRESETS = {
    # = ../shared/upstream/tiny/t5_tiny.config.json
    "tiny": {
        "vocab_size": 96, "d_model": 48, "d_kv": 12, "d_ff": 104, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    },
    # google/t5-v1_1-xxl (upstream's text encoder; the mapping's target inventory)
    "xxl": {
        "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    },
}
MAX_LENGTH = {"tiny": 160}   # the case's max_length; upstream pads T5 to 512


def mapping_name(cfg) -> str:
    return "t5_encoder"


def hf_config(cfg):
    import transformers

    return transformers.T5Config(**cfg_dict(cfg, CONFIG_NAME), attn_implementation="eager")


def _is_scale(name, p) -> bool:
    return name.endswith("layer_norm.weight")


def build_torch(cfg, dtype=None, seed: int = 0):
    """transformers' T5EncoderModel at the case's config, weights by the cases' recipe (norm weights are scales)."""
    import torch
    import transformers

    model = transformers.T5EncoderModel(hf_config(cfg))
    if not any(p.is_meta for p in model.parameters()):
        init_weights_(model, seed, _is_scale)
    return model.to(dtype or torch.float32).eval()


def _np(t):
    import torch

    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).detach().cpu().numpy()


def run_torch(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    import torch

    ids = torch.from_numpy(np.ascontiguousarray(inputs["input_ids"])).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=None, output_hidden_states=True)
    res = {"last_hidden_state": _np(out.last_hidden_state)}
    for i, h in enumerate(out.hidden_states):
        res[f"hidden_states.{i}"] = _np(h)
    return res


def build_ms(cfg):
    """In the op layer's model dtype: fp32 on CPU, bf16 in CPU-bf16 and on Ascend (upstream's policy; the inputs are
    token ids)."""
    from opensora_ms.models import t5 as M
    from opensora_ms.ops.device import model_dtype

    return M.build(cfg_dict(cfg, CONFIG_NAME), dtype=model_dtype())


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    from opensora_ms.models import t5 as M

    return M.run(model, inputs["input_ids"], output_hidden_states=True, jit=bool((case_cfg or {}).get("jit", False)))


def teacher_adapt(torch_path: str, args: tuple, kwargs: dict):
    """transformers' `T5Block(hidden_states, attention_mask, position_bias, encoder_hidden_states,
    encoder_attention_mask, encoder_decoder_position_bias, cache=..., **kwargs)` -> the port's
    `T5Block(hidden_states, attention_mask, position_bias)`; the encoder-decoder inputs are None in an encoder and
    the keyword arguments (cache, output_hidden_states) do not change the computation."""
    names = ("hidden_states", "attention_mask", "position_bias")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    extra = [a for a in args[3:] if a is not None]
    if extra:
        raise ValueError(f"teacher_adapt({torch_path}): encoder-decoder inputs are not None")
    return tuple(vals), {}


def make_inputs(cfg, seed: int, batch_lengths=(5, 38, None), max_length: int | None = None) -> dict:
    """`input_ids` (int64) as the T5 tokenizer pads them: random ids in [2, vocab) + `</s>`=eos, truncated to
    max_length keeping `</s>` last, right-padded with pad; `None` = a row longer than max_length (truncated)."""
    c = cfg_dict(cfg, CONFIG_NAME)
    L = max_length or MAX_LENGTH["tiny"]
    eos, pad, vocab = c.get("eos_token_id", 1), c.get("pad_token_id", 0), c["vocab_size"]
    rng = np.random.default_rng(seed)
    rows = []
    for n in batch_lengths:
        n = L + 7 if n is None else n
        ids = list(rng.integers(2, vocab, n - 1)) + [eos]
        if len(ids) > L:
            ids = ids[: L - 1] + [eos]
        rows.append(ids + [pad] * (L - len(ids)))
    return {"input_ids": np.asarray(rows, dtype=np.int64)}
