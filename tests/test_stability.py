"""The stability bound: exact on quadratics, HRS's closed forms, monotone in every hyperparameter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.analysis.generalization import _encoder, control_variate_gap
from mergelab.analysis.stability import Curvature, ExpertHyperparameters, REGIMES, amplification, averaged_stability, expert_stability, generalization_bound, gradient_norm_schedule, smooth_generalization_bound
from mergelab.autodiff import hessian_extreme_eigenvalues, hessian_extremes, lanczos_extremes, per_example_gradient_norms
from mergelab.training import FinetuneConfig


def two_runs_on_quadratic(lam: float, eta: float, T: int, n: int, G: float, mu: float = 0.0) -> float:
    """|x_T - x'_T| of full-batch heavy-ball GD on f(x; z) = lam x^2 / 2 - z x, data z = +G everywhere,
    one example replaced by -G (so the replaced example's gradients differ by exactly 2G)."""
    x = xp = v = vp = 0.0
    for _ in range(T):
        v = mu * v + (lam * x - G)
        vp = mu * vp + (lam * xp - (G * (n - 1) - G) / n)
        x, xp = x - eta * v, xp - eta * vp
    return abs(x - xp)


@pytest.mark.parametrize("regime", REGIMES)
def test_full_batch_gd_on_a_quadratic_matches_the_closed_form(regime):
    lam, eta, T, n, G = 0.5, 0.1, 50, 10, 1.0
    exact = two_runs_on_quadratic(lam, eta, T, n, G)
    closed_form = 2 * G / (n * lam) * (1 - (1 - eta * lam) ** T)  # (2 eta G / n) sum_k (1 - eta lam)^k
    assert exact == pytest.approx(closed_form, rel=1e-12)
    hp = ExpertHyperparameters.constant(eta, T, batch_size=n, n_train=n)  # full batch: p = 1
    terms = expert_stability(hp, G, Curvature(beta=lam, rho=-lam), regime)  # spectrum {lam}
    assert terms.sampling == pytest.approx(0.0, abs=1e-15)
    assert terms.epsilon == pytest.approx(closed_form, rel=1e-9)


def test_nonconvex_expansion_is_hardt_recht_singer():
    lam, eta, T, n, G = -0.3, 0.1, 40, 10, 1.0  # concave direction: expansion 1 + eta |lam| per step
    exact = two_runs_on_quadratic(lam, eta, T, n, G)
    hp = ExpertHyperparameters.constant(eta, T, batch_size=n, n_train=n)
    smooth = expert_stability(hp, G, Curvature(beta=0.3), "smooth")  # rho unknown: rho = beta
    hrs = (2 * G * eta / n) * sum((1 + eta * 0.3) ** k for k in range(T))
    assert smooth.epsilon == pytest.approx(hrs, rel=1e-9)
    assert smooth.epsilon == pytest.approx(exact, rel=1e-9)  # the worst case is attained by this quadratic
    a = amplification(hp, Curvature(beta=0.3), "smooth")
    assert np.allclose(a, eta * (1 + eta * 0.3) ** np.arange(T - 1, -1, -1))


def test_heavy_ball_on_a_quadratic_is_exact_and_the_norm_recursion_only_bounds_it():
    lam, eta, T, n, G, mu = 0.5, 0.1, 60, 10, 1.0, 0.5
    exact = two_runs_on_quadratic(lam, eta, T, n, G, mu)
    hp = ExpertHyperparameters.constant(eta, T, batch_size=n, n_train=n, momentum=mu)
    quad = expert_stability(hp, G, Curvature(beta=lam, rho=-lam), "quadratic")
    smooth = expert_stability(hp, G, Curvature(beta=lam, rho=-lam), "smooth")
    assert quad.epsilon == pytest.approx(exact, rel=1e-9)
    assert smooth.epsilon > exact  # norms lose the sign structure momentum relies on


def test_minibatch_sgd_on_a_quadratic_matches_monte_carlo():
    """E||x_T - x'_T||^2 of real mini-batch SGD runs equals sampling + drift (independent batches)."""
    lam, eta, T, n, b, G, sims = 0.4, 0.2, 25, 12, 3, 1.0, 40000
    rng = np.random.default_rng(0)
    z = rng.uniform(-G, G, size=n)
    z[0] = G
    zp = z.copy()
    zp[0] = -G
    x = np.zeros(sims)
    xp = np.zeros(sims)
    for _ in range(T):
        batch = np.argsort(rng.random((sims, n)), axis=1)[:, :b]  # b distinct examples, fresh each step
        x = x - eta * (lam * x - z[batch].mean(1))
        xp = xp - eta * (lam * xp - zp[batch].mean(1))
    measured = float(np.mean((x - xp) ** 2))
    hp = ExpertHyperparameters.constant(eta, T, batch_size=b, n_train=n)
    terms = expert_stability(hp, G, Curvature(beta=lam, rho=-lam), "quadratic")
    assert terms.l2 == pytest.approx(measured, rel=0.03)
    assert terms.sampling > 0 and terms.drift > 0


def test_linear_model_sgd_stays_below_the_bound():
    """Least squares on a 5-d linear model with SGD: measured on-average L2 stability <= the bound."""
    torch.manual_seed(0)
    n, d, b, T, eta = 16, 5, 4, 30, 0.05
    X = torch.randn(n, d) / math.sqrt(d)
    y = torch.randn(n)
    H = X.T @ X / n
    eig = torch.linalg.eigvalsh(H)
    sims, diffs, gmax, beta = 300, [], 0.0, float((X ** 2).sum(1).max())
    g = torch.Generator().manual_seed(1)
    for _ in range(sims):
        Xp, yp = X.clone(), y.clone()
        Xp[0], yp[0] = torch.randn(d, generator=g) / math.sqrt(d), torch.randn((), generator=g)
        beta = max(beta, float((Xp[0] ** 2).sum()))
        w, wp = torch.zeros(d), torch.zeros(d)
        for _ in range(T):
            idx = torch.randperm(n, generator=g)[:b]
            r, rp = X[idx] @ w - y[idx], Xp[idx] @ wp - yp[idx]
            per = (X[idx] * r[:, None]).norm(dim=1).max().item()
            gmax = max(gmax, per, (Xp[idx] * rp[:, None]).norm(dim=1).max().item())
            w, wp = w - eta * X[idx].T @ r / b, wp - eta * Xp[idx].T @ rp / b
        diffs.append(((w - wp) ** 2).sum().item())
    measured = float(np.mean(diffs))
    # per-example Hessians x x^T differ here, so use the norm recursion (convex: rho = 0) with the
    # largest per-example curvature and the largest per-example gradient norm met on any run
    hp = ExpertHyperparameters.constant(eta, T, batch_size=b, n_train=n)
    bound = expert_stability(hp, gmax, Curvature(beta=beta, rho=0.0), "smooth").l2
    assert measured <= bound
    assert eig.min() > 0


HP = dict(lr=0.01, num_steps=50, batch_size=16, n_train=500)


def _eps(regime: str, **change) -> float:
    p = {**HP, **change}
    hp = ExpertHyperparameters.constant(p["lr"], p["num_steps"], p["batch_size"], p["n_train"], momentum=0.9)
    return expert_stability(hp, 2.0, Curvature(beta=50.0, rho=0.5), regime).epsilon


@pytest.mark.parametrize("regime", REGIMES)
def test_the_bound_is_monotone_in_every_hyperparameter(regime):
    lrs = [_eps(regime, lr=v) for v in (0.002, 0.005, 0.01, 0.02)]
    steps = [_eps(regime, num_steps=v) for v in (10, 20, 50, 100)]
    sizes = [_eps(regime, n_train=v) for v in (100, 200, 500, 1000)]
    batches = [_eps(regime, batch_size=v) for v in (4, 8, 16, 64)]
    assert all(np.diff(lrs) > 0) and all(np.diff(steps) > 0)
    assert all(np.diff(sizes) < 0)
    assert all(np.diff(batches) <= 1e-12)  # at a fixed number of steps, only the sampling term depends on b


def test_drift_is_independent_of_batch_size_and_sampling_shrinks_with_it():
    def terms(b):
        return expert_stability(ExpertHyperparameters.constant(0.01, 40, b, 400), 1.0, Curvature(10.0, 0.0))
    t8, t32 = terms(8), terms(32)
    assert t8.drift == pytest.approx(t32.drift, rel=1e-12)
    assert t32.sampling < t8.sampling


def test_averaging_k_identical_experts_divides_stability_by_k():
    t = expert_stability(ExpertHyperparameters.constant(0.01, 40, 8, 400), 1.0, Curvature(10.0, 0.0))
    for K in (1, 2, 5):
        avg = averaged_stability([t] * K)
        assert avg.l2 == pytest.approx(t.l2 / K ** 2, rel=1e-12)
        assert generalization_bound([t] * K, 3.0) == pytest.approx(3.0 * t.epsilon / K, rel=1e-12)


def test_the_bound_weighs_each_experts_stability_by_its_own_lipschitz_constant():
    from mergelab.analysis.stability import StabilityTerms

    t1, t2 = StabilityTerms(sampling=0.09, drift=0.16), StabilityTerms(sampling=1.0, drift=3.0)  # eps 0.5 and 2
    # x_avg moves by eps_k / K when task k's example is replaced, averaged over the K tasks
    assert averaged_stability([t1, t2]).sampling == pytest.approx((0.09 + 1.0) / 8, rel=1e-12)
    assert averaged_stability([t1, t2]).drift == pytest.approx((0.16 + 3.0) / 8, rel=1e-12)
    assert generalization_bound([t1, t2], [1.0, 3.0]) == pytest.approx((1.0 * 0.5 + 3.0 * 2.0) / 4, rel=1e-12)
    assert generalization_bound([t1, t2], [3.0, 1.0]) == pytest.approx((3.0 * 0.5 + 1.0 * 2.0) / 4, rel=1e-12)


def test_heterogeneous_data_sizes_are_worse_than_homogeneous_at_equal_mean():
    """Jensen: eps is convex in 1/n's argument n, so spreading n around its mean raises the average."""
    def term(n):
        return expert_stability(ExpertHyperparameters.constant(0.01, 40, 8, n), 1.0, Curvature(10.0, 0.0))
    homo = generalization_bound([term(500)] * 3, 1.0)
    hetero = generalization_bound([term(n) for n in (250, 500, 750)], 1.0)
    assert hetero > homo


def test_clipping_turns_into_smaller_learning_rates():
    cfg = FinetuneConfig(optimizer="sgd", lr=0.1, batch_size=8, num_steps=4, schedule="constant", warmup_steps=0,
                         grad_clip=1.0, data_fraction=0.5)
    hp = ExpertHyperparameters.from_config(cfg, 100, batch_gradient_norms=[10.0, 2.0, 0.5, 1.0])
    assert hp.lrs == pytest.approx((0.01, 0.05, 0.1, 0.1))
    assert hp.n_train == 50 and hp.batch_size == 8
    assert ExpertHyperparameters.from_config(cfg, 100).lrs == (0.1,) * 4
    assert ExpertHyperparameters.from_config(cfg, 100, num_steps=2).num_steps == 2


def test_curvature_schedule_interpolates_and_weight_decay_shifts_it():
    c = Curvature(beta=(1000.0, 10.0), rho=(1.0, 0.0), steps=(0, 10))
    lo, hi = c.spectrum(21, weight_decay=0.5)
    assert hi[0] == pytest.approx(1000.5) and hi[5] == pytest.approx(100.5) and hi[20] == pytest.approx(10.5)
    assert lo[0] == pytest.approx(-0.5) and lo[20] == pytest.approx(0.5)
    lo, hi = Curvature(beta=4.0).spectrum(3)
    assert np.all(lo == -4.0) and np.all(hi == 4.0)


def test_gradient_norm_schedule_interpolates_between_probes():
    G = gradient_norm_schedule([0, 10, 20], [100.0, 10.0, 1.0], 25)
    assert G.shape == (25,) and G[0] == 100.0 and G[5] == pytest.approx(55.0) and G[24] == 1.0


def test_smooth_form_of_lei_and_ying():
    assert smooth_generalization_bound(0.0, 10.0, 1.0) == 0.0
    assert smooth_generalization_bound(0.04, 10.0, 0.5) == pytest.approx(math.sqrt(2 * 10 * 0.5 * 0.04) + 10 * 0.04 / 2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lrs=(0.1,), batch_size=20, n_train=10), "batch_size"),
    (dict(lrs=(), batch_size=1, n_train=10), "lrs"),
    (dict(lrs=(0.1,), batch_size=1, n_train=10, momentum=1.0), "momentum"),
])
def test_bad_hyperparameters_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExpertHyperparameters(**kwargs)


