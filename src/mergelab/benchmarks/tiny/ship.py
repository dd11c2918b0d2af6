"""The pretrained `tiny` encoder shipped with mergelab, as open_clip ships CLIP's weights.

Pretraining the default `tiny` encoder takes about 4 minutes on a 2-core laptop, a third of a cold
`make report`, and its bits depend on the torch build and thread count. The encoder the package's
pretraining code made for the default configuration (``params/tiny/_benchmark.yaml``) is therefore kept
in ``weights/encoder-<encoder key>.safetensors`` with its log (loss curve, wall time, environment) in
the JSON beside it. :meth:`mergelab.benchmarks.tiny.TinyBenchmark.pretrained_state` takes it instead of
pretraining when the encoder key on the CPU matches (``shipped_encoder_key``, looked up on every device), that is
when the data, model, pretraining configuration, pretraining threads and the pretraining code's version
(:mod:`mergelab.codeversion`) are the ones it was made with; any other
configuration pretrains as before. ``MERGELAB_PRETRAIN=1`` ignores the shipped encoder, in a data folder that
does not hold its copy yet (an error says so otherwise: the experts made from the copy would not match).

``python -m mergelab.report.shipped_encoder --check`` pretrains the default encoder in a temporary cache
and compares it with the shipped one, at the thread count recorded in its log. With the torch build of
``requirements.lock`` it can still differ on another machine (docs/tiny-benchmark.md, session 21: the CPU's kernels
round differently), so a mismatch there does not by itself mean the code changed; ``--update`` replaces the shipped encoder with the default one of
this checkout's cache (pretraining it if needed), after a change to the pretraining code or data.
``tests/test_tiny_shipped.py`` fails while the shipped key differs from the default configuration's.

The default experts ship the same way, as the public benchmark's fine-tuned ViT-B-32 checkpoints are
downloaded rather than trained by each reader: the experts of every fine-tuning seed of chapter 00's
seed study and its multi-task model (``params/tiny/00_benchmark_and_baselines.yaml``), each in
``weights/<kind>-<run key>.safetensors`` with its training log (loss curve, wall time) beside it. A
run is taken instead of fine-tuning when its cache key on the CPU matches (the benchmark, tasks, heads, recipe,
thread count and fine-tuning code's version, :meth:`~mergelab.benchmarks.base.BenchmarkBase.run_key`; looked up on
every device)
*and* the data folder's encoder is the shipped one they were made from (its SHA-256, recorded with
each run). Every other run (other recipes, chapter 01's sweep, chapter 02's trajectories, the smoke
size) is trained as before. ``MERGELAB_FINETUNE=1`` (or ``MERGELAB_PRETRAIN=1``) trains them here too.
``python -m mergelab.report.shipped_encoder --check-runs`` trains the default runs in a temporary cache
and compares them with the shipped ones; ``--update-runs`` ships this checkout's.

Chapter 06's models trained from scratch at tiny (``params/tiny/06_cycle_consistent_merging.yaml``: every
architecture's ``num_models`` seeds) ship the same way, as ``weights/scratch-<arch>-<key>.safetensors`` named by
their cache key (:func:`mergelab.training.scratch.scratch_artifact`), which holds the recipe, the data split and the
training code's version, and nothing of the encoder. Any other recipe trains as before, and so does every model
with ``MERGELAB_FINETUNE=1``; ``--check-runs`` and ``--update-runs`` cover them too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...cache import Artifact

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Folder of the shipped encoders (package data)."""

ENV_PRETRAIN = "MERGELAB_PRETRAIN"
"""Set to ``1`` to pretrain even where a shipped encoder matches."""


ENV_FINETUNE = "MERGELAB_FINETUNE"
"""Set to ``1`` to fine-tune (and train chapter 06's models from scratch) even where a shipped run matches."""


def requested(variable: str) -> bool:
    """Whether the environment variable ``variable`` (:data:`ENV_PRETRAIN`, :data:`ENV_FINETUNE`) is ``1``."""
    return os.environ.get(variable, "") == "1"


