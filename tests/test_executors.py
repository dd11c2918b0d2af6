"""Executors: the smoke stability sweep on a local Ray cluster equals the local one and resumes from the
shared cache; a failed run is reported with its configuration while the others finish; a killed sweep
restarts with only its missing runs; without Ray, `executor: ray` says how to install it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import mergelab
from mergelab.executors import LocalExecutor, RayExecutor, Resources, RunsFailed, make_executor
from mergelab.params import profile_params
from mergelab.training import FinetuneConfig
from mergelab.training.sweep import checkpoint, is_cached, sweep
from mergelab.utils import load_safetensors, torch_threads

SMOKE = profile_params("smoke", "01_stability_bound")
# the smoke model, data and heads with a 2-step pretraining: these tests compare where runs execute, not
# what the encoder knows (the smoke encoder's 800 steps cost ~20 s per test process)
BENCH = {"tasks": ["colours", "position"], **{k: SMOKE[k] for k in ("model", "head_shots")},
         "data": {**SMOKE["data"], "n_pretext": 64}, "pretrain": {**SMOKE["pretrain"], "num_steps": 2, "warmup_steps": 1}}
CENTRE = FinetuneConfig(**SMOKE["finetune"], **SMOKE["centre"], seed=0)  # the smoke grid's centre recipe


@pytest.fixture(scope="module")
def bench(module_data_dir):
    """The smoke benchmark (two of its tasks) in a private data cache for the module (one build)."""
    b = mergelab.load_benchmark("tiny", device="cpu", progress=False, **BENCH)
    b.pretrained_state()
    return b


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module, shut down at its end."""
    import ray

    from mergelab.executors import start_local_cluster

    start_local_cluster(ray, num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _files(table) -> dict[str, dict[str, torch.Tensor]]:
    return {p: load_safetensors(p) for p in table["path"]}


def _forget(table) -> None:
    for p in table["path"]:
        os.remove(p)
        os.remove(p.replace(".safetensors", ".json"))


def test_ray_sweep_equals_the_local_one_and_a_second_run_trains_nothing(bench, ray_cluster):
    configs = [CENTRE, replace(CENTRE, lr=0.03)]
    local = sweep(bench, configs, ["colours"], steps=[2, 4], probe_size=2, progress=False)
    assert local.attrs["runs_trained"] == 2 and local["trained"].all()
    here = _files(local)
    logs = {p: json.loads(Path(p).with_suffix(".json").read_text()) for p in local["path"]}
    _forget(local)

    on_ray = sweep(bench, configs, ["colours"], steps=[2, 4], probe_size=2, progress=False,
                   executor=RayExecutor({"cpus": 1}))
    assert on_ray.attrs["runs_trained"] == 2 and list(on_ray["path"]) == list(local["path"])
    for p, tensors in _files(on_ray).items():  # the same checkpoint, bit for bit
        assert tensors.keys() == here[p].keys() and all(torch.equal(tensors[k], here[p][k]) for k in tensors), p
        log = json.loads(Path(p).with_suffix(".json").read_text())
        assert log["loss"] == logs[p]["loss"] and log["gradient_norm_probe"] == logs[p]["gradient_norm_probe"]

    again = sweep(bench, configs, ["colours"], steps=[2, 4], probe_size=2, progress=False,
                  executor=RayExecutor({"cpus": 1}))
    assert again.attrs["runs_trained"] == 0 and not again["trained"].any()


def test_a_run_that_raises_is_reported_with_its_configuration_and_the_others_are_cached(bench, ray_cluster):
    good, bad = replace(CENTRE, seed=21), replace(CENTRE, seed=21, momentum=-0.5)  # torch's SGD refuses it
    with pytest.raises(RunsFailed, match=r"1 of 2 runs of the sweep failed") as err:
        sweep(bench, [good, bad], ["colours"], steps=[2], probe_size=0, progress=False,
              executor=RayExecutor({"cpus": 1}))
    [failure] = err.value.failures
    assert failure.config["task"] == "colours" and failure.config["momentum"] == -0.5
    assert "momentum=-0.5" in str(err.value) and "Invalid momentum value" in failure.error
    assert "Traceback" in failure.traceback and "execute_run" in failure.traceback
    assert is_cached(bench, "colours", replace(good, num_steps=2))
    assert not checkpoint(bench, "colours", replace(bad, num_steps=2)).path.exists()
    # the same report from the local executor, here in this process
    with pytest.raises(RunsFailed, match=r"task='colours'.*momentum=-0\.5.*Invalid momentum value"):
        sweep(bench, [good, bad], ["colours"], steps=[2], probe_size=0, progress=False)


KILLED_SWEEP = """
import json, sys
import mergelab
from mergelab.training import FinetuneConfig
from mergelab.training.sweep import sweep
bench_kwargs, configs = json.loads(sys.argv[1])
bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **bench_kwargs)
sweep(bench, [FinetuneConfig(**c) for c in configs], ["colours"], probe_size=0, progress=False)
"""


def test_a_killed_sweep_restarts_with_only_its_missing_runs(bench, ray_cluster):
    from dataclasses import asdict

    configs = [replace(CENTRE, seed=31 + i, num_steps=30) for i in range(3)]
    sidecars = [checkpoint(bench, "colours", c).sidecar for c in configs]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP, json.dumps([BENCH, [asdict(c) for c in configs]])],
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(s.is_file() for s in sidecars):  # the first run's checkpoint has landed
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    done = sum(is_cached(bench, "colours", c) for c in configs)
    assert 1 <= done < len(configs)
    resumed = sweep(bench, configs, ["colours"], probe_size=0, progress=False, executor=RayExecutor({"cpus": 1}))
    assert resumed.attrs["runs_trained"] == len(configs) - done
    assert int(resumed["trained"].sum()) == len(configs) - done
    assert all(is_cached(bench, "colours", c) for c in configs)


