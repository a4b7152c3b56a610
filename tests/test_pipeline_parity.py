"""The pipeline cases (`pipeline_t2v_tiny`, `pipeline_i2v_tiny`): the torch reference replays upstream to ~0, the
MindSpore port within the fp32 limits, through the parity engine (`msconv parity replay`'s code path).

The engine hands this adapter the whole case config (`WHOLE_CASE_CONFIG`) and judges `video_uint8_THWC` in
quantisation levels (`integer_max_abs: 1` in parity/thresholds.yaml: an fp32-noise-sized difference can move a value
across a .5 rounding boundary).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file


from conftest import TINY

CASES = ["pipeline_t2v_tiny", "pipeline_i2v_tiny"]


def _case(name):
    cfg = json.loads((TINY / f"{name}.config.json").read_text())
    return cfg, *(load_file(str(TINY / f"{name}.{k}.safetensors")) for k in ("weights", "inputs", "outputs"))


@pytest.mark.parametrize("name", CASES)
def test_torch_reference_replays_upstream(name):
    import torch

    from parity.adapters import pipeline as A

    cfg, w, inp, ref = _case(name)
    model = A.build_torch(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    out = A.run_torch(model, inp, cfg)
    assert set(out) == set(ref)                                  # every step's img_in / t_vec / cond / pred
    for k, r in ref.items():
        d = np.abs(out[k].astype(np.float64) - r)
        if r.dtype == np.uint8:
            assert d.max() <= 1, k
        else:
            assert d.max() <= 1e-6 * max(np.abs(r).max(), 1e-30), (k, d.max())


def test_adapter_reads_every_parameter_from_the_config():
    """Changing the case config changes the run: steps, cond type, guidance (nothing is tied to the shared sizes)."""
    import torch

    from parity.adapters import pipeline as A

    cfg, w, inp, _ = _case("pipeline_i2v_tiny")
    cfg = json.loads(json.dumps(cfg))
    cfg["SamplingOption"].update(num_steps=3, guidance=2.0)
    cfg["cond_type"] = "i2v_tail"
    model = A.build_torch(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    out = A.run_torch(model, inp, cfg)
    assert sorted(k for k in out if k.endswith("/t_vec")) == [f"step0{i}/t_vec" for i in range(3)]
    cond = out["step00/cond"]                                    # [cond, cond, zeros]; 6 tokens per latent frame
    assert cond[:2, -6:, :4].min() == 1 and cond[:2, :-6, :4].max() == 0 and not cond[2].any()
    np.testing.assert_array_equal(out["latent_before_decode"][0, :, -1], inp["ref_latent"][:, 0])


@pytest.mark.parametrize("name", CASES)
def test_engine_replay_torch(name):
    from parity.engine import ReplayOptions, replay

    rep = replay(TINY / name, ReplayOptions(framework="torch"))
    assert rep["verdict"] == "pass", [t for t in rep["tensors"] if t["verdict"] != "pass"][:3]
    assert rep["counts"]["compared"] == 4 * 12 + 3 and not rep["missing_outputs"]


def test_engine_replay_mindspore_i2v():
    from parity.engine import ReplayOptions, replay

    rep = replay(TINY / "pipeline_i2v_tiny", ReplayOptions(framework="mindspore", jit=True, hooks=False))
    assert rep["verdict"] == "pass", [t for t in rep["tensors"] if t["verdict"] != "pass"][:3]
    rows = {t["name"]: t for t in rep["tensors"]}
    assert len(rows) == 4 * 12 + 3
    assert max(t["max_rel"] for n, t in rows.items() if n != "video_uint8_THWC") <= 1e-4
    assert rows["video_uint8_THWC"]["max_abs"] <= 1


def test_high_compression_pair_matches_the_reference():
    """The DC-AE pairing (patch 1, D = 32, 128 latent channels in the real model) with i2v_loop conditions:
    MindSpore's loop + DC-AE decode against the torch reference on the same tiny models and inputs."""
    from parity.adapters import base, dc_ae, mmdit
    from parity.engine import setup_mindspore
    from parity.reference import pipeline as R

    setup_mindspore("CPU")
    from opensora_ms.pipeline import plan
    from opensora_ms.pipeline import sampling as S

    mcfg = dict(mmdit.PRESETS["hc_tiny"])                     # in_channels 32 = the tiny DC-AE's latent channels
    tm, tv = mmdit.build_torch(mcfg, seed=3), dc_ae.build_torch(dc_ae.PRESETS["tiny"], seed=4)
    nm = base.load_ms_from_torch(mmdit.build_ms(mcfg), tm, mmdit.mapping_name(mcfg))
    nv = base.load_ms_from_torch(dc_ae.build_ms(dc_ae.PRESETS["tiny"]), tv, dc_ae.mapping_name(None))
    opt = plan.sanitize(plan.SamplingOption.from_dict(dict(plan.OPEN_SORA_V2, resolution=None, aspect_ratio=None,
                                                           height=64, width=96, num_frames=8, num_steps=3)), 32)
    rng = np.random.default_rng(0)
    z = plan.noise(plan.latent_shape(opt, 1, 32, 1, 32), 2)
    assert z.shape == (1, 32, 2, 2, 3)                        # non-causal DC-AE, causal latent count upstream keeps
    txt = rng.standard_normal((3, 5, 48), dtype=np.float32)
    vec = rng.standard_normal((3, 32), dtype=np.float32)
    refs = [[rng.standard_normal((32, 1, 2, 3), dtype=np.float32) for _ in range(2)]]
    want = R.sample_video(tm, tv, opt, "i2v_loop", z, txt, vec, refs, patch_size=1)
    got = S.sample_video(nm, nv, opt, "i2v_loop", z, txt, vec, refs, patch_size=1, jit=True)
    assert got["video"].shape == want["video"].shape == (1, 3, 8, 64, 96)
    for k in ("latent_before_decode", "video"):
        err = np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
        assert err <= 1e-4, (k, err)
    np.testing.assert_array_equal(got["latent_before_decode"][0, :, -1], refs[0][1][:, 0])
    assert np.abs(got["video_uint8"].astype(int) - want["video_uint8"]).max() <= 1
