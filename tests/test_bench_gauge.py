"""The machine gauge (``perf/bench_gauge.py``, run by ``make bench``) on a few images and steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gauge():
    spec = importlib.util.spec_from_file_location("bench_gauge", ROOT / "perf/bench_gauge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gauge_prints_and_writes_one_figure_per_round_and_leaves_threads_and_random_state_alone(gauge, tmp_path,
                                                                                                    capsys):
    import torch

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    out = tmp_path / "gauge.json"
    assert gauge.main(["--rounds", "2", "--images", "256", "--steps", "2", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    printed = capsys.readouterr().out
    assert "| evaluation, batch 128 | median" in printed and "| fine-tuning step, batch 64 | median" in printed
    figures = json.loads(out.read_text())
    assert len(figures["eval_images_per_s"]) == len(figures["train_step_ms"]) == 2
    assert all(v > 0 for v in figures["eval_images_per_s"] + figures["train_step_ms"])
    assert figures["torch_threads"] == 1 and figures["eval_batch"] == 128


def test_a_round_count_below_one_is_refused_by_name(gauge, capsys):
    with pytest.raises(SystemExit):
        gauge.main(["--steps", "0"])
    assert "--steps=0 is not valid" in capsys.readouterr().err
