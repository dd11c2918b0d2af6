"""Pretraining of the tiny encoder on the pretext pool (supervised attributes or contrastive).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..utils import check_integer, check_number, keeps_global_rng
from .finetune import FinetuneConfig, batch_stream, lr_at

PRETEXT_OBJECTIVES = ("contrastive", "attributes", "factors")

@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the tiny encoder on the pretext pool.

    Attributes:
        num_steps, batch_size, lr, weight_decay, warmup_steps: AdamW with cosine schedule. The
            default (3000 steps of 64 from a pool of 20,000 scenes, warm-up 200) costs about 3.5 min
            on one unloaded CPU thread (0.07 s per step), the same as 1500 steps of 128, and reaches a
            lower factor loss (3.23 vs 3.32); the loss is still falling at the end (docs/tiny-benchmark.md).
        temperature: InfoNCE temperature tau (the contrastive objective, and the ``unlabelled_weight`` term).
        seed: initialization and augmentation seed.
        unlabelled_weight: weight of a contrastive term on the eight tasks' *unlabelled* training images
            (``factors`` objective only; 0, the default, turns it off), as web pretraining sees images of
            the downstream domains without their labels: each step takes the next ``unlabelled_batch`` of
            them (passes in random order, no image twice in a batch),
            makes two views of each (:func:`task_view`) and adds ``unlabelled_weight`` times the
            symmetric InfoNCE loss (``temperature``) of their embeddings through a 2-layer projection head
            (dropped afterwards). The tiny size uses 0.5 (docs/tiny-benchmark.md, sessions 6 and 7).
        unlabelled_batch: images of that term per step.
        view_shift, view_brightness, view_noise: the views of that term: a shift of at most
            ``view_shift`` pixels, a brightness factor in ``1 +- view_brightness`` and Gaussian pixel
            noise of SD ``view_noise`` (pixel values in [0, 1]). The tiny size keeps position (shift 0):
            several tasks are about where things are.
        objective: ``"factors"`` (default: predict each pretext scene's generator factors, kind and
            pattern classes, 17 continuous attributes and glyph strokes, :func:`pretrain_factors`),
            ``"attributes"`` (only the two class targets, :func:`pretrain_attributes`) or
            ``"contrastive"`` (SimCLR-style InfoNCE between two augmented views,
            :func:`pretrain_contrastive`). None is a label of the eight tasks.
    """

    num_steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    temperature: float = 0.2
    seed: int = 0
    objective: str = "factors"
    unlabelled_weight: float = 0.0
    unlabelled_batch: int = 64
    view_shift: int = 0
    view_brightness: float = 0.1
    view_noise: float = 0.05

    def __post_init__(self) -> None:
        if self.objective not in PRETEXT_OBJECTIVES:
            raise ValueError(f"pretrain objective={self.objective!r} is not valid; "
                             f"use one of {', '.join(PRETEXT_OBJECTIVES)}.")
        for name in ("num_steps", "batch_size"):
            check_integer(f"pretrain {name}", getattr(self, name))
        check_integer("pretrain warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.num_steps:
            raise ValueError(f"pretrain warmup_steps={self.warmup_steps!r} is not valid; "
                             f"use 0..num_steps={self.num_steps}.")
        check_integer("pretrain seed", self.seed, minimum=0)
        check_number("pretrain lr", self.lr, low=0, low_open=True)
        check_number("pretrain temperature", self.temperature, low=0, low_open=True)
        for name in ("weight_decay", "unlabelled_weight", "view_brightness", "view_noise"):
            check_number(f"pretrain {name}", getattr(self, name), low=0)
        if not self.view_brightness < 1:
            raise ValueError(f"pretrain view_brightness={self.view_brightness!r} is not valid; use 0 <= value < 1 "
                             "(the brightness factor is drawn from 1 +- view_brightness and must stay positive).")
        if isinstance(self.unlabelled_batch, bool) or not isinstance(self.unlabelled_batch, int) or self.unlabelled_batch < 2:
            raise ValueError(f"pretrain unlabelled_batch={self.unlabelled_batch!r} is not valid; use an integer "
                             ">= 2 (InfoNCE needs negatives).")
        check_integer("pretrain view_shift", self.view_shift, minimum=0)
        if self.unlabelled_weight > 0 and self.objective != "factors":
            raise ValueError(f"pretrain unlabelled_weight={self.unlabelled_weight!r} is only used by objective "
                             f"'factors', not {self.objective!r}; set it to 0 or use objective 'factors'.")


def shift_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(B, 3, H, W)`` shifted by its own random offset of at most ``pad`` pixels
    per axis: a crop of the reflect-padded batch (``pad = 0``: unchanged)."""
    if pad == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 3, h, w + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 3, h, w)
    return torch.gather(out, 3, cols)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random view of a batch ``(B, 3, H, W)`` in [0, 1]: shift-crop, flip, colour jitter, channel shuffle."""
    b = x.shape[0]
    out = shift_crop(x, x.shape[2] // 8, g)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
    out = torch.gather(out, 1, perm[:, :, None, None].expand_as(out))
    scale = 1 + 0.4 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    return (out * scale + shift).clamp(0, 1)


def task_view(x: torch.Tensor, g: torch.Generator, shift: int = 0, brightness: float = 0.1,
              noise: float = 0.05) -> torch.Tensor:
    """A random view of a batch ``(B, 3, H, W)`` in [0, 1] that keeps what the tiny tasks ask for (no
    flip: orientation; no channel shuffle: colour): :func:`shift_crop` by at most ``shift`` pixels, each
    image's brightness scaled by a factor uniform in ``1 +- brightness``, Gaussian pixel noise of SD
    ``noise``, clamped to [0, 1]."""
    out = shift_crop(x, shift, g)
    out = out * (1 + 2 * brightness * (torch.rand(x.shape[0], 1, 1, 1, generator=g) - 0.5))
    if noise:
        out = out + noise * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


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


@keeps_global_rng
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


@keeps_global_rng
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


@keeps_global_rng
def pretrain_factors(model: nn.Module, images: torch.Tensor, targets: Mapping[str, torch.Tensor],
                     n_classes: Mapping[str, int], cfg: PretrainConfig,
                     normalize: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device | str = "cpu", progress: bool = True,
                     regression_weight: float = 2.0, strokes_weight: float = 4.0,
                     unlabelled: torch.Tensor | None = None) -> list[float]:
    """Supervised pretraining on the generator factors of the pretext scenes, through one linear map
    of the embedding (dropped afterwards).

    The loss per step is the sum of: a cross-entropy per class target (``n_classes`` names them, with
    their class counts; label -100 is ignored); ``regression_weight`` times the mean squared error of
    the standardized ``targets["regression"]`` ``(N, R)`` (NaN entries are ignored); ``strokes_weight``
    times the binary cross-entropy of ``targets["strokes"]`` ``(N, S)`` in {0, 1} (NaN ignored); with
    ``cfg.unlabelled_weight`` > 0, that weight times the contrastive term on ``unlabelled`` images
    (:class:`PretrainConfig`).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        targets: class targets ``(N,)`` int64 named as in ``n_classes``, plus ``"regression"`` and
            ``"strokes"`` (see :func:`mergelab.benchmarks.tiny.pretext.load_pretext`).
        unlabelled: ``(M, 3, H, W)`` in [0, 1], images for the contrastive term (``cfg.unlabelled_weight``
            > 0; their labels are never read).
    Returns:
        The loss per step.
    """
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    reg = targets["regression"].float()
    mean = torch.nanmean(reg, 0)
    std = torch.sqrt(torch.nanmean((reg - mean) ** 2, 0)).clamp_min(1e-6)
    reg = (reg - mean) / std
    strokes = targets["strokes"].float()
    with torch.no_grad():
        dim = model(normalize(images[:2]).to(device)).shape[-1]
    sizes = list(n_classes.values()) + [reg.shape[1], strokes.shape[1]]
    probe = nn.Linear(dim, sum(sizes)).to(device)
    extra: list[nn.Parameter] = list(probe.parameters())
    contrast: Callable[[], torch.Tensor] | None = None
    if cfg.unlabelled_weight > 0:
        if unlabelled is None or len(unlabelled) < cfg.unlabelled_batch:
            raise ValueError(f"pretrain unlabelled_weight={cfg.unlabelled_weight!r} needs unlabelled images, at "
                             f"least unlabelled_batch={cfg.unlabelled_batch}; got "
                             f"{'none' if unlabelled is None else len(unlabelled)}.")
        if cfg.view_shift >= min(unlabelled.shape[-2:]):
            raise ValueError(f"pretrain view_shift={cfg.view_shift!r} is not valid for images of "
                             f"{tuple(unlabelled.shape[-2:])} pixels; use 0..{min(unlabelled.shape[-2:]) - 1}.")
        projection, contrast = _contrastive_term(model, unlabelled, cfg, normalize, dim, device)
        extra += list(projection.parameters())

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        out = probe(model(normalize(images[idx]).to(device))).split(sizes, dim=-1)
        loss = sum(F.cross_entropy(o, targets[name][idx].to(device), ignore_index=-100)
                   for o, name in zip(out, n_classes))
        r = reg[idx].to(device)
        known = ~torch.isnan(r)
        loss = loss + regression_weight * ((out[-2] - r.nan_to_num()) ** 2 * known).sum() / known.sum().clamp_min(1)
        s = strokes[idx].to(device)
        known = ~torch.isnan(s)
        bce = F.binary_cross_entropy_with_logits(out[-1], s.nan_to_num(), reduction="none")
        loss = loss + strokes_weight * (bce * known).sum() / known.sum().clamp_min(1)
        return loss if contrast is None else loss + cfg.unlabelled_weight * contrast()  # type: ignore[return-value]

    desc = "pretrain (factors" + (" + unlabelled task images)" if contrast is not None else ")")
    return _pretrain_loop(model, list(model.parameters()) + extra, cfg, len(images), step_loss, desc, progress)


def _contrastive_term(model: nn.Module, unlabelled: torch.Tensor, cfg: PretrainConfig,
                      normalize: Callable[[torch.Tensor], torch.Tensor], dim: int,
                      device: torch.device | str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The unlabelled images' term of :func:`pretrain_factors`: ``(projection head, term)``, where ``term()``
    takes the next ``cfg.unlabelled_batch`` of ``unlabelled`` ``(M, 3, H, W)`` (passes over them in seeded
    random order, without replacement: no image is its own negative), makes two :func:`task_view` of
    each and returns the symmetric InfoNCE loss of their embeddings through the projection head
    (``dim -> 64 -> 64``, trained with the encoder, dropped afterwards). Its order and views come from
    generators seeded by ``cfg.seed``, apart from the pretext batches'."""
    projection = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64)).to(device)
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # the views
    batches = batch_stream(len(unlabelled), cfg.unlabelled_batch, 20_000 + cfg.seed)  # which images

    def view(x: torch.Tensor) -> torch.Tensor:
        return normalize(task_view(x, g, cfg.view_shift, cfg.view_brightness, cfg.view_noise)).to(device)

    def term() -> torch.Tensor:
        x = unlabelled[batches()]
        return info_nce(projection(model(view(x))), projection(model(view(x))), cfg.temperature)

    return projection, term
