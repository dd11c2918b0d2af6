"""The registry of merge methods: one :class:`MergeMethod` per name, filled by :func:`register_merge`.

A merge method is a plain function ``fn(pretrained, task_vectors, **options) -> merged state dict``.
Its signature is the single source of its options: the defaults the registry records are read from
it (:func:`register_merge`), never written a second time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..task_vectors import TaskVector
from ..utils import StateDict
from .base import LayerUpdate

MergeFn = Callable[..., StateDict]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry key, in the field's words (``"task_arithmetic"``).
        fn: ``fn(pretrained, task_vectors, **options) -> merged state dict``.
        coefficient_grid: values of ``coefficient`` swept on validation; empty when the method has
            no coefficient to choose (e.g. weight averaging).
        defaults: default options, read from ``fn``'s signature (every keyword with a default).
        update: for methods of the form ``theta_0 + coefficient * U``:
            ``update(pretrained, task_vectors, **options) -> (keys, U_k)``, the parameters it changes
            and a function computing ``U`` for one of them; :func:`mergelab.merging.merge_with_validation`
            then computes ``U`` once for the whole coefficient sweep. ``None`` for other methods.
        pretty_name: the name the book prints (``"Task arithmetic"``).
        reference: the BibTeX key of the method's paper in ``reports/references.bib``.
        identity: options under which merging a single task vector returns that expert exactly
            (``theta_0 + tau``), e.g. ``{"coefficient": 1.0}`` for task arithmetic; ``None`` where
            no setting does. The contract tests check it.
        streams: whether the merge holds only the merged model and about one layer per task besides
            its inputs (``False`` for methods that need every layer's update before assembling).
    """

    name: str
    fn: MergeFn
    coefficient_grid: tuple[float, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    update: Callable[..., LayerUpdate] | None = None
    pretty_name: str = ""
    reference: str = ""
    identity: Mapping[str, Any] | None = None
    streams: bool = True

    def __call__(self, pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                 **options: Any) -> StateDict:
        self.check_options(options)
        return self.fn(pretrained, task_vectors, **{**self.defaults, **options})

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse an option ``fn`` does not take, naming it and the valid ones (a typo such as ``densty``)."""
        fn_params = inspect.signature(self.fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in fn_params.values())
        unknown = [k for k in options if k not in self.defaults and not takes_any]
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no option {unknown[0]!r}; valid: "
                             f"{', '.join(self.options) or 'none'}.")

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the options ``fn`` accepts (its keyword parameters)."""
        return tuple(self.defaults)


MERGE_METHODS: dict[str, MergeMethod] = {}
"""Every registered method by name; complete once :mod:`mergelab.merging` is imported."""


def signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{option: default}`` for every parameter of ``fn`` after ``(pretrained, task_vectors)`` that has
    a default (``**kwargs`` is not an option)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name: p.default for p in params
            if p.default is not inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def register_merge(name: str, coefficient_grid: Sequence[float] = (),
                   update: Callable[..., LayerUpdate] | None = None, pretty_name: str = "",
                   reference: str = "", identity: Mapping[str, Any] | None = None, streams: bool = True
                   ) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering ``fn`` under ``name`` in :data:`MERGE_METHODS`.

    The method's defaults are those of ``fn``'s signature. ``update``: see :class:`MergeMethod`.
    Registering a name twice is an error (two modules would silently disagree on the method).
    """

    def wrap(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS and MERGE_METHODS[name].fn is not fn:
            raise ValueError(f"merge method {name!r} is already registered by "
                             f"{MERGE_METHODS[name].fn.__module__}; choose another name.")
        MERGE_METHODS[name] = MergeMethod(name, fn, tuple(float(c) for c in coefficient_grid),
                                          signature_defaults(fn), update,
                                          pretty_name or name.replace("_", " ").capitalize(), reference,
                                          None if identity is None else dict(identity), streams)
        return fn

    return wrap


def get_merge(name: str) -> MergeMethod:
    """The registered method ``name``, or an error listing the valid names."""
    if name not in MERGE_METHODS:
        raise ValueError(f"merge method {name!r} is not registered; valid: {', '.join(sorted(MERGE_METHODS))}.")
    return MERGE_METHODS[name]


def check_methods(methods: Sequence[str], parameter: str = "merge_methods", required: Sequence[str] = (),
                  excluded: Sequence[str] = ()) -> list[str]:
    """``methods`` as a list, once every name is a registered method, named once, every name of ``required``
    (what the caller reads afterwards) is among them and none of ``excluded`` (what the caller adds itself);
    otherwise an error naming ``parameter``, its value and what is valid, before any merge is computed."""
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"{parameter}={methods!r} is not valid; give a list of method names, e.g. "
                         f"['task_arithmetic'] (registered: {', '.join(sorted(MERGE_METHODS))}).")
    names = list(methods)
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"{parameter}={names!r} is not valid: {twice[0]!r} is named twice; name each method once.")
    added = [m for m in excluded if m in names]
    if added:
        raise ValueError(f"{parameter}={names!r} is not valid: {added[0]!r} is merged by this chapter anyway; remove "
                         "it from the list.")
    unknown = [m for m in names if m not in MERGE_METHODS]
    if unknown:
        raise ValueError(f"{parameter}={names!r} is not valid: {unknown[0]!r} is not a registered merge method; "
                         f"valid: {', '.join(sorted(MERGE_METHODS))}.")
    missing = [m for m in required if m not in names]
    if missing:
        raise ValueError(f"{parameter}={names!r} is not valid: it must include {', '.join(map(repr, missing))}, "
                         "which this chapter compares every other merge with.")
    return names


def seeded(method: str, options: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``options`` of ``method`` with a chapter's ``seed`` added when the method draws at random (has a ``seed``
    option, as DARE's masks) and ``options`` does not set one already: each method's own default would draw the
    same masks whatever the chapter's seed."""
    return {"seed": int(seed), **options} if "seed" in get_merge(method).options else dict(options)


def seeded_options(methods: Sequence[str], seed: int) -> dict[str, dict[str, int]]:
    """``{method: {"seed": seed}}`` for each of ``methods`` that draws at random (:func:`seeded`): the ``options`` of
    :func:`mergelab.evaluation.merge_baselines` that make a chapter's ``seed`` reach them."""
    return {m: seeded(m, {}, seed) for m in methods if "seed" in get_merge(m).options}


def merge(name: str, pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
          **options: Any) -> StateDict:
    """Run the registered merge method ``name``; an unknown option is refused with the valid ones."""
    return get_merge(name)(pretrained, task_vectors, **options)
