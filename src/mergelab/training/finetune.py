"""Fine-tuning: the configuration, learning-rate schedules, optimizers, the data-subset rule and
the training loop every benchmark size shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..utils import check_integer, check_number, eval_mode, keeps_global_rng

OPTIMIZERS = ("sgd", "adam", "adamw")

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run (all explicit: they key the expert cache).

    Attributes:
        optimizer: ``"sgd"`` (momentum ``momentum``), ``"adam"`` or ``"adamw"``.
        lr: peak learning rate eta.
        batch_size: examples per step b.
        num_steps: optimizer steps T.
        schedule: ``"constant"``, ``"cosine"`` (to 0) or ``"linear"`` (to 0), after ``warmup_steps``.
        warmup_steps: linear warm-up steps from 0 to ``lr``.
        weight_decay: decoupled for AdamW, L2 for SGD/Adam.
        momentum: SGD momentum (ignored by Adam/AdamW).
        grad_clip: max global gradient norm, ``0`` for none.
        seed: seeds data order and any randomness of the run.
        data_fraction: share of the task's training split used, in ``(0, 1]``; the subset is
            drawn once from ``seed``.
        frozen: names of the encoder's parameters, or of modules holding them (``"conv1"``: the patch stem's
            ``conv1.weight``), kept at their starting values while the run trains; stored sorted. Empty (the
            default): every parameter trains, and the setting stays out of every cache key
            (:func:`recipe_fields`), so the keys of runs made before it existed still hold.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    batch_size: int = 64
    num_steps: int = 120
    schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float = 1.0
    seed: int = 0
    data_fraction: float = 1.0
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not valid; use one of {', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not valid; use one of {', '.join(SCHEDULES)}.")
        check_number("lr", self.lr, low=0, low_open=True)
        for name in ("batch_size", "num_steps"):
            check_integer(name, getattr(self, name))
        check_integer("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} is not valid; use 0..num_steps={self.num_steps}.")
        check_integer("seed", self.seed, minimum=0)
        check_number("data_fraction", self.data_fraction, low=0, high=1, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            check_number(name, getattr(self, name), low=0)
        # below 1 (SGD diverges at and above 1, and torch accepts it silently); torch's SGD refuses a negative one
        # where the run trains (tests/test_executors.py's failing run relies on that); Adam ignores momentum
        check_number("momentum", self.momentum, high=1, high_open=True)
        for name in FLOAT_FIELDS:  # 1 and 1.0 are one setting: one cache key (a sweep's levels may hold either)
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "frozen", _frozen_names(self.frozen))

    def recorded_fields(self) -> dict[str, Any]:
        """:func:`recipe_fields` of this recipe (what :func:`mergelab.utils.to_jsonable` writes and hashes)."""
        return recipe_fields(self)

    @classmethod
    def from_params(cls, finetune: Mapping[str, Any], parameter: str = "finetune", settings_name: str = "seed",
                    **settings: Any) -> "FinetuneConfig":
        """The recipe of a chapter's ``finetune`` parameter (a mapping of this class's fields) with ``settings``
        beside it (``seed``, chapter 01's ``centre``...; ``settings_name`` says where they come from, for the
        messages). A key that is not a field, or that both set, is refused naming the parameter, the value and
        the valid fields; a key left out takes this class's default."""
        if not isinstance(finetune, Mapping):
            raise ValueError(f"{parameter}={finetune!r} is not valid; give a mapping of fine-tuning settings "
                             f"({', '.join(f.name for f in fields(cls))}).")
        valid = [f.name for f in fields(cls)]
        for key in [*finetune, *settings]:
            if key not in valid:
                where, value = (parameter, dict(finetune)) if key in finetune else (settings_name, settings)
                raise ValueError(f"{where}={value!r} has {key!r}, which is not a fine-tuning setting; valid: "
                                 f"{', '.join(valid)}.")
        twice = sorted(set(finetune) & set(settings))
        if twice:
            raise ValueError(f"{parameter} sets {twice[0]!r}={finetune[twice[0]]!r}, which {settings_name} sets too "
                             f"({twice[0]}={settings[twice[0]]!r}); remove it from one of them.")
        return cls(**finetune, **settings)


