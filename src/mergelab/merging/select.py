"""Coefficient choice on validation: sweep a method's coefficient grid and keep the best merge."""

from __future__ import annotations

import math

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..task_vectors import TaskVector
from ..utils import StateDict, check_number
from .base import scaled
from .registry import get_merge


def at_grid_edge(chosen: float | None, grid: Sequence[float]) -> bool:
    """Whether ``chosen`` is the smallest or the largest value of a ``grid`` of two or more values: a choice
    made on validation there may have its optimum beyond the grid (or, at 0, no merge beats the pretrained
    model). ``None`` (a method without a coefficient) is never at an edge."""
    if chosen is None or len(set(grid)) < 2:
        return False
    return chosen in (min(grid), max(grid))


@dataclass
class MergeResult:
    """A merge with its coefficient chosen on validation.

    Attributes:
        method: registry name.
        coefficient: chosen value (``None`` for methods without one).
        state: the merged state dict at that coefficient.
        sweep: ``{coefficient: validation score}`` for every value tried.
        also: merged states at the other coefficients asked for (``also_at`` of
            :func:`merge_with_validation`), e.g. a method's data-free default.
    """

    method: str
    coefficient: float | None
    state: StateDict
    sweep: dict[float, float]
    also: dict[float, StateDict] = field(default_factory=dict)

    @property
    def at_grid_edge(self) -> bool:
        """The chosen coefficient is the smallest or the largest of a grid of two or more values: the
        optimum may lie beyond the grid (or, at 0, no merge beats the pretrained model): :func:`at_grid_edge`."""
        return at_grid_edge(self.coefficient, list(self.sweep))


def _coefficients(what: str, values: Any, example: str) -> tuple[float, ...]:
    """``values`` (any iterable of numbers: a list, a NumPy array, a range, a generator, read once) as floats; a clear
    error naming ``what`` for a single value, a string, a mapping or an entry that is not a finite number."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ValueError(f"{what}={values!r} is not valid; use a list of coefficients, e.g. {example}.")
    values = tuple(values)
    for c in values:
        check_number(f"{what} value", c)
    return tuple(float(c) for c in values)


def merge_with_validation(name: str, pretrained: Mapping[str, torch.Tensor],
                          task_vectors: Sequence[TaskVector], score: Callable[[StateDict], float],
                          grid: Sequence[float] | None = None, progress: bool = True,
                          also_at: Sequence[float] = (), **options: Any) -> MergeResult:
    """Merge with ``name``, choosing ``coefficient`` to maximize ``score`` (a validation metric).

    ``score`` must evaluate on validation data, never test, and return a finite number (anything else
    is an error naming the coefficient). Ties go to the smaller coefficient, whatever the grid's order.
    :attr:`MergeResult.at_grid_edge` says whether the choice is at an end of the grid.
    ``also_at``: coefficients whose merged states are kept as well (:attr:`MergeResult.also`), taken
    from the sweep when they are in ``grid`` and otherwise built from the same update, so that, say,
    TSV-M at ``alpha = 1`` does not compute its SVDs a second time.
    """
    method = get_merge(name)
    method.check_options(options)
    grid = _coefficients("grid", method.coefficient_grid if grid is None else grid, "[0.0, 0.1, ..., 1.0]")
    if grid and "coefficient" not in method.defaults:
        raise ValueError(f"{name!r} has no coefficient to choose; call it with grid=() (or leave grid unset).")
    also_at = _coefficients("also_at", also_at, "[1.0]")
    if grid and "coefficient" in options:
        raise ValueError(f"coefficient={options['coefficient']!r} conflicts with the sweep: the coefficient is chosen "
                         f"on validation from grid; to fix it, pass grid=[{options['coefficient']!r}].")
    if not grid:
        if also_at:
            raise ValueError(f"also_at={list(also_at)!r} needs a coefficient sweep; {name!r} got grid=().")
        state = method(pretrained, task_vectors, **options)
        return MergeResult(name, None, state, {})
    if method.update is not None:  # theta_0 + c * U: compute U once for the whole sweep
        settings = {k: v for k, v in {**method.defaults, **options}.items() if k != "coefficient"}
        keys, layer = method.update(pretrained, task_vectors, **settings)
        update = {k: layer(k) for k in keys}
        build = lambda c: scaled(pretrained, (list(update), update.__getitem__), c)  # noqa: E731
    else:
        build = lambda c: method(pretrained, task_vectors, **{**options, "coefficient": c})  # noqa: E731
    wanted = set(also_at)
    sweep: dict[float, float] = {}
    also: dict[float, StateDict] = {}
    best: tuple[float, float, StateDict] | None = None
    for c in tqdm(grid, desc=f"{name}: coefficient on validation", disable=not progress, leave=False):
        state = build(float(c))
        s = float(score(state))
        if not math.isfinite(s):
            raise ValueError(f"{name}: the validation score at coefficient {float(c):g} is {s}; the score function "
                             "must return a finite number (check the evaluation of that merge).")
        sweep[float(c)] = s
        if float(c) in wanted:
            also[float(c)] = state
        # the best score wins; among equal scores the smaller coefficient, whatever the grid's order
        if best is None or s > best[0] or (s == best[0] and float(c) < best[1]):
            best = (s, float(c), state)
    assert best is not None
    also.update({c: build(c) for c in wanted - set(also)})
    return MergeResult(name, best[1], best[2], sweep, also)
