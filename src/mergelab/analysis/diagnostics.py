"""Diagnostics that explain why merging works or fails on a benchmark.

Each function takes plain tensors, state dicts or a benchmark object with the common interface
(``tasks``, ``split``, ``heads``, ``new_encoder``, ``evaluate``), so it runs at every size:

* :func:`linear_probe` - do the pretrained features already hold each task (logistic regression on
  the frozen, L2-normalized features, fitted on the train split, its L2 strength chosen on the
  validation split as CLIP's linear probes choose it, scored on the test split; cached per encoder and
  task)?
* :func:`zero_shot_calibration` - are the frozen heads calibrated: cross-entropy, mean confidence,
  accuracy and the share of the most predicted class, per task?
* :func:`relative_norms` - ``||tau_t|| / ||theta_0||`` in total and per layer kind: how far
  fine-tuning moved from the pretrained weights.
* :func:`own_task_curve` - ``acc_t(theta_0 + alpha tau_t)`` over ``alpha``: is a task vector's effect
  on its own task gradual (near-linear) or all-or-nothing?
* :func:`margin_linearity` - the own-task curve against its linearization, per example: is the network
  linear along ``tau_t``, and where along the segment do the examples the expert gains turn right?
* :func:`cross_task_matrix` - ``acc_t(theta_0 + c tau_s) - acc_t(theta_0)``: weight disentanglement;
  orthogonal task vectors can still destroy each other's tasks.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import codeversion
from ..cache import read_result, result_path
from ..layers import layer_kind
from ..merging import merge
from ..merging.select import at_grid_edge
from ..models import encode
from ..task_vectors import TaskVector
from ..utils import StateDict, atomic_write_json, shows_progress, size_threads, state_digest


class DiagnosableBenchmark(Protocol):
    tasks: tuple[str, ...]
    heads: Mapping[str, torch.nn.Module]
    device: torch.device

    def split(self, task: str, split: str = "train") -> tuple[Any, torch.Tensor]: ...

    def new_encoder(self, state: StateDict | None = None) -> torch.nn.Module: ...

    def evaluate(self, state: StateDict, split: str = "test", tasks: Sequence[str] | None = None
                 ) -> dict[str, float]: ...


def _encode(benchmark: DiagnosableBenchmark, encoder: torch.nn.Module, X: Any) -> torch.Tensor:
    """Features ``(N, d)`` float32 on the CPU of images ``X`` ``(N, 3, H, W)`` on the benchmark's device
    (:func:`mergelab.models.encode`), in the arithmetic of its evaluations (its ``eval_features``: at the
    clip size, ``model.precision``'s autocast), on the threads the size trains with (its ``train_threads``, if
    it fixes them), so that a diagnostic reads the same numbers in a notebook on every core count."""
    with size_threads(benchmark):
        return encode(encoder, X, batch_size=500, device=benchmark.device,
                      forward=getattr(benchmark, "eval_features", None))


def _features(benchmark: DiagnosableBenchmark, encoder: torch.nn.Module, X: Any) -> torch.Tensor:
    """L2-normalized features ``(N, d)`` float32 on the CPU of images ``X`` ``(N, 3, H, W)`` (any
    indexable whose slices are tensors), computed on the benchmark's device (:func:`_encode`)."""
    return F.normalize(_encode(benchmark, encoder, X), dim=-1)


PROBE_C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
"""Inverse L2 strengths ``C`` (scikit-learn's convention) the linear probe chooses from on validation,
strongest penalty first, a decade apart. CLIP's linear probes sweep the same range on validation
(1e-6..1e6); on unit-norm features 1e6 is as good as unpenalized, and a fit without any penalty is
ill-conditioned where a task is nearly separable."""


def _check_features(train_features: torch.Tensor, test_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, d) and (M, d); got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}.")


NEWTON_MAX_COEFFICIENTS = 5000
"""Largest probe (``(d + 1) x classes`` coefficients) fitted by Newton-Cholesky, whose Hessian has the
square of that many entries (5000: 200 MB); larger ones (CLIP's 512-d features on 10 to 397 classes) use
L-BFGS, which needs no Hessian."""


