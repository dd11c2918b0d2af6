"""TSV: truncated SVDs, polar factors, TSV-M, TSV-C and Singular Task Interference on synthetic data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from mergelab.analysis.interference import interference, layer_interference, pairwise_interference, singular_task_interference
from mergelab.analysis.spectra import cumulative_energy, energy_at, energy_table, random_like, spectra, spectrum_curves
from mergelab.experiments.ch03_tsv import compressed_accuracy, compression_sweep, task_count_study
from mergelab.layers import DECOMPOSED_KINDS, LAYER_KINDS, is_decomposed, layer_kind, layer_order
from mergelab.linalg import POLAR_METHODS, RTOL, default_rank, polar_factor, truncated_svd
from mergelab.linalg._kernels import _torch_polar, _torch_task_svd
from mergelab.linalg.svd import _gram_svd
from mergelab.merging import MERGE_METHODS, merge
from mergelab.merging.tsv import CompressedTaskVector, MergedFactors, storage_bytes, tsv_compress, tsv_merge, tsv_merge_factors, tsv_merge_matrices, tsv_merge_matrix_reference, tsv_reconstruct, tsv_update
from mergelab.merging.tsv.merge import _layers_side_by_side
from mergelab.task_vectors import TaskVector
from mergelab.models import TinyViTConfig, build_tiny_encoder
from mergelab.utils import pick_device
from mergelab.linalg import _kernels as linalg_kernels
from mergelab.merging.tsv import merge as tsvm

SOLVERS = [dict(svd="gram"), dict(svd="gram", gram_dtype="float32"), dict(svd="exact")]


TORCH_DEVICE = pick_device("auto")
"""Where the ``torch-kernels`` runs put their inputs: the GPU on a machine that has one (so that
``make test`` there checks the path TSV-M takes on it), else the CPU."""


@dataclass(frozen=True)
class Kernels:
    """Where a test's inputs go (:meth:`put`) for the implementation it runs through."""

    device: torch.device

    def put(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


@pytest.fixture(params=["cpu-kernels-serial", "cpu-kernels-parallel", "torch-kernels"])
def kernels(request, monkeypatch) -> Kernels:
    """Run a test through every implementation: the per-task NumPy/SciPy kernels the CPU uses for
    large matrices, one task at a time or two side by side (LAPACK ``syevr`` without the GIL), and
    the batched torch kernels used on GPUs and for small matrices, on :data:`TORCH_DEVICE`."""
    torch_kernels = request.param == "torch-kernels"
    monkeypatch.setattr(linalg_kernels, "SMALL", 10**9 if torch_kernels else 0)
    workers = 2 if request.param == "cpu-kernels-parallel" else 1
    monkeypatch.setattr(linalg_kernels, "_cpu_workers", lambda n: max(1, min(n, workers)))
    return Kernels(TORCH_DEVICE if torch_kernels else torch.device("cpu"))


def orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q.float()


def decaying(m: int, n: int, g: torch.Generator, power: float = 1.0) -> torch.Tensor:
    """A full-rank ``(m, n)`` matrix with singular values ``1 / i ** power``."""
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -power
    return (orthonormal(m, r, g) * s) @ orthonormal(n, r, g).T


def orthogonal_tasks(T: int, m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    """``T`` task matrices of rank ``rank`` whose left and right singular vectors are mutually
    orthogonal across tasks (disjoint column blocks of one orthogonal matrix)."""
    g = torch.Generator().manual_seed(seed)
    U, V = orthonormal(m, T * rank, g), orthonormal(n, T * rank, g)
    s = torch.rand(T, rank, generator=g) + 0.5
    return torch.stack([(U[:, t * rank:(t + 1) * rank] * s[t]) @ V[:, t * rank:(t + 1) * rank].T for t in range(T)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- which tensors
def test_layer_kinds_of_the_open_clip_vit_and_which_are_decomposed():
    state = build_tiny_encoder(TinyViTConfig(width=32, layers=2, heads=2, patch_size=8)).state_dict()
    kinds = {k: layer_kind(k, v.shape) for k, v in state.items()}
    assert kinds["transformer.resblocks.0.attn.in_proj_weight"] == "attn_in_proj"
    assert kinds["transformer.resblocks.1.attn.out_proj.weight"] == "attn_out_proj"
    assert kinds["transformer.resblocks.0.mlp.c_fc.weight"] == "mlp_c_fc"
    assert kinds["transformer.resblocks.0.mlp.c_proj.weight"] == "mlp_c_proj"
    assert kinds["positional_embedding"] == "positional_embedding"
    assert kinds["proj"] == "proj"
    assert kinds["conv1.weight"] == "conv1"
    assert kinds["transformer.resblocks.0.mlp.c_fc.bias"] == "other"
    assert kinds["class_embedding"] == "other"
    assert set(kinds.values()) <= set(LAYER_KINDS)
    decomposed = {k for k, v in state.items() if is_decomposed(k, v)}
    assert decomposed == {k for k, kind in kinds.items() if kind in DECOMPOSED_KINDS}
    assert layer_kind("text_projection", (512, 512)) == "text_projection"
    assert not is_decomposed("text_projection", torch.zeros(4, 4))


def test_default_rank_is_floor_of_min_dimension_over_tasks():
    assert default_rank((3072, 768), 8) == 96
    assert default_rank((768, 3072), 20) == 38
    assert default_rank((50, 768), 20) == 2
    assert default_rank((17, 64), 40) == 1  # at least one triplet
    assert default_rank((64, 64), 1) == 64
    assert default_rank((64, 32), rank_fraction=0.25) == 8
    with pytest.raises(ValueError, match="rank_fraction=1.5"):
        default_rank((4, 4), rank_fraction=1.5)
    with pytest.raises(ValueError, match="num_tasks=0"):
        default_rank((4, 4), 0)


# ----------------------------------------------------------------------------- truncated SVD
@pytest.mark.parametrize("options", SOLVERS, ids=lambda o: "-".join(o.values()))
@pytest.mark.parametrize("shape", [(60, 24), (24, 60)])
def test_truncated_svd_matches_the_full_svd(options, shape, kernels):
    g = torch.Generator().manual_seed(1)
    A = torch.stack([decaying(*shape, g) for _ in range(3)])
    U, s, V = truncated_svd(kernels.put(A), 5, **options)
    assert {U.device, s.device, V.device} == {kernels.device}  # results stay where the input is
    U, s, V = U.cpu(), s.cpu(), V.cpu()
    assert U.shape == (3, shape[0], 5) and s.shape == (3, 5) and V.shape == (3, shape[1], 5)
    for t in range(3):
        U0, s0, Vh0 = torch.linalg.svd(A[t].double(), full_matrices=False)
        torch.testing.assert_close(s[t].double(), s0[:5], rtol=1e-4, atol=0)
        torch.testing.assert_close((U[t] * s[t]) @ V[t].T, ((U0[:, :5] * s0[:5]) @ Vh0[:5]).float(),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(U[t].T @ U[t], torch.eye(5), rtol=0, atol=1e-5)
        torch.testing.assert_close(V[t].T @ V[t], torch.eye(5), rtol=0, atol=1e-5)
    single = truncated_svd(kernels.put(A[0]), 5, **options)
    torch.testing.assert_close(single[1].cpu(), s[0])


def test_the_batched_torch_path_used_on_gpus_matches_the_cpu_path():
    g = torch.Generator().manual_seed(2)
    A = torch.stack([decaying(40, 16, g) for _ in range(3)])
    for f64 in (True, False):
        cpu = _gram_svd(A, 4, f64, RTOL)
        batched = _torch_task_svd(A, 4, f64, RTOL)
        torch.testing.assert_close((cpu[0] * cpu[1].unsqueeze(-2)) @ cpu[2].transpose(-2, -1),
                                   (batched[0] * batched[1].unsqueeze(-2)) @ batched[2].transpose(-2, -1),
                                   atol=1e-5, rtol=0)
    X = torch.randn(50, 12, generator=g)
    for gram in (True, False):
        torch.testing.assert_close(_torch_polar(X, RTOL, gram), polar_factor(X), atol=1e-5, rtol=0)


def test_randomized_svd_is_accurate_on_a_steep_spectrum_and_not_on_a_flat_one():
    g = torch.Generator().manual_seed(3)
    steep = decaying(200, 100, g, power=3.0)
    flat = torch.randn(200, 100, generator=g)
    for A, good in ((steep, True), (flat, False)):
        U, s, V = truncated_svd(A, 10, svd="randomized", n_iter=2)
        exact = truncated_svd(A, 10, svd="exact")
        err = rel((U * s) @ V.T, (exact[0] * exact[1]) @ exact[2].T)
        assert (err < 1e-4) if good else (err > 1e-3), err


def test_zero_singular_values_are_dropped_not_given_arbitrary_directions(kernels):
    g = torch.Generator().manual_seed(4)
    A = (orthonormal(30, 2, g) * torch.tensor([2.0, 1.0])) @ orthonormal(20, 2, g).T  # rank 2
    for options in SOLVERS:
        U, s, V = (x.cpu() for x in truncated_svd(kernels.put(A), 5, **options))
        assert torch.all(s[2:] == 0) and torch.all(U[:, 2:] == 0) and torch.all(V[:, 2:] == 0), options
        torch.testing.assert_close((U * s) @ V.T, A, atol=1e-5, rtol=0)


def test_truncated_svd_rejects_bad_arguments_naming_them():
    A = torch.randn(6, 4)
    with pytest.raises(ValueError, match="svd='lanczos'"):
        truncated_svd(A, 2, svd="lanczos")
    with pytest.raises(ValueError, match="k=5"):
        truncated_svd(A, 5)
    with pytest.raises(ValueError, match="k=0"):
        truncated_svd(A, 0)
    with pytest.raises(ValueError, match="gram_dtype='float16'"):
        truncated_svd(A, 2, gram_dtype="float16")
    with pytest.raises(ValueError, match="shape"):
        truncated_svd(torch.randn(2, 3, 4, 5), 2)


# ----------------------------------------------------------------------------- polar factor
@pytest.mark.parametrize("method", POLAR_METHODS)
@pytest.mark.parametrize("shape", [(40, 10), (12, 10)])
def test_polar_factor_is_the_nearest_orthonormal_matrix(method, shape, kernels):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(*shape, generator=g)
    P = polar_factor(kernels.put(X), method).cpu()
    torch.testing.assert_close(P.T @ P, torch.eye(shape[1]), atol=1e-5, rtol=0)
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    torch.testing.assert_close(P.double(), U @ Vh, atol=1e-5, rtol=0)
    # nearer to X than another orthonormal basis of the same column space
    Q, _ = torch.linalg.qr(X)
    assert (P - X).norm() <= (Q - X).norm() + 1e-6


def test_polar_factor_of_a_rank_deficient_stack_is_the_partial_isometry(kernels):
    g = torch.Generator().manual_seed(6)
    U = orthonormal(30, 4, g)
    X = torch.cat([U, U, torch.zeros(30, 2)], dim=1)  # duplicated columns and zero columns
    for method in POLAR_METHODS:
        P = polar_factor(kernels.put(X), method).cpu()
        torch.testing.assert_close(P, torch.cat([U, U, torch.zeros(30, 2)], dim=1) / math.sqrt(2) *
                                   torch.tensor([1.0] * 8 + [0.0] * 2), atol=1e-5, rtol=0)


def nearly_dependent_tasks(T: int = 4, m: int = 32, k: int = 8, gap: float = 1e-7) -> torch.Tensor:
    """``(T, m, m)`` float64 task matrices whose stacked top-``k`` left singular vectors are square and
    nearly dependent: the last task's first one is the sum of the others' first ones plus ``gap``
    noise (the smallest singular value of the stack is about ``1e-8`` of the largest). Spectra have a
    gap after ``k``, so every task's top ``k`` is well determined."""
    g = torch.Generator().manual_seed(11)

    def rotation(first: torch.Tensor | None = None) -> torch.Tensor:
        X = torch.randn(m, m, generator=g, dtype=torch.float64)
        if first is not None:
            X[:, 0] = first
        Q, R = torch.linalg.qr(X)
        return Q * torch.sign(torch.diagonal(R))

    s = torch.cat([torch.linspace(10, 5, k), torch.linspace(0.5, 0.1, m - k)]).double()
    Us: list[torch.Tensor] = []
    for t in range(T):
        if t < T - 1:
            Us.append(rotation())
        else:
            u = sum(U[:, 0] for U in Us) + gap * torch.randn(m, generator=g, dtype=torch.float64)
            Us.append(rotation(u / u.norm()))
    return torch.stack([(U * s) @ rotation().T for U in Us])


def official_tsv_m(tasks: torch.Tensor, k: int) -> torch.Tensor:
    """TSV-M as the official code computes it: per task a full SVD truncated to ``k``, stacks, polar
    factors from a plain SVD of each stack (nothing dropped), in the tasks' dtype."""
    Us, Vs, ss = [], [], []
    for A in tasks:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        Us.append(U[:, :k]), Vs.append(Vh[:k].T), ss.append(s[:k])

    def polar(X: torch.Tensor) -> torch.Tensor:
        P, _, Qh = torch.linalg.svd(X, full_matrices=False)
        return P @ Qh

    return (polar(torch.cat(Us, 1)) * torch.cat(ss)) @ polar(torch.cat(Vs, 1)).T


@pytest.mark.parametrize("options", [dict(svd="gram"), dict(svd="exact")], ids=lambda o: o["svd"])
def test_tsv_m_keeps_the_weak_direction_of_a_nearly_dependent_stack_as_the_official_code_does(options, kernels):
    tasks = nearly_dependent_tasks()
    k = 8
    stack = torch.cat([torch.linalg.svd(A)[0][:, :k] for A in tasks], 1)
    S = torch.linalg.svdvals(stack)
    assert S[-1] / S[0] < 1e-6  # the regime the review found in ViT-B-32's square stacks
    official = official_tsv_m(tasks, k)
    assert rel(tsv_merge_matrices(kernels.put(tasks), k, **options).cpu(), official) < 1e-8
    assert rel(tsv_merge_matrix_reference(list(tasks), k), official) < 1e-10
    # the test can fail: a cut-off at 1e-6 of the largest singular value drops the weak direction
    assert (polar_factor(stack, rtol=RTOL) - polar_factor(stack)).norm() > 0.5


# ----------------------------------------------------------------------------- TSV-M on one layer
@pytest.mark.parametrize("options", SOLVERS + [dict(svd="randomized")], ids=lambda o: "-".join(o.values()))
def test_tsv_m_of_mutually_orthogonal_tasks_is_task_arithmetic_and_sti_is_zero(options, kernels):
    tasks = orthogonal_tasks(T=4, m=48, n=32, rank=3)  # k = 32 // 4 = 8 >= rank
    merged = tsv_merge_matrices(kernels.put(tasks), **options).cpu()
    torch.testing.assert_close(merged, tasks.sum(0), atol=1e-5, rtol=0)
    assert singular_task_interference(kernels.put(tasks)) == pytest.approx(0.0, abs=1e-6)
    assert singular_task_interference(kernels.put(tasks), normalized=False) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("options", SOLVERS, ids=lambda o: "-".join(o.values()))
def test_fast_tsv_m_agrees_with_the_plain_reference(options, kernels):
    g = torch.Generator().manual_seed(7)
    tasks = torch.stack([decaying(96, 48, g, power=0.7) + 0.01 * torch.randn(96, 48, generator=g)
                         for _ in range(6)])
    ref = tsv_merge_matrix_reference(list(tasks))
    tol = 1e-3 if options.get("gram_dtype") == "float32" else 1e-4
    assert rel(tsv_merge_matrices(kernels.put(tasks), **options).cpu(), ref) < tol
    assert rel(tsv_merge_matrices(kernels.put(tasks.transpose(1, 2)), **options).cpu(), ref.T) < tol  # wide


def test_merged_update_has_orthonormal_singular_vectors_and_the_kept_singular_values(kernels):
    g = torch.Generator().manual_seed(8)
    tasks = torch.stack([decaying(64, 40, g) for _ in range(5)])
    f = tsv_merge_factors(kernels.put(tasks))
    assert f.U.device == kernels.device
    f = MergedFactors(f.U.cpu(), f.s.cpu(), f.V.cpu(), f.k)
    assert f.k == 8 and f.U.shape == (64, 40) and f.V.shape == (40, 40)
    torch.testing.assert_close(f.U.T @ f.U, torch.eye(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.V.T @ f.V, torch.eye(40), atol=1e-4, rtol=0)
    update = f.update()
    torch.testing.assert_close(update, tsv_merge_matrices(tasks))
    # with orthonormal factors, the update's singular values are exactly the kept ones
    torch.testing.assert_close(torch.linalg.svdvals(update), f.s.sort(descending=True).values, atol=1e-4, rtol=1e-4)
    kept = torch.stack([torch.linalg.svdvals(t)[:8] for t in tasks]).flatten()
    torch.testing.assert_close(f.s.sort().values, kept.sort().values, atol=1e-5, rtol=1e-5)


def test_tsv_m_with_one_task_reproduces_the_task_matrix(kernels):
    g = torch.Generator().manual_seed(9)
    for shape in ((30, 20), (20, 30)):
        A = torch.randn(*shape, generator=g)
        for options in SOLVERS:
            torch.testing.assert_close(tsv_merge_matrices(kernels.put(A[None]), **options).cpu(), A,
                                       atol=1e-4, rtol=0)


def test_tsv_m_of_two_identical_tasks_is_the_tasks_own_truncation(kernels):
    g = torch.Generator().manual_seed(10)
    A = decaying(40, 30, g)
    U, s, Vh = torch.linalg.svd(A)
    top = (U[:, :15] * s[:15]) @ Vh[:15]
    for options in SOLVERS:
        torch.testing.assert_close(tsv_merge_matrices(kernels.put(torch.stack([A, A])), **options).cpu(), top,
                                   atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- TSV-M on state dicts
def _states(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (12, 8), "conv1.weight": (4, 3, 2, 2), "b": (12,), "text_projection": (6, 6), "pos": (5, 8)}
    pretrained = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pretrained["count"] = torch.tensor(3)  # integer buffer: no task vector entry
    tvs = [TaskVector({k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}) for _ in range(T)]
    return pretrained, tvs


class ScoreByDistance:
    """A stand-in benchmark: a task's accuracy falls with the distance of ``w`` from a target,
    ``theta_0 + 3 tau_t`` on validation and ``theta_0`` on test (so the two splits prefer the
    largest and the smallest coefficient)."""

    def __init__(self, pretrained, task_vectors):
        self.targets = {t: pretrained["w"] + 3 * tv["w"] for t, tv in task_vectors.items()}
        self.pretrained = pretrained["w"]
        self.tasks = tuple(task_vectors)

    def evaluate(self, state, split="test", tasks=None):
        target = (lambda t: self.targets[t]) if split == "val" else (lambda t: self.pretrained)
        return {t: float(1 / (1 + (state["w"] - target(t)).norm())) for t in (tasks or self.tasks)}


def test_tsv_merge_is_registered_with_a_coefficient_grid_and_scales_linearly():
    method = MERGE_METHODS["tsv_merge"]
    assert method.coefficient_grid[0] == 0.0 and method.coefficient_grid[1] == pytest.approx(0.1) and method.coefficient_grid[-1] == pytest.approx(3.0)
    assert method.defaults["coefficient"] == 1.0
    pretrained, tvs = _states(3)
    update = tsv_update(tvs)
    for alpha in (0.5, 2.0):
        merged = merge("tsv_merge", pretrained, tvs, coefficient=alpha)
        for k, v in update.items():
            torch.testing.assert_close(merged[k], pretrained[k] + alpha * v, atol=1e-6, rtol=0)
    assert merged["count"] == 3


def test_non_matrices_and_text_projection_are_averaged_matrices_are_decomposed():
    pretrained, tvs = _states(3)
    update = tsv_update(tvs)
    for k in ("conv1.weight", "b", "text_projection"):
        torch.testing.assert_close(update[k], sum(tv[k] for tv in tvs) / 3)
    torch.testing.assert_close(update["w"], tsv_merge_matrices(torch.stack([tv["w"] for tv in tvs])))
    assert rel(update["w"], sum(tv["w"] for tv in tvs) / 3) > 1e-2


def test_tsv_merge_with_one_task_and_coefficient_one_reproduces_the_expert():
    pretrained, tvs = _states(1)
    expert = tvs[0].apply_to(pretrained)
    merged = merge("tsv_merge", pretrained, tvs, coefficient=1.0)
    for k in expert:
        torch.testing.assert_close(merged[k], expert[k], atol=1e-5, rtol=0)


def test_layers_merged_side_by_side_equal_layers_merged_one_at_a_time(monkeypatch):
    monkeypatch.setattr(linalg_kernels, "SMALL", 0)  # the NumPy/LAPACK kernels the CPU uses for real layers
    g = torch.Generator().manual_seed(7)
    shapes = {f"resblocks.{i}.weight": (40 + 8 * i, 24) for i in range(5)} | {"bias": (24,)}
    tvs = [TaskVector({k: torch.randn(s, generator=g) for k, s in shapes.items()}) for _ in range(3)]
    used = []
    side_by_side = _layers_side_by_side
    monkeypatch.setattr(tsvm, "_layers_side_by_side", lambda fn, keys: used.append(list(keys)) or side_by_side(fn, keys))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = tsv_update(tvs, device="cpu")
        assert torch.get_num_threads() == 2, "the thread count is restored"
        torch.set_num_threads(1)
        serial = tsv_update(tvs, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert used == [[k for k in shapes if k != "bias"]], "two threads: the 2-D layers go side by side; one: not"
    assert list(parallel) == list(serial) == list(shapes)
    for k in shapes:
        assert torch.equal(parallel[k], serial[k]), k


def test_tsv_merge_rejects_incompatible_task_vectors():
    pretrained, tvs = _states(2)
    bad = TaskVector({**tvs[1].vector, "w": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="'w'"):
        merge("tsv_merge", pretrained, [tvs[0], bad])
    with pytest.raises(ValueError, match="empty"):
        tsv_update([])


# ----------------------------------------------------------------------------- TSV-C
def test_tsv_c_with_full_rank_reproduces_the_task_vector_and_stores_less_with_fewer_triplets():
    _, tvs = _states(1)
    tv = tvs[0]
    full = tsv_compress(tv, k=100)  # capped at min(m, n) per matrix
    assert full.ranks() == {"w": 8, "pos": 5}
    rebuilt = tsv_reconstruct(full)
    assert list(rebuilt.keys()) == list(tv.keys())
    for k in tv.keys():
        torch.testing.assert_close(rebuilt[k], tv[k], atol=1e-5, rtol=0)
    small = tsv_compress(tv, num_tasks=4)  # k = 2 and 1
    assert small.ranks() == {"w": 2, "pos": 1}
    dense_bytes = 4 * (4 * 3 * 2 * 2 + 12 + 6 * 6)
    assert small.nbytes() == 4 * (2 * (12 + 8 + 1) + 1 * (5 + 8 + 1)) + dense_bytes
    assert storage_bytes(tv) == 4 * tv.numel()
    errors = [rel(tsv_reconstruct(tsv_compress(tv, k=k)).vector["w"], tv["w"]) for k in (1, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    torch.testing.assert_close(tsv_reconstruct(small)["b"], tv["b"])


def test_tsv_c_stores_nothing_for_a_tensor_the_task_left_unchanged_and_merges_as_if_it_were_zeros():
    """A tensor frozen while the expert fine-tuned has a task vector of exact zeros: TSV-C keeps only its name and
    shape, it reads back as zeros, and TSV-M of stored factors is the same as with the zeros stored in full."""
    from mergelab.merging.tsv import tsv_merge_compressed

    _, tvs = _states(3)
    for tv in tvs[:2]:  # two of three tasks froze the stem; the third changed it
        tv.vector["conv1.weight"] = torch.zeros_like(tv["conv1.weight"])
    compressed = [tsv_compress(tv, num_tasks=3) for tv in tvs]
    assert compressed[0].unchanged == ["conv1.weight"] and compressed[2].unchanged == []
    assert "conv1.weight" not in compressed[0].dense and compressed[0].shapes["conv1.weight"] == (4, 3, 2, 2)
    stored_zeros = CompressedTaskVector(compressed[0].factors, {**compressed[0].dense,
                                        "conv1.weight": torch.zeros(4, 3, 2, 2)}, compressed[0].shapes)
    assert compressed[0].nbytes() == stored_zeros.nbytes() - 4 * 4 * 3 * 2 * 2
    rebuilt = tsv_reconstruct(compressed[0])
    assert list(rebuilt.keys()) == list(tvs[0].keys())
    assert torch.equal(rebuilt["conv1.weight"], torch.zeros(4, 3, 2, 2))
    merged = tsv_merge_compressed(compressed)
    reference = tsv_merge_compressed([stored_zeros, compressed[1], compressed[2]])
    for k in reference.keys():
        assert torch.equal(merged[k], reference[k]), k
    torch.testing.assert_close(merged["conv1.weight"], tvs[2]["conv1.weight"] / 3)
    assert compressed[0].truncated(num_tasks=6).unchanged == ["conv1.weight"]
    with pytest.raises(KeyError, match="'w' is not a dense parameter"):
        compressed[0].dense_tensor("w")


def test_tsv_compress_needs_exactly_one_rank_choice():
    _, tvs = _states(1)
    with pytest.raises(ValueError, match="exactly one"):
        tsv_compress(tvs[0])
    with pytest.raises(ValueError, match="exactly one"):
        tsv_compress(tvs[0], k=2, num_tasks=4)
    with pytest.raises(ValueError, match="k=0"):
        tsv_compress(tvs[0], k=0)


def test_truncating_a_compressed_task_vector_equals_compressing_with_fewer_triplets(kernels):
    g = torch.Generator().manual_seed(11)
    tv = TaskVector({"w": decaying(40, 30, g), "pos": decaying(12, 30, g), "b": torch.randn(30, generator=g)})
    tv = TaskVector({k: kernels.put(v) for k, v in tv.items()})
    wide = tsv_compress(tv, rank_fraction=1.0)
    for choice in ({"k": 3}, {"num_tasks": 4}, {"rank_fraction": 0.5}):
        cut, direct = wide.truncated(**choice), tsv_compress(tv, **choice)
        assert cut.ranks() == direct.ranks() and cut.nbytes() == direct.nbytes()
        for name in tv.keys():
            torch.testing.assert_close(tsv_reconstruct(cut)[name], tsv_reconstruct(direct)[name],
                                       atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="stores 3 triplets"):
        tsv_compress(tv, k=3).truncated(k=5)
    with pytest.raises(ValueError, match="exactly one"):
        wide.truncated()


def test_compression_sweep_equals_compressing_at_each_fraction():
    pretrained, tvs = _states(3, seed=5)
    task_vectors = dict(zip("abc", tvs))
    bench = ScoreByDistance(pretrained, task_vectors)
    experts = {t: 0.5 for t in task_vectors}
    fractions = [0.25, 1.0, 0.5]
    sweep = compression_sweep(bench, pretrained, task_vectors, experts, fractions)
    assert list(sweep["rank_fraction"]) == fractions
    for _, row in sweep.iterrows():
        direct = compressed_accuracy(bench, pretrained, task_vectors, "test", rank_fraction=row["rank_fraction"])
        acc = direct["per_task_accuracy"]
        assert row["absolute_accuracy"] == pytest.approx(np.mean(list(acc.values())), abs=1e-6)
        assert row["normalized_accuracy"] == pytest.approx(np.mean([a / 0.5 for a in acc.values()]), abs=1e-6)
        assert row["storage_fraction"] == pytest.approx(direct["compressed_bytes"] / direct["dense_bytes"])
    assert sweep.set_index("rank_fraction")["storage_fraction"].sort_index().is_monotonic_increasing


# ----------------------------------------------------------------------------- spectra
def test_cumulative_energy_and_random_baseline():
    s = torch.tensor([3.0, 2.0, 1.0])
    torch.testing.assert_close(cumulative_energy(s), torch.tensor([9 / 14, 13 / 14, 1.0]))
    assert energy_at(s, 2) == pytest.approx(13 / 14)
    A = torch.randn(30, 20)
    R = random_like(A, seed=1)
    assert R.shape == A.shape and float(R.norm()) == pytest.approx(float(A.norm()), rel=1e-5)


def test_energy_table_and_spectrum_curves_report_low_rank_task_matrices_above_random():
    g = torch.Generator().manual_seed(11)
    tvs = {f"t{i}": TaskVector({"w": decaying(64, 32, g, power=1.5), "b": torch.randn(64, generator=g)})
           for i in range(4)}
    table = energy_table(tvs)
    assert set(table["task"]) == set(tvs) and set(table["layer"]) == {"w"}
    assert (table["k"] == 8).all()
    assert (table["energy"] > table["random_energy"]).all()
    assert (table["energy"] <= 1).all() and (table["random_energy"] > 0).all()
    curves = spectrum_curves(tvs, rank_fractions=[0.0, 0.5, 1.0])
    assert set(curves["source"]) == {"task matrix", "random"}
    ends = curves[curves["rank_fraction"] == 1.0]["energy"]
    np.testing.assert_allclose(ends, 1.0, atol=1e-6)
    assert (curves[curves["rank_fraction"] == 0.0]["energy"] == 0).all()
    # the same spectra computed once serve both analyses, with the same results
    spec = spectra(tvs)
    pd.testing.assert_frame_equal(energy_table(tvs, precomputed=spec), table)
    pd.testing.assert_frame_equal(spectrum_curves(tvs, rank_fractions=[0.0, 0.5, 1.0], precomputed=spec), curves)


def test_energy_stable_rank_and_curves_on_known_singular_values():
    U, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)))
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(4)))  # a 6 x 4 matrix: min(m, n) = 4
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    tvs = {"t": TaskVector({"w": U @ torch.diag(s) @ V.T})}
    row = energy_table(tvs, rank_fraction=0.5).iloc[0]  # k = floor(4 x 0.5) = 2
    assert row["k"] == 2 and row["energy"] == pytest.approx(20 / 22, abs=1e-5)
    assert row["stable_rank"] == pytest.approx(22 / 16, abs=1e-5)  # ||Delta||_F^2 / s_1^2
    curve = spectrum_curves(tvs, rank_fractions=[0.25, 0.5, 0.625])
    at = curve[curve["source"] == "task matrix"].set_index("rank_fraction")["energy"]
    # x = r / min(m, n): a quarter of the rank keeps the top triplet, half the top two; linear in between
    assert at[0.25] == pytest.approx(16 / 22, abs=1e-5) and at[0.5] == pytest.approx(20 / 22, abs=1e-5)
    assert at[0.625] == pytest.approx((20 / 22 + 21 / 22) / 2, abs=1e-5)


# ----------------------------------------------------------------------------- interference
def test_sti_is_maximal_for_identical_tasks_and_in_between_otherwise():
    g = torch.Generator().manual_seed(12)
    A, B = decaying(40, 24, g), decaying(40, 24, g)
    assert singular_task_interference(torch.stack([A, A])) == pytest.approx(1.0, abs=1e-5)
    k = 12
    nuclear = float(torch.linalg.svdvals(A)[:k].sum())
    assert singular_task_interference(torch.stack([A, A]), normalized=False) == pytest.approx(2 * nuclear, rel=1e-4)
    three = torch.stack([A, A, A])  # T identical tasks: (T - 1) ||Sigma||_*, normalized 1
    assert singular_task_interference(three) == pytest.approx(1.0, abs=1e-5)
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        pair = torch.stack([decaying(40, 24, g), decaying(40, 24, g)])
        value = singular_task_interference(pair)
        assert 0.0 < value < 1.0
    # scale-free, symmetric in the tasks, and larger when tasks share directions
    assert singular_task_interference(torch.stack([3 * A, 3 * B])) == pytest.approx(
        singular_task_interference(torch.stack([A, B])), rel=1e-4)
    assert singular_task_interference(torch.stack([B, A])) == pytest.approx(
        singular_task_interference(torch.stack([A, B])), rel=1e-4)
    assert (singular_task_interference(torch.stack([A, A + 0.3 * B]))
            > singular_task_interference(torch.stack([A, B])))
    with pytest.raises(ValueError, match="at least 2"):
        singular_task_interference(A[None])


def test_pairwise_interference_matches_the_two_task_sti_per_layer():
    g = torch.Generator().manual_seed(13)
    tvs = {f"t{i}": TaskVector({"w": decaying(32, 24, g), "b": torch.randn(3, generator=g)}) for i in range(3)}
    tvs["copy"] = tvs["t0"]
    out = pairwise_interference(tvs)
    assert set(out) == {"w"}
    M = out["w"]
    assert list(M.index) == list(tvs)
    np.testing.assert_allclose(np.diag(M.values), 1.0, atol=1e-6)
    np.testing.assert_allclose(M.values, M.values.T, atol=1e-8)
    assert M.loc["t0", "copy"] == pytest.approx(1.0, abs=1e-5)
    k = default_rank((32, 24), 4)
    pair = torch.stack([tvs["t1"]["w"], tvs["t2"]["w"]])
    assert M.loc["t1", "t2"] == pytest.approx(singular_task_interference(pair, k=k), rel=1e-5)
    # both analyses from one SVD per task and layer give the same numbers
    both = interference(tvs)
    pd.testing.assert_frame_equal(both.pairwise["w"], M)
    pd.testing.assert_series_equal(both.all_tasks, layer_interference(tvs))
    with pytest.raises(ValueError, match="at least 2"):
        interference({"t0": tvs["t0"]})


def test_layer_order_runs_from_input_to_output():
    names = ["proj", "transformer.resblocks.10.mlp.c_fc.weight", "positional_embedding",
             "transformer.resblocks.2.attn.in_proj_weight", "transformer.resblocks.2.mlp.c_fc.weight", "ln_post.weight"]
    assert layer_order(names) == ["positional_embedding", "transformer.resblocks.2.attn.in_proj_weight",
                                      "transformer.resblocks.2.mlp.c_fc.weight",
                                      "transformer.resblocks.10.mlp.c_fc.weight", "proj", "ln_post.weight"]


# ----------------------------------------------------------------------------- experiments
def test_task_count_study_merges_each_subset_once_per_method_and_validates_only_on_validation():
    pretrained, tvs = _states(4, seed=3)
    task_vectors = dict(zip("abcd", tvs))
    bench = ScoreByDistance(pretrained, task_vectors)
    experts = {t: 1.0 for t in task_vectors}
    grid = (0.1, 0.5, 1.0)
    study = task_count_study(bench, pretrained, task_vectors, experts,
                                 {"task_arithmetic": {"grid": grid}, "tsv_merge": {"coefficient": 1.0},
                                  "ta_default": {"method": "task_arithmetic", "coefficient": 0.3}},
                                 task_counts=[2, 4], subsets=2, seed=0)
    assert len(study) == (2 + 1) * 3, "two subsets of 2 tasks, one of all 4, three variants each"
    for _, row in study[study["method"] == "ta_default"].iterrows():  # a labelled variant at its own options
        chosen = row["tasks"].split(",")
        acc = bench.evaluate(merge("task_arithmetic", pretrained, [task_vectors[t] for t in chosen], coefficient=0.3),
                             "test", chosen)
        assert row["coefficient"] == 0.3 and row["per_task_accuracy"] == pytest.approx(acc)
    assert set(study["num_tasks"]) == {2, 4}
    ta = study[study["method"] == "task_arithmetic"]
    assert set(ta["coefficient"]) <= set(grid)
    assert (study.loc[study["method"] == "tsv_merge", "coefficient"] == 1.0).all()
    # the chosen coefficient is the best on validation (test prefers another one) and is reported on test
    for _, row in ta.iterrows():
        chosen = row["tasks"].split(",")
        subset = [task_vectors[t] for t in chosen]
        states = {c: merge("task_arithmetic", pretrained, subset, coefficient=c) for c in grid}
        val = {c: np.mean(list(bench.evaluate(states[c], "val", chosen).values())) for c in grid}
        test = {c: np.mean(list(bench.evaluate(states[c], "test", chosen).values())) for c in grid}
        assert max(val, key=val.get) != max(test, key=test.get)
        assert row["coefficient"] == max(val, key=val.get)
        assert row["absolute_accuracy"] == pytest.approx(test[row["coefficient"]])
    row = study[(study["method"] == "tsv_merge") & (study["num_tasks"] == 4)].iloc[0]
    direct = bench.evaluate(merge("tsv_merge", pretrained, tvs, coefficient=1.0), "test", list("abcd"))
    assert row["absolute_accuracy"] == pytest.approx(np.mean(list(direct.values())))
    with pytest.raises(ValueError, match="task_counts"):
        task_count_study(bench, pretrained, task_vectors, experts, {"tsv_merge": {}}, task_counts=[5])


def test_tsv_merge_with_a_rank_fraction_on_state_dicts_keeps_that_fraction_per_matrix():
    pretrained, tvs = _states(3)
    merged = tsv_merge(pretrained, tvs, coefficient=1.0, rank_fraction=0.5)
    for key in ("w", "pos"):  # 2-D: k = floor(min(m, n) * 0.5) triplets per task
        k = default_rank(tuple(pretrained[key].shape), rank_fraction=0.5)
        expected = tsv_merge_matrices(torch.stack([tv[key] for tv in tvs]), k)
        torch.testing.assert_close(merged[key] - pretrained[key], expected, atol=1e-5, rtol=0)
        default = tsv_merge(pretrained, tvs, coefficient=1.0)[key] - pretrained[key]  # k = min(m, n) // 3
        assert not torch.allclose(default, expected, atol=1e-4)
    for key in ("b", "conv1.weight", "text_projection"):  # averaged
        torch.testing.assert_close(merged[key] - pretrained[key], sum(tv[key] for tv in tvs) / 3, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank_fraction=0"):
        tsv_merge(pretrained, tvs, rank_fraction=0)


def test_compressed_accuracy_names_the_tasks_whose_expert_is_missing():
    pretrained, tvs = _states(2, seed=5)
    task_vectors = dict(zip("ab", tvs))
    with pytest.raises(ValueError, match=r"experts lacks the tasks \['b'\]; give the expert of every task"):
        compressed_accuracy(ScoreByDistance(pretrained, task_vectors), pretrained, task_vectors, "test",
                            experts={"a": pretrained}, num_tasks=2)


def test_tsv_merge_names_a_bad_polar_solver_and_factors_of_another_architecture():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    tvs = [TaskVector({k: torch.randn(v.shape, generator=g) for k, v in pre.items()}) for _ in range(2)]
    with pytest.raises(ValueError, match="polar='qr' is not valid; use one of gram, svd"):
        tsv_merge(pre, tvs, polar="qr", device=None)
    with pytest.raises(ValueError, match="polar='qr' is not valid"):
        tsvm.tsv_merge_compressed([tsv_compress(tv, num_tasks=2) for tv in tvs], polar="qr")
    other = TaskVector({"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)})
    with pytest.raises(ValueError, match=r"compressed task 1 differs from task 0 at 'w' \(shape \(6, 5\) against \(6, 4\)"):
        tsvm.tsv_merge_compressed([tsv_compress(tvs[0], num_tasks=2), tsv_compress(other, num_tasks=2)])


def test_compare_with_reference_refuses_no_task_vectors():
    from mergelab.experiments.ch03_tsv import compare_with_reference

    with pytest.raises(ValueError, match="task_vectors is empty"):
        compare_with_reference([])


def test_float32_gram_svd_splits_a_cluster_at_the_cut_again_in_float64():
    """float32 Gram matrices mix the k-th singular vector with its neighbours where singular values crowd at the
    cut; the k + p float32 eigenvectors split again in float64 (the default padding) keep the last kept vector far
    closer to the float64 path's than no padding does, in the NumPy kernel of the CPU and the batched torch one of
    GPUs alike. How far the unpadded vector strays depends on the BLAS kernels the CPU selects, so the test reads
    four such matrices (seeds 0-3): on each the padded vector is within 1e-5, and no further than the unpadded one
    (up to rounding, 1e-7), and the padded error's mean over the four is below a twentieth of the unpadded one's.
    Measured: 112-807x and 467-4337x per matrix where the test was written (three matrices); on an Intel Xeon
    machine 5.5-44x per matrix for NumPy (seed 0: 5.5x; seed 2's padded error is at rounding) and about 70x as a
    ratio of the means, 790x for the batched kernel."""
    from mergelab.linalg._kernels import _np_task_svd

    m, n, k = 400, 120, 24
    errors: dict[str, list[tuple[float, float]]] = {"numpy": [], "batched": []}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        U0, _ = np.linalg.qr(rng.standard_normal((m, n)))
        V0, _ = np.linalg.qr(rng.standard_normal((n, n)))
        s0 = np.r_[np.geomspace(1, 0.1, k - 2), 0.1 * (1 - 1e-4 * np.arange(1, 5)), np.geomspace(0.099, 1e-3, n - k - 2)]
        A = ((U0 * s0) @ V0.T).astype(np.float32)  # four singular values within 4e-5 of each other at the cut
        _, _, V64 = _np_task_svd(A, k, True, RTOL)

        def last_vector_error(V) -> float:
            return 1 - abs(float(np.asarray(V)[:, -1] @ V64[:, -1]))

        paths = {"numpy": lambda pad: _np_task_svd(A, k, False, RTOL, pad)[2],
                 "batched": lambda pad: _torch_task_svd(torch.from_numpy(A)[None], k, False, RTOL, pad)[2][0]}
        for name, svd in paths.items():
            padded, unpadded = last_vector_error(svd(None)), last_vector_error(svd(0))
            assert padded <= unpadded + 1e-7 and padded < 1e-5, (name, seed, padded, unpadded)
            errors[name].append((padded, unpadded))
    for name, pairs in errors.items():
        padded, unpadded = np.mean(pairs, axis=0)
        assert padded < unpadded / 20, (name, pairs)