def test_bad_curvature_and_regime_are_named():
    with pytest.raises(ValueError, match="beta"):
        Curvature(beta=0.0)
    with pytest.raises(ValueError, match="rho"):
        Curvature(beta=1.0, rho=-2.0)
    with pytest.raises(ValueError, match="regime"):
        amplification(ExpertHyperparameters.constant(0.1, 3, 1, 10), Curvature(1.0), regime="convex")
    with pytest.raises(ValueError, match="gradient_norm"):
        expert_stability(ExpertHyperparameters.constant(0.1, 3, 1, 10), [1.0, 2.0], Curvature(1.0))


class _Identity(nn.Module):
    def forward(self, x):
        return x


def _softmax_model_and_hessian():
    torch.manual_seed(0)
    enc = nn.Linear(4, 3, bias=False)
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def loss(w):
        return nn.functional.cross_entropy(X @ w.reshape(3, 4).T, y)

    return enc, X, y, torch.autograd.functional.hessian(loss, enc.weight.detach().reshape(-1))


def test_lanczos_finds_the_extreme_eigenvalues_of_a_linear_softmax_model():
    enc, X, y, H = _softmax_model_and_hessian()
    eig = torch.linalg.eigvalsh(H)
    lam_max, lam_min = hessian_extreme_eigenvalues(enc, _Identity(), X, y, iters=8)  # 8 of the 12 dimensions
    assert lam_max == pytest.approx(float(eig.max()), rel=1e-3)
    assert lam_min == pytest.approx(float(eig.min()), abs=1e-3 * float(eig.max()))  # softmax CE: min ~ 0
    # Ritz values lie inside the spectrum, also after few steps
    few = hessian_extremes(enc, _Identity(), X, y, iters=3)
    assert float(eig.min()) - 1e-6 <= few.lambda_min <= few.lambda_max <= float(eig.max()) + 1e-6


