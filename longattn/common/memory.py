"""Peak memory of a stage's process tree: this process and its children (tokeniser workers).

``getrusage`` alone misses most of it: ``RUSAGE_SELF`` excludes children, and ``RUSAGE_CHILDREN`` holds only
the largest single child that has ended — while the workers run side by side. So a thread samples, every
``interval`` seconds, the sum of the proportional set sizes (PSS: a page shared by k processes counts 1/k
to each, so the copy-on-write pages forked workers share with their parent are counted once) of this
process and all its descendants; the peak reported is the largest of that sum, this process's own peak RSS
and the largest child's.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from collections.abc import Iterator

import psutil

__all__ = ["peak_rss_mb", "sampled_peak_mb", "tree_memory_mb", "track_peak_memory"]

_sampled_peak_mb = 0.0


def tree_memory_mb() -> float:
    """PSS (RSS where PSS cannot be read) of this process and its descendants now, in MiB."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            try:
                total += p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
    return total / 2**20


def sampled_peak_mb() -> float:
    """The largest tree-wide sum that ``track_peak_memory`` has sampled so far, in MiB (0 before any)."""
    return _sampled_peak_mb


def peak_rss_mb() -> float:
    """The peak memory of this process tree so far, in MiB (see the module docstring)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(own, child, sampled_peak_mb())


@contextlib.contextmanager
def track_peak_memory(interval: float = 1.0) -> Iterator[None]:
    """Sample ``tree_memory_mb`` in a daemon thread while the block runs (``peak_rss_mb`` includes it)."""
    stop = threading.Event()

    def sample() -> None:
        global _sampled_peak_mb
        while True:
            with contextlib.suppress(psutil.Error, OSError):
                _sampled_peak_mb = max(_sampled_peak_mb, tree_memory_mb())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
