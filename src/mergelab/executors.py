"""Where the independent jobs of a sweep run: here, in local worker processes, or on a Ray cluster.

Every sweep of the package (the stability grid of :func:`mergelab.training.sweep.sweep`, the epoch
trajectories of :func:`mergelab.training.trajectories.epoch_trajectories`, the fitness evaluations of
a GA population in :class:`mergelab.experiments.ch05_merge3.Fitness`, chapter 06's models and merge jobs in
:func:`mergelab.experiments.ch06_models.train_all` and :func:`mergelab.experiments.ch06_c2m3.merge_study`, and
chapter 00's experts, locally) hands its jobs to one :class:`Executor`:

* ``local`` (:class:`LocalExecutor`, the default): with ``workers == 1`` the jobs run here, one after
  the other, exactly as before executors existed; with ``workers > 1`` in a pool of ``spawn`` worker
  processes on this machine (each with ``threads`` torch threads).
* ``ray`` (:class:`RayExecutor`): one Ray task per job, with ``resources`` (CPUs, GPUs) per job.
  ``ray.init()`` starts a local cluster; ``address=`` (or the ``RAY_ADDRESS`` environment variable)
  joins a running one (``docs/distributed.md``). Ray is an optional extra: ``pip install -e '.[ray]'``.

A job is ``fn(context, item)``: ``fn`` a module-level function, ``item`` one picklable job
description, ``context`` what every job of the batch needs (a benchmark, weights), described by a
:class:`WorkerContext` that is shipped once and built once per worker process (kept between batches
of the same key). Jobs write what they make into the content-addressed cache (:mod:`mergelab.cache`,
atomic writes); on a cluster every worker needs the same ``MERGELAB_DATA_DIR`` (a shared file system),
and the ``MERGELAB_*`` variables of this process are set in the workers.

A job that raises does not stop the others: :meth:`Executor.map` returns an :class:`Outcome` with
every result and a :class:`Failure` (the job's configuration, the error and its traceback) per failed
job; :meth:`Outcome.raise_failures` turns them into one :class:`RunsFailed` error listing them all.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from tqdm.auto import tqdm

EXECUTORS = ("local", "ray")
"""Names :func:`make_executor` accepts (the ``executor`` parameter of the chapters that sweep)."""

RAY_INSTALL = "pip install -e '.[ray]'"
"""How to install the optional Ray extra (from the project's root)."""

_ENV_PREFIX = "MERGELAB_"


# ----------------------------------------------------------------------------- resources, failures
@dataclass(frozen=True)
class Resources:
    """What one job asks of a Ray cluster: ``cpus`` (logical CPUs, also its torch threads) and ``gpus``
    (fractions share a GPU). The local executor runs one job per worker process and ignores them."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"resources.{name}={value!r} is not valid; use a number >= 0.")
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError("resources={'cpus': 0, 'gpus': 0} is not valid; a job needs a CPU or a GPU.")

    @classmethod
    def parse(cls, value: Resources | Mapping[str, float] | None) -> Resources:
        """From the ``resources`` parameter: ``{"cpus": 1, "gpus": 0}`` (either key may be left out)."""
        if value is None:
            return cls()
        if isinstance(value, Resources):
            return value
        if not isinstance(value, Mapping) or set(value) - {"cpus", "gpus"}:
            raise ValueError(f"resources={value!r} is not valid; use a mapping with keys cpus and gpus, "
                             "e.g. {'cpus': 1, 'gpus': 0}.")
        return cls(**value)


@dataclass(frozen=True)
class Failure:
    """A job that raised: its position in the batch, its configuration, the error and its traceback."""

    index: int
    config: Mapping[str, Any]
    error: str
    traceback: str

    def describe(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{config}: {self.error}"


class RunsFailed(RuntimeError):
    """Some jobs of a sweep failed; the others finished (and are cached). ``failures`` lists the failed
    ones (configuration, error, traceback); running the sweep again retries only them."""

    def __init__(self, what: str, failures: Sequence[Failure], total: int) -> None:
        self.failures = list(failures)
        self.total = total
        lines = [f"{len(self.failures)} of {total} {what} failed; the other {total - len(self.failures)} finished "
                 "(and are cached: running again retries only the failed ones):"]
        lines += [f"  - {f.describe()}" for f in self.failures]
        lines.append(f"traceback of the first failure:\n{self.failures[0].traceback}" if self.failures else "")
        super().__init__("\n".join(lines).rstrip())


@dataclass
class Outcome:
    """Results of :meth:`Executor.map`: ``results[i]`` is job ``i``'s return value (``None`` when it
    failed); ``failures`` the jobs that raised."""

    results: list[Any]
    failures: list[Failure] = field(default_factory=list)

    def raise_failures(self, what: str = "runs") -> None:
        """Raise :class:`RunsFailed` listing every failure (nothing when all jobs succeeded)."""
        if self.failures:
            raise RunsFailed(what, self.failures, len(self.results))


# ----------------------------------------------------------------------------- what the jobs share
_CONTEXTS: OrderedDict[str, Any] = OrderedDict()  # per worker process: built contexts by key
_KEEP_CONTEXTS = 2


class WorkerContext:
    """What every job of a batch gets as its first argument, built once per worker process.

    Args:
        build: a picklable callable (a module-level function or a :func:`functools.partial` of one)
            that returns the context in a worker.
        key: identifies what ``build`` returns: a worker that already built a context of this key
            (in an earlier batch) reuses it, so it must name everything ``build`` depends on.
            Default: a key of this object alone (reused only by the batches given this object).
        local: the object itself, used when the jobs run in this process (never pickled).
    """

    def __init__(self, build: Callable[[], Any], key: str | None = None, local: Any = None) -> None:
        self.build, self.local = build, local
        self.key = key if key is not None else f"context-{os.getpid()}-{id(self)}-{time.time_ns()}"

    def __getstate__(self) -> dict[str, Any]:
        return {"build": self.build, "key": self.key, "local": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def get(self) -> Any:
        """The context: ``local`` when set, else built (once per process and key)."""
        if self.local is not None:
            return self.local
        if self.key in _CONTEXTS:
            _CONTEXTS.move_to_end(self.key)
            return _CONTEXTS[self.key]
        value = self.build()
        _CONTEXTS[self.key] = value
        while len(_CONTEXTS) > _KEEP_CONTEXTS:
            _CONTEXTS.popitem(last=False)
        return value


def _rebuild_benchmark(bench_class: type, config: Any, device: str, driver: str = "cpu") -> Any:
    if driver.startswith("cuda") and not device.startswith("cuda"):
        raise ValueError(
            f"the benchmark runs on {driver} but this executor's jobs run on {device}: local worker processes "
            "(workers > 1) and Ray jobs without GPUs (resources.gpus: 0) rebuild it on the CPU, where its runs would "
            "train slowly and in another precision (another cache key). Use workers: 1 (the jobs then run in this "
            f"process, on {driver}) or executor: ray with resources.gpus >= 1.")
    return bench_class(config, device=device, progress=False)


def benchmark_context(bench: Any, device: str = "cpu") -> WorkerContext:
    """A :class:`WorkerContext` of ``bench``: in a worker, the same benchmark rebuilt from its class and
    configuration on ``device`` (without progress bars); here, ``bench`` itself. A benchmark on a GPU is not
    rebuilt on the CPU: such a worker's jobs fail with an error that names the settings to change."""
    import functools

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIX))
    driver = str(getattr(bench, "device", "cpu"))
    digest = hashlib.sha256(repr((type(bench).__qualname__, bench.config, device, env)).encode()).hexdigest()[:16]
    return WorkerContext(functools.partial(_rebuild_benchmark, type(bench), bench.config, device, driver),
                         key=f"benchmark-{digest}", local=bench)


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)}


