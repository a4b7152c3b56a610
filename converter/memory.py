"""Peak resident memory of one run inside a longer-lived process (a test session, a notebook, `generate` called
twice): the number a user compares with the machine's RAM, not the process's history."""
from __future__ import annotations

import resource


class PeakRSS:
    """This run's peak resident set, not the process's history (a test session, a notebook). Linux resets the
    kernel's high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs; where that is refused or has no
    effect (some sandboxes), a daemon thread samples the RSS every `interval` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.01):
        self.kernel = _reset_hwm()
        self._max = rss()
        self._stop = None
        if not self.kernel:
            import threading

            self._stop = threading.Event()
            threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._max = max(self._max, rss())

    def peak(self) -> int:
        if self.kernel:
            return _hwm() or lifetime_peak()
        self._max = max(self._max, rss())
        return self._max

    def stop(self) -> int:
        """The peak; ends the sampler."""
        p = self.peak()
        if self._stop is not None:
            self._stop.set()
        return p


def _hwm() -> int:
    """VmHWM in bytes, 0 where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def lifetime_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True only when the kernel took it (VmHWM then sits at the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, now = _hwm(), rss()
    return 0 < hwm <= now + max(64 << 20, now // 20)


def rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # pragma: no cover - psutil is a dependency
        return lifetime_peak()
