"""Uncertainty of the chapters' figures, and the claims tables built from it.

Every chapter ends with a table of the seed papers' claims, each ``reproduced``, ``not_reproduced``
or ``not_testable`` at the size that ran. A claim's status follows from a confidence interval, never
from a point estimate alone: :func:`directional_status` turns an interval for "how much the
predicted direction holds" into a status. Intervals come from SciPy's bootstrap
(:func:`scipy.stats.bootstrap`, percentile method, seeded) or, for a mean of a few paired
differences (seeds), from Student's t.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from ..utils import check_integer

STATUSES = ("reproduced", "not_reproduced", "not_testable")
"""The statuses a claim can have (``results["claims"][i]["status"]``)."""


def _interval(estimate: float, lo: float, hi: float, n: int, level: float, method: str) -> dict[str, Any]:
    return {"estimate": float(estimate), "ci_low": float(lo), "ci_high": float(hi), "n": int(n),
            "level": float(level), "method": method}


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is not valid; use a confidence level in (0, 1), e.g. 0.95.")


def bootstrap_ci(statistic: Callable[..., float], *samples: Sequence[float], n_resamples: int = 2000,
                 level: float = 0.95, seed: int = 0, vectorized: bool = False) -> dict[str, Any]:
    """Percentile bootstrap interval of ``statistic(*samples)``, resampling rows jointly (paired).

    Args:
        statistic: function of as many 1-D arrays as ``samples``, returning a float (with
            ``vectorized=True``: of ``(..., n)`` arrays with an ``axis`` keyword, as SciPy passes them).
        samples: equal-length 1-D sequences (one row per unit: a merge, a pair of tasks, a seed).
        n_resamples: bootstrap resamples.
        level: confidence level.
        seed: seeds the resampling (same seed, same interval).

    Returns:
        ``{"estimate", "ci_low", "ci_high", "n", "level", "method"}``; the bounds are NaN when fewer
        than 3 rows or when the statistic is undefined on the data (e.g. a constant column).
    """
    _check_level(level)
    arrays = [np.asarray(s, dtype=float) for s in samples]
    if not arrays or any(a.ndim != 1 for a in arrays) or len({len(a) for a in arrays}) != 1:
        raise ValueError("samples must be one or more 1-D sequences of equal length (one row per unit).")
    n = len(arrays[0])
    estimate = (float(statistic(*arrays, axis=-1) if vectorized else statistic(*arrays)) if n else float("nan"))
    if n < 3 or not np.isfinite(estimate):
        return _interval(estimate, float("nan"), float("nan"), n, level, "bootstrap (percentile)")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # NaN bounds say it
        res = stats.bootstrap(tuple(arrays), statistic, paired=True, vectorized=vectorized, n_resamples=n_resamples,
                              confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    replicates = np.asarray(res.bootstrap_distribution, dtype=float).ravel()
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size and np.isfinite(lo) and np.isfinite(hi):  # percentiles interpolate: keep them in the
        lo, hi = max(lo, replicates.min()), min(hi, replicates.max())  # replicates' range, not one rounding past it
    return _interval(estimate, lo, hi, n, level, "bootstrap (percentile)")


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along ``axis`` (Pearson correlation of average ranks); NaN for a constant row."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis) / np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))


def _labels(groups: Sequence[Any], n: int, unit: str) -> np.ndarray:
    """``groups`` as an object array, checked to give one label per ``unit`` (``n`` of them)."""
    g = np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise ValueError(f"groups must give one label per {unit}; got {g.shape[0] if g.ndim else 0} labels for "
                         f"{n} {unit}s.")
    return g


def _members(groups: np.ndarray, keep: np.ndarray) -> dict[Any, np.ndarray]:
    """Indices of the rows ``keep`` in each group, the groups in order of first appearance."""
    return {label: np.flatnonzero(keep & (groups == label)) for label in dict.fromkeys(groups[keep].tolist())}


def spearman_ci(x: Sequence[float], y: Sequence[float], n_resamples: int = 2000, level: float = 0.95,
                seed: int = 0, groups: Sequence[Any] | None = None, min_groups: int = 5) -> dict[str, Any]:
    """Spearman's rank correlation of paired values with a bootstrap interval (rows resampled jointly);
    rows with a non-finite value are left out first. See :func:`bootstrap_ci` for the fields.

    ``groups``: one label per row, for rows that are not independent (merges that share experts): whole
    groups are resampled with replacement, their rows together (a cluster bootstrap), and the result gains
    ``groups``, their number. The bounds are NaN with fewer than ``min_groups`` groups: so few give a handful
    of distinct resamples (three with two groups), whose percentiles are no interval to trust (with one group,
    nothing is known of how the correlation varies between independent replications);
    :func:`spearman_by_group_ci` serves a few groups."""
    x_, y_ = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_.shape != y_.shape or x_.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length; got shapes {x_.shape} and {y_.shape}.")
    ok = np.isfinite(x_) & np.isfinite(y_)
    if groups is None:
        out = bootstrap_ci(_spearman, x_[ok], y_[ok], n_resamples=n_resamples, level=level, seed=seed,
                           vectorized=True)
        out["method"] = "Spearman, bootstrap (percentile)"
        return out
    g = _labels(groups, len(x_), "row")
    check_integer("min_groups", min_groups, minimum=2)
    return _cluster_spearman(x_, y_, ok, list(_members(g, ok).values()), n_resamples, level, seed, min_groups)


def _cluster_spearman(x: np.ndarray, y: np.ndarray, keep: np.ndarray, members: list[np.ndarray], n_resamples: int,
                      level: float, seed: int, min_groups: int) -> dict[str, Any]:
    """:func:`spearman_ci` with a cluster bootstrap: ``keep`` the finite rows, ``members`` each group's indices
    among them."""
    _check_level(level)
    method = "Spearman, cluster bootstrap over groups (percentile)"
    n = int(keep.sum())
    estimate = float(_spearman(x[keep], y[keep])) if n else float("nan")
    if len(members) < min_groups or n < 3 or not np.isfinite(estimate):
        return {**_interval(estimate, float("nan"), float("nan"), n, level, method), "groups": len(members)}
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, ...], float] = {}  # a resample is the multiset of groups drawn: few when groups are few
    replicates = np.empty(n_resamples)
    for b in range(n_resamples):
        drawn = tuple(sorted(rng.integers(len(members), size=len(members)).tolist()))
        if drawn not in seen:
            rows = np.concatenate([members[i] for i in drawn])
            seen[drawn] = float(_spearman(x[rows], y[rows]))
        replicates[b] = seen[drawn]
    replicates = replicates[np.isfinite(replicates)]
    if not replicates.size:
        return {**_interval(estimate, float("nan"), float("nan"), n, level, method), "groups": len(members)}
    lo, hi = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return {**_interval(estimate, lo, hi, n, level, method), "groups": len(members)}


def spearman_by_group_ci(x: Sequence[float], y: Sequence[float], groups: Sequence[Any],
                         level: float = 0.95) -> dict[str, Any]:
    """Spearman's rank correlation within each group, averaged over the groups, with Student's t interval over
    them: for rows in a few independent groups (a chapter's fine-tuning seeds) that are not independent within a
    group (merges sharing experts), where a bootstrap over rows is too narrow and one over so few groups is too.

    Each group's rho comes from 3 or more finite rows, neither column constant. The rhos are averaged as they
    are (not on Fisher's z, where a group of a few rows at rho = +-1, which happens by chance, would outweigh
    every other), and the interval is :func:`mean_ci`'s over them, cut to [-1, 1]. Fields as
    :func:`bootstrap_ci`'s (``n``: the rows), plus ``groups`` (the groups with a rho) and ``per_group``
    (label -> rho). With one group the estimate is its rho and the bounds are NaN; with none, all NaN."""
    _check_level(level)
    x_, y_ = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    g = np.asarray(groups, dtype=object)
    if x_.shape != y_.shape or x_.ndim != 1 or g.shape != x_.shape:
        raise ValueError(f"x, y and groups must be 1-D of the same length; got shapes {x_.shape}, {y_.shape} and "
                         f"{g.shape}.")
    ok = np.isfinite(x_) & np.isfinite(y_)
    per_group = {label: float(_spearman(x_[rows], y_[rows])) for label, rows in _members(g, ok).items()
                 if len(rows) >= 3 and np.ptp(x_[rows]) > 0 and np.ptp(y_[rows]) > 0}
    ci = mean_ci(list(per_group.values()), level)
    lo, hi = np.clip([ci["ci_low"], ci["ci_high"]], -1.0, 1.0)  # NaN stays NaN
    out = _interval(ci["estimate"], lo, hi, int(ok.sum()), level, "Spearman per group, mean with t over groups")
    return {**out, "groups": len(per_group), "per_group": per_group}


def mean_ci(values: Sequence[float], level: float = 0.95, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Mean of a few values (e.g. paired per-seed differences) with Student's t interval.

    With one value the bounds are NaN (no spread is known). See :func:`bootstrap_ci` for the fields.

    ``groups``: one label per value, for values that are not independent (differences measured on merges that
    share experts): each group's values are averaged first, and the mean and interval are over the groups,
    the independent units; ``n`` is then their number, and ``rows`` the number of finite values."""
    _check_level(level)
    v = np.asarray(values, dtype=float)
    if groups is not None:
        ok = np.isfinite(v)
        means = [float(v[rows].mean()) for rows in _members(_labels(groups, v.size, "value"), ok).values()]
        return {**mean_ci(means, level), "rows": int(ok.sum())}
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return _interval(float("nan"), float("nan"), float("nan"), 0, level, "t")
    m = float(v.mean())
    if n < 2:
        return _interval(m, float("nan"), float("nan"), n, level, "t")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return _interval(m, m - half, m + half, n, level, "t")


def accuracy_difference_ci(accuracy_a: Mapping[str, float], accuracy_b: Mapping[str, float],
                           n_examples: Mapping[str, int] | int, level: float = 0.95) -> dict[str, Any]:
    """Difference of two models' mean per-task accuracies on the same test sets, with the normal
    interval of its sampling error (binomial per task, the models treated as independent: a
    conservative bound for paired predictions). Seed-to-seed variation is not included.

    Args:
        accuracy_a, accuracy_b: task to accuracy (fraction 0..1), same tasks.
        n_examples: test examples per task (one number for all).
    """
    if set(accuracy_a) != set(accuracy_b) or not accuracy_a:
        raise ValueError(f"accuracy_a and accuracy_b must cover the same tasks; got {sorted(accuracy_a)} and "
                         f"{sorted(accuracy_b)}.")
    out = normalized_difference_ci(accuracy_a, accuracy_b, {t: 1.0 for t in accuracy_a}, n_examples, level)
    return {**out, "method": "normal (binomial per task)"}  # normalized by experts at 1: the plain difference


def normalized_difference_ci(accuracy_a: Mapping[str, float], accuracy_b: Mapping[str, float] | None,
                             expert_accuracy: Mapping[str, float], n_examples: Mapping[str, int] | int,
                             level: float = 0.95) -> dict[str, Any]:
    """Normalized accuracy ``mean_t a_t / e_t`` of model a (``accuracy_b=None``), or the difference of two
    models' normalized accuracies ``mean_t (a_t - b_t) / e_t``, with the normal interval of the test sets'
    sampling error: binomial per task, the models treated as independent (conservative for paired
    predictions), the experts' accuracies ``e_t`` taken as fixed. Seed-to-seed variation is not included.
    The bounds are NaN when an expert's accuracy is 0 (normalized accuracy is undefined there).

    Args:
        accuracy_a, accuracy_b: task to accuracy (fraction 0..1), same tasks as ``expert_accuracy``.
        expert_accuracy: task to the expert's accuracy on the same split.
        n_examples: examples per task (one number for all).
    """
    _check_level(level)
    tasks = sorted(accuracy_a)
    if not tasks or not set(tasks) <= set(expert_accuracy) or (accuracy_b is not None and set(accuracy_b) != set(tasks)):
        raise ValueError(f"accuracy_a, accuracy_b and expert_accuracy must cover the same tasks; got {tasks}, "
                         f"{None if accuracy_b is None else sorted(accuracy_b)} and {sorted(expert_accuracy)}.")
    if not isinstance(n_examples, (int, np.integer, Mapping)) or isinstance(n_examples, bool) or (
            isinstance(n_examples, Mapping) and not set(tasks) <= set(n_examples)):
        raise ValueError(f"n_examples={n_examples!r} is not valid; give one integer for every task, or a dict with "
                         f"a count for each of {tasks}.")
    n = {t: int(n_examples if isinstance(n_examples, (int, np.integer)) else n_examples[t]) for t in tasks}
    if any(v < 1 for v in n.values()):
        raise ValueError(f"n_examples={n_examples!r} is not valid; every task needs at least one example.")
    b = {t: 0.0 for t in tasks} if accuracy_b is None else accuracy_b
    method = "normal (binomial per task, experts fixed)"
    if any(not expert_accuracy[t] > 0 for t in tasks):
        return _interval(float("nan"), float("nan"), float("nan"), sum(n.values()), level, method)
    estimate = float(np.mean([(accuracy_a[t] - b[t]) / expert_accuracy[t] for t in tasks]))
    variance = sum((accuracy_a[t] * (1 - accuracy_a[t]) + b[t] * (1 - b[t])) / n[t] / expert_accuracy[t] ** 2
                   for t in tasks) / len(tasks) ** 2
    half = float(stats.norm.ppf(0.5 + level / 2) * np.sqrt(variance))
    return _interval(estimate, estimate - half, estimate + half, sum(n.values()), level, method)


PAIRED_CELLS = ("both", "a_only", "b_only", "neither")
"""The cells of :func:`paired_table`: which of two models gets an example right."""


def paired_table(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict[str, int]:
    """How two models' predictions on the same examples agree: the number of examples both get right,
    only ``a``, only ``b``, and neither (:data:`PAIRED_CELLS`).

    Args:
        correct_a, correct_b: ``(n,)`` booleans, whether each model is right on each example (same order).
    """
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0 or a.dtype != bool or b.dtype != bool:
        raise ValueError(f"correct_a and correct_b must be non-empty 1-D boolean arrays of one length; got shapes "
                         f"{a.shape} ({a.dtype}) and {b.shape} ({b.dtype}).")
    return {"both": int((a & b).sum()), "a_only": int((a & ~b).sum()), "b_only": int((~a & b).sum()),
            "neither": int((~a & ~b).sum())}


def paired_normalized_ci(tables: Mapping[str, Mapping[str, int]], level: float = 0.95) -> dict[str, Any]:
    """Normalized accuracy ``mean_t a_t / e_t`` of a model ``a`` against the experts ``e`` on the same test
    examples, from one :func:`paired_table` per task (``a`` the model, ``b`` the task's expert), with the
    normal interval of the test sets' sampling error *for paired predictions*.

    Per task the ratio's variance is the delta method's, ``Var_i(a_i - r_t e_i) / (n_t * mean(e)^2)`` over
    the task's examples (``r_t = a_t / e_t``; ddof 1): an example both models get wrong adds nothing, one
    both get right adds ``(1 - r_t)^2`` (nothing at ``r_t = 1``), and the disagreements carry the rest. When
    the two mostly agree this is narrower than :func:`normalized_difference_ci`, which holds the experts
    fixed and reads the model's accuracy as a lone binomial. Tasks are independent test sets; seed-to-seed
    variation is not included. The estimate and bounds are NaN when an expert's accuracy is 0 or a task
    has a single example.
    """
    _check_level(level)
    if not tables:
        raise ValueError("tables is empty; give one paired_table per task.")
    ratios, variances, total = [], [], 0
    for task, table in sorted(tables.items()):  # in task order: the same figures whatever order a file lists them
        if set(table) != set(PAIRED_CELLS) or any(int(table[c]) != table[c] or table[c] < 0 for c in PAIRED_CELLS):
            raise ValueError(f"tables[{task!r}]={dict(table)!r} is not valid; use a paired_table: non-negative "
                             f"counts for exactly {', '.join(PAIRED_CELLS)}.")
        both, a_only, b_only = (int(table[c]) for c in PAIRED_CELLS[:3])
        n = sum(int(table[c]) for c in PAIRED_CELLS)
        if n == 0:
            raise ValueError(f"tables[{task!r}]={dict(table)!r} counts no examples; give each task's test set.")
        total += n
        a, e = (both + a_only) / n, (both + b_only) / n
        if e == 0 or n < 2:
            ratios.append(float("nan")), variances.append(float("nan"))
            continue
        r = a / e  # the per-example values a_i - r e_i: 1 - r (both), 1 (a only), -r (b only), 0; mean 0
        ratios.append(r)
        variances.append((both * (1 - r) ** 2 + a_only + b_only * r * r) / (n - 1) / (n * e * e))
    method = "normal (paired, delta method per task, experts' test sets)"
    estimate = float(np.mean(ratios))
    if not np.isfinite(estimate) or not np.isfinite(variances).all():
        return _interval(estimate, float("nan"), float("nan"), total, level, method)
    half = float(stats.norm.ppf(0.5 + level / 2) * np.sqrt(sum(variances)) / len(ratios))
    return _interval(estimate, estimate - half, estimate + half, total, level, method)


def proportion_ci(successes: int, n: int, level: float = 0.95) -> dict[str, Any]:
    """A proportion ``successes / n`` (e.g. inputs routed to their task) with Wilson's score interval."""
    _check_level(level)
    if isinstance(n, bool) or int(n) != n or n < 1 or not 0 <= successes <= n or int(successes) != successes:
        raise ValueError(f"successes={successes!r} of n={n!r} is not valid; use integers 0 <= successes <= n, n >= 1.")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return _interval(successes / n, ci.low, ci.high, int(n), level, "Wilson score")


def mean_gap_ci(train: Mapping[str, Sequence[float]], test: Mapping[str, Sequence[float]],
                level: float = 0.95) -> dict[str, Any]:
    """A generalization gap with the normal interval of its sampling error, from per-example values.

    The gap is the unweighted mean over tasks of ``mean(test[t]) - mean(train[t])``; the train and
    test examples of a task are independent samples, so its variance is
    ``sum_t (var(test[t]) / n_test + var(train[t]) / n_train) / T**2`` (``ddof=1``). Pass
    per-example losses (nats) for the raw gap, or losses minus ``c`` times a reference model's
    (a control variate) for the controlled gap; the interval then treats ``c`` as known.

    Args:
        train, test: task to the per-example values of its training and test examples (each at
            least 2), the same tasks in both.
    """
    _check_level(level)
    if set(train) != set(test) or not train:
        raise ValueError(f"train and test must cover the same tasks; got {sorted(train)} and {sorted(test)}.")
    tasks = sorted(train)
    tr = {t: np.asarray(train[t], dtype=float) for t in tasks}
    te = {t: np.asarray(test[t], dtype=float) for t in tasks}
    short = [t for t in tasks if len(tr[t]) < 2 or len(te[t]) < 2]
    if short:
        raise ValueError(f"task {short[0]!r} has fewer than 2 train or test values; a variance needs at least 2.")
    gap = float(np.mean([te[t].mean() - tr[t].mean() for t in tasks]))
    var = sum(te[t].var(ddof=1) / len(te[t]) + tr[t].var(ddof=1) / len(tr[t]) for t in tasks) / len(tasks) ** 2
    half = float(stats.norm.ppf(0.5 + level / 2) * np.sqrt(var))
    n = sum(len(tr[t]) + len(te[t]) for t in tasks)
    return _interval(gap, gap - half, gap + half, n, level, "normal (per-example variances)")


def sample_sd(values: Sequence[float] | np.ndarray) -> float:
    """Standard deviation (ddof 1) of ``values``; 0 for a single value."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def seed_status(values: Sequence[float] | np.ndarray, margin: float = 0.0) -> str:
    """The status of "the ``values`` exceed ``margin``", one value per independent draw (fine-tuning seed,
    subset of items, ...): ``reproduced`` when their mean is above it by more than twice their standard
    deviation over draws (ddof 1), ``not_reproduced`` when below by more than that, else ``not_testable``;
    with one value, the value alone decides (no spread to weigh)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"values={v.tolist()!r} is not valid; use one finite value per draw (at least one).")
    gap, spread = float(v.mean()) - margin, 2 * sample_sd(v)
    if gap > spread or (v.size == 1 and gap > 0):
        return "reproduced"
    if gap < -spread or (v.size == 1 and gap <= 0):
        return "not_reproduced"
    return "not_testable"


def both(*statuses: str) -> str:
    """The status of a claim that needs every part: ``not_reproduced`` if any part is, ``reproduced`` if all
    are, else ``not_testable``."""
    if "not_reproduced" in statuses:
        return "not_reproduced"
    return "reproduced" if all(s == "reproduced" for s in statuses) else "not_testable"


def directional_status(interval: Mapping[str, Any], predicted: str = "positive", margin: float = 0.0) -> str:
    """The status of a claim that a quantity is above ``margin`` (``predicted="positive"``) or below
    ``-margin`` (``"negative"``), from its confidence interval:

    * ``reproduced``: the whole interval lies beyond the margin, on the predicted side;
    * ``not_reproduced``: the whole interval lies short of the margin (the data contradict the claim as stated:
      with ``margin=0``, the whole interval on the other side of 0; with a margin, an effect of the predicted sign
      but surely smaller than claimed counts as contradicting it too);
    * ``not_testable``: otherwise (the interval straddles the margin, or is undefined: too wide to decide at this
      size).
    """
    if predicted not in ("positive", "negative"):
        raise ValueError(f"predicted={predicted!r} is not valid; use 'positive' or 'negative'.")
    lo, hi = float(interval["ci_low"]), float(interval["ci_high"])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not_testable"
    if predicted == "negative":
        lo, hi = -hi, -lo
    if lo > margin:
        return "reproduced"
    if hi < margin:
        return "not_reproduced"
    return "not_testable"


def band_status(interval: Mapping[str, Any], low: float, high: float) -> str:
    """The status of a claim that a quantity lies in ``[low, high]`` (e.g. a slope of 1 within a
    stated tolerance), from its confidence interval: ``reproduced`` when the whole interval lies inside
    the band, ``not_reproduced`` when it lies wholly outside, ``not_testable`` otherwise (too wide, or
    undefined)."""
    if not low <= high:
        raise ValueError(f"low={low!r} and high={high!r} are not valid; the band needs low <= high.")
    lo, hi = float(interval["ci_low"]), float(interval["ci_high"])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not_testable"
    if low <= lo and hi <= high:
        return "reproduced"
    if hi < low or lo > high:
        return "not_reproduced"
    return "not_testable"


def decimals_for(half_width: float) -> int:
    """Decimal places that a value with this interval half-width supports: two significant digits
    of the half-width (e.g. 0.034 -> 3 places, 2.6 -> 1, 140 -> 0); 3 when the width is unknown."""
    if not np.isfinite(half_width) or half_width <= 0:
        return 3
    return int(max(0, 1 - np.floor(np.log10(half_width))))


def format_ci(interval: Mapping[str, Any], scale: float = 1.0, unit: str = "", signed: bool = True) -> str:
    """``"estimate [low, high]unit"`` with the values times ``scale`` (e.g. 100 for points), each
    rounded by :func:`decimals_for` of the interval's half-width, with their signs (a difference) or,
    ``signed=False``, without (a level such as an accuracy); ``"estimate (no interval)unit"`` when the
    bounds are undefined."""
    est, lo, hi = (float(interval[k]) * scale for k in ("estimate", "ci_low", "ci_high"))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{est:.3g} (no interval){unit}"
    d, sign = decimals_for((hi - lo) / 2), "+" if signed else ""
    return f"{est:{sign}.{d}f} [{lo:{sign}.{d}f}, {hi:{sign}.{d}f}]{unit}"


def claim(text: str, source: str, status: str, evidence: Mapping[str, Any]) -> dict[str, Any]:
    """One row of a chapter's ``claims`` list, checked: ``{claim, source, status, evidence}``."""
    if status not in STATUSES:
        raise ValueError(f"status={status!r} is not valid; use one of {', '.join(STATUSES)}.")
    if not text or not source:
        raise ValueError("a claim needs its text and its source (a key of reports/references.bib).")
    return {"claim": text, "source": source, "status": status, "evidence": dict(evidence)}


def claims_table(claims: Sequence[Mapping[str, Any]]) -> Any:
    """The claims as a table for the notebook: claim, source, status (evidence left to the JSON), one row per
    claim, as a pandas ``Styler`` that shows every claim in full and left-aligned. (A ``DataFrame``'s display
    cuts text at ``display.max_colwidth``, 50 characters, and claims that differ only in their ends would read
    alike.) Its ``.data`` is the ``DataFrame``."""
    import pandas as pd

    table = pd.DataFrame([{"claim": c["claim"], "source": c["source"], "status": c["status"]} for c in claims])
    return (table.style.hide(axis="index").set_properties(**{"text-align": "left", "white-space": "normal"})
            .set_table_styles([{"selector": "th", "props": [("text-align", "left")]}]))
