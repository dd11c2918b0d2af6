"""Evolutionary merging (MERGE3's search, methods.md section 5): a genetic algorithm from pymoo over
merge parameters, maximizing a fitness the caller provides (the full validation accuracy, or an IRT
estimate of it from a few images).

The search is seeded (pymoo's generator lives in the algorithm), resumable (after every generation
the genomes and their fitness are written atomically to ``checkpoint``; a new call with the same
checkpoint replays them without calling the fitness and continues from the last completed generation)
and shows one progress step per generation. The fitness sees a batch of genomes ``(P, n_var)`` and
returns ``(P,)`` scores to maximize (pymoo minimizes the negated scores, as MERGE3's code does).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..task_vectors import TaskVector
from ..utils import StateDict, atomic_write_json, check_integer


def task_arithmetic_per_task(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                             coefficients: Sequence[float] | np.ndarray) -> StateDict:
    """``theta_0 + sum_t c_t tau_t``: task arithmetic with one coefficient per task (the genome
    the chapter's search evolves with :func:`evolve`)."""
    if isinstance(task_vectors, Mapping):
        raise ValueError("task_vectors is a mapping; pass a list of TaskVector in the coefficients' order "
                         "(e.g. [tvs[t] for t in tasks]).")
    try:
        c = np.asarray(coefficients, dtype=float).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"coefficients={coefficients!r} is not valid; use numbers, one per task.") from err
    if not np.isfinite(c).all():
        raise ValueError(f"coefficients={c.tolist()} is not valid; use finite numbers, one per task.")
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty; give at least one task vector.")
    if c.size != len(task_vectors):
        raise ValueError(f"coefficients has {c.size} values but there are {len(task_vectors)} task vectors; "
                         "give one coefficient per task.")
    total = task_vectors[0] * float(c[0])
    for tv, ci in zip(task_vectors[1:], c[1:]):
        total = total + tv * float(ci)
    return total.apply_to(pretrained)


@dataclass
class EvolutionResult:
    """What a search found and what it cost.

    Attributes:
        best_x: the best genome ``(n_var,)``; best_fitness: its fitness (as the search saw it).
        history: per generation ``{generation, best, mean, evaluations, wall_time_s}`` (cumulative
            evaluations and wall time).
        evaluations: fitness evaluations (genomes scored) in all.
        population: the last generation's genomes ``(P, n_var)`` and ``fitness`` ``(P,)``.
        all_x, all_fitness: every genome scored, in order, and its fitness.
    """

    best_x: np.ndarray
    best_fitness: float
    history: list[dict[str, float]]
    evaluations: int
    population: np.ndarray
    fitness: np.ndarray
    all_x: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    all_fitness: np.ndarray = field(default_factory=lambda: np.empty(0))


