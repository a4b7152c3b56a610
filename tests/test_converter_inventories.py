"""Issue 9 §3 for the DC-AE, the Flux AE, T5 and CLIP: a conversion of a checkpoint that is not the real one is
checked against the model's inventory at the config inferred from the checkpoint (converter.targets.MODELS),
so a missing tensor or a wrong shape fails with exit 2 naming the key instead of needing --allow-partial.

Sources are in upstream / Hugging Face names: the shared tiny cases' weights (DC-AE, T5, CLIP) and the Flux AE
torch reference at the adapter's tiny preset."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY
from converter import targets
from converter.errors import MappingError
from converter.inventory import load_inventory
from converter.safetensors_io import save_file
from converter.sources import Source

# model -> (mapping, config class "module:Class", fields whose value the shapes decide (None: every field but
# those `SKIP` lists), a tensor inference does not read, a tensor whose shape is then changed)
CASES = {
    "dc_ae": ("video_dc_ae", "opensora_ms.configs:DCAEConfig", None,
              "decoder.project_out.op_list.2.conv.bias",
              "encoder.stages.3.op_list.0.context_module.main.proj.norm.weight"),
    "flux_ae": ("flux_ae", "opensora_ms.configs:AutoEncoderConfig", None,
                "encoder.mid.attn_1.proj_out.bias", "decoder.norm_out.weight"),
    "t5": ("t5_encoder", "opensora_ms.models.t5:T5Config",
           ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "feed_forward_proj", "is_gated_act", "dense_act_fn"),
           "encoder.block.1.layer.1.DenseReluDense.wo.weight", "encoder.final_layer_norm.weight"),
    # the head count has no parameter of its own (clip.infer_config: hidden / 64, else 1): not compared
    "clip": ("clip_text", "opensora_ms.models.clip:CLIPTextConfig",
             ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"),
             "encoder.layers.1.mlp.fc2.bias", "final_layer_norm.bias"),
}
# no parameter carries these; the Flux AE tiny preset's resolution (32) differs from the default (256)
SKIP = {"resolution", "from_pretrained", "cache_dir", "pretrained_path"}
TARGETS = ROOT / "mappings" / "targets"


def _cls(model):
    import importlib

    mod, _, name = CASES[model][1].partition(":")
    return getattr(importlib.import_module(mod), name)


def _fields(model, cfg: dict) -> dict:
    """The config's fields the parameter shapes decide, normalised through the config class."""
    d = dataclasses.asdict(_cls(model).from_dict(cfg))
    keep = CASES[model][2]
    return {k: v for k, v in d.items() if (k in keep if keep else k not in SKIP)}


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    """model -> (source safetensors in upstream names, the true config)."""
    out = {}
    for model, cname in (("dc_ae", "DCAEConfig"), ("t5", "T5Config"), ("clip", "CLIPTextConfig")):
        cfg = json.loads((TINY / f"{model}_tiny.config.json").read_text())[cname]
        out[model] = (TINY / f"{model}_tiny.weights.safetensors", cfg)
    from parity.adapters import flux_ae as A

    cfg = dict(A.PRESETS["tiny"])
    sd = {k: v.detach().numpy() for k, v in A.build_torch(cfg).state_dict().items()}
    p = tmp_path_factory.mktemp("flux_ae") / "flux_ae_tiny.safetensors"
    save_file(sd, p)
    out["flux_ae"] = (p, cfg)
    return out


def _edited(tmp_path: Path, src: Path, edit) -> Path:
    sd = Source(src).load()
    edit(sd)
    p = tmp_path / "edited.safetensors"
    save_file(sd, p)
    return p


def _fails(cli, tmp_path, src, mapping, *needles):
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", mapping, "--out", out)
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    return err


@pytest.mark.parametrize("model", list(CASES))
def test_tiny_converts_against_the_inferred_inventory(cli, tmp_path, tiny_cases, model):
    src, true_cfg = tiny_cases[model]
    mapping = CASES[model][0]
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", mapping, "--out", out)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "msconv-manifest.json").read_text())
    assert man["target"]["kind"] == "inferred" and man["allow_partial"] is False and man["partial_problems"] == []
    (part,) = man["target"]["parts"]
    assert part["model"] == model
    assert _fields(model, part["config"]) == _fields(model, true_cfg)
    want = targets.model_inventory(model, true_cfg)  # the model at the true config: every tensor, every shape
    assert {k: s for k, (s, _) in Source(out).inventory().items()} == {k: s for k, (s, _) in want.items()}


