"""What the benchmark-and-baselines notebook promises in its results JSON."""

from __future__ import annotations

import pytest

NAME = "00_benchmark_and_baselines"


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_results_have_every_method_with_absolute_normalized_and_per_task(run_notebook):
    results = run_notebook(NAME)
    methods = results["methods"]
    expected = {"zero_shot", "experts", "multitask", "weight_averaging", "task_arithmetic", "ties", "dare"}
    assert expected <= set(methods)
    for name, m in methods.items():
        assert set(m["per_task_accuracy"]) == set(results["tasks"]), name
        assert m["absolute_accuracy"] == pytest.approx(
            sum(m["per_task_accuracy"].values()) / len(results["tasks"]))
    assert methods["experts"]["normalized_accuracy"] == pytest.approx(1.0)
    # coefficients were chosen on validation from each method's grid, and the sweep is recorded
    ta = methods["task_arithmetic"]
    assert ta["coefficient"] in [float(k) for k in ta["validation_sweep"]]
    assert float(max(ta["validation_sweep"], key=ta["validation_sweep"].get)) == ta["coefficient"]
    assert methods["weight_averaging"]["coefficient"] is None