def _call(fn: Callable[[Any, Any], Any], context: WorkerContext | None, item: Any) -> tuple[str, Any, str]:
    """Run one job, catching its error: ``("ok", result, "")`` or ``("error", message, traceback)``."""
    try:
        return "ok", fn(context.get() if context is not None else None, item), ""
    except Exception as err:  # a failed job is reported, the others go on
        return "error", f"{type(err).__name__}: {err}", traceback.format_exc()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))


# ----------------------------------------------------------------------------- executors
class Executor:
    """Runs ``fn(context, item)`` for every item; see :meth:`map`."""

    name = "executor"

    @property
    def device(self) -> str:
        """Where a job's model lives (``cpu``; :class:`RayExecutor` says ``cuda`` for jobs with a GPU)."""
        return "cpu"

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], context: WorkerContext | None = None,
            describe: Callable[[Any], Mapping[str, Any]] | None = None, progress: bool = True,
            desc: str = "runs") -> Outcome:
        """Run every job; return their results in the order of ``items`` and the failures.

        Args:
            fn: a module-level function ``fn(context, item) -> result`` (results travel back pickled:
                keep them small; write large outputs to the cache).
            items: one job description per job (picklable).
            context: what every job gets as ``context`` (built once per worker); ``None``: ``None``.
            describe: a job's configuration for a failure report (default ``{"job": item}``).
            progress: a progress bar: jobs done / total, and failures so far.
            desc: the bar's label.
        """
        items = list(items)
        bar = tqdm(total=len(items), desc=desc, disable=not progress or not items, mininterval=1.0)
        results: list[Any] = [None] * len(items)
        failures: list[Failure] = []

        def done(index: int, status: str, value: Any, trace: str) -> None:
            if status == "ok":
                results[index] = value
            else:
                config = dict(describe(items[index])) if describe is not None else {"job": items[index]}
                failures.append(Failure(index, config, value, trace))
                bar.set_postfix(failed=len(failures))
            bar.update(1)

        try:
            self._run(fn, items, context, done)
        finally:
            bar.close()
        failures.sort(key=lambda f: f.index)
        return Outcome(results, failures)

    def _run(self, fn: Callable[[Any, Any], Any], items: list[Any], context: WorkerContext | None,
             done: Callable[[int, str, Any, str], None]) -> None:
        raise NotImplementedError

    @property
    def inline(self) -> bool:
        """``True`` when the jobs run in this process (the caller's objects are used as they are)."""
        return False


