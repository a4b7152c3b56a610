"""`msconv generate` in the modes tests/test_pipeline_generate.py leaves out: `--high-compression` (the
Video-DC-AE pair), v2v from a reference video and the i2v loop (head and tail images).

The weights come the way a user gets them: both synthetic repos (parity/synthetic_repo.py: Open-Sora-v2 and
Open-Sora-v2-Video-DC-AE) served by the local Hub and converted by `msconv download-and-convert` into one folder.
Every run goes through the CLI; the frames it hands to the mp4 writer are compared with the torch reference pipeline
(parity/reference/pipeline.py over the torch reference models, weights read from the repos' upstream-named files),
and the written file is read back with PyAV.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_embeddings
from opensora_ms.pipeline import media, plan
from parity import synthetic_repo

REPOS = (synthetic_repo.REPO_ID, synthetic_repo.DC_AE_REPO_ID)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"repo", "dc_repo", "weights"}: both repos downloaded from the local Hub and converted into one folder."""
    from typer.testing import CliRunner

    import cli as cli_module
    from converter.hub_server import HubServer, Repo

    root = tmp_path_factory.mktemp("modes")
    synthetic_repo.build(root / "repo")
    synthetic_repo.build_dc_ae(root / "dc_repo")
    cfgs = synthetic_repo.write_model_configs(root / "model-configs")
    weights = root / "weights"
    with HubServer([Repo.from_folder(REPOS[0], root / "repo"), Repo.from_folder(REPOS[1], root / "dc_repo")]) as hub:
        for repo in REPOS:
            args = ["download-and-convert", repo, "--endpoint", hub.url, "--cache-dir", root / "cache",
                    "--out", weights] + [a for k, v in cfgs.items() for a in ("--model-config", f"{k}={v}")]
            r = CliRunner().invoke(cli_module.app, [str(a) for a in args])
            assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
        fetched = {p for m, p, _ in hub.log if m == "GET" and not p.startswith("/")}
    assert {"Open_Sora_v2_Video_DC_AE.safetensors", "F32T4C128_AE.safetensors"} <= fetched
    man = json.loads((weights / "msconv-manifest.json").read_text())
    assert sorted(man["repos"]) == sorted(REPOS)
    assert {c: man["components"][c]["repo"] for c in ("mmdit_hc", "dc_ae", "mmdit")} == \
        {"mmdit_hc": REPOS[1], "dc_ae": REPOS[1], "mmdit": REPOS[0]}
    return {"repo": root / "repo", "dc_repo": root / "dc_repo", "weights": weights}


@pytest.fixture
def written(monkeypatch):
    """The frames `msconv generate` hands to the mp4 writer (h264 is lossy: the file cannot carry them exactly)."""
    got = []
    write = media.write_video

    def spy(path, frames, *a, **kw):
        got.append(np.array(frames))
        return write(path, frames, *a, **kw)

    monkeypatch.setattr(media, "write_video", spy)
    return got


def _torch_model(mod, cfg: dict, file):
    """A torch reference model with the repo file's tensors (as upstream loads them, but strictly)."""
    from safetensors.torch import load_file

    m = mod.build_torch(cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()}, strict=True)
    return m.eval()


def _torch_texts(repo, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's HFEmbedder with transformers' own models on the repo's Hugging Face folders: T5 padded to 512 with
    no mask -> last_hidden_state, CLIP padded to 77 -> pooler_output."""
    import torch
    import transformers

    out = []
    for sub, tok_cls, model_cls, n, key in (
            ("google/t5-v1_1-xxl", transformers.T5Tokenizer, transformers.T5EncoderModel, 512, "last_hidden_state"),
            ("openai/clip-vit-large-patch14", transformers.CLIPTokenizer, transformers.CLIPTextModel, 77,
             "pooler_output")):
        tok = tok_cls.from_pretrained(str(repo / sub), max_length=n)
        ids = tok(texts, truncation=True, max_length=n, padding="max_length", return_tensors="pt").input_ids
        model = model_cls.from_pretrained(str(repo / sub)).eval()
        with torch.no_grad():
            out.append(getattr(model(input_ids=ids, attention_mask=None), key).float().numpy())
    return out[0], out[1]


def _assert_equal_to_reference(got: np.ndarray, want: dict) -> None:
    """test_pipeline_generate.py's criterion: uint8 frames within one level, almost all identical."""
    assert want["latent_before_decode"].std() > 0.1                     # a real signal, not zeros
    assert got.shape == want["video_uint8"][0].shape
    d = np.abs(got.astype(np.int64) - want["video_uint8"][0])
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())