def _frozen_names(value: Any) -> tuple[str, ...]:
    """``frozen`` as a sorted tuple of distinct names; anything but a list or tuple of non-empty strings is refused."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() == v and v and not v.startswith(".") and not v.endswith(".") for v in value):
        raise ValueError(f"frozen={value!r} is not valid; give a list of parameter or module names of the encoder "
                         "(e.g. ['conv1'] for the patch stem), or [] to train every parameter.")
    if len(set(value)) != len(value):
        raise ValueError(f"frozen={value!r} is not valid; it names {sorted(v for v in set(value) if value.count(v) > 1)[0]!r} "
                         "twice: give each name once.")
    return tuple(sorted(value))


def recipe_fields(cfg: "FinetuneConfig") -> dict[str, Any]:
    """``cfg``'s settings as a mapping, the way every cache key and log records them: ``frozen`` is left out while
    it is empty (the keys of whole-model runs are the ones they had before the setting existed) and is a list
    otherwise."""
    out = asdict(cfg)
    if out["frozen"]:
        out["frozen"] = list(out["frozen"])
    else:
        del out["frozen"]
    return out


def frozen_parameters(model: nn.Module, frozen: Sequence[str]) -> list[str]:
    """The names of ``model``'s parameters that ``frozen`` (parameter or module names) holds: a parameter is held
    when its name is one of them or starts with one of them and a dot. A name that holds no parameter is refused,
    naming the modules that could be given."""
    names = [n for n, _ in model.named_parameters()]
    held_by = {f: [n for n in names if n == f or n.startswith(f + ".")] for f in frozen}
    for f, held in held_by.items():
        if not held:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"frozen={list(frozen)!r} has {f!r}, which is no parameter or module of the encoder; "
                             f"its top-level names are {', '.join(tops)}.")
    return [n for n in names if any(n in held for held in held_by.values())]


@contextmanager
def frozen_during(model: nn.Module, frozen: Sequence[str]):
    """Within the block, the parameters ``frozen`` holds (:func:`frozen_parameters`) do not require gradients;
    afterwards every parameter's ``requires_grad`` is what it was. Yields the held names."""
    held = set(frozen_parameters(model, frozen))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            if n in held:
                p.requires_grad_(False)
        yield sorted(held)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


FLOAT_FIELDS = ("lr", "weight_decay", "momentum", "grad_clip", "data_fraction")
""":class:`FinetuneConfig`'s real-valued settings, stored as ``float`` whichever number type they were given as."""


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate used at optimizer step ``step`` (0-based) under ``cfg``'s schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


