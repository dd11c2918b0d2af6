"""Task vectors as gradients: full-dataset gradients, HVPs, per-layer geometry, epoch trajectories."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mergelab
from mergelab.analysis.alignment import alignment_table, gd_taylor_terms, one_step_exactness, task_hessian_vector_product, task_loss_and_gradient, taylor_gap, taylor_table, trajectory_alignment
from mergelab.autodiff import HVP_METHODS, dataset_gradient, hessian_vector_product, loss_and_gradient
from mergelab.experiments.ch02_gradients import one_step_identity
from mergelab.layers import layer_groups
from mergelab.task_vectors import TaskVector, cosine, group_norms, layer_cosines, layer_norm_ratios, norm, projection_share
from mergelab.training import finetune
from mergelab.training.trajectories import epoch_config, epoch_trajectory, gradient_descent_config, multitask_epoch_trajectory, steps_per_epoch, trajectory_config

SMALL = dict(tasks=["colours", "size"], data={"n_train": 64, "n_val": 32, "n_test": 32, "n_pretext": 64},
             model={"width": 32, "layers": 2, "heads": 2}, pretrain={"num_steps": 2, "batch_size": 16, "warmup_steps": 1},
             head_shots=2)


# ----------------------------------------------------------------------------- a linear model
class FrozenLinearHead(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T


def linear_problem(n: int = 24, d_in: int = 6, d: int = 4, classes: int = 3, seed: int = 0,
                   dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    encoder = nn.Linear(d_in, d).to(dtype)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(d, d_in, generator=g, dtype=dtype))
        encoder.bias.copy_(torch.randn(d, generator=g, dtype=dtype))
    head = FrozenLinearHead(torch.randn(classes, d, generator=g, dtype=dtype))
    X = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return encoder, head, X, y


def analytic_gradient(encoder: nn.Linear, head: FrozenLinearHead, X: torch.Tensor, y: torch.Tensor):
    """Softmax regression through a fixed head: dL/dW = ((p - Y) H)^T X / N, dL/db = mean((p - Y) H)."""
    logits = head(encoder(X))
    delta = (torch.softmax(logits, -1) - F.one_hot(y, logits.shape[1]).to(X.dtype)) @ head.weight / len(y)
    return {"weight": delta.T @ X, "bias": delta.sum(0)}


def test_gradient_over_dataset_matches_the_analytic_gradient():
    encoder, head, X, y = linear_problem()
    result = loss_and_gradient(encoder, head, X, y, batch_size=5)
    expected = analytic_gradient(encoder, head, X, y)
    for k, v in expected.items():
        torch.testing.assert_close(result.gradient[k], v, rtol=1e-12, atol=1e-14)
    assert result.loss == pytest.approx(float(F.cross_entropy(head(encoder(X)), y).detach()), rel=1e-12)
    assert result.n_examples == len(y)


def test_one_full_batch_step_on_a_linear_model_is_minus_lr_times_the_gradient():
    encoder, head, X, y = linear_problem()
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    grad = dataset_gradient(encoder, head, X, y, batch_size=7)
    lr = 0.3
    finetune(encoder, {"task": (X, y)}, {"task": head}, gradient_descent_config(lr, batch_size=len(y)),
             progress=False)
    report = one_step_exactness(theta0, encoder.state_dict(), grad, lr)
    assert report["relative_error"] < 1e-13
    assert report["max_abs_error"] < 1e-14
    assert report["machine_epsilon"] == torch.finfo(torch.float64).eps
    # and not by accident: a second step, or another learning rate, breaks it
    assert one_step_exactness(theta0, encoder.state_dict(), grad, 1.1 * lr)["relative_error"] > 0.05


def test_dataset_gradient_is_the_batch_size_weighted_mean_of_batch_gradients():
    encoder, head, X, y = linear_problem(n=23)
    full = dataset_gradient(encoder, head, X, y, batch_size=23)
    chunks = [(0, 8), (8, 16), (16, 23)]  # uneven last batch
    weighted = sum((hi - lo) / len(y) * dataset_gradient(encoder, head, X[lo:hi], y[lo:hi], batch_size=100)
                   for lo, hi in chunks)
    for k in full:
        torch.testing.assert_close(full[k], weighted[k], rtol=1e-12, atol=1e-14)
    # the plain (unweighted) mean of batch gradients differs when batches are uneven
    plain = sum(dataset_gradient(encoder, head, X[lo:hi], y[lo:hi]) for lo, hi in chunks) / 3
    assert (plain - full).norm() > 1e-6 * full.norm()
    # and the batch size used to sum is a memory knob, not part of the result
    for bs in (1, 4, 22):
        other = dataset_gradient(encoder, head, X, y, batch_size=bs)
        assert (other - full).norm() <= 1e-12 * full.norm()


def test_gradient_leaves_the_head_frozen_and_the_encoder_weights_unchanged():
    encoder, _, X, y = linear_problem()
    head = nn.Linear(4, 3, bias=False).double()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    loss_and_gradient(encoder, head, X, y)
    assert head.weight.grad is None and head.weight.requires_grad
    assert all(p.grad is None for p in encoder.parameters())
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k])


def test_hessian_vector_product_matches_the_explicit_hessian_for_both_methods():
    encoder, head, X, y = linear_problem(n=11)
    names = ["weight", "bias"]
    shapes = [encoder.weight.shape, encoder.bias.shape]
    sizes = [math.prod(s) for s in shapes]

    def loss_flat(flat: torch.Tensor) -> torch.Tensor:
        w, b = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]
        return F.cross_entropy(head(X @ w.T + b), y)

    flat0 = torch.cat([encoder.weight.detach().reshape(-1), encoder.bias.detach()])
    H = torch.autograd.functional.hessian(loss_flat, flat0)
    v_flat = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(3), dtype=flat0.dtype)
    v = TaskVector({n: t.reshape(s) for n, t, s in zip(names, v_flat.split(sizes), shapes)})
    expected = H @ v_flat
    for method in HVP_METHODS:
        hv = hessian_vector_product(encoder, head, X, y, v, batch_size=4, method=method)
        torch.testing.assert_close(hv.flatten(names), expected, rtol=1e-10, atol=1e-12)


def test_hessian_vector_product_on_the_vit_matches_finite_differences(data_dir):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    g = task_loss_and_gradient(bench, "colours", pre, batch_size=40).gradient
    v = g / g.norm()
    hv = task_hessian_vector_product(bench, "colours", pre, v, batch_size=40)
    hv2 = task_hessian_vector_product(bench, "colours", pre, v, batch_size=64, method="forward_over_reverse")
    assert (hv - hv2).norm() <= 1e-4 * hv.norm()
    eps = 1e-2
    plus = task_loss_and_gradient(bench, "colours", v.apply_to(pre, eps)).gradient
    minus = task_loss_and_gradient(bench, "colours", v.apply_to(pre, -eps)).gradient
    fd = (plus - minus) / (2 * eps)
    assert cosine(fd, hv) > 0.99
    assert fd.norm() == pytest.approx(hv.norm(), rel=0.05)


def test_second_order_term_explains_the_gap_and_leaves_a_third_order_rest():
    encoder, head, X, y = linear_problem(n=30)
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    g = dataset_gradient(encoder, head, X, y)
    hg = hessian_vector_product(encoder, head, X, y, g)
    rests, gaps = [], []
    for lr in (1e-2, 1e-3):
        enc = nn.Linear(6, 4).double()
        enc.load_state_dict(theta0)
        cfg = gradient_descent_config(lr, batch_size=len(y), num_steps=5)
        finetune(enc, {"t": (X, y)}, {"t": head}, cfg, progress=False)
        tau = TaskVector({k: enc.state_dict()[k] - theta0[k] for k in theta0})  # float64
        first, second = gd_taylor_terms(g, hg, lr, 5)
        gaps.append((tau - first).norm())
        rests.append((tau - first - second).norm())
    assert gaps[0] / gaps[1] == pytest.approx(100, rel=0.1)  # gap ~ lr^2 (relative to lr k g: ~ lr)
    assert rests[0] / rests[1] == pytest.approx(1000, rel=0.2)  # rest ~ lr^3
    with pytest.raises(ValueError, match="num_steps"):
        gd_taylor_terms(g, hg, 0.1, 0)


# ----------------------------------------------------------------------------- geometry
def test_cosine_and_norm_utilities_on_known_vectors():
    a = {"w": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([0.0])}
    c = {"w": torch.tensor([[0.0, 2.0]]), "b": torch.tensor([3.0])}
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, c) == pytest.approx(0.0)
    assert cosine(a, {k: -2 * v for k, v in a.items()}) == pytest.approx(-1.0)
    assert cosine(a, {k: torch.zeros_like(v) for k, v in a.items()}) == 0.0
    assert norm(c) == pytest.approx(math.sqrt(13))
    per = layer_cosines(a, c, {"weights": ["w"], "biases": ["b"]})
    assert per == {"weights": pytest.approx(0.0), "biases": 0.0, "total": pytest.approx(0.0)}
    assert group_norms(c, "parameter") == {"w": pytest.approx(2.0), "b": pytest.approx(3.0),
                                             "total": pytest.approx(math.sqrt(13))}
    ratios = layer_norm_ratios(c, b, "parameter")
    assert ratios["w"] == pytest.approx(2 / math.sqrt(2)) and math.isnan(ratios["b"])
    # TaskVectors work the same as state dicts
    assert cosine(TaskVector(a), TaskVector(b)) == pytest.approx(1 / math.sqrt(2))


def test_projection_shares_of_parts_add_up_to_one():
    g = torch.Generator().manual_seed(0)
    part = TaskVector({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)})
    rest = TaskVector({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)})
    whole = part + rest
    assert projection_share(part, whole) + projection_share(rest, whole) == pytest.approx(1.0)
    assert projection_share(whole, whole) == pytest.approx(1.0)
    assert projection_share(part, 2 * part) == pytest.approx(0.5)


def test_layer_groups_follow_the_vit_blocks_in_model_order():
    from mergelab.models import TinyViTConfig, build_tiny_encoder

    keys = list(build_tiny_encoder(TinyViTConfig(width=32, layers=2, heads=2)).state_dict())
    groups = layer_groups(keys)
    assert list(groups) == ["embedding", "block0.attn", "block0.mlp", "block0.norm", "block1.attn", "block1.mlp",
                            "block1.norm", "output"]
    assert sorted(k for ks in groups.values() for k in ks) == sorted(keys)
    assert groups["output"] == [k for k in keys if k in ("proj", "ln_post.weight", "ln_post.bias")]  # in model order
    assert layer_groups(keys, "all") == {"total": keys}
    with pytest.raises(ValueError, match="by='layers'"):
        layer_groups(keys, "layers")


def test_mismatched_vectors_and_bad_arguments_are_rejected_with_the_parameter_named():
    with pytest.raises(ValueError, match="missing key 'b'"):
        cosine({"w": torch.ones(2), "b": torch.ones(1)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="batch_size=0"):
        steps_per_epoch(10, 0)
    with pytest.raises(ValueError, match="epochs=0"):
        epoch_config(mergelab.FinetuneConfig(), 10, 0)
    encoder, head, X, y = linear_problem()
    with pytest.raises(ValueError, match="method='hessian'"):
        hessian_vector_product(encoder, head, X, y, {"weight": encoder.weight, "bias": encoder.bias},
                                 method="hessian")
    with pytest.raises(ValueError, match="no entry for parameter 'bias'"):
        hessian_vector_product(encoder, head, X, y, {"weight": encoder.weight})
    with pytest.raises(ValueError, match="X has 24 rows and y has 3"):
        loss_and_gradient(encoder, head, X, y[:3])


def test_epochs_follow_the_data_stream():
    assert steps_per_epoch(500, 64) == 7  # the remainder of each shuffled pass is dropped
    assert steps_per_epoch(500, 10**9) == 1  # full batch
    assert epoch_config(mergelab.FinetuneConfig(batch_size=64, warmup_steps=0), 500, 3).num_steps == 21


# ----------------------------------------------------------------------------- trajectories on a benchmark
def test_epoch_trajectory_snapshots_equal_shorter_runs_and_are_cached(data_dir, monkeypatch):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    cfg = trajectory_config("sgd", 1e-3, batch_size=16, data_fraction=0.5)
    traj = epoch_trajectory(bench, "size", cfg, 3)
    assert (traj.n_train, traj.steps_per_epoch, traj.config.num_steps) == (32, 2, 6)
    assert len(traj.loss) == 6 and traj.seconds_per_step > 0
    files = sorted(p.suffix for p in (data_dir / "trajectories").iterdir() if p.is_file())
    assert files == [".json", ".safetensors"]
    short = epoch_trajectory(bench, "size", cfg, 2)
    for k in pre:
        torch.testing.assert_close(short.state(2)[k], traj.state(2)[k], rtol=0, atol=0)
    assert traj.task_vector(pre, 1).norm() > 0
    with pytest.raises(ValueError, match="epoch=4"):
        traj.state(4)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached trajectory must not train again")

    again = epoch_trajectory(mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL), "size", cfg, 3,
                               train=no_training)
    for e in (1, 2, 3):
        for k in pre:
            assert torch.equal(again.state(e)[k], traj.state(e)[k])
    assert again.loss == traj.loss


def test_a_trajectory_with_a_frozen_stem_keeps_it_at_every_epoch_and_is_cached_apart(data_dir):
    """Chapter 02 merges early-epoch experts that hold what the tiny recipe holds (``conv1``): every snapshot of an
    expert's and of the multi-task run's trajectory keeps the stem's bits while the rest moves, and the run is not
    the whole-model run of the same settings (its own cache entry, ``frozen`` in its log)."""
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    whole = trajectory_config("adamw", 1e-3, batch_size=16, data_fraction=0.5)
    stem = trajectory_config("adamw", 1e-3, batch_size=16, data_fraction=0.5, frozen=["conv1"])
    assert stem.frozen == ("conv1",) and whole.frozen == ()
    runs = [epoch_trajectory(bench, "size", stem, 2), multitask_epoch_trajectory(bench, ["colours", "size"], stem, 2)]
    for traj in runs:
        for e in (1, 2):
            assert torch.equal(traj.state(e)["conv1.weight"], pre["conv1.weight"]), (traj.task, e)
            assert not torch.equal(traj.state(e)["transformer.resblocks.0.mlp.c_fc.weight"],
                                   pre["transformer.resblocks.0.mlp.c_fc.weight"]), (traj.task, e)
    free = epoch_trajectory(bench, "size", whole, 2)
    assert not torch.equal(free.state(1)["conv1.weight"], pre["conv1.weight"])
    logs = sorted(json.loads(p.read_text())["finetune"].get("frozen", []) == ["conv1"]
                  for p in (data_dir / "trajectories").glob("trajectory-*.json"))
    assert logs == [False, True]  # two cache entries for "size": the whole-model run's and the frozen run's


def test_full_batch_step_on_the_vit_subset_is_minus_lr_times_the_task_gradient(data_dir):
    """The gradient sees exactly the rows fine-tuning trains on (data_fraction < 1)."""
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    cfg = gradient_descent_config(0.01, batch_size=10**6, data_fraction=0.5, seed=3)
    traj = epoch_trajectory(bench, "colours", cfg, 1)
    assert traj.steps_per_epoch == 1 and traj.n_train == 32
    grad = task_loss_and_gradient(bench, "colours", pre, cfg, batch_size=10).gradient
    report = one_step_exactness(pre, traj.state(1), grad, 0.01)
    assert report["relative_error"] < 1e-4
    # the whole split is another gradient: the identity fails
    whole = task_loss_and_gradient(bench, "colours", pre).gradient
    assert one_step_exactness(pre, traj.state(1), whole, 0.01)["relative_error"] > 1e-2


def test_one_step_identity_in_float64_and_task_arithmetic_is_the_multitask_step(data_dir):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    res = one_step_identity(bench, ["colours", "size"], 0.05, data_fraction=0.5, dtype="float64", batch_size=7)
    assert res["n_train"] == {"colours": 32, "size": 32}
    for r in res["per_task"].values():
        assert r["relative_error"] < 1e-12 and r["machine_epsilon"] < 1e-15
    assert res["task_arithmetic"]["relative_error"] < 1e-12
    assert res["gradient_step"]["relative_error"] < 1e-12
    with pytest.raises(ValueError, match="dtype='float16'"):
        one_step_identity(bench, ["colours"], 0.05, dtype="float16")


def test_alignment_rows_for_small_sgd_steps_point_along_the_gradient(data_dir):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    cfg = trajectory_config("sgd", 1e-5, batch_size=16)  # eta k lambda << 1: first order, above float32 rounding
    traj = epoch_trajectory(bench, "colours", cfg, 2)
    grad = task_loss_and_gradient(bench, "colours", pre, cfg).gradient
    rows = trajectory_alignment(pre, traj, grad)
    total = {r["epoch"]: r for r in rows if r["group"] == "total"}
    # 64 examples in 4 batches of 16: an epoch's batch gradients at theta_0 sum to 4 * grad
    assert total[1]["cosine"] > 0.999 and total[1]["norm_ratio"] == pytest.approx(1.0, abs=0.01)
    assert total[1]["first_epoch_share"] == pytest.approx(1.0)
    assert total[2]["first_epoch_share"] == pytest.approx(0.5, abs=0.01)
    assert {r["group"] for r in rows} >= {"embedding", "block0.attn", "output", "total"}
    hg = task_hessian_vector_product(bench, "colours", pre, grad, cfg)
    gap = taylor_gap(pre, traj, grad, hg)
    assert [r["steps"] for r in gap] == [4, 8]
    # the grid tables are these rows, one trajectory after another, each with its own task's gradient
    grid = {("sgd", 1e-5, "colours"): traj, ("sgd", 1e-5, "size"): epoch_trajectory(bench, "size", cfg, 2)}
    grad_size = task_loss_and_gradient(bench, "size", pre, cfg).gradient
    table = alignment_table(pre, grid, {"colours": grad, "size": grad_size})
    expected = rows + trajectory_alignment(pre, grid[("sgd", 1e-5, "size")], grad_size)
    pd.testing.assert_frame_equal(table, pd.DataFrame(expected))
    taylor = taylor_table(pre, {("sgd", 1e-5, "colours"): traj}, {"colours": grad}, {"colours": hg})
    pd.testing.assert_frame_equal(taylor, pd.DataFrame(gap))  # NaN (gap_cosine at k = 1) compares equal here


def test_a_corrupt_cached_trajectory_is_reported_and_trained_again(data_dir, capsys):
    """A trajectory's epochs are read lazily, past the cache's check on every load: the file is checked against
    its sidecar's SHA-256 when the trajectory is opened, and one that does not match is trained again."""
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    cfg = trajectory_config("sgd", 1e-3, batch_size=16, data_fraction=0.5)
    good = epoch_trajectory(bench, "size", cfg, 2)
    first = {k: v.clone() for k, v in good.state(2).items()}
    path = good.states.path
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes([0x7f] * 8)  # same size, other bytes: the last tensor's values
    path.write_bytes(bytes(raw))
    again = epoch_trajectory(bench, "size", cfg, 2)
    assert capsys.readouterr().out.count("is corrupt") == 1  # said once
    assert all(torch.equal(again.state(2)[k], v) for k, v in first.items())  # retrained, bit for bit
    # a sidecar written before SHA-256s were recorded is not checked (as Artifact.load), not taken for corrupt
    import json

    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    del meta["sha256"]
    sidecar.write_text(json.dumps(meta))

    def no_training(*args, **kwargs):
        raise AssertionError("a trajectory whose sidecar records no SHA-256 must be read, not trained again")

    old = epoch_trajectory(bench, "size", cfg, 2, train=no_training)
    assert all(torch.equal(old.state(2)[k], v) for k, v in first.items()) and "corrupt" not in capsys.readouterr().out


