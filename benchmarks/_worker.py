"""The worker side every speed benchmark shares: each framework runs in its own process (`--worker torch|ms`),
optionally pinned to `--cpus`, and hands its result back as one `RESULT <json>` line on stdout; the torch worker hands
the seeded weights to the MindSpore worker as an .npz, so the MindSpore process never imports torch."""

from __future__ import annotations

import json
import os


def serve_worker(args, worker_torch, worker_ms) -> bool:
    """Run this process as the `--worker` the parent asked for and print its result; False when not a worker."""
    if not args.worker:
        return False
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    res = worker_torch(args) if args.worker == "torch" else worker_ms(args)
    print("RESULT " + json.dumps(res))
    return True


def write_torch_state(path, torch_model) -> None:
    """The torch worker's seeded weights, as numpy in an .npz, for the MindSpore worker (written once per run)."""
    if os.path.exists(path):
        return
    import numpy as np

    from parity.adapters.base import torch_state_numpy

    np.savez(path, **torch_state_numpy(torch_model))


def load_torch_state(net, path, mapping: str):
    """Load `write_torch_state`'s file into the MindSpore `net` through the mapping, strictly; torch is never
    imported."""
    import numpy as np

    from opensora_ms.loading import load_strict
    from parity.adapters.base import convert_state

    with np.load(path, allow_pickle=False) as st:
        load_strict(net, convert_state(mapping, {k: st[k] for k in st.files}))
    return net
