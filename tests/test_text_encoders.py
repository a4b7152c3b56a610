"""T5-v1.1 encoder and CLIP text model (docs/text_encoders.md): mappings at the real sizes, every Hugging Face
checkpoint form (safetensors / .bin, sharded or not), upstream's calling convention through `load_text_encoder`,
parity on the shared cases (outputs) and on transformers' own per-layer outputs (every layer aligned), and the
bf16 branch (CPU-bf16 emulation in a worker process: this file run as a script).

transformers' `T5EncoderModel` / `CLIPTextModel` are the torch reference throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "upstream" / "tiny"
CASES = {"t5": "t5_tiny", "clip": "clip_tiny"}
MAPPING = {"t5": "t5_encoder", "clip": "clip_text"}
CONFIG_NAME = {"t5": "T5Config", "clip": "CLIPTextConfig"}
# openai/clip-vit-large-patch14's vision tower (the full CLIPModel checkpoint carries it; the mapping drops it)
CLIP_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14, "projection_dim": 768}
PROMPTS = ["raining, sea. 24 FPS. 4 motion score.", "A red fox running in the snow at night. 24 FPS. 4 motion score.",
           ""]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _adapter(kind):
    from parity.adapters import clip, t5

    return t5 if kind == "t5" else clip


def _case(kind):
    from safetensors.torch import load_file

    name = CASES[kind]
    cfg = json.loads((TINY / f"{name}.config.json").read_text())
    weights = {k: v.float() for k, v in load_file(str(TINY / f"{name}.weights.safetensors")).items()}
    return cfg, weights, load_file(str(TINY / f"{name}.inputs.safetensors"))["input_ids"].numpy()


def _inv(state) -> dict:
    """{key: (shape, dtype name as the converter spells it)} of a (meta-device) torch state dict."""
    names = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.int64": "I64"}
    return {k: (tuple(v.shape), names[str(v.dtype)]) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- inventories
@pytest.mark.parametrize("kind,preset", [("t5", "xxl"), ("clip", "large")])
def test_target_inventory_file_is_the_port_at_the_real_config(kind, preset):
    """mappings/targets/<mapping>.json = the port's param_inventory at t5-v1_1-xxl / clip-vit-large-patch14, and
    infer_config reads an equivalent config back from it."""
    from converter.inventory import load_inventory
    from converter.mapping import MAPPINGS_DIR
    from opensora_ms.models import clip as C
    from opensora_ms.models import t5 as T

    M = T if kind == "t5" else C
    cfg = _adapter(kind).PRESETS[preset]
    inv = M.param_inventory(cfg)
    stored = load_inventory(MAPPINGS_DIR / "targets" / f"{MAPPING[kind]}.json")
    assert list(stored.items()) == list(inv.items())
    assert M.param_inventory(M.infer_config(inv)) == inv
    n = sum(int(np.prod(s)) for s, _ in inv.values())
    assert n == {"t5": 4_762_310_656, "clip": 123_060_480}[kind]   # the encoder's parameter count


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_param_inventory_equals_the_built_net(kind):
    from opensora_ms.models import clip as C
    from opensora_ms.models import t5 as T

    M = T if kind == "t5" else C
    cfg = _case(kind)[0][CONFIG_NAME[kind]]
    for init in (True, False):
        net = M.build(cfg, init=init)
        assert {n: (tuple(p.shape), "F32") for n, p in net.parameters_and_names()} == M.param_inventory(cfg)


def test_real_size_hugging_face_layouts_validate_on_the_meta_device():
    """The Hub's T5ForConditionalGeneration (t5-v1_1-xxl, tied `shared`/`embed_tokens` + decoder + lm_head), the
    T5EncoderModel subset of it, CLIPModel (clip-vit-large-patch14, with the position_ids buffers old .bin files
    carry) and CLIPTextModel: every key consumed or dropped with a reason, every target produced at its shape."""
    import torch
    import transformers

    from converter.mapping import load_mapping

    t5cfg = transformers.T5Config(**dict(_adapter("t5").PRESETS["xxl"], num_decoder_layers=24))
    clipcfg = transformers.CLIPConfig(text_config=_adapter("clip").PRESETS["large"], vision_config=CLIP_L14_VISION,
                                      projection_dim=768)
    with torch.device("meta"):
        full_t5 = _inv(transformers.T5ForConditionalGeneration(t5cfg).state_dict())
        full_clip = _inv(transformers.CLIPModel(clipcfg).state_dict())
    tied = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert tied <= set(full_t5)
    full_clip_bin = dict(full_clip, **{f"{t}_model.embeddings.position_ids": ((1, n), "I64")
                                       for t, n in (("text", 77), ("vision", 257))})
    text_clip = {k[len("text_model."):]: v for k, v in full_clip.items() if k.startswith("text_model.")}
    encoder_t5 = {k: v for k, v in full_t5.items() if k.startswith(("encoder.", "shared."))}   # T5EncoderModel
    sources = {
        # the Hub's .bin (tied tensors under every name); T5EncoderModel's state dict; its safetensors save, where
        # transformers keeps the tie source `shared.weight` only
        "t5": [full_t5, encoder_t5, {k: v for k, v in encoder_t5.items() if k != "encoder.embed_tokens.weight"}],
        "clip": [full_clip, full_clip_bin, text_clip],
    }
    for kind, srcs in sources.items():
        m = load_mapping(MAPPING[kind])
        target = m.target_inventory()
        for src in srcs:
            plan = m.plan(src, target)
            produced = plan.inventory()
            assert produced.keys() == target.keys()
            assert all(tuple(produced[k][0]) == target[k][0] for k in target)
            consumed = {leaf for node in plan.targets.values() for leaf in node.leaves()}
            assert consumed | set(plan.dropped) == set(src) and not consumed & set(plan.dropped)
            assert all(plan.dropped[k] for k in plan.dropped)   # each drop says why


def test_t5_bucket_table_equals_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from opensora_ms.models.t5 import bucket_table

    for nb, md in ((32, 128), (8, 20), (16, 7)):
        r = torch.arange(-3 * md, 3 * md + 1)
        want = T5Attention._relative_position_bucket(r, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
        table = bucket_table(nb, md)
        assert np.array_equal(table[np.clip(r.numpy(), -md, md) + md], want), (nb, md)


# ---------------------------------------------------------------------------------------------- parity
def _replay(case, mode):
    from parity.engine import ReplayOptions, replay

    return replay(case, ReplayOptions(framework="mindspore", mode=mode))


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_shared_case_fp32_outputs(kind):
    """Every float32 output of the upstream case (last_hidden_state / pooler_output, hidden_states.<i>) <= 1e-4."""
    rep = _replay(TINY / CASES[kind], "free")
    outs = {t["name"]: t for t in rep["tensors"] if t["kind"] == "output" and not t["name"].startswith("bf16/")}
    want = {"last_hidden_state", "hidden_states.0", "hidden_states.1", "hidden_states.2"} | (
        {"pooler_output"} if kind == "clip" else set())
    assert set(outs) == want
    assert all(t["max_rel"] <= 1e-4 and t["verdict"] == "pass" for t in outs.values()), outs
    assert rep["missing_outputs"] == []


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_every_layer_aligned_with_transformers(kind, tmp_path):
    """The shared cases store no hooks, so transformers' own per-module outputs are dumped from the case's weights
    and inputs; the port then passes free and teacher-forced with nothing unaligned on either side."""
    from parity.engine import dump

    name = CASES[kind]
    prefix = dump(kind, "tiny", tmp_path / name, weights=TINY / f"{name}.weights.safetensors",
                  inputs=TINY / f"{name}.inputs.safetensors")
    for mode in ("free", "teacher"):
        rep = _replay(prefix, mode)
        assert rep["verdict"] == "pass", (mode, rep["first_divergence"], rep["notes"])
        assert rep["unaligned"] == [] and rep["unaligned_candidate"] == [], mode
        hooks = [t for t in rep["tensors"] if t["kind"] == "hook"]
        assert len(hooks) > {"t5": 55, "clip": 35}[kind] and max(t["max_rel"] for t in hooks) < 1e-5


# ---------------------------------------------------------------------------------------------- checkpoints
def _hf_model(kind, full: bool):
    """transformers' model at the case config with the case weights (full: T5ForConditionalGeneration / CLIPModel
    with a one-layer decoder / tiny vision tower around the same encoder)."""
    import torch
    import transformers

    cfg, weights, _ = _case(kind)
    c = dict(cfg[CONFIG_NAME[kind]])
    if kind == "t5":
        tc = transformers.T5Config(**c, num_decoder_layers=1)
        model = (transformers.T5ForConditionalGeneration if full else transformers.T5EncoderModel)(tc)
        state = dict(weights)
    elif full:
        vc = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=c, vision_config=vc, projection_dim=8))
        state = {"text_model." + k: v for k, v in weights.items()}
    else:
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**c))
        state = dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("decoder.", "lm_head", "vision_model", "visual_", "text_projection",
                                                "logit_scale")) for k in missing), (missing, unexpected)
    with torch.no_grad():   # whatever the encoder does not use gets seeded values, as a real checkpoint's would be
        g = torch.Generator().manual_seed(1)
        for k in missing:
            p = model.get_parameter(k)
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if kind == "t5":
            model.get_input_embeddings().weight.copy_(weights["shared.weight"])
    return model.eval()


def _save_hf(model, folder: Path, form: str) -> None:
    """save_pretrained (safetensors, one file or shards), or the torch `.bin` forms older transformers wrote:
    one `pytorch_model.bin` (tied tensors under every name), or shards + `pytorch_model.bin.index.json`."""
    import torch

    folder.mkdir(parents=True)
    if form == "safetensors":
        model.save_pretrained(str(folder))
    elif form == "safetensors-sharded":
        model.save_pretrained(str(folder), max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.config.save_pretrained(str(folder))
        state = dict(model.state_dict())
        if hasattr(model, "text_model"):   # CLIP .bin files of transformers < 4.31 hold the position_ids buffers
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            state["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
        if form == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            keys, wmap = sorted(state), {}
            parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
            for i, part in enumerate(parts):
                fn = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
                torch.save({k: state[k] for k in part}, folder / fn)
                wmap.update({k: fn for k in part})
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _convert_folder(kind, hf: Path, out: Path, cli) -> None:
    """`msconv convert` of the HF folder against the port's inventory at the folder's config, then the HF config
    and tokenizer files beside the converted weights (what download-and-convert writes)."""
    from opensora_ms.models import clip as C
    from opensora_ms.models import t5 as T

    d = json.loads((hf / "config.json").read_text())
    d = d.get("text_config", d) if kind == "clip" else d
    inv = (T if kind == "t5" else C).param_inventory(d)
    inv_file = out.parent / f"{out.name}.inventory.json"
    rows = [{"key": k, "shape": list(s), "dtype": t} for k, (s, t) in inv.items()]
    inv_file.write_text(json.dumps({"tensors": rows}))
    r = cli("convert", hf, "--mapping", MAPPING[kind], "--out", out, "--target-inventory", inv_file)
    assert r.exit_code == 0, r.output
    shutil.copy(hf / "config.json", out / "config.json")
    for f in hf.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


def _tokenizer(kind, folder):
    from tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

    cfg = _case(kind)[0][CONFIG_NAME[kind]]
    return (build_t5_tokenizer if kind == "t5" else build_clip_tokenizer)(folder, vocab_size=cfg["vocab_size"])


@pytest.mark.parametrize("kind,form,full", [
    ("t5", "safetensors", False), ("t5", "bin", True), ("t5", "safetensors-sharded", True),
    ("t5", "bin-sharded", False),
    ("clip", "safetensors", False), ("clip", "bin", True), ("clip", "safetensors-sharded", True),
    ("clip", "bin-sharded", True),
])
def test_every_checkpoint_form_converts_and_encodes_as_transformers(kind, form, full, tmp_path, cli):
    """HF folder (safetensors / .bin, one file or sharded) -> msconv convert -> load_text_encoder: the encoding of
    real prompts equals transformers' (same tokenizer, same no-mask call) on the original folder."""
    import torch
    import transformers

    from opensora_ms.models.text_encoders import load_text_encoder, numpy_f32

    model = _hf_model(kind, full)
    hf = tmp_path / "hf"
    _save_hf(model, hf, form)
    _tokenizer(kind, hf)
    out = tmp_path / "converted"
    _convert_folder(kind, hf, out, cli)
    enc = load_text_encoder(out)
    assert enc.kind == kind and enc.max_length == {"t5": 512, "clip": 77}[kind]
    tok = (transformers.T5Tokenizer if kind == "t5" else transformers.CLIPTokenizer).from_pretrained(str(hf))
    ids = tok(PROMPTS, truncation=True, max_length=enc.max_length, padding="max_length", return_tensors="pt").input_ids
    assert np.array_equal(enc.tokenize(PROMPTS), ids.numpy())
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=None) if not full else (
            model.encoder(input_ids=ids) if kind == "t5" else model.text_model(input_ids=ids))
    key = enc.output_key
    assert _rel(numpy_f32(enc(PROMPTS)), getattr(ref, key).numpy()) < 1e-4   # fp32 port vs torch (512 tokens)


