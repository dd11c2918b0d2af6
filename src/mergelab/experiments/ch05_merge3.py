"""Chapter 05 (MERGE3): a population of models' answers on the fitness images, the IRT fit, the
estimators' errors by subset size, and evolutionary merging with full and IRT-estimated fitness.

Fitness is the mean correctness over the fitness items (every task's validation images, pooled; with
equal split sizes it is the absolute accuracy); the test split is used only for the final rows.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from .. import codeversion
from ..analysis.irt import (
    ANCHOR_SCHEMES,
    ESTIMATORS,
    IRTModel,
    estimate_accuracy,
    fit_ability,
    fit_irt,
    log_likelihood,
    p_irt,
    select_anchors,
)
from ..analysis.responses import ResponseEvaluator
from ..analysis.statistics import sample_sd
from ..evaluation import merge_baselines, summarize
from ..executors import Executor, LocalExecutor, WorkerContext, benchmark_context
from ..merging import get_merge, merge, seeded
from ..merging.evolve import EvolutionResult, evolve, task_arithmetic_per_task
from ..task_vectors import TaskVector
from ..utils import StateDict, check_integer, check_number, config_hash, state_digest
from .ch05_claims import (BOUND_TOLERANCE, best_rank_at, choose_estimator, claims,  # noqa: F401 (the chapter's API)
                          claims_from_results, endpoint_fit, fitness_costs, known_models, nearest_fraction, range_ends,
                          range_note, summarize_ranks)


def population(evaluator: ResponseEvaluator, pretrained: StateDict, experts: Mapping[str, StateDict],
               task_vectors: Mapping[str, TaskVector], ta_grid: Sequence[float], ties_grid: Sequence[float],
               num_random: int, num_held_out: int, coefficient_max: float, seed: int = 0, progress: bool = True,
               other_merges: Mapping[str, Sequence[float | None]] | None = None, multitask: StateDict | None = None
               ) -> tuple[pd.DataFrame, np.ndarray]:
    """Full responses of the chapter's population on the fitness items.

    Models: zero-shot, the experts, the multi-task model ``multitask`` (one encoder fine-tuned on every task,
    e.g. chapter 00's; ``None``: none), task arithmetic at ``ta_grid``, TIES at ``ties_grid``, each registered
    method of ``other_merges`` at its coefficients (``None``: the method's one form, as weight averaging; e.g.
    ``{"weight_averaging": [None], "dare": [0.3], "tsv_merge": [1.0]}``), and ``num_random + num_held_out``
    task-arithmetic merges with per-task coefficients drawn uniformly in ``[0, coefficient_max]`` (seeded);
    the last ``num_held_out`` of them are held out (half to choose the IRT dimension, half to measure the
    estimators).

    Returns:
        ``(models, responses)``: one row per model (``name, kind, role`` in calibration / dim_validation /
        held_out, ``fitness``) and the responses ``(M, N)`` bool.
    """
    check_integer("num_random", num_random, minimum=0)
    check_integer("num_held_out", num_held_out, minimum=0)
    if num_held_out < 4:  # an empty set of models failed deep inside numpy; one model ranks nothing
        raise ValueError(f"num_held_out={num_held_out!r} is not valid; use an integer >= 4: half of the held-out "
                         "merges choose the IRT dimension, half measure the estimators, and a rank correlation "
                         "needs at least two models on each side.")
    check_number("coefficient_max", coefficient_max, low=0, low_open=True)
    check_integer("seed", seed, minimum=0)
    tvs = list(task_vectors.values())
    rng = np.random.default_rng(seed)
    specs: list[tuple[str, str, Any]] = [("zero_shot", "zero_shot", lambda: pretrained)]
    specs += [(f"expert:{t}", "expert", (lambda s=s: s)) for t, s in experts.items()]
    if multitask is not None:
        if not isinstance(multitask, Mapping):
            raise ValueError(f"multitask={type(multitask).__name__} is not valid; use a state dict (the multi-task "
                             "model's weights) or None.")
        specs.append(("multitask", "multitask", lambda: multitask))
    if not isinstance(other_merges, (Mapping, type(None))):
        raise ValueError(f"other_merges={other_merges!r} is not valid; use a mapping of merge method to a list of "
                         "coefficients, e.g. {'dare': [0.3], 'weight_averaging': [None]}.")
    specs += _merges([("ta_grid", "task_arithmetic", ta_grid), ("ties_grid", "ties", ties_grid),
                      *((f"other_merges[{m!r}]", m, c) for m, c in (other_merges or {}).items())], pretrained, tvs,
                     seed=seed)
    draws = rng.uniform(0, coefficient_max, (num_random + num_held_out, len(tvs)))
    specs += [(f"random:{i}", "random_merge", (lambda c=c: task_arithmetic_per_task(pretrained, tvs, c)))
              for i, c in enumerate(draws)]
    rows, responses = [], []
    held = num_random + num_held_out
    for k, (name, kind, build) in enumerate(tqdm(specs, desc="population", disable=not progress)):
        r = evaluator.full(build())
        j = k - (len(specs) - held)
        role = "calibration" if j < num_random else ("dim_validation" if (j - num_random) % 2 == 0 else "held_out")
        rows.append({"name": name, "kind": kind, "role": role, "fitness": float(r.mean())})
        responses.append(r)
    return pd.DataFrame(rows), np.stack(responses)


def _merges(grids: Sequence[tuple[str, str, Sequence[float | None]]], pretrained: StateDict,
            tvs: Sequence[TaskVector], seed: int = 0) -> list[tuple[str, str, Any]]:
    """:func:`population`'s merges, ``(parameter, method, coefficients)`` each, as ``(name, kind, build)``
    entries, checked: a registered method and a list of coefficients (``None`` only for a method without one);
    an error names the ``parameter`` the coefficients came from. A method that draws at random (DARE) draws
    with ``seed``."""
    out = []
    for what, method, coefficients in grids:
        has_coefficient = "coefficient" in get_merge(method).defaults  # an unknown method names the valid ones
        if isinstance(coefficients, (str, bytes, Mapping)) or not isinstance(coefficients, Sequence):
            raise ValueError(f"{what}={coefficients!r} is not valid; use a list of coefficients"
                             f"{'' if has_coefficient else ' ([None]: this method has none)'}.")
        for c in coefficients:
            if (c is None) == has_coefficient:
                raise ValueError(f"{what} has {c!r}; " + ("use numbers: this method takes a coefficient."
                                                         if has_coefficient else
                                                         "use [None]: this method has no coefficient."))
            if c is not None:
                check_number(f"{what} value", c)
            options = seeded(method, {} if c is None else {"coefficient": float(c)}, seed)
            out.append((method if c is None else f"{method}:{c:g}", method,
                        (lambda m=method, o=options: merge(m, pretrained, tvs, **o))))
    return out


def choose_dim(train: np.ndarray, validation: np.ndarray, dims: Sequence[int], seed: int = 0
               ) -> tuple[pd.DataFrame, int, dict[int, tuple[IRTModel, np.ndarray]]]:
    """Fit a model per ``D`` in ``dims`` on ``train`` ``(M, N)``; score it on the ``validation`` models:
    abilities fitted on a random half of the items, mean log-likelihood on the other half.

    Returns ``(table of dim, train_log_likelihood, held_out_log_likelihood, the chosen D (best held-out),
    {D: (model, theta)})``.
    """
    if len(dims) == 0:
        raise ValueError("dims is empty; give at least one IRT dimension to try.")
    if np.ndim(train) != 2 or np.ndim(validation) != 2 or np.shape(validation)[1] != np.shape(train)[1]:
        raise ValueError(f"train and validation must be (models, items) responses on the same items; got shapes "
                         f"{np.shape(train)} and {np.shape(validation)}.")
    N = train.shape[1]
    rng = np.random.default_rng(seed)
    half = np.sort(rng.choice(N, N // 2, replace=False))
    other = np.setdiff1d(np.arange(N), half)
    rows, fits = [], {}
    for D in dims:
        model, theta = fit_irt(train, int(D), seed=seed)
        th = np.stack([fit_ability(model, half, r[half]) for r in validation])
        sub = IRTModel(model.discrimination[other], model.difficulty[other])
        rows.append({"dim": int(D), "train_log_likelihood": log_likelihood(model, theta, train),
                     "held_out_log_likelihood": log_likelihood(sub, th, validation[:, other])})
        fits[int(D)] = (model, theta)
    table = pd.DataFrame(rows)
    best = int(table.loc[table["held_out_log_likelihood"].idxmax(), "dim"])
    return table, best, fits


def subset_size(fraction: float, num_items: int) -> int:
    """Items in a subset of ``fraction`` of ``num_items`` (at least 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction!r} is not valid; use a share of the items in (0, 1].")
    return max(1, int(round(fraction * num_items)))


def check_anchor_schemes(schemes: Sequence[str]) -> list[str]:
    """The chapter's ``anchor_schemes`` as a list, once every name is a scheme of
    :func:`mergelab.analysis.irt.select_anchors` and ``"random"`` (MERGE³'s subsets, which the chapter's
    estimator choice and summaries read) is among them; else an error naming the parameter, before any fit."""
    if (not isinstance(schemes, (list, tuple)) or any(s not in ANCHOR_SCHEMES for s in schemes)
            or "random" not in schemes):
        raise ValueError(f"anchor_schemes={schemes!r} is not valid; use a list of {', '.join(map(repr, ANCHOR_SCHEMES))} "
                         "that includes 'random' (MERGE³'s random subsets, which the chapter's summaries read).")
    return list(schemes)


def estimator_study(model: IRTModel, endpoint_theta: np.ndarray, responses: np.ndarray,
                    fractions: Sequence[float], draws: int, schemes: Sequence[str] = ("random", "clustered"),
                    seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Each estimator's estimate of each model's full fitness, from the same subset for every model.

    Args:
        responses: ``(H, N)`` full responses of the models estimated (held-out merges).
        fractions: subset sizes as shares of ``N``; draws: subsets drawn per size and scheme.

    Returns:
        One row per (scheme, fraction, draw, estimator): ``n``, ``mae`` (mean absolute error over the
        models) and ``spearman`` (rank correlation of estimates with the full fitness).
    """
    check_integer("draws", draws)
    if np.ndim(responses) != 2 or np.shape(responses)[1] != model.num_items:
        raise ValueError(f"responses must be (models, N={model.num_items} items) of the models estimated; got shape "
                         f"{np.shape(responses)}.")
    truth = responses.mean(1)
    rows = []
    jobs = [(s, f, d) for s in schemes for f in fractions for d in range(draws)]
    for scheme, fraction, draw in tqdm(jobs, desc="estimators", disable=not progress):
        n = subset_size(fraction, model.num_items)
        items, weights = select_anchors(model, n, scheme, seed=seed + 1000 * draw + n)
        est = np.array([[getattr(estimate_accuracy(model, items, r[items], endpoint_theta,
                                                   weights=weights if scheme == "clustered" else None), e)
                         for e in ESTIMATORS] for r in responses])
        for j, e in enumerate(ESTIMATORS):
            rho = spearmanr(est[:, j], truth).statistic if np.ptp(est[:, j]) > 0 else 0.0
            rows.append({"scheme": scheme, "fraction": float(fraction), "n": n, "draw": draw, "estimator": e,
                         "mae": float(np.abs(est[:, j] - truth).mean()), "spearman": float(rho)})
    return pd.DataFrame(rows)


def choose_estimator_on(model: IRTModel, endpoint_theta: np.ndarray, responses: np.ndarray,
                        fractions: Sequence[float], draws: int, seed: int = 0, fraction: float = 0.05) -> dict[str, Any]:
    """:func:`choose_estimator` on an estimator study of ``responses`` (models other than those an accuracy claim is
    judged on: the chapter's merges that chose the IRT dimension), random anchors, at the subset size among
    ``fractions`` nearest ``fraction`` only."""
    f = nearest_fraction(fractions, fraction)
    study = estimator_study(model, endpoint_theta, responses, [f], draws, ["random"], seed=seed, progress=False)
    return choose_estimator(study, f)


def summarize_estimators(study: pd.DataFrame) -> pd.DataFrame:
    """Mean over draws of ``mae`` and ``spearman`` per (scheme, fraction, n, estimator), with the spread
    (standard deviation over draws) of the error."""
    g = study.groupby(["scheme", "fraction", "n", "estimator"], sort=False)
    out = g.agg(mae=("mae", "mean"), mae_sd=("mae", "std"), spearman=("spearman", "mean"))
    return out.reset_index()


class Fitness:
    """Fitness of per-task task-arithmetic genomes: the full validation accuracy (``items=None``), or an
    IRT estimate (``estimator``) from a fixed subset ``items`` (the same for every candidate: common
    random numbers; ``n`` forward passes per candidate). A full fitness computes every candidate's answers even
    when an earlier run cached them (``reuse=False``, the default): a search's wall time is then the time of its
    forward passes, comparable with an IRT search's, whose subsets are never cached; ``reuse=True`` reads them.

    A batch of genomes (a GA population) is scored by ``executor`` (:mod:`mergelab.executors`; ``None``:
    here, one genome after the other): each worker rebuilds the benchmark and the evaluator once, gets
    the weights once, and scores its genomes; a genome whose evaluation fails is reported with its
    coefficients (:class:`mergelab.executors.RunsFailed`) after the others are scored.
    """

    def __init__(self, evaluator: ResponseEvaluator, pretrained: StateDict, task_vectors: Sequence[TaskVector],
                 model: IRTModel | None = None, endpoint_theta: np.ndarray | None = None,
                 items: np.ndarray | None = None, estimator: str = "gmp_irt", executor: Executor | None = None,
                 progress: bool = False, reuse: bool = False) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not valid; use one of {', '.join(ESTIMATORS)}.")
        if items is not None and (model is None or endpoint_theta is None):
            raise ValueError("an IRT fitness (items given) needs the fitted model and the endpoints' abilities.")
        self.evaluator, self.pretrained, self.tvs = evaluator, pretrained, list(task_vectors)
        self.model, self.endpoint_theta, self.items, self.estimator = model, endpoint_theta, items, estimator
        self.executor = executor if executor is not None else LocalExecutor(1)
        self.progress, self.reuse = progress, reuse
        self._context: WorkerContext | None = None

    @property
    def passes_per_evaluation(self) -> int:
        """Images run through the encoder to score one candidate."""
        return self.evaluator.num_items if self.items is None else int(len(self.items))

    def score(self, x: np.ndarray) -> float:
        """The fitness of one genome ``(n_var,)``."""
        state = task_arithmetic_per_task(self.pretrained, self.tvs, x)
        if self.items is None:
            return float(self.evaluator.full(state, reuse=self.reuse).mean())
        y = self.evaluator.subset(state, self.items)
        return float(getattr(estimate_accuracy(self.model, self.items, y, self.endpoint_theta), self.estimator))

    def worker_context(self) -> WorkerContext:
        """This fitness as its workers rebuild it: the benchmark from its configuration, the same
        evaluator settings, weights and IRT model (shipped once per batch)."""
        if self._context is None:
            ev = self.evaluator
            bench = benchmark_context(ev.bench, self.executor.device)
            build = functools.partial(_rebuild_fitness, bench, ev.settings(), self.pretrained, self.tvs, self.model,
                                      self.endpoint_theta, self.items, self.estimator, self.reuse)
            self._context = WorkerContext(build, local=self)
        return self._context

    def __call__(self, X: np.ndarray) -> np.ndarray:
        outcome = self.executor.map(_score_genome, list(np.asarray(X)), self.worker_context(),
                                    describe=lambda x: {"coefficients": np.round(x, 6).tolist()},
                                    progress=self.progress, desc="fitness")
        outcome.raise_failures("fitness evaluations")
        return np.array(outcome.results)


def _rebuild_fitness(bench: WorkerContext, evaluator: Mapping[str, Any], pretrained: StateDict,
                     tvs: Sequence[TaskVector], model: IRTModel | None, endpoint_theta: np.ndarray | None,
                     items: np.ndarray | None, estimator: str, reuse: bool) -> Fitness:
    ev = ResponseEvaluator(bench.get(), **evaluator)  # the driver's evaluator.settings()
    return Fitness(ev, pretrained, tvs, model, endpoint_theta, items, estimator, reuse=reuse)


def _score_genome(fitness: Fitness, x: np.ndarray) -> float:
    return fitness.score(x)


def population_rank_study(model: IRTModel, endpoint_theta: np.ndarray, responses: np.ndarray,
                          fractions: Sequence[float], draws: int = 1, seed: int = 0) -> pd.DataFrame:
    """Estimates of a GA population's fitness (``responses`` ``(P, N)`` of the full-fitness search's
    candidates) from ``draws`` random subsets per size, each shared by every candidate as a search's
    subset is: :func:`estimator_study` with random anchors (the same subsets it draws for the same seed).

    Returns:
        One row per (fraction, draw, estimator): ``fraction, n, draw, estimator, mae, spearman``, and
        per size the population's spread ``fitness_sd`` (SD of the full fitness over the ``P``
        candidates) against ``subset_se``, the binomial standard error of one candidate's ``n``-item mean
        (root mean of ``f (1 - f) / n``): a subset whose error is not well below the spread cannot rank.
    """
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws={draws!r} is not valid; use a positive integer (subsets per size).")
    truth = responses.mean(1)
    study = estimator_study(model, endpoint_theta, responses, fractions, draws, schemes=("random",), seed=seed,
                            progress=False).drop(columns="scheme")
    study["fitness_sd"] = sample_sd(truth)
    study["subset_se"] = np.sqrt(np.mean(truth * (1 - truth)) / study["n"])
    return study


def search(bench: Any, evaluator: ResponseEvaluator, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
           expert_test: Mapping[str, float], fitness: Fitness, coefficient_max: float, pop_size: int, n_gen: int,
           seed: int, checkpoint: Any = None, progress: bool = True, desc: str = "evolution"
           ) -> tuple[dict[str, Any], EvolutionResult]:
    """One evolutionary search and its final row: the best genome's merge on the test split
    (:func:`mergelab.evaluation.summarize`), its true validation fitness, the fitness forward passes
    (evaluations x images per evaluation) and the wall time (as first run when resumed from
    ``checkpoint``)."""
    tvs = list(task_vectors.values())
    result = evolve(fitness, [0.0] * len(tvs), [coefficient_max] * len(tvs), pop_size=pop_size, n_gen=n_gen,
                    seed=seed, checkpoint=checkpoint, progress=progress, desc=desc)
    wall = result.history[-1]["wall_time_s"]
    state = task_arithmetic_per_task(pretrained, tvs, result.best_x)
    row = {**summarize(bench.evaluate(state, "test"), expert_test),
           "validation_fitness": float(evaluator.full(state).mean()), "estimated_fitness": result.best_fitness,
           "coefficients": dict(zip(task_vectors, map(float, result.best_x))),
           **range_ends(dict(zip(task_vectors, map(float, result.best_x))), coefficient_max),
           "fitness_forward_passes": int(result.evaluations * fitness.passes_per_evaluation),
           "evaluations": result.evaluations,
           "wall_time_s": wall, "history": result.history}
    return row, result


def search_key(evaluator: ResponseEvaluator, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
               pop_size: int, coefficient_max: float) -> dict[str, Any]:
    """What makes a search besides its GA seed, subset and estimator (the ``key`` of :func:`search_checkpoint`
    and :func:`seed_searches`): the fitness items and their evaluation (``evaluator.key``: data, heads,
    arithmetic), the weights searched over (digests of ``theta_0`` and of each task vector, whether its expert
    was trained here or imported, in the genome's order of tasks), the population, the coefficients' range and
    the code version of the searches. A checkpoint written for other data, other experts or another order of
    them is never resumed."""
    return {"fitness": evaluator.key, "pretrained": state_digest(pretrained),
            "task_vectors": [[t, state_digest(tv)] for t, tv in task_vectors.items()],  # a list: config_hash sorts maps
            "pop": int(pop_size), "cmax": float(coefficient_max), **codeversion.key_part("ga")}


def search_checkpoint(checkpoint_dir: str | Path, key: Mapping[str, Any], items: np.ndarray | None = None,
                      estimator: str | None = None, model: IRTModel | None = None,
                      endpoint_theta: np.ndarray | None = None) -> Path:
    """Where a search is saved: ``full-<hash of key>.json`` for full fitness; for IRT fitness,
    ``irt-<hash>.json`` of ``key`` with the subset ``items``, the ``estimator``, and digests of the fitted IRT
    ``model`` (item parameters) and of the endpoints' abilities ``endpoint_theta`` ``(K, D)``, which depend on the
    population it was fitted on (``key`` holds what else makes the search: :func:`search_key` and the GA
    seed). A search scored by another IRT fit is never resumed."""
    if items is None:
        return Path(checkpoint_dir) / f"full-{config_hash(dict(key))}.json"
    if model is None or endpoint_theta is None:
        raise ValueError("an IRT search's checkpoint needs the IRT model and endpoint_theta it is scored with "
                         "(model=..., endpoint_theta=...); give neither items for a full-fitness search.")
    fit = hashlib.sha256()
    for array in (model.discrimination, model.difficulty, endpoint_theta):
        a = np.ascontiguousarray(array, dtype=np.float64)
        fit.update(repr(a.shape).encode())
        fit.update(a.tobytes())
    digest = config_hash({**key, "items": items, "est": estimator, "dim": model.dim, "irt": fit.hexdigest()[:24]})
    return Path(checkpoint_dir) / f"irt-{digest}.json"


def seed_row(seed: int, full: Mapping[str, Any], irt: Mapping[str, Any]) -> dict[str, Any]:
    """One row of :func:`seed_searches` from the two search rows (:func:`search`) of one GA seed."""
    return {"seed": int(seed), "full_absolute": full["absolute_accuracy"], "irt_absolute": irt["absolute_accuracy"],
            "full_normalized": full["normalized_accuracy"], "irt_normalized": irt["normalized_accuracy"],
            "gap": full["absolute_accuracy"] - irt["absolute_accuracy"],
            "full_passes": full["fitness_forward_passes"], "irt_passes": irt["fitness_forward_passes"]}


def seed_searches(bench: Any, evaluator: ResponseEvaluator, pretrained: StateDict,
                  task_vectors: Mapping[str, TaskVector], expert_test: Mapping[str, float], model: IRTModel,
                  endpoint_theta: np.ndarray, estimator: str, fraction: float, coefficient_max: float,
                  pop_size: int, n_gen: int, seeds: Sequence[int], checkpoint_dir: Any = None,
                  key: Mapping[str, Any] | None = None, executor: Executor | None = None, progress: bool = True,
                  done: Mapping[int, tuple[Mapping[str, Any], Mapping[str, Any]]] | None = None) -> pd.DataFrame:
    """The chapter's two searches once per GA seed: with full fitness, and with ``estimator`` from a random
    subset of ``fraction`` of the items drawn with the same seed (one subset per search, as MERGE3 does).

    With ``checkpoint_dir``, each search is saved where :func:`search_checkpoint` says for ``key`` with the
    seed put in. ``done`` maps a seed to its two search rows already computed (``(full, irt)``, e.g. the
    chapter's first searches): those seeds are not searched or evaluated again.

    Returns:
        One row per seed (:func:`seed_row`): ``seed``, test ``full_absolute``, ``irt_absolute``,
        ``full_normalized``, ``irt_normalized``, ``gap`` (full minus IRT, absolute), ``full_passes`` and
        ``irt_passes`` (the candidates' fitness forward passes; the endpoints' full answers are not included).
    """
    if not seeds:
        raise ValueError("seeds=[] is not valid; give at least one GA seed.")
    if checkpoint_dir is not None and not key:
        raise ValueError(f"key={key!r} is not valid with checkpoint_dir={str(checkpoint_dir)!r}: a checkpoint named by "
                         "the seed alone would be resumed for other experts or data; pass key=search_key(...).")
    done = dict(done or {})
    tvs = list(task_vectors.values())
    full = Fitness(evaluator, pretrained, tvs, executor=executor)
    n = subset_size(fraction, model.num_items)
    rows = []
    for s in map(int, seeds):
        if s in done:
            rows.append(seed_row(s, *done[s]))
            continue
        items = select_anchors(model, n, "random", seed=s)[0]
        irt_fit = Fitness(evaluator, pretrained, tvs, model, endpoint_theta, items, estimator, executor=executor)
        k = {**(key or {}), "seed": s}
        f_ckpt, i_ckpt = ((None, None) if checkpoint_dir is None else
                          (search_checkpoint(checkpoint_dir, k),
                           search_checkpoint(checkpoint_dir, k, items, estimator, model, endpoint_theta)))
        f_row, _ = search(bench, evaluator, pretrained, task_vectors, expert_test, full, coefficient_max, pop_size,
                          n_gen, s, checkpoint=f_ckpt, progress=progress, desc=f"GA seed {s}, full fitness")
        i_row, _ = search(bench, evaluator, pretrained, task_vectors, expert_test, irt_fit, coefficient_max, pop_size,
                          n_gen, s, checkpoint=i_ckpt, progress=progress, desc=f"GA seed {s}, IRT fitness")
        rows.append(seed_row(s, f_row, i_row))
    return pd.DataFrame(rows)


def one_off_passes(models: pd.DataFrame, endpoints: Sequence[str], num_items: int) -> dict[str, int]:
    """What an IRT search pays once before its first candidate, in forward passes: ``endpoint_forward_passes`` (the
    ``endpoints`` answer all ``num_items`` items) and ``calibration_forward_passes`` (the other models of
    :func:`population` with role ``calibration``, on which the IRT model is fitted: the endpoints among them are
    counted once, in the first figure)."""
    fitted_only = (models["role"] == "calibration") & ~models["name"].isin(list(endpoints))
    return {"endpoint_forward_passes": len(endpoints) * int(num_items),
            "calibration_forward_passes": int(fitted_only.sum()) * int(num_items)}


def ta_by_grid(bench: Any, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
               expert_test: Mapping[str, float], grid: Sequence[float], num_items: int) -> dict[str, Any]:
    """Task arithmetic with one coefficient chosen on validation (absolute accuracy, as the searches'
    fitness), its test row and the validation forward passes of the grid."""
    result = merge_baselines(bench, pretrained, task_vectors, ["task_arithmetic"],
                             options={"task_arithmetic": {"grid": list(grid)}}, progress=False,
                             metric="absolute")["task_arithmetic"]
    return {**summarize(bench.evaluate(result.state, "test"), expert_test), "coefficient": result.coefficient,
            "at_grid_edge": result.at_grid_edge, "fitness_forward_passes": len(grid) * num_items}


def check_p_irt(estimator: Callable[[IRTModel, np.ndarray, np.ndarray, np.ndarray], float]) -> None:
    """The contract of a p-IRT estimator, which :func:`~mergelab.analysis.irt.p_irt` meets:
    ``estimator(model, items (n,), answers (n,) 0/1, theta (D,))`` returns
    ``(n/N) mean(answers) + (1 - n/N) mean_{i not in items} P_i(theta)`` as a float in [0, 1]; with
    every item answered it is the plain mean. Raises ``AssertionError`` saying what is wrong."""
    rng = np.random.default_rng(0)
    N, D = 40, 2
    model = IRTModel(rng.normal(size=(N, D)), rng.normal(size=N))
    theta = rng.normal(size=D)
    items = np.sort(rng.choice(N, 10, replace=False))
    answers = (rng.random(10) < 0.5).astype(float)
    items0, answers0 = items.copy(), answers.copy()
    got = estimator(model, items, answers, theta)
    assert isinstance(got, (float, np.floating)), f"the estimator returned a {type(got).__name__}; return a float."
    assert np.array_equal(items, items0) and np.array_equal(answers, answers0), (
        "the estimator changed items or answers in place; leave them as given.")
    want = p_irt(model, items, answers, theta)
    everything = float(0.25 * answers.mean() + 0.75 * model.prob(theta).mean())
    assert abs(got - want) < 1e-9, (
        f"p-IRT of 10 answered items out of N = 40 should be {want:.6f}, got {float(got):.6f}" +
        (": the model's probabilities must cover only the items NOT answered." if abs(got - everything) < 1e-9
         else ": weight the answered items' mean by n/N and the unanswered items' mean probability by 1 - n/N."))
    assert 0.0 <= got <= 1.0, f"an accuracy estimate lies in [0, 1]; got {float(got)}."
    full = (rng.random(N) < 0.5).astype(float)
    got_full = estimator(model, np.arange(N), full, theta)
    assert abs(got_full - full.mean()) < 1e-9, (
        f"with every item answered the estimate is the plain mean {full.mean():.4f}; got {float(got_full):.4f}.")
    one = estimator(model, items[:1], np.ones(1), theta)
    assert abs(one - p_irt(model, items[:1], np.ones(1), theta)) < 1e-9, (
        "with a single answered item the estimate differs from p-IRT's; check the n/N weights.")

