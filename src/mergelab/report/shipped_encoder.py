"""Developer tool for the pretrained `tiny` encoder and default experts shipped with mergelab
(:mod:`mergelab.benchmarks.tiny.ship`), and for the `smoke` encoder shipped beside it.

``python -m mergelab.report.shipped_encoder --check`` pretrains the default encoder (``params/tiny``) in a
temporary cache and compares it with the shipped one; ``--update`` ships the default encoder of this
checkout's cache (pretraining it if needed), after a change to the pretraining code, data or configuration.
``--profile smoke`` does either for the `smoke` size's encoder (``params/smoke``, about 20 s to pretrain): it
ships so that a fresh clone's tests and ``make report PROFILE=smoke`` start from it, as the book starts from
the tiny one.
``--check-runs`` and ``--update-runs`` do the same for the default fine-tuning runs (:func:`default_runs`:
chapter 00's experts of every seed and its multi-task model), after a change to the encoder, the heads,
the recipe or the fine-tuning code's version, and for chapter 06's models trained from scratch
(:func:`default_scratch`), after a change to their recipes or the training code's version.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from ..benchmarks.tiny.ship import (ENV_FINETUNE, ENV_PRETRAIN, RUN_KINDS, WEIGHTS_DIR, shipped_artifact,
                                   shipped_keys, shipped_run, shipped_runs, shipped_scratch,
                                   shipped_scratch_names)
from ..benchmarks.tiny.ship import environment as torch_environment
from ..cache import Artifact
from ..utils import atomic_copy, atomic_write_json, environment


SHIPPED_PROFILES = ("tiny", "smoke")
"""The profiles whose default encoder ships: `tiny`, the book's size, and `smoke`, the tests' size."""


def default_benchmark(progress: bool = False, profile: str = "tiny") -> Any:
    """The benchmark of ``params/<profile>/_benchmark.yaml`` (``tiny``: what `make report` runs; ``smoke``: what
    the tests run), on the CPU."""
    from .. import load_benchmark
    from ..params import profile_params

    if profile not in SHIPPED_PROFILES:
        raise ValueError(f"profile={profile!r} is not valid; use one of {', '.join(SHIPPED_PROFILES)} "
                         "(the profiles whose encoder ships).")
    p = profile_params(profile, "00_benchmark_and_baselines")
    return load_benchmark("tiny", device="cpu", progress=progress,
                          **{k: p[k] for k in ("tasks", "data", "model", "pretrain", "head_shots")})


def default_encoder_keys() -> list[str]:
    """The encoder keys of every profile of :data:`SHIPPED_PROFILES` (what :func:`shipped_keys` should list)."""
    return sorted(default_benchmark(profile=p).encoder_key for p in SHIPPED_PROFILES)


def update(profile: str = "tiny") -> Path:
    """Ship the default encoder of ``profile`` from this checkout's cache (pretrained here if missing); remove the
    shipped encoders that are no profile's default (an older one of this profile)."""
    bench = default_benchmark(progress=True, profile=profile)
    cached = Artifact(bench.cache_dir / "pretrained.safetensors")
    if not cached.exists():
        with environment({ENV_PRETRAIN: "1"}):
            bench.pretrained_state()
    if "environment" not in cached.meta():
        raise SystemExit(f"the cached encoder {cached.path} does not record the torch build and threads that made it "
                         f"(it predates that record): pretrain it again with {ENV_PRETRAIN}=1 and an empty "
                         "MERGELAB_DATA_DIR, then run --update there.")
    WEIGHTS_DIR.mkdir(exist_ok=True)
    target = _ship(cached, WEIGHTS_DIR / f"encoder-{bench.encoder_key}.safetensors")
    # only once the new one is in place: an interrupt never ships none
    _remove_others("encoder-*", {f"encoder-{key}" for key in default_encoder_keys()})
    return target


