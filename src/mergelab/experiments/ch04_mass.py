"""Chapter 04 (MASS routing): evaluation of a :class:`~mergelab.merging.mass.MassRouter` on mixed
batches of a benchmark's tasks (cached per router and configuration) and its ablations; the timing is in
:mod:`mergelab.experiments.ch04_timing`, the claims in :mod:`mergelab.experiments.ch04_claims`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import codeversion
from ..cache import read_result
from ..cache import result_path as json_result_path  # this module's result_path names MASS's file
from ..evaluation import normalized_accuracy
from ..merging.mass import MassRouter, subspace_energy, subspace_residuals
from ..merging.tsv import CompressedTaskVector, tsv_compress
from ..task_vectors import TaskVector
from ..utils import StateDict, atomic_write_json, check_integer, read_json, size_threads
from .ch04_claims import (REFERENCE_EVIDENCE, REFERENCE_MODEL, claims, claims_from_results,  # noqa: F401 - the
                          reference_storage)  # notebook reads them as ch04's
from .ch04_selection import selection_against_default, validated_selection  # noqa: F401 - the notebook reads them
from .ch04_timing import COLD_REPEATS, time_per_image, timings  # noqa: F401 - the notebook reads them as ch04's


def compress_tasks(task_vectors: Mapping[str, TaskVector], svd: str = "gram") -> dict[str, CompressedTaskVector]:
    """What MASS stores per task: TSV-C with ``k = floor(min(m, n) / T)`` triplets per matrix."""
    if not task_vectors:
        raise ValueError("task_vectors is empty; pass {task: TaskVector} for the tasks MASS routes between.")
    return {t: tsv_compress(tv, num_tasks=len(task_vectors), svd=svd) for t, tv in task_vectors.items()}


def make_router(bench: Any, pretrained: StateDict, compressed: Mapping[str, CompressedTaskVector],
                **options: Any) -> MassRouter:
    """A :class:`MassRouter` on the benchmark's encoder architecture, heads, device and arithmetic (its
    ``amp``, where it has one)."""
    heads = bench.heads
    options.setdefault("amp", getattr(bench, "amp", None))  # the clip size's model.precision, as evaluate runs
    return MassRouter(pretrained, compressed, bench.new_encoder(), {t: heads[t] for t in compressed},
                      device=bench.device, **options)


def mixed_batches(bench: Any, split: str, tasks: Sequence[str], batch_size: int = 256, seed: int = 0,
                  max_per_task: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Batches ``(images (B, 3, H, W), labels (B,), true task per image)`` drawn from every task's
    ``split`` in one seeded random order, so that each batch mixes tasks.

    ``max_per_task``: keep a seeded random subset of at most that many examples per task (``None``: all).
    """
    check_integer("batch_size", batch_size)
    if max_per_task is not None:
        check_integer("max_per_task", max_per_task)
    check_integer("seed", seed, minimum=0)
    g = np.random.default_rng(seed)
    items: list[tuple[str, int]] = []
    labels: dict[str, torch.Tensor] = {}
    for t in tasks:
        _, y = bench.split(t, split)
        labels[t] = torch.as_tensor(y)
        idx = np.arange(len(y))
        if _kept(len(idx), max_per_task) < len(idx):
            idx = np.sort(g.choice(idx, size=max_per_task, replace=False))
        items += [(t, int(i)) for i in idx]
    order = g.permutation(len(items))
    for start in range(0, len(order), batch_size):
        chunk = [items[j] for j in order[start:start + batch_size]]
        parts, where = [], []
        for t in dict.fromkeys(t for t, _ in chunk):
            rows = [j for j, (u, _) in enumerate(chunk) if u == t]
            parts.append(bench.images(t, split, [chunk[j][1] for j in rows]))
            where += rows
        images = torch.empty((len(chunk), *parts[0].shape[1:]), dtype=parts[0].dtype)
        images[torch.tensor(where)] = torch.cat(parts)
        yield images, torch.stack([labels[t][i] for t, i in chunk]), [t for t, _ in chunk]