_WORKER_CONTEXT: WorkerContext | None = None


def _init_local_worker(environ: Mapping[str, str], threads: int | None, context: WorkerContext | None) -> None:
    global _WORKER_CONTEXT
    os.environ.update(environ)
    _set_threads(threads)
    _WORKER_CONTEXT = context


def _local_worker_call(fn: Callable[[Any, Any], Any], item: Any) -> tuple[str, Any, str]:
    return _call(fn, _WORKER_CONTEXT, item)


class LocalExecutor(Executor):
    """Jobs here (``workers == 1``, one after the other) or in ``workers`` ``spawn`` processes of this
    machine, each with ``threads`` torch threads (the context is sent to each process once).

    The processes are kept between calls of :meth:`map` with the same context (a GA's generations,
    a sweep's batches), so each imports torch and builds its context once; :meth:`close` (or leaving a
    ``with`` block, or the executor's garbage collection) stops them."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} is not valid; use a positive integer (1 runs here).")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} is not valid; use a positive integer or None.")
        self.workers, self.threads = workers, threads
        self._pool: Any = None
        self._pool_key: tuple[Any, ...] | None = None
        self._finalizer: Any = None

    @property
    def inline(self) -> bool:
        return self.workers == 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, wait: bool = True) -> None:
        """Stop the worker processes, if any (``wait``: let running jobs finish first)."""
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=wait, cancel_futures=True)
        self._pool, self._pool_key, self._finalizer = None, None, None

    def _pool_for(self, context: WorkerContext | None) -> Any:
        """The process pool for jobs of ``context``: the running one when it was started for the same
        context key and environment, else a new one (the old one stopped)."""
        import multiprocessing as mp
        import weakref
        from concurrent.futures import ProcessPoolExecutor

        environ = _environment()
        key = (None if context is None else context.key, tuple(sorted(environ.items())))
        if self._pool is not None and self._pool_key == key:
            return self._pool
        self.close()
        # the context travels pickled, which leaves its local object behind (WorkerContext.__getstate__)
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_local_worker, initargs=(environ, self.threads, context))
        self._pool, self._pool_key = pool, key
        self._finalizer = weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
        return pool

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers}, threads={self.threads})"

    def _run(self, fn: Callable[[Any, Any], Any], items: list[Any], context: WorkerContext | None,
             done: Callable[[int, str, Any, str], None]) -> None:
        if not items:
            return
        if self.workers == 1:
            for i, item in enumerate(items):
                done(i, *_call(fn, context, item))
            return
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool_for(context)
        futures = {pool.submit(_local_worker_call, fn, item): i for i, item in enumerate(items)}
        broken = False
        try:
            for fut in as_completed(futures):
                try:
                    done(futures[fut], *fut.result())
                except Exception as err:  # the worker process died (killed, out of memory)
                    broken = broken or isinstance(err, BrokenProcessPool)
                    done(futures[fut], "error", f"{type(err).__name__}: {err}", traceback.format_exc())
        except BaseException:  # interrupted: drop the queued jobs and the processes
            self.close(wait=False)
            raise
        if broken:  # a pool whose process died takes no more jobs: the next call starts a new one
            self.close(wait=False)


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`ImportError` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"executor='ray' needs Ray, which is not installed ({err}). Install the optional "
                          f"extra with `{RAY_INSTALL}` (or `pip install 'ray>=2.9'`), or use executor='local'."
                          ) from err
    return ray


def _ray_call(fn: Callable[[Any, Any], Any], boxed_context: list[Any], key: str | None, item: Any,
              environ: Mapping[str, str], threads: int) -> tuple[str, Any, str]:
    """One Ray task: set the driver's ``MERGELAB_*`` variables and the torch threads, fetch the
    context from the object store once per worker process and key, run the job."""
    os.environ.update(environ)
    _set_threads(threads)
    context = None
    if boxed_context:
        if key in _CONTEXTS:
            context = WorkerContext(lambda: None, key)  # built in an earlier task of this worker
        else:
            import ray

            context = ray.get(boxed_context[0])
    return _call(fn, context, item)


def start_local_cluster(ray: Any, attempts: int = 3, **options: Any) -> None:
    """``ray.init(**options)`` for a new local cluster, tried ``attempts`` times: Ray gives its raylet
    a fixed 30 s to register, which a machine busy with other work can miss (the error says "timed out
    during startup")."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**options)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()


