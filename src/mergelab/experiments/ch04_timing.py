"""Chapter 04 (MASS routing): the time MASS takes per image against one forward pass of a merged model, on a
mixed batch, in paired rounds (its claim reads the median ratio and its interval)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..analysis.statistics import bootstrap_ci
from ..merging.mass import MassRouter
from ..utils import torch_threads


COLD_REPEATS = 3
"""Most timing rounds of MASS with an empty second-pass cache (:func:`time_per_image`)."""


def time_per_image(router: MassRouter, merged: torch.nn.Module, images: torch.Tensor, repeats: int = 3,
                   level: float = 0.95, threads: int | None = 1) -> dict[str, Any]:
    """Seconds per image of MASS (routing + second pass + head choice) against one forward pass of
    ``merged`` on the same mixed batch, in ``repeats`` paired rounds (each round times the forward pass
    and then MASS with its second-pass models cached, so a drift of the machine's speed reaches both);
    then MASS cold (an empty cache), at most :data:`COLD_REPEATS` times: each cold call builds every
    second-pass model of the batch (dozens of TSV-M merges at the clip size), and no claim rests on it.

    Each round also times the first pass alone (:meth:`MassRouter.features`: the routing model up to the routing
    point), so that the ratio splits into what routing costs and what the second pass and the choice of head cost.

    Returns ``{"forward_s", "mass_s", "mass_cold_s", "first_pass_s"}`` (medians over rounds, seconds per image),
    ``"ratios"`` (per round, MASS over the forward pass), ``"ratio"`` (their median), ``"first_pass_ratios"`` and
    ``"first_pass_ratio"`` (the same for the first pass alone), ``"second_pass_ratio"`` (the median over rounds of
    MASS less its first pass, over the forward pass: the second pass with the choice of head), ``"second_pass_sets"``
    (how many sub-batches the second pass runs the batch as: one per distinct selected set), ``"ratio_interval"``
    (:func:`~mergelab.analysis.statistics.bootstrap_ci` of that median at ``level``: NaN bounds below three
    rounds), ``"ratio_cold"`` (median cold over median forward), ``"repeats"``, ``"cold_repeats"``, ``"batch"``
    and ``"threads"``
    (torch's intra-op threads during the measurement; on a CPU the ratio depends on it, since a second
    thread speeds the plain batch up more than MASS's per-set batches, so read it with the thread count).

    ``threads``: torch's intra-op threads on a CPU while timing (default one: the cost in work, the same
    whether the chapter runs alone or beside another; ``None``: the caller's setting). Ignored on a GPU.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"timing_repeats={repeats!r} is not valid; use an integer >= 1 (paired timing rounds; "
                         "three or more give the ratio an interval).")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not valid; use an integer >= 1 (torch threads while timing on a "
                         "CPU) or None (the caller's setting).")
    merged = merged.to(router.device).eval()
    images = images.to(router.device)

    def clock(fn) -> float:
        if router.device.type == "cuda":
            torch.cuda.synchronize(router.device)
        start = time.perf_counter()
        fn()
        if router.device.type == "cuda":
            torch.cuda.synchronize(router.device)
        return (time.perf_counter() - start) / len(images)

    cold_router = router.with_options()
    cold_router._models = type(router._models)()

    def cold() -> None:
        cold_router._models.clear()
        cold_router.predict(images)

    with torch_threads(threads if router.device.type == "cpu" else None), torch.no_grad():
        router.predict(images)  # second-pass models of this batch built: MASS warm from here
        _in(router, merged, images)
        forward, mass, first = [], [], []
        for _ in range(repeats):
            forward.append(clock(lambda: _in(router, merged, images)))
            mass.append(clock(lambda: router.predict(images)))
            first.append(clock(lambda: router.features(images)))
        sets = len(set(router.route(images).keys))
        cold_router.first_pass_model  # noqa: B018 - built once, like a loaded model
        mass_cold = [clock(cold) for _ in range(min(repeats, COLD_REPEATS))]
        used_threads = torch.get_num_threads()
    ratios = [m / f for m, f in zip(mass, forward)]
    first_ratios = [p / f for p, f in zip(first, forward)]
    return {"forward_s": float(np.median(forward)), "mass_s": float(np.median(mass)),
            "mass_cold_s": float(np.median(mass_cold)), "first_pass_s": float(np.median(first)),
            "ratios": ratios, "ratio": float(np.median(ratios)), "first_pass_ratios": first_ratios,
            "first_pass_ratio": float(np.median(first_ratios)),
            "second_pass_ratio": float(np.median([r - p for r, p in zip(ratios, first_ratios)])), "second_pass_sets": sets,
            "ratio_interval": bootstrap_ci(np.median, ratios, level=level, vectorized=True),
            "ratio_cold": float(np.median(mass_cold) / np.median(forward)), "repeats": repeats,
            "cold_repeats": len(mass_cold), "batch": int(len(images)), "threads": used_threads}


def _in(router: MassRouter, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` in the router's arithmetic (:meth:`MassRouter.autocast`)."""
    with router.autocast():
        return model(images)


def timings(router: MassRouter, merged: torch.nn.Module, images: torch.Tensor, repeats: int = 3
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`time_per_image` on one torch thread (the chapter's claim), and, on a CPU where torch has more
    threads, the same with all of them (the ratio depends on the thread count); ``None`` otherwise."""
    one = time_per_image(router, merged, images, repeats)
    every = (time_per_image(router, merged, images, repeats, threads=None)
             if router.device.type == "cpu" and torch.get_num_threads() > 1 else None)
    return one, every