def test_the_ritz_residuals_say_how_far_the_estimates_had_settled():
    enc, X, y, H = _softmax_model_and_hessian()
    eig = torch.linalg.eigvalsh(H).double().numpy()
    for iters in (2, 3, 5):
        r = hessian_extremes(enc, _Identity(), X, y, iters=iters)
        # some eigenvalue lies within the residual of each estimate, and the residuals shrink as steps are added
        for lam, res in ((r.lambda_max, r.residual_max), (r.lambda_min, r.residual_min)):
            assert np.abs(eig - lam).min() <= res * (1 + 1e-4) + 1e-6
    early, later = (hessian_extremes(enc, _Identity(), X, y, iters=k) for k in (2, 5))
    assert later.residual_max < early.residual_max / 2 and later.residual_min < early.residual_min / 2
    # 12 steps span the 12-dimensional space: the Krylov space is invariant and the estimates exact
    full = hessian_extremes(enc, _Identity(), X, y, iters=12)
    floor = torch.finfo(torch.float32).eps * float(eig.max())  # no residual below the products' rounding
    assert full.residual_max == pytest.approx(floor) and full.residual_min == pytest.approx(floor)
    assert full.lambda_max == pytest.approx(float(eig.max()), rel=1e-5)
    one = hessian_extremes(enc, _Identity(), X, y, iters=1)  # one step: both ends are the start's Rayleigh quotient
    assert one.lambda_max == one.lambda_min and one.residual_max > 0
    with pytest.raises(ValueError, match="iters=0"):
        hessian_extremes(enc, _Identity(), X, y, iters=0)


