"""Issue 9 §3: a conversion never silently writes an incomplete checkpoint.

Every conversion is checked against the MindSpore model's parameter inventory for the config the checkpoint
implies (shipped for the real checkpoint, else inferred from the shapes or given with --config); --allow-partial
is explicit and recorded; empty sources fail; manifests and inventories ship inside the package; `msconv verify`
re-hashes what was written and checks it against the model's inventory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MANIFESTS, ROOT, TINY
from converter.inventory import load_inventory
from converter.mapping import MAPPINGS_DIR, load_mapping
from converter.safetensors_io import build_header, save_file
from converter.sources import Source

MMDIT_TINY = TINY / "mmdit_tiny.weights.safetensors"


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_under(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.msconv-*")), list(out.parent.iterdir())


def _tiny(tmp_path: Path, name: str, edit) -> Path:
    """mmdit_tiny's weights with `edit(state)` applied, saved as <name>.safetensors."""
    sd = Source(MMDIT_TINY).load()
    edit(sd)
    p = tmp_path / f"{name}.safetensors"
    save_file(sd, p)
    return p


def _convert_fails(cli, tmp_path, src, *needles, mapping="mmdit_opensora_v2", extra=()):
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", mapping, "--out", out, *extra)
    err = _one_line_error(res, str(src), *needles)
    _nothing_under(out)
    return err


# -- the inventory check -----------------------------------------------------------------------------------
def test_missing_final_layer_bias_fails_naming_it(cli, tmp_path):
    src = _tiny(tmp_path, "nobias", lambda sd: sd.pop("final_layer.linear.bias"))
    _convert_fails(cli, tmp_path, src, "target 'final_layer.linear.bias' [64] is produced by no rule")
    _one_line_error(cli("convert", src, "--mapping", "mmdit_opensora_v2", "--dry-run"), "final_layer.linear.bias")
    _one_line_error(cli("validate", "mmdit_opensora_v2", "--source", src), "final_layer.linear.bias")


def test_extra_tensor_fails_naming_it(cli, tmp_path):
    src = _tiny(tmp_path, "extra", lambda sd: sd.__setitem__("final_layer.linear.scale", np.ones(64, np.float32)))
    _convert_fails(cli, tmp_path, src, "'final_layer.linear.scale' [64] which the target inventory does not have")


def test_wrong_shape_fails_naming_it(cli, tmp_path):
    src = _tiny(tmp_path, "shape", lambda sd: sd.__setitem__("final_layer.linear.bias", np.ones(63, np.float32)))
    _convert_fails(cli, tmp_path, src, "'final_layer.linear.bias' would be [63] but the target expects [64]")


def test_wrong_dtype_fails_naming_it(cli, tmp_path):
    src = _tiny(tmp_path, "dtype", lambda sd: sd.__setitem__("final_layer.linear.bias", np.ones(64, np.int32)))
    _convert_fails(cli, tmp_path, src, "'final_layer.linear.bias' is I32 but the target expects F32 (different kind)")


def test_missing_part_of_a_block_fails(cli, tmp_path):
    """Removing a block's MLP leaves the block count (and so the inferred config) unchanged: the MLP is missing."""
    def cut(sd):
        for k in [k for k in sd if k.startswith("double_blocks.1.img_mlp.")]:
            del sd[k]
    src = _tiny(tmp_path, "nomlp", cut)
    _convert_fails(cli, tmp_path, src, "problem(s)", "double_blocks.1.img_mlp.0.weight")


def _drop_second_blocks(sd):
    for k in [k for k in sd if k.startswith(("double_blocks.1.", "single_blocks.1."))]:
        del sd[k]


def test_other_size_converts_against_its_inferred_inventory(cli, tmp_path):
    """1 double + 1 single block, hidden 64: not the real checkpoint, so the model's inventory at the inferred
    config is the target; it converts, records the config, and verifies."""
    src = _tiny(tmp_path, "one_one", _drop_second_blocks)
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", "mmdit_opensora_v2", "--out", out)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "msconv-manifest.json").read_text())
    assert man["target"]["kind"] == "inferred" and man["allow_partial"] is False and man["partial_problems"] == []
    (part,) = man["target"]["parts"]
    assert part["model"] == "mmdit" and part["config"]["depth"] == 1 and part["config"]["depth_single_blocks"] == 1
    assert part["config"]["hidden_size"] == 64 and part["config"]["num_heads"] == 2
    from opensora_ms.models.mmdit import param_inventory

    assert set(Source(out).inventory()) == set(param_inventory(part["config"]))
    res = cli("verify", out)
    assert res.exit_code == 0 and "ok — 50 tensors" in res.stdout, res.output


