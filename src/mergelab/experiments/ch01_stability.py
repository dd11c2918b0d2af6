"""Chapter 01 (the stability bound): expert grids, merge plans, the merge experiment, correlations
and the tables behind the chapter's figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..merging import merge, seeded
from ..task_vectors import TaskVector
from ..training.sweep import checkpoint_log, checkpoint_state, config_grid, one_at_a_time, row_config
from ..analysis.generalization import measure_merge
from ..analysis.stability import (
    REGIMES,
    Curvature,
    ExpertHyperparameters,
    StabilityTerms,
    averaged_stability,
    expert_stability,
    generalization_bound,
    gradient_norm_schedule,
)
from ..analysis.statistics import spearman_by_group_ci
from .ch01_curvature import (  # noqa: F401 (estimate_curvature: the chapter's API, chapter 02 reads it from here)
    RecipeCurvature, curvature_of, estimate_curvature)
from ..training import FinetuneConfig
from ..utils import StateDict, shows_progress


# ----------------------------------------------------------------------------- constants of a sweep
def expert_terms(bench: Any, task: str, cfg: FinetuneConfig, curvature: Curvature, regime: str = "quadratic",
                 statistic: str = "mean") -> StabilityTerms:
    """:func:`expert_stability` of a cached sweep checkpoint, with ``G_t`` interpolated from the
    gradient-norm probes in its log (``statistic``: ``"mean"`` or ``"max"`` per-example norm)."""

    if statistic not in ("mean", "max"):
        raise ValueError(f"statistic={statistic!r} is not valid; use 'mean' or 'max'.")
    log = checkpoint_log(bench, task, cfg)
    probe = log.get("gradient_norm_probe") or {}
    if not probe.get("steps"):
        raise ValueError(f"the checkpoint of task={task!r}, cfg={cfg} has no gradient-norm probes; "
                         "run sweep(..., probe_size=8) to record them.")
    G = gradient_norm_schedule(probe["steps"], probe[statistic], cfg.num_steps)
    hp = ExpertHyperparameters.from_config(cfg, len(bench.split(task, "train")[1]),
                                           batch_gradient_norms=log.get("batch_gradient_norm") or None)
    return expert_stability(hp, G, curvature, regime)


# ----------------------------------------------------------------------------- the merge experiment
HYPERPARAMETERS = ("lr", "batch_size", "data_fraction", "num_steps")
"""The fine-tuning hyperparameters whose effect on ``x_avg`` the experiment measures."""


@dataclass(frozen=True)
class ExpertGrid:
    """The grid of experts: a centre recipe and levels of each hyperparameter around it.

    Attributes:
        base: the centre recipe; its ``num_steps`` is the centre step count.
        levels: hyperparameter (one of :data:`HYPERPARAMETERS`) -> levels, each including the centre
            value. Levels whose mean is the centre (e.g. arithmetic) let heterogeneous merges be
            compared with homogeneous ones at equal average hyperparameters.
        checkpoints: step counts checkpointed from every run (``num_steps`` levels are added).
        seeds: fine-tuning seeds; merge draw ``d`` uses ``seeds[d % len(seeds)]``.
        factorial: every combination of lr x batch size x data fraction; else one at a time.
    """

    base: FinetuneConfig
    levels: Mapping[str, tuple[Any, ...]]
    checkpoints: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    factorial: bool = False

    def __post_init__(self) -> None:
        for name, values in self.levels.items():
            if name not in HYPERPARAMETERS:
                raise ValueError(f"levels has {name!r}; valid hyperparameters: {', '.join(HYPERPARAMETERS)}.")
            if self.centre(name) not in values:
                raise ValueError(f"levels[{name!r}]={list(values)} must include the centre value "
                                 f"{self.centre(name)!r} (from base).")
        if not self.seeds:
            raise ValueError("seeds is empty; pass at least one fine-tuning seed.")

    def centre(self, name: str) -> Any:
        return getattr(self.base, name)

    @property
    def steps(self) -> tuple[int, ...]:
        """Every checkpointed step count."""
        return tuple(sorted(set(self.checkpoints) | set(self.levels.get("num_steps", ())) | {self.base.num_steps}))

    def recipes(self, seed: int | None = None) -> list[FinetuneConfig]:
        """Configurations at the centre step count (lr x batch x fraction, factorial or one at a time)."""
        base = self.base if seed is None else replace(self.base, seed=seed)
        axes = {k: v for k, v in self.levels.items() if k != "num_steps"}
        if self.factorial:

            return config_grid(base, **axes)

        return one_at_a_time(base, **axes)

    def at(self, step: int, seed: int | None = None) -> FinetuneConfig:
        """The centre recipe's checkpoint at ``step`` (``seed``: default the base's)."""
        return replace(self.base, num_steps=step, **({} if seed is None else {"seed": seed}))

    def configs(self) -> list[FinetuneConfig]:
        """Every recipe for every seed, with ``num_steps`` = the last checkpoint (for :func:`sweep`)."""
        top = max(self.steps)
        return [replace(c, num_steps=top) for s in self.seeds for c in self.recipes(s)]

    def varied(self, cfg: FinetuneConfig) -> tuple[str, ...]:
        """The hyperparameters in which ``cfg`` differs from the centre."""
        return tuple(h for h in HYPERPARAMETERS if getattr(cfg, h) != self.centre(h))


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the experiment.

    Attributes:
        draw: index of the random task subset.
        experts: ``(task, config)`` per merged expert (``config.num_steps`` = its checkpoint).
        kind: ``"homogeneous"`` (one recipe for all) or ``"heterogeneous"`` (one hyperparameter's levels
            spread over the tasks, the others at the centre).
        varied: for homogeneous merges, the hyperparameters off the centre (``()`` at the centre); for
            heterogeneous ones, the spread hyperparameter.
        method: merge method (``"weight_averaging"``, ``"ties"``, ``"dare"``...).
        options: the method's options as sorted ``(name, value)`` pairs.
    """

    draw: int
    experts: tuple[tuple[str, FinetuneConfig], ...]
    kind: str
    varied: tuple[str, ...]
    method: str = "weight_averaging"
    options: tuple[tuple[str, Any], ...] = ()