def test_lanczos_extremes_on_a_known_spectrum():
    d = torch.linspace(-1.0, 10.0, 500)
    start = torch.randn(500, generator=torch.Generator().manual_seed(0))
    theta, residual = lanczos_extremes(lambda v: d * v, start, 40)
    assert theta.shape == residual.shape == (40,) and np.all(np.diff(theta) >= 0)
    assert theta[0] == pytest.approx(-1.0, abs=residual[0] + 1e-5) and theta[-1] == pytest.approx(10.0, abs=residual[-1] + 1e-5)
    assert residual[0] < 0.1 and residual[-1] < 0.1  # 40 steps settle both ends of a 500-dimensional spectrum
    for th, r in zip(theta, residual):  # every Ritz value has an eigenvalue within its residual
        assert float((d.double() - th).abs().min()) <= r * (1 + 1e-4) + 1e-5
    # a start vector inside a 3-dimensional invariant subspace: the run stops after 3 steps with exact eigenvalues
    inside = torch.zeros(500)
    inside[[0, 250, 499]] = 1.0
    theta, residual = lanczos_extremes(lambda v: d * v, inside, 10)
    np.testing.assert_allclose(theta, d[[0, 250, 499]].double().numpy(), atol=1e-5)
    np.testing.assert_allclose(residual, torch.finfo(torch.float32).eps * 10.0, rtol=1e-5)  # the rounding floor
    # the floor follows the dtype: in float64 it is 2**29 times lower
    theta, residual = lanczos_extremes(lambda v: d.double() * v, inside.double(), 10)
    np.testing.assert_allclose(residual, torch.finfo(torch.float64).eps * 10.0, rtol=1e-5)
    with pytest.raises(ValueError, match="steps=0"):
        lanczos_extremes(lambda v: d * v, start, 0)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_extremes(lambda v: d * v, torch.zeros(500), 3)