def test_whole_block_truncation_is_caught_with_the_config(cli, tmp_path):
    """Inference cannot know a block that is wholly absent was meant to be there; --config can."""
    src = _tiny(tmp_path, "one_one", _drop_second_blocks)
    cfg = TINY / "mmdit_tiny.config.json"  # depth 2 + 2 (a case config: {"MMDiTConfig": {...}})
    _convert_fails(cli, tmp_path, src, "double_blocks.1.", extra=("--config", cfg))
    out = tmp_path / "ok"
    res = cli("convert", MMDIT_TINY, "--mapping", "mmdit_opensora_v2", "--out", out, "--config", cfg)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "msconv-manifest.json").read_text())["target"]["kind"] == "config"


def test_allow_partial_passes_and_is_recorded(cli, tmp_path):
    src = _tiny(tmp_path, "nobias", lambda sd: sd.pop("final_layer.linear.bias"))
    out = tmp_path / "out"
    res = cli("convert", src, "--mapping", "mmdit_opensora_v2", "--out", out, "--allow-partial")
    assert res.exit_code == 0, res.output
    assert "--allow-partial" in res.stderr and "final_layer.linear.bias" in res.stderr
    man = json.loads((out / "msconv-manifest.json").read_text())
    assert man["allow_partial"] is True
    assert any("final_layer.linear.bias" in p for p in man["partial_problems"])
    res = cli("verify", out)
    assert res.exit_code == 0 and "not checked: converted with --allow-partial" in res.stdout, res.output


def test_structural_problems_stay_errors_with_allow_partial(cli, tmp_path):
    src = _tiny(tmp_path, "unknown", lambda sd: sd.__setitem__("mystery.weight", np.ones(3, np.float32)))
    _convert_fails(cli, tmp_path, src, "'mystery.weight' [3] F32 matches no rule", extra=("--allow-partial",))


def test_model_without_inventory_fails_loudly(cli, tmp_path):
    import yaml

    d = yaml.safe_load((MAPPINGS_DIR / "mmdit_opensora_v2.yaml").read_text())
    d["name"], d["target"], d["source"] = "unregistered", {"model": "not_a_model"}, {}
    mp = tmp_path / "unregistered.yaml"
    mp.write_text(yaml.safe_dump(d))
    _convert_fails(cli, tmp_path, MMDIT_TINY, "no inventory for model 'not_a_model'", "--allow-partial", mapping=mp)
    res = cli("convert", MMDIT_TINY, "--mapping", mp, "--out", tmp_path / "p", "--allow-partial")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "msconv-manifest.json").read_text())["target"]["kind"] == "none"


def test_target_inventory_none_needs_allow_partial(cli, tmp_path):
    _convert_fails(cli, tmp_path, MMDIT_TINY, "no target inventory", "--allow-partial", extra=("--target-inventory", "none"))