# ---------------------------------------------------------------------------------------------- upstream's call
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Converted tiny T5 and CLIP folders (case weights, tiny tokenizers) + transformers' models beside them."""
    from typer.testing import CliRunner

    import cli as cli_module

    runner = CliRunner()
    cli = lambda *a: runner.invoke(cli_module.app, [str(x) for x in a])  # noqa: E731
    root = tmp_path_factory.mktemp("text_encoders")
    out = {}
    for kind in ("t5", "clip"):
        model = _hf_model(kind, False)
        _save_hf(model, root / f"{kind}_hf", "safetensors")
        _tokenizer(kind, root / f"{kind}_hf")
        _convert_folder(kind, root / f"{kind}_hf", root / kind, cli)
        out[kind] = (root / kind, model)
    return out


def test_prompt_suffix_rules():
    from opensora_ms.models.text_encoders import TextEncoderError, add_fps_info, video_prompt

    assert video_prompt("raining, sea") == "raining, sea. 24 FPS. 4 motion score."
    assert video_prompt("  a cat on a mat.  ", fps=16, motion_score=7) == "a cat on a mat. 16 FPS. 7 motion score."
    assert video_prompt("a cat. 24 FPS.") == "a cat. 24 FPS. 4 motion score."          # fps not added twice
    assert video_prompt("a cat", motion_score=None) == "a cat. 24 FPS."
    assert add_fps_info("FPS. x") == "FPS. x. 24 FPS."
    with pytest.raises(TextEncoderError, match="dynamic"):
        video_prompt("a cat", motion_score="dynamic")