def test_fitness_of_a_population_on_ray_equals_the_fitness_here(bench, ray_cluster):
    from mergelab.analysis.responses import ResponseEvaluator
    from mergelab.experiments.ch05_merge3 import Fitness
    from mergelab.task_vectors import TaskVector

    pre = bench.pretrained_state()
    g = torch.Generator().manual_seed(0)
    tvs = [TaskVector({k: 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()
                       if v.is_floating_point()}) for _ in range(2)]
    evaluator = ResponseEvaluator(bench, ["colours", "position"], split="val", cache=False)
    X = np.array([[0.0, 0.0], [0.5, 0.2], [1.0, 1.0]])
    here = Fitness(evaluator, pre, tvs)(X)
    there = Fitness(evaluator, pre, tvs, executor=RayExecutor({"cpus": 1}))(X)
    assert here.shape == (3,) and np.array_equal(here, there)


def test_epoch_trajectories_on_ray_equal_the_ones_trained_here(bench, ray_cluster):
    from mergelab.training.trajectories import epoch_trajectories, is_trajectory_cached, trajectory_config

    runs = [("colours", trajectory_config("sgd", 0.01, 32, 0.5, seed=41)),
            ("colours", trajectory_config("adamw", 0.001, 32, 0.5, seed=41))]
    with torch_threads(1):  # as the Ray job ({"cpus": 1}): bitwise equality needs the same reduction order
        here = epoch_trajectories(bench, runs, 2, progress=False)
    states = [[t.state(e) for e in (1, 2)] for t in here]
    for t in here:
        os.remove(t.states.path)
        os.remove(t.states.path.with_suffix(".json"))
    assert not any(is_trajectory_cached(bench, task, cfg, 2) for task, cfg in runs)
    there = epoch_trajectories(bench, runs, 2, executor=RayExecutor({"cpus": 1}), progress=False)
    assert all(is_trajectory_cached(bench, task, cfg, 2) for task, cfg in runs)
    for i, (t, mine) in enumerate(zip(there, states)):
        assert t.loss == here[i].loss
        for e, s in zip((1, 2), mine):
            assert all(torch.equal(t.state(e)[k], s[k]) for k in s)