def probe_solver(num_features: int, num_classes: int) -> str:
    """scikit-learn's solver for a probe on ``num_features`` features and ``num_classes`` classes:
    ``"newton-cholesky"`` (a handful of exact Newton steps, where L-BFGS needs hundreds of iterations once
    the penalty is weak) while its Hessian is small (:data:`NEWTON_MAX_COEFFICIENTS`), else ``"lbfgs"``."""
    coefficients = (num_features + 1) * (num_classes if num_classes > 2 else 1)
    return "newton-cholesky" if coefficients <= NEWTON_MAX_COEFFICIENTS else "lbfgs"


def _as_arrays(features: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any]:
    """``(features as float64, labels)`` as NumPy arrays, what scikit-learn fits and scores."""
    return features.double().numpy(), labels.numpy()


def _fit_probe(X: Any, y: Any, C: float, max_iter: int | None = None, start: Any = None) -> Any:
    """A multinomial logistic regression at inverse L2 strength ``C`` fitted on ``X`` ``(N, d)`` float64 and
    ``y`` ``(N,)`` int (NumPy), with :func:`probe_solver`'s solver. ``start``: a probe fitted on the same data
    (at another ``C``) whose coefficients the solver starts from instead of zero: the same optimum to the
    solver's tolerance in fewer iterations (along a grid of ``C``, about half the CPU time)."""
    from sklearn.linear_model import LogisticRegression

    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C={C!r} is not valid; use a positive, finite inverse L2 strength (e.g. one of "
                         f"{PROBE_C_GRID}).")
    solver = probe_solver(X.shape[1], len(set(y.tolist())))
    iterations = max_iter if max_iter is not None else (300 if solver == "newton-cholesky" else 3000)
    clf = LogisticRegression(C=C, solver=solver, max_iter=iterations, warm_start=start is not None)
    if start is not None:  # scikit-learn's warm start reads the estimator's own coefficients
        clf.coef_, clf.intercept_ = start.coef_.copy(), start.intercept_.copy()
    return clf.fit(X, y)


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                          test_features: torch.Tensor, test_labels: torch.Tensor,
                          C: float = 10.0, max_iter: int | None = None) -> float:
    """Test accuracy (fraction 0..1) of a multinomial logistic regression fitted on ``train_features``
    ``(N, d)`` / ``train_labels`` ``(N,)`` int and scored on ``test_features`` ``(M, d)`` / ``test_labels``
    ``(M,)``. ``C``: inverse L2 strength (scikit-learn's convention); ``max_iter``: the solver's
    iterations (``None``: 300 for Newton-Cholesky, 3000 for L-BFGS, :func:`probe_solver`)."""
    _check_features(train_features, test_features)
    clf = _fit_probe(*_as_arrays(train_features, train_labels), C, max_iter)
    return float(clf.score(*_as_arrays(test_features, test_labels)))


def validated_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], grid: Sequence[float] = PROBE_C_GRID,
                    max_iter: int | None = None) -> dict[str, Any]:
    """A linear probe whose L2 strength is chosen on validation: one multinomial logistic regression per
    ``C`` of ``grid`` (ascending) fitted on ``train``, each started from the previous ``C``'s solution, the
    ``C`` of the best ``val`` accuracy kept (ties: the smaller ``C``, the stronger penalty), scored once on
    ``test``. Each split is ``(features (N, d), labels (N,) int)``.

    Returns ``{"accuracy"`` (test, 0..1), ``"C"``, ``"val_accuracy"``, ``"at_grid_edge"`` (the chosen ``C``
    is the grid's first or last value: the best may lie beyond it)``}``.
    """
    grid = [float(c) for c in grid]
    if not grid or any(not c > 0 for c in grid) or grid != sorted(grid):
        raise ValueError(f"grid={grid!r} is not valid; give positive inverse L2 strengths in ascending order "
                         f"(e.g. {PROBE_C_GRID}).")
    _check_features(train[0], val[0])
    _check_features(train[0], test[0])
    train_xy, val_xy = _as_arrays(*train), _as_arrays(*val)  # converted once for the whole grid
    best, best_val, best_clf, clf = grid[0], -1.0, None, None
    for C in grid:  # each fit starts from the previous C's solution (a regularization path)
        clf = _fit_probe(*train_xy, C, max_iter, start=clf)
        acc = float(clf.score(*val_xy))
        if acc > best_val:
            best, best_val, best_clf = C, acc, clf
    return {"accuracy": float(best_clf.score(*_as_arrays(*test))), "C": best, "val_accuracy": best_val,
            "at_grid_edge": at_grid_edge(best, grid)}