@pytest.mark.parametrize("model", list(CASES))
def test_a_missing_tensor_fails_naming_it(cli, tmp_path, tiny_cases, model):
    src, _ = tiny_cases[model]
    mapping, _, _, gone, _ = CASES[model]
    bad = _edited(tmp_path, src, lambda sd: sd.pop(gone))
    _fails(cli, tmp_path, bad, mapping, str(bad), f"target {gone!r}", "produced by no rule")


@pytest.mark.parametrize("model", list(CASES))
def test_a_wrong_shape_fails_naming_it(cli, tmp_path, tiny_cases, model):
    src, _ = tiny_cases[model]
    mapping, _, _, _, key = CASES[model]

    def edit(sd):
        (n,) = sd[key].shape
        sd[key] = np.ones(n - 1, np.float32)

    bad = _edited(tmp_path, src, edit)
    n = Source(src).inventory()[key][0][0]
    _fails(cli, tmp_path, bad, mapping, f"{key!r} would be [{n - 1}] but the target expects [{n}]")


@pytest.mark.parametrize("model", list(CASES))
def test_inferred_config_of_the_real_inventory_gives_it_back(model):
    """infer_config on the shipped real-size inventory -> a config whose param_inventory is that inventory."""
    mapping = CASES[model][0]
    shipped = load_inventory(TARGETS / f"{mapping}.json")
    real_cfg = json.loads((TARGETS / f"{mapping}.json").read_text())["config"]
    cfg = targets._resolve(targets.MODELS[model].infer_config)(shipped)
    inv = targets.model_inventory(model, cfg)
    assert list(inv) == list(shipped)  # same keys, in registration order
    assert {k: s for k, (s, _) in inv.items()} == {k: tuple(s) for k, (s, _) in shipped.items()}
    real_cfg.pop("type", None)  # the Flux AE's upstream registry name, not a config field
    assert _fields(model, cfg) == _fields(model, real_cfg)


def _five_stage_dc_ae() -> dict:
    from parity.adapters.dc_ae import PRESETS

    cfg = json.loads(json.dumps(PRESETS["tiny"]))
    for side in ("encoder", "decoder"):
        for k in ("width_list", "depth_list", "block_type"):
            cfg[side][k] = cfg[side][k][1:]
        t = "temporal_downsample" if side == "encoder" else "temporal_upsample"
        cfg[side][t] = [False, False, True, True, False]
    cfg["spatial_compression_ratio"] = 16
    return cfg


def test_dc_ae_of_another_stage_count_needs_its_config(cli, tmp_path):
    """Temporal resampling has no parameter: a 5-stage DC-AE fails asking for --config, and converts with it."""
    from opensora_ms.models.dc_ae import infer_config, param_inventory

    cfg = _five_stage_dc_ae()
    inv = param_inventory(cfg)
    with pytest.raises(MappingError, match=r"5 encoder / 5 decoder stages.*--config FILE\.json"):
        infer_config(inv)
    src = tmp_path / "five.safetensors"
    save_file({k: np.zeros(s, np.float32) for k, (s, _) in inv.items()}, src)
    _fails(cli, tmp_path, src, "video_dc_ae", "5 encoder / 5 decoder stages", "--config FILE.json")
    cfg_file = tmp_path / "five.config.json"
    cfg_file.write_text(json.dumps({"DCAEConfig": cfg}))
    out = tmp_path / "ok"
    res = cli("convert", src, "--mapping", "video_dc_ae", "--out", out, "--config", cfg_file)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "msconv-manifest.json").read_text())
    assert man["target"]["kind"] == "config" and man["target"]["parts"][0]["config"] == cfg


@pytest.mark.parametrize("model, key", [("dc_ae", "encoder.project_in.conv.weight"),
                                        ("flux_ae", "encoder.conv_in.weight")])
def test_a_shape_inference_cannot_read_is_one_line_error(cli, tmp_path, tiny_cases, model, key):
    """A stem conv weight of the wrong rank: inference says which key, never a traceback."""
    src, _ = tiny_cases[model]
    bad = _edited(tmp_path, src, lambda sd: sd.__setitem__(key, np.ones(4, np.float32)))
    _fails(cli, tmp_path, bad, CASES[model][0], f"cannot infer the {model} config", f"{key!r} has shape [4]")
