"""The framework-free half of the pipeline (opensora_ms/pipeline/plan.py, media.py) against upstream's numbers:
tables.json (buckets, shift alphas, schedules), the pipeline cases (schedule, uint8 frames), torch's own kernels
(linspace, bilinear resize) and PyAV/PIL round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from opensora_ms.pipeline import media, plan

from conftest import SHARED, TINY

TABLES = json.loads((SHARED / "upstream" / "tables.json").read_text())


def _table(prefix: str) -> dict:
    return next(v for k, v in TABLES.items() if k.startswith(prefix))


@pytest.mark.parametrize("D", [16, 32])
def test_buckets_equal_upstream_tables(D):
    tables = _table(f"aspect_ratio_tables_D{D}")
    assert tables
    for key, want in tables.items():
        res, training = key.split("_training=")
        got = plan.aspect_ratios(res, training == "True", D)
        assert list(got) == list(want), key                       # same ratios, same order (dedup in training)
        assert {k: list(v) for k, v in got.items()} == want, key


def test_get_image_size_and_sanitize():
    assert plan.get_image_size("256px", "16:9") == (192, 336)
    assert plan.get_image_size("768px", "4:3", training=True) == (672, 880)      # SPEC §8.3: differs from inference
    assert plan.get_image_size("768px", "4:3") == (656, 880)
    with pytest.raises(plan.PlanError, match="7:3"):
        plan.get_image_size("256px", "7:3")
    with pytest.raises(plan.PlanError, match="resolution"):
        plan.get_image_size("big", "16:9")
    opt = plan.sanitize(plan.SamplingOption(height=33, width=40))
    assert (opt.height, opt.width) == (48, 48)                    # rounded up to multiples of 16
    with pytest.raises(plan.PlanError):
        plan.sanitize(plan.SamplingOption(resolution="256px"))


@pytest.mark.parametrize("s", TABLES["schedules"], ids=lambda s: s["name"])
def test_latent_shape_alpha_schedule(s):
    hc = "high_compression" in s["name"]
    p, D = (1, 32) if hc else (2, 16)
    causal = "were False" not in s["name"]
    opt = plan.sanitize(plan.SamplingOption(height=s["pixel_hw"][0], width=s["pixel_hw"][1],
                                            num_frames=s["num_frames"], temporal_reduction=4, is_causal_vae=causal), D)
    shape = plan.latent_shape(opt, 1, 128 if hc else 16, p, D)
    assert list(shape[2:]) == s["noise_shape_BCTHW(per sample)"][2:]
    T, H, W = shape[2:]
    tokens = H * W // p ** 2
    assert tokens == s["latent_tokens_per_frame"]
    assert plan.shift_alpha(tokens, T) == pytest.approx(s["shift_alpha"], rel=1e-12)
    ts = np.array(plan.schedule(len(s["timesteps(num_steps+1)"]) - 1, tokens, T))
    ref = np.array(s["timesteps(num_steps+1)"], np.float32)
    # torch's linspace lanes round differently (CPU-dependent, <= 1 ulp); the shift maps that to <= 2 ulps of t
    assert (np.abs(ts - ref) <= 2 * np.spacing(ref)).all()


def test_flux_t2i_schedules():
    for s in TABLES["t2i_flux_step_768px"]:
        assert plan.get_image_size("768px", s["aspect_ratio"], training=True) == tuple(s["pixel_hw"])
        assert plan.shift_alpha(s["tokens"], 1) == pytest.approx(s["shift_alpha"], rel=1e-12)
        ref = np.array(s["timesteps"], np.float32)
        assert (np.abs(np.array(plan.schedule(len(ref) - 1, s["tokens"], 1)) - ref) <= 2 * np.spacing(ref)).all()


def test_case_schedule():
    cfg = json.loads((TINY / "pipeline_t2v_tiny.config.json").read_text())
    inp = load_file(str(TINY / "pipeline_t2v_tiny.inputs.safetensors"))
    opt = plan.SamplingOption.from_dict(cfg["SamplingOption"])
    T, H, W = inp["noise_z"].shape[2:]
    assert plan.latent_shape(plan.sanitize(opt), 1, 16, 2, 16)[2:] == (T, H, W)
    np.testing.assert_array_equal(plan.schedule(opt.num_steps, H * W // 4, T), inp["timesteps_schedule"])


def test_num_frames_rules():
    assert plan.latent_frames(plan.SamplingOption(num_frames=129, temporal_reduction=4, is_causal_vae=True)) == 33
    assert plan.latent_frames(plan.SamplingOption(num_frames=128, temporal_reduction=4, is_causal_vae=True)) == 32
    assert plan.latent_frames(plan.SamplingOption(num_frames=1, temporal_reduction=4, is_causal_vae=True)) == 1
    plan.check_num_frames(129, causal=True)
    plan.check_num_frames(128, causal=False)
    with pytest.raises(plan.PlanError, match="4k\\+1"):
        plan.check_num_frames(128, causal=True)
    with pytest.raises(plan.PlanError, match="multiple of 4"):
        plan.check_num_frames(129, causal=False)


def test_linspace_within_one_ulp_of_torch():
    import torch

    for n in (2, 3, 13, 50, 51):
        for a, b in ((1.0, 0.0), (3.0, 1.0), (1.0, 2.4123)):
            t, m = torch.linspace(a, b, n).numpy(), plan.linspace_f32(a, b, n)
            assert (np.abs(t - m) <= np.spacing(np.maximum(np.abs(t), np.abs(m)))).all(), (n, a, b)


def test_guidance_oscillation_and_ramp():
    assert [plan.oscillation(7.5, i) for i in (0, 9, 10, 11, 12, 13)] == [7.5, 7.5, 7.5, 1.0, 7.5, 1.0]
    r = plan.temporal_image_guidance(3.0, 0, 12, 3)
    np.testing.assert_allclose(r, [1.0, 2.0, 3.0])                # frame 0 -> 1, last frame -> the step's upper
    r = plan.temporal_image_guidance(3.0, 6, 12, 3)
    np.testing.assert_allclose(r, [1.0, 1.5, 2.0], rtol=1e-6)     # upper = linspace(3, 1, 13)[6] = 2


def test_pack_unpack_roundtrip_and_layout():
    x = np.arange(2 * 3 * 2 * 4 * 6, dtype=np.float32).reshape(2, 3, 2, 4, 6)
    y = plan.pack(x, 2)
    assert y.shape == (2, 2 * 2 * 3, 12)
    # feature index c*p^2 + ph*p + pw, tokens t-major then h then w
    assert y[1, 5, 7] == x[1, 7 // 4, 0, 2 * (5 % 6 // 3) + (7 % 4) // 2, 2 * (5 % 3) + 7 % 2]
    np.testing.assert_array_equal(plan.unpack(y, 2, 2, 3, 2), x)
    ids = plan.img_ids(2, 2, 3, 3)
    assert ids.shape == (3, 12, 3) and ids[0, 7].tolist() == [1, 0, 1]


@pytest.mark.parametrize("cond_type,frames", [("t2v", []), ("i2v_head", [0]), ("i2v_tail", [8]), ("i2v_loop", [0, 8]),
                                              ("v2v_head", list(range(9))), ("v2v_tail", list(range(0, 9))),
                                              ("v2v_head_easy", list(range(17))),
                                              ("v2v_tail_easy", list(range(3, 20)))])
def test_conditions(cond_type, frames):
    T = 20 if "easy" in cond_type else (9 if cond_type.startswith("v2v") else 9)
    shape = (1, 4, T, 2, 2)
    rng = np.random.default_rng(0)
    if cond_type.startswith("v2v"):
        refs = [[rng.standard_normal((4, 17 if "easy" in cond_type else 9, 2, 2)).astype(np.float32)]]
    else:
        refs = [[rng.standard_normal((4, 1, 2, 2)).astype(np.float32) for _ in range(2)]]
    masks, masked = plan.inference_condition(shape, cond_type, refs, causal=True)
    on = sorted(set(np.nonzero(masks[0, 0, :, 0, 0])[0].tolist()))
    assert on == frames
    if cond_type == "i2v_loop":
        np.testing.assert_array_equal(masked[0, :, 0], refs[0][0][:, 0])
        np.testing.assert_array_equal(masked[0, :, -1], refs[0][-1][:, -1])
    if cond_type.endswith("tail_easy"):
        np.testing.assert_array_equal(masked[0, :, 3:], refs[0][0])
    off = [t for t in range(T) if t not in frames]
    assert not masked[0][:, off].any()
    with pytest.raises(plan.PlanError):
        plan.inference_condition(shape, "i2v_middle", refs)


def test_noise_reproducible():
    a, b = plan.noise((1, 2, 3, 4, 4), 7), plan.noise((1, 2, 3, 4, 4), 7)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and not np.array_equal(a, plan.noise((1, 2, 3, 4, 4), 8))


# ------------------------------------------------------------------------------------------------ media
@pytest.mark.parametrize("case", ["pipeline_t2v_tiny", "pipeline_i2v_tiny"])
def test_to_uint8_equals_case_frames(case):
    out = load_file(str(TINY / f"{case}.outputs.safetensors"))
    np.testing.assert_array_equal(media.to_uint8(out["video"][0]), out["video_uint8_THWC"])


def test_to_uint8_bf16_rounding():
    x = np.array([0.3, 0.9, -1.5, 2.0], np.float32).reshape(1, 4, 1, 1)
    assert media.to_uint8(x)[:, 0, 0, 0].tolist() == [166, 242, 0, 255]
    # (0.3+1)/2*255+0.5 = 166.25 in fp32; bf16 holds 166 exactly, (0.9+1)/2 rounds to 0.94921875 -> 242.55 -> 242
    assert media.to_uint8(x, "bfloat16")[:, 0, 0, 0].tolist() == [166, 242, 0, 255]


def test_bilinear_resize_matches_torch():
    import torch

    x = np.random.default_rng(0).random((2, 3, 37, 53)).astype(np.float32)
    for hw in ((32, 48), (80, 100)):
        t = torch.nn.functional.interpolate(torch.from_numpy(x), size=hw, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(media._resize_bilinear(x, hw), t.numpy(), atol=3e-6)


def test_video_png_roundtrip_and_references(tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.random((9, 48, 80, 3)) * 255).astype(np.uint8)
    p = media.write_video(tmp_path / "v.mp4", frames, fps=24)
    assert media.probe_video(p) == {"frames": 9, "fps": 24.0, "width": 80, "height": 48, "codec": "h264"}
    assert not list(tmp_path.glob(".*partial*"))
    png = media.write_png(tmp_path / "f.png", frames[0])
    ref = media.read_reference(png, (32, 48))                     # cover + centre crop: 80x48 -> 53x32 -> 48 wide
    assert ref.shape == (3, 1, 32, 48) and ref.min() >= -1 and ref.max() <= 1
    from PIL import Image

    want = np.asarray(Image.fromarray(frames[0]).resize((53, 32), Image.BICUBIC))[:, 2:50]
    np.testing.assert_allclose(ref[:, 0].transpose(1, 2, 0), want / 255 * 2 - 1, atol=1e-6)
    vid = media.read_reference(p, (24, 40))
    assert vid.shape == (3, 9, 24, 40)
    with pytest.raises(media.MediaError, match="does not exist"):
        media.read_reference(tmp_path / "missing.png", (32, 48))
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(media.MediaError, match="unsupported"):
        media.read_reference(txt, (32, 48))
    with pytest.raises(media.MediaError, match="even"):
        media.write_video(tmp_path / "odd.mp4", frames[:, :47], fps=24)
