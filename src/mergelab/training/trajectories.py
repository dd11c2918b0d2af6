"""Fine-tuning trajectories snapshotted at every epoch, cached by configuration.

An *epoch* is one pass over the task's training subset (``FinetuneConfig.data_fraction``) with the
run's batch size: ``floor(n / b)`` optimizer steps, the remainder of the shuffled split being
dropped, exactly as :func:`mergelab.training.batch_stream` walks the data. With ``batch_size >= n``
an epoch is one full-batch step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import codeversion, paths
from ..cache import Artifact, build_lock, file_sha256
from ..executors import Executor, LocalExecutor, benchmark_context
from ..task_vectors import TaskVector
from ..utils import StateDict, config_hash, shows_progress, size_threads, task_names
from .finetune import FinetuneConfig, finetune, recipe_fields, training_indices


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
                      weight_decay: float = 0.0, num_steps: int = 1, frozen: Sequence[str] = ()) -> FinetuneConfig:
    """A run whose task vectors can be compared with gradients: constant learning rate, no warm-up,
    no gradient clipping, no momentum (SGD), ``weight_decay`` (decoupled for AdamW) 0 by default; ``frozen``:
    the parameters it keeps at their starting values (:attr:`FinetuneConfig.frozen`; default none).

    :func:`epoch_trajectory` replaces ``num_steps`` by the steps of its epochs.
    """
    return FinetuneConfig(optimizer=optimizer, lr=lr, batch_size=batch_size, num_steps=num_steps, schedule="constant",
                          warmup_steps=0, weight_decay=weight_decay, momentum=0.0, grad_clip=0.0, seed=seed,
                          data_fraction=data_fraction, frozen=tuple(frozen))

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
    ident: dict[str, Any] = {"benchmark": bench.key, "kind": kind, "finetune": recipe_fields(cfg), "epochs": epochs,
                             **(extra or {}), **codeversion.key_part("trajectory")}
    if getattr(bench, "train_threads", None) is not None:  # a size that trains on fixed threads (tiny)
        ident["train_threads"] = bench.train_threads
    if kind == "epoch_trajectory":  # the single-task key of the first version, kept so caches stay valid
        ident.update(task=tasks[0], head=bench.head_digest(tasks[0]))
    else:
        ident.update(tasks=list(tasks), heads=[bench.head_digest(t) for t in tasks])
    # what else identifies a run of this size, as in its experts' keys: at the clip size the precision and the
    # training data's fingerprint (its benchmark key names the model alone); at tiny the device where it is not the
    # CPU (none on the CPU: keys unchanged)
    parts = getattr(bench, "_run_key_parts", None)
    ident.update(parts(list(tasks)) if parts is not None else {})
    ident.pop("num_workers", None)  # trajectories read images after the evaluation transform: no augmentation
    if getattr(bench, "micro_batch_size", None) is not None:  # gradients summed over chunks of this many (clip)
        ident["micro_batch_size"] = bench.micro_batch_size
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


def _intact(entry: Artifact, report: bool = True) -> bool:
    """Whether a trajectory is cached whole: its file and sidecar are there and the file's SHA-256 is the one its
    sidecar recorded (checked once per process while the file keeps its size and modification time; its epochs
    are then read lazily, so :meth:`Artifact.load`'s check on every load is not made). A sidecar that records no
    SHA-256 (written before they were recorded) is not checked, as :meth:`Artifact.load` does. A file that does
    not match is rebuilt, and said so when ``report``."""
    if not entry.exists():
        return False
    expected = entry.meta().get("sha256")
    stat = entry.path.stat()
    if expected is None or _digest(str(entry.path), stat.st_size, stat.st_mtime_ns) == expected:
        return True
    if report:
        print(f"cached file {entry.path} is corrupt: its SHA-256 differs from the one recorded when it was written. "
              "Rebuilding it.")
    return False


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a trajectory file (``size`` and ``mtime_ns`` only tell a rewritten file apart)."""
    return file_sha256(path)


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
    entry = Artifact.at(trajectories_dir(), "trajectory" if kind == "epoch_trajectory" else "multitask-trajectory", key)
    path = entry.path
    if not _intact(entry):
        with build_lock(path):
            if not _intact(entry, report=False):  # built by another process while this one waited?
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
                with size_threads(bench):  # as the size's experts (None: as set)
                    history = (train or finetune)(enc, dict(data()), {t: bench.heads[t] for t in tasks}, train_cfg,
                                                  device=bench.device, desc=desc,
                                                  progress=shows_progress(bench, progress),
                                                  on_step=snapshot, **options)
                wall = time.perf_counter() - start
                if sorted(snapshots) != list(range(1, epochs + 1)):
                    raise RuntimeError(f"the training loop reported epochs {sorted(snapshots)}, expected 1..{epochs}: "
                                       "it must call on_step(step, model) after every optimizer step.")
                entry.save({f"epoch{e}/{k}": v for e, s in snapshots.items() for k, v in s.items()}, {
                    "kind": kind, "task": name, "tasks": list(tasks), "benchmark_key": bench.key,
                    "finetune": recipe_fields(run_cfg), "epochs": epochs, "steps_per_epoch": spe, "n_train": n_train,
                    "loss": history["loss"], "wall_time_s": wall, "device": str(bench.device), **(extra or {})},
                    metadata={"kind": kind, "task": name, "epochs": str(epochs)})
                del snapshots
    meta = entry.meta()
    return EpochTrajectory(name, run_cfg, epochs, spe, n_train, _EpochStates(path, epochs), meta["loss"],
                           meta["wall_time_s"], tuple(tasks))


def epoch_trajectory(bench: Any, task: str, cfg: FinetuneConfig, epochs: int,
                     progress: bool | None = None,
                     train: Callable[..., dict[str, list[float]]] | None = None) -> EpochTrajectory:
    """Fine-tune ``task``'s expert for ``epochs`` passes with ``cfg``, snapshotting every epoch.

    One run gives the task vectors after 1, 2, ..., E epochs. ``cfg.num_steps`` is replaced by
    ``epochs * steps_per_epoch`` (:func:`epoch_config`); everything else is used as given, through
    :func:`mergelab.training.finetune` on the images of ``bench.split``. At the ``tiny`` size that is the
    benchmark's own loop, so the last snapshot is the expert ``bench.expert(task, run config)`` would
    train; at the ``clip`` size experts train through the clip loop (training augmentation, data
    loaders, mixed precision where asked), so a trajectory's last snapshot is a close relative of the
    expert, not the same weights. With a ``constant`` schedule, the snapshot after
    ``e`` epochs is the model a run of exactly ``e`` epochs gives; with a decaying schedule it is
    not (the schedule spans the whole run). Cached in ``<data>/trajectories`` by benchmark, task,
    head and configuration, written atomically, so a re-run trains nothing.

    Args:
        bench: a benchmark (``split``, ``heads``, ``pretrained_state``, ``new_encoder``, ``key``).
        task: one of ``bench.tasks`` (any task with a head works).
        cfg: hyperparameters (``data_fraction`` picks the training subset).
        epochs: E, the number of passes.
        progress: progress bar (default: the benchmark's setting).
        train: the training loop (default :func:`mergelab.training.finetune`; tests substitute a spy). Its run is
            cached under the default loop's key: a substitute must compute what ``finetune`` computes.
    """
    X, y, run_cfg, n = _epoch_run(bench, task, cfg, epochs)
    return _run_trajectory(bench, "epoch_trajectory", [task], lambda: {task: (X, y)}, run_cfg, run_cfg, epochs,
                           steps_per_epoch(n, cfg.batch_size), n, progress, train)


def _epoch_run(bench: Any, task: str, cfg: FinetuneConfig, epochs: int
               ) -> tuple[Any, torch.Tensor, FinetuneConfig, int]:
    """The training split of ``task``, the run's configuration and its training examples."""
    X, y = bench.split(task, "train")
    n = len(training_indices(len(y), cfg))  # the rows training_subset keeps
    return X, y, epoch_config(cfg, n, epochs), n


def is_trajectory_cached(bench: Any, task: str, cfg: FinetuneConfig, epochs: int) -> bool:
    """``True`` when :func:`epoch_trajectory` ``(bench, task, cfg, epochs)`` would train nothing."""
    _, _, run_cfg, _ = _epoch_run(bench, task, cfg, epochs)
    key = _trajectory_key(bench, "epoch_trajectory", [task], run_cfg, epochs)
    return Artifact.at(trajectories_dir(), "trajectory", key).exists()


def _trajectory_job(bench: Any, job: tuple[str, FinetuneConfig, int]) -> None:
    task, cfg, epochs = job
    epoch_trajectory(bench, task, cfg, epochs, progress=False)


def _describe_trajectory(job: tuple[str, FinetuneConfig, int]) -> dict[str, Any]:
    task, cfg, epochs = job
    return {"task": task, **recipe_fields(cfg), "epochs": epochs}


def epoch_trajectories(bench: Any, runs: Sequence[tuple[str, FinetuneConfig]], epochs: int,
                       executor: Executor | None = None, progress: bool | None = None,
                       desc: str = "epoch trajectories") -> list[EpochTrajectory]:
    """:func:`epoch_trajectory` of every ``(task, cfg)`` in ``runs``, the missing ones trained by ``executor``.

    The runs are independent: those not cached are handed to ``executor`` (:mod:`mergelab.executors`;
    ``None``: one after the other in this process, as a loop over :func:`epoch_trajectory` would),
    each worker writing its trajectory into the cache; then every trajectory is read from the cache.
    A progress bar counts the runs trained (done / total, failures).

    Raises:
        mergelab.executors.RunsFailed: listing the runs that failed (configuration and error); the
            others are cached, so calling again trains only the failed ones.
    """
    runs = list(runs)
    show = shows_progress(bench, progress)
    todo = [(t, c, epochs) for t, c in runs if not is_trajectory_cached(bench, t, c, epochs)]
    executor = executor if executor is not None else LocalExecutor(1)
    if todo:
        bench.pretrained_state()  # shared caches built once, before any worker starts
        outcome = executor.map(_trajectory_job, todo, benchmark_context(bench, executor.device),
                               describe=_describe_trajectory, progress=show,
                               desc=f"{desc} ({len(runs) - len(todo)} of {len(runs)} cached)")
        outcome.raise_failures("trajectories")
    return [epoch_trajectory(bench, t, c, epochs, progress=False) for t, c in runs]


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
    tasks = sorted(task_names(tasks, list(bench.tasks)) or ())
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
