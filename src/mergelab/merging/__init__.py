"""Merge methods as plain functions registered by name, and validation-based coefficient choice.

A merge method maps ``(pretrained state dict, task vectors, options) -> merged state dict``; one module
per method, each registering itself with :func:`~mergelab.merging.registry.register_merge`. Importing
this package imports every method module below, so :data:`MERGE_METHODS` is complete.

Adding a method: write ``merging/<method>.py`` (a decorated function, using the kit in
:mod:`mergelab.merging.base` and the shared pieces in :mod:`mergelab.merging.sparsify`), add one
import line here; the contract tests (``tests/test_merge_contract.py``) then test it.
"""

from __future__ import annotations

# One import per method module; each registers its method (this order is the registry's order).
from . import weight_averaging  # noqa: F401  # isort: skip
from . import task_arithmetic  # noqa: F401  # isort: skip
from . import ties  # noqa: F401  # isort: skip
from . import dare  # noqa: F401  # isort: skip
from . import tsv  # noqa: F401  # isort: skip
from .base import LayerUpdate, assemble, scaled, validate
from .contract import check_merge_rule
from .registry import MERGE_METHODS, MergeMethod, check_methods, get_merge, merge, register_merge, seeded, seeded_options
from .select import MergeResult, merge_with_validation

__all__ = ["LayerUpdate", "MERGE_METHODS", "MergeMethod", "MergeResult", "assemble", "check_merge_rule", "check_methods", "get_merge", "merge",
           "merge_with_validation", "register_merge", "scaled", "seeded", "seeded_options", "validate"]
