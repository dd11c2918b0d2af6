"""Chapter 02 (task vectors as gradients): the one-step check, trajectory grids, merging along
epochs, and the chapter's summary text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..evaluation import merge_baselines, summarize
from ..executors import Executor
from ..merging import get_merge
from ..analysis.alignment import one_step_exactness
from ..autodiff import _full_precision, loss_and_gradient
from ..task_vectors import TaskVector, cosine
from ..training import FinetuneConfig, finetune
from ..training.trajectories import (
    EpochTrajectory,
    epoch_trajectories,
    gradient_descent_config,
    multitask_epoch_trajectory,
    training_subset,
    trajectory_config,
)
from ..utils import StateDict, size_threads

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def one_step_identity(bench: Any, tasks: Sequence[str], lr: float, data_fraction: float = 1.0,
                      dtype: str = "float32", seed: int = 0, batch_size: int = 500) -> dict[str, Any]:
    """Check ``tau_t = -lr * grad L_t(theta_0)`` after one full-batch gradient-descent step, and that
    task arithmetic with coefficient 1 is one multi-task step.

    Each task's expert takes one step of plain SGD (:func:`gradient_descent_config`) on the whole
    training subset of that task (``data_fraction`` of the split, the same rows for the expert, the
    gradient and the multi-task run) through :func:`mergelab.training.finetune` (in chunks of the
    benchmark's ``micro_batch_size`` when it has one, gradients accumulated); the gradient comes
    from :func:`loss_and_gradient`. On a GPU, TensorFloat-32 is switched off for the check. Then a multi-task run (the sum of the tasks' mean losses, one
    full batch of every task) takes one step, and ``theta_0 + sum_t tau_t`` is compared with it.
    Not cached: a step costs a few full passes.

    Args:
        dtype: ``"float32"`` or ``"float64"`` (model, data and head cast to it): the error scales
            with the precision.

    Returns:
        ``{"per_task": {task: one_step_exactness(...)}, "task_arithmetic": {"max_abs_error",
        "relative_error"} of theta_0 + sum tau_t against the multi-task step, "gradient_step":
        one_step_exactness of the multi-task step against -lr * sum_t g_t, "dtype", "lr",
        "n_train": {task: examples}}``.
    """
    import copy

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; use one of {', '.join(_DTYPES)}.")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; pass at least one task name.")
    dt = _DTYPES[dtype]
    pre = {k: v.to(dt) for k, v in bench.pretrained_state().items()}
    select = FinetuneConfig(data_fraction=data_fraction, seed=seed)
    data, heads = {}, {}
    for t in tasks:
        X, y = training_subset(*bench.split(t, "train"), select)
        data[t] = (X.to(dt), y)
        heads[t] = copy.deepcopy(bench.heads[t]).to(dt)
    n_max = max(len(y) for _, y in data.values())
    cfg = gradient_descent_config(lr, batch_size=n_max, seed=seed)  # full batch for every task

    options = {"micro_batch_size": bench.micro_batch_size} if getattr(bench, "micro_batch_size", None) else {}

    def one_step(subsets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> StateDict:
        enc = bench.new_encoder(pre).to(dt)
        finetune(enc, subsets, {t: heads[t] for t in subsets}, cfg, device=bench.device, progress=False, **options)
        return {k: v.detach().cpu() for k, v in enc.state_dict().items()}

    per_task, grads, taus = {}, {}, {}
    # on the size's training threads whoever calls: the rounding-level figures read alike in a lane and a notebook
    with _full_precision(), size_threads(bench):
        for t in tasks:
            state = one_step({t: data[t]})
            grads[t] = loss_and_gradient(bench.new_encoder().to(dt), heads[t], *data[t], state=pre,
                                         batch_size=batch_size, device=bench.device).gradient
            per_task[t] = one_step_exactness(pre, state, grads[t], lr)
            taus[t] = TaskVector({k: state[k] - pre[k] for k in grads[t].keys()})
        multitask = one_step(data)
    summed = sum(taus.values())
    diff = TaskVector({k: pre[k] + summed[k] - multitask[k] for k in summed.keys()})
    mt_tau = TaskVector({k: multitask[k] - pre[k] for k in summed.keys()})
    return {"dtype": dtype, "lr": lr, "n_train": {t: len(data[t][1]) for t in tasks}, "per_task": per_task,
            "task_arithmetic": {"max_abs_error": max(float(v.abs().max()) for v in diff.vector.values()),
                                "relative_error": diff.norm() / mt_tau.norm()},
            "gradient_step": one_step_exactness(pre, multitask, sum(grads.values()), lr)}


def nearest_learning_rates(learning_rates: Mapping[str, Sequence[float]], merge_learning_rates: Mapping[str, float]
                           ) -> dict[str, float]:
    """Per optimizer of ``merge_learning_rates``, the learning rate of the grid ``learning_rates`` (section 2's
    runs) nearest on a log scale to its merge learning rate: the runs whose layers the chapter compares with the
    merged trajectories. An optimizer without a grid, or a rate that is not positive, is named."""
    out: dict[str, float] = {}
    for opt, lr in merge_learning_rates.items():
        grid = learning_rates.get(opt)
        if not grid:
            raise ValueError(f"merge_learning_rates has {opt!r}, which learning_rates={dict(learning_rates)!r} does not "
                             f"run; add {opt!r} to learning_rates or use one of {', '.join(map(repr, learning_rates))}.")
        for name, value in ((f"merge_learning_rates[{opt!r}]", lr), *((f"learning_rates[{opt!r}]", v) for v in grid)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} is not valid; use a positive learning rate.")
        out[opt] = min(grid, key=lambda v: abs(np.log(v / lr)))
    return out


def trajectory_grid(bench: Any, tasks: Sequence[str], learning_rates: Mapping[str, Sequence[float]],
                    epochs: int, batch_size: int, data_fraction: float = 1.0, seed: int = 0,
                    weight_decay: float = 0.0, progress: bool | None = None, executor: Executor | None = None,
                    frozen: Sequence[str] = ()) -> dict[tuple[str, float, str], EpochTrajectory]:
    """Epoch trajectories for every optimizer, learning rate and task (each cached).

    Args:
        learning_rates: optimizer name (``"sgd"``, ``"adam"``, ``"adamw"``) to the learning rates to run.
        epochs, batch_size, data_fraction, seed, weight_decay, frozen: as in :func:`trajectory_config`.
        executor: where the missing runs train (:func:`mergelab.training.trajectories.epoch_trajectories`);
            ``None``: here, one after the other.

    Returns:
        ``{(optimizer, lr, task): EpochTrajectory}``.
    """
    runs = [(opt, float(lr), t) for opt, lrs in learning_rates.items() for lr in lrs for t in tasks]
    configs = [(t, trajectory_config(opt, lr, batch_size, data_fraction, seed, weight_decay, frozen=frozen))
               for opt, lr, t in runs]
    found = epoch_trajectories(bench, configs, epochs, executor=executor, progress=progress)
    return dict(zip(runs, found))


def merge_along_epochs(bench: Any, pretrained: StateDict, task_vectors: Mapping[Any, Mapping[str, TaskVector]],
                       methods: Sequence[str], expert_test_accuracy: Mapping[str, float],
                       expert_val_accuracy: Mapping[str, float], grid: Sequence[float] | None = None,
                       progress: bool = True) -> dict[str, dict[Any, dict]]:
    """Merge each set of task vectors with each method (coefficient chosen on validation).

    Args:
        task_vectors: a label (e.g. the number of epochs, or ``"converged"``) to ``{task: TaskVector}``.
        methods: registered merge methods.
        expert_test_accuracy: the denominators of normalized accuracy.
        expert_val_accuracy: the same on validation, for choosing coefficients by normalized accuracy.
        grid: coefficients to sweep (default: each method's own grid).

    Returns:
        ``{method: {label: {"absolute_accuracy", "normalized_accuracy", "per_task_accuracy",
        "coefficient", "validation_sweep"}}}`` with test accuracies.
    """

    options = ({m: {"grid": list(grid)} for m in methods if get_merge(m).coefficient_grid}
               if grid is not None else None)
    out: dict[str, dict[Any, dict]] = {m: {} for m in methods}
    for label, tvs in task_vectors.items():
        merged = merge_baselines(bench, pretrained, dict(tvs), methods, options=options, progress=progress,
                                 expert_val=expert_val_accuracy)
        for m, r in merged.items():
            out[m][label] = {**summarize(bench.evaluate(r.state, "test", list(tvs)), expert_test_accuracy),
                             "coefficient": r.coefficient, "at_grid_edge": r.at_grid_edge,
                             "validation_sweep": r.sweep}
    return out


def merging_by_epochs(bench: Any, pretrained: StateDict, trajectories: Mapping[tuple[str, float, str], EpochTrajectory],
                      merge_learning_rates: Mapping[str, float], methods: Sequence[str],
                      expert_test_accuracy: Mapping[str, float], expert_val_accuracy: Mapping[str, float],
                      grid: Sequence[float] | None = None, epochs: Sequence[int] | None = None,
                      progress: bool = True) -> dict[str, dict]:
    """Merge the experts after each epoch, and compare with multi-task training of the same budget.

    For every ``optimizer -> lr`` in ``merge_learning_rates``, the trajectories of that run (one per
    task) give task vectors after ``e`` epochs for each ``e`` in ``epochs`` (default ``1..E``), merged
    with each method (:func:`merge_along_epochs`). The multi-task reference is
    :func:`multitask_epoch_trajectory` with the same configuration, on the same rows: after ``e``
    epochs it has seen as many examples as the ``T`` experts together. Task arithmetic at
    coefficient 1, ``theta_0 + sum_t tau_t``, is also compared with it directly: for gradient
    descent the two agree to first order in the learning rate.

    Returns:
        ``{"merged": {optimizer: {method: {e: row}}}, "multitask": {optimizer: {e: row}},
        "experts": {optimizer: {e: row}}, "sum_vs_multitask": {optimizer: {e: comparison}}}``; rows as
        :func:`mergelab.evaluation.summarize` gives them (test accuracy; ``experts`` rows hold each
        expert's accuracy on its own task; ``multitask`` rows add ``num_steps``). A comparison holds
        ``relative_distance`` ``||sum_t tau_t - tau_MT|| / ||tau_MT||``, ``cosine`` of the two, and
        ``sum_accuracy`` (test accuracy of ``theta_0 + sum_t tau_t``).
    """

    out: dict[str, dict] = {"merged": {}, "multitask": {}, "experts": {}, "sum_vs_multitask": {}}
    for opt, lr in merge_learning_rates.items():
        runs = {t: traj for (o, r, t), traj in trajectories.items() if o == opt and r == float(lr)}
        if not runs:
            have = sorted({(o, r) for o, r, _ in trajectories})
            raise ValueError(f"merge_learning_rates[{opt!r}]={lr!r} has no trajectories; run one of {have}.")
        first = next(iter(runs.values()))
        chosen = list(epochs) if epochs is not None else list(range(1, first.epochs + 1))
        if not chosen:
            raise ValueError(f"epochs=[] is not valid; give epochs from 1..{first.epochs} to merge after (or leave "
                             "it unset: every epoch).")
        bad = [e for e in chosen if isinstance(e, bool) or not (isinstance(e, int) and 1 <= e <= first.epochs)]
        if bad:
            raise ValueError(f"epochs contains {bad[0]!r}; the trajectories have epochs 1..{first.epochs}.")
        tasks = list(runs)
        tvs = {e: {t: traj.task_vector(pretrained, e) for t, traj in runs.items()} for e in chosen}
        out["merged"][opt] = merge_along_epochs(bench, pretrained, tvs, methods, expert_test_accuracy,
                                                expert_val_accuracy, grid, progress)
        out["experts"][opt] = {e: summarize({t: bench.evaluate(traj.state(e), "test", [t])[t]
                                             for t, traj in runs.items()}, expert_test_accuracy) for e in chosen}
        mt = multitask_epoch_trajectory(bench, tasks, first.config, max(chosen), progress=progress)
        out["multitask"][opt], out["sum_vs_multitask"][opt] = {}, {}
        for e in chosen:
            out["multitask"][opt][e] = {**summarize(bench.evaluate(mt.state(e), "test", tasks), expert_test_accuracy),
                                        "num_steps": e * mt.steps_per_epoch}
            summed, tau_mt = sum(tvs[e].values()), mt.task_vector(pretrained, e)
            acc = bench.evaluate(summed.apply_to(pretrained), "test", tasks)
            out["sum_vs_multitask"][opt][e] = {"relative_distance": (summed - tau_mt).norm() / tau_mt.norm(),
                                               "cosine": cosine(summed, tau_mt),
                                               "sum_accuracy": sum(acc.values()) / len(acc)}
    return out


def summary_markdown(results: Mapping[str, Any], epochs: int) -> str:
    """The closing summary of the task-vectors-as-gradients notebook, from its results dict.

    Five numbered points mirroring the notebook's goals: one-step exactness, alignment over epochs,
    the second-order term with its regime and slopes (``taylor_regime``, ``taylor_slopes``), merging by
    number of epochs as gains over zero-shot (``gain_over_zero_shot``, ``merge_steps_per_epoch``), and
    the best- and worst-aligned layers.
    """

    one = results["one_step_exactness"]
    exact = []
    for dt, res in one.items():
        worst = max(r["relative_error"] for r in res["per_task"].values())
        eps = res["gradient_step"]["machine_epsilon"]
        exact.append(f"{dt}: worst relative error {worst:.1e} ({worst / eps:.0f} machine epsilons); "
                     f"task arithmetic against the multi-task step {res['task_arithmetic']['relative_error']:.1e}")
    points = ["1. **One full-batch step.** " + "; ".join(exact) + "."]

    cos = pd.DataFrame(results["per_epoch_cosines"])
    mean = cos.groupby(["optimizer", "lr", "epoch"])[["cosine", "norm_ratio", "first_epoch_share"]].mean()
    parts = []
    for opt in dict.fromkeys(cos.optimizer):
        lrs = sorted(set(cos[cos.optimizer == opt].lr))
        lo, hi = lrs[0], lrs[-1]

        def at(lr: float, e: int, col: str, opt: str = opt) -> float:
            return float(mean.loc[(opt, lr, e), col])

        parts.append(f"{opt}: cosine {at(lo, 1, 'cosine'):.2f} → {at(lo, epochs, 'cosine'):.2f} at lr {lo:g}, "
                     f"{at(hi, 1, 'cosine'):.2f} → {at(hi, epochs, 'cosine'):.2f} at lr {hi:g}; norm ratio "
                     f"{at(lo, 1, 'norm_ratio'):.2f} → {at(lo, epochs, 'norm_ratio'):.2f} at lr {lo:g}; first-epoch "
                     f"share after {epochs} epochs {at(lo, epochs, 'first_epoch_share'):.2f} (lr {lo:g}) and "
                     f"{at(hi, epochs, 'first_epoch_share'):.2f} (lr {hi:g}), against 1/{epochs} = {1 / epochs:.2f} "
                     "for epochs that contribute alike")
    points.append(f"2. **Beyond one step** (means over tasks, epoch 1 → {epochs}). " + "; ".join(parts) + ".")

    tay = pd.DataFrame(results["taylor_gap"])
    k = int(tay.steps.max())
    last = tay[tay.steps == k].groupby("lr")[["relative_gap", "relative_second_order", "relative_residual",
                                              "gap_cosine"]].mean()
    regime = pd.DataFrame(results["taylor_regime"]).groupby("lr")["eta_lambda_k"].median()
    rows = [f"lr {lr:g} ($\\eta\\lambda_{{\\max}}k$ = {regime.loc[lr]:.2g}): gap {r.relative_gap:.2%}, predicted "
            f"{r.relative_second_order:.2%} (cosine with the gap {r.gap_cosine:.2f}), residual {r.relative_residual:.2%}"
            for lr, r in last.iterrows()]
    slopes = results["taylor_slopes"]
    inside = slopes["in_regime"]

    def slope(iv: Mapping[str, Any]) -> str:
        return (f"{iv['estimate']:.2f} [{iv['ci_low']:.2f}, {iv['ci_high']:.2f}]" if np.isfinite(iv["ci_low"])
                else f"{iv['estimate']:.2f} (no interval)")

    regime_text = (f"inside the regime ($\\eta\\lambda_{{\\max}}k$ < {slopes['limit']:g}: lr "
                   + ", ".join(f"{v:g}" for v in inside["learning_rates"]) + f") the gap's slope is {slope(inside['gap'])} "
                   f"(predicted 1) and the residual's {slope(inside['residual'])} (predicted 2)"
                   if len(inside["learning_rates"]) >= 2 else
                   f"fewer than two learning rates lie inside the regime $\\eta\\lambda_{{\\max}}k$ < {slopes['limit']:g}, "
                   "so the predicted slopes cannot be tested here")
    points.append(f"3. **Second-order term** (full-batch GD, {k} steps, sizes relative to "
                  "$\\lVert\\eta k \\nabla L\\rVert$, means over tasks). " + "; ".join(rows) + ". Log-log slopes "
                  f"against lr (per task, 95 % t interval over tasks): {regime_text}; over all learning rates "
                  f"{slope(slopes['all']['gap'])} and {slope(slopes['all']['residual'])}.")

    merged, mt = results["merged_accuracy_by_epochs"], results["multitask_same_budget"]
    conv = results["merged_converged"]
    gains = results["gain_over_zero_shot"]
    merge_epochs = [int(e) for e in next(iter(mt.values()))]

    def series(by: Mapping[str, Any]) -> str:
        return ", ".join(f"{by[str(e)]['absolute_accuracy']:.3f}" for e in merge_epochs)

    def gain(iv: Mapping[str, Any]) -> str:
        return (f"{iv['estimate']:.2f} [{iv['ci_low']:.2f}, {iv['ci_high']:.2f}]" if np.isfinite(iv["ci_low"])
                else f"{iv['estimate']:.2f}")

    lines = []
    for opt, by_method in merged.items():
        lr = results["merge_learning_rates"][opt]
        e1 = str(merge_epochs[0])
        lines.append(f"{opt} experts (lr {lr:g}, {results['merge_steps_per_epoch']} steps per epoch): the experts after "
                     f"{e1} epoch reach {gain(gains['experts'][opt][e1])} of the converged experts' gain over zero-shot "
                     "on their own tasks; merged, " + "; ".join(
                         f"{m} {series(by)} (gain over zero-shot as a share of the converged merge's: "
                         + ", ".join(gain(gains['merged'][opt][m][str(e)]) for e in merge_epochs) + ")"
                         for m, by in by_method.items())
                     + f"; multi-task with the same budget {series(mt[opt])}; distance from the sum of the task vectors "
                     "(coefficient 1) to the multi-task displacement, relative to the latter, "
                     + ", ".join(f"{results['sum_vs_multitask'][opt][str(e)]['relative_distance']:.2f}" for e in merge_epochs)
                     + " (mini-batch order differs between the experts and the multi-task run, so the two agree only to "
                     "first order and in expectation)")
    after = f"{', '.join(map(str, merge_epochs))} epoch{'s' if list(merge_epochs) != [1] else ''}"
    points.append(f"4. **Merging** (mean test accuracy after {after}; brackets: 95 % "
                  "bootstrap intervals over tasks). " + ". ".join(lines)
                  + ". Merging the converged experts: " + ", ".join(f"{m} {r['absolute_accuracy']:.3f}"
                                                                    for m, r in conv.items())
                  + f"; zero-shot {results['zero_shot']['absolute_accuracy']:.3f}.")

    layer_parts = []
    for name, table in results["layer_cosines_last_epoch"].items():
        by_layer = pd.DataFrame(table).mean(axis=1).sort_values()
        layer_parts.append(f"{name}: best {by_layer.index[-1]} ({by_layer.iloc[-1]:.2f}), worst {by_layer.index[0]} "
                           f"({by_layer.iloc[0]:.2f})")
    points.append("5. **Layers** (cosine with $-\\nabla L_t(\\theta_0)$ after the last epoch, mean over tasks). "
                  + "; ".join(layer_parts) + ".")
    return "\n".join(points)