def _ship(cached: Artifact, target: Path, **extra: Any) -> Path:
    """Copy a cached artifact's weights into the package as ``target``, its log beside them with ``extra``.

    The old log goes first and the new one comes last, each write atomic: an interrupted ship leaves either the
    old artifact whole, or weights without a log, which readers do not see (``Artifact.exists``) and the next
    ship replaces; never a log beside weights it does not describe."""
    target.with_suffix(".json").unlink(missing_ok=True)
    atomic_copy(cached.path, target)
    atomic_write_json(target.with_suffix(".json"), {**cached.meta(), **extra})
    return target


def _remove_others(pattern: str, keep: set[str]) -> None:
    """Remove the shipped files of ``WEIGHTS_DIR`` matching ``pattern`` (weights and logs) whose name, less its
    suffix, is not in ``keep``."""
    for old in WEIGHTS_DIR.glob(pattern):
        if old.stem not in keep:
            old.unlink()


def check(profile: str = "tiny") -> bool:
    """Pretrain the default encoder of ``profile`` in a temporary cache, at the thread count the shipped one
    records, and say whether it equals the shipped one."""
    from ..utils import load_safetensors, torch_threads

    key = default_benchmark(profile=profile).encoder_key
    shipped = shipped_artifact(key)
    if shipped is None:
        print(f"no shipped encoder has this configuration's key {key} (shipped: {shipped_keys()}); run --update")
        return False
    theirs = shipped.meta().get("environment", {})
    with tempfile.TemporaryDirectory() as tmp, environment({"MERGELAB_DATA_DIR": tmp, ENV_PRETRAIN: "1"}), \
            torch_threads(theirs.get("threads")):
        bench = default_benchmark(progress=True, profile=profile)
        made = bench.pretrained_state()
        here = torch_environment()
    difference = _difference(made, load_safetensors(str(shipped.path)))
    verdict = "bit-identical" if difference is None else f"differ, {difference}"
    print(f"{profile} encoder pretrained here ({here}) vs shipped ({theirs or 'environment not recorded'}): {verdict}")
    return difference is None


CHAPTER = "00_benchmark_and_baselines"
"""The chapter whose runs ship: its parameters say which they are."""


def default_runs() -> list[tuple[str, tuple[str, ...], Any]]:
    """``(kind, tasks, recipe)`` of every run chapter 00 makes at tiny (``params/tiny``): the multi-task
    model of the chapter's seed, then the experts of every task at each fine-tuning seed of its seed study
    (the runs :func:`mergelab.experiments.ch00_benchmark.train_experts` is asked for)."""
    from ..params import profile_params
    from ..training import FinetuneConfig

    p = profile_params("tiny", CHAPTER)
    seeds = list(dict.fromkeys([int(p["seed"]), *map(int, p["seeds"])]))
    runs: list[tuple[str, tuple[str, ...], Any]] = [
        ("multitask", tuple(sorted(p["tasks"])),
         FinetuneConfig.from_params({**p["finetune"], "num_steps": p["multitask_steps"]}, seed=int(p["seed"])))]
    runs += [("expert", (t,), FinetuneConfig.from_params(p["finetune"], seed=s)) for s in seeds for t in p["tasks"]]
    return runs


def default_run_names(bench: Any) -> list[str]:
    """``<kind>-<run key>`` of :func:`default_runs` on ``bench`` (what :func:`shipped_runs` should list)."""
    return sorted(f"{kind}-{bench.run_key(kind, tasks, cfg)}" for kind, tasks, cfg in default_runs())


def _train_default_runs(bench: Any, workers: int, here: bool) -> None:
    """Make sure :func:`default_runs` are in ``bench``'s cache: with ``here``, training every one missing (never
    copying a shipped one); otherwise taking the shipped ones and training the others."""
    from ..experiments.ch00_benchmark import train_experts

    (_, _, multitask), *experts = default_runs()
    seeds = list(dict.fromkeys(cfg.seed for _, _, cfg in experts))
    tasks = list(dict.fromkeys(t for _, (t,), _ in experts))
    with environment({ENV_FINETUNE: "1"} if here else {}):
        train_experts(bench, experts[0][2], seeds, tasks, workers=workers, multitask=multitask)