def evolve(fitness: Callable[[np.ndarray], np.ndarray], lower: Sequence[float], upper: Sequence[float],
           pop_size: int = 10, n_gen: int = 10, seed: int = 0, checkpoint: str | Path | None = None,
           progress: bool = True, desc: str = "evolution") -> EvolutionResult:
    """Maximize ``fitness`` over real genomes in the box ``[lower, upper]`` with pymoo's GA
    (random sampling, simulated binary crossover, polynomial mutation, duplicates eliminated).

    Args:
        fitness: genomes ``(P, n_var)`` to scores ``(P,)`` (higher is better).
        lower, upper: the box, one bound per variable.
        pop_size, n_gen: population and generations (``pop_size * n_gen`` evaluations at most).
        seed: the search's seed (same seed, same search).
        checkpoint: a JSON file holding every generation's genomes and fitness, written atomically
            after each generation. When it exists, the search resumes after its last generation: the
            seeded algorithm replays the saved generations (their genomes are checked to be the same,
            their fitness is read, not recomputed) and continues. ``None``: no saving.
        progress: one progress step per generation, with the best fitness so far.

    Returns:
        :class:`EvolutionResult`.
    """
    from pymoo.algorithms.soo.nonconvex.ga import GA
    from pymoo.core.problem import Problem

    lo, hi = np.asarray(lower, dtype=float).reshape(-1), np.asarray(upper, dtype=float).reshape(-1)
    if lo.size == 0 or lo.shape != hi.shape or not (lo < hi).all() or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"lower={lo.tolist()} and upper={hi.tolist()} must be non-empty, finite, of the same length, "
                         "with lower < upper for every variable.")
    check_integer("pop_size", pop_size, minimum=2)
    check_integer("n_gen", n_gen)
    check_integer("seed", seed, minimum=0)
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint={str(checkpoint)!r} is a folder; give the path of a JSON file (made if missing).")
    config = {"lower": lo.tolist(), "upper": hi.tolist(), "pop_size": int(pop_size), "seed": int(seed)}
    path = Path(checkpoint) if checkpoint is not None else None
    saved: list[dict[str, Any]] = []
    if path is not None and path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"checkpoint={str(path)!r} is not a search checkpoint (not JSON: {err}); delete it or "
                             "give another path.") from err
        if not isinstance(state, dict) or "config" not in state or "generations" not in state:
            raise ValueError(f"checkpoint={str(path)!r} is not a search checkpoint (no 'config' and 'generations'); "
                             "delete it or give another path.")
        if state["config"] != config:
            raise ValueError(f"checkpoint {path} is of another search ({state['config']}); delete it or give "
                             "another path.")
        saved = state["generations"]
    algorithm = GA(pop_size=int(pop_size), eliminate_duplicates=True)
    algorithm.setup(Problem(n_var=lo.size, n_obj=1, xl=lo, xu=hi), termination=("n_gen", max(int(n_gen), len(saved))),
                    seed=int(seed), verbose=False)
    generations: list[dict[str, Any]] = []
    all_x: list[list[float]] = []
    all_f: list[float] = []
    elapsed = 0.0
    bar = tqdm(total=int(n_gen), desc=desc, disable=not progress)
    for generation in range(int(n_gen)):
        start = time.perf_counter()
        pop = algorithm.ask()
        X = pop.get("X")
        if generation < len(saved):
            record = saved[generation]
            if not np.allclose(np.asarray(record["x"]), X, rtol=0, atol=1e-12):
                raise ValueError(f"checkpoint {path} does not replay: generation {generation + 1} differs (another "
                                 "pymoo version?); delete it to start over.")
            F = np.asarray(record["fitness"], dtype=float)
            elapsed = record["wall_time_s"]
        else:
            F = np.asarray(fitness(X), dtype=float).reshape(-1)
            if F.shape[0] != X.shape[0] or not np.isfinite(F).all():
                raise ValueError(f"fitness returned {F.shape[0]} values for {X.shape[0]} genomes (or a non-finite "
                                 "one); it must return one finite score per genome.")
            elapsed += time.perf_counter() - start
        pop.set("F", -F[:, None])
        algorithm.tell(infills=pop)
        all_x.extend(X.tolist())
        all_f.extend(F.tolist())
        generations.append({"generation": generation + 1, "x": X.tolist(), "fitness": F.tolist(),
                            "best": float(max(all_f)), "mean": float(F.mean()), "evaluations": len(all_f),
                            "wall_time_s": elapsed})
        if path is not None and generation >= len(saved):
            atomic_write_json(path, {"config": config, "generations": generations})
        bar.update(1)
        bar.set_postfix(best=f"{max(all_f):.4f}")
    bar.close()
    pop = algorithm.pop
    best = int(np.argmax(all_f))
    history = [{k: g[k] for k in ("generation", "best", "mean", "evaluations", "wall_time_s")} for g in generations]
    return EvolutionResult(best_x=np.asarray(all_x[best]), best_fitness=float(all_f[best]), history=history,
                           evaluations=len(all_f), population=pop.get("X"), fitness=-pop.get("F")[:, 0],
                           all_x=np.asarray(all_x), all_fitness=np.asarray(all_f))


def save_history(result: EvolutionResult, path: str | Path) -> Path:
    """The search's history and best genome as JSON (atomic)."""
    return atomic_write_json(path, {"best_x": result.best_x, "best_fitness": result.best_fitness,
                                    "evaluations": result.evaluations, "history": result.history})
