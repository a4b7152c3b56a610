"""`--format ckpt`: a MindSpore .ckpt written from the converted safetensors (the only module that imports
mindspore). MindSpore parses .ckpt as one protobuf message, so this needs about the model's size in RAM."""
from __future__ import annotations

import os


def write_ckpt(shards, path) -> None:
    """MindSpore failures become OutputError naming the file (OSErrors such as a full disk pass through)."""
    import mindspore as ms  # only here

    from .errors import OutputError

    params = {}
    for s in shards:
        try:
            params.update(ms.load_checkpoint(os.fspath(s), format="safetensors"))
        except OSError:
            raise
        except Exception as e:
            raise OutputError(f"{s}: MindSpore cannot load the converted shard for --format ckpt: {_msg(e)}") from None
    tmp = os.fspath(path) + ".tmp.ckpt"
    try:
        ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], tmp)
    except OSError:
        raise
    except Exception as e:
        raise OutputError(f"{path}: MindSpore cannot write the checkpoint: {_msg(e)}") from None
    os.replace(tmp, path)


def _msg(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0][:300] if s else type(e).__name__)
