"""The op layer: every kernel the models call goes through here (see docs/architecture.md).

`nn` holds linear/norm/attention/RoPE/activation functionals and the torch-named cells built on them;
`conv` holds convolution, padding, interpolation and group norm; `device` the mode (CPU, CPU-bf16, Ascend).
"""

from .device import BF16_EMU, DEVICE, IS_ASCEND, IS_CPU, FP32Islands, configure, model_dtype  # noqa: F401