PROBE_RESULT_KEYS = frozenset({"accuracy", "C", "val_accuracy", "at_grid_edge"})
"""The keys of one task's :func:`validated_probe`; a cached file without all of them is fitted again."""


def probe_path(benchmark: Any, state: StateDict, task: str, splits: Sequence[str], grid: Sequence[float],
               digest: Callable[[], str] | None = None) -> Path | None:
    """Where :func:`linear_probe_fits` keeps one task's probe: ``<benchmark.cache_dir>/probe/<key>.json``, the key
    naming the encoder's weights (their digest), the task's three ``splits`` (the benchmark's ``evaluation_key``:
    data and arithmetic), the ``grid`` of ``C``, scikit-learn's version and the evaluation code's version.
    ``None`` for a benchmark without a ``cache_dir`` or ``evaluation_key``. ``digest``: gives the weights' digest
    (a caller keying several tasks of one encoder computes it once); default :func:`state_digest` of ``state``."""
    weights_digest = digest if digest is not None else (lambda: state_digest(state))

    def key() -> dict[str, Any]:  # computed only where the benchmark keeps a cache
        return {"state": weights_digest(), "task": task,
                "splits": [benchmark.evaluation_key(task, s) for s in splits],
                "grid": [float(c) for c in grid], "scikit-learn": version("scikit-learn"),
                **codeversion.key_part("evaluation")}

    return result_path(benchmark, "probe", key)


