"""Chapter 06 (C2M3, cycle-consistent merging of models from different initializations): the
experiments the notebook runs, its tables and its claims.

Every architecture of the chapter is trained from scratch on scikit-learn's digits ``num_models``
times, from seeds ``seed, seed + 1, ...`` (cached by configuration; :mod:`.ch06_models`, whose names
this module re-exports); the merges use the first ``merge_models`` of them. What pairwise weight matching does to
two of them (the loss barrier, the weights' similarity, what their average cannot share) is in :mod:`.ch06_pairs`,
also re-exported here.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn

from ..alignment import (
    apply_permutation,
    c2m3_frank_wolfe,
    cycle_error,
    identity_permutations,
    invert,
    merge_aligned,
    merge_many,
    objective_at,
    pairwise_from_universe,
    random_permutations,
    repair,
    weight_matching,
)
from ..alignment.frank_wolfe import FrankWolfeResult, check_frank_wolfe_options
from ..alignment.repair import layer_stats, permute_stats
from ..alignment.specs import Permutations
from ..executors import Executor, LocalExecutor
from ..training.scratch import SCRATCH_THREADS, DigitsSplit, evaluate_state
from ..utils import torch_threads
from .ch06_models import (  # noqa: F401 (the chapter's API)
    Trained,
    _trained,
    digits_context,
    digits_data,
    train_all,
    train_models,
)
from .ch06_pairs import (  # noqa: F401 (the chapter's API)
    interpolation,
    matched_to,
    pair_average_keeping,
    pair_merges_keeping,
    permuted_copy_merge,
    accuracy_on_test,
    weight_similarity,
)
from .ch06_store import MergeOutcome, build_job, load_job, merge_artifact  # noqa: F401 (MergeOutcome: the chapter's API)
from .ch06_claims import (  # noqa: F401 (the chapter's API)
    SOURCE,
    claims,
    claims_from_results,
    sets_direction,
    sets_separated,
    vit_reading,
)

METHODS = ("naive", "naive_repair", "merge_many", "merge_many_repair", "c2m3", "c2m3_repair")
"""Merges compared: uniform average without alignment, MergeMany, C2M3; each without and with REPAIR."""



def permutation_invariance(t: Trained, data: DigitsSplit, seed: int) -> dict[str, float]:
    """A random permutation of every group of the first model: the largest change of any logit on the
    test set, the largest change of any weight, and the two test accuracies."""
    g = torch.Generator().manual_seed(seed)
    state = t.states[0]
    permuted = apply_permutation(t.spec, random_permutations(t.spec.group_sizes(state), g), state)
    outs = []
    for s in (state, permuted):
        t.model.load_state_dict(s)
        t.model.eval()
        with torch.no_grad():
            outs.append(t.model(data.X_test))
    return {"max_logit_change": float((outs[0] - outs[1]).abs().max()),
            "max_weight_change": max(float((state[k] - permuted[k]).abs().max()) for k in state),
            "accuracy": accuracy_on_test(t, data, state), "accuracy_permuted": accuracy_on_test(t, data, permuted)}


def repair_layers(t: Trained) -> list[str]:
    """The layers REPAIR corrects: every conv of the ResNet (as in the official code); every hidden
    linear layer of the MLP (the official code corrects none there; here its effect is measured on both); the
    ViT's MLP hidden units (``c_fc`` of every block, statistics pooled over images and tokens; the official code
    has no transformer)."""
    if t.arch == "mlp":
        return [f"layers.{i}" for i in range(len(t.cfg.widths))]
    if t.arch == "vit":
        return [f"transformer.resblocks.{i}.mlp.c_fc" for i in range(t.cfg.blocks)]
    return [n for n, m in t.model.named_modules() if isinstance(m, nn.Conv2d)]


def _endpoint_module(t: Trained, state: Mapping[str, torch.Tensor]) -> nn.Module:
    module = copy.deepcopy(t.model)
    module.load_state_dict(dict(state))
    return module


def endpoint_stats(t: Trained, states: Sequence[Mapping[str, torch.Tensor]], X: torch.Tensor,
                   ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each model's channel statistics at the layers REPAIR corrects (:func:`repair_layers`), on inputs
    ``X``, in its own frame: one pass over ``X`` per model, shared by every merge of these models."""
    return [layer_stats(_endpoint_module(t, s), repair_layers(t), X) for s in states]


