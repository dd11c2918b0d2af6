"""The contract every registered merge method keeps, tested for each entry of ``MERGE_METHODS``.

Adding a method (one module under ``mergelab/merging/`` and one import line) gets these tests for
free; method-specific properties live in ``test_merging.py`` and ``test_tsv.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_state

from mergelab.merging import MERGE_METHODS, MergeMethod, get_merge, merge, merge_with_validation
from mergelab.merging.registry import signature_defaults
from mergelab.task_vectors import TaskVector

METHODS = sorted(MERGE_METHODS)
SHAPES = {"w": (6, 5), "b": (6,), "emb": (3, 5)}


def _inputs(n_tasks: int = 3, shapes: dict | None = None) -> tuple[dict, list[TaskVector]]:
    shapes = shapes or SHAPES
    pre = make_state(0, shapes)
    return pre, [TaskVector.from_states(pre, make_state(s, shapes)) for s in range(1, n_tasks + 1)]


def test_every_module_in_the_merging_package_that_defines_a_method_registers_it():
    assert {"weight_averaging", "task_arithmetic", "ties", "dare", "tsv_merge"} <= set(MERGE_METHODS)
    for name, method in MERGE_METHODS.items():
        assert method.fn.__module__.startswith("mergelab.merging."), name
        assert method.pretty_name and method.reference, f"{name}: give a pretty_name and a BibTeX reference"


@pytest.mark.parametrize("name", METHODS)
def test_defaults_are_the_signature_s_and_every_one_is_accepted(name):
    method = get_merge(name)
    assert dict(method.defaults) == signature_defaults(method.fn)
    if method.coefficient_grid:
        assert "coefficient" in method.defaults, f"{name} sweeps a coefficient its signature lacks"
    pre, tvs = _inputs()
    merged = merge(name, pre, tvs, **method.defaults)  # the defaults, passed explicitly, change nothing
    for k, v in method(pre, tvs).items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_refusals_name_the_bad_option_key_or_shape(name):
    pre, tvs = _inputs()
    with pytest.raises(ValueError, match=r"no option 'not_an_option'.*valid"):
        merge(name, pre, tvs, not_an_option=1)
    other_shape = TaskVector.from_states(make_state(0, {**SHAPES, "w": (6, 6)}), make_state(9, {**SHAPES, "w": (6, 6)}))
    with pytest.raises(ValueError, match=r"'w'.*shape \(6, 6\).*expected \(6, 5\)"):
        merge(name, pre, [tvs[0], other_shape])
    missing = TaskVector({"w": torch.zeros(6, 5), "b": torch.zeros(6)})
    with pytest.raises(ValueError, match="missing key 'emb'"):
        merge(name, pre, [tvs[0], missing])
    foreign = TaskVector({**tvs[0].vector, "extra": torch.zeros(2)})
    with pytest.raises(ValueError, match="'extra'"):
        merge(name, pre, [foreign])
    with pytest.raises(ValueError, match="empty"):
        merge(name, pre, [])


@pytest.mark.parametrize("name", [n for n in METHODS if MERGE_METHODS[n].identity is not None])
def test_one_task_under_the_identity_options_returns_the_expert(name):
    pre, tvs = _inputs(1)
    expert = tvs[0].apply_to(pre)
    merged = merge(name, pre, tvs, **get_merge(name).identity)
    for k in pre:
        torch.testing.assert_close(merged[k], expert[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_merging_is_deterministic_and_keeps_keys_shapes_and_dtypes(name):
    shapes = {"w": (6, 5), "b": (6,), "h": (6, 5), "g": (5, 6)}
    # a bf16 vector, an fp16 matrix and a bf16 matrix (TSV decomposes it) keep their dtypes
    half = {"b": torch.bfloat16, "h": torch.float16, "g": torch.bfloat16}
    pre = {k: v.to(half.get(k, v.dtype)) for k, v in make_state(0, shapes).items()}
    tvs = [TaskVector.from_states(pre, {k: (v + make_state(s, shapes)[k].to(v.dtype)) for k, v in pre.items()})
           for s in (1, 2)]
    a, b = merge(name, pre, tvs), merge(name, pre, tvs)
    assert list(a) == list(pre)
    for k in pre:
        assert a[k].shape == pre[k].shape and a[k].dtype == pre[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", [n for n in METHODS if MERGE_METHODS[n].coefficient_grid])
def test_a_validation_sweep_equals_merging_directly_at_each_coefficient(name, monkeypatch):
    pre, tvs = _inputs()
    method = get_merge(name)
    calls = []
    counted = MergeMethod(name, method.fn, method.coefficient_grid, method.defaults,
                          None if method.update is None else
                          (lambda *a, **o: calls.append(1) or method.update(*a, **o)))
    monkeypatch.setitem(MERGE_METHODS, name, counted)
    grid = (0.3, 0.7, 1.2)
    states = []
    # a score that peaks inside the grid (at 0.7), so that keeping an end of it would fail: these merges are
    # linear in the coefficient, and a monotone score would make the best an end whatever the code does
    target = float(method(pre, tvs, coefficient=0.7)["w"].sum())
    score = lambda st: -abs(float(st["w"].sum()) - target)  # noqa: E731
    result = merge_with_validation(name, pre, tvs, lambda st: states.append(st) or score(st), grid=grid, progress=False)
    if method.update is not None:
        assert len(calls) == 1, "a linear method computes its update once per sweep"
    assert len(states) == len(grid) and list(result.sweep) == [float(c) for c in grid]  # every coefficient scored
    for state, c in zip(states, grid):
        direct = method(pre, tvs, coefficient=c)
        for k in pre:
            torch.testing.assert_close(state[k], direct[k], rtol=0, atol=0)
    # the best score wins, and the state kept is the merge at that coefficient
    best = max(grid, key=lambda c: score(method(pre, tvs, coefficient=c)))
    assert best == 0.7 and result.coefficient == best and result.sweep[best] == max(result.sweep.values())
    for k in pre:
        torch.testing.assert_close(result.state[k], method(pre, tvs, coefficient=best)[k], rtol=0, atol=0)


_PEAK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)  # one thread: the allocator's reuse, and so the peak, does not depend on scheduling
from memory import PeakMemory
from conftest import make_state
from mergelab.merging import merge
from mergelab.task_vectors import TaskVector
shapes = {f"layer{i}.weight": (1024, 512) for i in range(12)}  # 12 layers of 2 MiB: 24 MiB a model
pre = make_state(0, shapes)
tvs = [TaskVector.from_states(pre, make_state(s, shapes)) for s in range(1, 5)]
with torch.no_grad(), PeakMemory("cpu") as mem:
    merged = merge(sys.argv[1], pre, tvs)
print(mem.extra_bytes / sum(v.numel() * v.element_size() for v in pre.values()))
"""


