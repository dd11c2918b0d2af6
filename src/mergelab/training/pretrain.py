"""Pretraining of the tiny encoder on the pretext pool (supervised attributes or contrastive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .finetune import FinetuneConfig, batch_stream, lr_at

PRETEXT_OBJECTIVES = ("contrastive", "attributes")

@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the tiny encoder on the pretext pool.

    Attributes:
        num_steps, batch_size, lr, weight_decay, warmup_steps: AdamW with cosine schedule.
        temperature: InfoNCE temperature tau (contrastive objective only).
        seed: initialization and augmentation seed.
        objective: ``"attributes"`` (default: predict each pretext scene's generator attributes,
            :func:`pretrain_attributes`) or ``"contrastive"`` (SimCLR-style InfoNCE between two
            augmented views, :func:`pretrain_contrastive`).
    """

    num_steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    temperature: float = 0.2
    seed: int = 0
    objective: str = "attributes"

    def __post_init__(self) -> None:
        if self.objective not in PRETEXT_OBJECTIVES:
            raise ValueError(f"pretrain objective={self.objective!r} is not valid; "
                             f"use one of {', '.join(PRETEXT_OBJECTIVES)}.")
        for name in ("num_steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"pretrain {name}={getattr(self, name)!r} is not valid; use a positive integer.")
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(f"pretrain warmup_steps={self.warmup_steps!r} is not valid; "
                             f"use 0..num_steps={self.num_steps}.")
        if not self.temperature > 0:
            raise ValueError(f"pretrain temperature={self.temperature!r} is not valid; use a positive value.")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random view of a batch ``(B, 3, H, W)`` in [0, 1]: shift-crop, flip, colour jitter, channel shuffle."""
    b, _, h, w = x.shape
    pad = h // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 3, h, w + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 3, h, w)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
    out = torch.gather(out, 1, perm[:, :, None, None].expand_as(out))
    scale = 1 + 0.4 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    return (out * scale + shift).clamp(0, 1)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over two views ``(B, d)``: positives are matching rows."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _pretrain_loop(model: nn.Module, params: list[nn.Parameter], cfg: PretrainConfig, n: int,
                   step_loss: Callable[[torch.Tensor], torch.Tensor], desc: str, progress: bool) -> list[float]:
    """The loop both pretraining objectives share: AdamW over ``params``, cosine schedule with
    warm-up, ``cfg.num_steps`` steps over mini-batches of indices into ``n`` examples (seeded by
    ``cfg.seed``), gradient norm clipped at 1. ``step_loss(idx)`` maps a batch of indices ``(B,)`` to
    the scalar loss. Leaves ``model`` in eval mode; returns the loss per step."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = FinetuneConfig(lr=cfg.lr, num_steps=cfg.num_steps, warmup_steps=cfg.warmup_steps,
                           schedule="cosine", batch_size=cfg.batch_size)
    stream = batch_stream(n, min(cfg.batch_size, n), cfg.seed)
    losses = []
    bar = tqdm(range(cfg.num_steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        loss = step_loss(stream())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def pretrain_contrastive(model: nn.Module, images: torch.Tensor, cfg: PretrainConfig,
                         normalize: Callable[[torch.Tensor], torch.Tensor],
                         device: torch.device | str = "cpu", progress: bool = True) -> list[float]:
    """Pretrain ``model`` in place on unlabeled ``images`` ``(N, 3, H, W)`` in [0, 1] with a symmetric
    InfoNCE loss between two augmented views; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        x = images[idx]
        v1, v2 = normalize(augment(x, g)).to(device), normalize(augment(x, g)).to(device)
        return info_nce(model(v1), model(v2), cfg.temperature)

    return _pretrain_loop(model, list(model.parameters()), cfg, len(images), step_loss,
                          "pretrain (contrastive)", progress)


def pretrain_attributes(model: nn.Module, images: torch.Tensor, attributes: torch.Tensor,
                        n_classes: Sequence[int], cfg: PretrainConfig,
                        normalize: Callable[[torch.Tensor], torch.Tensor],
                        device: torch.device | str = "cpu", progress: bool = True) -> list[float]:
    """Supervised pretraining: predict each generator attribute of the pretext scenes with its own
    linear probe on the embedding (summed cross-entropies); the probes are dropped afterwards.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; attributes: ``(N, A)`` int64; n_classes: ``A`` class counts.
    Returns:
        The loss per step.
    """
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    with torch.no_grad():
        dim = model(normalize(images[:2]).to(device)).shape[-1]
    probes = nn.ModuleList([nn.Linear(dim, c) for c in n_classes]).to(device)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        z = model(normalize(images[idx]).to(device))
        target = attributes[idx].to(device)
        return sum(F.cross_entropy(p(z), target[:, j]) for j, p in enumerate(probes))  # type: ignore[return-value]

    return _pretrain_loop(model, list(model.parameters()) + list(probes.parameters()), cfg, len(images),
                          step_loss, "pretrain (attributes)", progress)