def evaluate_mass(router: MassRouter, bench: Any, split: str = "test", batch_size: int = 256, seed: int = 0,
                  max_per_task: int | None = None, progress: bool = False, examples: int = 0, cache: bool = True
                  ) -> dict[str, Any]:
    """MASS on mixed batches of every router task's ``split`` (cached by its configuration, ``cache``:
    :func:`evaluate_routers`).

    An input counts as correct when the head MASS chose is its task's and that head's class is its
    label (another task's head has other classes). Returns (fractions 0..1)::

        {"per_task_accuracy", "oracle_head_accuracy" (the true task's head on the same second-pass
         features), "official_scoring_accuracy" (the official MASS code's scoring: the chosen head's logits cut or
         zero-padded to the true task's classes, argmax against the label, whichever task's head it is), "routing": {"contains_true", "argmax_true", "head_is_true",
         "head_is_true_when_selected" (among the inputs whose selected set contains their task: the share
         whose head, the largest logit's, is their task's), "other_head_share" {task: share of all inputs
         read with that task's head although they are another task's}, "mean_selected", "per_task_contains_true",
         "selected_size_share" {size: share}},
         "confusion": {"tasks", "selected" (T x T: share of task i's inputs whose selected set
         contains task j), "argmax" (T x T: share routed to j by the argmax), "head" (T x T: share of
         task i's inputs read with task j's head)},
         "n": {task: inputs}, "examples": [...the first ``examples`` inputs' residuals...],
         "second_pass_models_built": cache misses during the run}
    """
    return evaluate_routers([router], bench, split, batch_size, seed, max_per_task, progress, examples, cache)[0]