def linear_probe_fits(benchmark: DiagnosableBenchmark, state: StateDict, tasks: Sequence[str] | None = None,
                      train_split: str = "train", val_split: str = "val", test_split: str = "test",
                      grid: Sequence[float] = PROBE_C_GRID, cache: bool = True, progress: bool | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Per task, :func:`validated_probe` on the frozen, L2-normalized features of the encoder ``state``:
    fitted on ``train_split``, its ``C`` chosen on ``val_split``, scored on ``test_split``.

    ``cache``: keep each task's result as :func:`probe_path` names it and read it back on a re-run instead of
    encoding the splits and fitting again (ignored for a benchmark without a ``cache_dir``). ``progress``: a
    bar over the tasks (``None``: the benchmark's setting)."""
    splits = (train_split, val_split, test_split)
    encoder = None
    out = {}
    digest = functools.cache(lambda: state_digest(state))  # once for all tasks, and only where a cache is kept
    bar = tqdm(list(tasks or benchmark.tasks), desc="linear probes", disable=not shows_progress(benchmark, progress))
    for task in bar:
        path = probe_path(benchmark, state, task, splits, grid, digest) if cache else None
        cached = read_result(path, PROBE_RESULT_KEYS)
        if cached is not None:
            out[task] = cached
            continue
        if encoder is None:
            encoder = benchmark.new_encoder(state)
        data = []
        for split in splits:
            X, y = benchmark.split(task, split)
            data.append((_features(benchmark, encoder, X), y))
        out[task] = validated_probe(*data, grid=grid)
        if path is not None:
            atomic_write_json(path, out[task])
    return out


def linear_probe(benchmark: DiagnosableBenchmark, state: StateDict, tasks: Sequence[str] | None = None,
                 train_split: str = "train", val_split: str = "val", test_split: str = "test",
                 grid: Sequence[float] = PROBE_C_GRID, cache: bool = True) -> dict[str, float]:
    """Per task, the test accuracy (0..1) of :func:`linear_probe_fits`. A probe near the experts'
    accuracy means the pretrained features already hold the task (the situation of CLIP)."""
    fits = linear_probe_fits(benchmark, state, tasks, train_split, val_split, test_split, grid, cache)
    return {t: f["accuracy"] for t, f in fits.items()}


def calibration_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean cross-entropy (nats), mean confidence (max softmax probability) and the share
    of the most predicted class (fraction 0..1) of ``logits`` ``(N, C)`` against ``labels`` ``(N,)``."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,); got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    logits = logits.double()
    pred = logits.argmax(-1)
    return {"accuracy": float((pred == labels).double().mean()),
            "cross_entropy": float(F.cross_entropy(logits, labels)),
            "confidence": float(logits.softmax(-1).max(-1).values.mean()),
            "top_class_share": float(torch.bincount(pred, minlength=logits.shape[1]).max() / len(labels))}


@torch.no_grad()
def _task_logits(benchmark: DiagnosableBenchmark, encoder: torch.nn.Module, task: str, split: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), labels (N,))`` of ``encoder`` with ``task``'s frozen head on every example of
    ``split``, in the split's order, on the CPU."""
    X, y = benchmark.split(task, split)
    head = copy.deepcopy(benchmark.heads[task]).cpu()  # the shared head may live on the GPU; it stays there
    return head(_encode(benchmark, encoder, X)), y


@torch.no_grad()
def zero_shot_calibration(benchmark: DiagnosableBenchmark, state: StateDict, split: str = "val",
                          tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Per task, :func:`calibration_from_logits` of the encoder ``state`` with the task's frozen head on
    ``split``. Calibrated heads have a cross-entropy near ``-log`` of their accuracy level and a
    confidence near their accuracy; confidently wrong heads have a confidence far above it."""
    encoder = benchmark.new_encoder(state)
    out = {}
    for task in tasks or benchmark.tasks:
        out[task] = calibration_from_logits(*_task_logits(benchmark, encoder, task, split))
    return out


def relative_norms(pretrained: Mapping[str, torch.Tensor], task_vector: TaskVector | Mapping[str, torch.Tensor]
                   ) -> dict[str, float]:
    """``||tau|| / ||theta_0||`` (dimensionless) over all floating tensors (key ``"total"``) and per layer
    kind (``||tau restricted to the kind|| / ||theta_0 restricted to the kind||``). The public
    benchmark's task vectors are a few per cent of ``||theta_0||``."""
    sums: dict[str, list[float]] = {}
    for key, ref in pretrained.items():
        if not torch.is_floating_point(ref) or key not in task_vector:
            continue
        d = float((task_vector[key].double() ** 2).sum())
        p = float((ref.double() ** 2).sum())
        for k in ("total", layer_kind(key, ref.shape)):
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += d
            acc[1] += p
    return {k: math.sqrt(d) / math.sqrt(p) if p > 0 else float("nan") for k, (d, p) in sums.items()}


def own_task_curve(benchmark: DiagnosableBenchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                   alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), split: str = "val",
                   progress: bool = False) -> dict[str, dict[float, float]]:
    """``{task: {alpha: acc_task(theta_0 + alpha tau_task)}}`` on ``split`` (accuracy 0..1). A curve
    that rises steadily from alpha 0 (zero-shot) to 1 (the expert) means the task vector acts
    near-linearly, which is what lets a merge at alpha ~ 0.3 keep much of each task."""
    return {t: {float(a): benchmark.evaluate(tv.apply_to(pretrained, a), split, [t])[t] for a in alphas}
            for t, tv in tqdm(task_vectors.items(), total=len(task_vectors), desc="own-task curves",
                              disable=not progress)}


def gain_fraction(curve: Mapping[float, float], alpha: float) -> float:
    """Share of the expert's gain over zero-shot reached at ``alpha`` on an :func:`own_task_curve` row:
    ``(acc(alpha) - acc(0)) / (acc(1) - acc(0))`` (nan when the expert gains nothing)."""
    gain = curve[1.0] - curve[0.0]
    return (curve[alpha] - curve[0.0]) / gain if abs(gain) > 1e-12 else float("nan")


def margins_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin ``(N,)`` float64 of ``logits`` ``(N, C)`` against ``labels`` ``(N,)``: the true
    class's logit minus the largest other class's, in the head's logit units (nats). Positive where the
    prediction is right, negative where it is wrong; its size is how far the example is from the
    decision boundary. A tie (margin 0) counts as wrong here, where an ``argmax`` accuracy counts it
    right when the true class has the lower index."""
    if logits.ndim != 2 or logits.shape[1] < 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) with C >= 2 and labels (N,); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}.")
    logits = logits.double()
    true = logits.gather(1, labels.long()[:, None])[:, 0]
    others = logits.scatter(1, labels.long()[:, None], -math.inf)
    return true - others.max(-1).values


@torch.no_grad()
def example_margins(benchmark: DiagnosableBenchmark, state: StateDict, task: str, split: str = "val"
                    ) -> torch.Tensor:
    """:func:`margins_from_logits` ``(N,)`` of the encoder ``state`` with ``task``'s frozen head on every
    example of ``split``, in the split's order."""
    return margins_from_logits(*_task_logits(benchmark, benchmark.new_encoder(state), task, split))


def margin_linearity(benchmark: DiagnosableBenchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                     alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), split: str = "val",
                     curve: Mapping[str, Mapping[float, float]] | None = None) -> dict[str, dict[str, Any]]:
    """Why an :func:`own_task_curve` has its shape: the curve against its linearization, per example.

    Each example of task t has a margin (:func:`margins_from_logits`) at the pretrained model, ``m0``, and
    at the expert, ``m1``. If the network were linear along ``tau_t``, its margin at ``theta_0 + alpha
    tau_t`` would be ``m0 + alpha (m1 - m0)``, and an example the expert gains (wrong at 0, right at 1)
    would turn right at ``alpha* = -m0 / (m1 - m0)``, in [0, 1). Where the measured curve follows the
    linearized one, the network is close to linear along the vector and the curve's shape is the
    distribution of ``alpha*``: concave when gained examples cross early (the expert's margins far
    beyond the zero-shot errors), straight when they cross all along the segment. Two forward passes
    per task (the pretrained model and the expert) besides the curve's own, in the arithmetic of the
    benchmark's evaluations (``eval_features``): the margins and the curve share one precision (they may
    differ in float32 rounding, batches of other sizes).

    Args:
        alphas: coefficients, which must include 0 (the pretrained model) and 1 (the expert).
        split: the split evaluated (every example of it).
        curve: the measured own-task curve ``{task: {alpha: accuracy}}`` on ``split`` at ``alphas``
            (:func:`own_task_curve`'s result); measured here when not given.

    Returns:
        ``{task: {"alphas": [...], "accuracy": [...] (the measured curve), "linearized_accuracy": [...]
        (fraction of examples with a positive linearized margin), "max_gap": max over alphas of
        |accuracy - linearized_accuracy|, "largest_gap": that difference with its sign (positive: the
        measured curve above its linearization), "mean_margin": [at 0, at 1] over every example (nats),
        "gained": fraction of examples
        wrong at 0 and right at 1, "crossing_median" and "crossing_quartiles": [q25, q75] of ``alpha*`` over
        the gained examples (nan if none)}}``; accuracies as fractions 0..1.
    """
    grid = [float(a) for a in alphas]
    if 0.0 not in grid or 1.0 not in grid or len(set(grid)) != len(grid):
        raise ValueError(f"alphas={list(alphas)!r} is not valid; give distinct coefficients that include 0 (the "
                         "pretrained model) and 1 (the expert).")
    if not task_vectors:
        raise ValueError("task_vectors is empty; give at least one task vector.")
    if curve is None:
        curve = own_task_curve(benchmark, pretrained, task_vectors, grid, split)
    missing = sorted(f"{t}@{a}" for t in task_vectors for a in grid if a not in curve.get(t, {}))
    if missing:
        raise ValueError(f"curve lacks the points {missing}; give the own-task curve of every task at every alpha.")
    out = {}
    zero_shot = benchmark.new_encoder(pretrained)  # built once, read by every task's head
    for task, tv in task_vectors.items():
        m0 = margins_from_logits(*_task_logits(benchmark, zero_shot, task, split))
        m1 = example_margins(benchmark, tv.apply_to(pretrained, 1.0), task, split)
        accuracy = [float(curve[task][a]) for a in grid]
        linearized = [float(((m0 + a * (m1 - m0)) > 0).double().mean()) for a in grid]
        gained = (m0 <= 0) & (m1 > 0)
        crossing = (-m0[gained] / (m1[gained] - m0[gained])).numpy()
        quartiles = [float(q) for q in np.quantile(crossing, [0.25, 0.5, 0.75])] if crossing.size else [math.nan] * 3
        gaps = [a - b for a, b in zip(accuracy, linearized)]
        largest = max(gaps, key=abs)
        out[task] = {"alphas": grid, "accuracy": accuracy, "linearized_accuracy": linearized,
                     "max_gap": abs(largest), "largest_gap": largest,
                     "mean_margin": [float(m0.mean()), float(m1.mean())],
                     "gained": float(gained.double().mean()), "crossing_median": quartiles[1],
                     "crossing_quartiles": [quartiles[0], quartiles[2]]}
    return out


