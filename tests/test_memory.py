"""Peak memory as the benchmarks measure it (``mergelab.memory``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # the speed and memory tools live outside the package

import torch

from memory import PeakMemory, memory_method

MIB_FLOATS = 2**20 // 4


def allocate(mib: int, pieces: int = 1) -> list[torch.Tensor]:
    """``pieces`` tensors of ``mib / pieces`` MiB each, every page written."""
    return [torch.ones(mib // pieces * MIB_FLOATS) for _ in range(pieces)]


def test_peak_memory_counts_what_a_block_allocates_and_frees():
    with PeakMemory("cpu") as mem:
        x = allocate(64)
        del x
    assert mem.method == memory_method("cpu")
    assert 60 <= mem.peak_mib <= 96, mem.peak_mib


def test_memory_freed_before_a_block_and_reused_in_it_still_counts():
    # Blocks of a few MiB freed below a live allocation stay resident with the C allocator, which
    # hands them out again; a block that reuses them must not look free (the TSV-M benchmark once
    # read 0 MiB that way).
    del allocate(8)[0]  # once freed, blocks this large come from the heap, not from mmap
    x = allocate(96, pieces=12)
    pin = torch.ones(MIB_FLOATS)  # above them in the heap: freeing them cannot shrink the heap
    del x
    with PeakMemory("cpu") as mem:
        y = allocate(96, pieces=12)
        del y
    assert mem.peak_mib >= 80, mem.peak_mib
    del pin
