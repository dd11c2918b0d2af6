"""Task vectors as gradients: full-dataset gradients, Hessian-vector products, per-layer alignment,
and fine-tuning trajectories snapshotted at every epoch.

The identity behind this module: one step of full-batch gradient descent with learning rate ``eta``
from ``theta_0`` gives the task vector ``tau = -eta * grad L(theta_0)``, where ``L`` is the mean
cross-entropy over the whole training split. After ``k`` steps,
``tau_k = -eta * sum_{j<k} grad L(theta_j)``, and a Taylor expansion of each ``grad L(theta_j)``
around ``theta_0`` gives

    tau_k = -eta * k * g  +  eta^2 * k (k - 1) / 2 * H g  +  O(eta^3)

with ``g = grad L(theta_0)`` and ``H`` the Hessian of ``L`` at ``theta_0`` (:func:`gd_taylor_terms`).

Gradients and Hessian-vector products are returned as :class:`~mergelab.task_vectors.TaskVector`
values (parameter name to a tensor of the parameter's shape), so that ``-lr * gradient`` compares
directly with a task vector.

An *epoch* is one pass over the task's training subset (``FinetuneConfig.data_fraction``) with the
run's batch size: ``floor(n / b)`` optimizer steps, the remainder of the shuffled split being
dropped, exactly as :func:`mergelab.training.batch_stream` walks the data. With ``batch_size >= n``
an epoch is one full-batch step.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import paths
from .task_vectors import TaskVector, check_compatible
from .training import FinetuneConfig, finetune, training_indices
from .utils import StateDict, atomic_save_safetensors, atomic_write_json, config_hash

TensorMap = Mapping[str, torch.Tensor] | TaskVector
"""Anything keyed by parameter name: a state dict, a task vector or a gradient."""

HVP_METHODS = ("double_backward", "forward_over_reverse")


# ----------------------------------------------------------------------------- data and epochs
def training_subset(X: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, task_index: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``(X, y)`` that :func:`mergelab.training.finetune` trains on under ``cfg``.

    ``task_index`` is the task's position in the sorted task list of the run (0 for an expert; a
    multi-task run draws each task's subset from ``cfg.seed + 7919 * task_index``).
    """
    keep = training_indices(len(y), cfg, task_index)
    return X[keep], y[keep]


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n_train`` examples with batches of ``batch_size``.

    ``floor(n_train / b)`` with ``b = min(batch_size, n_train)``: the data stream drops the
    remainder of each shuffled pass, so a full batch (``batch_size >= n_train``) is one step.
    """
    if not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train={n_train!r} is not valid; use a positive number of examples.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer.")
    return n_train // min(batch_size, n_train)


def epoch_config(cfg: FinetuneConfig, n_train: int, epochs: int) -> FinetuneConfig:
    """``cfg`` with ``num_steps`` set to ``epochs`` passes over ``n_train`` examples."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} is not valid; use a positive integer number of passes.")
    return replace(cfg, num_steps=epochs * steps_per_epoch(n_train, cfg.batch_size))


def gradient_descent_config(lr: float, batch_size: int, seed: int = 0, data_fraction: float = 1.0,
                            num_steps: int = 1) -> FinetuneConfig:
    """Plain (stochastic) gradient descent: SGD without momentum, weight decay, clipping or warm-up,
    constant learning rate. With ``batch_size >= n_train`` every step is a full-batch step."""
    return FinetuneConfig(optimizer="sgd", lr=lr, batch_size=batch_size, num_steps=num_steps,
                          schedule="constant", warmup_steps=0, weight_decay=0.0, momentum=0.0,
                          grad_clip=0.0, seed=seed, data_fraction=data_fraction)


def trajectory_config(optimizer: str, lr: float, batch_size: int, data_fraction: float = 1.0, seed: int = 0,
                      weight_decay: float = 0.0, num_steps: int = 1) -> FinetuneConfig:
    """A run whose task vectors can be compared with gradients: constant learning rate, no warm-up,
    no gradient clipping, no momentum (SGD), ``weight_decay`` (decoupled for AdamW) 0 by default.

    :func:`epoch_trajectory` replaces ``num_steps`` by the steps of its epochs.
    """
    return FinetuneConfig(optimizer=optimizer, lr=lr, batch_size=batch_size, num_steps=num_steps, schedule="constant",
                          warmup_steps=0, weight_decay=weight_decay, momentum=0.0, grad_clip=0.0, seed=seed,
                          data_fraction=data_fraction)