def test_per_example_gradient_norms_match_a_loop():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    norms = per_example_gradient_norms(enc, _Identity(), X, y, chunk=4)
    loop = []
    for i in range(6):
        grads = torch.autograd.grad(nn.functional.cross_entropy(enc(X[i:i + 1]), y[i:i + 1]), list(enc.parameters()))
        loop.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    assert torch.allclose(norms, torch.stack(loop), rtol=1e-5)


def test_control_variate_gap_removes_the_noise_shared_with_the_reference():
    """Per-example losses = reference losses (heavy noise, same on both models) + a true shift on test."""
    
    g = torch.Generator().manual_seed(0)
    raw, adjusted = [], []
    for _ in range(200):
        ref_tr, ref_te = 10 * torch.rand(500, generator=g) ** 3 * 5, 10 * torch.rand(500, generator=g) ** 3 * 5
        tr = 0.5 * ref_tr + 0.05 * torch.randn(500, generator=g)
        te = 0.5 * ref_te + 0.05 * torch.randn(500, generator=g) + 0.1  # true gap 0.1
        gap, c = control_variate_gap(tr, te, ref_tr, ref_te)
        adjusted.append(gap)
        raw.append(float(te.mean() - tr.mean()))
        assert c == pytest.approx(0.5, abs=0.02)
    assert np.mean(adjusted) == pytest.approx(0.1, abs=0.01)
    assert np.std(adjusted) < 0.1 * np.std(raw)


class SpareEncoderBench:
    """A stand-in benchmark whose encoders are linear maps of a given width; counts the ones it builds."""

    device = torch.device("cpu")

    def __init__(self, width: int) -> None:
        self.width, self.built = width, 0

    def new_encoder(self) -> nn.Module:
        self.built += 1
        return nn.Linear(self.width, 2)


def test_the_spare_encoder_is_reused_for_one_benchmark_and_rebuilt_for_another():
    
    first, second = SpareEncoderBench(3), SpareEncoderBench(5)
    state = nn.Linear(3, 2).state_dict()
    enc = _encoder(first, state)
    assert _encoder(first, nn.Linear(3, 2).state_dict()) is enc and first.built == 1
    assert torch.equal(_encoder(first, state).weight, state["weight"])
    other = _encoder(second, nn.Linear(5, 2).state_dict())
    assert other.weight.shape == (2, 5) and second.built == 1
    _encoder(first, state)  # back to the first benchmark: its own architecture again
    assert first.built == 2