def make_optimizer(params: Sequence[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def subset_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The first ``ceil(fraction * n)`` of a seeded permutation of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    keep = max(1, math.ceil(fraction * n))
    return torch.randperm(n, generator=g)[:keep]


def training_indices(n: int, cfg: "FinetuneConfig", task_index: int = 0) -> torch.Tensor:
    """The rows of a task's training split (``n`` examples) that a run under ``cfg`` trains on: the
    ``data_fraction`` subset drawn from ``cfg.seed + 7919 * task_index`` (``task_index``: the task's
    position in the run's sorted task list, 0 for an expert). Every loop and analysis uses this rule."""
    return subset_indices(n, cfg.data_fraction, cfg.seed + 7919 * task_index)


def batch_stream(n: int, batch_size: int, seed: int) -> Callable[[], torch.Tensor]:
    """Indices of successive mini-batches: epochs of seeded permutations, without replacement."""
    g = torch.Generator().manual_seed(seed + 1)
    state = {"perm": torch.randperm(n, generator=g), "pos": 0}

    def next_batch() -> torch.Tensor:
        if state["pos"] + batch_size > n and state["pos"] > 0:
            state["perm"], state["pos"] = torch.randperm(n, generator=g), 0
        idx = state["perm"][state["pos"]:state["pos"] + batch_size]
        state["pos"] += batch_size
        return idx

    return next_batch


@keeps_global_rng
def finetune(model: nn.Module, tasks: Mapping[str, tuple[Any, torch.Tensor]],
             heads: Mapping[str, nn.Module], cfg: FinetuneConfig,
             device: torch.device | str = "cpu", desc: str = "fine-tune",
             progress: bool = True,
             on_step: Callable[[int, nn.Module], None] | None = None,
             micro_batch_size: int | None = None,
             active: Callable[[str, int], bool] | None = None) -> dict[str, list[float]]:
    """Fine-tune ``model`` (the encoder, in place) on one or more tasks with frozen heads.

    With several tasks (multi-task learning), every step sums the mean cross-entropy of one
    mini-batch of ``cfg.batch_size`` from each task.

    Args:
        model: encoder mapping ``(B, 3, H, W)`` to ``(B, d)``; left in eval mode afterwards.
        tasks: task name to ``(X, y)`` with ``X`` ``(N, 3, H, W)`` and ``y`` ``(N,)`` int64 (CPU). ``X``
            may be any indexable of images whose ``X[index tensor]`` is a stacked tensor (the clip
            benchmark's lazy :class:`~mergelab.benchmarks.clip.datasets.ImageView`); the ``data_fraction``
            subset is stacked once, before the first step.
        heads: task name to a frozen head mapping ``(B, d)`` features to logits (in eval mode while it
            trains; each keeps the mode it came in).
        cfg: hyperparameters; ``cfg.data_fraction`` subsamples each task's ``(X, y)``; the parameters of
            ``cfg.frozen`` keep their values (they take no gradient and no optimizer step, weight decay included).
        device: where to train.
        on_step: called as ``on_step(step, model)`` after every optimizer step (``step`` counts from
            1), e.g. to snapshot the weights along the trajectory or record gradient norms.
        micro_batch_size: forward at most this many examples at once; a larger batch accumulates the
            gradients of its chunks (each weighted by its share of the batch), which gives the same
            step up to float rounding with bounded memory. ``None`` (or batches no larger than it): the
            whole batch at once.
        active: ``active(task, step)`` says whether ``task`` contributes a mini-batch at ``step``
            (0-based); ``None``: every task at every step. A task's batches are drawn only at the
            steps where it is active, so it walks its own data in the same order as without it.

    Returns:
        ``{"loss": [...], "lr": [...], "grad_norm": [...]}`` per step (loss summed over tasks;
        ``grad_norm``: the mini-batch gradient's norm before clipping, recorded when ``cfg.grad_clip
        > 0``, else empty).
    """
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
        raise ValueError(f"micro_batch_size={micro_batch_size!r} is not valid; use a positive integer or None.")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    heads = {t: h.to(device) for t, h in heads.items()}
    # the caller's heads as they came (the model ends in eval mode, as documented); cfg.frozen held where they are
    with eval_mode(*heads.values()), frozen_during(model, cfg.frozen):
        return _finetune_loop(model, tasks, heads, cfg, device, progress, desc, on_step, micro_batch_size, active)


def _finetune_loop(model: nn.Module, tasks: Mapping[str, tuple[Any, torch.Tensor]], heads: Mapping[str, nn.Module],
                   cfg: FinetuneConfig, device: torch.device | str, progress: bool, desc: str,
                   on_step: Callable[[int, nn.Module], None] | None, micro_batch_size: int | None,
                   active: Callable[[str, int], bool] | None) -> dict[str, list[float]]:
    """:func:`finetune`'s steps, on a seeded stream, with the model in train mode and the heads in eval mode."""
    data, streams = {}, {}
    for i, (task, (X, y)) in enumerate(sorted(tasks.items())):
        keep = training_indices(len(y), cfg, i)
        data[task] = (X[keep], y[keep])
        streams[task] = batch_stream(len(keep), min(cfg.batch_size, len(keep)), cfg.seed + 104729 * i)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    history: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": []}
    whole_batches = micro_batch_size is None or all(min(cfg.batch_size, len(y)) <= micro_batch_size
                                                    for _, y in data.values())
    bar = tqdm(range(cfg.num_steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        if whole_batches and active is None:
            loss = torch.zeros((), device=device)
            for task, (X, y) in data.items():
                idx = streams[task]()
                logits = heads[task](model(X[idx].to(device, non_blocking=True)))
                loss = loss + F.cross_entropy(logits, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for task, (X, y) in data.items():
                if active is not None and not active(task, step):
                    continue
                idx = streams[task]()
                chunk = len(idx) if micro_batch_size is None else micro_batch_size
                for i in range(0, len(idx), chunk):
                    part = idx[i:i + chunk]
                    logits = heads[task](model(X[part].to(device, non_blocking=True)))
                    part_loss = F.cross_entropy(logits, y[part].to(device), reduction="sum") / len(idx)
                    part_loss.backward()
                    loss = loss + part_loss.detach()
        if cfg.grad_clip > 0:
            history["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        opt.step()
        history["loss"].append(float(loss.detach()))
        history["lr"].append(lr)
        if on_step is not None:
            on_step(step + 1, model)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    model.eval()
    return history