SCRATCH_CHAPTER = "06_cycle_consistent_merging"
"""The chapter whose models trained from scratch ship: its parameters say which they are."""


def default_scratch() -> list[Any]:
    """The cache artifacts (:func:`mergelab.training.scratch.scratch_artifact`) of every model chapter 06 trains
    at tiny (``params/tiny``: each architecture's ``num_models`` seeds from the chapter's seed), in the data
    folder of the moment."""
    from ..experiments.ch06_models import digits_data
    from ..params import profile_params
    from ..training.scratch import ScratchConfig, scratch_artifact

    p = profile_params("tiny", SCRATCH_CHAPTER)
    _, data_key = digits_data(p["digits"])
    return [scratch_artifact(ScratchConfig(arch=arch, **recipe, seed=int(p["seed"]) + i), data_key)
            for arch, recipe in p["architectures"].items() for i in range(int(p["num_models"]))]


def _train_default_scratch(workers: int, here: bool) -> None:
    """Make sure :func:`default_scratch` are in the cache: with ``here``, training every one missing (never
    copying a shipped one); otherwise taking the shipped ones and training the others."""
    from ..executors import LocalExecutor
    from ..experiments.ch06_models import train_all
    from ..params import profile_params

    p = profile_params("tiny", SCRATCH_CHAPTER)
    with environment({ENV_FINETUNE: "1"} if here else {}):
        train_all(p["architectures"], int(p["num_models"]), int(p["seed"]), p["digits"], LocalExecutor(workers),
                  progress=True)


def _kept_or_shipped(cached: Artifact, target: Path, **extra: Any) -> Path:
    """``target`` as it ships when ``cached`` is the cache's copy of it; otherwise :func:`_ship` of ``cached``."""
    return target if cached.meta().get("shipped") else _ship(cached, target, **extra)


def update_runs(workers: int = 2) -> list[Path]:
    """Ship the default runs (:func:`default_runs`) of this checkout's cache, and the heads they were trained with
    (their digests are in the run keys), and chapter 06's default models (:func:`default_scratch`); those not cached
    are taken where one of their key already ships and trained otherwise, and a cache's copy of a shipped one is
    kept as it ships. Remove any other shipped run, heads or model. Each shipped log of a run or the heads gains the
    SHA-256 of the encoder it was made from. Returns the shipped files, the heads first."""
    bench = default_benchmark(progress=True)
    bench.pretrained_state()
    if not Artifact(bench.cache_dir / "pretrained.safetensors").meta().get("shipped"):
        raise SystemExit(f"the encoder in {bench.cache_dir} is not the shipped one: runs made from it cannot ship "
                         "(readers start from the shipped encoder); use a data folder whose encoder is the shipped one.")
    _train_default_runs(bench, workers, here=False)
    bench.heads  # noqa: B018 - built (or taken) in the cache
    target = _kept_or_shipped(Artifact(bench.heads_path()),
                              WEIGHTS_DIR / f"{bench.heads_name()}-{bench.encoder_key}.safetensors",
                              pretrained_sha256=bench.pretrained_sha256)
    _remove_others("heads-*", {target.stem})
    targets = [target]
    for kind, tasks, cfg in default_runs():
        cached = bench.run_artifact(kind, tasks, cfg)
        targets.append(_kept_or_shipped(cached, WEIGHTS_DIR / cached.path.name,
                                        pretrained_sha256=bench.pretrained_sha256))
    _train_default_scratch(workers, here=False)
    targets += [_kept_or_shipped(cached, WEIGHTS_DIR / f"scratch-{cached.path.name}") for cached in default_scratch()]
    for kind in (*RUN_KINDS, "scratch"):
        _remove_others(f"{kind}-*", {t.stem for t in targets[1:]})
    return targets