class ProbeBench:
    """A stand-in benchmark for :func:`measure_merge`: a linear encoder; every training and test example is
    the zero image of class 0, every validation example the image of fives of class 2."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.heads = {"t": _Identity()}
        zero, five = torch.zeros(40, 4), torch.full((10, 4), 5.0)
        self.data = {"train": (zero, torch.zeros(40, dtype=torch.long)), "test": (zero[:20], torch.zeros(20, dtype=torch.long)),
                     "val": (five, torch.full((10,), 2, dtype=torch.long))}

    def new_encoder(self) -> nn.Module:
        return nn.Linear(4, 3)

    def eval_features(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return encoder(images).float()

    def split(self, task: str, split: str = "train"):
        return self.data[split]

    def images(self, task: str, split: str, indices) -> torch.Tensor:
        return self.data[split][0][torch.as_tensor(indices, dtype=torch.long)]


def test_the_lipschitz_probe_weighs_seen_and_unseen_examples_alike():
    """L_k is the mean per-example gradient norm over ``probe_size`` examples the expert saw and as many
    validation examples: seen examples alone (fitted, few) understate the norm over the task's data."""
    from mergelab.analysis.generalization import measure_merge

    torch.manual_seed(0)
    bench, enc = ProbeBench(), nn.Linear(4, 3)
    seen_norm = float(per_example_gradient_norms(enc, _Identity(), torch.zeros(1, 4), torch.tensor([0]))[0])
    val_norm = float(per_example_gradient_norms(enc, _Identity(), torch.full((1, 4), 5.0), torch.tensor([2]))[0])
    assert val_norm > 5 * seen_norm
    m = measure_merge(bench, enc.state_dict(), {"t": FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)}, probe_size=4)
    assert m["lipschitz"]["t"] == pytest.approx((seen_norm + val_norm) / 2, rel=1e-5)
    assert "lipschitz" not in measure_merge(bench, enc.state_dict(), {"t": FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)})


class StoreBench(ProbeBench):
    """:class:`ProbeBench` with evaluation keys and a cache folder, as the benchmarks have."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder, self.key_suffix = folder, ""

    def _eval_key(self, task: str, split: str) -> str:
        return f"{task}-{split}{self.key_suffix}"

    def _eval_path(self, digest: str):
        return self.folder / "eval" / digest[:2] / f"{digest}.json"


def test_a_merge_measured_again_reads_its_per_example_results_and_they_are_the_same(tmp_path, monkeypatch):
    """Chapter 01 measures hundreds of merges; a re-run reads each one's per-example losses and Lipschitz
    probe from disk (keyed by the weights, the evaluation key and the rows) instead of computing them."""
    from mergelab.analysis import generalization
    from mergelab.analysis.generalization import measure_merge

    torch.manual_seed(0)
    bench, enc = StoreBench(tmp_path), nn.Linear(4, 3)
    cfg = {"t": FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)}
    first = measure_merge(bench, enc.state_dict(), cfg, probe_size=4)
    calls = []
    real = generalization.per_example_losses
    monkeypatch.setattr(generalization, "per_example_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(generalization, "per_example_gradient_norms", lambda *a, **k: calls.append(1) / 0)
    again = measure_merge(bench, enc.state_dict(), cfg, probe_size=4)
    assert calls == [] and again == first  # nothing computed, the very same figures
    bench.key_suffix = "-other-head"  # another evaluation key (head, data, device, code): measured anew
    assert measure_merge(bench, enc.state_dict(), cfg)["train_loss"] == first["train_loss"] and len(calls) == 2
    other = nn.Linear(4, 3)
    measure_merge(bench, other.state_dict(), cfg)  # other weights: measured
    assert len(calls) == 4
    for f in tmp_path.rglob("*.examples.json"):
        f.write_text("{not json")
    measure_merge(bench, other.state_dict(), cfg)  # an unreadable file is measured again, not an error
    assert len(calls) == 6


def test_the_lipschitz_probe_is_measured_again_when_its_validation_rows_change(tmp_path, monkeypatch):
    """The probe reads training and validation rows: at the clip size each split has its own data fingerprint, so
    validation images rewritten in place (a new validation key, the training key unchanged) are probed anew, and
    the losses, on training and test rows only, are read back."""
    from mergelab.analysis import generalization
    from mergelab.analysis.generalization import measure_merge

    torch.manual_seed(0)

    class ValChanged(StoreBench):
        def _eval_key(self, task: str, split: str) -> str:
            return f"{task}-{split}" + (self.key_suffix if split == "val" else "")

    bench, enc = ValChanged(tmp_path), nn.Linear(4, 3)
    cfg = {"t": FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)}
    measure_merge(bench, enc.state_dict(), cfg, probe_size=4)
    probes, losses = [], []
    real_norms, real_losses = generalization.per_example_gradient_norms, generalization.per_example_losses
    monkeypatch.setattr(generalization, "per_example_gradient_norms", lambda *a, **k: probes.append(1) or real_norms(*a, **k))
    monkeypatch.setattr(generalization, "per_example_losses", lambda *a, **k: losses.append(1) or real_losses(*a, **k))
    measure_merge(bench, enc.state_dict(), cfg, probe_size=4)
    assert probes == [] and losses == []
    bench.key_suffix = "-rewritten"
    measure_merge(bench, enc.state_dict(), cfg, probe_size=4)
    assert probes == [1] and losses == []


def test_a_merge_writes_its_per_example_results_once_and_keeps_them_when_a_later_task_fails(tmp_path, monkeypatch):
    """Each merge's measurements go to disk in one write (encoding the growing file after each of them cost a
    third of chapter 01's time); what was measured before a failure is written all the same."""
    from mergelab.analysis import generalization
    from mergelab.analysis.generalization import measure_merge

    torch.manual_seed(0)
    bench, enc = StoreBench(tmp_path), nn.Linear(4, 3)
    bench.heads["u"] = _Identity()
    cfg = FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)
    writes = []
    real = generalization.atomic_write_json
    monkeypatch.setattr(generalization, "atomic_write_json", lambda *a, **k: writes.append(a[0]) or real(*a, **k))
    measure_merge(bench, enc.state_dict(), {"t": cfg, "u": cfg}, probe_size=4)
    assert len(writes) == 1 and len(generalization.read_json(writes[0], {})) == 6  # 2 tasks x (train, test, probe)
    measure_merge(bench, enc.state_dict(), {"t": cfg, "u": cfg}, probe_size=4)
    assert len(writes) == 1  # all cached: nothing to write
    other = nn.Linear(4, 3)
    with pytest.raises(KeyError):  # no head for the second task
        measure_merge(bench, other.state_dict(), {"t": cfg, "no such task": cfg})
    assert len(writes) == 2 and len(generalization.read_json(writes[1], {})) == 2  # task t's losses kept


