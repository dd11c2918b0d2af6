"""Task vectors: the difference between a fine-tuned and the pretrained state dict.

``tau_t = theta_t - theta_0`` per parameter, skipping integer buffers (as the public task-vector code
does). :class:`TaskVector` is a small value type: it adds, scales, negates, measures norms and
flattens per layer, and applies itself to a pretrained state dict.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .layers import layer_groups
from .utils import StateDict, check_number


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                     what: str = "state dict") -> None:
    """Raise ``ValueError`` naming the first key or shape where ``other`` differs from ``reference``."""
    missing = [k for k in reference if k not in other]
    if missing:
        raise ValueError(f"{what} is missing key {missing[0]!r} (shape {tuple(reference[missing[0]].shape)}); "
                         f"{len(missing)} key(s) missing in all: the models do not share an architecture.")
    extra = [k for k in other if k not in reference]
    if extra:
        raise ValueError(f"{what} has unexpected key {extra[0]!r} (shape {tuple(other[extra[0]].shape)}); "
                         f"{len(extra)} unexpected in all: the models do not share an architecture.")
    for k, v in reference.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise ValueError(f"{what} key {k!r} has shape {tuple(other[k].shape)}, expected {tuple(v.shape)}: "
                             "the models do not share an architecture.")


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t) or torch.is_complex(t)


@dataclass(frozen=True)
class TaskVector:
    """A task vector: parameter name to update ``(same shape as the parameter)``.

    Build one with :meth:`from_states`; combine with ``+``, ``-``, ``*`` by a scalar, unary ``-``.
    """

    vector: dict[str, torch.Tensor]

    @classmethod
    def from_states(cls, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]
                    ) -> "TaskVector":
        """``finetuned - pretrained`` for every floating-point entry (integer buffers are skipped)."""
        check_compatible(pretrained, finetuned, "fine-tuned state dict")
        return cls({k: (finetuned[k].detach().float() - v.detach().float())
                    for k, v in pretrained.items() if _is_float(v)})

    # -------------------------------------------------------------- mapping-like access
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.vector[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def keys(self) -> Iterable[str]:
        return self.vector.keys()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.vector.items()

    # -------------------------------------------------------------- arithmetic
    def _check(self, other: "TaskVector") -> None:
        check_compatible(self.vector, other.vector, "task vector")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # lets sum() start from 0
            return self
        self._check(other)
        return TaskVector({k: v + other[k] for k, v in self.items()})

    __radd__ = __add__

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check(other)
        return TaskVector({k: v - other[k] for k, v in self.items()})

    def __neg__(self) -> "TaskVector":
        return TaskVector({k: -v for k, v in self.items()})

    __array_ufunc__ = None
    """NumPy scalars on the left (``np.float32(0.5) * tv``) defer to :meth:`__rmul__` instead of broadcasting."""

    def __mul__(self, scalar: float) -> "TaskVector":
        """``scalar * tau`` for any real scalar: a Python or NumPy number, or a one-element tensor."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1 and not scalar.is_complex():
            scalar = scalar.item()
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        scalar = float(scalar)
        return TaskVector({k: scalar * v for k, v in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> "TaskVector":
        return self * (1.0 / scalar)

    # -------------------------------------------------------------- measurements
    def layer_norms(self) -> dict[str, float]:
        """L2 (Frobenius) norm of each parameter's update."""
        return {k: float(torch.linalg.vector_norm(v)) for k, v in self.items()}

    def norm(self) -> float:
        """L2 norm of the whole flattened task vector."""
        return float(torch.sqrt(sum(torch.sum(v.double() ** 2) for v in self.vector.values())))

    def flatten(self, keys: Iterable[str] | None = None) -> torch.Tensor:
        """All (or the named) updates concatenated in key order, ``(n_params,)``."""
        keys = list(keys) if keys is not None else list(self.vector)
        return torch.cat([self.vector[k].reshape(-1) for k in keys])

    def numel(self) -> int:
        return sum(v.numel() for v in self.vector.values())

    def to(self, device: torch.device | str) -> "TaskVector":
        return TaskVector({k: v.to(device) for k, v in self.items()})

    # -------------------------------------------------------------- application
    def apply_to(self, pretrained: Mapping[str, torch.Tensor], coefficient: float = 1.0) -> StateDict:
        """``theta_0 + coefficient * tau``; entries without an update (integer buffers) are copied."""
        check_number("coefficient", coefficient)
        out: StateDict = {}
        for k, v in pretrained.items():
            if k in self.vector:
                out[k] = (v.float() + coefficient * self.vector[k].to(v.device)).to(v.dtype)
            else:
                out[k] = v.clone()
        return out


def task_vectors_from(pretrained: Mapping[str, torch.Tensor],
                      finetuned: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, TaskVector]:
    """One task vector per named fine-tuned state dict."""
    return {name: TaskVector.from_states(pretrained, sd) for name, sd in finetuned.items()}


def cosine_similarity_matrix(task_vectors: Mapping[str, TaskVector]) -> tuple[list[str], torch.Tensor]:
    """Pairwise cosine similarity of flattened task vectors: names and a ``(T, T)`` matrix."""
    names = list(task_vectors)
    if not names:
        raise ValueError("task_vectors is empty; pass {task: TaskVector} for at least one task.")
    flat = torch.stack([task_vectors[n].flatten() for n in names])
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return names, flat @ flat.T


TensorMap = Mapping[str, torch.Tensor] | TaskVector
"""Anything keyed by parameter name: a state dict, a task vector or a gradient."""


# ----------------------------------------------------------------------------- geometry of parameter maps
def _flat(t: TensorMap, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([t[k].detach().reshape(-1).double().cpu() for k in keys])


def _common_keys(a: TensorMap, b: TensorMap) -> list[str]:
    check_compatible({k: a[k] for k in a.keys()}, {k: b[k] for k in b.keys()}, "second argument")
    return list(a.keys())


def cosine(a: TensorMap, b: TensorMap, keys: Sequence[str] | None = None) -> float:
    """Cosine similarity of two parameter-keyed vectors over ``keys`` (default: all), in float64.

    Zero when either vector is zero over those keys.
    """
    keys = list(keys) if keys is not None else _common_keys(a, b)
    fa, fb = _flat(a, keys), _flat(b, keys)
    denom = float(fa.norm() * fb.norm())
    return float(fa @ fb) / denom if denom > 0 else 0.0


def norm(a: TensorMap, keys: Sequence[str] | None = None) -> float:
    """L2 norm over ``keys`` (default: all entries), in float64."""
    return float(_flat(a, list(keys) if keys is not None else list(a.keys())).norm())


def layer_cosines(a: TensorMap, b: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block"
                  ) -> dict[str, float]:
    """Cosine of ``a`` and ``b`` per layer group (see :func:`layer_groups`), plus ``"total"``."""
    keys = _common_keys(a, b)
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {g: cosine(a, b, ks) for g, ks in groups.items()}
    out["total"] = cosine(a, b, keys)
    return out


def group_norms(a: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block") -> dict[str, float]:
    """L2 norm of ``a`` per layer group, plus ``"total"``."""
    keys = list(a.keys())
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {g: norm(a, ks) for g, ks in groups.items()}
    out["total"] = norm(a, keys)
    return out


def layer_norm_ratios(a: TensorMap, b: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block"
                      ) -> dict[str, float]:
    """``||a_l|| / ||b_l||`` per layer group, plus ``"total"`` (``nan`` where ``b_l`` is zero)."""
    keys = _common_keys(a, b)
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {}
    for g, ks in [*groups.items(), ("total", keys)]:
        nb = norm(b, ks)
        out[g] = norm(a, ks) / nb if nb > 0 else float("nan")
    return out


def projection_share(part: TensorMap, whole: TensorMap, keys: Sequence[str] | None = None) -> float:
    """``<part, whole> / ||whole||^2``: the share of ``whole`` that ``part`` accounts for along it.

    With ``whole = part + rest`` the shares of ``part`` and ``rest`` add up to 1; a share above 1
    means the rest points partly back.
    """
    keys = list(keys) if keys is not None else _common_keys(part, whole)
    fp, fw = _flat(part, keys), _flat(whole, keys)
    denom = float(fw @ fw)
    return float(fp @ fw) / denom if denom > 0 else float("nan")