def repaired(t: Trained, merged: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
             perms: Sequence[Mapping[str, torch.Tensor]], X: torch.Tensor,
             stats: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
             ) -> dict[str, torch.Tensor]:
    """``merged`` after REPAIR against the endpoints mapped by ``perms`` into its frame, on inputs ``X``;
    ``stats``: the endpoints' :func:`endpoint_stats` (computed here when ``None``), permuted into that
    frame instead of running the permuted endpoints again."""
    model = _endpoint_module(t, merged)
    names = repair_layers(t)
    stats = stats if stats is not None else endpoint_stats(t, states, X)
    groups = {n: t.spec.axes[f"{n}.weight"][0] for n in names}  # the group of each layer's output channels
    goals = [permute_stats(st, groups, p) for st, p in zip(stats, perms)]
    repair(model, [], X, names=names, goal_stats=goals)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def alignment_maps(sizes: Mapping[str, int], num_models: int, merge_many_perms: Sequence[Permutations],
                   c2m3_perms: Sequence[Permutations]) -> dict[str, list[Permutations]]:
    """Each aligning method's maps of the models into one frame: ``naive`` the identity (no alignment),
    ``merge_many`` and ``c2m3`` their permutations (``W.index_select(axis, perm)``)."""
    return {"naive": [identity_permutations(sizes)] * num_models, "merge_many": list(merge_many_perms),
            "c2m3": list(c2m3_perms)}