def check_runs(workers: int = 2) -> bool:
    """Train the default runs in a temporary cache (from the shipped encoder, one thread per run) and say
    whether each equals the shipped one, tensor by tensor."""
    from ..utils import load_safetensors

    names = set(shipped_runs())
    with tempfile.TemporaryDirectory() as tmp, environment({"MERGELAB_DATA_DIR": tmp}):
        bench = default_benchmark(progress=True)
        missing = sorted(set(default_run_names(bench)) - names)
        if missing:
            print(f"no shipped run for {missing} (shipped: {len(names)} runs); run --update-runs")
            return False
        missing = sorted({a.path.stem for a in default_scratch()} - set(shipped_scratch_names()))
        if missing:
            print(f"no shipped model trained from scratch for {missing}; run --update-runs")
            return False
        _train_default_runs(bench, workers, here=True)
        _train_default_scratch(workers, here=True)
        with environment({ENV_FINETUNE: None, ENV_PRETRAIN: None}):  # the shipped files, whatever the shell set
            pairs = [(f"chapter 06's {a.path.stem}", a, shipped_scratch(a.path.stem)) for a in default_scratch()]
            pairs += [(f"{kind} {'+'.join(tasks) if len(tasks) < 3 else 'all tasks'} seed {cfg.seed}",
                       bench.run_artifact(kind, tasks, cfg), shipped_run(kind, bench.run_key(kind, tasks, cfg)))
                      for kind, tasks, cfg in default_runs()]
        differ = [f"{label}: {text}" for label, made, ref in pairs
                  if (text := _difference(made.load(), load_safetensors(str(ref.path)))) is not None]
        total = len(pairs)
    print(f"{total - len(differ)} of {total} default runs and models trained here "
          f"(torch {torch_environment()['torch']}, one thread per run) are bit-identical to the shipped ones" + "".join(f"\n  {d}" for d in differ))
    return not differ


def _difference(made: dict[str, Any], ref: dict[str, Any]) -> str | None:
    """``None`` when two state dicts are equal tensor by tensor (a safetensors file's metadata may be written in
    another order); otherwise their largest absolute weight difference over the tensors they share, in words."""
    import torch

    if set(made) == set(ref) and all(torch.equal(made[k], ref[k]) for k in ref):
        return None
    diff = max((float((made[k].float() - ref[k].float()).abs().max()) for k in set(made) & set(ref)),
               default=float("nan"))
    return f"largest weight difference {diff:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergelab.report.shipped_encoder", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="pretrain here and compare with the shipped encoder")
    group.add_argument("--update", action="store_true", help="ship this checkout's default encoder")
    parser.add_argument("--profile", choices=SHIPPED_PROFILES, default="tiny",
                        help="whose encoder --check and --update pretrain and ship (default: tiny)")
    group.add_argument("--check-runs", action="store_true",
                       help="train the default experts, multi-task model and chapter 06's models here and compare "
                            "with the shipped ones")
    group.add_argument("--update-runs", action="store_true",
                       help="ship this checkout's default experts, multi-task model and chapter 06's models "
                            "(trained if missing)")
    parser.add_argument("--workers", type=int, default=2, help="processes that train runs side by side (one thread each)")
    args = parser.parse_args(argv)
    if args.profile != "tiny" and not (args.check or args.update):
        parser.error(f"--profile {args.profile} applies to --check and --update; the shipped runs are tiny's only")
    if args.update:
        print(f"shipped {update(args.profile)}")
        return 0
    if args.update_runs:
        targets = update_runs(args.workers)
        print(f"shipped the heads and {len(targets) - 1} runs and models in {WEIGHTS_DIR}")
        return 0
    if args.check_runs:
        return 0 if check_runs(args.workers) else 1
    return 0 if check(args.profile) else 1


if __name__ == "__main__":
    raise SystemExit(main())
