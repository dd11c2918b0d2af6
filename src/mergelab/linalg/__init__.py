"""Linear algebra behind TSV and its analyses: truncated SVDs and polar factors of stacks of matrices.

The solvers (CPU kernels that release the GIL through SciPy's LAPACK, batched torch kernels on a GPU)
are private to this package (:mod:`._kernels`, :mod:`._lapack`).
"""

from __future__ import annotations

from .polar import POLAR_METHODS, polar_factor, polar_factors
from .svd import RTOL, RTOL_GRAM32, SVD_METHODS, default_rank, stack_kept, truncated_svd

__all__ = ["POLAR_METHODS", "RTOL", "RTOL_GRAM32", "SVD_METHODS", "default_rank", "polar_factor", "polar_factors",
           "stack_kept", "truncated_svd"]
