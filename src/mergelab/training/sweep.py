"""Sweeps of fine-tuning runs: many experts, each cached, several checkpoints from one run, resumable.

:func:`sweep` takes configurations x tasks and makes sure every requested expert exists in the
benchmark's expert cache (``<bench.experts_dir>/expert-<key>.safetensors`` with a JSON sidecar), so
``bench.expert(task, cfg)`` (or :func:`checkpoint_state`) returns it without training. Every run goes
through the benchmark's own training loop (``bench.finetune_encoder``), so a swept expert is the one
``bench.expert`` would train. It

* snapshots several step counts from **one** run: with a constant learning rate (after warm-up), the
  first ``s`` steps of a run with ``num_steps = T`` are exactly the run with ``num_steps = s`` (same
  seeds, same batches), so the weights after ``s`` steps are cached under the key of that shorter run;
* writes every checkpoint atomically (safetensors, then JSON); a checkpoint counts as done only when
  both exist, so an interrupted sweep resumes by skipping what exists and re-running the rest;
* runs through an executor (:mod:`mergelab.executors`): a process pool of ``workers`` processes
  (each with ``torch.set_num_threads(1)``), this process when ``workers == 1``, or a Ray cluster;
  with a tqdm bar over runs (done / total, failures); a failed run is reported with its
  configuration while the others finish and are cached;
* probes the trajectory: the per-example gradient norms of the run's loss on a few of its own training
  examples at ``theta_0`` and at every checkpoint (the constants of :mod:`mergelab.analysis.stability`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..autodiff import per_example_gradient_norms
from .finetune import FinetuneConfig, recipe_fields, training_indices
from ..cache import Artifact, file_sha256
from ..executors import Executor, LocalExecutor, benchmark_context
from ..utils import (
    StateDict,
    atomic_save_safetensors,
    atomic_write_json,
    check_integer,
    size_threads,
    task_names,
    torch_threads,
)

_CONFIG_FIELDS = tuple(f.name for f in fields(FinetuneConfig))


# ----------------------------------------------------------------------------- grids of configurations
def config_grid(base: FinetuneConfig, **axes: Sequence[Any]) -> list[FinetuneConfig]:
    """Every combination of ``axes`` (full factorial) applied to ``base``.

    Example: ``config_grid(base, lr=[0.01, 0.03], batch_size=[16, 32])`` gives 4 configurations.
    """
    _check_axes(axes)
    names = list(axes)
    return [replace(base, **dict(zip(names, values))) for values in itertools.product(*(axes[n] for n in names))]


def one_at_a_time(base: FinetuneConfig, **axes: Sequence[Any]) -> list[FinetuneConfig]:
    """``base`` plus every configuration that changes exactly one of ``axes`` from ``base``
    (a one-factor-at-a-time design: ``1 + sum(len(levels) - 1)`` configurations when ``base``'s value
    is among each axis' levels)."""
    _check_axes(axes)
    out = [base]
    for name, levels in axes.items():
        for value in levels:
            cfg = replace(base, **{name: value})
            if cfg not in out:
                out.append(cfg)
    return out


def _check_axes(axes: Mapping[str, Sequence[Any]]) -> None:
    for name, levels in axes.items():
        if name not in _CONFIG_FIELDS:
            raise ValueError(f"axis {name!r} is not a FinetuneConfig field; valid: {', '.join(_CONFIG_FIELDS)}.")
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable) or len(list(levels)) == 0:
            raise ValueError(f"axis {name}={levels!r} is not valid; pass a non-empty list of values.")


# ----------------------------------------------------------------------------- runs and checkpoints
@dataclass(frozen=True)
class Run:
    """One fine-tuning run of ``task`` with ``config`` (``num_steps`` = the last checkpoint), saving
    checkpoints after each step count in ``steps``."""

    task: str
    config: FinetuneConfig
    steps: tuple[int, ...]

    def checkpoint_config(self, step: int) -> FinetuneConfig:
        """The configuration whose run *is* this run's checkpoint at ``step``."""
        return replace(self.config, num_steps=step)