def alone_and_merged(benchmark: DiagnosableBenchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                     coefficient: float, split: str = "val") -> dict[str, dict[str, float]]:
    """Where task arithmetic at ``coefficient`` (lambda) loses each task, on ``split`` (accuracies as
    fractions 0..1; ``others`` a difference of two, in -1..1).

    Per task t: ``{"zero_shot": acc_t(theta_0), "alone": acc_t(theta_0 + lambda tau_t), "merged":
    acc_t(theta_0 + lambda sum_s tau_s), "others": merged - alone}``. ``alone`` below the expert is the
    price of a small coefficient on a vector that acts near-linearly (:func:`own_task_curve`); ``others``
    is what the other T - 1 vectors cost (or give) the task *together*, which :func:`cross_task_matrix`
    shows one vector at a time: small pairwise entries can add up to a large collective loss. The merge is
    :func:`mergelab.merging.merge` ``("task_arithmetic")``, the one the chapters validate.
    """
    if not task_vectors:
        raise ValueError("task_vectors is empty; give at least one task vector.")
    tasks = list(task_vectors)
    zero_shot = benchmark.evaluate(pretrained, split, tasks)
    merged = benchmark.evaluate(merge("task_arithmetic", pretrained, list(task_vectors.values()),
                                      coefficient=coefficient), split, tasks)
    out = {}
    for t, tv in task_vectors.items():
        alone = benchmark.evaluate(tv.apply_to(pretrained, coefficient), split, [t])[t]
        out[t] = {"zero_shot": zero_shot[t], "alone": alone, "merged": merged[t], "others": merged[t] - alone}
    return out