def test_multitask_trajectory_trains_on_the_experts_rows_and_matches_the_sum_of_task_vectors(data_dir):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    # one full-batch step: the multi-task step is -lr * (g_colours + g_size) on the experts' subsets
    gd = gradient_descent_config(0.01, batch_size=10**6, data_fraction=0.5, seed=1)
    mt = multitask_epoch_trajectory(bench, ["size", "colours"], gd, 1)
    assert mt.tasks == ("colours", "size") and mt.task == "multitask" and mt.n_train == 32
    grads = [task_loss_and_gradient(bench, t, pre, gd).gradient for t in ("colours", "size")]
    assert one_step_exactness(pre, mt.state(1), grads[0] + grads[1], 0.01)["relative_error"] < 1e-4
    # small SGD steps over a whole epoch: sum of the experts' task vectors ~ the multi-task displacement
    sgd = trajectory_config("sgd", 1e-5, batch_size=16, data_fraction=0.5)
    experts = {t: epoch_trajectory(bench, t, sgd, 1) for t in ("colours", "size")}
    runs = multitask_epoch_trajectory(bench, ["colours", "size"], sgd, 1)
    summed = sum(tr.task_vector(pre, 1) for tr in experts.values())
    tau_mt = runs.task_vector(pre, 1)
    assert (summed - tau_mt).norm() < 0.05 * tau_mt.norm()
    with pytest.raises(ValueError, match="tasks is empty"):
        multitask_epoch_trajectory(bench, [], sgd, 1)