def plan_runs(configs: Sequence[FinetuneConfig], tasks: Sequence[str], steps: Sequence[int] | None = None
              ) -> list[Run]:
    """The runs that produce every ``(task, config)`` checkpoint, sharing runs where possible.

    Args:
        configs: fine-tuning recipes.
        tasks: tasks to fine-tune each recipe on.
        steps: step counts to checkpoint for every config (replacing its ``num_steps``); ``None``: each
            config's own ``num_steps``. Configurations that differ only in ``num_steps`` share one run
            when their schedule is ``"constant"`` and every step count is at least ``warmup_steps``.
    """
    if not configs:
        raise ValueError("configs is empty; pass at least one FinetuneConfig.")
    if not tasks:
        raise ValueError("tasks is empty; pass at least one task.")
    if steps is not None:
        bad = [s for s in steps if not isinstance(s, int) or s < 1]
        if bad or not steps:
            raise ValueError(f"steps={list(steps)!r} is not valid; use positive integers (optimizer steps).")
    wanted: dict[tuple[str, FinetuneConfig], set[int]] = {}
    for cfg in configs:
        for s in (steps if steps is not None else [cfg.num_steps]):
            shareable = cfg.schedule == "constant" and s >= cfg.warmup_steps
            if not shareable and (steps is not None and len(set(steps)) > 1):
                raise ValueError(f"steps={list(steps)} needs schedule='constant' (got {cfg.schedule!r}, "
                                 f"warmup_steps={cfg.warmup_steps}): only then is the run stopped at step s "
                                 "the same as a checkpoint of a longer run.")
            base = replace(cfg, num_steps=max(1, cfg.warmup_steps)) if shareable else replace(cfg, num_steps=s)
            for task in tasks:
                wanted.setdefault((task, base), set()).add(s)
    runs = []
    for (task, base), ss in wanted.items():
        top = max(ss)
        runs.append(Run(task, replace(base, num_steps=top), tuple(sorted(ss))))
    return runs


def checkpoint(bench: Any, task: str, cfg: FinetuneConfig) -> Artifact:
    """The cache entry of the expert ``(task, cfg)``: where ``bench.expert(task, cfg)`` caches its
    weights, with the run's log as its sidecar."""
    return Artifact.at(bench.experts_dir, "expert", bench.run_key("expert", [task], cfg))


def checkpoint_path(bench: Any, task: str, cfg: FinetuneConfig) -> Path:
    """Where ``bench.expert(task, cfg)`` caches its weights (``.json`` beside it holds the log)."""
    return checkpoint(bench, task, cfg).path


def is_cached(bench: Any, task: str, cfg: FinetuneConfig) -> bool:
    """``True`` when both the weights and the log of ``(task, cfg)`` exist."""
    return checkpoint(bench, task, cfg).exists()


def probe_steps(run: Run, step: int) -> list[int]:
    """The steps at which a sweep probes the gradient norms of ``run``'s checkpoint at ``step``: ``theta_0`` and
    every checkpoint of the run up to ``step``; chapter 01 interpolates ``G_t`` between them."""
    return [0, *sorted(s for s in run.steps if s <= step)]


def _ready(bench: Any, run: Run, step: int, probe_size: int) -> bool:
    """``run``'s checkpoint at ``step`` is cached (:func:`is_cached`) with the gradient-norm probes this sweep
    asks for: ``probe_size`` examples at :func:`probe_steps`. A checkpoint whose log holds probes of another size,
    at other steps (made by a sweep with other checkpoints) or none (e.g. trained by ``bench.expert``) is trained
    again, which gives the same weights and records the probes asked for (``probe_size`` 0 asks for none)."""
    cfg = run.checkpoint_config(step)
    if not is_cached(bench, run.task, cfg):
        return False
    if probe_size == 0:
        return True
    log = checkpoint(bench, run.task, cfg).meta()
    return (log.get("probe_size") == probe_size
            and (log.get("gradient_norm_probe") or {}).get("steps") == probe_steps(run, step))


def checkpoint_state(bench: Any, task: str, cfg: FinetuneConfig) -> StateDict:
    """The weights of the expert ``(task, cfg)``: the sweep's checkpoint when it is cached, else
    ``bench.expert(task, cfg)`` (which trains it with the benchmark's own loop).

    Prefer this to ``bench.expert`` for sweep experts: a benchmark that imports experts from a
    folder (the clip size's ``model.experts_dir``) returns the imported expert from ``bench.expert``
    whatever the configuration, while a sweep's checkpoint is the one it trained with ``cfg``.
    """
    entry = checkpoint(bench, task, cfg)
    if entry.path.is_file():
        return entry.load()
    return bench.expert(task, cfg)