def mixed_batch_count(bench: Any, split: str, tasks: Sequence[str], batch_size: int = 256,
                      max_per_task: int | None = None) -> int:
    """How many batches :func:`mixed_batches` yields for these settings (a progress bar's total)."""
    n = sum(_kept(len(bench.split(t, split)[1]), max_per_task) for t in tasks)
    return -(-n // batch_size)


def _kept(n: int, max_per_task: int | None) -> int:
    """How many of a task's ``n`` examples :func:`mixed_batches` keeps."""
    return n if max_per_task is None else min(n, max_per_task)


def evaluate_routers(routers: Sequence[MassRouter], bench: Any, split: str = "test", batch_size: int = 256,
                     seed: int = 0, max_per_task: int | None = None, progress: bool = False,
                     examples: int = 0, cache: bool = True) -> list[dict[str, Any]]:
    """:func:`evaluate_mass` of each of ``routers`` (routers of one task set, e.g. :meth:`MassRouter.with_options`
    of one), on the same mixed batches read once: on each batch they share one memo (``predict(memo=)``), so
    a first pass's routing features and an image's features under a selected set are computed once for
    all routers that need them.

    ``cache``: keep each router's result as ``<bench.cache_dir>/mass/<key>.json`` (:func:`result_path`) and read
    it back on a re-run instead of running the batches again; only the routers without a result run. A result
    read back reports the ``second_pass_models_built`` of the run that made it. Ignored for a benchmark without a
    ``cache_dir``."""
    if not routers:
        raise ValueError("routers is empty; pass at least one MassRouter.")
    other = next((r for r in routers if tuple(r.tasks) != tuple(routers[0].tasks)), None)
    if other is not None:
        raise ValueError(f"routers must share one list of tasks in one order, which the mixed batches are drawn from: "
                         f"the first routes among {list(routers[0].tasks)}, another among {list(other.tasks)}; "
                         "evaluate routers of other tasks in calls of their own.")
    check_integer("batch_size", batch_size)
    if max_per_task is not None:
        check_integer("max_per_task", max_per_task)
    check_integer("seed", seed, minimum=0)
    check_integer("examples", examples, minimum=0)
    paths = [result_path(r, bench, split, batch_size, seed, max_per_task, examples) if cache else None
             for r in routers]
    results: list[dict[str, Any] | None] = [read_result(p, MASS_RESULT_KEYS) for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        with size_threads(bench):  # cached under a key that names no thread count: computed on the size's count
            fresh = _run_routers([routers[i] for i in todo], bench, split, batch_size, seed, max_per_task, progress,
                                 examples)
        for i, res in zip(todo, fresh):
            results[i] = res
            if paths[i] is not None:  # in the tasks' order: read back, the per-task dicts, the examples' residuals
                # and the means over tasks come out as computed
                atomic_write_json(paths[i], res, ordered=True)
    return results  # type: ignore[return-value]


MASS_RESULT_KEYS = frozenset({"per_task_accuracy", "oracle_head_accuracy", "routing", "confusion", "n", "examples",
                              "second_pass_models_built"})
"""The keys of one router's result (:func:`evaluate_mass`); a cached file without all of them is run again."""


def result_path(router: MassRouter, bench: Any, split: str, batch_size: int, seed: int, max_per_task: int | None,
                examples: int) -> Path | None:
    """Where :func:`evaluate_routers` keeps one router's result: ``<bench.cache_dir>/mass/<key>.json``, the key
    naming the router (:meth:`MassRouter.fingerprint`: its weights, heads and options), each task's ``split``
    (the benchmark's :meth:`evaluation_key`: data, head and arithmetic), the mixed batches (``batch_size``,
    ``seed``, ``max_per_task``), ``examples``, the router's ``cache_size`` (the result counts the second-pass
    models built) and the code version of MASS. ``None`` for a benchmark without a ``cache_dir`` or
    ``evaluation_key``."""
    return _cache_path(router, bench, split, {"batch_size": int(batch_size), "seed": int(seed),
                                              "max_per_task": max_per_task, "examples": int(examples),
                                              "cache_size": router.cache_size})


def routing_study_path(router: MassRouter, bench: Any, split: str, temperatures: Sequence[float], batch_size: int,
                       seed: int, max_per_task: int | None) -> Path | None:
    """Where :func:`routing_study` keeps its table for the package's routing score: as :func:`result_path`, the key
    naming the study, its ``temperatures`` and the mixed batches instead of the second pass's settings."""
    return _cache_path(router, bench, split, {"study": "routing", "temperatures": [float(t) for t in temperatures],
                                              "batch_size": int(batch_size), "seed": int(seed),
                                              "max_per_task": max_per_task})


def _cache_path(router: MassRouter, bench: Any, split: str, settings: Mapping[str, Any]) -> Path | None:
    return json_result_path(bench, "mass", lambda: {
        "router": router.fingerprint(), "split": split, "data": {t: bench.evaluation_key(t, split) for t in router.tasks},
        **settings, **codeversion.key_part("mass")})


def _run_routers(routers: Sequence[MassRouter], bench: Any, split: str, batch_size: int, seed: int,
                 max_per_task: int | None, progress: bool, examples: int) -> list[dict[str, Any]]:
    """The batches of :func:`evaluate_routers`, run for every router in ``routers``."""
    tallies = [_Tally(list(r.tasks), examples) for r in routers]
    misses = [r.misses for r in routers]
    tasks = list(routers[0].tasks)
    for images, labels, truth in tqdm(mixed_batches(bench, split, tasks, batch_size, seed, max_per_task),
                                      total=mixed_batch_count(bench, split, tasks, batch_size, max_per_task),
                                      desc=f"MASS on {split}", disable=not progress):
        memo: dict | None = {} if len(routers) > 1 else None
        if memo is not None:  # one first pass per first-pass model, read at every routing point its routers need
            points: dict[str, tuple[MassRouter, set]] = {}
            for r in routers:
                points.setdefault(r.first_pass, (r, set()))[1].add((r.block, r.routing_matrix))
            for first, (r, at) in points.items():
                memo.update({("first pass", first, *p): x for p, x in r.features_at(images, sorted(at)).items()})
        for router, tally in zip(routers, tallies):
            tally.add(router.predict(images, true_tasks=truth, memo=memo), labels, truth)
    return [tally.result(router.misses - m) for tally, router, m in zip(tallies, routers, misses)]


class _Tally:
    """What :func:`evaluate_mass` counts over the batches of one router."""

    def __init__(self, tasks: list[str], examples: int) -> None:
        self.tasks, self.examples = tasks, examples
        self.pos = {t: i for i, t in enumerate(tasks)}
        self.correct, self.oracle, self.official, self.n, self.contains = ({t: 0 for t in tasks} for _ in range(5))
        self.argmax_hits = self.head_hits = 0
        self.sizes: dict[int, int] = {}
        self.selected = np.zeros((len(tasks), len(tasks)))
        self.argmax = np.zeros((len(tasks), len(tasks)))
        self.head = np.zeros((len(tasks), len(tasks)))
        self.shown: list[dict[str, Any]] = []

    def add(self, out: Any, labels: torch.Tensor, truth: Sequence[str]) -> None:
        r = out.routing
        for i, t in enumerate(truth):
            self.n[t] += 1
            sel = r.selected[i]
            right = out.head_task[i] == t and int(out.label[i]) == int(labels[i])
            self.correct[t] += int(right)
            self.oracle[t] += int(int(out.oracle_label[i]) == int(labels[i]))
            self.official[t] += int(int(out.official_label[i]) == int(labels[i]))
            self.contains[t] += int(t in sel)
            self.argmax_hits += int(r.argmax[i] == t)
            self.head_hits += int(out.head_task[i] == t)
            self.head[self.pos[t], self.pos[out.head_task[i]]] += 1
            self.sizes[len(sel)] = self.sizes.get(len(sel), 0) + 1
            for u in sel:
                self.selected[self.pos[t], self.pos[u]] += 1
            self.argmax[self.pos[t], self.pos[r.argmax[i]]] += 1
            if len(self.shown) < self.examples:
                self.shown.append({"task": t, "residuals": dict(zip(self.tasks, r.residuals[i].tolist())),
                                   "weights": dict(zip(self.tasks, r.weights[i].tolist())), "selected": list(sel),
                                   "head": out.head_task[i], "correct": bool(right)})

    def result(self, built: int) -> dict[str, Any]:
        tasks, n = self.tasks, self.n
        total = sum(n.values())
        rows = np.array([max(n[t], 1) for t in tasks])[:, None]
        return {
            "per_task_accuracy": {t: self.correct[t] / n[t] for t in tasks},
            "oracle_head_accuracy": {t: self.oracle[t] / n[t] for t in tasks},
            # the official code's scoring: another task's head counts when its index is the label (docs/clip.md)
            "official_scoring_accuracy": {t: self.official[t] / n[t] for t in tasks},
            "routing": {"contains_true": sum(self.contains.values()) / total, "argmax_true": self.argmax_hits / total,
                        "head_is_true": self.head_hits / total,
                        # the head is always a selected task's, so a true head implies a selected true task
                        "head_is_true_when_selected": self.head_hits / max(sum(self.contains.values()), 1),
                        "other_head_share": {t: float(self.head[:, j].sum() - self.head[j, j]) / total
                                             for j, t in enumerate(tasks)},
                        "mean_selected": sum(k * v for k, v in self.sizes.items()) / total,
                        "per_task_contains_true": {t: self.contains[t] / n[t] for t in tasks},
                        "selected_size_share": {str(k): v / total for k, v in sorted(self.sizes.items())}},
            "confusion": {"tasks": tasks, "selected": (self.selected / rows).tolist(),
                          "argmax": (self.argmax / rows).tolist(), "head": (self.head / rows).tolist()},
            "n": n, "examples": self.shown, "second_pass_models_built": built,
        }


RoutingScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A routing score: features ``x`` ``(N, d)`` and stored bases ``(T, d, k)`` to residuals ``(N, T)``."""


ROUTING_COLUMNS = ("temperature", "contains_true", "argmax_true", "mean_selected")
"""The columns of :func:`routing_study`'s table."""


def routing_study(router: MassRouter, bench: Any, split: str = "val", temperatures: Sequence[float] = (1.0,),
                  score: RoutingScore = subspace_residuals, batch_size: int = 256, seed: int = 0,
                  max_per_task: int | None = None, progress: bool = False, cache: bool = True) -> pd.DataFrame:
    """Routing alone (no second pass) of every router task's ``split`` with the residuals of ``score``
    and the weights at each of ``temperatures`` (the router's threshold and top-k).

    The features are computed once per mixed batch (:func:`mixed_batches`, same order as
    :func:`evaluate_mass`). One row per temperature: ``temperature``, ``contains_true`` (true task in
    the selected set), ``argmax_true``, ``mean_selected`` (fractions 0..1 but the last, in tasks).

    ``cache``: with the package's score (:func:`~mergelab.merging.mass.subspace_residuals`), keep the table as
    :func:`routing_study_path` names it and read it back on a re-run; a score of one's own is always computed (a
    function's code cannot key a cache honestly)."""
    if len(temperatures) == 0:  # a list or a NumPy array
        raise ValueError("temperatures is empty; give at least one positive temperature (MASS uses 1).")
    path = (routing_study_path(router, bench, split, temperatures, batch_size, seed, max_per_task)
            if cache and score is subspace_residuals else None)
    cached = read_json(path) if path is not None else None
    if (isinstance(cached, list) and len(cached) == len({float(t) for t in temperatures})
            and all(isinstance(r, dict) and set(ROUTING_COLUMNS) <= set(r) for r in cached)):
        return pd.DataFrame(cached, columns=list(ROUTING_COLUMNS))
    with size_threads(bench):  # as evaluate_routers: the same bits whatever the caller's thread count
        table = _routing_study(router, bench, split, temperatures, score, batch_size, seed, max_per_task, progress)
    if path is not None:
        atomic_write_json(path, table.to_dict(orient="records"), ordered=True)
    return table


def _routing_study(router: MassRouter, bench: Any, split: str, temperatures: Sequence[float], score: RoutingScore,
                   batch_size: int, seed: int, max_per_task: int | None, progress: bool) -> pd.DataFrame:
    tasks = list(router.tasks)
    hits = {float(tau): [0, 0, 0] for tau in temperatures}
    total = 0
    for images, _, truth in tqdm(mixed_batches(bench, split, tasks, batch_size, seed, max_per_task),
                                 total=mixed_batch_count(bench, split, tasks, batch_size, max_per_task),
                                 desc=f"routing on {split}", disable=not progress):
        residuals = score(router.features(images), router.bases).detach().cpu()
        if residuals.shape != (len(images), len(tasks)):
            raise ValueError(f"score returned shape {tuple(residuals.shape)}; expected (inputs, tasks) = "
                             f"{(len(images), len(tasks))}.")
        true = torch.tensor([tasks.index(t) for t in truth])
        total += len(truth)
        for tau, h in hits.items():
            routed = router.route_residuals(residuals.float(), tau)
            h[0] += sum(int(t in s) for t, s in zip(truth, routed.selected))
            h[1] += int((routed.weights.argmax(1) == true).sum())
            h[2] += sum(len(s) for s in routed.selected)
    return pd.DataFrame([{"temperature": tau, "contains_true": h[0] / total, "argmax_true": h[1] / total,
                          "mean_selected": h[2] / total} for tau, h in hits.items()], columns=list(ROUTING_COLUMNS))


def check_routing_score(score: RoutingScore) -> None:
    """The contract of a routing score, which :func:`~mergelab.merging.mass.subspace_residuals` meets:
    ``score(x (N, d), bases (T, d, k))`` returns ``(N, T)`` distances ``||x_i - V_t V_t^T x_i||``, 0 for
    a feature inside a task's subspace, ``||x||`` for one orthogonal to it, zero columns (no stored
    direction) allowed, the inputs left unchanged. Raises ``AssertionError`` saying what is wrong."""
    g = torch.Generator().manual_seed(0)
    d, k, T, N = 6, 2, 3, 5
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    bases = torch.stack([q[:, 2 * t:2 * t + 2] for t in range(T)])  # (3, 6, 2): orthogonal subspaces
    x = torch.randn(N, d, generator=g)
    x0, b0 = x.clone(), bases.clone()
    out = score(x, bases)
    assert isinstance(out, torch.Tensor), f"the score returned a {type(out).__name__}; return a torch tensor (N, T)."
    assert tuple(out.shape) == (N, T), (f"the score returned shape {tuple(out.shape)} for {N} features and {T} "
                                        f"tasks; expected (N, T) = {(N, T)}: one residual per feature and task.")
    assert torch.equal(x, x0) and torch.equal(bases, b0), "the score changed its inputs in place; leave x and bases as given."
    assert torch.allclose(out.float(), subspace_residuals(x, bases), atol=1e-4), (
        "the residuals differ from ||x - V_t V_t^T x||_2 (the norm, not its square, of the part of x outside "
        f"task t's subspace): got {out[0].tolist()} for the first feature, expected "
        f"{subspace_residuals(x, bases)[0].tolist()}.")
    inside = torch.randn(N, k, generator=g) @ bases[1].T  # in task 1's subspace, orthogonal to the others
    r = score(inside, bases)
    # to rounding: a correct sqrt(||x||^2 - ||V^T x||^2) turns float32 rounding of ~1e-7 ||x||^2 into ~3e-4 ||x||
    tol = 2e-3 * max(1.0, float(inside.norm(dim=1).max()))
    assert r[:, 1].abs().max() < tol, f"a feature inside task 1's subspace must have residual 0 there; got {r[:, 1].tolist()}."
    assert torch.allclose(r[:, [0, 2]], inside.norm(dim=1, keepdim=True).expand(N, 2), atol=1e-4), (
        "a feature orthogonal to a task's subspace must have residual ||x|| for that task.")
    padded = torch.cat([bases, torch.zeros(T, d, 1)], dim=2)  # a zero column stores no direction
    assert torch.allclose(score(x, padded).float(), subspace_residuals(x, bases), atol=1e-4), (
        "a zero column of V_t (no stored direction) must not change the residual.")


def ablation(router: MassRouter, bench: Any, configs: Sequence[Mapping[str, Any]], expert_accuracy: Mapping[str, float],
             split: str = "val", batch_size: int = 256, seed: int = 0, max_per_task: int | None = None,
             progress: bool = False) -> pd.DataFrame:
    """MASS with each routing configuration of ``configs`` (options of :meth:`MassRouter.with_options`,
    plus a ``"study"`` name), all sharing one second-pass cache and, batch by batch, one memo of features
    (:func:`evaluate_routers`). One row per config: its options,
    ``block``, ``absolute_accuracy``, ``normalized_accuracy`` (against ``expert_accuracy`` on the same
    split), ``oracle_head_normalized``, ``contains_true``, ``argmax_true``, ``mean_selected``,
    ``per_task_accuracy`` ({task: accuracy}) and ``examples`` ({task: inputs}, what the claims' intervals need)."""
    routers = [router.with_options(**{k: v for k, v in cfg.items() if k != "study"}) for cfg in configs]
    results = evaluate_routers(routers, bench, split, batch_size, seed, max_per_task, progress)
    rows = []
    for cfg, r, res in zip(configs, routers, results):
        acc = res["per_task_accuracy"]
        rows.append({"study": cfg.get("study", ""), "first_pass": r.first_pass, "routing_matrix": r.routing_matrix,
                     "block": r.block, "threshold": r.threshold, "top_k": r.top_k,
                     "absolute_accuracy": float(np.mean(list(acc.values()))),
                     "normalized_accuracy": _normalized(acc, expert_accuracy),
                     "oracle_head_normalized": _normalized(res["oracle_head_accuracy"], expert_accuracy),
                     **{k: res["routing"][k] for k in ("contains_true", "argmax_true", "head_is_true", "mean_selected")},
                     "per_task_accuracy": dict(acc), "examples": dict(res["n"])})
    return pd.DataFrame(rows)


def _normalized(acc: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> float:
    """Normalized accuracy, or NaN where an expert scores 0 (tiny smoke-test splits): undefined there."""
    return normalized_accuracy(acc, expert_accuracy) if all(expert_accuracy[t] > 0 for t in acc) else float("nan")


def ablation_configs(num_blocks: int, matrices: Sequence[str], thresholds: Sequence[float], top_ks: Sequence[int],
                     block: int) -> list[dict[str, Any]]:
    """The chapter's ablations: every (block, routing matrix); threshold x top-k at the default block;
    the pretrained first pass at the default block."""
    configs: list[dict[str, Any]] = [{"study": "layer", "block": b, "routing_matrix": m}
                                     for m in matrices for b in range(num_blocks)]
    configs += [{"study": "selection", "block": block, "threshold": th, "top_k": k} for th in thresholds for k in top_ks]
    configs += [{"study": "first_pass", "block": b, "first_pass": "pretrained"} for b in range(num_blocks)]
    return configs


def summary_rows(per_task: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> dict[str, Any]:
    """``{"absolute_accuracy", "normalized_accuracy", "per_task_accuracy"}`` of one model."""
    return {"absolute_accuracy": float(np.mean(list(per_task.values()))),
            "normalized_accuracy": normalized_accuracy(per_task, expert_accuracy), "per_task_accuracy": dict(per_task)}


def subspace_overlap_path(router: MassRouter, bench: Any, split: str, batch_size: int) -> Path | None:
    """Where :func:`subspace_overlap` keeps its table: as :func:`result_path`, the key naming the study and the batch
    size instead of the second pass's settings."""
    return _cache_path(router, bench, split, {"study": "subspace_overlap", "batch_size": int(batch_size)})


def subspace_overlap(router: MassRouter, bench: Any, split: str = "val", batch_size: int = 256,
                     progress: bool = False, cache: bool = True) -> pd.DataFrame:
    """How much of each task's inputs lies in each task's routing subspace: row = the inputs' task, column = a
    router task, entry = the mean over the row's ``split`` images of :func:`~mergelab.merging.mass.subspace_energy`
    (the share of the routing feature's squared norm inside that task's stored ``V_t``), in [0, 1]. Routing
    separates two tasks only where a row's own entry stands above its entry for the other task; a diagnostic of the
    routing confusion, not part of MASS.

    ``bench``: a benchmark whose ``split(task, split)`` gives the labels and ``images(task, split, rows)`` the
    normalized images; every task of ``router.tasks`` is read, in batches of ``batch_size`` images, on the
    benchmark's threads (:func:`~mergelab.utils.size_threads`, as :func:`evaluate_mass`). ``cache``: keep the table as
    :func:`subspace_overlap_path` names it and read it back on a re-run (a first pass over the whole split)."""
    check_integer("batch_size", batch_size)
    path = subspace_overlap_path(router, bench, split, batch_size) if cache else None
    cached = read_json(path) if path is not None else None
    tasks = list(router.tasks)
    if isinstance(cached, dict) and set(cached) == set(tasks) and all(
            isinstance(row, dict) and set(row) == set(tasks) for row in cached.values()):
        return pd.DataFrame.from_dict(cached, orient="index").loc[tasks, tasks]
    with size_threads(bench):
        table = _subspace_overlap(router, bench, split, batch_size, progress)
    if path is not None:
        atomic_write_json(path, table.to_dict(orient="index"), ordered=True)
    return table


@torch.no_grad()
def _subspace_overlap(router: MassRouter, bench: Any, split: str, batch_size: int, progress: bool) -> pd.DataFrame:
    bases = router.bases.float()
    rows = {}
    for task in tqdm(router.tasks, desc=f"subspace overlap on {split}", disable=not progress):
        n = len(bench.split(task, split)[1])
        if n == 0:
            raise ValueError(f"split={split!r} of task {task!r} has no images; choose a split every task has.")
        total = torch.zeros(len(router.tasks), dtype=torch.float64)
        for start in range(0, n, batch_size):
            x = router.features(bench.images(task, split, list(range(start, min(n, start + batch_size)))))
            total += subspace_energy(x.float().to(bases.device), bases).double().sum(0).cpu()
        rows[task] = (total / n).tolist()
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(router.tasks))


def accuracy_budget(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Where MASS's normalized accuracy goes, in normalized points, from the chapter's rows: ``compression``
    (experts less TSV-C with the task known: the stored rank), ``routing`` (TSV-C less MASS with the true task's
    head: inputs whose set misses their task, or whose set's TSV-M of several tasks reads them worse than their own
    reconstruction), ``head_choice`` (MASS with the true head less MASS: another task's head chosen) and ``total``
    (experts less MASS, the sum of the three). Each is a difference of rows measured on the same test images."""
    n = {m: float(rows[m]["normalized_accuracy"]) for m in ("experts", "tsv_compress", "mass_oracle_head", "mass")}
    return {"compression": n["experts"] - n["tsv_compress"], "routing": n["tsv_compress"] - n["mass_oracle_head"],
            "head_choice": n["mass_oracle_head"] - n["mass"], "total": n["experts"] - n["mass"]}


def overlap_summary(overlap: pd.DataFrame) -> dict[str, Any]:
    """What the chapter says of :func:`subspace_overlap`'s table (rows: the inputs' task; columns: the subspaces of
    the same tasks): the ``closest`` task (whose own share leads its largest other share least), its ``own`` share,
    the task of that largest other share (``rival``) and the share (``rival_share``); and the largest share outside
    the diagonal anywhere (``off_inputs``: the rows' task, ``off_subspace``, ``off_share``, with ``off_own``, the
    share the same inputs keep in their own subspace)."""
    if list(overlap.index) != list(overlap.columns) or len(overlap) < 2:
        raise ValueError(f"overlap must be square with the same tasks as rows and columns, at least two; got rows "
                         f"{list(overlap.index)} and columns {list(overlap.columns)}.")
    own = pd.Series(np.diag(overlap.to_numpy()), index=overlap.index)
    others = overlap.where(~np.eye(len(overlap), dtype=bool))
    closest = str((own - others.max(axis=1)).idxmin())
    off_inputs, off_subspace = others.stack().idxmax()
    return {"closest": closest, "own": float(own[closest]), "rival": str(others.loc[closest].idxmax()),
            "rival_share": float(others.loc[closest].max()), "off_inputs": str(off_inputs),
            "off_subspace": str(off_subspace), "off_share": float(others.loc[off_inputs, off_subspace]),
            "off_own": float(own[off_inputs])}