def test_upstream_call_pads_and_does_not_mask(encoders):
    """T5: 512 tokens, no attention mask (padding is attended: masking it changes the result); CLIP: 77 tokens,
    pooled at the first EOT; encode_prompts gives txt / y_vec; the jit path equals PyNative."""
    import torch

    from opensora_ms.models.text_encoders import encode_prompts, load_text_encoder, numpy_f32

    t5 = load_text_encoder(encoders["t5"][0])
    clip = load_text_encoder(encoders["clip"][0], jit=True)
    ids_t5, ids_clip = t5.tokenize(PROMPTS), clip.tokenize(PROMPTS)
    assert ids_t5.shape == (3, 512) and ids_clip.shape == (3, 77)
    assert (ids_t5[:, -1] == 0).all() and (ids_clip[:, -1] == 119).all()       # padded with <pad> / <|endoftext|>
    e = encode_prompts(PROMPTS, t5, clip)
    txt, y = numpy_f32(e["txt"]), numpy_f32(e["y_vec"])
    assert txt.shape == (3, 512, 48) and y.shape == (3, 40)
    tm, cm = encoders["t5"][1], encoders["clip"][1]
    with torch.no_grad():
        nomask = tm(input_ids=torch.from_numpy(ids_t5)).last_hidden_state.numpy()
        masked = tm(input_ids=torch.from_numpy(ids_t5),
                    attention_mask=torch.from_numpy((ids_t5 != 0).astype(np.int64))).last_hidden_state.numpy()
        pooled = cm(input_ids=torch.from_numpy(ids_clip)).pooler_output.numpy()
        last = cm(input_ids=torch.from_numpy(ids_clip)).last_hidden_state.numpy()
    assert _rel(txt, nomask) < 1e-4 and _rel(txt, masked) > 1e-2   # fp32 port at 512 tokens: ~1e-5
    assert _rel(y, pooled) < 1e-5
    first_eot = (ids_clip == 119).argmax(-1)
    assert np.array_equal(y, numpy_f32(clip.encode_ids(ids_clip))) and _rel(y, last[np.arange(3), first_eot]) < 1e-5
    t5j = load_text_encoder(encoders["t5"][0], jit=True)
    assert _rel(numpy_f32(t5j(PROMPTS)), txt) < 1e-6
    # the ports also take transformers' attention_mask (upstream passes none)
    from mindspore import Tensor

    got = t5.model(Tensor(ids_t5), Tensor((ids_t5 != 0).astype(np.int64)), False)["last_hidden_state"]
    assert _rel(numpy_f32(got), masked) < 1e-4
    keep = np.ones_like(ids_clip)
    keep[:, 40:] = 0
    with torch.no_grad():
        want = cm(input_ids=torch.from_numpy(ids_clip), attention_mask=torch.from_numpy(keep)).last_hidden_state.numpy()
    got = clip.model(Tensor(ids_clip), Tensor(keep), False)["last_hidden_state"]
    assert _rel(numpy_f32(got)[:, :40], want[:, :40]) < 1e-5


