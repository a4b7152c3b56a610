"""Parity adapter for the CLIP text model (docs/architecture.md "Parity adapters"; docs/text_encoders.md).

Torch side: transformers' own `CLIPTextModel` (attn_implementation='eager') IS the reference, called as upstream's
`HFEmbedder` calls it: `model(input_ids=ids, attention_mask=None)` (causal mask always; pooled output at the first
EOT for the legacy `eos_token_id == 2`). MindSpore side: `opensora_ms/models/clip.py` (transformers 5's module
paths), weights converted by `mappings/clip_text.yaml`.

Outputs: `last_hidden_state`, `pooler_output`, `hidden_states.<i>` (0 = embeddings, the last one BEFORE
final_layer_norm). Teacher forcing: every `encoder.layers.{i}` gets transformers' recorded (hidden_states,
causal mask); see `teacher_adapt`.
"""

from __future__ import annotations

import numpy as np

from parity.adapters.base import cfg_dict, init_weights_

CONFIG_NAME = "CLIPTextConfig"
TEACHER_BLOCKS = ["encoder.layers.{i}"]

PRESETS = {
    # = ../shared/upstream/tiny/clip_tiny.config.json
    "tiny": {
        "vocab_size": 120, "hidden_size": 40, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0, "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    # openai/clip-vit-large-patch14, text tower (upstream's pooled encoder; the mapping's target inventory)
    "large": {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
}


def mapping_name(cfg) -> str:
    return "clip_text"


def hf_config(cfg):
    import transformers

    return transformers.CLIPTextConfig(**cfg_dict(cfg, CONFIG_NAME), attn_implementation="eager")


def _is_scale(name, p) -> bool:
    return "layer_norm" in name and name.endswith(".weight")


def build_torch(cfg, dtype=None, seed: int = 0):
    """transformers' CLIPTextModel at the case's config, weights by the cases' recipe (LayerNorm weights are
    scales)."""
    import torch
    import transformers

    model = transformers.CLIPTextModel(hf_config(cfg))
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
    res = {"last_hidden_state": _np(out.last_hidden_state), "pooler_output": _np(out.pooler_output)}
    for i, h in enumerate(out.hidden_states):
        res[f"hidden_states.{i}"] = _np(h)
    return res


def build_ms(cfg):
    """In the op layer's model dtype: fp32 on CPU, bf16 in CPU-bf16 and on Ascend (upstream's policy; the inputs are
    token ids)."""
    from opensora_ms.models import clip as M
    from opensora_ms.ops.device import model_dtype

    return M.build(cfg_dict(cfg, CONFIG_NAME), dtype=model_dtype())


def run_ms(model, inputs: dict, case_cfg: dict | None = None) -> dict:
    from opensora_ms.models import clip as M

    return M.run(model, inputs["input_ids"], output_hidden_states=True, jit=bool((case_cfg or {}).get("jit", False)))


def teacher_adapt(torch_path: str, args: tuple, kwargs: dict):
    """transformers' `CLIPEncoderLayer(hidden_states, attention_mask, **kwargs)` -> the port's
    `CLIPEncoderLayer(hidden_states, attention_mask)`; the keyword arguments (is_causal, output_hidden_states)
    only steer transformers' attention dispatch and output recording."""
    vals = list(args[:2]) + [kwargs.get(n) for n in ("hidden_states", "attention_mask")[len(args[:2]):]]
    return tuple(vals), {}


def make_inputs(cfg, seed: int, batch_lengths=(3, 44, None)) -> dict:
    """`input_ids` (int64) as the openai CLIP tokenizer pads them: [BOS] + random ids + [EOT], truncated to
    max_position_embeddings keeping EOT last, right-padded with EOT; BOS/EOT are the two highest ids (vocab - 2,
    vocab - 1) as in the real vocabulary; `None` = a row longer than the context (truncated)."""
    c = cfg_dict(cfg, CONFIG_NAME)
    L, vocab = c.get("max_position_embeddings", 77), c["vocab_size"]
    bos, eot = vocab - 2, vocab - 1
    rng = np.random.default_rng(seed)
    rows = []
    for n in batch_lengths:
        n = L + 5 if n is None else n
        ids = [bos] + list(rng.integers(3, bos, n))[: L - 2] + [eot]
        rows.append(ids + [eot] * (L - len(ids)))
    return {"input_ids": np.asarray(rows, dtype=np.int64)}
