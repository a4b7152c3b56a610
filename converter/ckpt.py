"""`--format ckpt`: a MindSpore .ckpt written from the converted safetensors (the only module that imports
mindspore). MindSpore parses .ckpt as one protobuf message, so this needs about the model's size in RAM."""
from __future__ import annotations

import os


def write_ckpt(shards, path) -> None:
    import mindspore as ms  # only here

    params = {}
    for s in shards:
        params.update(ms.load_checkpoint(os.fspath(s), format="safetensors"))
    tmp = os.fspath(path) + ".tmp.ckpt"
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], tmp)
    os.replace(tmp, path)
