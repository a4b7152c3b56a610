"""The op layer: every kernel the models call goes through here (see docs/architecture.md).

`nn` holds linear/norm/attention/RoPE/activation functionals and the torch-named cells built on them;
`conv` holds convolution, padding, interpolation and group norm.
"""

from .device import DEVICE, IS_ASCEND, IS_CPU  # noqa: F401