def checkpoint_log(bench: Any, task: str, cfg: FinetuneConfig) -> dict[str, Any]:
    """The JSON log of a cached checkpoint (config, loss curve, gradient-norm probes, wall time)."""
    entry = checkpoint(bench, task, cfg)
    if not entry.sidecar.is_file():
        raise FileNotFoundError(f"no cached expert for task={task!r}, cfg={cfg}: expected {entry.sidecar}; "
                                "run sweep() first.")
    return entry.meta()


def _probe(model: torch.nn.Module, head: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:

    norms = per_example_gradient_norms(model, head, X, y)
    return {"mean": float(norms.mean()), "max": float(norms.max())}


def execute_run(bench: Any, run: Run, probe_size: int = 8) -> dict[str, Any]:
    """Fine-tune ``run.task`` once and cache every checkpoint in ``run.steps`` that is missing.

    Returns ``{"task", "steps_saved", "wall_time_s"}``.
    """
    missing = [s for s in run.steps if not _ready(bench, run, s, probe_size)]
    if not missing:
        return {"task": run.task, "steps_saved": [], "wall_time_s": 0.0}
    last = max(missing)
    cfg = run.checkpoint_config(last)
    for s in missing:  # retrained (other probes): its old log would vouch for the new weights until the run ends
        checkpoint(bench, run.task, run.checkpoint_config(s)).sidecar.unlink(missing_ok=True)
    X, y = bench.split(run.task, "train")
    head = bench.heads[run.task]
    enc = bench.new_encoder(bench.pretrained_state())
    probe_idx = training_indices(len(y), cfg)[:probe_size]
    Xp, yp = X[probe_idx].to(bench.device), y[probe_idx].to(bench.device)
    del X  # the benchmark's loop reads the training data itself
    probes: dict[str, list[float]] = {"steps": [], "mean": [], "max": []}

    def probe(step: int, model: torch.nn.Module) -> None:
        if probe_size > 0:
            p = _probe(model, head.to(bench.device), Xp, yp)
            probes["steps"].append(step)
            probes["mean"].append(p["mean"])
            probes["max"].append(p["max"])

    with size_threads(bench):  # the later probes run inside the size's fine-tuning loop, on its threads
        probe(0, enc.to(bench.device))
    start = time.perf_counter()
    times: dict[int, float] = {}
    want = set(missing)

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step in run.steps:
            probe(step, model)
        if step in want:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            atomic_save_safetensors(checkpoint(bench, run.task, run.checkpoint_config(step)).path, state,
                                    metadata={"kind": "expert", "tasks": run.task})  # the sidecar comes at the end
            times[step] = time.perf_counter() - start

    # on the size's training threads (bench.finetune_encoder holds them where the size fixes them: tiny)
    history = bench.finetune_encoder(enc, [run.task], cfg, on_step=on_step, desc=f"{run.task}", progress=False)
    grad_norms = history.get("grad_norm", [])  # before clipping, every step (when the run clips)
    for s in missing:
        keep = [i for i, st in enumerate(probes["steps"]) if st <= s]
        entry = checkpoint(bench, run.task, run.checkpoint_config(s))
        atomic_write_json(entry.sidecar, {"sha256": file_sha256(entry.path),
            "kind": "expert", "tasks": [run.task], "benchmark": getattr(bench, "name", "tiny"), "benchmark_key": bench.key,
            "finetune": recipe_fields(run.checkpoint_config(s)), "loss": history["loss"][:s], "lr": history["lr"][:s],
            "batch_gradient_norm": grad_norms[:s],
            "wall_time_s": times[s], "device": str(bench.device),
            "checkpoint_of": recipe_fields(cfg), "probe_size": probe_size,
            "gradient_norm_probe": {k: [v[i] for i in keep] for k, v in probes.items()}})
    return {"task": run.task, "steps_saved": sorted(missing), "wall_time_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- executors
def _sweep_job(bench: Any, job: tuple[Run, int]) -> dict[str, Any]:
    run, probe_size = job
    return execute_run(bench, run, probe_size)


def _describe_job(job: tuple[Run, int]) -> dict[str, Any]:
    run = job[0]
    return {"task": run.task, **recipe_fields(run.config), "steps": list(run.steps)}


def sweep(bench: Any, configs: Sequence[FinetuneConfig], tasks: Sequence[str],
          steps: Sequence[int] | None = None, workers: int = 1, probe_size: int = 8,
          progress: bool = True, threads: int | None = 1, executor: Executor | None = None) -> pd.DataFrame:
    """Make sure every ``(task, config, step)`` expert exists in the cache; return a table of them.

    Args:
        bench: a benchmark (:class:`~mergelab.benchmarks.tiny.TinyBenchmark` or
            :class:`~mergelab.benchmarks.clip.ClipBenchmark`): its ``finetune_encoder`` trains every run.
        configs: fine-tuning recipes (see :func:`config_grid`, :func:`one_at_a_time`).
        tasks: tasks to fine-tune every recipe on.
        steps: step counts to checkpoint (see :func:`plan_runs`); ``None``: each config's ``num_steps``.
        workers: processes to train in (each single-threaded); ``1`` trains here. Used when ``executor``
            is ``None`` (the local executor); an executor brings its own.
        probe_size: training examples whose per-example gradient norms are probed at ``theta_0`` and
            at every checkpoint (``0``: none).
        progress: show a progress bar over runs.
        threads: torch threads while training here (``workers == 1``), restored afterwards; ``None``
            keeps the current setting. One thread per run is fastest on a shared machine: several
            threads per run oversubscribe the cores that other jobs are using.
        executor: where the runs train (:mod:`mergelab.executors`); ``None``: ``LocalExecutor(workers)``,
            the process pool (or this process) of this machine. On Ray every worker rebuilds the
            benchmark from its configuration and writes into the same cache (a shared
            ``MERGELAB_DATA_DIR`` on a cluster).

    Raises:
        mergelab.executors.RunsFailed: when runs failed; it lists each one's configuration and error.
            The other runs finished and are cached, so calling again retries only the failed ones.

    Returns:
        One row per checkpoint: ``task``, the config's fields, ``step``, ``path``, ``trained`` (``True``
        when this call trained it, ``False`` when it came from the cache). ``df.attrs["wall_time_s"]``
        and ``df.attrs["runs_trained"]`` say what this call cost.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is not valid; use a positive integer (1 trains in this process).")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not valid; use a positive integer or None.")
    check_integer("probe_size", probe_size, minimum=0)
    tasks = task_names(tasks, list(bench.tasks)) or ()
    unknown = [t for t in tasks if t not in bench.heads]
    if unknown:
        raise ValueError(f"task {unknown[0]!r} is not a task of this benchmark; valid: {', '.join(bench.heads)}.")
    start = time.perf_counter()
    runs = plan_runs(configs, tasks, steps)
    todo = [r for r in runs if not all(_ready(bench, r, s, probe_size) for s in r.steps)]
    trained: set[tuple[str, FinetuneConfig]] = set()
    if todo:
        bench.pretrained_state()  # build the shared caches once, before any worker starts
        for t in {r.task for r in todo}:
            bench.split(t, "train")
        own = executor is None  # made here: its worker processes stop when the sweep ends
        if executor is None:
            executor = LocalExecutor(workers, threads=1)
        device = executor.device
        try:
            with torch_threads(threads if executor.inline else None):
                outcome = executor.map(_sweep_job, [(run, probe_size) for run in todo],
                                       benchmark_context(bench, device), describe=_describe_job, progress=progress,
                                       desc=f"sweep ({len(runs) - len(todo)} of {len(runs)} runs cached)")
        finally:
            if own:
                executor.close()
        for run, info in zip(todo, outcome.results):
            if info is not None:
                trained.update((run.task, run.checkpoint_config(s)) for s in info["steps_saved"])
        outcome.raise_failures("runs of the sweep")
    rows = []
    for run in runs:
        for s in run.steps:
            cfg = run.checkpoint_config(s)
            rows.append({"task": run.task, **recipe_fields(cfg), "step": s, "path": str(checkpoint_path(bench, run.task, cfg)),
                         "trained": (run.task, cfg) in trained})
    df = pd.DataFrame(rows)
    df.attrs["wall_time_s"] = time.perf_counter() - start
    df.attrs["runs_trained"] = len(todo)
    df.attrs["runs_total"] = len(runs)
    return df


def row_config(row: Mapping[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of one row of :func:`sweep`'s table (``num_steps`` = its ``step``)."""
    ints = {"batch_size", "num_steps", "warmup_steps", "seed"}
    values = {k: row["step"] if k == "num_steps" and "step" in row else row[k] for k in _CONFIG_FIELDS if k != "frozen"}
    frozen = row.get("frozen", ())  # left out of a row (or NaN in a table of other rows that have it) while empty
    return FinetuneConfig(**{k: int(v) if k in ints else (v if isinstance(v, str) else float(v))
                             for k, v in values.items()},
                          frozen=tuple(frozen) if isinstance(frozen, (list, tuple)) else ())