# ----------------------------------------------------------------------------- gradients and HVPs
class LossGradient(NamedTuple):
    """Mean loss over a dataset and its gradient.

    Attributes:
        loss: mean cross-entropy over all examples (nats).
        gradient: ``d loss / d theta`` per state-dict entry, same shapes as the parameters (zeros for
            floating-point entries that are not trainable parameters).
        n_examples: number of examples averaged.
    """

    loss: float
    gradient: TaskVector
    n_examples: int


def _check_data(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if len(X) != len(y) or len(y) == 0:
        raise ValueError(f"X has {len(X)} rows and y has {len(y)}: pass the same, non-zero number of "
                         "examples and labels.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer.")


def _load(encoder: nn.Module, state: Mapping[str, torch.Tensor] | None, device: torch.device | str
          ) -> nn.Module:
    if state is not None:
        own = encoder.state_dict()
        check_compatible(own, state, "state dict")
        with torch.no_grad():
            encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return encoder.to(device)


def _as_taskvector(encoder: nn.Module, tensors: Mapping[str, torch.Tensor]) -> TaskVector:
    """Full state-dict key set (floating entries only, dtype kept), zeros where ``tensors`` has none."""
    out = {}
    for k, v in encoder.state_dict().items():
        if torch.is_floating_point(v):
            t = tensors.get(k)
            out[k] = t.detach().cpu() if t is not None else torch.zeros(v.shape, dtype=v.dtype)
    return TaskVector(out)


@contextmanager
def _full_precision():
    """No TensorFloat-32 on CUDA (matmuls and cuDNN convolutions), so that float32 means float32; a
    no-op on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def _differentiable_attention():
    """Attention through the plain-math kernel: fused CPU kernels have no double backward or
    forward-mode derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def loss_and_gradient(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                      state: Mapping[str, torch.Tensor] | None = None, batch_size: int = 500,
                      device: torch.device | str = "cpu") -> LossGradient:
    """Mean cross-entropy of ``head(encoder(X))`` over the *whole* dataset and its gradient.

    The loss is ``(1/N) sum_i CE_i``, exactly the objective a full-batch fine-tuning step with
    mean reduction descends; the data are visited in order in batches of ``batch_size`` (each
    batch contributes ``sum CE / N``), so the result is deterministic and independent of the
    batch size up to float rounding. The head is frozen (its gradient is never formed).

    Args:
        encoder: maps ``(B, 3, H, W)`` to ``(B, d)``; loaded with ``state`` when given (a copy of
            the weights is written into it; it is left in eval mode).
        head: frozen head, ``(B, d)`` features to ``(B, C)`` logits.
        X: ``(N, 3, H, W)`` inputs; y: ``(N,)`` int64 labels.
        state: encoder weights to evaluate the gradient at (default: the encoder's own).
        batch_size: examples per forward/backward pass (memory only, not the result).
        device: where to compute.
    """
    _check_data(X, y, batch_size)
    encoder = _load(encoder, state, device).eval()
    head = head.to(device).eval()
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    head_grad = [p.requires_grad for p in head.parameters()]
    for p in head.parameters():
        p.requires_grad_(False)
    n, total = len(y), 0.0
    try:
        for i in range(0, n, batch_size):
            xb, yb = X[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            loss = F.cross_entropy(head(encoder(xb)), yb, reduction="sum") / n
            batch_grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for (name, _), g in zip(params.items(), batch_grads):
                    if g is not None:
                        grads[name] += g
            total += float(loss.detach())
    finally:
        for p, flag in zip(head.parameters(), head_grad):
            p.requires_grad_(flag)
    return LossGradient(total, _as_taskvector(encoder, grads), n)


def dataset_gradient(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     state: Mapping[str, torch.Tensor] | None = None, batch_size: int = 500,
                     device: torch.device | str = "cpu") -> TaskVector:
    """The gradient part of :func:`loss_and_gradient`: ``grad (1/N) sum_i CE_i`` at ``state``."""
    return loss_and_gradient(encoder, head, X, y, state, batch_size, device).gradient


def hessian_vector_product(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                           vector: TensorMap, state: Mapping[str, torch.Tensor] | None = None,
                           batch_size: int = 500, device: torch.device | str = "cpu",
                           method: str = "double_backward") -> TaskVector:
    """``H v``: the Hessian of the dataset's mean cross-entropy at ``state`` times ``vector``.

    Batched like :func:`loss_and_gradient` (each batch's Hessian weighted by its share of
    examples), without ever forming ``H``.

    Args:
        vector: a direction keyed like the encoder's parameters (e.g. the gradient itself).
        method: ``"double_backward"`` (reverse over reverse: the gradient of ``<grad L, v>``) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``); both give the
            same numbers, the second one through :mod:`torch.func`.
    """
    if method not in HVP_METHODS:
        raise ValueError(f"method={method!r} is not valid; use one of {', '.join(HVP_METHODS)}.")
    _check_data(X, y, batch_size)
    encoder = _load(encoder, state, device).eval()
    head = head.to(device).eval()
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    missing = [k for k in names if k not in vector.keys()]
    if missing:
        raise ValueError(f"vector has no entry for parameter {missing[0]!r}; pass a direction keyed like "
                         "the encoder's parameters (a TaskVector or gradient of the same model).")
    base = {k: v.detach() for k, v in encoder.named_parameters() if k in names}
    v = {k: vector[k].to(device, base[k].dtype).reshape(base[k].shape) for k in names}
    buffers = dict(encoder.named_buffers())
    frozen = {k: p.detach() for k, p in encoder.named_parameters() if k not in names}
    out = {k: torch.zeros_like(p) for k, p in base.items()}
    n = len(y)
    with _differentiable_attention():
        for i in range(0, n, batch_size):
            xb, yb = X[i:i + batch_size].to(device), y[i:i + batch_size].to(device)

            def loss_of(p: dict[str, torch.Tensor], xb=xb, yb=yb) -> torch.Tensor:
                feats = torch.func.functional_call(encoder, {**p, **frozen, **buffers}, (xb,))
                return F.cross_entropy(head(feats), yb, reduction="sum") / n

            if method == "forward_over_reverse":
                _, hv = torch.func.jvp(torch.func.grad(loss_of), (base,), (v,))
            else:
                p = {k: t.clone().requires_grad_(True) for k, t in base.items()}
                g = torch.autograd.grad(loss_of(p), list(p.values()), create_graph=True)
                dot = sum((gi * v[k]).sum() for gi, k in zip(g, p))
                hv = dict(zip(p, torch.autograd.grad(dot, list(p.values()))))
            with torch.no_grad():
                for k in out:
                    out[k] += hv[k].detach()
    return _as_taskvector(encoder, out)


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
    return loss_and_gradient(bench.new_encoder(), bench.heads[task], X, y, state, batch_size, bench.device)


def task_hessian_vector_product(bench: Any, task: str, state: Mapping[str, torch.Tensor], vector: TensorMap,
                                cfg: FinetuneConfig | None = None, split: str = "train",
                                batch_size: int = 500, method: str = "double_backward") -> TaskVector:
    """``H v`` for ``task``'s mean cross-entropy on the same examples as :func:`task_loss_and_gradient`."""
    X, y = bench.split(task, split)
    if cfg is not None and split == "train":
        X, y = training_subset(X, y, cfg)
    return hessian_vector_product(bench.new_encoder(), bench.heads[task], X, y, vector, state, batch_size,
                                  bench.device, method)


# ----------------------------------------------------------------------------- per-layer geometry
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn|mlp|ln_1|ln_2)\b")


def layer_groups(keys: Sequence[str], by: str = "block") -> dict[str, list[str]]:
    """Group state-dict keys into layers, in model order.

    Args:
        keys: parameter names (open_clip ``VisionTransformer`` names group best).
        by: ``"parameter"`` (one group per tensor), ``"block"`` (``embedding``, ``block{i}.attn``,
            ``block{i}.mlp``, ``block{i}.norm``, ``output``; unknown names keep their own group) or
            ``"all"`` (one group, ``"total"``).
    """
    keys = list(keys)
    if by == "parameter":
        return {k: [k] for k in keys}
    if by == "all":
        return {"total": keys}
    if by != "block":
        raise ValueError(f"by={by!r} is not valid; use 'parameter', 'block' or 'all'.")
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            part = {"attn": "attn", "mlp": "mlp", "ln_1": "norm", "ln_2": "norm"}[m.group(2)]
            name = f"block{m.group(1)}.{part}"
        elif k.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            name = "embedding"
        elif k.split(".")[0] in ("ln_post", "proj"):
            name = "output"
        else:
            name = k
        groups.setdefault(name, []).append(k)
    def block_order(group: str) -> tuple[int, int]:
        index, part = group[len("block"):].split(".")
        return int(index), ["attn", "mlp", "norm"].index(part)

    order = ["embedding"] + sorted((g for g in groups if g.startswith("block")), key=block_order)
    order += [g for g in groups if g not in order and g != "output"] + (["output"] if "output" in groups else [])
    return {g: groups[g] for g in order if g in groups}


def _flat(t: TensorMap, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([t[k].detach().reshape(-1).double().cpu() for k in keys])


def _common_keys(a: TensorMap, b: TensorMap) -> list[str]:
    check_compatible({k: a[k] for k in a.keys()}, {k: b[k] for k in b.keys()}, "second argument")
    return list(a.keys())


def cosine(a: TensorMap, b: TensorMap, keys: Sequence[str] | None = None) -> float:
    """Cosine similarity of two parameter-keyed vectors over ``keys`` (default: all), in float64.

    Zero when either vector is zero over those keys.
    """
    keys = list(keys) if keys is not None else _common_keys(a, b)
    fa, fb = _flat(a, keys), _flat(b, keys)
    denom = float(fa.norm() * fb.norm())
    return float(fa @ fb) / denom if denom > 0 else 0.0


def norm(a: TensorMap, keys: Sequence[str] | None = None) -> float:
    """L2 norm over ``keys`` (default: all entries), in float64."""
    return float(_flat(a, list(keys) if keys is not None else list(a.keys())).norm())


def layer_cosines(a: TensorMap, b: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block"
                  ) -> dict[str, float]:
    """Cosine of ``a`` and ``b`` per layer group (see :func:`layer_groups`), plus ``"total"``."""
    keys = _common_keys(a, b)
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {g: cosine(a, b, ks) for g, ks in groups.items()}
    out["total"] = cosine(a, b, keys)
    return out


def layer_norms(a: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block") -> dict[str, float]:
    """L2 norm of ``a`` per layer group, plus ``"total"``."""
    keys = list(a.keys())
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {g: norm(a, ks) for g, ks in groups.items()}
    out["total"] = norm(a, keys)
    return out


def layer_norm_ratios(a: TensorMap, b: TensorMap, groups: Mapping[str, Sequence[str]] | str = "block"
                      ) -> dict[str, float]:
    """``||a_l|| / ||b_l||`` per layer group, plus ``"total"`` (``nan`` where ``b_l`` is zero)."""
    keys = _common_keys(a, b)
    groups = layer_groups(keys, groups) if isinstance(groups, str) else groups
    out = {}
    for g, ks in [*groups.items(), ("total", keys)]:
        nb = norm(b, ks)
        out[g] = norm(a, ks) / nb if nb > 0 else float("nan")
    return out


def projection_share(part: TensorMap, whole: TensorMap, keys: Sequence[str] | None = None) -> float:
    """``<part, whole> / ||whole||^2``: the share of ``whole`` that ``part`` accounts for along it.

    With ``whole = part + rest`` the shares of ``part`` and ``rest`` add up to 1; a share above 1
    means the rest points partly back.
    """
    keys = list(keys) if keys is not None else _common_keys(part, whole)
    fp, fw = _flat(part, keys), _flat(whole, keys)
    denom = float(fw @ fw)
    return float(fp @ fw) / denom if denom > 0 else float("nan")


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
    with _full_precision():
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


# ----------------------------------------------------------------------------- epoch trajectories
@dataclass
class EpochTrajectory:
    """One fine-tuning run with a snapshot of the encoder after every epoch.

    Attributes:
        task: the task fine-tuned on (``"multitask"`` for a multi-task run).
        config: the run's hyperparameters (``num_steps = epochs * steps_per_epoch``).
        epochs: number of passes E; steps_per_epoch: optimizer steps per pass; n_train: examples.
        states: ``states[e - 1]`` is the encoder after ``e`` epochs (CPU state dicts; a cached
            trajectory reads each from its file when asked for).
        loss: training loss per step; wall_time_s: training time (of the run that filled the cache).
        tasks: the tasks trained on.
    """

    task: str
    config: FinetuneConfig
    epochs: int
    steps_per_epoch: int
    n_train: int
    states: Sequence[StateDict]
    loss: list[float]
    wall_time_s: float
    tasks: tuple[str, ...] = ()

    def state(self, epoch: int) -> StateDict:
        """The encoder after ``epoch`` epochs (1..E)."""
        if not isinstance(epoch, int) or not 1 <= epoch <= self.epochs:
            raise ValueError(f"epoch={epoch!r} is not valid; this trajectory has epochs 1..{self.epochs}.")
        return self.states[epoch - 1]

    def task_vector(self, pretrained: Mapping[str, torch.Tensor], epoch: int) -> TaskVector:
        """``theta_e - theta_0`` after ``epoch`` epochs."""
        return TaskVector.from_states(pretrained, self.state(epoch))

    @property
    def seconds_per_step(self) -> float:
        return self.wall_time_s / max(1, self.config.num_steps)


def _trajectory_key(bench: Any, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, epochs: int,
                    extra: Mapping[str, Any] | None = None) -> str:
    ident: dict[str, Any] = {"benchmark": bench.key, "kind": kind, "finetune": asdict(cfg), "epochs": epochs,
                             **(extra or {})}
    if kind == "epoch_trajectory":  # the single-task key of the first version, kept so caches stay valid
        ident.update(task=tasks[0], head=bench.head_digest(tasks[0]))
    else:
        ident.update(tasks=list(tasks), heads=[bench.head_digest(t) for t in tasks])
    return config_hash(ident)


def trajectories_dir() -> Path:
    """``<data>/trajectories``: cached epoch trajectories (safetensors + JSON)."""
    path = paths.data_dir() / "trajectories"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _EpochStates(Sequence):
    """The per-epoch state dicts of a cached trajectory, read from its file when asked for, so that
    many trajectories of a large model (350 MB per ViT-B-32 snapshot) need not sit in memory."""

    def __init__(self, path: Path, epochs: int) -> None:
        self.path, self.epochs = path, epochs

    def __len__(self) -> int:
        return self.epochs

    def __getitem__(self, index: int) -> StateDict:  # type: ignore[override]
        from safetensors import safe_open

        if not isinstance(index, int):
            raise TypeError("epoch states are indexed by one integer")
        if index < 0:
            index += self.epochs
        if not 0 <= index < self.epochs:
            raise IndexError(index)
        prefix = f"epoch{index + 1}/"
        with safe_open(str(self.path), framework="pt") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _spread_schedule(steps_per_epoch: Mapping[str, int]) -> tuple[int, Callable[[str, int], bool] | None]:
    """An epoch of a multi-task run over tasks with different numbers of steps per epoch.

    The epoch lasts ``K = max_t s_t`` steps and task ``t`` contributes a mini-batch at ``s_t`` of them,
    spread evenly (at step ``j`` of the epoch when ``floor((j + 1) s_t / K) > floor(j s_t / K)``), so
    that after ``e`` epochs the run has taken as many batches of every task as that task's expert.
    Returns ``(K, active)``; ``active`` is ``None`` when every task has ``K`` steps (every task at
    every step).
    """
    K = max(steps_per_epoch.values())
    if all(s == K for s in steps_per_epoch.values()):
        return K, None

    def active(task: str, step: int) -> bool:
        j, s = step % K, steps_per_epoch[task]
        return (j + 1) * s // K > j * s // K

    return K, active


def _run_trajectory(bench: Any, kind: str, tasks: Sequence[str],
                    data: Callable[[], Mapping[str, tuple[Any, torch.Tensor]]], train_cfg: FinetuneConfig,
                    run_cfg: FinetuneConfig, epochs: int, spe: int, n_train: int, progress: bool | None,
                    train: Callable[..., dict[str, list[float]]] | None,
                    active: Callable[[str, int], bool] | None = None,
                    extra: Mapping[str, Any] | None = None) -> EpochTrajectory:
    """Train (or load from the cache) one run and return its per-epoch snapshots.

    ``data()`` gives the training rows per task; it is called only when the run is not cached (at
    the clip size it decodes images). ``train_cfg`` is what the training loop gets; ``run_cfg`` (which
    keys the cache and is reported) differs from it only where the rows were chosen beforehand.
    ``active`` is the loop's task schedule (see :func:`mergelab.training.finetune`); ``extra`` is added
    to the cache key and the log.
    Batches larger than the benchmark's ``micro_batch_size`` accumulate gradients over chunks
    (memory only).
    """
    name = tasks[0] if kind == "epoch_trajectory" else "multitask"
    key = _trajectory_key(bench, kind, tasks, run_cfg, epochs, extra)
    path = trajectories_dir() / f"{'trajectory' if kind == 'epoch_trajectory' else 'multitask-trajectory'}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        enc = bench.new_encoder(bench.pretrained_state())
        snapshots: dict[int, StateDict] = {}

        def snapshot(step: int, model: nn.Module) -> None:
            if step % spe == 0:
                snapshots[step // spe] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        start = time.perf_counter()
        desc = f"trajectory {name} ({run_cfg.optimizer}, lr {run_cfg.lr:g})"
        options: dict[str, Any] = {}
        if getattr(bench, "micro_batch_size", None) is not None:
            options["micro_batch_size"] = bench.micro_batch_size
        if active is not None:
            options["active"] = active
        history = (train or finetune)(enc, dict(data()), {t: bench.heads[t] for t in tasks}, train_cfg,
                                      device=bench.device, desc=desc,
                                      progress=bench.progress if progress is None else progress,
                                      on_step=snapshot, **options)
        wall = time.perf_counter() - start
        if sorted(snapshots) != list(range(1, epochs + 1)):
            raise RuntimeError(f"the training loop reported epochs {sorted(snapshots)}, expected 1..{epochs}: "
                               "it must call on_step(step, model) after every optimizer step.")
        atomic_write_json(meta_path, {
            "kind": kind, "task": name, "tasks": list(tasks), "benchmark_key": bench.key,
            "finetune": asdict(run_cfg), "epochs": epochs, "steps_per_epoch": spe, "n_train": n_train,
            "loss": history["loss"], "wall_time_s": wall, "device": str(bench.device), **(extra or {})})
        atomic_save_safetensors(path, {f"epoch{e}/{k}": v for e, s in snapshots.items() for k, v in s.items()},
                                metadata={"kind": kind, "task": name, "epochs": str(epochs)})
        del snapshots
    meta = json.loads(meta_path.read_text())
    return EpochTrajectory(name, run_cfg, epochs, spe, n_train, _EpochStates(path, epochs), meta["loss"],
                           meta["wall_time_s"], tuple(tasks))


def epoch_trajectory(bench: Any, task: str, cfg: FinetuneConfig, epochs: int,
                     progress: bool | None = None,
                     train: Callable[..., dict[str, list[float]]] | None = None) -> EpochTrajectory:
    """Fine-tune ``task``'s expert for ``epochs`` passes with ``cfg``, snapshotting every epoch.

    One run gives the task vectors after 1, 2, ..., E epochs. ``cfg.num_steps`` is replaced by
    ``epochs * steps_per_epoch`` (:func:`epoch_config`); everything else is used as given, through
    :func:`mergelab.training.finetune`, so the last snapshot is the expert
    ``bench.expert(task, run config)`` would train. With a ``constant`` schedule, the snapshot after
    ``e`` epochs is the model a run of exactly ``e`` epochs gives; with a decaying schedule it is
    not (the schedule spans the whole run). Cached in ``<data>/trajectories`` by benchmark, task,
    head and configuration, written atomically, so a re-run trains nothing.

    Args:
        bench: a benchmark (``split``, ``heads``, ``pretrained_state``, ``new_encoder``, ``key``).
        task: one of ``bench.tasks`` (any task with a head works).
        cfg: hyperparameters (``data_fraction`` picks the training subset).
        epochs: E, the number of passes.
        progress: progress bar (default: the benchmark's setting).
        train: the training loop (default :func:`mergelab.training.finetune`; tests substitute it).
    """
    X, y = bench.split(task, "train")
    n = len(training_indices(len(y), cfg))  # the rows training_subset keeps
    run_cfg = epoch_config(cfg, n, epochs)
    return _run_trajectory(bench, "epoch_trajectory", [task], lambda: {task: (X, y)}, run_cfg, run_cfg, epochs,
                           steps_per_epoch(n, cfg.batch_size), n, progress, train)


def multitask_epoch_trajectory(bench: Any, tasks: Sequence[str], cfg: FinetuneConfig, epochs: int,
                               progress: bool | None = None,
                               train: Callable[..., dict[str, list[float]]] | None = None) -> EpochTrajectory:
    """A multi-task run on exactly the rows the experts of :func:`epoch_trajectory` train on.

    Every step sums one mini-batch loss per task (:func:`mergelab.training.finetune` with several
    tasks); an epoch is as many steps as an expert's epoch, so after ``e`` epochs the run has seen as
    many examples as the ``T`` experts together. Each task's rows are its expert's training subset
    (``bench.multitask`` would draw a different subset per task); the order of the batches differs.
    Snapshotted every epoch and cached like :func:`epoch_trajectory`.

    When the subsets differ in size (the datasets of the clip size do), the experts' epochs have
    different numbers of steps ``s_t``: an epoch of the multi-task run then lasts ``max_t s_t`` steps,
    and task ``t`` contributes a batch at ``s_t`` of them, spread evenly, so that after ``e`` epochs
    every task has contributed as many batches as its expert took (same examples, same budget, and
    to first order in the learning rate the same summed update). ``steps_per_epoch`` is then
    ``max_t s_t`` and ``n_train`` the largest subset.
    """
    tasks = sorted(tasks)
    if not tasks:
        raise ValueError("tasks is empty; pass the tasks of the multi-task run.")
    splits = {t: bench.split(t, "train") for t in tasks}  # lazy images at the clip size
    rows = {t: training_indices(len(y), cfg) for t, (_, y) in splits.items()}  # each expert's rows

    def data() -> dict[str, tuple[Any, torch.Tensor]]:  # decoded only if the run is not cached
        return {t: (X[rows[t]], y[rows[t]]) for t, (X, y) in splits.items()}

    sizes = {t: len(r) for t, r in rows.items()}
    n = max(sizes.values())
    if len(set(sizes.values())) == 1:
        run_cfg = epoch_config(cfg, n, epochs)
        # the rows are chosen above, so the loop must not subsample again
        return _run_trajectory(bench, "multitask_epoch_trajectory", tasks, data, replace(run_cfg, data_fraction=1.0),
                               run_cfg, epochs, steps_per_epoch(n, cfg.batch_size), n, progress, train)
    # subsets of different sizes (the clip datasets): each task takes as many batches as its expert
    spe = {t: steps_per_epoch(m, cfg.batch_size) for t, m in sizes.items()}
    K, active = _spread_schedule(spe)
    run_cfg = replace(cfg, num_steps=epochs * K)
    return _run_trajectory(bench, "multitask_epoch_trajectory", tasks, data, replace(run_cfg, data_fraction=1.0),
                           run_cfg, epochs, K, n, progress, train, active,
                           extra={"schedule": "spread", "steps_per_epoch_per_task": spe})


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


def trajectory_grid(bench: Any, tasks: Sequence[str], learning_rates: Mapping[str, Sequence[float]],
                    epochs: int, batch_size: int, data_fraction: float = 1.0, seed: int = 0,
                    weight_decay: float = 0.0, progress: bool | None = None
                    ) -> dict[tuple[str, float, str], EpochTrajectory]:
    """Epoch trajectories for every optimizer, learning rate and task (each cached).

    Args:
        learning_rates: optimizer name (``"sgd"``, ``"adam"``, ``"adamw"``) to the learning rates to run.
        epochs, batch_size, data_fraction, seed, weight_decay: as in :func:`trajectory_config`.

    Returns:
        ``{(optimizer, lr, task): EpochTrajectory}``.
    """
    from tqdm.auto import tqdm

    runs = [(opt, float(lr), t) for opt, lrs in learning_rates.items() for lr in lrs for t in tasks]
    show = bench.progress if progress is None else progress
    return {(opt, lr, t): epoch_trajectory(bench, t, trajectory_config(opt, lr, batch_size, data_fraction, seed,
                                                                       weight_decay), epochs, progress=False)
            for opt, lr, t in tqdm(runs, desc="epoch trajectories", disable=not show)}


def merge_along_epochs(bench: Any, pretrained: StateDict, task_vectors: Mapping[Any, Mapping[str, TaskVector]],
                       methods: Sequence[str], expert_test_accuracy: Mapping[str, float],
                       grid: Sequence[float] | None = None, progress: bool = True) -> dict[str, dict[Any, dict]]:
    """Merge each set of task vectors with each method (coefficient chosen on validation).

    Args:
        task_vectors: a label (e.g. the number of epochs, or ``"converged"``) to ``{task: TaskVector}``.
        methods: registered merge methods.
        expert_test_accuracy: the denominators of normalized accuracy.
        grid: coefficients to sweep (default: each method's own grid).

    Returns:
        ``{method: {label: {"absolute_accuracy", "normalized_accuracy", "per_task_accuracy",
        "coefficient", "validation_sweep"}}}`` with test accuracies.
    """
    from .evaluation import merge_baselines, summarize
    from .merging import get_merge

    options = ({m: {"grid": list(grid)} for m in methods if get_merge(m).coefficient_grid}
               if grid is not None else None)
    out: dict[str, dict[Any, dict]] = {m: {} for m in methods}
    for label, tvs in task_vectors.items():
        merged = merge_baselines(bench, pretrained, dict(tvs), methods, options=options, progress=progress)
        for m, r in merged.items():
            out[m][label] = {**summarize(bench.evaluate(r.state, "test", list(tvs)), expert_test_accuracy),
                             "coefficient": r.coefficient, "validation_sweep": r.sweep}
    return out


def merging_by_epochs(bench: Any, pretrained: StateDict, trajectories: Mapping[tuple[str, float, str], EpochTrajectory],
                      merge_learning_rates: Mapping[str, float], methods: Sequence[str],
                      expert_test_accuracy: Mapping[str, float], grid: Sequence[float] | None = None,
                      epochs: Sequence[int] | None = None, progress: bool = True) -> dict[str, dict]:
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
    from .evaluation import summarize

    out: dict[str, dict] = {"merged": {}, "multitask": {}, "experts": {}, "sum_vs_multitask": {}}
    for opt, lr in merge_learning_rates.items():
        runs = {t: traj for (o, r, t), traj in trajectories.items() if o == opt and r == float(lr)}
        if not runs:
            have = sorted({(o, r) for o, r, _ in trajectories})
            raise ValueError(f"merge_learning_rates[{opt!r}]={lr!r} has no trajectories; run one of {have}.")
        first = next(iter(runs.values()))
        chosen = list(epochs) if epochs is not None else list(range(1, first.epochs + 1))
        bad = [e for e in chosen if not (isinstance(e, int) and 1 <= e <= first.epochs)]
        if bad:
            raise ValueError(f"epochs contains {bad[0]!r}; the trajectories have epochs 1..{first.epochs}.")
        tasks = list(runs)
        tvs = {e: {t: traj.task_vector(pretrained, e) for t, traj in runs.items()} for e in chosen}
        out["merged"][opt] = merge_along_epochs(bench, pretrained, tvs, methods, expert_test_accuracy, grid, progress)
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


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (nan with fewer than two positive points)."""
    import numpy as np

    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return float("nan")
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def summary_markdown(results: Mapping[str, Any], epochs: int) -> str:
    """The closing summary of the task-vectors-as-gradients notebook, from its results dict.

    Five numbered points mirroring the notebook's goals: one-step exactness, alignment over epochs,
    the second-order term, merging by number of epochs, and the best- and worst-aligned layers.
    """
    import pandas as pd

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
    rows = [f"lr {lr:g}: gap {r.relative_gap:.2%}, predicted {r.relative_second_order:.2%} (cosine with the gap "
            f"{r.gap_cosine:.2f}), residual {r.relative_residual:.2%}" for lr, r in last.iterrows()]
    points.append(f"3. **Second-order term** (full-batch GD, {k} steps, sizes relative to "
                  "$\\lVert\\eta k \\nabla L\\rVert$). " + "; ".join(rows) + f". Log-log slope against lr: gap "
                  f"{_slope(last.index, last.relative_gap):.2f} (first order predicts 1), residual "
                  f"{_slope(last.index, last.relative_residual):.2f} (2 while the expansion holds).")

    merged, mt = results["merged_accuracy_by_epochs"], results["multitask_same_budget"]
    conv = results["merged_converged"]

    merge_epochs = [int(e) for e in next(iter(mt.values()))]

    def series(by: Mapping[str, Any]) -> str:
        return ", ".join(f"{by[str(e)]['absolute_accuracy']:.3f}" for e in merge_epochs)

    lines = []
    for opt, by_method in merged.items():
        lr = results["merge_learning_rates"][opt]
        lines.append(f"{opt} experts (lr {lr:g}): " + "; ".join(
            f"{m} {series(by)} (after {merge_epochs[0]} epoch{'s' if merge_epochs[0] > 1 else ''}: "
            f"{by[str(merge_epochs[0])]['absolute_accuracy'] / conv[m]['absolute_accuracy']:.0%} of the converged merge)"
            for m, by in by_method.items())
            + f"; multi-task with the same budget {series(mt[opt])}; the experts on their own tasks "
            f"{series(results['experts_by_epochs'][opt])}; distance from the sum of the task vectors "
            "(coefficient 1) to the multi-task displacement, relative to the latter, "
            + ", ".join(f"{results['sum_vs_multitask'][opt][str(e)]['relative_distance']:.2f}" for e in merge_epochs)
            + " (cosine " + ", ".join(f"{results['sum_vs_multitask'][opt][str(e)]['cosine']:.2f}" for e in merge_epochs)
            + ")")
    points.append(f"4. **Merging** (mean test accuracy after {', '.join(map(str, merge_epochs))} epochs). "
                  + ". ".join(lines)
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


__all__ = ["EpochTrajectory", "HVP_METHODS", "LossGradient", "alignment_table", "cosine", "dataset_gradient",
           "epoch_config", "epoch_trajectory", "gd_taylor_terms", "gradient_descent_config",
           "hessian_vector_product", "layer_cosines", "layer_groups", "layer_norm_ratios", "layer_norms",
           "loss_and_gradient", "merge_along_epochs", "merging_by_epochs", "multitask_epoch_trajectory", "norm",
           "one_step_exactness", "one_step_identity", "projection_share", "steps_per_epoch", "summary_markdown",
           "task_gradients", "task_hessian_vector_product", "task_loss_and_gradient", "taylor_gap", "taylor_table",
           "training_subset", "trajectories_dir", "trajectory_alignment", "trajectory_config", "trajectory_grid"]
