"""Alignment of models trained from different initializations: permutation specs as data
(:mod:`.specs`), the small architectures and their specs (:mod:`.architectures`), pairwise weight
matching and MergeMany (:mod:`.matching`), C2M3's Frank-Wolfe over doubly stochastic matrices
(:mod:`.frank_wolfe`) and REPAIR (:mod:`.repair`)."""

from __future__ import annotations

from .architectures import ARCHITECTURES, MLP, ResNet, build_model, mlp_spec, resnet_spec, vit_classifier, vit_spec
from .frank_wolfe import FrankWolfeResult, c2m3_frank_wolfe, c2m3_gradient, c2m3_objective, objective_at
from .matching import average_states, merge_aligned, merge_many, pairwise_from_universe, weight_matching
from .repair import channel_stats, repair
from .specs import (
    PermutationSpec,
    SpecError,
    apply_permutation,
    cycle_error,
    identity_permutations,
    invert,
    random_permutations,
)

__all__ = ["ARCHITECTURES", "MLP", "FrankWolfeResult", "PermutationSpec", "ResNet", "SpecError", "apply_permutation", "objective_at",
           "average_states", "build_model", "c2m3_frank_wolfe", "c2m3_gradient", "c2m3_objective",
           "channel_stats", "cycle_error", "identity_permutations", "invert", "merge_aligned", "merge_many",
           "mlp_spec", "pairwise_from_universe", "random_permutations", "repair", "resnet_spec",
           "vit_classifier", "vit_spec", "weight_matching"]
