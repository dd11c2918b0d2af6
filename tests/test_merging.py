"""Invariants of the baseline merge methods and of the accuracy metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_state
from mergelab.evaluation import absolute_accuracy, normalized_accuracy
from mergelab.merging import sparsify
from mergelab.merging import MERGE_METHODS, get_merge, merge, merge_with_validation
from mergelab.merging.sparsify import drop_and_rescale as dare, ties_merge_tensor, ties_threshold
from mergelab.merging.ties import merge_ties
from mergelab.task_vectors import TaskVector


def test_task_arithmetic_one_task_coefficient_one_reproduces_the_expert(pretrained):
    expert = make_state(7)
    tv = TaskVector.from_states(pretrained, expert)
    merged = merge("task_arithmetic", pretrained, [tv], coefficient=1.0)
    for k in expert:
        torch.testing.assert_close(merged[k], expert[k], rtol=0, atol=1e-6)


def test_weight_averaging_is_the_mean_of_the_experts_and_ignores_task_order(pretrained, task_vectors):
    a = merge("weight_averaging", pretrained, task_vectors)
    b = merge("weight_averaging", pretrained, task_vectors[::-1])
    experts = [tv.apply_to(pretrained) for tv in task_vectors]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
        torch.testing.assert_close(a[k], sum(e[k] for e in experts) / len(experts))


def test_ties_on_hand_built_tensors():
    # Three tasks, five entries. Thresholds trim |x| <= 0.5 for every task.
    stacked = torch.tensor([
        [1.0, -2.0, 0.3, 2.0, 0.0],
        [3.0, 1.0, -0.4, -1.0, 0.0],
        [-1.0, 0.2, 0.1, -2.0, 0.0],
    ])
    out = ties_merge_tensor(stacked, torch.tensor([0.5, 0.5, 0.5]))
    # entry 0: trimmed [1, 3, -1], sum 3 > 0 -> mean of agreeing positives (1 + 3) / 2 = 2
    # entry 1: trimmed [-2, 1, 0], sum -1 -> only -2 agrees -> -2
    # entry 2: all trimmed -> 0
    # entry 3: trimmed [2, -1, -2], sum -1 -> negatives -1, -2 -> -1.5
    # entry 4: all zero -> 0
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.0, -1.5, 0.0]))


def test_ties_threshold_keeps_the_requested_share():
    tv = TaskVector({"a": torch.arange(1.0, 101.0)})
    thr = ties_threshold(tv, density=0.2)
    kept = (tv["a"].abs() > thr).sum().item()
    assert kept == 20
    with pytest.raises(ValueError, match="density"):
        ties_threshold(tv, density=0.0)


def test_ties_with_density_one_and_one_task_reproduces_the_expert(pretrained):
    expert = make_state(5)
    tv = TaskVector.from_states(pretrained, expert)
    merged = merge("ties", pretrained, [tv], coefficient=1.0, density=1.0)
    for k in expert:
        torch.testing.assert_close(merged[k], expert[k], rtol=0, atol=1e-6)


def test_dare_preserves_the_task_vector_in_expectation():
    tv = TaskVector({"w": torch.linspace(-1, 1, 200).reshape(20, 10)})
    p, n = 0.7, 2000
    draws = torch.stack([dare(tv, drop_rate=p, seed=s)["w"] for s in range(n)])
    # each draw is x / (1 - p) with probability 1 - p, else 0: mean x, std |x| sqrt(p / (1 - p))
    standard_error = tv["w"].abs() * (p / (1 - p)) ** 0.5 / n**0.5
    assert ((draws.mean(0) - tv["w"]).abs() <= 5 * standard_error + 1e-6).all()
    # and the bound is not vacuous: it is far tighter than the entries themselves
    assert (5 * standard_error).max() < 0.2 * tv["w"].abs().max()
    one = dare(tv, drop_rate=0.7, seed=0)["w"]
    kept = one != 0
    torch.testing.assert_close(one[kept], tv["w"][kept] / 0.3)
    assert 0.6 < 1 - kept.float().mean().item() < 0.8


def test_dare_is_seeded():
    tv = TaskVector({"w": torch.randn(30, 30)})
    torch.testing.assert_close(dare(tv, 0.5, seed=3)["w"], dare(tv, 0.5, seed=3)["w"])
    assert not torch.equal(dare(tv, 0.5, seed=3)["w"], dare(tv, 0.5, seed=4)["w"])
    with pytest.raises(ValueError, match="drop_rate"):
        dare(tv, 1.0)


def test_task_vector_from_states_refuses_another_architecture(pretrained):
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        TaskVector.from_states(pretrained, {**make_state(1), "extra": torch.zeros(1)})


def test_registry_lists_the_baselines_and_rejects_unknown_names():
    assert {"weight_averaging", "task_arithmetic", "ties", "dare"} <= set(MERGE_METHODS)
    with pytest.raises(ValueError, match="valid: .*task_arithmetic"):
        get_merge("nonsense")


def test_merge_with_validation_picks_the_best_coefficient(pretrained, task_vectors):
    target = task_vectors[0].apply_to(pretrained, 0.4)

    def score(state):  # highest when the merge is closest to theta_0 + 0.4 tau_0
        return -float(sum(((state[k] - target[k]) ** 2).sum() for k in state))

    result = merge_with_validation("task_arithmetic", pretrained, [task_vectors[0]], score,
                                   grid=[0.1, 0.2, 0.4, 0.8], progress=False)
    assert result.coefficient == pytest.approx(0.4)
    assert set(result.sweep) == {0.1, 0.2, 0.4, 0.8}
    assert max(result.sweep, key=result.sweep.get) == pytest.approx(0.4)
    averaged = merge_with_validation("weight_averaging", pretrained, task_vectors, score, progress=False)
    assert averaged.coefficient is None and averaged.sweep == {}
    # a NumPy grid, as np.linspace gives it, chooses the same, with plain floats in the result
    from_numpy = merge_with_validation("task_arithmetic", pretrained, [task_vectors[0]], score,
                                       grid=np.array([0.1, 0.2, 0.4, 0.8]), progress=False)
    assert from_numpy.coefficient == pytest.approx(0.4) and type(from_numpy.coefficient) is float
    assert from_numpy.sweep == pytest.approx(result.sweep)


def test_states_at_other_coefficients_come_from_the_same_update(pretrained, task_vectors, monkeypatch):
    from dataclasses import replace

    
    calls = []
    method = get_merge("task_arithmetic")
    counted = replace(method, update=lambda *a, **k: calls.append(1) or method.update(*a, **k))
    monkeypatch.setitem(MERGE_METHODS, "task_arithmetic", counted)
    result = merge_with_validation("task_arithmetic", pretrained, task_vectors, lambda st: 0.0,
                                   grid=[0.2, 1.0], also_at=[1.0, 0.5], progress=False)
    assert len(calls) == 1  # the update is computed once for the sweep and the extra states
    assert set(result.also) == {1.0, 0.5}
    for c in (1.0, 0.5):
        expected = merge("task_arithmetic", pretrained, task_vectors, coefficient=c)
        assert all(torch.allclose(result.also[c][k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="also_at"):
        merge_with_validation("task_arithmetic", pretrained, task_vectors, lambda st: 0.0, grid=(),
                              also_at=[1.0], progress=False)


def test_bad_merge_inputs_are_named(pretrained, task_vectors):
    """What a user is likely to pass by mistake gets an error naming it, not a KeyError from deep inside."""
    as_dict = dict(zip("abc", task_vectors))
    with pytest.raises(ValueError, match=r"task_vectors must be a list of TaskVector .*got dict.*list\(task_vectors.values"):
        merge("task_arithmetic", pretrained, as_dict)
    with pytest.raises(ValueError, match="task_vectors must be a list of TaskVector .*got TaskVector"):
        merge("task_arithmetic", pretrained, task_vectors[0])
    for bad in ("0.3", None, float("nan")):
        with pytest.raises(ValueError, match="coefficient=.* is not valid; use a number"):
            merge("task_arithmetic", pretrained, task_vectors, coefficient=bad)
    with pytest.raises(ValueError, match="merge method 'ties' has no option 'densty'; valid: .*density"):
        MERGE_METHODS["ties"](pretrained, task_vectors, densty=0.1)  # the registry's entry checks, as merge() does
    score = lambda state: 0.0  # noqa: E731
    with pytest.raises(ValueError, match="merge method 'ties' has no option 'densty'"):
        merge_with_validation("ties", pretrained, task_vectors, score, densty=0.1, progress=False)
    with pytest.raises(ValueError, match="'weight_averaging' has no coefficient to choose; call it with grid=()"):
        merge_with_validation("weight_averaging", pretrained, task_vectors, score, grid=[0.1, 0.2], progress=False)
    with pytest.raises(ValueError, match="grid='0.5' is not valid; use a list of coefficients"):
        merge_with_validation("task_arithmetic", pretrained, task_vectors, score, grid="0.5", progress=False)
    with pytest.raises(ValueError, match="grid value=nan is not valid"):
        merge_with_validation("task_arithmetic", pretrained, task_vectors, score, grid=[0.0, float("nan")], progress=False)
    with pytest.raises(ValueError, match=r"coefficient=0.5 conflicts with the sweep.*grid=\[0.5\]"):
        merge_with_validation("task_arithmetic", pretrained, task_vectors, score, coefficient=0.5, progress=False)


def test_absolute_and_normalized_accuracy_follow_their_definitions():
    merged = {"a": 0.5, "b": 0.9}
    experts = {"a": 1.0, "b": 0.9}
    assert absolute_accuracy(merged) == pytest.approx(0.7)
    # mean of ratios (0.5 + 1.0) / 2, not ratio of means 0.7 / 0.95
    assert normalized_accuracy(merged, experts) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no expert accuracy for task 'c'"):
        normalized_accuracy({"c": 0.1}, experts)
    # percentages, an expert at 0 and no tasks are refused by name instead of giving 87.5, inf or nan
    with pytest.raises(ValueError, match=r"per_task\['a'\]=95 is not valid; accuracies are fractions in \[0, 1\]"):
        absolute_accuracy({"a": 95, "b": 80})
    with pytest.raises(ValueError, match=r"expert_accuracy\['a'\]=90 is not valid"):
        normalized_accuracy(merged, {"a": 90, "b": 0.9})
    with pytest.raises(ValueError, match=r"expert_accuracy\['a'\] is 0: normalized accuracy is undefined"):
        normalized_accuracy(merged, {"a": 0.0, "b": 0.9})
    with pytest.raises(ValueError, match="per_task accuracies are empty"):
        normalized_accuracy({}, {})


def test_ties_merged_in_chunks_equals_one_stacked_merge(monkeypatch):
    
    shapes = {"w": (7, 5), "b": (7,)}
    pre = make_state(0, shapes)
    tvs = [TaskVector.from_states(pre, make_state(s, shapes)) for s in (1, 2, 3)]
    thresholds = torch.tensor([ties_threshold(tv, 0.5) for tv in tvs])
    expected = {k: pre[k] + 0.7 * ties_merge_tensor(torch.stack([tv[k] for tv in tvs]), thresholds)
                for k in shapes}
    monkeypatch.setattr(sparsify, "TIES_CHUNK", 4)  # 35 entries: 9 chunks, the last one partial
    merged = merge_ties(pre, tvs, coefficient=0.7, density=0.5)
    for k in shapes:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=0)



def test_validation_ties_go_to_the_smaller_coefficient_whatever_the_grid_order_and_nan_is_refused(pretrained,
                                                                                                task_vectors):
    flat = lambda state: 1.0  # noqa: E731 - every coefficient scores the same
    for grid in ((0.2, 0.5, 0.9), (0.9, 0.5, 0.2)):
        result = merge_with_validation("task_arithmetic", pretrained, task_vectors, flat, grid=grid, progress=False)
        assert result.coefficient == 0.2 and result.at_grid_edge
    peaked = lambda state: -abs(float(state["w"].sum() - task_vectors[0].apply_to(pretrained, 0.5)["w"].sum()))  # noqa: E731
    inner = merge_with_validation("task_arithmetic", pretrained, task_vectors[:1], peaked, grid=(0.0, 0.5, 1.0),
                                  progress=False)
    assert inner.coefficient == 0.5 and not inner.at_grid_edge
    with pytest.raises(ValueError, match=r"score at coefficient 0.5 is nan.*finite"):
        merge_with_validation("task_arithmetic", pretrained, task_vectors,
                              lambda state: float("nan") if abs(float(state["w"].sum())) >= 0 else 0.0,
                              grid=(0.5,), progress=False)


def test_merge_baselines_chooses_by_normalized_validation_accuracy(pretrained, task_vectors, capsys):
    from mergelab.evaluation import merge_baselines

    class Bench:  # task "a" is easy, task "b" hard: normalizing by the experts changes the choice
        tasks = ("a", "b")

        def evaluate(self, state, split="test", tasks=None):
            c = float(state["w"].sum() - pretrained["w"].sum()) / float(sum(tv["w"].sum() for tv in task_vectors[:2]))
            return {"a": 0.9 - 0.5 * c, "b": 0.1 + 0.4 * c}

    tvs = {"a": task_vectors[0], "b": task_vectors[1]}
    grid = {"task_arithmetic": {"grid": (0.0, 0.5, 1.0)}}
    absolute = merge_baselines(Bench(), pretrained, tvs, ["task_arithmetic"], grid, False, metric="absolute")
    normalized = merge_baselines(Bench(), pretrained, tvs, ["task_arithmetic"], grid, False,
                                 expert_val={"a": 0.9, "b": 0.5})
    assert absolute["task_arithmetic"].coefficient == 0.0 and normalized["task_arithmetic"].coefficient == 1.0
    with pytest.raises(ValueError, match="needs expert_val.*missing: b"):
        merge_baselines(Bench(), pretrained, tvs, ["task_arithmetic"], grid, False, expert_val={"a": 0.9})
    zero = merge_baselines(Bench(), pretrained, tvs, ["task_arithmetic"], grid, False, expert_val={"a": 0.9, "b": 0.0})
    assert zero["task_arithmetic"].coefficient == 0.0 and "scores 0 on validation" in capsys.readouterr().out


def test_a_choice_at_either_end_of_its_grid_is_at_the_edge():
    from mergelab.merging.select import at_grid_edge

    assert at_grid_edge(0.0, [0.0, 0.3, 1.0]) and at_grid_edge(1.0, [1.0, 0.0, 0.3])  # whatever the grid's order
    assert not at_grid_edge(0.3, [0.0, 0.3, 1.0])
    assert not at_grid_edge(0.3, [0.3]) and not at_grid_edge(0.3, [0.3, 0.3])  # one value: no edge to flag
    assert not at_grid_edge(None, [0.0, 1.0])  # a method without a coefficient


def test_sparsifying_options_of_the_wrong_type_are_named(pretrained, task_vectors):
    with pytest.raises(ValueError, match="density='0.2' is not valid; use a fraction in \\(0, 1\\]"):
        merge("ties", pretrained, task_vectors, density="0.2")
    with pytest.raises(ValueError, match="drop_rate='0.5' is not valid; use a probability in \\[0, 1\\)"):
        merge("dare", pretrained, task_vectors, drop_rate="0.5")
    with pytest.raises(ValueError, match="seed=1.5 is not valid; use an integer >= 0"):
        merge("dare", pretrained, task_vectors, seed=1.5)


def test_task_arithmetic_adds_every_tasks_vector(pretrained, task_vectors):
    merged = merge("task_arithmetic", pretrained, task_vectors, coefficient=0.4)
    for k in pretrained:
        torch.testing.assert_close(merged[k], pretrained[k] + 0.4 * sum(tv[k] for tv in task_vectors))


def test_dare_sparsifies_each_task_with_its_own_seed_then_adds(pretrained, task_vectors):
    merged = merge("dare", pretrained, task_vectors, coefficient=0.3, drop_rate=0.5, seed=11)
    # the documented recipe: task t sparsified by drop_and_rescale with seed 11 + t, then task arithmetic
    drops = [dare(tv, 0.5, 11 + t) for t, tv in enumerate(task_vectors)]
    for k in pretrained:
        torch.testing.assert_close(merged[k], pretrained[k] + 0.3 * sum(d[k] for d in drops))
    masks = [d["w"] != 0 for d in drops]  # every task gets its own mask
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_streamed_drops_equal_drop_and_rescale_in_any_key_order(task_vectors):
    tv = task_vectors[0]
    whole = dare(tv, 0.5, 4)
    streamed = sparsify.StreamedDrops(tv, 0.5, 4)
    for k in [*reversed(list(tv.keys())), *tv.keys()]:  # an earlier key restarts the stream
        torch.testing.assert_close(streamed[k], whole[k], rtol=0, atol=0)


def test_ties_trims_an_entry_exactly_at_its_threshold():
    stacked = torch.tensor([[0.5, 0.6], [0.5, 0.6]])
    # the docstring: entries with |x| <= thr are trimmed, so 0.5 goes and 0.6 stays
    torch.testing.assert_close(ties_merge_tensor(stacked, torch.tensor([0.5, 0.5])), torch.tensor([0.0, 0.6]))


def test_the_table_and_the_text_flag_a_coefficient_chosen_at_a_grid_edge():
    from mergelab.evaluation import grid_edge_note, results_table

    acc = {"absolute_accuracy": 0.5, "normalized_accuracy": 0.6, "per_task_accuracy": {"a": 0.5}}
    grid = {0.0: 0.1, 0.5: 0.2, 1.0: 0.3}
    rows = {"zero_shot": acc, "ta": {**acc, "coefficient": 0.5, "at_grid_edge": False, "validation_sweep": grid},
            "tsv": {**acc, "coefficient": 1.0, "at_grid_edge": True, "validation_sweep": grid},
            "ties": {**acc, "coefficient": 0.0, "at_grid_edge": np.bool_(True), "validation_sweep": grid},
            "tsv_alpha_1": {**acc, "coefficient": 1.0}}
    table = results_table(rows)
    assert list(table.columns[:4]) == ["absolute_accuracy", "normalized_accuracy", "coefficient", "at_grid_edge"]
    assert table.loc["tsv", "at_grid_edge"] is True and table.loc["ta", "at_grid_edge"] is False
    assert np.isnan(table.loc["zero_shot", "coefficient"]) and table.loc["tsv_alpha_1", "at_grid_edge"] == ""
    note = grid_edge_note(rows, {"tsv": "TSV-M"})
    assert "top of its validation grid: TSV-M (1);" in note and "wider grid" in note
    assert "bottom of its validation grid: ties (0);" in note and "no merge beat the pretrained model" in note
    assert "ta (" not in note  # chosen inside its grid
    assert grid_edge_note({"ta": rows["ta"]}) == "Every coefficient was chosen inside its validation grid."
    # nothing chosen on a grid of two or more values: nothing to say
    averaging = {**acc, "coefficient": None, "at_grid_edge": False, "validation_sweep": {}}
    lone = {**acc, "coefficient": 0.3, "at_grid_edge": False, "validation_sweep": {0.3: 0.2}}
    assert grid_edge_note({"zero_shot": acc, "weight_averaging": averaging, "one_value": lone}) == ""
    assert "coefficient" not in results_table({"zero_shot": acc}).columns


def test_a_chapters_seed_reaches_the_methods_that_draw_at_random_only():
    """Chapter 00's seed used to leave DARE's masks at DARE's default seed whatever the chapter's; the options it
    passes now seed DARE and leave the deterministic methods without an option they do not have."""
    from mergelab.merging import seeded_options

    assert seeded_options(["weight_averaging", "task_arithmetic", "ties", "dare"], 4) == {"dare": {"seed": 4}}
    assert seeded_options(["task_arithmetic"], 4) == {}