def _spreads(merge_size: int, levels: Sequence[Any]) -> bool:
    """Whether a hyperparameter's ``levels`` spread evenly over ``merge_size`` tasks (a heterogeneous merge)."""
    return merge_size % len(levels) == 0


def _check_size(tasks: Sequence[str], merge_size: int) -> None:
    if not 1 <= merge_size <= len(tasks):
        raise ValueError(f"merge_size={merge_size!r} is not valid; use 1..{len(tasks)} (the tasks available).")


def check_merge_size(grid: ExpertGrid, tasks: Sequence[str], merge_size: int) -> None:
    """Refuse a ``merge_size`` for which :func:`plan_merges` makes no heterogeneous merge (no hyperparameter's
    number of levels divides it), which the chapter compares with the homogeneous ones, before the sweep trains;
    the error names the sizes that would do."""
    _check_size(tasks, merge_size)
    counts = {h: len(levels) for h, levels in grid.levels.items()}
    if counts and not any(_spreads(merge_size, levels) for levels in grid.levels.values()):
        valid = sorted({k * n for n in counts.values() for k in range(1, len(tasks) // n + 1)})
        raise ValueError(f"merge_size={merge_size!r} is not valid: no hyperparameter's levels spread evenly over "
                         f"{merge_size} tasks ({', '.join(f'{h}: {n} levels' for h, n in counts.items())}), so there "
                         f"would be no heterogeneous merge; use a multiple of a number of levels, at most "
                         f"{len(tasks)}: {', '.join(map(str, valid)) or 'none with these tasks'}.")


def plan_merges(grid: ExpertGrid, tasks: Sequence[str], merge_size: int = 3, num_draws: int = 4, seed: int = 0,
                sparsify: Mapping[str, Mapping[str, Any]] | None = None) -> list[MergeSpec]:
    """The merges of the experiment, for ``num_draws`` random subsets of ``merge_size`` tasks.

    Per draw: a homogeneous merge for every recipe and checkpoint; a heterogeneous merge per
    hyperparameter whose levels can be spread evenly over the tasks (``merge_size`` a multiple of the
    number of levels), in a random order; and, for each method in ``sparsify`` (name -> options), the
    centre homogeneous and the heterogeneous merges again with that method.
    """
    _check_size(tasks, merge_size)
    if num_draws < 1:
        raise ValueError(f"num_draws={num_draws!r} is not valid; use a positive integer.")
    rng = np.random.default_rng(seed)
    specs: list[MergeSpec] = []
    for d in range(num_draws):
        chosen = sorted(rng.choice(list(tasks), size=merge_size, replace=False).tolist())
        run_seed = grid.seeds[d % len(grid.seeds)]
        centre = replace(grid.base, seed=run_seed)
        homo = []
        for cfg in grid.recipes(run_seed):
            for s in grid.steps:
                c = replace(cfg, num_steps=s)
                homo.append(MergeSpec(d, tuple((t, c) for t in chosen), "homogeneous", grid.varied(c)))
        hetero = []
        for h, levels in grid.levels.items():
            if not _spreads(merge_size, levels):
                continue
            order = np.tile(np.asarray(levels, dtype=object), merge_size // len(levels))[rng.permutation(merge_size)]
            experts = tuple((t, replace(centre, **{h: type(grid.centre(h))(v)})) for t, v in zip(chosen, order))
            hetero.append(MergeSpec(d, experts, "heterogeneous", (h,)))
        specs += homo + hetero
        base_specs = [s for s in homo if s.varied == ()] + hetero
        for method, options in (sparsify or {}).items():  # a method that draws at random draws with `seed`
            opts = tuple(sorted(seeded(method, options, seed).items()))
            specs += [replace(s, method=method, options=opts) for s in base_specs]
    return specs


class _StateCache:
    """Expert state dicts loaded on demand, the least recently used dropped beyond ``max_bytes``
    (tiny experts all fit; a grid of ViT-B-32 experts, 350 MB each, would not)."""

    def __init__(self, load: Any, max_bytes: float) -> None:
        self.load, self.max_bytes = load, max_bytes
        self.items: dict[Any, StateDict] = {}

    def __getitem__(self, key: Any) -> StateDict:
        if key in self.items:
            self.items[key] = self.items.pop(key)  # most recently used last
            return self.items[key]
        state = self.load(key)
        self.items[key] = state
        size = lambda st: sum(v.numel() * v.element_size() for v in st.values())  # noqa: E731
        while len(self.items) > 1 and sum(size(v) for v in self.items.values()) > self.max_bytes:
            self.items.pop(next(iter(self.items)))
        return state


def run_merges(bench: Any, specs: Sequence[MergeSpec], curvature: Curvature | RecipeCurvature,
               regimes: Sequence[str] = REGIMES, max_examples: int | None = 500, probe_size: int = 4,
               progress: bool = True, state_cache_gb: float = 8.0) -> "Any":
    """Merge, measure and bound every spec; one row per merge (a pandas DataFrame).

    Experts are the sweep's checkpoints (:func:`mergelab.training.sweep.checkpoint_state`), kept in memory up to
    ``state_cache_gb`` GiB between merges.

    Measured (:func:`measure_merge`): ``train_loss``, ``test_loss``, ``generalization_gap``,
    ``gap_vs_pretrained`` (the gap with the pretrained model on the same examples as a control
    variate, :func:`control_variate_gap`: a lower-variance estimate of the same expectation),
    ``train_accuracy``, ``test_accuracy``; ``generalization_gap_ci_low/high`` and
    ``gap_vs_pretrained_ci_low/high`` (95 % sampling intervals from the per-example losses,
    :func:`mergelab.analysis.statistics.mean_gap_ci`);
    ``lipschitz`` (mean ``L_k`` over ``probe_size`` seen and as many validation examples per task, see
    :func:`measure_merge`; simple averaging only). Predicted, for simple averaging
    only (the bound says nothing about sparsified merges): ``bound_<regime>`` and the averaged
    stability's ``sampling_<regime>`` and ``drift_<regime>`` (:func:`averaged_stability`), each expert with its
    recipe's curvature schedule when ``curvature`` is a :class:`RecipeCurvature`, else the one schedule given.
    """
    pre = bench.pretrained_state()
    reference_cache: dict = {}
    states = _StateCache(lambda key: checkpoint_state(bench, *key), max_bytes=state_cache_gb * 2**30)
    terms_cache: dict[tuple[str, FinetuneConfig, str], StabilityTerms] = {}
    rows = []
    for spec in tqdm(specs, desc="merges", disable=not progress, mininterval=1.0):
        tvs = []
        for task, cfg in spec.experts:
            tvs.append(TaskVector.from_states(pre, states[task, cfg]))
        merged = merge(spec.method, pre, tvs, **dict(spec.options))
        configs = dict(spec.experts)
        probe = probe_size if spec.method == "weight_averaging" else 0  # L_k enters the bound only
        m = measure_merge(bench, merged, configs, max_examples=max_examples, probe_size=probe,
                          seed=spec.draw, reference=pre, reference_cache=reference_cache)
        row: dict[str, Any] = {
            "draw": spec.draw, "tasks": "+".join(t for t, _ in spec.experts), "kind": spec.kind,
            "varied": "+".join(spec.varied) if spec.varied else "centre", "method": spec.method,
            **{f"mean_{h}": float(np.mean([getattr(c, h) for _, c in spec.experts])) for h in HYPERPARAMETERS},
            **{h: ",".join(str(getattr(c, h)) for _, c in spec.experts) for h in HYPERPARAMETERS},
            "seed": spec.experts[0][1].seed,
            **{k: m[k] for k in ("train_loss", "test_loss", "generalization_gap", "train_accuracy",
                                 "test_accuracy")},
            "gap_vs_pretrained": m["gap_vs_reference"],
            **_ci_columns(m),
            "lipschitz": float(np.mean(list(m["lipschitz"].values()))) if probe > 0 else float("nan"),
        }
        for regime in regimes:
            if spec.method != "weight_averaging" or probe_size == 0:
                row.update({f"bound_{regime}": float("nan"), f"sampling_{regime}": float("nan"),
                            f"drift_{regime}": float("nan")})
                continue
            terms = []
            for task, cfg in spec.experts:
                if (task, cfg, regime) not in terms_cache:
                    terms_cache[task, cfg, regime] = expert_terms(bench, task, cfg, curvature_of(curvature, cfg), regime)
                terms.append(terms_cache[task, cfg, regime])
            avg = averaged_stability(terms)
            row.update({f"bound_{regime}": generalization_bound(terms, [m["lipschitz"][t] for t, _ in spec.experts]),
                        f"sampling_{regime}": avg.sampling, f"drift_{regime}": avg.drift})
        rows.append(row)
    return pd.DataFrame(rows)


def _ci_columns(m: Mapping[str, Any]) -> dict[str, float]:
    """The sampling intervals of a :func:`measure_merge` result as flat columns (NaN when absent)."""
    out = {}
    for key, name in (("generalization_gap_ci", "generalization_gap"), ("gap_vs_reference_ci", "gap_vs_pretrained")):
        ci = m.get(key) or {}
        out[f"{name}_ci_low"] = float(ci.get("ci_low", float("nan")))
        out[f"{name}_ci_high"] = float(ci.get("ci_high", float("nan")))
    return out


def rank_correlations(df: Any, predicted: str, measured: str = "gap_vs_pretrained") -> dict[str, dict[str, float]]:
    """Spearman rank correlation between a predicted and a measured column of :func:`run_merges`' table,
    per fine-tuning seed (merges of one seed share experts; seeds do not), averaged over the seeds with a 95 %
    interval over them (:func:`mergelab.analysis.statistics.spearman_by_group_ci`; NaN bounds with one seed).

    Computed over every simple-averaging merge (``"overall"``), and per hyperparameter over the
    homogeneous merges that differ from the centre in that hyperparameter only (the centre included).
    Each entry: ``spearman`` with ``ci_low``, ``ci_high``, ``n`` (merges), ``seeds`` (those with a correlation),
    and ``spearman_within_draw`` with ``within_draw_ci_low``, ``within_draw_ci_high``, ``within_draw_seeds``: the
    same after subtracting each draw's centre merge from the measured value and from the log of the predicted
    one, so that differences between task subsets do not count. A seed with fewer than 3 merges or a constant
    column has no correlation; NaN when no seed has one.
    """
    if predicted not in df or measured not in df:
        raise ValueError(f"columns {predicted!r} and {measured!r} must be in the table; have: {', '.join(df.columns)}.")
    avg = df[(df["method"] == "weight_averaging") & np.isfinite(df[predicted].astype(float))].copy()
    centre = avg[(avg["kind"] == "homogeneous") & (avg["varied"] == "centre")].set_index("draw")
    with np.errstate(divide="ignore"):
        avg["_pred_w"] = np.log(avg[predicted].astype(float)) - np.log(avg["draw"].map(centre[predicted]).astype(float))
    avg["_meas_w"] = avg[measured] - avg["draw"].map(centre[measured])

    def corr(part: Any) -> dict[str, float]:
        g = part["seed"].to_numpy()
        r = spearman_by_group_ci(part[predicted].to_numpy(float), part[measured].to_numpy(float), g)
        rw = spearman_by_group_ci(part["_pred_w"].to_numpy(float), part["_meas_w"].to_numpy(float), g)
        return {"spearman": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": int(len(part)),
                "seeds": r["groups"], "spearman_within_draw": rw["estimate"], "within_draw_ci_low": rw["ci_low"],
                "within_draw_ci_high": rw["ci_high"], "within_draw_seeds": rw["groups"]}

    out = {"overall": corr(avg)}
    homo = avg[avg["kind"] == "homogeneous"]
    for h in HYPERPARAMETERS:
        out[h] = corr(homo[homo["varied"].isin(["centre", h])])
    return out


# ----------------------------------------------------------------------------- tables for the figures
def trajectory_table(bench: Any, table: Any) -> Any:
    """Gradient-norm probes along every run of a :func:`mergelab.training.sweep.sweep` table (long format).

    One row per run and probe: the run's ``task``, ``lr``, ``batch_size``, ``data_fraction``, ``seed``,
    the ``step``, ``gradient_norm_mean`` and ``gradient_norm_max`` (per-example, over the probe), and
    ``batch_gradient_norm`` (unclipped mini-batch norm at that step, mean of the 5 steps before it).
    """


    rows = []
    last = table.sort_values("step").groupby(["task", "lr", "batch_size", "data_fraction", "seed"]).tail(1)
    for _, r in last.iterrows():
        log = checkpoint_log(bench, r["task"], row_config(r))
        probe, norms = log.get("gradient_norm_probe") or {}, log.get("batch_gradient_norm") or []
        for i, step in enumerate(probe.get("steps", [])):
            window = norms[max(0, step - 5):step] if step > 0 else norms[:1]
            rows.append({"task": r["task"], "lr": r["lr"], "batch_size": r["batch_size"],
                         "data_fraction": r["data_fraction"], "seed": r["seed"], "step": step,
                         "gradient_norm_mean": probe["mean"][i], "gradient_norm_max": probe["max"][i],
                         "batch_gradient_norm": float(np.mean(window)) if window else float("nan")})
    return pd.DataFrame(rows)


def hyperparameter_effects(df: Any, grid: ExpertGrid, predicted: str) -> Any:
    """Homogeneous simple-averaging merges along each hyperparameter's slice (others at the centre).

    Long format: ``hyperparameter``, ``level``, ``draw``, ``generalization_gap``, ``test_accuracy``,
    ``predicted`` (the ``predicted`` column) and ``predicted_relative`` (divided by the same draw's
    centre merge, so that draws with different tasks are comparable).
    """

    homo = df[(df["kind"] == "homogeneous") & (df["method"] == "weight_averaging")]
    centre = homo[homo["varied"] == "centre"].set_index("draw")
    rows = []
    for h in grid.levels:
        part = homo[homo["varied"].isin(["centre", h])]
        for _, r in part.iterrows():
            rows.append({"hyperparameter": h, "level": r[f"mean_{h}"], "draw": r["draw"],
                         "generalization_gap": r["generalization_gap"], "gap_vs_pretrained": r["gap_vs_pretrained"],
                         "test_accuracy": r["test_accuracy"],
                         "train_loss": r["train_loss"], "predicted": r[predicted],
                         "predicted_relative": r[predicted] / centre.loc[r["draw"], predicted]})
    return pd.DataFrame(rows)


def heterogeneity_table(df: Any, predicted: str) -> Any:
    """Heterogeneous merges against the homogeneous centre merge of the same draw and method (equal
    average hyperparameters when the levels' mean is the centre).

    One row per draw, method and spread hyperparameter: ``seed`` (the draw's fine-tuning seed),
    ``gap_homogeneous``, ``gap_heterogeneous`` (both
    ``gap_vs_pretrained``),
    ``test_acc_homogeneous``, ``test_acc_heterogeneous``, ``predicted_homogeneous``,
    ``predicted_heterogeneous``.
    """

    rows = []
    for (draw, method), part in df.groupby(["draw", "method"]):
        homo = part[(part["kind"] == "homogeneous") & (part["varied"] == "centre")]
        if homo.empty:
            continue
        h0 = homo.iloc[0]
        for _, r in part[part["kind"] == "heterogeneous"].iterrows():
            rows.append({"draw": draw, "seed": h0["seed"], "method": method, "hyperparameter": r["varied"],
                         "gap_homogeneous": h0["gap_vs_pretrained"], "gap_heterogeneous": r["gap_vs_pretrained"],
                         "test_acc_homogeneous": h0["test_accuracy"], "test_acc_heterogeneous": r["test_accuracy"],
                         "predicted_homogeneous": h0[predicted], "predicted_heterogeneous": r[predicted]})
    return pd.DataFrame(rows)


def expert_table(bench: Any, grid: ExpertGrid, tasks: Sequence[str], hyperparameter: str = "lr",
                 max_examples: int | None = 500, seed: int | None = None,
                 curvature: Curvature | RecipeCurvature | None = None,
                 regime: str = "quadratic", probe_size: int = 4, progress: bool | None = None) -> Any:
    """Each expert measured on its own task (``K = 1``) along one hyperparameter's levels and every
    checkpoint: ``task``, ``level``, ``step``, ``train_loss``, ``test_loss``, ``generalization_gap``,
    ``gap_vs_pretrained`` with ``gap_vs_pretrained_ci_low/high`` (as in :func:`run_merges`),
    ``test_accuracy``; with a ``curvature``, also ``lipschitz`` (mean per-example gradient norm over
    ``probe_size`` seen and as many validation examples, :func:`measure_merge`) and ``bound`` (:func:`generalization_bound` of the one expert,
    ``K = 1``, in ``regime``). A progress bar over the experts when ``progress`` (``None``: the benchmark's
    setting)."""


    if hyperparameter not in grid.levels or hyperparameter == "num_steps":
        raise ValueError(f"hyperparameter={hyperparameter!r} is not valid; use one of "
                         f"{[h for h in grid.levels if h != 'num_steps']}.")
    base = grid.base if seed is None else replace(grid.base, seed=seed)
    pre, cache = bench.pretrained_state(), {}
    rows = []
    jobs = [(task, level, step) for task in tasks for level in grid.levels[hyperparameter] for step in grid.steps]
    for task, level, step in tqdm(jobs, desc=f"experts along {hyperparameter}", disable=not shows_progress(bench, progress)):
        cfg = replace(base, **{hyperparameter: level, "num_steps": step})
        probe = probe_size if curvature is not None else 0
        m = measure_merge(bench, checkpoint_state(bench, task, cfg), {task: cfg}, max_examples=max_examples,
                          reference=pre, reference_cache=cache, probe_size=probe)
        row = {"task": task, "level": level, "step": step,
               **{k: m[k] for k in ("train_loss", "test_loss", "generalization_gap", "test_accuracy")},
               "gap_vs_pretrained": m["gap_vs_reference"], **_ci_columns(m)}
        if curvature is not None:
            row["lipschitz"] = m["lipschitz"][task]
            row["bound"] = generalization_bound([expert_terms(bench, task, cfg, curvature_of(curvature, cfg), regime)],
                                                [m["lipschitz"][task]])
        rows.append(row)
    return pd.DataFrame(rows)