class CountingImages:
    """Training images that count how often they are indexed (decoded, at the clip size)."""

    def __init__(self, X: torch.Tensor, reads: list) -> None:
        self.X, self.reads = X, reads

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, item):
        self.reads.append(item)
        return self.X[item]


def test_cached_trajectories_do_not_read_the_training_images(data_dir, monkeypatch):
    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    reads: list = []
    split = bench.split
    monkeypatch.setattr(bench, "split", lambda t, s="train": (lambda X, y: (CountingImages(X, reads), y))(*split(t, s)))
    cfg = trajectory_config("sgd", 1e-5, batch_size=16, data_fraction=0.5, seed=3)
    first = multitask_epoch_trajectory(bench, ["colours", "size"], cfg, 1)
    expert = epoch_trajectory(bench, "colours", cfg, 1)
    assert reads, "training reads the images"
    reads.clear()
    again = multitask_epoch_trajectory(bench, ["colours", "size"], cfg, 1)
    assert epoch_trajectory(bench, "colours", cfg, 1).n_train == expert.n_train
    assert reads == [], "a cached run must not decode its training images"
    assert again.n_train == first.n_train and again.steps_per_epoch == first.steps_per_epoch
    pre = bench.pretrained_state()
    assert torch.equal(again.task_vector(pre, 1).flatten(), first.task_vector(pre, 1).flatten())


def test_task_gradients_run_on_the_sizes_training_threads(data_dir, monkeypatch):
    """Chapter 02's rounding-level figures (one-step exactness, Taylor gaps) must read alike in a report lane (one
    thread) and in a notebook on more: the task's gradient and Hessian products run on ``train_threads``."""
    from mergelab.analysis import alignment
    from mergelab.utils import torch_threads

    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    pre = bench.pretrained_state()
    threads = []
    for name in ("loss_and_gradient", "hessian_vector_product"):
        real = getattr(alignment, name)
        monkeypatch.setattr(alignment, name, lambda *a, real=real: threads.append(torch.get_num_threads()) or real(*a))
    with torch_threads(2):
        g = alignment.task_loss_and_gradient(bench, "size", pre).gradient
        alignment.task_hessian_vector_product(bench, "size", pre, g)
        assert torch.get_num_threads() == 2
    assert threads == [bench.train_threads] * 2 == [1, 1]
