"""The ``tiny`` size: 8 procedural 3x32x32 tasks (:mod:`.data`) and :class:`TinyBenchmark` (:mod:`.benchmark`)."""

from __future__ import annotations

from .benchmark import TinyBenchmark, TinyBenchmarkConfig

__all__ = ["TinyBenchmark", "TinyBenchmarkConfig"]
