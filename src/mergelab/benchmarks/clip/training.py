"""The fine-tuning loop of the ``clip`` benchmark: seeded step batches, mixed precision, resumable.

:func:`finetune_encoder` is the loop behind :meth:`ClipBenchmark.finetune_encoder
<mergelab.benchmarks.clip.benchmark.ClipBenchmark.finetune_encoder>` (experts, multi-task models and
sweeps); :class:`StepBatchSampler` makes batch ``s`` a function of ``(seed, s)`` so that a resumed run
sees the batches an uninterrupted one would; :func:`save_partial` writes the resume point atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ...training import FinetuneConfig, frozen_during, lr_at, make_optimizer, training_indices
from ...utils import keeps_global_rng, shows_progress
from .model import autocast


class StepBatchSampler(Sampler[list[int]]):
    """Mini-batches for steps ``start..num_steps-1``: batch ``s`` is a function of ``(seed, s)`` only.

    Epochs are seeded permutations of ``range(n)`` cut into ``n // batch_size`` full batches, so a
    run resumed at step ``s`` sees the same batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, num_steps: int) -> None:
        self.n, self.b = n, min(batch_size, n)
        self.seed, self.start, self.num_steps = seed, start, num_steps
        self.per_epoch = max(1, n // self.b)
        self._perm: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1][pos * self.b:(pos + 1) * self.b].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.num_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start)


@keeps_global_rng
def finetune_encoder(bench: Any, encoder: nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                     on_step: Callable[[int, nn.Module], None] | None = None, desc: str = "fine-tune",
                     progress: bool | None = None, partial: Path | None = None) -> dict[str, Any]:
    """Fine-tune ``encoder`` on ``tasks`` of ``bench`` (a :class:`ClipBenchmark`) with ``cfg``; see
    :meth:`ClipBenchmark.finetune_encoder` for the behaviour and the returned history. The parameters of
    ``cfg.frozen`` keep their values, as in :func:`mergelab.training.finetune`."""
    with frozen_during(encoder, cfg.frozen):
        return _finetune_steps(bench, encoder, tasks, cfg, on_step, desc, progress, partial)


def _finetune_steps(bench: Any, encoder: nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                    on_step: Callable[[int, nn.Module], None] | None, desc: str, progress: bool | None,
                    partial: Path | None) -> dict[str, Any]:
    """:func:`finetune_encoder`'s steps, with ``cfg.frozen``'s parameters already out of the optimizer."""
    device = bench.device
    torch.manual_seed(cfg.seed)
    enc = encoder.to(device).train()
    heads = {t: bench.head(t).to(device).eval() for t in tasks}
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=bench.amp == torch.float16)
    history: dict[str, Any] = {"loss": [], "lr": [], "grad_norm": []}
    start = 0
    if partial is not None and partial.is_file():
        ck = torch.load(str(partial), map_location="cpu", weights_only=True)
        saved = ck.get("precision", bench.precision)
        if saved != bench.precision:
            raise ValueError(
                f"the partial checkpoint {partial} was trained in {saved}, this run uses model.precision="
                f"{bench.config.model.precision!r} ({bench.precision}) on {device}: resuming would mix "
                f"them. Delete it to start over, or set model.precision: {saved} to resume it.")
        enc.load_state_dict(ck["encoder"])
        opt.load_state_dict(ck["optimizer"])
        if ck["scaler"]:  # a disabled scaler (fp32, bf16) saves an empty state
            scaler.load_state_dict(ck["scaler"])
        start = int(ck["step"])
        history = {"loss": list(ck["loss"]), "lr": list(ck["lr"]), "grad_norm": list(ck.get("grad_norm", [])),
                   "resumed_at_step": start, "resumed_wall_s": float(ck["wall_time_s"])}
    begun = time.perf_counter()
    streams = []
    for i, t in enumerate(sorted(tasks)):
        data = bench.dataset(t, "train", train_transform=True)
        keep = training_indices(len(data), cfg, i).tolist()
        data = torch.utils.data.Subset(data, keep)
        sampler = StepBatchSampler(len(keep), cfg.batch_size, cfg.seed + 104729 * i, start, cfg.num_steps)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=bench.config.data.num_workers,
                            pin_memory=device.type == "cuda")
        streams.append((t, iter(loader)))
    if start:  # after the loaders drew their seeds: augmentations continue as if never interrupted
        torch.set_rng_state(ck["rng"])
    show = shows_progress(bench, progress)
    bar = tqdm(range(start, cfg.num_steps), desc=desc, disable=not show, leave=False, mininterval=1.0)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.zeros((), device=device)
        for t, it in streams:
            X, y = next(it)
            with autocast(device, bench.amp):
                features = enc(X.to(device, non_blocking=True))
            loss = loss + F.cross_entropy(heads[t](features.float()), y.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            history["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
        scaler.step(opt)
        scaler.update()
        history["loss"].append(float(loss.detach()))
        history["lr"].append(lr)
        done = step + 1
        if on_step is not None:
            on_step(done, enc)
        if partial is not None and done % bench.config.checkpoint_every == 0 and done < cfg.num_steps:
            save_partial(partial, enc, opt, scaler, done, history,
                               history.get("resumed_wall_s", 0.0) + time.perf_counter() - begun, bench.precision)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    enc.eval()
    return history


def save_partial(path: Path, enc: nn.Module, opt: torch.optim.Optimizer, scaler: Any, step: int,
                 history: dict[str, Any], wall_s: float, precision: str = "fp32") -> None:
    """Write the resume point of a run at ``step`` to ``path`` atomically: encoder, optimizer, loss
    scaler, history, wall seconds so far, precision and the CPU random state."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"encoder": {k: v.detach().cpu() for k, v in enc.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "precision": precision,
                "loss": history["loss"], "lr": history["lr"], "grad_norm": history["grad_norm"],
                "wall_time_s": wall_s,
                "rng": torch.get_rng_state()}, str(tmp))
    os.replace(tmp, path)

