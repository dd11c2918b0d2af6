"""Permutation specs: which axis of which parameter each permutation of hidden units acts on.

A network's function is unchanged when the hidden units of a layer are permuted consistently: the
rows of the weights that write the units, their biases and normalization parameters, and the columns
of the weights that read them. A :class:`PermutationSpec` says this as data, one entry per parameter:
``axes["fc1.weight"] = ("P_0", None)`` means axis 0 (rows) of ``fc1.weight`` is permuted by the
group ``P_0`` and axis 1 (columns, the input) by none.

A permutation of a group of size ``n`` is an index tensor ``perm`` of shape ``(n,)``: applying it to
a parameter ``W`` along axis ``a`` gives ``W.index_select(a, perm)``, so position ``u`` of the result
holds the unit ``perm[u]`` of the original (the convention of git re-basin's code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Permutations = dict[str, torch.Tensor]
"""Group name to an index permutation of shape ``(group size,)`` (``int64``)."""


class SpecError(ValueError):
    """A permutation spec that does not fit a model: names the offending parameter or group."""


@dataclass(frozen=True)
class PermutationSpec:
    """Parameter name to one entry per axis: the permutation group acting on that axis, or ``None``.

    Attributes:
        axes: ``{parameter: (group or None, ...)}``, one entry per axis of the parameter's tensor.
        groups: ``{group: [(parameter, axis), ...]}``, derived: where each group acts.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    groups: dict[str, list[tuple[str, int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[tuple[str, int]]] = {}
        for name, per_axis in self.axes.items():
            seen = [g for g in per_axis if g is not None]
            if len(seen) != len(set(seen)):
                raise SpecError(f"parameter {name!r} has the group {per_axis} on two axes; a group may act on "
                                "one axis of a parameter at most.")
            for axis, g in enumerate(per_axis):
                if g is not None:
                    groups.setdefault(g, []).append((name, axis))
        object.__setattr__(self, "groups", groups)

    def group_sizes(self, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Size of every group in ``state`` (checked with :meth:`validate`)."""
        self.validate(state)
        return {g: int(state[where[0][0]].shape[where[0][1]]) for g, where in self.groups.items()}

    def validate(self, state: Mapping[str, torch.Tensor]) -> None:
        """Check the spec against a state dict: every parameter named on both sides, one entry per
        axis, and every axis of a group of the same size. Raises :class:`SpecError` naming the
        offending parameter, what it found and what would be valid."""
        missing = [k for k in state if k not in self.axes]
        if missing:
            raise SpecError(f"parameter {missing[0]!r} of the model is not in the permutation spec "
                            f"({len(missing)} missing: {missing[:5]}); give it one entry per axis "
                            f"(None where no permutation acts).")
        extra = [k for k in self.axes if k not in state]
        if extra:
            raise SpecError(f"parameter {extra[0]!r} of the permutation spec is not in the model "
                            f"({len(extra)} unknown: {extra[:5]}); the model has e.g. {list(state)[:5]}.")
        for name, per_axis in self.axes.items():
            if len(per_axis) != state[name].ndim:
                raise SpecError(f"parameter {name!r} has shape {tuple(state[name].shape)} ({state[name].ndim} axes) "
                                f"but the spec gives {len(per_axis)} entries {per_axis}; give one per axis.")
        for g, where in self.groups.items():
            sizes = {(n, a): int(state[n].shape[a]) for n, a in where}
            first = where[0]
            for (n, a), s in sizes.items():
                if s != sizes[first]:
                    raise SpecError(f"parameter {n!r} axis {a} has size {s}, but group {g!r} has size "
                                    f"{sizes[first]} on {first[0]!r} axis {first[1]}; every axis a group acts "
                                    "on must have the same size.")


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                       sizes: Mapping[str, int]) -> None:
    """Every group has a permutation of ``range(size)``; a :class:`SpecError` names the group otherwise."""
    for g, n in sizes.items():
        if g not in perms:
            raise SpecError(f"no permutation for group {g!r}; give one index tensor of shape ({n},) per group.")
        p = perms[g]
        if p.shape != (n,) or not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
            raise SpecError(f"the permutation of group {g!r} is not a permutation of range({n}) "
                            f"(shape {tuple(p.shape)}).")


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute ``state`` by ``perms``: every parameter along every axis its spec names.

    Args:
        spec: the model's permutation spec (validated against ``state``).
        perms: ``{group: index tensor (n,)}``; axis ``a`` of a parameter in group ``g`` becomes
            ``W.index_select(a, perms[g])``.
        state: the model's parameters.

    Returns:
        A new state dict of the same shapes (tensors not touched by any group are shared).
    """
    check_permutations(spec, perms, spec.group_sizes(state))
    out = {}
    for name, w in state.items():
        for axis, g in enumerate(spec.axes[name]):
            if g is not None:
                w = w.index_select(axis, perms[g].to(w.device))
        out[name] = w
    return out


def identity_permutations(sizes: Mapping[str, int]) -> Permutations:
    """The identity permutation of every group."""
    return {g: torch.arange(n) for g, n in sizes.items()}


def random_permutations(sizes: Mapping[str, int], generator: torch.Generator) -> Permutations:
    """A uniformly random permutation of every group, from ``generator``."""
    return {g: torch.randperm(n, generator=generator) for g, n in sorted(sizes.items())}


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse index permutation: ``invert(p)[p] == arange(n)``."""
    return torch.argsort(perm)


def compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """Index permutation equal to applying ``first`` and then ``then`` (``W[first][then] == W[compose]``)."""
    return first[then]


def cycle_error(perm_ab: Mapping[str, torch.Tensor], perm_bc: Mapping[str, torch.Tensor],
                perm_ca: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far the maps around the cycle A -> B -> C -> A are from the identity, per group.

    ``perm_xy`` puts model ``y`` in the frame of model ``x`` (``W_y.index_select(a, perm_xy) ~ W_x``): unit
    ``i`` of ``x`` is matched with unit ``perm_xy[i]`` of ``y``. The composed map sends unit ``i`` of A to
    ``perm_ca[perm_bc[perm_ab[i]]]``; the error is the fraction of units it does not send to themselves
    (0: cycle-consistent; equals ``||P_AB P_BC P_CA - I||_F^2 / (2 n)`` for permutation matrices).
    """
    out = {}
    for g in perm_ab:
        n = perm_ab[g].numel()
        around = perm_ca[g][perm_bc[g][perm_ab[g]]]
        out[g] = float((around != torch.arange(n)).sum()) / n
    return out
