"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-M merging and TSV-C compression.

Each *task matrix* ``Delta_t`` (the update of one 2-D parameter, ``(d_out, d_in)``) is close to low
rank. TSV-C (:mod:`.compress`) keeps each task's top ``k = floor(min(m, n) / T)`` singular triplets;
TSV-M (:mod:`.merge`) stacks every task's kept singular vectors, replaces each stack by its polar
factor and rebuilds one update with the singular values unchanged. Which tensors are decomposed:
:func:`mergelab.layers.is_decomposed`; solvers: :mod:`mergelab.linalg`. Singular Task Interference
and spectra are analyses: :mod:`mergelab.analysis.interference`, :mod:`mergelab.analysis.spectra`.
"""

from __future__ import annotations

from .compress import CompressedTaskVector, storage_bytes, tsv_compress, tsv_reconstruct
from .merge import (
                    MergedFactors,
                    tsv_merge,
                    tsv_merge_compressed,
                    tsv_merge_factors,
                    tsv_merge_matrices,
                    tsv_merge_matrix_reference,
                    tsv_update,
)

__all__ = ["CompressedTaskVector", "MergedFactors", "storage_bytes", "tsv_compress", "tsv_merge", "tsv_merge_compressed", "tsv_merge_factors",
           "tsv_merge_matrices", "tsv_merge_matrix_reference", "tsv_reconstruct", "tsv_update"]