def test_without_ray_executor_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"executor='ray' needs Ray.*pip install -e '\.\[ray\]'"):
        make_executor("ray")
    assert isinstance(make_executor("local", workers=2), LocalExecutor)  # local needs nothing more


def test_bad_executor_parameters_are_named():
    with pytest.raises(ValueError, match=r"executor='dask' is not valid; use one of local, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match=r"resources.gpus=-1"):
        make_executor("local", resources={"cpus": 1, "gpus": -1})
    with pytest.raises(ValueError, match=r"resources=.*keys cpus and gpus"):
        Resources.parse({"cpu": 1})
    with pytest.raises(ValueError, match=r"workers=0"):
        make_executor("local", workers=0)


def test_make_report_executor_overrides_the_chapters_that_sweep(tmp_path, monkeypatch):
    from mergelab.report import runner

    seen: dict[str, dict] = {}
    monkeypatch.setattr(runner, "execute_notebook", lambda nb, parameters, reports: seen.update({nb.stem: parameters}) or 0.0)
    names = ["00_benchmark_and_baselines", "01_stability_bound", "05_merge3_irt"]
    runner.run_notebooks(runner.discover_notebooks(None, names), "smoke", tmp_path, force=True, executor="ray")
    assert seen["01_stability_bound"]["executor"] == "ray" and seen["05_merge3_irt"]["executor"] == "ray"
    assert "executor" not in seen["00_benchmark_and_baselines"]  # a chapter without sweeps gets nothing
    dry = subprocess.run(["make", "-n", "report", "EXECUTOR=ray", f"VENV={Path(sys.executable).parents[1]}"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert "--executor ray" in dry.stdout, dry.stdout + dry.stderr


def _pid(context, item):
    """A job that says which process ran it (and the context it got)."""
    return os.getpid(), context


def test_local_worker_processes_are_kept_between_batches_of_one_context():
    from functools import partial

    from mergelab.executors import WorkerContext

    first, second = WorkerContext(partial(str, "a"), key="ctx-a"), WorkerContext(partial(str, "b"), key="ctx-b")
    with LocalExecutor(workers=2) as ex:
        one = ex.map(_pid, range(4), first, progress=False).results
        again = ex.map(_pid, range(4), first, progress=False).results  # a GA's next generation
        assert {c for _, c in one} == {c for _, c in again} == {"a"}
        assert {p for p, _ in again} <= {p for p, _ in one} and os.getpid() not in {p for p, _ in one}
        other = ex.map(_pid, [0], second, progress=False).results  # another context: a new process
        assert {c for _, c in other} == {"b"} and not {p for p, _ in other} & {p for p, _ in one}
    for pid in {p for p, _ in one + other}:  # leaving the block stopped (and reaped) every worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_benchmark_on_a_gpu_is_not_rebuilt_on_the_cpu_by_workers():
    """Local worker processes and Ray jobs without GPUs rebuild the benchmark on the CPU: a clip benchmark on
    a GPU would train there slowly and under other cache keys (precision auto), so its jobs fail naming the
    settings to change; a benchmark on the CPU is rebuilt as before."""
    import torch

    from mergelab.executors import benchmark_context

    class Bench:
        def __init__(self, config, device="cpu", progress=True):
            self.config, self.device = config, torch.device(device)

    on_gpu = Bench({"tasks": ["a"]})
    on_gpu.device = torch.device("cuda", 0)  # only the attribute: no GPU is needed
    context = benchmark_context(on_gpu, "cpu")
    assert context.get() is on_gpu  # here (workers: 1) the benchmark itself
    with pytest.raises(ValueError, match=r"runs on cuda:0 .*workers: 1.*resources.gpus >= 1"):
        context.build()
    rebuilt = benchmark_context(Bench({"tasks": ["a"]}), "cpu").build()
    assert isinstance(rebuilt, Bench) and rebuilt.device.type == "cpu" and rebuilt.config == {"tasks": ["a"]}