class RayExecutor(Executor):
    """One Ray task per job, asking ``resources`` per task.

    Joins the cluster at ``address`` (or ``RAY_ADDRESS``), or starts a local one with ``ray.init()``
    when neither is set; a Ray session already started in this process (``ray.init`` called by the
    user) is used as it is. Each job's torch threads are its CPUs (at least 1); with ``gpus > 0`` the
    context is built on ``cuda`` by callers that build a benchmark (:attr:`device`).
    """

    name = "ray"

    def __init__(self, resources: Resources | Mapping[str, float] | None = None, address: str | None = None) -> None:
        self.resources = Resources.parse(resources)
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"ray_address={address!r} is not valid; use null (a local cluster, or RAY_ADDRESS) or "
                             "an address such as 'auto' or '10.0.0.1:6379'.")
        self.address = address
        self._ray = import_ray()
        self._shipped: OrderedDict[str, Any] = OrderedDict()  # context key -> its ObjectRef (sent once)

    def __repr__(self) -> str:
        return f"RayExecutor(resources={self.resources}, address={self.address!r})"

    @property
    def device(self) -> str:
        """Where a job's model lives: ``cuda`` when the job has a GPU, else ``cpu``."""
        return "cuda" if self.resources.gpus > 0 else "cpu"

    def connect(self) -> None:
        """Start or join the cluster (once per process)."""
        ray = self._ray
        if ray.is_initialized():
            return
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            start_local_cluster(ray, include_dashboard=False)  # a local cluster of this machine's cores
        else:
            ray.init(address=self.address)

    def _ship(self, context: WorkerContext) -> Any:
        """The context in the object store, put there once per key (a GA's generations share it)."""
        if context.key not in self._shipped:
            self._shipped[context.key] = self._ray.put(context)  # pickled without its local object
            while len(self._shipped) > _KEEP_CONTEXTS:
                self._shipped.popitem(last=False)
        return self._shipped[context.key]

    def _run(self, fn: Callable[[Any, Any], Any], items: list[Any], context: WorkerContext | None,
             done: Callable[[int, str, Any, str], None]) -> None:
        if not items:
            return
        ray = self._ray
        self.connect()
        boxed = [] if context is None else [self._ship(context)]
        key = None if context is None else context.key
        task = ray.remote(_ray_call).options(num_cpus=self.resources.cpus, num_gpus=self.resources.gpus)
        threads = max(1, int(self.resources.cpus))
        env = _environment()
        refs = {task.remote(fn, boxed, key, item, env, threads): i for i, item in enumerate(items)}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        done(refs[ref], *ray.get(ref))
                    except Exception as err:  # the task's worker died, or the cluster lost it
                        done(refs[ref], "error", f"{type(err).__name__}: {err}", traceback.format_exc())
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def make_executor(executor: str = "local", workers: int = 1, threads: int | None = 1,
                  resources: Resources | Mapping[str, float] | None = None, ray_address: str | None = None
                  ) -> Executor:
    """The executor a chapter's parameters name.

    Args:
        executor: ``"local"`` (here, or ``workers`` processes of this machine) or ``"ray"``.
        workers: local worker processes (``1``: jobs run in this process); ignored by Ray.
        threads: torch threads per local worker process.
        resources: per job on Ray, ``{"cpus": 1, "gpus": 0}``.
        ray_address: the Ray cluster to join (``None``: ``RAY_ADDRESS``, else a new local cluster).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not valid; use one of {', '.join(EXECUTORS)}.")
    if executor == "local":
        Resources.parse(resources)  # checked even where unused, so a typo shows before a switch to Ray
        return LocalExecutor(workers, threads)
    return RayExecutor(resources, ray_address)
