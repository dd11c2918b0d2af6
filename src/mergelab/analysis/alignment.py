"""Task vectors as gradients: the one-step identity, Taylor terms of gradient descent, and how a
fine-tuning trajectory aligns with the gradient at ``theta_0``.

One step of full-batch gradient descent with learning rate ``eta`` from ``theta_0`` gives the task
vector ``tau = -eta * grad L(theta_0)``. After ``k`` steps a Taylor expansion around ``theta_0``
gives ``tau_k = -eta k g + eta^2 k (k - 1) / 2 H g + O(eta^3)`` (:func:`gd_taylor_terms`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from ..autodiff import LossGradient, hessian_vector_product, loss_and_gradient
from ..layers import layer_groups
from ..task_vectors import (
    TaskVector,
    TensorMap,
    check_compatible,
    cosine,
    norm,
    projection_share,
)
from ..training import FinetuneConfig
from ..training.trajectories import EpochTrajectory, training_subset
from ..utils import size_threads


def task_loss_and_gradient(bench: Any, task: str, state: Mapping[str, torch.Tensor],
                           cfg: FinetuneConfig | None = None, split: str = "train",
                           batch_size: int = 500) -> LossGradient:
    """Loss and gradient of ``task``'s mean cross-entropy at encoder weights ``state``.

    On the ``train`` split, the examples are those a fine-tuning run with ``cfg`` trains on
    (``cfg.data_fraction``'s subset; the whole split when ``cfg`` is ``None``); the task's frozen
    head comes from the benchmark.
    """
    X, y = bench.split(task, split)
    if cfg is not None and split == "train":
        X, y = training_subset(X, y, cfg)
    with size_threads(bench):  # the same bits in a lane and in a notebook
        return loss_and_gradient(bench.new_encoder(), bench.heads[task], X, y, state, batch_size, bench.device)


def task_hessian_vector_product(bench: Any, task: str, state: Mapping[str, torch.Tensor], vector: TensorMap,
                                cfg: FinetuneConfig | None = None, split: str = "train",
                                batch_size: int = 500, method: str = "double_backward") -> TaskVector:
    """``H v`` for ``task``'s mean cross-entropy on the same examples as :func:`task_loss_and_gradient`."""
    X, y = bench.split(task, split)
    if cfg is not None and split == "train":
        X, y = training_subset(X, y, cfg)
    with size_threads(bench):
        return hessian_vector_product(bench.new_encoder(), bench.heads[task], X, y, vector, state, batch_size,
                                      bench.device, method)

# ----------------------------------------------------------------------------- exactness and Taylor terms
def one_step_exactness(pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                       gradient: TaskVector, lr: float) -> dict[str, float]:
    """How far ``tau = theta_1 - theta_0`` is from ``-lr * gradient``, in the weights' precision.

    Returns:
        ``max_abs_error``: ``max |tau + lr g|`` over all entries; ``max_relative_error``: that divided
        by ``max |lr g|``; ``relative_error``: ``||tau + lr g|| / ||lr g||``; ``update_norm``:
        ``||lr g||``; ``machine_epsilon``: of the weights' dtype, the scale "float precision" means
        (rounding ``theta_0 - lr g`` and summing the loss over examples in another order each
        leave errors of a few to a few hundred epsilons relative to the update).
    """
    check_compatible(dict(gradient.items()), {k: finetuned[k] for k in gradient.keys()}, "fine-tuned state dict")
    # in the weights' own precision (TaskVector.from_states works in float32)
    tau = TaskVector({k: finetuned[k].detach().cpu() - pretrained[k].detach().cpu().to(finetuned[k].dtype)
                      for k in gradient.keys()})
    update = lr * gradient
    err = tau + update
    max_abs = max(float(e.abs().max()) for e in err.vector.values())
    max_update = max(float(u.abs().max()) for u in update.vector.values())
    step = update.norm()
    dtype = next(iter(tau.vector.values())).dtype
    return {"max_abs_error": max_abs, "max_relative_error": max_abs / max_update if max_update > 0 else float("nan"),
            "relative_error": err.norm() / step if step > 0 else float("nan"), "update_norm": step,
            "machine_epsilon": float(torch.finfo(dtype).eps)}

def gd_taylor_terms(gradient: TaskVector, hessian_gradient: TaskVector, lr: float, num_steps: int
                    ) -> tuple[TaskVector, TaskVector]:
    """First- and second-order terms of the task vector after ``num_steps`` full-batch GD steps.

    ``tau_k = -lr k g + lr^2 k (k - 1) / 2 * H g + O(lr^3)``, from
    ``grad L(theta_j) = g + H (theta_j - theta_0) + ...`` and ``theta_j - theta_0 = -lr j g + ...``.

    Args:
        gradient: ``g = grad L(theta_0)``; hessian_gradient: ``H g`` at ``theta_0``.
        lr: eta; num_steps: k.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is not valid; use a positive integer.")
    k = num_steps
    return (-lr * k) * gradient, (lr ** 2 * k * (k - 1) / 2) * hessian_gradient

# ----------------------------------------------------------------------------- analysis along a trajectory
def trajectory_alignment(pretrained: Mapping[str, torch.Tensor], trajectory: EpochTrajectory,
                         gradient: TaskVector, groups: Mapping[str, Sequence[str]] | str = "block"
                         ) -> list[dict[str, Any]]:
    """Per epoch and layer group: how well the task vector matches ``-lr * steps * gradient``.

    Rows (one per epoch and group, ``group == "total"`` for the whole model) with:

    * ``cosine``: cosine of ``tau_e`` and ``-g`` (``g = grad L(theta_0)``);
    * ``norm_ratio``: ``||tau_e|| / (lr * steps_e * ||g||)`` (1 for small-step gradient descent;
      for Adam the update is not proportional to ``lr * g``, so the ratio measures something else);
    * ``first_epoch_share``: :func:`projection_share` of ``tau_1`` in ``tau_e``;
    * ``first_epoch_cosine``: cosine of ``tau_1`` and ``tau_e``.
    """
    cfg = trajectory.config
    keys = list(gradient.keys())
    groups = layer_groups(keys, groups) if isinstance(groups, str) else dict(groups)
    groups = {**groups, "total": keys}
    tau1 = trajectory.task_vector(pretrained, 1)
    grad_norms = {g: norm(gradient, ks) for g, ks in groups.items()}
    rows = []
    for e in range(1, trajectory.epochs + 1):
        tau = trajectory.task_vector(pretrained, e)
        steps = e * trajectory.steps_per_epoch
        for g, ks in groups.items():
            gn = grad_norms[g]
            rows.append({
                "task": trajectory.task, "optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": cfg.batch_size,
                "epoch": e, "steps": steps, "group": g,
                "cosine": -cosine(tau, gradient, ks),
                "norm_ratio": norm(tau, ks) / (cfg.lr * steps * gn) if gn > 0 else float("nan"),
                "first_epoch_share": projection_share(tau1, tau, ks),
                "first_epoch_cosine": cosine(tau1, tau, ks),
                "task_vector_norm": norm(tau, ks)})
    return rows


def taylor_gap(pretrained: Mapping[str, torch.Tensor], trajectory: EpochTrajectory, gradient: TaskVector,
               hessian_gradient: TaskVector) -> list[dict[str, Any]]:
    """Measured departure of ``tau_k`` from ``-lr k g`` against the second-order prediction.

    Exact for full-batch gradient descent (one step per epoch); for mini-batch runs the prediction
    ignores the noise of the batches. One row per epoch with ``steps`` (k), ``gap_norm``
    ``||tau_k + lr k g||``, ``second_order_norm`` ``||lr^2 k (k-1)/2 H g||``, ``residual_norm``
    ``||tau_k + lr k g - second order||`` (the O(lr^3) rest), the same three divided by
    ``||lr k g||`` (``relative_*``), and ``gap_cosine`` between the measured gap and the predicted
    term (nan at k = 1, where the prediction is zero).
    """
    cfg = trajectory.config
    rows = []
    for e in range(1, trajectory.epochs + 1):
        k = e * trajectory.steps_per_epoch
        tau = trajectory.task_vector(pretrained, e)
        first, second = gd_taylor_terms(gradient, hessian_gradient, cfg.lr, k)
        gap, residual = tau - first, tau - first - second
        scale = first.norm()
        rows.append({
            "task": trajectory.task, "optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "epoch": e, "steps": k, "gap_norm": gap.norm(), "second_order_norm": second.norm(),
            "residual_norm": residual.norm(), "relative_gap": gap.norm() / scale,
            "relative_second_order": second.norm() / scale, "relative_residual": residual.norm() / scale,
            "gap_cosine": cosine(gap, second) if k > 1 else float("nan")})
    return rows


def alignment_table(pretrained: Mapping[str, torch.Tensor],
                    trajectories: Mapping[tuple[str, float, str], EpochTrajectory],
                    gradients: Mapping[str, TaskVector], groups: Mapping[str, Sequence[str]] | str = "block"
                    ) -> pd.DataFrame:
    """:func:`trajectory_alignment` rows of every trajectory of a grid (:func:`trajectory_grid`'s
    ``{(optimizer, lr, task): trajectory}``), each against its task's gradient ``gradients[task]``."""
    return pd.DataFrame([row for (_, _, task), traj in trajectories.items()
                         for row in trajectory_alignment(pretrained, traj, gradients[task], groups)])


def taylor_table(pretrained: Mapping[str, torch.Tensor], trajectories: Mapping[tuple[str, float, str], EpochTrajectory],
                 gradients: Mapping[str, TaskVector], hessian_gradients: Mapping[str, TaskVector]) -> pd.DataFrame:
    """:func:`taylor_gap` rows of every trajectory of a grid, with its task's gradient ``g`` and ``H g``."""
    return pd.DataFrame([row for (_, _, task), traj in trajectories.items()
                         for row in taylor_gap(pretrained, traj, gradients[task], hessian_gradients[task])])


def task_gradients(bench: Any, tasks: Sequence[str], state: Mapping[str, torch.Tensor],
                   cfg: FinetuneConfig | None = None, batch_size: int = 500) -> dict[str, LossGradient]:
    """:func:`task_loss_and_gradient` of every task at one set of weights (e.g. ``theta_0``)."""
    return {t: task_loss_and_gradient(bench, t, state, cfg, batch_size=batch_size) for t in tasks}
