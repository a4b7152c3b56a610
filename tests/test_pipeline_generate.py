"""`msconv generate` / `opensora_ms.pipeline.generate` on converted tiny weights, in the folder layout
`msconv download-and-convert` writes (made here from parity/synthetic_repo.py's tiny Open-Sora-v2 copy).

The written files are read back (PyAV: frame count, fps, size, codec; PIL for PNG). One run is compared with the torch
reference pipeline on the same inputs (same weights from the repo files, noise and text embeddings from files):
the converted folder, the loader and the MindSpore loop compute what the reference computes."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import write_embeddings
from opensora_ms.pipeline import media, plan

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from parity import synthetic_repo  # noqa: E402

SMALL = ["--resolution", "64px", "--num-frames", "9", "--steps", "2"]     # 80x48 pixels, 3 x 3 x 5 latent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(repo folder, weights folder): the synthetic repo converted by download-and-convert (with the T2I pair)."""
    from converter import hub

    root = tmp_path_factory.mktemp("gen")
    repo = root / "repo"
    synthetic_repo.build(repo)
    cfgs = synthetic_repo.write_model_configs(root / "model-configs")
    hub.run(hub.Options(repo=str(repo), out=root / "weights", with_t2i=True, model_configs=cfgs),
            hub.Reporter(quiet=True))
    return repo, root / "weights"


