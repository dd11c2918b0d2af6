"""Chapter 06's merge jobs, cached by configuration.

A merge job (:func:`mergelab.experiments.ch06_c2m3.merge_study`) aligns and merges a set of models of one
architecture with every method, REPAIR included, and evaluates the merges: about 100 CPU seconds for the
`tiny` chapter's 17 jobs, the chapter's longest step once its models are trained. Each job's result is
kept in ``<data>/merges/<arch>-<hash>.safetensors`` (its tensors) and the JSON sidecar beside it (its
numbers), keyed by the models' recipe and seed, the set of models, the Frank-Wolfe settings, the data and
the version of the code that merges (:mod:`mergelab.codeversion`, kind ``merge``), so a re-run loads
what did not change. Tensors and floats go through safetensors and JSON unchanged, so a loaded job is
the computed one bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import codeversion, paths
from ..alignment.frank_wolfe import FrankWolfeResult
from ..cache import Artifact
from ..training.scratch import ScratchConfig
from ..utils import config_hash

Metrics = dict[str, dict[str, float]]
"""Per method (and per endpoint), ``{"accuracy": fraction, "loss": nats, ...}`` on the test split."""
Correct = dict[str, torch.Tensor]
"""Per method, a bool tensor ``(N,)``: which test examples the merge classifies correctly."""


@dataclass
class MergeOutcome:
    """Merged states by method, C2M3's Frank-Wolfe result, MergeMany's permutations and seconds per method."""

    states: dict[str, dict[str, torch.Tensor]]
    frank_wolfe: FrankWolfeResult
    merge_many: list[dict[str, torch.Tensor]]
    seconds: dict[str, float]


JobResult = tuple["MergeOutcome | None", Metrics, Correct]
"""What one merge job returns: the outcome (only when kept), the metrics and the per-example correctness."""


def merge_artifact(cfg: ScratchConfig, members: Sequence[int], frank_wolfe: Mapping[str, Any], keep: bool,
                   data_key: Mapping[str, Any]) -> Artifact:
    """Where the merge job of the models ``members`` (indices: seeds ``cfg.seed + i``) of ``cfg``'s
    architecture is kept (``keep``: with its merged states and permutations, not only its numbers)."""
    key = config_hash({"config": cfg.key(), "members": [int(i) for i in members],
                       "frank_wolfe": dict(frank_wolfe), "keep": bool(keep), "data": dict(data_key),
                       "models_code": codeversion.key_part("scratch"),  # the models merged are remade when it changes
                       **codeversion.key_part("merge")})
    return Artifact.at(paths.data_dir() / "merges", cfg.arch, key)


def _perm_tensors(prefix: str, perms: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{p}/{g}": v.contiguous() for p, pp in enumerate(perms) for g, v in pp.items()}


def _perms(prefix: str, tensors: Mapping[str, torch.Tensor], groups: Sequence[Sequence[str]],
           ) -> list[dict[str, torch.Tensor]]:
    return [{g: tensors[f"{prefix}/{p}/{g}"] for g in gg} for p, gg in enumerate(groups)]


def encode(outcome: MergeOutcome | None, metrics: Metrics, correct: Correct,
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of one job for :meth:`Artifact.save`: correctness per method, and with an
    ``outcome`` its merged states (``state/<method>/<name>``) and both methods' permutations."""
    tensors = {f"correct/{m}": c.contiguous() for m, c in correct.items()}
    # mappings as lists of pairs: the sidecar's JSON writer sorts keys, and the tables follow these orders
    meta: dict[str, Any] = {"metrics": list(metrics.items()), "methods": list(correct)}
    if outcome is not None:
        fw = outcome.frank_wolfe
        tensors |= {f"state/{m}/{k}": v.contiguous() for m, s in outcome.states.items() for k, v in s.items()}
        tensors |= _perm_tensors("fw", fw.perms) | _perm_tensors("mm", outcome.merge_many)
        meta["outcome"] = {"states": [(m, list(s)) for m, s in outcome.states.items()],
                           "fw_groups": [list(pp) for pp in fw.perms],
                           "mm_groups": [list(pp) for pp in outcome.merge_many],
                           "seconds": list(outcome.seconds.items()),
                           "objective": fw.objective, "step_sizes": fw.step_sizes,
                           "objective_rounded": fw.objective_rounded, "iterations": fw.iterations,
                           "converged": fw.converged}
    return tensors, meta


def decode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> JobResult:
    """The job :func:`encode` stored."""
    correct = {m: tensors[f"correct/{m}"] for m in meta["methods"]}
    metrics = dict(meta["metrics"])
    info = meta.get("outcome")
    if info is None:
        return None, metrics, correct
    states = {m: {k: tensors[f"state/{m}/{k}"] for k in names} for m, names in info["states"]}
    fw = FrankWolfeResult(perms=_perms("fw", tensors, info["fw_groups"]), objective=list(info["objective"]),
                          step_sizes=list(info["step_sizes"]), objective_rounded=info["objective_rounded"],
                          iterations=info["iterations"], converged=info["converged"])
    outcome = MergeOutcome(states, fw, _perms("mm", tensors, info["mm_groups"]), dict(info["seconds"]))
    return outcome, metrics, correct


def build_job(artifact: Artifact, build: Callable[[], JobResult]) -> None:
    """Make sure the job kept at ``artifact`` is there: ``build()`` computes it (and it is saved) when it
    is not (once, whichever process asks first)."""
    artifact.get_or_build(lambda: encode(*build()))


def load_job(artifact: Artifact) -> JobResult:
    """The job kept at ``artifact`` (:func:`build_job` first)."""
    return decode(artifact.load(), artifact.meta())
