"""`msconv download-and-convert` with the real huggingface_hub client against a local Hub (converter/hub_server.py)
serving a tiny repo laid out like hpcai-tech/Open-Sora-v2 (parity/synthetic_repo.py). Every case ends in success
or one `error:` line with nothing half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity import synthetic_repo
from converter.hub_server import HubServer, Repo

ROOT = Path(__file__).resolve().parents[1]
REPO = synthetic_repo.REPO_ID
BASE = ["Open_Sora_v2.safetensors", "hunyuan_vae.safetensors"]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    synthetic_repo.build(d / "repo")
    return {"repo": d / "repo", "configs": synthetic_repo.write_model_configs(d / "configs")}


@pytest.fixture
def hub(synthetic):
    with HubServer([Repo.from_folder(REPO, synthetic["repo"])]) as h:
        yield h


@pytest.fixture
def run(cli, synthetic, tmp_path):
    """msconv download-and-convert against `endpoint`, cache and out under tmp_path."""
    def go(endpoint, *extra, out="out", repo=REPO):
        args = ["download-and-convert", repo, "--endpoint", endpoint, "--cache-dir", tmp_path / "cache",
                "--out", tmp_path / out]
        for k, v in synthetic["configs"].items():
            args += ["--model-config", f"{k}={v}"]
        return cli(*args, *extra)
    return go


def one_error(r, *words) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("error:")]
    assert len(errs) == 1 and lines[-1] == errs[0], r.stderr
    for w in words:
        assert w in errs[0], errs[0]
    return errs[0]


def nothing_written(tmp_path, out="out"):
    o = tmp_path / out
    assert not o.exists() or not any(o.iterdir()), sorted(os.listdir(o))
    assert not [p for p in tmp_path.iterdir() if "msconv" in p.name], sorted(os.listdir(tmp_path))


def test_full_run_then_rerun_and_offline(hub, run, tmp_path, synthetic):
    r = run(hub.url)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    out = tmp_path / "out"
    man = json.loads((out / "msconv-manifest.json").read_text())
    rec = man["repos"][REPO]
    assert rec["sha"] == hub.repos[REPO].sha and rec["revision"] == "main"
    assert sorted(man["components"]) == ["clip", "mmdit", "t5", "vae"]
    files = {f["path"]: f for f in rec["files"]}
    for p in BASE:
        assert files[p]["sha256"] == hub.repos[REPO].meta[p]["lfs"]["oid"]
    # only the needed files crossed the wire: no .bin twin of the CLIP weights, no FLUX.1-dev, no README
    fetched = {p for m, p, _ in hub.log if m == "GET" and not p.startswith("/")}
    assert "openai/clip-vit-large-patch14/pytorch_model.bin" not in fetched
    assert not {"flux1-dev.safetensors", "flux1-dev-ae.safetensors", "README.md"} & fetched
    assert set(BASE) <= fetched
    # every component verifies, loads strictly (names/shapes) and equals the mapping applied to the Hub file
    from converter.mapping import load_mapping
    from converter.sources import load_file
    from converter.verify import verify_output

    for c in man["components"]:
        verify_output(out / c)
    want = load_mapping("mmdit_opensora_v2").convert(load_file(synthetic["repo"] / BASE[0]))
    got = load_file(out / "mmdit")
    assert sorted(got) == sorted(want)
    for k in want:  # bf16 kept: the very bytes
        assert got[k].dtype == want[k].dtype == "BF16" and got[k].tobytes() == want[k].tobytes(), k
    assert json.loads((out / "mmdit" / "config.json").read_text()) ["MMDiTConfig"]["axes_dim"] == [8, 12, 12]
    # tokenizers and HF configs beside the text encoders; they load with transformers and fit the model
    import transformers

    for c, vocab in (("t5", synthetic_repo.T5["vocab_size"]), ("clip", synthetic_repo.CLIP_TEXT["vocab_size"])):
        tok = transformers.AutoTokenizer.from_pretrained(str(out / c))
        ids = tok("a red fox running in snow. 24 FPS.").input_ids
        assert len(ids) > 3 and max(ids) < vocab
        assert (out / c / "config.json").read_bytes() == (synthetic["repo"] / files[
            next(p for p in files if p.endswith("config.json") and ("t5" in p) == (c == "t5"))]["path"]).read_bytes()
    # a re-run downloads nothing and converts nothing
    n = len(hub.log)
    stamp = {c: (out / c / "model.safetensors").stat().st_mtime_ns for c in man["components"]}
    r = run(hub.url)
    assert r.exit_code == 0 and r.stdout.count("up to date") == 4, r.stdout
    assert [m for m, p, _ in hub.log[n:]] == ["GET"] and "/revision/main" in hub.log[n][1]
    assert stamp == {c: (out / c / "model.safetensors").stat().st_mtime_ns for c in man["components"]}
    # offline, from the cache only, with the server gone
    hub.stop()
    r = run("http://127.0.0.1:9", "--offline", out="out_offline")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    man2 = json.loads((tmp_path / "out_offline" / "msconv-manifest.json").read_text())
    assert man2["repos"][REPO]["sha"] == rec["sha"]


def test_dry_run_lists_and_downloads_nothing(hub, run, tmp_path):
    r = run(hub.url, "--dry-run", "--with-t2i")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    for name in ("mmdit", "vae", "t5", "clip", "flux", "flux_ae"):
        assert f"\n{name} " in "\n" + r.stdout
    assert "google/t5-v1_1-xxl/model.safetensors.index.json" in r.stdout and "to download:" in r.stdout
    assert not [e for e in hub.log if "/resolve/" in e[1] or "cdn-lfs" in e[1]]
    nothing_written(tmp_path)


def test_resume_after_killed_download(hub, synthetic, tmp_path):
    """A download killed (SIGKILL) mid-file leaves no output; the next run keeps the finished files, fetches the
    cut one again and completes."""
    stalled = "hunyuan_vae.safetensors"
    hub.stall[stalled] = 50_000
    args = [sys.executable, str(ROOT / "cli.py"), "download-and-convert", REPO, "--endpoint", hub.url,
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--only", "mmdit,vae,t5"]
    for k, v in synthetic["configs"].items():
        args += ["--model-config", f"{k}={v}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = tmp_path / "cache" / "models--hpcai-tech--Open-Sora-v2" / "blobs"
    others = 1 + len([p for p in hub.repos[REPO].meta if p.startswith("google/t5-v1_1-xxl/")])  # mmdit + T5 folder
    t0 = time.time()
    try:
        while time.time() - t0 < 60:   # the stalled file has started and every other file is in the cache
            done = [p for p in blobs.glob("*") if not p.name.endswith(".incomplete")] if blobs.is_dir() else []
            if hub.gets(stalled) and len(done) == others:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the download did not reach the stalled file")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(blobs.glob("*.incomplete")), "the killed download left no partial file"
    nothing_written(tmp_path)
    fetched_once = {p for m, p, _ in hub.log if m == "GET" and not p.startswith("/")} - {stalled}
    hub.stall.clear()
    hub.release()
    from typer.testing import CliRunner

    import cli as cli_module

    r = CliRunner().invoke(cli_module.app, [str(a) for a in args[2:]])
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert all(hub.gets(p) == 1 for p in fetched_once), [(p, hub.gets(p)) for p in fetched_once]
    assert hub.gets(stalled) == 2
    assert not list(blobs.glob("*.incomplete")), "stale partial files were not cleaned"
    assert sorted(json.loads((tmp_path / "out" / "msconv-manifest.json").read_text())["components"]) == \
        ["mmdit", "t5", "vae"]


def test_connection_cut_mid_file_resumes_with_range(hub, run, tmp_path, monkeypatch):
    """A connection dropped mid-file is resumed by huggingface_hub with a Range request. It keeps what it wrote in
    whole chunks (10 MB); 16 KB chunks make the tiny file behave like a real one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    hub.cut_once["Open_Sora_v2.safetensors"] = 16384 * 6
    r = run(hub.url, "--only", "mmdit")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    ranges = [rg for m, p, rg in hub.log if m == "GET" and p == "Open_Sora_v2.safetensors"]
    assert ranges == [None, f"bytes={16384 * 6}-"]