def test_t5_folder_with_spiece_model_only(encoders, tmp_path):
    """google/t5-v1_1-xxl ships `spiece.model` without tokenizer.json: the encoder folder loads with it, and the
    ids are sentencepiece's own (+ </s>, padded with <pad>) and the fast tokenizer's."""
    import sentencepiece as spm

    from opensora_ms.models.text_encoders import load_text_encoder
    from tiny_tokenizers import build_t5_spiece_folder

    folder = tmp_path / "t5_spiece"
    shutil.copytree(encoders["t5"][0], folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(build_t5_spiece_folder(folder)))
    enc = load_text_encoder(folder)
    ids = enc.tokenize(PROMPTS)
    for row, text in zip(ids, PROMPTS):
        want = sp.encode(text) + [1]
        assert list(row[: len(want)]) == want and (row[len(want):] == 0).all()
    assert np.array_equal(ids, load_text_encoder(encoders["t5"][0]).tokenize(PROMPTS))


def test_bad_folders_give_one_clear_error(encoders, tmp_path):
    from converter.errors import UserError
    from opensora_ms.models.text_encoders import load_text_encoder

    t5_dir = encoders["t5"][0]
    with pytest.raises(UserError, match="not a directory"):
        load_text_encoder(tmp_path / "nope")
    bad = tmp_path / "no_config"
    shutil.copytree(t5_dir, bad)
    (bad / "config.json").unlink()
    with pytest.raises(UserError, match="config.json: no such file"):
        load_text_encoder(bad)
    with pytest.raises(UserError, match="a t5 config, but a clip encoder"):
        load_text_encoder(t5_dir, kind="clip")
    unconverted = t5_dir.parent / "t5_hf"
    with pytest.raises(UserError, match="msconv convert .* --mapping t5_encoder"):
        load_text_encoder(unconverted)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(t5_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        load_text_encoder(no_tok)
    big = tmp_path / "big_vocab"
    shutil.copytree(encoders["clip"][0], big)
    for f in big.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    from tiny_tokenizers import build_clip_tokenizer

    build_clip_tokenizer(big, vocab_size=160)
    with pytest.raises(UserError, match="160 tokens but the model's vocab_size is 120"):
        load_text_encoder(big)


# ---------------------------------------------------------------------------------------------- bf16 (emulated)
def _worker(out_path: str) -> None:
    """Runs with MSCONV_DEVICE=CPU-bf16: the text ops on bf16 inputs, and both tiny encoders built in bf16."""
    import mindspore as ms
    from mindspore import Tensor

    from converter.mapping import load_mapping
    from opensora_ms.loading import load_strict
    from opensora_ms.ops import device as D
    from opensora_ms.ops import text as ot

    assert D.BF16_EMU
    rng = np.random.default_rng(3)
    x = (3 * rng.standard_normal((4, 300))).astype(np.float32)
    xb = Tensor(x).astype(ms.bfloat16)
    res = {"x": x}
    ops_ = (("gelu_new", ot.gelu_new), ("quick_gelu", ot.quick_gelu), ("scale", lambda t: ot.mul_scalar(t, 0.3)))
    for name, fn in ops_:
        res[name] = fn(xb).astype(ms.float32).asnumpy()
    for kind in ("t5", "clip"):
        cfg, weights, ids = _case(kind)
        A = _adapter(kind)
        net = A.build_ms(cfg)
        res[f"{kind}/dtype"] = np.array(str(next(iter(net.get_parameters())).dtype))
        load_strict(net, load_mapping(MAPPING[kind]).convert({k: v.numpy() for k, v in weights.items()}))
        for k, v in A.run_ms(net, {"input_ids": ids}).items():
            res[f"{kind}/{k}"] = v
    np.savez(out_path, **res)


@pytest.fixture(scope="module")
def bf16_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "res.npz"
    env = dict(os.environ, MSCONV_DEVICE="CPU-bf16", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, str(out)], cwd=str(ROOT), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(out))


