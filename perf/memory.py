"""Peak memory of a block of code, as the benchmarks report it (``make bench``).

On the CPU the peak is the process's resident set size (RSS), measured the most exact way the
system allows:

* Linux: the kernel's own peak counter ``VmHWM`` (``/proc/self/status``), reset at the start of the
  block by writing ``5`` to ``/proc/self/clear_refs``;
* elsewhere (or where that write is refused): the largest of ``psutil`` RSS samples taken every
  10 ms, which can miss short peaks.

Before the level at the start is read, memory that the C allocator holds but no longer uses is
handed back to the system (glibc's ``malloc_trim``). Without that, blocks that reuse memory freed
before them look free: at 20 task vectors, where earlier layers' buffers stayed resident, the TSV-M
benchmark read 0 MiB for layer merges that need about 100 MiB.

On a GPU the peak is ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's
reserve), reset at the start of the block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import threading
import time
from pathlib import Path

import torch

MIB = 2**20


@functools.lru_cache(maxsize=1)
def _libc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Hand memory the C allocator holds but does not use back to the system; whether it could."""
    trim = _libc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or ``None``."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int:
    """The process's resident set size, in bytes."""
    value = _status_bytes("VmRSS")
    if value is None:
        import psutil

        value = psutil.Process().memory_info().rss
    return value


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


SAMPLED = "psutil RSS sampled every 10 ms"
"""The :func:`memory_method` that can miss short peaks."""


@functools.lru_cache(maxsize=None)
def memory_method(device_type: str) -> str:
    """How :class:`PeakMemory` measures on a device of this type (``"cpu"``, ``"cuda"``), in words."""
    if device_type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if reset_peak_rss():
        return "VmHWM (reset via /proc/self/clear_refs)"
    return SAMPLED


class PeakMemory:
    """Context manager: the peak memory of its block above the level at its start.

    Attributes (after the block):
        extra_bytes: peak minus the level at the start, in bytes (at least 0); ``peak_mib`` in MiB.
        base_bytes: the level at the start (resident set size, or CUDA memory allocated), bytes.
        method: how it was measured (:func:`memory_method`).
        exact: whether the peak is the system's own counter (``False``: sampled, may miss peaks).

    Not nestable: the kernel's peak counter belongs to the whole process, so an inner block resets
    the outer one's. Threads started inside the block are counted (it is the process's memory).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.method = memory_method(self.device.type)
        self.exact = self.method != SAMPLED
        self.extra_bytes = 0
        self.base_bytes = 0

    @property
    def peak_mib(self) -> float:
        return self.extra_bytes / MIB

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self.base_bytes = rss_bytes()
        if self.exact:
            reset_peak_rss()
        else:
            import psutil

            self._stop = threading.Event()
            self._samples = [self.base_bytes]
            process = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self._samples.append(process.memory_info().rss)
                    time.sleep(0.01)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.exact:
            peak = _status_bytes("VmHWM") or 0
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._samples + [rss_bytes()])
        self.extra_bytes = max(0, peak - self.base_bytes)