def test_404_for_one_file(hub, run, tmp_path):
    hub.missing.add("hunyuan_vae.safetensors")
    one_error(run(hub.url), "hunyuan_vae.safetensors", "404")
    nothing_written(tmp_path)


def test_401_gated_repo_then_token(hub, run, tmp_path, monkeypatch):
    hub.gated[REPO] = "hf_secret"
    monkeypatch.delenv("HF_TOKEN", raising=False)   # (a token stored by `hf auth login` is not the server's either)
    one_error(run(hub.url, "--only", "vae"), "gated", "401", "HF_TOKEN")
    nothing_written(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    r = run(hub.url, "--only", "vae")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)


def test_server_down(run, tmp_path):
    import socket

    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    one_error(run(f"http://127.0.0.1:{port}"), "cannot reach", str(port))
    assert time.time() - t0 < 30
    nothing_written(tmp_path)


def test_unknown_revision(hub, run, tmp_path):
    one_error(run(hub.url, "--revision", "v9.9"), "revision 'v9.9' not found")
    nothing_written(tmp_path)


def test_bytes_that_do_not_match_the_hash(hub, run, tmp_path):
    hub.corrupt.add("Open_Sora_v2.safetensors")
    one_error(run(hub.url, "--only", "mmdit"), "Open_Sora_v2.safetensors", "sha256", "removed from the cache")
    nothing_written(tmp_path)
    hub.corrupt.clear()
    r = run(hub.url, "--only", "mmdit")
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert hub.gets("Open_Sora_v2.safetensors") == 2