def cross_task_matrix(benchmark: DiagnosableBenchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                      coefficient: float = 0.3, split: str = "val", tasks: Sequence[str] | None = None,
                      progress: bool = False) -> tuple[list[str], list[str], torch.Tensor]:
    """Weight disentanglement: ``M[s, t] = acc_t(theta_0 + c tau_s) - acc_t(theta_0)`` (accuracy points
    as fractions), for every source task vector ``s`` (rows) and evaluated task ``t`` (columns). The
    diagonal is each vector's own gain; off-diagonal entries near 0 mean adding ``tau_s`` leaves task
    ``t`` alone. Returns ``(sources, targets, M (S, T) float64)``."""
    sources = list(task_vectors)
    targets = list(tasks or benchmark.tasks)
    base = benchmark.evaluate(pretrained, split, targets)
    M = torch.zeros(len(sources), len(targets), dtype=torch.float64)
    for i, s in enumerate(tqdm(sources, desc="cross-task matrix", disable=not progress)):
        acc = benchmark.evaluate(task_vectors[s].apply_to(pretrained, coefficient), split, targets)
        M[i] = torch.tensor([acc[t] - base[t] for t in targets], dtype=torch.float64)
    return sources, targets, M


def off_diagonal(sources: Sequence[str], targets: Sequence[str], M: torch.Tensor) -> torch.Tensor:
    """The entries of a :func:`cross_task_matrix` whose source and target tasks differ, flat."""
    keep = torch.tensor([[s != t for t in targets] for s in sources], dtype=torch.bool)
    return M[keep]


def off_diagonal_summary(sources: Sequence[str], targets: Sequence[str], M: torch.Tensor) -> dict[str, float]:
    """``{"mean", "min"}`` of a :func:`cross_task_matrix`'s :func:`off_diagonal` entries (accuracy as fractions;
    both nan where no source differs from a target)."""
    off = off_diagonal(sources, targets, M)
    return {"mean": float(off.mean()) if off.numel() else float("nan"),
            "min": float(off.min()) if off.numel() else float("nan")}