def test_bf16_activations_round_like_torch(bf16_results):
    """gelu_new (transformers' NewGELU chain), quick-GELU and a scalar product on bf16 equal torch's bf16 bits
    (MindSpore alone rounds a Python scalar to bf16 first)."""
    import torch
    from transformers.activations import NewGELUActivation, QuickGELUActivation

    xb = torch.from_numpy(bf16_results["x"]).bfloat16()
    ops_ = (("gelu_new", NewGELUActivation()), ("quick_gelu", QuickGELUActivation()), ("scale", lambda t: t * 0.3))
    for name, fn in ops_:
        assert np.array_equal(bf16_results[name], fn(xb).float().numpy()), name


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_bf16_encoders_within_the_oracle_ratio(kind, bf16_results):
    """Built in bf16 (model_dtype() in CPU-bf16), the port's error against transformers in float64 is at most 2x
    transformers' own bf16 error (parity/thresholds.yaml's oracle ratio), for every output; CLIP reproduces the
    shared case's stored bf16 pooler_output bit for bit."""
    import torch
    from safetensors.torch import load_file

    A = _adapter(kind)
    cfg, weights, ids = _case(kind)
    assert str(bf16_results[f"{kind}/dtype"]) == "BFloat16"
    ref = {}
    for dt in (torch.float64, torch.bfloat16):
        m = A.build_torch(cfg, dtype=dt)
        m.load_state_dict({k: v.to(dt) for k, v in weights.items()})
        with torch.backends.mkldnn.flags(enabled=False):
            ref[dt] = A.run_torch(m, {"input_ids": ids})
    rmse = lambda a, b: float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))  # noqa: E731
    for k, oracle in ref[torch.float64].items():
        port, torch_bf16 = rmse(bf16_results[f"{kind}/{k}"], oracle), rmse(ref[torch.bfloat16][k], oracle)
        assert port <= 2 * torch_bf16, (k, port, torch_bf16)
    if kind == "clip":
        stored = load_file(str(TINY / "clip_tiny.outputs.safetensors"))["bf16/pooler_output"].float().numpy()
        assert np.array_equal(bf16_results["clip/pooler_output"], stored)


if __name__ == "__main__":   # the CPU-bf16 worker (see bf16_results)
    _worker(sys.argv[1])