@pytest.mark.parametrize("name", [n for n in METHODS if MERGE_METHODS[n].streams])
def test_streaming_methods_hold_one_layer_at_a_time(name):
    """Besides its inputs a streaming merge holds the merged model and the layers in flight: with 4 tasks
    its extra peak stays under 3 models, where materializing the 4 updates first needs at least 5.
    Measured in a fresh process, so that memory other tests left to the allocator does not count."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "perf"), str(root / "tests"),
                                                         os.environ.get("PYTHONPATH", "")]),
           # a fixed mmap threshold: freed layers go back to the system at once, so the peak is the merge's
           # live memory, not glibc's dynamic threshold keeping freed blocks (TIES read 2.5 to 3.7 models)
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, name], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    models = float(run.stdout.split()[-1])
    assert models < 3.0, f"{name}: extra peak {models:.2f} models"


def test_methods_that_do_not_stream_say_why_in_their_docstring():
    for name, method in MERGE_METHODS.items():
        if not method.streams:
            assert "not streaming" in (method.fn.__doc__ or ""), name


@pytest.mark.parametrize("name", [n for n in METHODS if MERGE_METHODS[n].coefficient_grid])
def test_every_registered_grid_includes_zero_the_pretrained_model(name):
    assert 0.0 in get_merge(name).coefficient_grid


# --- the contract as one function: what a student's rule (exercise 0.1) is checked with ---------------

from mergelab.merging import check_merge_rule, validate, assemble  # noqa: E402


@pytest.mark.parametrize("name", METHODS)
def test_check_merge_rule_accepts_every_registered_method(name):
    check_merge_rule(get_merge(name), identity=get_merge(name).identity)


def _sum_rule(pretrained, task_vectors, coefficient=1.0):
    keys = validate(pretrained, task_vectors)
    return assemble(pretrained, keys, lambda k: coefficient * sum(tv[k] for tv in task_vectors))


def _in_place(pretrained, task_vectors, coefficient=1.0):
    for tv in task_vectors:
        tv.vector["w"].mul_(1.0)  # touches nothing numerically...
    task_vectors[0].vector["b"].add_(1.0)  # ...but this edits an input
    return _sum_rule(pretrained, task_vectors, coefficient)


_calls = []


def _random(pretrained, task_vectors, coefficient=1.0):
    _calls.append(1)
    merged = _sum_rule(pretrained, task_vectors, coefficient)
    return {k: v + 1e-3 * len(_calls) * torch.ones_like(v) for k, v in merged.items()}


@pytest.mark.parametrize("rule, options, message", [
    (lambda pre, tvs: {k: v for k, v in list(_sum_rule(pre, tvs).items())[:-1]}, {}, r"returns the keys .* expected"),
    (lambda pre, tvs: {k: v.double() for k, v in _sum_rule(pre, tvs).items()}, {}, r"'w' has shape .* dtype torch.float64"),
    (_in_place, {}, r"changed task vector 0's 'b' in place"),
    (_random, {}, r"two calls on the same inputs differ"),
    (lambda pre, tvs: {k: v + 1.0 for k, v in _sum_rule(pre, tvs).items()}, {}, r"all zero must give back the pretrained"),
    (_sum_rule, {"coefficient": 0.5}, None),  # fine without identity
    (lambda pre, tvs, coefficient=1.0: _sum_rule(pre, tvs, coefficient / 2), {}, None),
    (lambda pre, tvs: {k: v.clone() for k, v in pre.items()} if tvs else {}, {}, r"returns the keys|ValueError"),
])
def test_check_merge_rule_rejects_a_broken_rule_saying_which_promise_it_broke(rule, options, message):
    if message is None:  # a correct rule: accepted; under a wrong identity claim, rejected
        check_merge_rule(rule, **options)
        if not options:
            with pytest.raises(AssertionError, match=r"one task vector under the options \{'coefficient': 1.0\}"):
                check_merge_rule(rule, identity={"coefficient": 1.0})
        return
    with pytest.raises(AssertionError, match=message):
        check_merge_rule(rule, **options)


def test_check_merge_rule_wants_a_value_error_for_bad_inputs():
    def no_validation(pretrained, task_vectors):
        return {k: v + sum((tv[k] for tv in task_vectors), torch.zeros_like(v)) for k, v in pretrained.items()}

    with pytest.raises(AssertionError, match=r"given an empty list of task vectors it returned a merge; expected a ValueError"):
        check_merge_rule(no_validation)