def test_unknown_repo_and_bad_component(hub, run, tmp_path):
    one_error(run(hub.url, repo="someone/other-model"), "no preset", "hpcai-tech/Open-Sora-v2", "--mapping")
    one_error(run(hub.url, "--only", "mmdit,nope"), "nope", "clip, flux, flux_ae, mmdit, t5, vae")
    nothing_written(tmp_path)


def test_wrong_size_needs_a_model_config(hub, cli, tmp_path):
    """Without --model-config the tiny MMDiT is checked against the real Open-Sora v2 config and refused before
    anything is written."""
    r = cli("download-and-convert", REPO, "--endpoint", hub.url, "--cache-dir", tmp_path / "cache", "--out",
            tmp_path / "out", "--only", "mmdit")
    one_error(r, "component mmdit", "--model-config mmdit=")
    nothing_written(tmp_path)


def test_local_folder_second_preset_and_custom_mapping(cli, synthetic, tmp_path):
    """REPO as a local folder: the Video-DC-AE preset is recognised by its files; a folder of no preset needs
    --mapping FILE=MAPPING[:NAME]."""
    dc = tmp_path / "dc_ae_repo"
    synthetic_repo.build_dc_ae(dc)
    cfg = [a for k, v in synthetic["configs"].items() for a in ("--model-config", f"{k}={v}")]
    r = cli("download-and-convert", dc, "--out", tmp_path / "w", *cfg)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    man = json.loads((tmp_path / "w" / "msconv-manifest.json").read_text())
    assert sorted(man["components"]) == ["dc_ae", "mmdit_hc"]
    assert man["components"]["mmdit_hc"]["mapping"] == "mmdit_opensora_v2_hc"
    assert json.loads((tmp_path / "w" / "dc_ae" / "config.json").read_text())["DCAEConfig"]["latent_channels"] == 32
    one = tmp_path / "one"
    one.mkdir()
    (one / "vae.safetensors").write_bytes((synthetic["repo"] / "hunyuan_vae.safetensors").read_bytes())
    one_error(cli("download-and-convert", one, "--out", tmp_path / "w2", *cfg), "no preset", "--mapping")
    r = cli("download-and-convert", one, "--out", tmp_path / "w2", "--mapping", "vae.safetensors=hunyuan_vae", *cfg)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert (tmp_path / "w2" / "vae" / "model.safetensors").is_file()


def test_not_enough_disk_says_how_much(hub, run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    err = one_error(run(hub.url, "--only", "mmdit"), "not enough disk space", "needs 1.92 MB", "1.00 KB free")
    assert "download 959.36 KB" in err and "converted 959.36 KB" in err   # the file to fetch, its conversion
    nothing_written(tmp_path)
    assert not [e for e in hub.log if "/resolve/" in e[1]]
