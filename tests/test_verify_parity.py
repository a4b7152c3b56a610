"""`msconv verify OUT --parity` (parity/blockwise.py): a synthetic checkpoint at the real MMDiT widths (hidden 3072,
24 heads, MLP 12288; 1 double + 1 single block; seeded non-zero bf16 values) through convert -> verify --parity,
a wrong converted tensor, missing files, and a wrong mapping on the tiny case."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, TINY, run_msconv

TOKENS = "64"  # image tokens per block input (text: 16); the weights, not the tokens, are the point here


def _bench():
    spec = importlib.util.spec_from_file_location("verify_bench", ROOT / "benchmarks" / "verify_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    """(source file, converted folder) of the 1 + 1 block synthetic Open-Sora v2 MMDiT at the real widths."""
    from typer.testing import CliRunner

    import cli as cli_module

    d = tmp_path_factory.mktemp("verify_real")
    src = d / "Open_Sora_v2_1+1.safetensors"
    _bench().write_synthetic(src, double=1, single=1, seed=0)
    out = d / "ckpt"
    r = CliRunner().invoke(cli_module.app, ["convert", str(src), "--mapping", "mmdit_opensora_v2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    yield src, out
    shutil.rmtree(d, ignore_errors=True)


def test_synthetic_source_is_seeded_and_real_width(real_width):
    from converter.safetensors_io import SafetensorsFile
    from converter.tensor import decode

    f = SafetensorsFile(real_width[0])
    assert f.tensors["double_blocks.0.img_mlp.0.weight"].shape == (12288, 3072)
    assert f.tensors["single_blocks.0.v_mlp.weight"].shape == (3072 + 12288, 3072)
    q = decode(f.storage("double_blocks.0.img_attn.q_proj.weight"), "BF16")
    k = decode(f.storage("double_blocks.0.img_attn.k_proj.weight"), "BF16")
    assert np.count_nonzero(q) == q.size and not np.array_equal(q, k)   # never zeros, every tensor its own
    assert 0.3 < float(np.sqrt((q.astype(np.float64) ** 2).mean()) * np.sqrt(3072)) < 3   # ~ 1/sqrt(fan_in)


def test_verify_parity_real_widths(real_width, tmp_path):
    _, out = real_width
    rep = tmp_path / "rep"
    # its own process, as a user runs it: the peak RSS below is that run's, whatever this test session holds
    r = run_msconv("verify", out, "--parity", "--tokens", TOKENS, "--report", rep, "--json", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)["parity"]
    assert info["verdict"] == "pass" and info["blocks"] == 4 and info["weights_checked"] == 50
    assert info["weights_differ"] == 0 and info["first_failure"] is None
    for line in ("[1/4] embedders", "[2/4] double_blocks.0", "[3/4] single_blocks.0", "[4/4] final_layer"):
        assert line in r.stderr   # progress, one line per block as it goes
    doc = json.loads((rep / "report.json").read_text())
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["double_blocks.0"]["shape"] == [1, 64 + 16, 3072] and rows["single_blocks.0"]["shape"] == [1, 80, 3072]
    assert rows["final_layer"]["shape"] == [1, 64, 64]
    assert {"img_in", "cond_in", "time_in", "vector_in", "txt_in", "pe_embedder"} <= set(rows)
    assert all(t["verdict"] == "pass" and t["max_rel"] < 1e-4 for t in doc["tensors"])
    cfg = doc["blockwise"]["components"]["mmdit"]["config"]
    assert cfg["hidden_size"] == 3072 and cfg["num_heads"] == 24 and cfg["axes_dim"] == [16, 56, 56]
    assert cfg["fused_qkv"] is False and cfg["use_liger_rope"] is True   # the source layout, from the manifest
    assert 0 < doc["blockwise"]["peak_rss"] < 6e9
    assert all((rep / f).is_file() for f in ("report.md", "report.html", "junit.xml"))


def _rewrite_tensor(out, key, fn, rehash: bool):
    """Apply `fn` to one converted tensor's values in place; with `rehash`, record the new bytes' sha256 in the
    manifest (a converter that wrote wrong bytes would have hashed them); returns a restore function."""
    from converter.safetensors_io import SafetensorsFile
    from converter.tensor import decode, encode

    path = out / "model.safetensors"
    info = SafetensorsFile(path).tensors[key]
    man_path = out / "msconv-manifest.json"
    man_text = man_path.read_text()
    with open(path, "r+b") as f:
        f.seek(info.offset)
        old = f.read(info.nbytes)
        st = np.frombuffer(old, np.uint16).reshape(info.shape)
        new = encode(fn(decode(st, info.dtype)).astype(np.float32), info.dtype).tobytes()
        assert new != old
        f.seek(info.offset)
        f.write(new)
    if rehash:
        man = json.loads(man_text)
        for t in man["tensors"]:
            if t["key"] == key:
                t["sha256"] = hashlib.sha256(new).hexdigest()
        man_path.write_text(json.dumps(man))

    def restore():
        with open(path, "r+b") as f:
            f.seek(info.offset)
            f.write(old)
        man_path.write_text(man_text)
    return restore


def test_wrong_converted_tensor_fails_naming_block_and_tensor(real_width, cli, tmp_path):
    _, out = real_width
    key = "single_blocks.0.linear2.weight"
    restore = _rewrite_tensor(out, key, lambda v: v * 2, rehash=False)
    try:
        r = cli("verify", out, "--parity")   # bytes differ from those written: the integrity check names the tensor
        assert r.exit_code == 2 and key in r.stderr and "sha256" in r.stderr
    finally:
        restore()
    restore = _rewrite_tensor(out, key, lambda v: v * 2, rehash=True)   # hashes agree: only parity can tell
    try:
        rep = tmp_path / "rep"
        r = cli("verify", out, "--parity", "--tokens", TOKENS, "--only", "single_blocks.*", "--report", rep)
        assert r.exit_code == 2, r.output   # the files are wrong (not msconv's computation)
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "single_blocks.0:" in err[0] and key in err[0], r.stderr
        doc = json.loads((rep / "report.json").read_text())
        assert doc["verdict"] == "fail" and doc["first_divergence"]["name"] == "single_blocks.0"
        bad = [t for t in doc["tensors"] if t["verdict"] == "fail"]
        assert [t["name"] for t in bad] == ["single_blocks.0", key] and bad[1]["kind"] == "weight"
        assert bad[0]["max_rel"] > 1e-2
    finally:
        restore()


def test_missing_files_are_one_line_errors(real_width, cli, tmp_path):
    src, out = real_width
    r = cli("verify", out, "--parity", "--source", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ") and "nope.safetensors" in r.stderr
    moved = tmp_path / "moved.safetensors"   # the source recorded in the manifest is gone
    src.rename(moved)
    try:
        r = cli("verify", out, "--parity")
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "--source" in r.stderr
        assert str(src) in r.stderr
    finally:
        moved.rename(src)
    r = cli("verify", out, "--parity", "--components", "t5")
    assert r.exit_code == 2 and "not in this conversion" in r.stderr and r.stderr.strip().count("\n") == 0
    shard, away = out / "model.safetensors", tmp_path / "shard.safetensors"   # a converted file is gone
    shard.rename(away)
    try:
        r = cli("verify", out, "--parity")
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "missing" in r.stderr
    finally:
        away.rename(shard)


def test_wrong_mapping_fails_as_our_bug(tmp_path, cli):
    """A mapping that fuses q/k/v in the wrong order converts 'faithfully' (every tensor equals its mapped source)
    but the MindSpore block computes something else: exit 1 (msconv's bug), the block named."""
    import yaml

    spec = yaml.safe_load((ROOT / "mappings" / "mmdit_opensora_v2.yaml").read_text())
    for rule in spec["rules"]:
        if rule.get("target") == "double_blocks.{i}.img_attn.qkv.{p}":
            s = rule["source"]
            rule["source"] = [s[1], s[0], s[2]]   # k, q, v
    spec["target"].pop("inventory")
    mp = tmp_path / "mmdit_opensora_v2.yaml"
    mp.write_text(yaml.safe_dump(spec))
    out = tmp_path / "ckpt"
    r = cli("convert", TINY / "mmdit_tiny.weights.safetensors", "--mapping", mp, "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--parity", "--tokens", "16", "--only", "double_blocks.0", "--report", tmp_path / "rep")
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "double_blocks.0:" in err[0] and "equals the mapped source" in err[0]


@pytest.mark.parametrize("model,mapping,extra,only,units", [
    ("hunyuan_vae", "hunyuan_vae", ["--config", TINY / "hunyuan_vae_tiny.config.json"],
     "encoder.down_blocks.0,encoder.mid_block,decoder.up_blocks.0",
     ["encoder.down_blocks.0", "encoder.mid_block", "decoder.up_blocks.0"]),
    ("t5", "t5_encoder", ["--allow-partial"], None,
     ["encoder.embed_tokens", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm"]),
    ("clip", "clip_text", ["--allow-partial"], None,
     ["embeddings", "encoder.layers.0", "encoder.layers.1", "final_layer_norm"]),
    ("dc_ae", "video_dc_ae", ["--allow-partial"], "encoder.stages.3,decoder.project_in,decoder.stages.0",
     ["encoder.stages.3", "decoder.project_in", "decoder.stages.0"]),
])
def test_other_components_blockwise(model, mapping, extra, only, units, cli, tmp_path):
    """The VAE (block by block, the mid block under its causal mask), T5 and CLIP (layer by layer) on the tiny
    cases' weights: every listed unit compared, every converted tensor equal to its mapped source."""
    out = tmp_path / "ckpt"
    r = cli("convert", TINY / f"{model}_tiny.weights.safetensors", "--mapping", mapping, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    args = ["verify", out, "--parity", "--tokens", "24", "--report", tmp_path / "rep", "--json"]
    if model != "hunyuan_vae":   # e.g. CLIP's head count is no parameter shape: give the case's config
        args += ["--config", TINY / f"{model}_tiny.config.json"]
    r = cli(*args, *(["--only", only] if only else []))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [t["name"] for t in doc["tensors"]] == units
    assert all(t["verdict"] == "pass" and t["max_rel"] < 1e-4 for t in doc["tensors"])
    c = doc["counts"]
    assert c["weights_checked"] > 0 and c["weights_differ"] == 0


def test_flux_ae_real_widths(cli, tmp_path):
    """The Flux 2D AE has no tiny case: its real checkpoint's tensor list (ch 128, up to 512 channels) with seeded
    values, two of its units (the mid block with its attention, the full-resolution up level)."""
    bench = _bench()
    src = tmp_path / "ae.safetensors"
    bench.write_synthetic(src, manifest=bench._manifest("flux1_dev_ae.json"))
    out = tmp_path / "ckpt"
    r = cli("convert", src, "--mapping", "flux_ae", "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--parity", "--only", "encoder.mid,decoder.up.0", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [t["name"] for t in doc["tensors"]] == ["encoder.mid", "decoder.up.0"]
    assert doc["tensors"][1]["shape"] == [1, 128, 64, 64] and doc["counts"]["weights_differ"] == 0


def test_pipeline_layout_components(tmp_path, cli):
    """A pipeline conversion (MMDiT under `mmdit.`, VAE under `vae.`): the prefixes are followed, --components picks
    one model, --config gives it the config the pipeline conversion could only infer (the tiny VAE's 4 groups)."""
    out = tmp_path / "ckpt"
    r = cli("convert", TINY / "pipeline_t2v_tiny.weights.safetensors", "--mapping", "pipeline_opensora_v2", "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--parity", "--tokens", "16", "--components", "mmdit", "--only", "mmdit.double_blocks.1",
            "--report", tmp_path / "r1")
    assert r.exit_code == 0, r.output
    r = cli("verify", out, "--parity", "--components", "vae", "--config", TINY / "hunyuan_vae_tiny.config.json",
            "--only", "vae.encoder.mid_block", "--report", tmp_path / "r2")
    assert r.exit_code == 0, r.output
    names = [[t["name"] for t in json.loads((tmp_path / d / "report.json").read_text())["tensors"]] for d in ("r1", "r2")]
    assert names == [["mmdit.double_blocks.1"], ["vae.encoder.mid_block"]]
    r = cli("verify", out, "--parity", "--config", TINY / "hunyuan_vae_tiny.config.json")
    assert r.exit_code == 2 and "--config describes one model" in r.stderr