def test_cli_t2i2v_writes_a_playable_mp4(tiny, cli, tmp_path):
    """Prompt -> T5/CLIP (tokenizers from the folder) -> FLUX.1-dev first frame -> i2v_head video -> mp4."""
    from PIL import Image

    _, weights = tiny
    out = tmp_path / "fox.mp4"
    r = cli("generate", "a red fox running in snow", "--weights", weights, *SMALL, "--t2i2v",
            "--t2i-resolution", "64px", "--out", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and "per step" in r.output and "peak RSS" in r.output
    assert media.probe_video(out) == {"frames": 9, "fps": 24.0, "width": 80, "height": 48, "codec": "h264"}
    up = 2 ** (len(synthetic_repo.FLUX_AE["ch_mult"]) - 1)               # the tiny Flux AE upsamples 2x (real: 8x)
    with Image.open(tmp_path / "fox_t2i.png") as im:                     # 64px training bucket 48x80 -> latent 6x10
        assert im.size == (10 * up, 6 * up) and im.mode == "RGB"
    assert not list(tmp_path.glob(".*partial*"))


def test_generate_equals_the_torch_reference(tiny, tmp_path):
    """i2v_head from a reference image, noise and text embeddings from files, --offload: MindSpore vs the torch
    reference pipeline (weights read from the repo's upstream-named files) on the same inputs."""
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file

    from opensora_ms.pipeline import api
    from parity.adapters import hunyuan_vae, mmdit
    from parity.reference import pipeline as R

    repo, weights = tiny
    rng = np.random.default_rng(1)
    ref_png = media.write_png(tmp_path / "ref.png", (rng.random((60, 90, 3)) * 255).astype(np.uint8))
    emb = write_embeddings(tmp_path / "emb.safetensors", t2i=True)
    req = api.Request(prompt="a fox", weights=str(weights), resolution="64px", num_frames=9, steps=3, seed=5,
                      ref=str(ref_png), text_embeddings=str(emb), out=str(tmp_path / "i2v.mp4"), offload=True)
    info = api.make_plan(req)
    assert info["cond_type"] == "i2v_head" and info["latent_shape"] == [1, 16, 3, 6, 10]
    noise = tmp_path / "noise.safetensors"
    save_file({"noise_z": plan.noise(tuple(info["latent_shape"]), 11)}, str(noise))
    req.noise = str(noise)
    res = api.generate(req)
    assert media.probe_video(res.path)["frames"] == 9

    def load(mod, cfg, file):
        m = mod.build_torch(cfg)
        m.load_state_dict({k: v.float() for k, v in load_file(str(repo / file)).items()}, strict=True)
        return m

    tm = load(mmdit, synthetic_repo.MMDIT, "Open_Sora_v2.safetensors")
    tv = load(hunyuan_vae, synthetic_repo.VAE, "hunyuan_vae.safetensors")
    opt = api._options(req, 16)
    px = media.read_reference(ref_png, (opt.height, opt.width))[:, :1]
    eps = plan.noise((16, 1, opt.height // 8, opt.width // 8), req.seed + 1)     # the documented posterior noise
    ref_lat = R.encode_reference(tv, px, eps)
    e = np_load(str(emb))
    want = R.sample_video(tm, tv, opt, "i2v_head", np_load(str(noise))["noise_z"], e["txt"], e["y_vec"],
                          [[ref_lat]], patch_size=2)
    got = res.video.astype(np.int64)
    assert want["latent_before_decode"].std() > 0.1                     # a real signal, not zeros
    assert np.abs(got - want["video_uint8"][0]).max() <= 1
    assert (got != want["video_uint8"][0]).mean() < 1e-3


def test_one_frame_writes_png(tiny, tmp_path):
    """One frame -> PNG (upstream's save_image path); PyNative (no graph), text embeddings from a file."""
    from PIL import Image

    from opensora_ms.pipeline import api

    _, weights = tiny
    emb = write_embeddings(tmp_path / "emb.safetensors", t2i=True)
    res = api.generate(prompt="a cat", weights=str(weights), resolution="64px", num_frames=1, steps=1, jit=False,
                       text_embeddings=str(emb), out=str(tmp_path / "cat.mp4"))
    assert res.path == tmp_path / "cat.png" and not (tmp_path / "cat.mp4").exists()
    with Image.open(res.path) as im:
        assert im.size == (80, 48) and im.mode == "RGB"
    assert res.plan["latent_shape"] == [1, 16, 1, 6, 10] and len(res.step_seconds) == 1


def test_dry_run_prints_the_plan(tiny, cli, tmp_path):
    _, weights = tiny
    out = tmp_path / "x.mp4"
    r = cli("generate", "a dog", "--weights", weights, "--dry-run", "--out", out)
    assert r.exit_code == 0, r.output
    assert "129 frames 336x192" in r.output and "[1, 16, 33, 24, 42]" in r.output and "50 steps" in r.output
    assert "memory estimate" in r.output and not out.exists()
    r = cli("generate", "a dog", "--weights", weights, "--dry-run", "--json", "--t2i2v")
    info = json.loads(r.output)
    assert info["cond_type"] == "i2v_head" and info["memory"]["peak_estimate"] > 0
    assert (info["t2i"]["height"], info["t2i"]["width"]) == (576, 1024)            # 768px training bucket, 16:9


def _broken(weights: Path, tmp_path: Path, how: str) -> Path:
    w = tmp_path / f"w-{how}"
    shutil.copytree(weights, w)
    if how == "no-clip":
        shutil.rmtree(w / "clip")
    elif how == "wrong-vae":      # the MMDiT's tensors under the VAE's name
        for f in (w / "vae").glob("model*.safetensors*"):
            f.unlink()
        for f in (w / "mmdit").glob("model*.safetensors*"):
            shutil.copy(f, w / "vae" / f.name)
    elif how == "t5-width":
        cfg = json.loads((w / "t5" / "config.json").read_text())
        cfg["d_model"] = 40
        (w / "t5" / "config.json").write_text(json.dumps(cfg))
    return w


@pytest.mark.parametrize("args,msg", [
    (["--num-frames", "10"], "4k+1"),
    (["--high-compression", "--num-frames", "129"], "multiple of 4"),
    (["--aspect-ratio", "7:3"], "unknown aspect ratio '7:3'"),
    (["--resolution", "huge"], "unknown resolution"),
    (["--cond-type", "i2v_head"], "needs a reference: --ref"),
    (["--cond-type", "sideways"], "unknown cond type"),
    (["--ref", "/nonexistent/ref.png"], "--ref /nonexistent/ref.png: no such file"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt: no such file"),
    (["--device", "Ascend"], "--device Ascend"),
    (["--steps", "0"], "steps"),
    (["--vae-tile-size", "48"], "--vae-tile-size must be a multiple of 32"),
    (["--weights", "/nonexistent/weights"], "--weights /nonexistent/weights: no such folder"),
    (["--high-compression", "--num-frames", "8"], "component 'mmdit_hc' missing"),
    ("no-clip", "component 'clip' missing"),
    ("wrong-vae", "do not fit the vae model"),
    ("t5-width", "d_model 40 does not fit"),
])
def test_errors_are_one_line_exit_2(tiny, cli, tmp_path, args, msg):
    _, weights = tiny
    if isinstance(args, str):
        weights, args = _broken(weights, tmp_path, args), []
    prompt = [] if "--prompt-file" in args else ["a fox"]
    r = cli("generate", *prompt, "--weights", weights, *SMALL, "--out", tmp_path / "o.mp4", *args)
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.output
    assert not (tmp_path / "o.mp4").exists()


def test_v2v_reference_too_short(tiny, cli, tmp_path):
    _, weights = tiny
    clip = media.write_video(tmp_path / "short.mp4", np.zeros((12, 48, 80, 3), np.uint8))
    r = cli("generate", "a fox", "--weights", weights, *SMALL, "--num-frames", "33", "--ref", clip)
    assert r.exit_code == 2 and f"--ref {clip}: v2v_head needs at least 33 frames, the video has 12" in r.output
    r = cli("generate", "a fox", "--weights", weights, *SMALL, "--ref", clip, "--cond-type", "v2v_head_easy")
    assert r.exit_code == 2 and "conditions 17 latent frames; --num-frames 9 gives 3" in r.output


def test_bad_noise_and_embedding_files(tiny, cli, tmp_path):
    _, weights = tiny
    save_file({"noise_z": np.zeros((1, 16, 3, 4, 4), np.float32)}, str(tmp_path / "n.safetensors"))
    r = cli("generate", "a fox", "--weights", weights, *SMALL, "--noise", tmp_path / "n.safetensors")
    assert r.exit_code == 2 and "shape [1, 16, 3, 4, 4], the plan needs [1, 16, 3, 6, 10]" in r.output
    save_file({"txt": np.zeros((3, 7, 5), np.float32), "y_vec": np.zeros((3, 32), np.float32)},
              str(tmp_path / "e.safetensors"))
    r = cli("generate", "a fox", "--weights", weights, *SMALL, "--text-embeddings", tmp_path / "e.safetensors")
    assert r.exit_code == 2 and "txt has shape [3, 7, 5], expected [3, L, 48]" in r.output
