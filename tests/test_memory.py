"""converter.memory.PeakRSS: a run's own peak resident set inside a process that used more before, with the
kernel's high-water-mark reset and with the sampling fallback (sandboxes that refuse /proc/self/clear_refs)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from converter import memory

MB = 1 << 20


def _touch(n_mb: int) -> np.ndarray:
    a = np.empty(n_mb * MB, dtype=np.uint8)
    a.fill(1)   # resident, not just reserved
    return a


@pytest.mark.parametrize("forced_sampler", [False, True], ids=["this-machine", "sampler"])
def test_peak_is_this_runs_not_the_process_history(forced_sampler, monkeypatch):
    """this-machine: whatever PeakRSS picks here (the VmHWM reset where the kernel takes it); sampler: forced."""
    if forced_sampler:
        monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    big = _touch(600)          # the history: a peak far above anything the run does
    del big
    base = memory.rss()
    assert memory.lifetime_peak() >= base + 550 * MB   # the history really is higher than the run below
    tracker = memory.PeakRSS()
    assert not (forced_sampler and tracker.kernel)
    held = _touch(150)
    time.sleep(0.2)            # several sampling periods while it is resident
    del held
    peak = tracker.stop()
    assert base + 120 * MB <= peak <= base + 400 * MB, (peak / MB, base / MB)