def merge_methods(t: Trained, states: Sequence[Mapping[str, torch.Tensor]], data: DigitsSplit,
                  frank_wolfe: Mapping[str, Any], seed: int, progress: bool = False) -> MergeOutcome:
    """Every method of :data:`METHODS` on ``states`` (REPAIR statistics on the training inputs)."""
    sizes = t.spec.group_sizes(states[0])
    out, secs = {}, {}
    start = time.perf_counter()
    mm = merge_many(t.spec, states, seed=seed)
    secs["merge_many"] = time.perf_counter() - start
    start = time.perf_counter()
    fw = c2m3_frank_wolfe(t.spec, states, seed=seed, progress=progress, **frank_wolfe)
    secs["c2m3"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = endpoint_stats(t, states, data.X_train)  # one pass per endpoint, shared by the three merges
    secs["endpoint_stats"] = time.perf_counter() - start
    for name, perms in alignment_maps(sizes, len(states), mm, fw.perms).items():
        out[name] = merge_aligned(t.spec, states, perms)
        start = time.perf_counter()
        out[f"{name}_repair"] = repaired(t, out[name], states, perms, data.X_train, stats)
        secs[f"{name}_repair"] = time.perf_counter() - start
    return MergeOutcome(out, fw, mm, secs)


def evaluate_methods(t: Trained, outcome: MergeOutcome, states: Sequence[Mapping[str, torch.Tensor]],
                     data: DigitsSplit) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Test ``accuracy`` and ``loss`` per method and for the endpoints (their mean, ``endpoints``, and
    each, ``endpoint_<i>``); also each method's per-example correctness (for paired comparisons). The
    aligning methods (``naive``: no alignment, ``merge_many``, ``c2m3``) also get ``alignment_objective``,
    C2M3's objective at their maps (:func:`mergelab.alignment.objective_at`; the sum over tensors and pairs
    of models of the aligned weights' inner products): how well each aligns the models by C2M3's own score."""
    rows, correct = {}, {}
    maps = alignment_maps(t.spec.group_sizes(states[0]), len(states), outcome.merge_many, outcome.frank_wolfe.perms)
    ends = [evaluate_state(t.model, s, data.X_test, data.y_test) for s in states]
    for i, e in enumerate(ends):
        rows[f"endpoint_{i}"] = e
    rows["endpoints"] = {"accuracy": sum(e["accuracy"] for e in ends) / len(ends),
                         "loss": sum(e["loss"] for e in ends) / len(ends)}
    for m in METHODS:
        r = evaluate_state(t.model, outcome.states[m], data.X_test, data.y_test, return_correct=True)
        correct[m] = r.pop("correct")
        rows[m] = {**r, "relative_to_endpoints": r["accuracy"] / rows["endpoints"]["accuracy"]}
        if m in maps:
            rows[m]["alignment_objective"] = objective_at(t.spec, states, maps[m])
    return rows, correct


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Accuracy of ``a`` minus that of ``b`` on the same examples and its standard error
    (``sqrt(n01 + n10 - (n01 - n10)^2 / n) / n`` from the discordant pairs)."""
    n = a.numel()
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    diff = (n10 - n01) / n
    return {"difference": diff, "standard_error": math.sqrt(max(n10 + n01 - (n10 - n01) ** 2 / n, 0.0)) / n}


CycleMaps = dict[str, list[dict[str, torch.Tensor]]]
"""Per method (``pairwise``, ``merge_many``, ``c2m3``), the maps A -> B, B -> C, C -> A of three models:
per permutation group, an index tensor ``(n,)`` (unit ``i`` of the first model is unit ``p[i]`` of the
second)."""


def cycle_maps(t: Trained, states: Sequence[Mapping[str, torch.Tensor]], fw: FrankWolfeResult,
               mm: Sequence[Mapping[str, torch.Tensor]], seed: int) -> CycleMaps:
    """The maps A -> B -> C -> A of the first three models: pairwise weight matching (each pair matched on
    its own), and MergeMany's and C2M3's (pairwise maps derived from the shared frame)."""
    a, b, c = states[:3]
    maps: CycleMaps = {"pairwise": [weight_matching(t.spec, x, y, seed=seed) for x, y in ((a, b), (b, c), (c, a))]}
    for name, perms in (("merge_many", mm), ("c2m3", fw.perms)):
        pa, pb, pc = perms[:3]
        maps[name] = [pairwise_from_universe(x, y) for x, y in ((pa, pb), (pb, pc), (pc, pa))]
    return maps


def cycle_errors(t: Trained, maps: CycleMaps) -> dict[str, Any]:
    """Cycle error of each method's :func:`cycle_maps`, per group and in the mean over groups
    (weighted by the groups' sizes, in units)."""
    sizes = t.spec.group_sizes(t.states[0])
    total = sum(sizes.values())

    def summary(per_group: Mapping[str, float]) -> dict[str, Any]:
        return {"per_group": dict(per_group), "mean": sum(per_group[g] * sizes[g] for g in sizes) / total}

    return {**{name: summary(cycle_error(*m)) for name, m in maps.items()},
            "definition": "fraction of units i with P_CA(P_BC(P_AB(i))) != i, size-weighted mean over groups"}


@dataclass
class MergeStudy:
    """Every merge of the chapter, per architecture: the full outcome, metrics and per-example
    correctness of the main comparison (the first ``merge_models`` models), the model-count table and
    the paired comparison over several sets of ``merge_models`` models.

    Attributes:
        outcomes: architecture to :class:`MergeOutcome` of the first ``merge_models`` models.
        metrics, correct: architecture to :func:`evaluate_methods` of that outcome.
        counts: columns ``architecture, num_models, method, accuracy, loss`` (``method == "endpoints"``:
            the models' mean), one row per architecture, count and method.
        sets: one row per architecture and merged set: ``architecture, models`` (their indices, e.g.
            ``"0,2,4"``), the test accuracy of ``endpoints`` and every method, the paired
            ``difference`` of C2M3 with REPAIR minus MergeMany with REPAIR and its ``standard_error``
            (over the set's test examples), and ``objective_merge_many``, ``objective_c2m3``: C2M3's
            objective at each method's maps (``alignment_objective`` of :func:`evaluate_methods`).
    """

    outcomes: dict[str, MergeOutcome]
    metrics: dict[str, dict[str, dict[str, float]]]
    correct: dict[str, dict[str, torch.Tensor]]
    counts: pd.DataFrame
    sets: pd.DataFrame


def _merge_job(context: tuple[DigitsSplit, dict[str, Any]], item: tuple[Any, ...]) -> str:
    """Merge the models ``members`` of one architecture with every method and evaluate them, into the cache
    (:mod:`.ch06_store`; nothing to do when it is there); the merged states and permutations are kept only
    for the main comparison (``keep``). Returns which job it was."""
    data, data_key = context
    cfg, num_models, members, frank_wolfe, keep = item

    def build() -> tuple[MergeOutcome | None, dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        t = _trained(cfg, num_models, data, data_key)  # cached: loaded, not trained
        states = [t.states[i] for i in members]
        with torch_threads(SCRATCH_THREADS):  # as a worker process runs it: the same bits here (workers: 1)
            outcome = merge_methods(t, states, data, frank_wolfe, cfg.seed)
            metrics, correct = evaluate_methods(t, outcome, states, data)
        return (outcome if keep else None), metrics, correct

    build_job(merge_artifact(cfg, members, frank_wolfe, keep, data_key), build)
    return f"{cfg.arch} models {list(members)}"


def merge_sets_of(num_models: int, merge_models: int, n: int) -> list[tuple[int, ...]]:
    """The first ``n`` sets of ``merge_models`` of the ``num_models`` models in lexicographic order (the
    first is ``0 .. merge_models - 1``, the main comparison)."""
    sets = list(itertools.combinations(range(num_models), merge_models))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(sets):
        raise ValueError(f"merge_sets={n!r} is not valid; use 1..{len(sets)} (the sets of {merge_models} of "
                         f"{num_models} models).")
    return sets[:n]


def merge_study(trained: Mapping[str, Trained], merge_models: int, counts: Sequence[int],
                digits: Mapping[str, Any], frank_wolfe: Mapping[str, Any], seed: int,
                merge_sets: Mapping[str, int] | None = None, executor: Executor | None = None,
                progress: bool = False) -> MergeStudy:
    """:func:`merge_methods` and :func:`evaluate_methods` on the first ``k`` models of every
    architecture for ``k`` in ``counts`` and ``merge_models``, and on the first ``merge_sets[arch]``
    sets of ``merge_models`` models (:func:`merge_sets_of`; default 1: the main comparison only), each
    distinct set merged once, as independent jobs of ``executor`` (default: here, one after the other)
    that write into the cache (:mod:`.ch06_store`): a re-run merges only the sets not cached yet."""
    for t in trained.values():
        bad = [k for k in [*counts, merge_models] if not 2 <= k <= len(t.states)]
        if bad:
            raise ValueError(f"model_counts={list(counts)} or merge_models={merge_models} has {bad}: each count "
                             f"must be in 2..num_models={len(t.states)}.")
        if t.cfg.seed != seed:
            raise ValueError(f"seed={seed!r} is not the seed the {t.arch} models were trained from ({t.cfg.seed}).")
    check_frank_wolfe_options(frank_wolfe)  # before any model is merged: a typo would fail inside the first job
    unknown = sorted(set(merge_sets or {}) - set(trained))
    if unknown:
        raise ValueError(f"merge_sets names {unknown}, which are not architectures here; use {sorted(trained)}.")
    executor = executor if executor is not None else LocalExecutor(1)
    main = tuple(range(merge_models))
    members: dict[str, list[tuple[int, ...]]] = {}
    sets: dict[str, list[tuple[int, ...]]] = {}
    by_count = [tuple(range(k)) for k in sorted(set(counts), reverse=True)]
    for arch, t in trained.items():
        sets[arch] = merge_sets_of(len(t.states), merge_models, (merge_sets or {}).get(arch, 1))
        members[arch] = sorted(dict.fromkeys([*by_count, *sets[arch]]), key=len, reverse=True)  # the largest first
    jobs = [(trained[arch].cfg, len(trained[arch].states), m, dict(frank_wolfe), m == main)
            for arch in trained for m in members[arch]]
    data_key = digits_data(digits)[1]
    missing = [j for j in jobs if not merge_artifact(j[0], j[2], j[3], j[4], data_key).exists()]
    if missing:  # the others are loaded from the cache
        executor.map(_merge_job, missing, digits_context(digits), progress=progress,
                     describe=lambda j: {"architecture": j[0].arch, "models": list(j[2])},
                     desc="merges").raise_failures("merges")
    outcomes, metrics, correct, rows, set_rows = {}, {}, {}, [], []
    for cfg, _n, m_set, fw, keep in jobs:
        outcome, met, cor = load_job(merge_artifact(cfg, m_set, fw, keep, data_key))
        arch = cfg.arch
        if keep:
            outcomes[arch], metrics[arch], correct[arch] = outcome, met, cor
        if m_set == tuple(range(len(m_set))) and len(m_set) in counts:
            rows += [{"architecture": arch, "num_models": len(m_set), "method": name,
                      "accuracy": met[name]["accuracy"], "loss": met[name]["loss"]} for name in ("endpoints", *METHODS)]
        if m_set in sets[arch]:
            set_rows.append({"architecture": arch, "models": ",".join(map(str, m_set)),
                             **{name: met[name]["accuracy"] for name in ("endpoints", *METHODS)},
                             **paired_difference(cor["c2m3_repair"], cor["merge_many_repair"]),
                             **{f"objective_{name}": met[name]["alignment_objective"] for name in ("merge_many", "c2m3")}})
    table = pd.DataFrame(rows).sort_values(["architecture", "num_models"], kind="stable", ignore_index=True)
    sets_table = pd.DataFrame(set_rows).sort_values(["architecture", "models"], kind="stable", ignore_index=True)
    return MergeStudy(outcomes, metrics, correct, table, sets_table)


def across_sets(sets: pd.DataFrame, arch: str) -> dict[str, Any]:
    """C2M3 with REPAIR minus MergeMany with REPAIR over the merged sets of ``arch`` (rows of
    :attr:`MergeStudy.sets`): ``n`` sets, the ``mean`` difference, its ``standard_error`` across sets
    (sample SD / sqrt(n); ``None`` below 3 sets), how many sets are ``positive``, ``per_set``, and
    whether the difference is ``separated`` from 0 (:func:`sets_separated`).

    ``objective`` compares the two alignments by C2M3's own objective: in how many sets Frank-Wolfe's maps
    score higher than MergeMany's (``c2m3_higher``) or lower, the relative difference
    ``(f_c2m3 - f_merge_many) / |f_merge_many|`` (``relative_min``, ``relative_max``) and the Spearman
    correlation across sets between that difference and the accuracy ``difference`` (``None`` below 3
    sets or without spread): whether the better-scoring alignment is the one that classifies better."""
    part = sets[sets.architecture == arch]
    d = part["difference"].astype(float)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else None,
           "standard_error": float(d.std(ddof=1) / math.sqrt(n)) if n >= 3 else None,
           "positive": int((d > 0).sum()), "negative": int((d < 0).sum()),
           "per_set": {row.models: float(row.difference) for row in part.itertuples()}}
    if n and {"objective_c2m3", "objective_merge_many"} <= set(part.columns):
        scale = part["objective_merge_many"].abs().astype(float).replace(0.0, math.nan)  # 0: no relative difference
        rel = ((part["objective_c2m3"] - part["objective_merge_many"]) / scale).astype(float)
        rho = float(spearmanr(rel, d).statistic) if n >= 3 and rel.nunique() > 1 and d.nunique() > 1 else None
        out["objective"] = {"c2m3_higher": int((rel > 0).sum()), "merge_many_higher": int((rel < 0).sum()),
                            "relative_min": float(rel.min()), "relative_max": float(rel.max()),
                            "spearman_with_difference": rho}
    return {**out, "separated": sets_separated(out)}


def check_cycle_error(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]) -> None:
    """The contract of a cycle error for one permutation group, which
    :func:`~mergelab.alignment.specs.cycle_error` meets: ``fn(perm_ab, perm_bc, perm_ca)`` (index
    tensors ``(n,)``; unit ``i`` of A is matched with unit ``perm_ab[i]`` of B) returns the fraction of
    units ``i`` of A that the maps A -> B -> C -> A do not send back to ``i``, as a float in [0, 1].
    Raises ``AssertionError`` saying what is wrong."""
    n = 12
    g = torch.Generator().manual_seed(0)
    ident = torch.arange(n)

    def call(ab: torch.Tensor, bc: torch.Tensor, ca: torch.Tensor) -> float:
        copies = [p.clone() for p in (ab, bc, ca)]
        out = fn(ab, bc, ca)
        assert all(torch.equal(p, c) for p, c in zip((ab, bc, ca), copies)), (
            "the cycle error changed a permutation in place; leave its inputs as given.")
        assert isinstance(out, (float, int)) and not isinstance(out, bool), (
            f"the cycle error returned a {type(out).__name__}; return a Python float (use float(...)).")
        return float(out)

    assert call(ident, ident, ident) == 0.0, "identity maps send every unit back to itself: the error must be 0."
    ab, bc = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    order = ("follow unit i from A to B (perm_ab[i]), then to C (perm_bc[...]), then back to A (perm_ca[...]), "
             "in that order.")
    assert call(ab, bc, invert(bc[ab])) == 0.0, (
        "maps that compose to the identity around the cycle (perm_ca[perm_bc[perm_ab[i]]] == i) must give 0: " + order)
    swap = ident.clone()
    swap[[0, 1]] = swap[[1, 0]]
    got = call(swap, ident, ident)
    assert abs(got - 2 / n) < 1e-6, (f"one swapped pair of {n} units sends 2 units elsewhere: the error is the "
                                      f"fraction 2/{n} = {2 / n:.4f}, not a count; got {got}.")
    for _ in range(5):
        ab, bc, ca = (torch.randperm(n, generator=g) for _ in range(3))
        want = cycle_error({"g": ab}, {"g": bc}, {"g": ca})["g"]
        got = call(ab, bc, ca)
        assert abs(got - want) < 1e-6, (
            f"for random maps the error should be {want:.4f}, got {got:.4f}: " + order)

