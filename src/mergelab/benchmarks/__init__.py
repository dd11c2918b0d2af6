"""Benchmarks: the interface (:mod:`.base`) and its sizes, ``tiny`` (:mod:`.tiny`, offline, CPU) and
``clip`` (:mod:`.clip`, open_clip ViT-B-32 on the 8 standard datasets)."""

from __future__ import annotations

from .base import Benchmark

__all__ = ["Benchmark"]
