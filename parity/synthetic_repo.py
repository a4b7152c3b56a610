"""A deterministic tiny repo laid out exactly like hpcai-tech/Open-Sora-v2 (same file names, same key names,
tiny shapes), for the download tests and `msconv demo` (installed with the package, so the demo runs from a wheel).

Weights come from the project's torch references (`parity.adapters.<model>.build_torch`, the cases' seeded
recipe) and from transformers' own T5ForConditionalGeneration / CLIPModel at tiny configs, stored in the real
files' dtypes (MMDiT, VAE, FLUX.1-dev in bf16; the Flux AE, T5 and CLIP in fp32). The text encoders' sizes fit the
tiny MMDiT (T5 d_model = context_in_dim, CLIP hidden = vec_in_dim), so the converted set runs as a pipeline.
Tokenizers are built here, offline, with `tokenizers`: a T5 unigram and a CLIP byte-level BPE over a small
vocabulary (the real T5 folder ships `spiece.model`; sentencepiece is not a dependency, so this one ships
`tokenizer.json`, which `AutoTokenizer` loads the same way).

`build_dc_ae` writes the second repo, hpcai-tech/Open-Sora-v2-Video-DC-AE (`msconv generate --high-compression`):
the high-compression MMDiT (patch 1) and the Video DC-AE under their real file names, sized as a pair (the MMDiT's
in_channels = the DC-AE's latent channels x patch^2 = 32). It is a separate repo, as upstream's, so `msconv demo`
(which serves only the first) does not build or convert it.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO_ID = "hpcai-tech/Open-Sora-v2"
DC_AE_REPO_ID = "hpcai-tech/Open-Sora-v2-Video-DC-AE"

MMDIT = {"in_channels": 64, "vec_in_dim": 32, "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0,
         "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
         "qkv_bias": True, "guidance_embed": False, "cond_embed": True, "fused_qkv": False, "use_liger_rope": True,
         "patch_size": 2}
FLUX = dict(MMDIT, guidance_embed=True, cond_embed=False, fused_qkv=True, use_liger_rope=False)
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 4,
       "block_out_channels": [8, 16, 32, 32], "scale_factor": 0.476986, "shift_factor": 0.0,
       "time_compression_ratio": 4, "spatial_compression_ratio": 8, "mid_block_add_attention": True,
       "sample_size": 256, "sample_tsize": 64, "use_slicing": False, "use_spatial_tiling": True,
       "use_temporal_tiling": False, "tile_overlap_factor": 0.25}
FLUX_AE = {"resolution": 32, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 2,
           "z_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159}
T5 = {"vocab_size": 96, "d_model": 48, "d_kv": 12, "d_ff": 96, "num_layers": 2, "num_decoder_layers": 1,
      "num_heads": 4, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
      "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
      "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
CLIP_TEXT = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 16, "projection_dim": 32, "hidden_act": "quick_gelu"}

MMDIT_HC = dict(MMDIT, in_channels=32, patch_size=1)


def dc_ae_config() -> dict:
    """The tiny Video DC-AE of the parity adapter (widths [4, 16, 16, 32, 32, 64], latent 32)."""
    from parity.adapters import dc_ae

    return json.loads(json.dumps(dc_ae.PRESETS["tiny"]))


# model configs of the msconv components (`--model-config NAME=FILE` / config.json content)
MODEL_CONFIGS = {"mmdit": {"MMDiTConfig": MMDIT}, "vae": {"AutoEncoder3DConfig": VAE},
                 "flux": {"MMDiTConfig": FLUX}, "flux_ae": {"AutoEncoderConfig": FLUX_AE},
                 "mmdit_hc": {"MMDiTConfig": MMDIT_HC}}

WORDS = ("a red fox running in snow the cat dog sky water blue green video of on with and at motion score fps "
         "slow fast camera").split()


def _save_st(path: Path, state: dict, dtype) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sorted(state.items())}, str(path),
              metadata={"format": "pt"})


def _adapter_state(model: str, cfg: dict, seed: int) -> dict:
    from parity.adapters import by_name

    return by_name(model).build_torch(cfg, seed=seed).state_dict()


def t5_tokenizer(folder: Path) -> None:
    """A T5 unigram tokenizer (ids: <pad> 0, </s> 1, <unk> 2) over WORDS, letters and digits."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set("".join(WORDS)) | set("0123456789.,") | set("abcdefghijklmnopqrstuvwxyzFPS"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tok = transformers.T5Tokenizer(tokenizer_object=tk, extra_ids=0)
    tok.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    assert len(pieces) <= T5["vocab_size"]


def clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer (end-of-word `</w>`, lower case): letters, digits, punctuation and WORDS merged whole;
    <|startoftext|> and <|endoftext|> last, so the first EOT is the row's largest id (upstream's pooling)."""
    import transformers

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for w in WORDS:
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= CLIP_TEXT["vocab_size"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.save_pretrained(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}, indent=2) + "\n")


def _init_hf(model, seed: int):
    from parity.adapters.base import init_weights_

    return init_weights_(model, seed, lambda name, p: "norm" in name and name.endswith("weight"))


def build(folder, seed: int = 0) -> dict:
    """Write the tiny hpcai-tech/Open-Sora-v2 into `folder`; returns {"repo_id", "model_configs"}."""
    import torch
    import transformers

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (root / "README.md").write_text("# Open-Sora v2 (tiny synthetic copy for msconv tests; not the real weights)\n")
    _save_st(root / "Open_Sora_v2.safetensors", _adapter_state("mmdit", MMDIT, seed), torch.bfloat16)
    _save_st(root / "hunyuan_vae.safetensors", _adapter_state("hunyuan_vae", VAE, seed + 1), torch.bfloat16)
    _save_st(root / "flux1-dev.safetensors", _adapter_state("mmdit", FLUX, seed + 2), torch.bfloat16)
    _save_st(root / "flux1-dev-ae.safetensors", _adapter_state("flux_ae", FLUX_AE, seed + 3), torch.float32)

    t5_dir = root / "google" / "t5-v1_1-xxl"
    t5 = _init_hf(transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)), seed + 4)
    t5.save_pretrained(str(t5_dir), max_shard_size="150KB")
    t5_tokenizer(t5_dir)

    clip_dir = root / "openai" / "clip-vit-large-patch14"
    ccfg = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=32)
    clip = _init_hf(transformers.CLIPModel(ccfg), seed + 5)
    clip.save_pretrained(str(clip_dir))
    torch.save(clip.state_dict(), clip_dir / "pytorch_model.bin")   # the real folder has both formats
    clip_tokenizer(clip_dir)
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "size": 32}) + "\n")
    for d in (t5_dir, clip_dir):  # transformers adds a generation config for T5; keep only what the real folders have
        _normalize_config(d / "config.json")
    return {"repo_id": REPO_ID, "model_configs": json.loads(json.dumps(MODEL_CONFIGS))}


def build_dc_ae(folder, seed: int = 0) -> dict:
    """The tiny hpcai-tech/Open-Sora-v2-Video-DC-AE: the high-compression MMDiT (bf16) and the Video DC-AE (fp32;
    the real files' dtypes are unknown, SPEC.md §b). About 7.5 MB, 2 s."""
    import torch

    if MMDIT_HC["in_channels"] != dc_ae_config()["latent_channels"] * MMDIT_HC["patch_size"] ** 2:
        raise ValueError("synthetic repo: the hc MMDiT's in_channels must be the DC-AE's latent channels x patch^2")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (root / "README.md").write_text("# Open-Sora v2 Video DC-AE (tiny synthetic copy for msconv tests; not the real "
                                    "weights)\n")
    _save_st(root / "Open_Sora_v2_Video_DC_AE.safetensors", _adapter_state("mmdit", MMDIT_HC, seed), torch.bfloat16)
    _save_st(root / "F32T4C128_AE.safetensors", _adapter_state("dc_ae", dc_ae_config(), seed + 1), torch.float32)
    return {"repo_id": DC_AE_REPO_ID}


def _normalize_config(p: Path) -> None:
    """Drop fields that change with the transformers version, so the repo's bytes are deterministic."""
    d = json.loads(p.read_text())
    d.pop("transformers_version", None)
    for sub in ("text_config", "vision_config"):
        if isinstance(d.get(sub), dict):
            d[sub].pop("transformers_version", None)
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_model_configs(folder) -> dict:
    """`--model-config` files for the tiny msconv components; returns {component: path}."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in dict(MODEL_CONFIGS, dc_ae={"DCAEConfig": dc_ae_config()}).items():
        p = out / f"{name}.json"
        p.write_text(json.dumps(cfg, indent=1) + "\n")
        paths[name] = str(p)
    return paths


if __name__ == "__main__":  # python -m parity.synthetic_repo DIR [--dc-ae]  (--dc-ae: the Video-DC-AE repo)
    import sys

    args = [a for a in sys.argv[1:] if a != "--dc-ae"]
    print(json.dumps((build_dc_ae if "--dc-ae" in sys.argv[1:] else build)(args[0]), indent=1))
