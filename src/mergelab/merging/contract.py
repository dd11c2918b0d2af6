"""The contract of a merge rule, as one function a student (or a new method's author) can call.

:func:`check_merge_rule` runs a rule ``fn(pretrained, task_vectors, **options) -> merged state dict`` on
small hand-made models and raises :class:`AssertionError` with a message saying which promise it
broke. ``tests/test_merge_contract.py`` calls it on every registered method, and the exercise of
chapter 00 calls it on the student's rule: both are held to the same contract.

The promises:

1. the merge returns a dict with the pretrained model's keys, in its order, and every tensor keeps its
   shape and dtype;
2. it leaves its inputs unchanged (no in-place edits of ``pretrained`` or the task vectors);
3. it is deterministic: the same inputs give the same merge, bit for bit;
4. task vectors that are all zero give back the pretrained model (nothing to merge, nothing changes);
5. under ``identity`` options (when given), one task vector gives back its expert ``theta_0 + tau``;
6. it refuses an empty list of task vectors and a task vector of another shape with ``ValueError``
   (the kit's :func:`mergelab.merging.validate` does both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..task_vectors import TaskVector

SHAPES = {"w": (6, 5), "b": (6,), "emb": (3, 5)}
"""The small model the contract merges: a matrix, a bias and an embedding."""


def _state(seed: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or repr(fn)


def check_merge_rule(fn: Callable[..., Mapping[str, torch.Tensor]], identity: Mapping[str, Any] | None = None,
                     **options: Any) -> None:
    """Check that ``fn`` keeps the contract of a merge rule (see the module docstring); return ``None``.

    Args:
        fn: ``fn(pretrained, task_vectors, **options) -> merged state dict``, e.g. a registered
            :class:`~mergelab.merging.MergeMethod` or a function of one's own.
        identity: options under which one task vector must give back its expert, e.g.
            ``{"coefficient": 1.0}`` for task arithmetic; ``None`` skips that promise.
        **options: passed to every call of ``fn`` (besides ``identity`` in promise 5).

    Raises:
        AssertionError: naming the rule and the broken promise, with what was expected and found.
    """
    name = _name(fn)
    pre = _state(0)
    tvs = [TaskVector.from_states(pre, _state(s)) for s in (1, 2, 3)]
    before = ({k: v.clone() for k, v in pre.items()}, [{k: v.clone() for k, v in tv.items()} for tv in tvs])

    merged = fn(pre, tvs, **options)
    assert isinstance(merged, Mapping), f"merge rule {name}: returns {type(merged).__name__}, expected a dict of tensors"
    assert list(merged) == list(pre), (f"merge rule {name}: returns the keys {list(merged)}, expected the pretrained "
                                       f"model's keys {list(pre)} in that order")
    for k, v in pre.items():
        got = merged[k]
        assert isinstance(got, torch.Tensor), f"merge rule {name}: {k!r} is a {type(got).__name__}, expected a tensor"
        assert got.shape == v.shape and got.dtype == v.dtype, (
            f"merge rule {name}: {k!r} has shape {tuple(got.shape)} and dtype {got.dtype}, expected "
            f"{tuple(v.shape)} and {v.dtype}")
        assert torch.isfinite(got).all(), f"merge rule {name}: {k!r} holds NaN or infinite values"
    for k, v in before[0].items():
        assert torch.equal(pre[k], v), f"merge rule {name}: changed the pretrained model's {k!r} in place"
    for i, (tv, saved) in enumerate(zip(tvs, before[1])):
        for k, v in saved.items():
            assert torch.equal(tv[k], v), f"merge rule {name}: changed task vector {i}'s {k!r} in place"

    again = fn(pre, tvs, **options)
    for k in pre:
        assert torch.equal(merged[k], again[k]), (f"merge rule {name}: two calls on the same inputs differ in {k!r}; "
                                                  "a merge must be deterministic (seed any randomness)")

    zeros = [TaskVector({k: torch.zeros_like(v) for k, v in pre.items()}) for _ in range(3)]
    nothing = fn(pre, zeros, **options)
    for k in pre:
        torch.testing.assert_close(nothing[k], pre[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: (
            f"merge rule {name}: task vectors that are all zero must give back the pretrained model, but {k!r} "
            f"moved: {m}"))

    if identity is not None:
        expert = tvs[0].apply_to(pre)
        single = fn(pre, tvs[:1], **{**options, **identity})
        for k in pre:
            torch.testing.assert_close(single[k], expert[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: (
                f"merge rule {name}: one task vector under the options {dict(identity)} must give back its expert "
                f"theta_0 + tau, but {k!r} differs: {m}"))

    for bad, what in (([], "an empty list of task vectors"),
                      ([tvs[0], TaskVector.from_states(_state(0, {**SHAPES, "w": (6, 6)}),
                                                       _state(9, {**SHAPES, "w": (6, 6)}))],
                       "a task vector whose 'w' has another shape")):
        try:
            fn(pre, bad, **options)
        except ValueError:
            continue
        except Exception as err:  # noqa: BLE001 - the message says what was raised instead
            raise AssertionError(f"merge rule {name}: given {what} it raised {type(err).__name__}: {err}; expected a "
                                 "ValueError that says what is wrong (call mergelab.merging.validate first)") from err
        raise AssertionError(f"merge rule {name}: given {what} it returned a merge; expected a ValueError (call "
                             "mergelab.merging.validate(pretrained, task_vectors) first)")
