"""The one place that decides which kernels the op layer uses.

Modes: "CPU" (fp32 kernels), "Ascend" (`mint`/aclnn, bf16), and "CPU-bf16": Ascend's bf16 numerics emulated on the
CPU kernels (docs/bf16.md). In CPU-bf16 the model is built in bf16 and activations are real bf16 tensors (MindSpore
CPU runs bf16 cast/add/sub/mul/div and the storage ops in PyNative, bit-identical to torch); every op whose Ascend
kernel takes or returns bf16 casts its inputs to fp32, runs the CPU fp32 kernel and rounds its output to bf16, and
upstream's fp32 islands (SPEC §g) stay fp32 where upstream keeps them. PyNative only (MindSpore's CPU graph
compiler rejects bf16 even for Reshape).

`DEVICE`, `IS_CPU`, `IS_ASCEND`, `BF16_EMU` are module constants, so `ms.jit` folds every branch on them; they are
fixed when the op modules (`ops.nn`, `ops.conv`, ...) are imported. Choose the mode *before* that:

* CPU / Ascend: `ms.set_device(...)` before importing `opensora_ms`;
* CPU-bf16: `ms.set_device("CPU")`, then `opensora_ms.ops.device.configure("CPU-bf16")` (importing this module
  imports no op), or set the environment variable `MSCONV_DEVICE=CPU-bf16` before the first import.

`ISLANDS` (`FP32Islands`) says which fp32 islands CPU-bf16 keeps; `configure(mode, islands=...)` changes it at any
time (read per call, PyNative): flipping one island to bf16 is how a test shows the oracle catches a wrong cast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import mindspore as ms

MODES = ("CPU", "CPU-bf16", "Ascend")
_OP_MODULES = ("opensora_ms.ops.nn", "opensora_ms.ops.conv", "opensora_ms.ops.conv2d", "opensora_ms.ops.text")


@dataclass(frozen=True)
class FP32Islands:
    """Which of upstream's fp32 islands (SPEC §g) the CPU-bf16 op layer keeps in fp32. All True = upstream's policy;
    False computes that island as a chain of bf16 ops (every op rounded to bf16), for negative tests only."""

    rope: bool = True        # RoPE tables (angles, cos/sin) and the rotation (`rope_*`, `apply_rope*`)
    rms_norm: bool = True    # RMSNorm / QK-norm / T5 norm: statistics and normalisation (`rms_norm`, `t5_rms_norm`)
    norm_stats: bool = True  # LayerNorm / GroupNorm statistics inside the kernel (`layer_norm`, `group_norm`)
    softmax: bool = True     # fused attention: fp32 scores and softmax (`ops.nn.attention`)


def _initial_state() -> dict:
    env = os.environ.get("MSCONV_DEVICE", "").strip()
    if env:
        try:
            return _state(env)
        except ValueError as e:
            raise ValueError(f"MSCONV_DEVICE: {e}") from None
    return _state(ms.get_context("device_target"), initial=True)


def _state(mode: str, initial: bool = False) -> dict:
    if initial and mode not in MODES:  # another MindSpore target (e.g. GPU): neither CPU nor Ascend kernels
        return {"DEVICE": mode, "IS_CPU": False, "IS_ASCEND": False, "BF16_EMU": False}
    if mode not in MODES:
        raise ValueError(f"opensora_ms device mode must be one of {MODES}, got {mode!r}")
    target = ms.get_context("device_target")
    want = "Ascend" if mode == "Ascend" else "CPU"
    if target != want:
        raise ValueError(f"device mode {mode!r} needs MindSpore's device target {want!r}, "
                         f"but it is {target!r}: call ms.set_device({want!r}) first")
    return {"DEVICE": mode, "IS_CPU": want == "CPU", "IS_ASCEND": want == "Ascend", "BF16_EMU": mode == "CPU-bf16"}


_S = _initial_state()
DEVICE: str = _S["DEVICE"]
IS_CPU: bool = _S["IS_CPU"]          # CPU kernels (fp32 compute); also True in CPU-bf16
IS_ASCEND: bool = _S["IS_ASCEND"]
BF16_EMU: bool = _S["BF16_EMU"]      # CPU-bf16: casts around the CPU kernels, Ascend's rounding points
ISLANDS: FP32Islands = FP32Islands()


def configure(mode: str, islands: FP32Islands | None = None) -> None:
    """Select the op layer's mode ("CPU", "CPU-bf16", "Ascend") before the op modules are imported, and/or the fp32
    islands CPU-bf16 keeps (changeable at any time). Raises if the op modules were already imported in another
    mode (their branches are fixed at import)."""
    global DEVICE, IS_CPU, IS_ASCEND, BF16_EMU, ISLANDS
    if islands is not None and not isinstance(islands, FP32Islands):
        raise TypeError(f"islands must be an FP32Islands, got {type(islands).__name__}")
    if mode != DEVICE:
        loaded = [m for m in _OP_MODULES if m in sys.modules]
        if loaded:
            raise RuntimeError(f"the op layer was imported in mode {DEVICE!r} ({', '.join(loaded)}); "
                               f"configure({mode!r}) must run before the first import of opensora_ms models/ops")
        s = _state(mode)
        DEVICE, IS_CPU, IS_ASCEND, BF16_EMU = s["DEVICE"], s["IS_CPU"], s["IS_ASCEND"], s["BF16_EMU"]
        pkg = sys.modules.get("opensora_ms.ops")
        if pkg is not None:  # keep the package's re-exports in step
            pkg.DEVICE, pkg.IS_CPU, pkg.IS_ASCEND, pkg.BF16_EMU = DEVICE, IS_CPU, IS_ASCEND, BF16_EMU
    if islands is not None:
        ISLANDS = islands


def model_dtype():
    """The dtype to build models in for this mode: bf16 on Ascend and in CPU-bf16 (upstream's policy), else fp32."""
    return ms.bfloat16 if (IS_ASCEND or BF16_EMU) else ms.float32
