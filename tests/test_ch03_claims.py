"""Chapter 03's claims judged on hand-made tables: each rule says reproduced where its numbers clear the bar, and
not where they do not (the notebook test only checks that the statuses are among the three)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mergelab.experiments.ch03_tsv import claims

TASKS = ("a", "b", "c")
N_TEST = {t: 2000 for t in TASKS}


def _inputs(energy_gap: float, count_edges: dict[int, float], relative_difference: float = 1e-7):
    rng = np.random.default_rng(0)
    random_energy = rng.uniform(0.2, 0.3, 40)
    energy = pd.DataFrame({"energy": random_energy + energy_gap + rng.normal(0, 0.005, 40),
                           "random_energy": random_energy})
    acc = lambda v: {"per_task_accuracy": {t: v for t in TASKS}}  # noqa: E731
    rows = {"experts": acc(0.9), "task_arithmetic": acc(0.6), "tsv_merge": acc(0.7), "tsv_merge_validated": acc(0.72)}
    pairs = pd.DataFrame({"sti": np.arange(10.0), "normalized_loss": np.arange(10.0) + rng.normal(0, 0.5, 10)})
    study = pd.DataFrame([{"num_tasks": n, "method": m, "per_task_accuracy": {t: 0.6 + (edge if m.startswith("tsv") else 0)
                                                                            for t in TASKS}}
                          for n, edge in count_edges.items() for m in ("tsv_merge_validated", "task_arithmetic_validated")])
    return energy, rows, pairs, study, {"relative_difference": relative_difference, "speedup": 3.0}


def _status(out: list[dict], start: str) -> str:
    (c,) = [c for c in out if c["claim"].startswith(start)]
    return c["status"]


def test_low_rank_needs_ten_points_over_random_and_the_task_count_claim_needs_every_count():
    out = claims(*_inputs(0.30, {3: 0.08, 4: 0.06}), N_TEST, "tiny")
    assert _status(out, "Task matrices are low-rank") == "reproduced"
    assert _status(out, "As more tasks are merged") == "reproduced"
    assert _status(out, "Pairs of tasks with more Singular Task Interference") == "reproduced"
    assert _status(out, "The package's fast TSV-M") == "reproduced"
    weak = claims(*_inputs(0.05, {3: 0.08, 4: -0.06}, relative_difference=1e-3), N_TEST, "tiny")
    assert _status(weak, "Task matrices are low-rank") == "not_reproduced"  # surely 5 points over random, against 10
    at_bar = claims(*_inputs(0.10, {3: 0.08, 4: 0.06}), N_TEST, "tiny")
    assert _status(at_bar, "Task matrices are low-rank") == "not_testable"  # its interval straddles the 10 points
    assert _status(weak, "As more tasks are merged") == "not_reproduced"  # behind at 4 tasks
    assert _status(weak, "The package's fast TSV-M") == "not_reproduced"
    level = claims(*_inputs(0.30, {3: 0.08, 4: 0.0}), N_TEST, "tiny")
    assert _status(level, "As more tasks are merged") == "not_testable"  # level at 4 tasks: not every count ahead


def test_the_task_count_note_says_where_a_curve_rises_and_what_one_subset_per_size_allows():
    from mergelab.experiments.ch03_tsv import task_count_note

    falling = pd.DataFrame({"ta": [0.8, 0.7, 0.6], "tsv": [0.9, 0.85, 0.8]}, index=[2, 3, 4])
    assert task_count_note(falling, 3).startswith("Every curve falls with each task added. Each size is the mean over 3")
    bumpy = pd.DataFrame({"ta": [0.8, 0.7, 0.75, 0.6], "tsv": [0.9, 0.85, 0.8, 0.82]}, index=[2, 3, 4, 5])
    note = task_count_note(bumpy, 1)
    assert note.startswith("The curves are not monotone: normalized accuracy rises again as tasks are added for "
                           "ta (at n = 4); tsv (at n = 5). Each size is one random subset of tasks")


def test_the_task_count_edge_note_counts_each_variants_merges_at_either_end_of_its_grid():
    from mergelab.experiments.ch03_tsv import task_count_edge_note

    def row(method, coefficient, edge, low=0.0, high=2.0):
        return {"method": method, "coefficient": coefficient, "at_grid_edge": edge,
                "validation_sweep": [low, (low + high) / 2, high] if edge is not None else None}

    study = pd.DataFrame([row("tsv_merge_validated", 2.0, True), row("tsv_merge_validated", 1.0, False),
                          row("tsv_merge_validated", 0.0, True), row("task_arithmetic_validated", 0.3, False, high=1.0),
                          row("tsv_merge", 1.0, None)])
    assert task_count_edge_note(study) == (
        "In the task-count study some coefficients chosen on validation lie at an end of their grid (at the top the "
        "best may lie beyond it; at the bottom no merge beat the pretrained model): tsv_merge_validated in 2 of 3 "
        "merges (1 at the top, 2; 1 at the bottom, 0).")
    inside = study.assign(at_grid_edge=[False, False, False, False, None])
    assert task_count_edge_note(inside) == ("In the task-count study every coefficient chosen on validation lies "
                                            "inside its grid.")
    assert task_count_edge_note(study[study["method"] == "tsv_merge"]) == ""  # nothing chosen on a grid


def test_the_claims_intervals_are_drawn_with_the_chapters_seed_as_its_text_is():
    """The notebook's STI interval (figure, summary) is drawn with its ``seed``; the claims read the same interval,
    and recomputing them from a results file takes the seed from its provenance."""
    from mergelab.analysis.statistics import spearman_ci
    from mergelab.experiments.ch03_tsv import claims_from_results

    energy, rows, pairs, study, speed = _inputs(0.30, {3: 0.08, 4: 0.06})
    sti = lambda out: next(c for c in out if c["claim"].startswith("Pairs of tasks"))["evidence"]["spearman"]  # noqa: E731
    at3 = sti(claims(energy, rows, pairs, study, speed, N_TEST, "tiny", seed=3))
    assert at3 == spearman_ci(pairs["sti"], pairs["normalized_loss"], seed=3)
    assert at3 != sti(claims(energy, rows, pairs, study, speed, N_TEST, "tiny", seed=0))  # another draw of resamples
    results = {"energy_table": energy.to_dict("records"), "methods": rows, "interference": {"pairs": pairs.to_dict("records")},
               "task_count": study.to_dict("records"), "speed": speed, "test_sizes": N_TEST, "benchmark": "tiny",
               "provenance": {"seed": 3}}
    assert sti(claims_from_results(results)) == at3