def _shipped(name: str, *ignored_if: str) -> Artifact | None:
    """``weights/<name>.safetensors`` with its sidecar, or ``None`` when it is not there or one of the
    ``ignored_if`` variables is set to ``1``."""
    if any(requested(v) for v in ignored_if):
        return None
    artifact = Artifact(WEIGHTS_DIR / f"{name}.safetensors")
    return artifact if artifact.exists() else None


def taken(artifact: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, log)`` of a shipped artifact as a cache build returns them: its log marked ``"shipped": True``."""
    return artifact.load(), {**artifact.meta(), "shipped": True}


def shipped_artifact(encoder_key: str) -> Artifact | None:
    """The shipped encoder for ``encoder_key`` (:attr:`TinyBenchmark.encoder_key`), or ``None`` when there
    is none or ``MERGELAB_PRETRAIN=1``."""
    return _shipped(f"encoder-{encoder_key}", ENV_PRETRAIN)

RUN_KINDS = ("expert", "multitask")
"""Kinds of fine-tuning run that can ship (:meth:`~mergelab.benchmarks.base.BenchmarkBase.run_key`)."""


def shipped_run(kind: str, run_key: str) -> Artifact | None:
    """The shipped fine-tuning run of ``kind`` (``"expert"`` or ``"multitask"``) whose cache key is
    ``run_key``, or ``None`` when none ships, or ``MERGELAB_FINETUNE=1`` or ``MERGELAB_PRETRAIN=1``.

    Whether it may be used also depends on the encoder it was made from
    (:meth:`mergelab.benchmarks.tiny.TinyBenchmark.shipped_run` checks that)."""
    if kind not in RUN_KINDS:
        raise ValueError(f"kind={kind!r} is not valid; use one of {', '.join(RUN_KINDS)}.")
    return _shipped(f"{kind}-{run_key}", ENV_FINETUNE, ENV_PRETRAIN)


def shipped_runs() -> list[str]:
    """``<kind>-<run key>`` of every shipped fine-tuning run."""
    return sorted(p.stem for kind in RUN_KINDS for p in WEIGHTS_DIR.glob(f"{kind}-*.safetensors"))


def shipped_scratch(name: str) -> Artifact | None:
    """The shipped model trained from scratch whose cache artifact is ``<data>/scratch/<name>.safetensors``
    (``<arch>-<key>``, :func:`mergelab.training.scratch.scratch_artifact`), or ``None`` when none ships or
    ``MERGELAB_FINETUNE=1``. ``MERGELAB_PRETRAIN=1`` keeps it: these models are not made from the encoder."""
    return _shipped(f"scratch-{name}", ENV_FINETUNE)


def shipped_scratch_names() -> list[str]:
    """``<arch>-<key>`` of every shipped model trained from scratch (chapter 06's)."""
    return sorted(p.stem.removeprefix("scratch-") for p in WEIGHTS_DIR.glob("scratch-*.safetensors"))


def shipped_heads(encoder_key: str, name: str) -> Artifact | None:
    """The frozen heads' class prototypes shipped with the encoder of ``encoder_key``, as the cache names
    them (``name``, e.g. ``heads-canonical-threads1``), or ``None`` when none ships or ``MERGELAB_PRETRAIN=1``.

    They are what the shipped encoder's heads are built as on the machine that made the shipped runs; the
    run keys hold the heads' digests, so a reader whose BLAS gave other last bits would otherwise key, and
    train, every default run again (the public task-vector release ships its heads beside its experts too)."""
    return _shipped(f"{name}-{encoder_key}", ENV_PRETRAIN)


def shipped_keys() -> list[str]:
    """Encoder keys of every shipped encoder."""
    return sorted(p.stem.removeprefix("encoder-") for p in WEIGHTS_DIR.glob("encoder-*.safetensors"))


def environment() -> dict[str, Any]:
    """What a pretraining's bits depend on besides the code: torch build and thread count."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}
