"""Chapter 06 (C2M3): what pairwise weight matching does to two models of one architecture trained from different
seeds: the loss along the line between them, how alike their weights become kind by kind, which tensors their
average cannot share, and a model averaged with a permuted copy of itself."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from ..alignment import apply_permutation, average_states, random_permutations, weight_matching
from ..task_vectors import cosine
from ..training.scratch import DigitsSplit, evaluate_state
from .ch06_models import Trained


def accuracy_on_test(t: Trained, data: DigitsSplit, state: Mapping[str, torch.Tensor]) -> float:
    """Test accuracy (fraction) of ``t``'s model with ``state`` loaded."""
    return evaluate_state(t.model, dict(state), data.X_test, data.y_test)["accuracy"]


def matched_to(t: Trained, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], seed: int,
               ) -> dict[str, torch.Tensor]:
    """``b`` permuted into the frame of ``a`` by pairwise weight matching (:func:`~mergelab.alignment.weight_matching`,
    groups visited in the order ``seed`` draws), by ``t``'s spec."""
    return apply_permutation(t.spec, weight_matching(t.spec, a, b, seed=seed), b)


def interpolation(t: Trained, data: DigitsSplit, points: int, seed: int) -> pd.DataFrame:
    """Test loss and accuracy along ``(1 - lam) theta_A + lam theta_B`` for the first two models, as they
    are (``aligned=False``) and with B weight-matched to A (``aligned=True``). Columns: ``lam, aligned,
    loss, accuracy, barrier`` (loss minus the straight line between the end points' losses)."""
    if points < 2:
        raise ValueError(f"barrier_points={points!r} is not valid; use at least 2 (the end points).")
    a, b = t.states[0], t.states[1]
    aligned_b = matched_to(t, a, b, seed)
    rows = []
    for aligned, bb in ((False, b), (True, aligned_b)):
        for i in range(points):
            lam = i / (points - 1)
            r = evaluate_state(t.model, {k: (1 - lam) * a[k] + lam * bb[k] for k in a}, data.X_test, data.y_test)
            rows.append({"lam": lam, "aligned": aligned, **r})
    df = pd.DataFrame(rows)
    for aligned, part in df.groupby("aligned"):
        ends = part.set_index("lam")["loss"]
        df.loc[part.index, "barrier"] = part["loss"] - ((1 - part["lam"]) * ends[0.0] + part["lam"] * ends[1.0])
    return df


def weight_similarity(t: Trained, seed: int) -> pd.DataFrame:
    """How alike the first two models' weights are, per kind of weight tensor, as they are and after weight
    matching puts the second in the first's frame (:func:`~mergelab.alignment.weight_matching`, seeded by
    ``seed`` as in :func:`interpolation`): where the permutations found partners for the units, and where they
    could not.

    Returns:
        One row per kind (tensors of two or more axes: matrices, kernels and embeddings; a parameter's name
        with every numeric index replaced by ``*``, so a kind pools its layers, blocks or stages): ``kind``, ``parameters`` (their count), ``cosine_before``
        and ``cosine_after`` (cosine similarity of the two models' tensors of that kind, flattened and
        concatenated), in the order of the state dict.
    """
    a, b = t.states[0], t.states[1]
    aligned = matched_to(t, a, b, seed)
    kinds: dict[str, list[str]] = {}
    for name, w in a.items():
        if w.ndim >= 2:
            kinds.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "*", name), []).append(name)

    return pd.DataFrame([{"kind": kind, "parameters": sum(a[n].numel() for n in names),
                          "cosine_before": cosine(a, b, names), "cosine_after": cosine(a, aligned, names)}
                         for kind, names in kinds.items()])


def pair_merges_keeping(t: Trained, keep: Sequence[str], seed: int,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """The first two models averaged after weight matching puts the second in the first's frame (as in
    :func:`interpolation`), and the same average with every tensor whose name contains one of ``keep`` (e.g.
    ``".attn."``) taken from the first model instead; returns both states and the kept tensors' names (a
    ``keep`` that names none is refused)."""
    a, b = t.states[0], t.states[1]
    kept = [k for k in a if any(part in k for part in keep)]
    if not kept:
        raise ValueError(f"keep={list(keep)} names no parameter of the {t.arch}; it has e.g. {list(a)[:6]}.")
    average = average_states([a, matched_to(t, a, b, seed)])
    return average, {k: (a[k] if k in kept else v) for k, v in average.items()}, kept


def pair_average_keeping(t: Trained, data: DigitsSplit, keep: Sequence[str], seed: int) -> dict[str, float]:
    """Which tensors an average cannot share: test ``accuracy`` of the first model (``model_a``), of the two
    merges of :func:`pair_merges_keeping` (``aligned_average``, ``keeping``), and ``kept``, how many tensors
    ``keep`` names."""
    average, keeping, kept = pair_merges_keeping(t, keep, seed)
    return {"model_a": accuracy_on_test(t, data, t.states[0]), "aligned_average": accuracy_on_test(t, data, average),
            "keeping": accuracy_on_test(t, data, keeping), "kept": len(kept)}


def permuted_copy_merge(t: Trained, data: DigitsSplit, seed: int) -> dict[str, float]:
    """The first model averaged with a copy of itself whose every group is randomly permuted (the same
    function, other weights): test accuracy of the model, of the copy, of their naive average and of
    their average after weight-matching the copy back, and the largest weight difference between the
    matched copy and the model (0 when matching undoes the permutation exactly)."""
    a = t.states[0]
    g = torch.Generator().manual_seed(seed)
    b = apply_permutation(t.spec, random_permutations(t.spec.group_sizes(a), g), a)
    matched = matched_to(t, a, b, seed)
    return {"model": accuracy_on_test(t, data, a), "permuted_copy": accuracy_on_test(t, data, b),
            "naive_average": accuracy_on_test(t, data, average_states([a, b])),
            "matched_average": accuracy_on_test(t, data, average_states([a, matched])),
            "matched_max_weight_difference": max(float((a[k] - matched[k]).abs().max()) for k in a)}

