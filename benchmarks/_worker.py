"""The worker side every speed benchmark shares: each framework runs in its own process (`--worker torch|ms`),
optionally pinned to `--cpus`, and hands its result back as one `RESULT <json>` line on stdout."""

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
