"""The TSV-M benchmark (``benchmarks/bench_tsv.py``, run by ``make bench``) on shapes small enough for a test."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # the speed and memory tools live outside the package

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMALL_SHAPES = {
    "positional_embedding": (50, 192),
    "transformer.resblocks.0.attn.in_proj_weight": (576, 192),
    "transformer.resblocks.0.attn.in_proj_bias": (576,),
    "transformer.resblocks.0.mlp.c_proj.weight": (192, 384),
    "transformer.resblocks.1.mlp.c_fc.weight": (384, 192),
    "proj": (192, 128),
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tsv", ROOT / "perf/bench_tsv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_tsv"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_tsv"]


def test_timing_takes_per_layer_medians_over_rounds_and_weights_block_layers(bench):
    tm = bench.Timing()
    for wall in (3.0, 1.0, 2.0):
        tm.add("transformer.resblocks.0.mlp.c_fc.weight", "mlp_c_fc", bench.block_multiplicity(
            "transformer.resblocks.0.mlp.c_fc.weight", blocks=2), wall, wall / 2)
    for wall in (0.5, 0.7, 0.1):
        tm.add("proj", "proj", bench.block_multiplicity("proj", blocks=2), wall, wall)
    assert tm.rounds == 3
    assert tm.wall_s == pytest.approx(2.0 + 0.5)
    assert tm.cpu_s == pytest.approx(1.0 + 0.5)
    assert tm.model_s == pytest.approx(2.0 * 6 + 0.5)  # a block layer stands for 12 / 2 layers
    assert tm.round_model_s(0) == pytest.approx(3.0 * 6 + 0.5)
    assert tm.round_model_s(2) == pytest.approx(2.0 * 6 + 0.1)
    assert tm.per_kind == pytest.approx({"mlp_c_fc": 2.0, "proj": 0.5})


def test_benchmark_runs_end_to_end_and_reports_ratios_and_differences(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "vit_b32_shapes", lambda: dict(SMALL_SHAPES))
    assert bench.main(["--tasks", "3", "--blocks", "2", "--repeat", "2", "--no-single-thread-reference"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nmethod "):out.index("\nwall s per layer kind")].splitlines()[2:]
    rows = {line[:34].strip(): [float(x) for x in line[34:].replace("|", " ").split()] for line in table}
    assert set(rows) == {"reference", "fast: gram float64 (default)", "fast: gram float32", "randomized, 1 thread"}
    # wall s, CPU s, x ref, x ref 1t | model s, x ref, x ref 1t | rel. diff, peak MiB
    assert rows["reference"][2] == rows["reference"][5] == 1.0 and rows["reference"][7] == 0.0
    assert all(row[0] > 0 and row[4] > row[0] for row in rows.values())  # block layers count 12 / 2 times
    assert rows["fast: gram float64 (default)"][7] < bench.TARGET_REL_DIFF
    rounds = re.search(r"whole-model estimate in each of the 2 rounds: ([\d.]+)x, ([\d.]+)x", out)
    assert rounds and all(float(x) > 0 for x in rounds.groups())
    e2e = re.search(r"end to end, tsv_merge on the whole model \(T = 3\): wall ([\d.]+) s \(median of 2 runs: "
                    r"([\d.]+), ([\d.]+) s\).*rel\. diff on the layers measured ([\d.e+-]+)", out)
    assert e2e is not None and float(e2e.group(4)) < bench.TARGET_REL_DIFF
    assert float(e2e.group(1)) == pytest.approx((float(e2e.group(2)) + float(e2e.group(3))) / 2, abs=0.06)
    verdict = re.search(r"default solver, T = 3: (met|NOT met) \(([\d.]+)x / ([\d.]+)x", out)
    assert verdict is not None
    # the verdict is the one the printed figures give (both speed-ups at target; the differences were checked above)
    speedups = [float(verdict.group(2)), float(verdict.group(3))]
    assert verdict.group(1) == ("met" if min(speedups) >= bench.TARGET_SPEEDUP else "NOT met")


def test_benchmark_refuses_bad_arguments(bench):
    for argv in (["--repeat", "0"], ["--blocks", "13"], ["--tasks", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