def test_real_size_checkpoint_uses_the_shipped_inventory(cli, tmp_path):
    """A sparse file with the real checkpoint's 1082 headers (23.8 GB apparent, nothing on disk): the complete one
    plans against targets/mmdit_opensora_v2.json; without final_layer.linear.bias it fails naming it."""
    man = load_inventory(MAPPINGS_DIR / "manifests" / "mmdit_open_sora_v2.json")

    def sparse(inv, path):
        header, offs = build_header([(k, d, s) for k, (s, d) in inv.items()])
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + offs[-1][1])
        return path

    full = sparse(man, tmp_path / "real.safetensors")
    res = cli("convert", full, "--mapping", "mmdit_opensora_v2", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["target"]["kind"] == "shipped" and info["targets"] == 778
    cut = sparse({k: v for k, v in man.items() if k != "final_layer.linear.bias"}, tmp_path / "cut.safetensors")
    _one_line_error(cli("convert", cut, "--mapping", "mmdit_opensora_v2", "--dry-run"), "final_layer.linear.bias")


# -- inference reproduces the configs it must ---------------------------------------------------------------
REAL = [("mmdit_opensora_v2", "mmdit_open_sora_v2.json"), ("mmdit_opensora_v2_hc", "mmdit_open_sora_v2_video_dc_ae.json"),
        ("mmdit_flux_dev", "flux1_dev_t2i.json"), ("hunyuan_vae", "hunyuan_vae.json")]


@pytest.mark.parametrize("mapping, manifest", REAL, ids=[m for m, _ in REAL])
def test_inferred_inventory_at_the_real_size_equals_the_shipped_one(mapping, manifest):
    from converter.targets import expected_target

    m = load_mapping(mapping)
    src = dict(load_inventory(MANIFESTS / manifest))
    src["not.a.key"] = ((1,), "F32")  # no longer the manifest: forces inference (the structural plan ignores it here)
    t = expected_target(m, src, structural=lambda: m.plan(load_inventory(MANIFESTS / manifest)).inventory())
    assert t.kind == "inferred"
    assert t.inventory == m.target_inventory()


TINY_CASES = [("mmdit_tiny", "mmdit_opensora_v2", "MMDiTConfig", "mmdit"),
              ("mmdit_hc_tiny", "mmdit_opensora_v2_hc", "MMDiTConfig", "mmdit"),
              ("mmdit_flux_tiny", "mmdit_flux_dev", "MMDiTConfig", "mmdit"),
              ("hunyuan_vae_tiny", "hunyuan_vae", "AutoEncoder3DConfig", "hunyuan_vae")]


@pytest.mark.parametrize("case, mapping, cfg_name, model", TINY_CASES, ids=[c for c, *_ in TINY_CASES])
def test_inferred_inventory_equals_the_case_configs(case, mapping, cfg_name, model):
    from converter.targets import expected_target, model_inventory

    m = load_mapping(mapping)
    t = expected_target(m, Source(TINY / f"{case}.weights.safetensors").inventory())
    cfg = json.loads((TINY / f"{case}.config.json").read_text())[cfg_name]
    assert t.kind == "inferred" and t.inventory == model_inventory(model, cfg)


def test_mmdit_inventory_allocates_nothing():
    """param_inventory builds the 11.6B-parameter model under no_init_parameters: the process stays far below
    the 46 GB its fp32 weights would need."""
    code = ("import json, resource; from opensora_ms.models.mmdit import param_inventory; "
            f"cfg = json.load(open({str(MANIFESTS / 'mmdit_open_sora_v2.json')!r}))['config']; "
            "inv = param_inventory(cfg); import numpy as np; "
            "print(sum(int(np.prod(s)) for s, _ in inv.values()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    n, rss_kb = map(int, subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                        cwd=ROOT).stdout.split())
    assert n > 11_000_000_000 and rss_kb < 2_000_000, (n, rss_kb)


# -- empty sources ----------------------------------------------------------------------------------------
def _empty_st(tmp_path):
    p = tmp_path / "empty.safetensors"
    header, _ = build_header([])
    p.write_bytes(header)
    return p


def _empty_pt(tmp_path):
    import torch

    p = tmp_path / "empty.pt"
    torch.save({}, p)
    return p


def _empty_index(tmp_path):
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return p


@pytest.mark.parametrize("make, needle", [(_empty_st, "holds no tensors"), (_empty_pt, "holds no tensors"),
                                          (_empty_index, "weight_map lists no tensors")],
                         ids=["safetensors", "pt", "index"])
def test_empty_sources_fail(cli, tmp_path, make, needle):
    src = make(tmp_path)
    _convert_fails(cli, tmp_path, src, needle)
    _convert_fails(cli, tmp_path, src, needle, extra=("--allow-partial",))


# -- verify ---------------------------------------------------------------------------------------------
@pytest.fixture
def converted(cli, tmp_path):
    out = tmp_path / "conv"
    res = cli("convert", MMDIT_TINY, "--mapping", "mmdit_opensora_v2", "--out", out, "--shard-size", "600KB")
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


def test_verify_clean_output(cli, converted):
    res = cli("verify", converted)
    assert res.exit_code == 0, res.output
    assert "ok — 82 tensors in" in res.stdout and "82 parameters" in res.stdout


def test_verify_detects_a_flipped_byte(cli, converted):
    man = json.loads((converted / "msconv-manifest.json").read_text())
    t = next(t for t in man["tensors"] if t["key"] == "double_blocks.1.img_attn.qkv.weight")
    info = Source(converted / t["file"]).tensors[t["key"]]
    with open(converted / t["file"], "r+b") as f:
        f.seek(info.offset + 17)
        b = f.read(1)
        f.seek(info.offset + 17)
        f.write(bytes([b[0] ^ 0x01]))
    _one_line_error(cli("verify", converted), t["file"], "'double_blocks.1.img_attn.qkv.weight' data differ")


def test_verify_detects_a_deleted_shard(cli, converted):
    victim = sorted(converted.glob("model-*.safetensors"))[1]
    victim.unlink()
    _one_line_error(cli("verify", converted), f"{victim}: listed in msconv-manifest.json but missing")


def test_verify_detects_a_tensor_the_model_lacks(cli, converted):
    """Headers consistent with a doctored manifest still have to match the model's inventory."""
    man = json.loads((converted / "msconv-manifest.json").read_text())
    man["target"] = {"kind": "inferred", "description": "doctored",
                     "parts": [{"prefix": "", "model": "mmdit", "config": {**man["target"]["parts"][0]["config"], "depth": 3}}]}
    (converted / "msconv-manifest.json").write_text(json.dumps(man))
    _one_line_error(cli("verify", converted), "parameter 'double_blocks.2.", "is in no file")


def test_verify_refuses_a_folder_without_manifest(cli, tmp_path):
    _one_line_error(cli("verify", tmp_path), "no msconv-manifest.json")


def test_manifest_hashes_are_of_the_bytes_written(cli, tmp_path):
    """Renamed, fused, row-permuted and cast tensors: each recorded sha256 equals the sha256 of that tensor's bytes
    read back from the written file."""
    for src, mapping, extra in [(MMDIT_TINY, "mmdit_opensora_v2", ()), (TINY / "mmdit_flux_tiny.weights.safetensors",
                                                                       "mmdit_flux_dev", ("--dtype", "bf16"))]:
        out = tmp_path / mapping
        res = cli("convert", src, "--mapping", mapping, "--out", out, *extra)
        assert res.exit_code == 0, res.output
        man = json.loads((out / "msconv-manifest.json").read_text())
        tensors = Source(out).tensors
        for t in man["tensors"]:
            info = tensors[t["key"]]
            with open(info.path, "rb") as f:
                f.seek(info.offset)
                assert hashlib.sha256(f.read(info.nbytes)).hexdigest() == t["sha256"], t["key"]
            assert info.dtype == t["dtype"]
        for s in man["shards"]:
            raw = (out / s["file"]).read_bytes()
            n = struct.unpack("<Q", raw[:8])[0]
            assert hashlib.sha256(raw[:8 + n]).hexdigest() == s["header_sha256"]


# -- manifests ship inside the package ---------------------------------------------------------------------
def test_shipped_manifests_equal_shared():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from ship_manifests import referenced_manifests
    finally:
        sys.path.pop(0)
    names = referenced_manifests()
    assert {"mmdit_open_sora_v2.json", "mmdit_open_sora_v2_video_dc_ae.json", "flux1_dev_t2i.json",
            "hunyuan_vae.json"} <= set(names)
    for name in names:
        shipped = MAPPINGS_DIR / "manifests" / name
        assert shipped.is_file(), f"{name}: run python tools/ship_manifests.py"
        assert load_inventory(shipped) == load_inventory(MANIFESTS / name), name
        assert json.loads(shipped.read_text())["config"] == json.loads((MANIFESTS / name).read_text()).get("config")


def test_mappings_read_nothing_through_shared():
    for y in sorted(MAPPINGS_DIR.glob("*.yaml")):
        m = load_mapping(y)
        ref = m.source.get("manifest")
        if ref:
            p = m._resolve_file(ref, manifests=True)
            assert p is not None and MAPPINGS_DIR in p.resolve().parents, (y.name, p)


def test_non_editable_install_validates_a_conversion(tmp_path):
    """`pip install .` (a wheel, not editable) of a copy of the checkout into a folder of its own; run from
    elsewhere with only that folder and the venv's dependencies on the path (no site hooks, so the editable
    install of the checkout is invisible): validate, convert with an inferred inventory, verify."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv", "tests", "reports", ".git")
    for part in ("converter", "opensora_ms", "parity", "mappings"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for f in ("cli.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, cwd=tmp_path, capture_output=True)
    shutil.rmtree(src)
    assert (site / "mappings" / "manifests" / "mmdit_open_sora_v2.json").is_file()
    assert (site / "mappings" / "targets" / "mmdit_opensora_v2.json").is_file()
    import sysconfig

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    run = lambda *a: subprocess.run([sys.executable, "-S", "-m", "cli", *map(str, a)], cwd=tmp_path, env=env,
                                    capture_output=True, text=True)
    where = subprocess.run([sys.executable, "-S", "-c", "import converter, mappings; print(converter.__file__, mappings.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and str(site) in where, where
    res = run("validate", "mmdit_opensora_v2")
    assert res.returncode == 0 and "target inventory: mmdit_opensora_v2 target inventory" in res.stdout, res.stderr
    out = tmp_path / "out"
    res = run("convert", MMDIT_TINY, "--mapping", "mmdit_opensora_v2", "--out", out)
    assert res.returncode == 0 and "config inferred" in res.stdout, res.stderr
    res = run("verify", out)
    assert res.returncode == 0 and "82 parameters" in res.stdout, res.stderr