def _assert_file_holds(path, frames: np.ndarray, fps: int = 24) -> None:
    """The mp4 plays (PyAV), has the planned frame count, fps and size, and shows these frames: h264 (crf 23,
    yuv420) blurs the tiny models' noise-like pixels, so 8x8 block means are compared (measured on the hc run: 2.4
    levels off on average, against 33 for the blocks' own spread and 21 with the frame order reversed)."""
    t, h, w, _ = frames.shape
    assert media.probe_video(path) == {"frames": t, "fps": float(fps), "width": w, "height": h, "codec": "h264"}

    def blocks(x):
        return x.astype(np.float64).reshape(t, h // 8, 8, w // 8, 8, 3).mean((2, 4))

    back, want = blocks(media.read_video_frames(path)), blocks(frames)
    assert np.abs(back - want).mean() < 0.2 * np.abs(want - want.mean()).mean()


def _ms_run(cli, *args):
    r = cli("generate", *args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_high_compression_t2v_equals_the_torch_reference(tiny, cli, written, tmp_path):
    """Prompt -> T5/CLIP -> high-compression MMDiT (patch 1, D = 32) -> Video DC-AE (tiling flags on as upstream's
    high_compression.py; tiles of 256 px do not split this small a video) -> mp4, against transformers' encoders +
    the torch references. 64px 16:9 at D = 32 is upstream's 32x128 bucket (its table takes 16:9 from 9:16's
    transpose)."""
    from parity.adapters import dc_ae, mmdit
    from parity.reference import pipeline as R

    out = tmp_path / "hc.mp4"
    r = _ms_run(cli, "a red fox running in snow", "--weights", tiny["weights"], "--high-compression",
                "--resolution", "64px", "--num-frames", "8", "--steps", "2", "--seed", "7", "--out", out)
    assert f"wrote {out} (8 frames, 128x32, 24 fps)" in r.output
    assert len(written) == 1 and written[0].shape == (8, 32, 128, 3)
    _assert_file_holds(out, written[0])

    opt = plan.sanitize(plan.SamplingOption.from_dict(dict(plan.OPEN_SORA_V2, resolution="64px", num_frames=8,
                                                           num_steps=2, seed=7)), 32)
    assert (opt.height, opt.width) == (32, 128)
    z = plan.noise((1, 32, 2, 1, 4), 7)         # DC-AE latent 32 ch, (8-1)//4+1 frames (upstream's causal count)
    txt, vec = _torch_texts(tiny["repo"], ["a red fox running in snow. 24 FPS. 4 motion score.", "", ""])
    tm = _torch_model(mmdit, synthetic_repo.MMDIT_HC, tiny["dc_repo"] / "Open_Sora_v2_Video_DC_AE.safetensors")
    tv = _torch_model(dc_ae, synthetic_repo.dc_ae_config(), tiny["dc_repo"] / "F32T4C128_AE.safetensors")
    tv.use_spatial_tiling = tv.use_temporal_tiling = True
    want = R.sample_video(tm, tv, opt, "t2v", z, txt, vec, None, patch_size=1)
    _assert_equal_to_reference(written[0], want)


def _ref_clip(path, frames: int = 36):
    """A moving colour gradient (a reference video with structure, not noise), 60x100."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(60), np.arange(100), indexing="ij")
    v = np.stack([(x * 2 + t * 5) % 256, (y * 4 + t * 3) % 256, (x + y + 128) % 256], -1)
    return media.write_video(path, v.astype(np.uint8))


def _reference_pipeline(tiny, opt, cond_type, z, emb, pixels, seed):
    """The torch reference run: reference latents with the documented posterior noise (seed + 1 + k), the loop,
    the Hunyuan VAE decode."""
    from safetensors.numpy import load_file

    from parity.adapters import hunyuan_vae, mmdit
    from parity.reference import pipeline as R

    tm = _torch_model(mmdit, synthetic_repo.MMDIT, tiny["repo"] / "Open_Sora_v2.safetensors")
    tv = _torch_model(hunyuan_vae, synthetic_repo.VAE, tiny["repo"] / "hunyuan_vae.safetensors")
    lats = []
    for k, px in enumerate(pixels):
        t_lat = 1 if px.shape[1] == 1 else (px.shape[1] - 1) // 4 + 1
        eps = plan.noise((synthetic_repo.VAE["latent_channels"], t_lat, px.shape[2] // 8, px.shape[3] // 8),
                         seed + 1 + k)
        lats.append(R.encode_reference(tv, px, eps))
    e = load_file(str(emb))
    return R.sample_video(tm, tv, opt, cond_type, z, e["txt"], e["y_vec"], [lats], patch_size=2), lats


def _opt(num_frames: int, steps: int, seed: int):
    opt = plan.SamplingOption.from_dict(dict(plan.OPEN_SORA_V2, resolution="64px", num_frames=num_frames,
                                             num_steps=steps, seed=seed))
    return plan.sanitize(opt, 16)


def test_v2v_head_from_a_video_equals_the_torch_reference(tiny, cli, written, tmp_path):
    """--ref VIDEO: v2v_head conditions the first 8 + 1 latent frames on the clip's first 33 frames."""
    clip = _ref_clip(tmp_path / "ref.mp4")
    written.clear()                                                      # (the spy saw the reference clip)
    emb = write_embeddings(tmp_path / "emb.safetensors")
    out = tmp_path / "v2v.mp4"
    r = _ms_run(cli, "a fox", "--weights", tiny["weights"], "--resolution", "64px", "--num-frames", "33",
                "--steps", "2", "--seed", "3", "--cond-type", "v2v_head", "--ref", clip, "--text-embeddings", emb,
                "--out", out)
    assert f"wrote {out} (33 frames, 80x48, 24 fps)" in r.output
    assert len(written) == 1
    _assert_file_holds(out, written[0])
    opt = _opt(33, 2, 3)
    px = media.read_reference(clip, (48, 80))
    assert px.shape == (3, 36, 48, 80)
    want, lats = _reference_pipeline(tiny, opt, "v2v_head", plan.noise((1, 16, 9, 6, 10), 3), emb, [px[:, :33]], 3)
    assert lats[0].shape == (16, 9, 6, 10)
    _assert_equal_to_reference(written[0], want)


def test_i2v_loop_head_and_tail_equal_the_torch_reference(tiny, cli, written, tmp_path):
    """--cond-type i2v_loop --ref 'HEAD;TAIL': both images encoded, the first and last latent frames conditioned
    and replaced after the loop."""
    rng = np.random.default_rng(4)
    head = media.write_png(tmp_path / "head.png", (rng.random((60, 90, 3)) * 255).astype(np.uint8))
    tail = media.write_png(tmp_path / "tail.png", (rng.random((50, 100, 3)) * 255).astype(np.uint8))
    emb = write_embeddings(tmp_path / "emb.safetensors", seed=2)
    out = tmp_path / "loop.mp4"
    r = _ms_run(cli, "a fox", "--weights", tiny["weights"], "--resolution", "64px", "--num-frames", "9",
                "--steps", "3", "--seed", "9", "--cond-type", "i2v_loop", "--ref", f"{head};{tail}",
                "--text-embeddings", emb, "--out", out)
    assert f"wrote {out} (9 frames, 80x48, 24 fps)" in r.output
    assert len(written) == 1
    _assert_file_holds(out, written[0])
    pixels = [media.read_reference(head, (48, 80)), media.read_reference(tail, (48, 80))]
    want, lats = _reference_pipeline(tiny, _opt(9, 3, 9), "i2v_loop", plan.noise((1, 16, 3, 6, 10), 9), emb, pixels,
                                     9)
    lat = want["latent_before_decode"][0]
    np.testing.assert_array_equal(lat[:, 0], lats[0][:, 0])            # head and tail latents put back
    np.testing.assert_array_equal(lat[:, -1], lats[1][:, 0])
    _assert_equal_to_reference(written[0], want)
