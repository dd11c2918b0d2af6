"""Chapter 01's curvature: the Hessian's extreme eigenvalues at points of the fine-tuning runs (cached per point by
:mod:`mergelab.experiments.ch01_hessian`), aggregated over tasks into the curvature schedule of assumption A4, one
per recipe or one for every recipe.

A recipe is what sets a run's trajectory apart in the chapter's grid: its learning rate, batch size and data
fraction (:func:`recipe_key`). A step count is a checkpoint of the same run, and another seed one more run of the
same recipe, so neither gets a schedule of its own: each recipe's schedule is measured along its base-seed run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis.stability import Curvature
from ..executors import Executor, LocalExecutor, benchmark_context
from ..training import FinetuneConfig, recipe_fields
from ..training.sweep import checkpoint
from ..utils import StateDict, check_integer, shows_progress
from .ch01_hessian import (CURVATURE_FIELDS, checkpoint_name, curvature_path, extreme_eigenvalues, file_name,
                           read_point, weights_name)

if TYPE_CHECKING:  # pragma: no cover - the grid is only read
    from .ch01_stability import ExpertGrid

CURVATURE_AGGREGATES = ("max", "median")
"""How :func:`estimate_curvature` combines the tasks measured at one step: the worst case, or the
median (robust to one task's outlier, e.g. a head that is confidently wrong at ``theta_0``)."""


def estimate_curvature(bench: Any, points: Sequence[tuple[str, int, StateDict]], batch_size: int = 32,
                       iters: int = 8, seed: int = 0, aggregate: str = "max", progress: bool | None = None
                       ) -> tuple[Curvature, list[dict[str, Any]]]:
    """The curvature schedule of assumption A4 from Lanczos on Hessian-vector products at several points.

    Args:
        points: ``(task, step, encoder state)`` triples, e.g. ``theta_0`` at step 0 and a run's
            checkpoints; each is evaluated on the first ``batch_size`` training examples of ``task``
            with its head.

        aggregate: ``"max"``: at every step ``beta = max lam_max`` and ``rho = -min lam_min`` over the
            points of that step (the worst case); ``"median"``: their medians (robust to an outlier).

    Returns:
        ``Curvature`` with, at every measured step, ``beta`` and ``rho`` aggregated over the points
        of that step (a constant when all points are at one step), and one row per point.
    """
    _check_settings(aggregate, batch_size, iters, seed)
    if not points:
        raise ValueError("points is empty; pass (task, step, state) triples, e.g. [('colours', 0, pretrained)].")
    rows = []
    for i, (task, step, state) in enumerate(tqdm(points, desc="curvature", disable=not shows_progress(bench, progress))):
        rows.append({"task": task, "step": int(step), **extreme_eigenvalues(bench, task, state, batch_size, iters,
                                                                            seed + i)})
    return _schedule(rows, aggregate), rows


def _check_settings(aggregate: str, batch_size: int, iters: int, seed: int) -> None:
    if aggregate not in CURVATURE_AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not valid; use one of {', '.join(CURVATURE_AGGREGATES)}.")
    check_integer("batch_size", batch_size)
    check_integer("iters", iters)
    check_integer("seed", seed, minimum=0)


def _point_weights(bench: Any, task: str, cfg: FinetuneConfig | None, pretrained: StateDict | None = None
                   ) -> tuple[StateDict, str | None]:
    """The weights of one curvature point and what names them in its key: ``theta_0`` (``cfg`` None; ``pretrained``
    when the caller holds it) with ``None`` (its digest), or the sweep's checkpoint of ``(task, cfg)`` with the
    :func:`file_name` of the bytes it was read from (checked against its sidecar's record)."""
    if cfg is None:
        return (pretrained if pretrained is not None else bench.pretrained_state()), None
    state, sha = checkpoint(bench, task, cfg).load_with_sha256()
    return state, file_name(sha)


def _point_name(bench: Any, task: str, cfg: FinetuneConfig | None, pretrained_name: str | None = None) -> str:
    """What names one curvature point's weights in its cache key, without loading a checkpoint's weights:
    ``theta_0``'s digest (``pretrained_name`` when the caller holds it), or :func:`checkpoint_name`."""
    if cfg is None:
        return pretrained_name if pretrained_name is not None else weights_name(bench.pretrained_state())
    return checkpoint_name(checkpoint(bench, task, cfg))


def _schedule(rows: Sequence[Mapping[str, Any]], aggregate: str) -> Curvature:
    """:func:`estimate_curvature`'s schedule from its rows: beta and rho aggregated over the points of each step."""
    steps = sorted({r["step"] for r in rows})
    pick = (lambda v: float(np.max(v))) if aggregate == "max" else (lambda v: float(np.median(v)))
    beta = tuple(pick([r["lambda_max"] for r in rows if r["step"] == s]) for s in steps)
    rho = tuple(pick([-r["lambda_min"] for r in rows if r["step"] == s]) for s in steps)
    if len(steps) == 1:
        return Curvature(beta=beta[0], rho=rho[0])
    return Curvature(beta=beta, rho=rho, steps=tuple(steps))


RecipeKey = tuple[float, int, float]
"""``(lr, batch_size, data_fraction)``: what sets one recipe's trajectory apart (:func:`recipe_key`)."""


def recipe_key(cfg: FinetuneConfig) -> RecipeKey:
    """The recipe of a fine-tuning configuration: ``(lr, batch_size, data_fraction)``; its step count and seed
    do not enter (a checkpoint of the same run, another run of the same recipe)."""
    return (float(cfg.lr), int(cfg.batch_size), float(cfg.data_fraction))


@dataclass(frozen=True)
class RecipeCurvature:
    """Curvature schedules per recipe (:func:`recipe_curvature`).

    Attributes:
        schedules: :func:`recipe_key` -> its :class:`Curvature` (beta and rho per measured step).
        centre: the centre recipe's key.
        per_recipe: whether each recipe's schedule was measured along its own runs; if not, every recipe has the
            centre runs' schedule.
    """

    schedules: Mapping[RecipeKey, Curvature] = field(hash=False)
    centre: RecipeKey
    per_recipe: bool

    def __post_init__(self) -> None:  # read-only, so that a frozen value stays what was measured
        object.__setattr__(self, "schedules", MappingProxyType(dict(self.schedules)))

    def of(self, cfg: FinetuneConfig) -> Curvature:
        """The schedule of ``cfg``'s recipe; a recipe that was not measured is an error naming the measured ones."""
        key = recipe_key(cfg)
        if key not in self.schedules:
            raise ValueError(f"no curvature schedule for the recipe (lr, batch_size, data_fraction)={key}; measured: "
                             f"{sorted(self.schedules)}.")
        return self.schedules[key]

    def table(self) -> list[dict[str, Any]]:
        """One record per recipe and step: ``lr``, ``batch_size``, ``data_fraction``, ``step``, ``beta``, ``rho``."""
        out = []
        for (lr, batch, fraction), c in self.schedules.items():
            steps = c.steps or (0,)
            for j, step in enumerate(steps):
                out.append({"lr": lr, "batch_size": batch, "data_fraction": fraction, "step": int(step),
                            "beta": float(np.atleast_1d(c.beta)[j]), "rho": float(np.atleast_1d(c.rho)[j])})
        return out


def curvature_of(curvature: Curvature | RecipeCurvature, cfg: FinetuneConfig) -> Curvature:
    """The schedule an expert trained with ``cfg`` is bounded with: its recipe's, or the one shared schedule."""
    return curvature.of(cfg) if isinstance(curvature, RecipeCurvature) else curvature


def recipe_curvature(bench: Any, grid: "ExpertGrid", tasks: Sequence[str], batch_size: int = 32, iters: int = 24,
                     seed: int = 0, aggregate: str = "median", per_recipe: bool = True,
                     executor: Executor | None = None, progress: bool | None = None
                     ) -> tuple[RecipeCurvature, list[dict[str, Any]]]:
    """The curvature schedules of the grid's recipes (:meth:`ExpertGrid.recipes`), as :func:`estimate_curvature`
    makes them over ``tasks`` at ``theta_0`` (step 0) and at every checkpoint of the recipe's base-seed runs (the
    sweep's checkpoints: a missing one is an error, never trained here). ``per_recipe=False`` measures the centre
    recipe's runs only and gives every recipe that schedule: at the `tiny` size's one-at-a-time grid 20 points
    instead of 110. The points not cached yet are computed by ``executor`` (:mod:`mergelab.executors`; ``None``:
    here, one after the other), each on this benchmark's device (:func:`worker_device`) and in one of the size's
    training threads as here, so a worker's eigenvalues are this process's and land under the keys read here. A
    checkpoint is named in its point's key by the SHA-256 its sidecar records
    (:func:`~mergelab.experiments.ch01_hessian.checkpoint_name`), so a cached point loads no weights and a point
    computed loads its checkpoint once, where it is computed.

    Returns:
        the schedules, and one row per recipe and point (:func:`estimate_curvature`'s) with its recipe's ``lr``,
        ``batch_size``, ``data_fraction`` and ``recipe`` (``"centre"`` or the hyperparameters it varies): every
        recipe's rows start with the same ``theta_0`` points (:func:`distinct_points` keeps them once).
    """
    if not isinstance(per_recipe, bool):
        raise ValueError(f"per_recipe={per_recipe!r} is not valid; use True (a schedule per recipe) or False (the "
                         "centre runs' schedule for every recipe).")
    if not tasks:
        raise ValueError("tasks is empty; name the tasks whose curvature is measured, e.g. ['colours'].")
    _check_settings(aggregate, batch_size, iters, seed)
    pre = bench.pretrained_state()
    centre = recipe_key(grid.base)
    recipes = {recipe_key(r): r for r in grid.recipes()}
    measured = recipes if per_recipe else {centre: grid.base}
    # theta_0 first, in the same order for every recipe: a point's start vector is seed + its index, so theta_0's
    # points are the same points for every recipe, computed once
    plans = {key: [(t, 0, None) for t in tasks] + [(t, s, replace(recipe, num_steps=s, seed=grid.base.seed))
                                                   for t in tasks for s in grid.steps]
             for key, recipe in measured.items()}
    jobs = list(dict.fromkeys((t, cfg, batch_size, iters, seed + i) for plan in plans.values()
                              for i, (t, _, cfg) in enumerate(plan)))
    for t, cfg, *_ in jobs:
        if cfg is not None and not checkpoint(bench, t, cfg).path.is_file():
            raise ValueError(f"no sweep checkpoint of task={t!r} at {cfg}; run the grid's sweep first (the curvature "
                             "is measured along the sweep's runs, at the base recipe's seed).")
    pre_name = weights_name(pre)
    names = {j: _point_name(bench, j[0], j[1], pre_name) for j in jobs}  # parses no checkpoint's weights
    paths = {j: curvature_path(bench, j[0], names[j], *j[2:]) for j in jobs}
    values = {j: read_point(path) for j, path in paths.items()}
    todo = [j for j in jobs if values[j] is None and paths[j] is not None]
    if todo:
        executor = executor if executor is not None else LocalExecutor(1)
        executor.map(_curvature_job, todo, benchmark_context(bench, worker_device(bench, executor)), describe=_describe_job,
                     progress=shows_progress(bench, progress),
                     desc=f"curvature points ({len(jobs) - len(todo)} of {len(jobs)} cached)").raise_failures("curvature points")
        values.update({j: read_point(paths[j]) for j in todo})
        missing = [j for j in todo if values[j] is None]
        if missing:  # a worker wrote under another key (another device, a checkpoint rewritten meanwhile)
            warnings.warn(f"{len(missing)} of the {len(todo)} curvature points the executor computed are not under "
                          f"the keys read here (first: task={missing[0][0]!r}, {_describe_job(missing[0])['checkpoint']}"
                          "); computing them again in this process.", RuntimeWarning, stacklevel=2)
    for j in jobs:  # without a cache (or where a worker's entry did not come back): here, named by what is loaded
        if values[j] is None:
            state, name = _point_weights(bench, j[0], j[1], pre)
            values[j] = extreme_eigenvalues(bench, j[0], state, *j[2:], weights=name if name is not None else pre_name)
    schedules, rows = {}, []
    for key, plan in plans.items():
        recipe = measured[key]
        found = [{"task": t, "step": int(s), **{k: float(values[t, cfg, batch_size, iters, seed + i][k]) for k in CURVATURE_FIELDS}}
                 for i, (t, s, cfg) in enumerate(plan)]
        schedules[key] = _schedule(found, aggregate)
        label = "+".join(f"{h}={getattr(recipe, h):g}" for h in grid.varied(recipe)) or "centre"
        rows += [{**r, "lr": key[0], "batch_size": key[1], "data_fraction": key[2], "recipe": label} for r in found]
    if not per_recipe:
        schedules = {key: schedules[centre] for key in recipes}
    return RecipeCurvature(schedules, centre, per_recipe), rows


def worker_device(bench: Any, executor: Executor) -> str:
    """Where :func:`recipe_curvature`'s workers rebuild the benchmark: on its own device (the CPU, or Apple's ``mps``)
    whatever the executor offers, since a point's key names the device and is read here; for a benchmark on a CUDA
    GPU, the executor's device: local worker processes (``cpu``) then refuse to rebuild it, naming the settings to
    change (:func:`~mergelab.executors.benchmark_context`), as the sweep's and the trajectories' workers do, instead
    of each opening the GPU."""
    return str(executor.device) if torch.device(bench.device).type == "cuda" else str(bench.device)


def _curvature_job(bench: Any, job: tuple[str, FinetuneConfig | None, int, int, int]) -> None:
    """One point of :func:`recipe_curvature` in a worker: ``(task, checkpoint or None for theta_0, batch_size,
    iters, seed)``, cached by :func:`extreme_eigenvalues`."""
    task, cfg, batch_size, iters, seed = job
    state, name = _point_weights(bench, task, cfg)  # named as recipe_curvature names it, from the bytes loaded
    extreme_eigenvalues(bench, task, state, batch_size, iters, seed, weights=name)


def _describe_job(job: tuple[str, FinetuneConfig | None, int, int, int]) -> dict[str, Any]:
    task, cfg, batch_size, iters, seed = job
    return {"task": task, "checkpoint": "theta_0" if cfg is None else recipe_fields(cfg), "batch_size": batch_size,
            "iters": iters, "seed": seed}


def distinct_points(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """:func:`recipe_curvature`'s rows with each measured point once: the ``theta_0`` points (step 0), which every
    recipe's rows repeat, only in the centre recipe's rows."""
    return [r for r in rows if r["step"] != 0 or r["recipe"] == "centre"]