def _reference_ritz(A: np.ndarray, v: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh-Ritz on the Krylov space K_steps(A, v) from an explicit orthonormal basis (float64, Gram-Schmidt
    twice): the Ritz values and each Ritz vector's true residual ||A x - theta x||."""
    Q = [v / np.linalg.norm(v)]
    for _ in range(steps - 1):
        w = A @ Q[-1]
        for _ in range(2):
            w = w - np.stack(Q).T @ (np.stack(Q) @ w)
        Q.append(w / np.linalg.norm(w))
    Q = np.stack(Q).T
    theta, S = np.linalg.eigh(Q.T @ A @ Q)
    X = Q @ S
    return theta, np.linalg.norm(A @ X - X * theta, axis=0)


def test_lanczos_residuals_are_the_ritz_vectors_true_residuals():
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    A = (U * np.linspace(-3.0, 7.0, 80) ** 3) @ U.T  # cubed: the extremes stand apart, the bulk is dense
    v = rng.standard_normal(80)
    theta, residual = lanczos_extremes(lambda x: torch.from_numpy(A) @ x, torch.from_numpy(v), 12)
    ref_theta, ref_residual = _reference_ritz(A, v, 12)
    np.testing.assert_allclose(theta, ref_theta, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(residual, ref_residual, rtol=1e-6)
    assert residual[-1] < 0.1 * residual[len(residual) // 2]  # the extremes settle first


def test_lanczos_does_not_stop_early_on_a_small_but_real_component():
    d = torch.cat([torch.ones(10, dtype=torch.float64), torch.tensor([1000.0], dtype=torch.float64)])
    start = torch.cat([torch.ones(10, dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)])
    theta, residual = lanczos_extremes(lambda v: d * v, start, 5)
    assert theta[-1] == pytest.approx(1000.0, rel=1e-9) and theta[0] == pytest.approx(1.0, rel=1e-9)
    assert len(theta) == 2  # the two-dimensional Krylov space is invariant: the run stops after its second step
    # bfloat16 runs its basis in float32: in bfloat16 itself the first step's beta is under its rounding threshold
    half = torch.linspace(-1.0, 10.0, 500)
    start = torch.randn(500, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    theta, _ = lanczos_extremes(lambda v: half * v, start, 40)
    assert len(theta) == 40 and theta[-1] > 9.9 and theta[0] < -0.9
