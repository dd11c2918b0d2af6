"""REPAIR (Jordan et al., 2023): reset a merged model's channel statistics to the endpoints'.

Averaging aligned models shrinks the variance of hidden activations ("variance collapse"). REPAIR
measures, on training inputs, the per-channel mean and standard deviation of every conv output in
each endpoint and in the merged model, and rescales the merged conv so that its output has the mean
of the endpoints' means and the mean of their standard deviations:
``W' = W * (sigma_goal / sigma)``, ``b' = (b - mu) * sigma_goal / sigma + mu_goal`` (per output channel).
Convs are corrected in network order, each measured after the ones before it were corrected. As in
the official code only conv layers are touched (``modules=(nn.Conv2d,)``): for an MLP it changes
nothing unless ``nn.Linear`` is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..utils import check_integer, check_number


class _Enough(Exception):
    """Raised by a forward hook once every requested output of a batch is captured."""


@torch.no_grad()
def layer_stats(model: nn.Module, module_names: Sequence[str], X: torch.Tensor, batch_size: int = 512,
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation ``(C,)`` of each named module's output over ``X``,
    from one pass over ``X`` (channels: axis 1 of a convolution's output, the last axis of an ``nn.Linear``'s,
    e.g. ``(batch, tokens, C)`` in a transformer; every other axis pooled; sums in float64).

    The forward pass of a batch stops as soon as the last requested output is captured, so the
    statistics of an early layer cost only the layers before it.
    """
    check_integer("batch_size", batch_size)
    if len(X) == 0:
        raise ValueError("X is empty; give the inputs (e.g. training images) whose activations set the statistics.")
    modules = dict(model.named_modules())
    unknown = [n for n in module_names if n not in modules]
    if unknown:
        raise ValueError(f"module names {unknown} are not modules of the model; it has "
                         f"{[n for n in modules if n][:8]}...")
    wanted = list(dict.fromkeys(module_names))
    sums: dict[str, list] = {n: [None, None, 0] for n in wanted}
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            captured[name] = out.detach().double()
            if len(captured) == len(wanted):
                raise _Enough
        return capture

    handles = [modules[n].register_forward_hook(hook(n)) for n in wanted]
    channel_axis = {n: -1 if isinstance(modules[n], nn.Linear) else 1 for n in wanted}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(X), batch_size):
            captured.clear()
            try:
                model(X[i:i + batch_size])
            except _Enough:
                pass
            for name in wanted:
                out = captured[name].movedim(channel_axis[name], -1)
                out = out.reshape(-1, out.shape[-1])
                acc = sums[name]
                s, sq = out.sum(0), (out * out).sum(0)
                acc[0] = s if acc[0] is None else acc[0] + s
                acc[1] = sq if acc[1] is None else acc[1] + sq
                acc[2] += out.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats = {}
    for name, (total, total_sq, count) in sums.items():
        mean = total / count
        stats[name] = (mean, (total_sq / count - mean * mean).clamp_min(0).sqrt())
    return stats


def channel_stats(model: nn.Module, module_name: str, X: torch.Tensor, batch_size: int = 512,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation ``(C,)`` of ``module_name``'s output over ``X``
    (channels as in :func:`layer_stats`; every other axis pooled)."""
    return layer_stats(model, [module_name], X, batch_size)[module_name]


@torch.no_grad()
def repair(merged: nn.Module, endpoints: Sequence[nn.Module], X: torch.Tensor,
           modules: tuple[type[nn.Module], ...] = (nn.Conv2d,), eps: float = 1e-8, batch_size: int = 512,
           names: list[str] | None = None,
           goal_stats: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
           ) -> dict[str, dict[str, float]]:
    """Correct ``merged`` in place so every chosen layer's output channels have the endpoints' mean
    statistics on ``X`` (training inputs); return, per layer, how much it changed
    (``{"max_scale_change": max |a - 1|, "max_shift": max |shift|}``).

    Args:
        merged: the merged model (modified in place).
        endpoints: the models that were merged, in any frame (channel statistics are matched by
            position, so they must be in the merged model's frame: pass the aligned endpoints).
        X: inputs, ``(N, ...)``.
        modules: layer types to correct; each needs a bias.
        eps: floor on the merged standard deviation.
        names: the layers to correct, by module name, in network order (overrides ``modules``; e.g. an
            MLP's hidden layers without its classifier).
        goal_stats: the endpoints' :func:`layer_stats` of every corrected layer, already in the merged
            model's frame (one mapping per endpoint); when given, ``endpoints`` are not run (they may be
            empty). Several merges of the same endpoints can share one pass over each of them this way
            (:func:`permute_stats`).
    """
    if not endpoints and not goal_stats:
        raise ValueError("repair needs at least one endpoint model (or their goal_stats).")
    check_number("eps", eps, low=0, low_open=True)
    if names is None:
        names = [n for n, m in merged.named_modules() if isinstance(m, modules)]
        if not names:
            raise ValueError(f"the model has no layer of the types modules={tuple(t.__name__ for t in modules)} to "
                             "correct; pass names=[...] (e.g. an MLP's hidden nn.Linear layers) or other modules.")
    modules = dict(merged.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"repair names={unknown} are not modules of the model; it has "
                         f"{[n for n in modules if n][:8]}...")
    if goal_stats is not None:
        missing = sorted({n for n in names for g in goal_stats if n not in g})
        if missing:
            raise ValueError(f"goal_stats lacks the layers {missing}; give the statistics of every corrected layer.")
        goals = list(goal_stats)
    else:
        goals = [layer_stats(e, names, X, batch_size) for e in endpoints]  # endpoints never change: one pass each
    report = {}
    for name in names:
        layer = modules[name]
        if getattr(layer, "bias", None) is None:
            raise ValueError(f"layer {name!r} has no bias; REPAIR folds its correction into a bias.")
        goal = [g[name] for g in goals]
        mu_goal = torch.stack([g[0] for g in goal]).mean(0)
        sd_goal = torch.stack([g[1] for g in goal]).mean(0)
        mu, sd = channel_stats(merged, name, X, batch_size)
        a = sd_goal / sd.clamp_min(eps)
        shift = mu_goal - a * mu
        w = layer.weight
        layer.weight.copy_((w.double() * a.view(-1, *([1] * (w.ndim - 1)))).to(w.dtype))
        layer.bias.copy_((layer.bias.double() * a + shift).to(w.dtype))
        report[name] = {"max_scale_change": float((a - 1).abs().max()),
                        "max_shift": float(shift.abs().max())}
    return report


def permute_stats(stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], groups: Mapping[str, str | None],
                  perms: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Channel statistics of a model permuted by ``perms``, from those of the model itself: channel ``c``
    of layer ``name`` becomes channel ``perms[groups[name]][c]`` of the original (the convention of
    :func:`mergelab.alignment.apply_permutation`); a layer whose group is ``None`` keeps its order.

    Args:
        stats: ``{layer: (mean (C,), std (C,))}`` (:func:`layer_stats`).
        groups: ``{layer: the permutation group of its output channels}``.
        perms: ``{group: index tensor (C,)}``.
    """
    out = {}
    for name, (mean, std) in stats.items():
        g = groups[name]
        out[name] = (mean, std) if g is None else (mean[perms[g]], std[perms[g]])
    return out
