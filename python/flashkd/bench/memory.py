"""Peak extra memory of a block: the high-water mark above what was in use when
the block began, so inputs and warm state are not counted, while everything
the block allocates (gradient, saved activations, workspace) is.

CUDA: the caching allocator's peak statistics. CPU: the resident-set
high-water mark (VmHWM), reset through /proc/self/clear_refs when the block
begins; where that is unavailable, the growth of ru_maxrss, which misses what
stays under an earlier peak: measuring each case in a fresh process keeps the
earlier peak low. On a CPU the block also starts with malloc_trim, so memory
the C heap kept from earlier calls (allocations under glibc's mmap threshold
are reused, not returned) is counted again when the block touches it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import resource

import torch


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _glibc_malloc(function, *args):
    """Calls one of glibc's malloc tuning functions; a no-op with another C library."""
    try:
        getattr(ctypes.CDLL(ctypes.util.find_library("c")), function)(*args)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _trim_c_heap():
    _glibc_malloc("malloc_trim", 0)


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_heap_blocks():
    """Puts glibc's malloc in the state a long-running process reaches: its
    dynamic mmap threshold rises, as blocks are freed, to its 64-bit ceiling of
    32 MiB (and the trim threshold to twice that), after which blocks up to
    32 MiB come from the heap and are reused, while larger ones are still
    mapped afresh, and page-faulted in, by every call. A no-op elsewhere."""
    _glibc_malloc("mallopt", _M_MMAP_THRESHOLD, 32 << 20)
    _glibc_malloc("mallopt", _M_TRIM_THRESHOLD, 64 << 20)


def _reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_method():
    """How CPU peaks are measured on this machine (recorded with the results)."""
    return "VmHWM reset via clear_refs" if _reset_rss_peak() else "ru_maxrss growth"


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.extra_bytes``."""

    def __init__(self, device):
        self.device = device
        self.extra_bytes = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_c_heap()
        if _reset_rss_peak():
            self._base, self._field = _status_kib("VmRSS") * 1024, "VmHWM"
        else:
            self._base, self._field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._field == "VmHWM":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra_bytes = max(0, peak - self._base)
        return False
