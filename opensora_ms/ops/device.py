"""The one place that decides which kernels the op layer uses.

`IS_CPU` is a module constant, so `ms.jit` folds every `if IS_CPU:` branch. Choose the device with
`ms.set_device(...)` / `ms.set_context(device_target=...)` *before* importing `opensora_ms`.
"""

import mindspore as ms

DEVICE: str = ms.get_context("device_target")
IS_CPU: bool = DEVICE == "CPU"
IS_ASCEND: bool = DEVICE == "Ascend"
