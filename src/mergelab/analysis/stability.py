r"""L2 on-average model stability of fine-tuned experts and of their average, and how to measure it.

The question: experts ``x_1..x_K`` are fine-tuned from one pretrained model ``theta_0``, expert ``k``
on its own task's training set ``S_k`` of ``n_k`` examples with learning rates ``eta_{k,t}``, batch
size ``b_k``, ``T_k`` steps and heavy-ball momentum ``mu``. How far can the average
``x_avg = (1/K) sum_k x_k`` be trusted to generalize? The exact bound of the seed paper (Li, Tang et
al., 2026) is not available to us; this module derives one from Hardt, Recht & Singer (2016, HRS) and
Lei & Ying (2020), computes it, and estimates its constants from the runs.

Derivation
----------
**On-average model stability** (Lei & Ying 2020). Let ``S^(i)`` be ``S`` with example ``i`` replaced
by an independent copy ``z'_i``. An algorithm ``A`` is L2 on-average model ``eps``-stable if
``E_{S,S',A} (1/n) sum_i ||A(S^(i)) - A(S)||^2 <= eps^2``. Because ``z_i`` is not in ``S^(i)``,
``E[F(A(S)) - F_S(A(S))] = E_i E[f(A(S^(i)); z_i) - f(A(S); z_i)]``, so a loss that is ``L``-Lipschitz
near the output gives ``gap <= L E||A(S^(i)) - A(S)|| <= L eps`` (Jensen).

**One expert: divergence of two SGD runs** (HRS Lemma 2.5 and Theorem 3.12, extended to mini-batches
and momentum). Run the same algorithm on ``S`` and ``S^(i)`` with the same mini-batch indices. With
``delta_t = ||x_t - x'_t||`` and ``u_t = ||v_t - v'_t||`` (momentum buffers: ``v_{t+1} = mu v_t + g_t``,
``x_{t+1} = x_t - eta_t v_{t+1}``, PyTorch's convention), the two mini-batch gradients differ by
``H_t (x_t - x'_t)`` (``H_t`` the Hessian averaged on the segment) plus, when example ``i`` is in the
batch (indicator ``I_t``), ``(1/b)(grad f(x'_t; z_i) - grad f(x'_t; z'_i))``, of norm at most
``2 G_t / b`` with ``G_t`` a bound on per-example gradient norms at step ``t``. Hence

    u_{t+1}     <= mu u_t + ||H_t|| delta_t + I_t 2 G_t / b
    delta_{t+1} <= ||I - eta_t H_t|| delta_t + eta_t mu u_t + I_t eta_t 2 G_t / b.

If every Hessian on the path has its spectrum in ``[-rho, beta]`` then ``||H_t|| <= max(beta, rho)``
and, the matrix being symmetric, ``||I - eta H|| <= q_t = max(1 + eta_t rho, |1 - eta_t beta|)``:
``rho = beta`` (nothing known about the sign of the curvature) gives HRS's expansion ``1 + eta beta``;
``rho = 0`` and ``eta <= 2/beta`` (convex) gives HRS's non-expansive steps. The recursion is linear
with non-negative coefficients, so the divergence is at most a superposition of the injections:
``delta_T <= sum_t I_t a_t c_t`` with ``c_t = 2 G_t / b`` and the *amplification*
``a_t = [M_{T-1} ... M_{t+1} (eta_t, 1)^T]_delta``, ``M_s = [[q_s, eta_s mu], [max(beta, rho), mu]]``
(regime ``"smooth"``). With ``mu = 0``, ``a_t = eta_t prod_{s>t} q_s`` as in HRS.

Regime ``"quadratic"`` replaces the norm recursion by the exact linear dynamics of a *noisy quadratic
model* (per-example losses share one Hessian ``H`` with spectrum in ``[-rho, beta]``, the picture of
linearized fine-tuning): in each eigendirection ``(d, v) <- [[1 - eta_s lam, -eta_s mu], [lam, mu]]
(d, v)``; ``a_t`` is the largest ``|d|``-response over ``lam`` in ``[-rho, beta]`` to an injection
``(-eta_t, 1)``. It keeps the sign structure that momentum needs (the norm recursion grows
exponentially with ``mu > 0`` even for convex losses) and is exact for such quadratics.

**The mini-batch sampling and the L2 norm.** Example ``i`` is in the batch of step ``t`` with
probability ``p = b/n`` (uniform batches; also under random reshuffling, where ``E[I_s I_t] = 0 <= p^2``
within an epoch). Then ``E[(sum_t I_t w_t)^2] <= p (1 - p) sum_t w_t^2 + p^2 (sum_t w_t)^2`` for
``w_t = a_t c_t >= 0``, with equality for independent batches. So, per expert,

    eps_k^2 <= sampling_k + drift_k,
    sampling_k = (b/n)(1 - b/n) sum_t (a_t 2 G_t / b)^2 = (1 - b/n) (4 / (n b)) sum_t a_t^2 G_t^2,
    drift_k    = (b/n)^2 (sum_t a_t 2 G_t / b)^2        = ((2 / n) sum_t a_t G_t)^2.

``drift`` is HRS's term squared (summed step sizes over ``n``: independent of ``b`` at fixed ``T``);
``sampling`` is the variance of meeting the example, which shrinks with ``b``. Both shrink with ``n``
and grow with ``eta`` and ``T``.

**The average of experts.** Let the merged model be evaluated on the union of the merged tasks, its
risk the unweighted mean of the per-task risks (task ``k`` with its own head). Replacing example ``i``
of task ``k`` changes only expert ``k`` (assumption A3 below), so ``x_avg`` moves by
``(x'_k - x_k)/K``. Averaging over which task's example is replaced,

    eps_avg^2 = (1/K) sum_k eps_k^2 / K^2,     gap(x_avg) <= (1/K) sum_k L_k eps_k / K,

with ``L_k`` the Lipschitz constant of task ``k``'s loss near ``x_avg``: the stability term of the
average is the *average of the experts' terms*, shrunk by ``1/K`` because each example reaches the
average through one expert only. Heterogeneity enters only through that average: at equal mean
hyperparameters, experts whose ``eps_k`` is convex in a hyperparameter (``1/n``, or ``eta`` and
``T`` under expansion) make the heterogeneous average worse than the homogeneous one (Jensen).

**Excess risk.** ``E F(x_avg) - F(x*) = [E F(x_avg) - E F_S(x_avg)] + [E F_S(x_avg) - F(x*)]``: the
generalization gap bounded above, plus an optimization term, which for cross-entropy
(``F >= 0``) is at most the merged model's training loss; training longer shrinks each expert's
loss but grows ``eps_k`` (and the merged training loss grows when task vectors interfere).

Assumptions (each stated where it is used)
------------------------------------------
A1. Both runs of an expert share the mini-batch indices and every other random choice.
A2. Per-example gradient norms at step ``t`` are at most ``G_t`` on the perturbed trajectory; the
    loss is ``L_k``-Lipschitz between ``x_avg`` and its perturbation. We *estimate* them from probes
    (mean of per-example gradient norms; the maximum is also recorded): plug-in values, not proven
    bounds.
A3. Each expert depends only on ``theta_0``, its own task's data and its own randomness; ``theta_0``
    and the frozen heads are fixed (in ``tiny`` the heads use 8 training images per class: ignored).
A4. Hessians on the path between the two runs have spectra in ``[-rho, beta]`` (estimated by
    Lanczos on Hessian-vector products at ``theta_0`` and along trajectories; weight decay ``lambda`` adds
    ``lambda`` to the spectrum).
A5. (``"quadratic"`` only) the per-example losses share one Hessian: a model, not a bound, for a
    network.
A6. Gradient clipping at ``c`` (the public recipe clips at 1): the difference of two clipped
    gradients is at most ``min(1, c / min(||g_t||, ||g'_t||))`` times the difference of the unclipped
    ones (the radial projection onto a ball of radius ``r <= ||g||, ||g'||`` is non-expansive), so a
    clipped run is bounded as SGD with learning rates ``eta_t min(1, c / ||g_t||)``, taking the
    perturbed run's batch-gradient norm ``||g'_t||`` equal to the recorded ``||g_t||`` (plug-in).
A7. Example ``i`` is met at step ``t`` with probability ``b/n``, with ``E[I_s I_t] <= (b/n)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..training import FinetuneConfig, lr_at

REGIMES = ("smooth", "quadratic")
"""``"smooth"``: worst case over beta-smooth losses with curvature in ``[-rho, beta]`` (HRS-style
norm recursion); ``"quadratic"``: exact dynamics of a noisy quadratic model with that spectrum."""


# ----------------------------------------------------------------------------- hyperparameters
@dataclass(frozen=True)
class ExpertHyperparameters:
    """What the bound needs to know about one expert's fine-tuning run.

    Attributes:
        lrs: learning rate ``eta_t`` of every optimizer step, length ``T``.
        batch_size: examples per step ``b`` (at most ``n_train``).
        n_train: training examples the expert saw, ``n``.
        momentum: heavy-ball momentum ``mu`` in ``[0, 1)`` (PyTorch convention).
        weight_decay: L2 coefficient ``lambda`` (adds ``lambda`` to the curvature).
    """

    lrs: tuple[float, ...]
    batch_size: int
    n_train: int
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if len(self.lrs) == 0 or any(not (lr >= 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs[:5]!r}... is not valid; use one finite, non-negative learning "
                             "rate per step (at least one step).")
        if not isinstance(self.n_train, (int, np.integer)) or self.n_train < 1:
            raise ValueError(f"n_train={self.n_train!r} is not valid; use a positive number of examples.")
        if not isinstance(self.batch_size, (int, np.integer)) or not 1 <= self.batch_size <= self.n_train:
            raise ValueError(f"batch_size={self.batch_size!r} is not valid; use 1..n_train={self.n_train}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum!r} is not valid; use a value in [0, 1).")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} is not valid; use a value >= 0.")

    @property
    def num_steps(self) -> int:
        """``T``."""
        return len(self.lrs)

    @classmethod
    def constant(cls, lr: float, num_steps: int, batch_size: int, n_train: int, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> "ExpertHyperparameters":
        """A run with a constant learning rate ``lr`` for ``num_steps`` steps."""
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} is not valid; use a positive integer.")
        return cls((float(lr),) * int(num_steps), int(batch_size), int(n_train), momentum, weight_decay)

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, n_task_train: int, num_steps: int | None = None,
                    batch_gradient_norms: Sequence[float] | None = None) -> "ExpertHyperparameters":
        """From a :class:`~mergelab.training.FinetuneConfig` of a single-task expert.

        Args:
            cfg: the expert's recipe; its schedule gives ``eta_t`` (:func:`~mergelab.training.lr_at`),
                its ``data_fraction`` the examples seen, ``ceil(data_fraction * n_task_train)``.
            n_task_train: size of the task's full training split.
            num_steps: steps actually taken (a snapshot of a longer run); default ``cfg.num_steps``.
                The snapshot of a constant-schedule run at step ``s`` is the run with ``num_steps = s``.
            batch_gradient_norms: with ``cfg.grad_clip = c > 0``, the unclipped mini-batch gradient norm
                of every step (recorded by :func:`mergelab.training.sweep.sweep`). Clipping rescales step ``t``'s
                gradient by ``s_t = min(1, c / ||g_t||)``, and the difference of two clipped gradients is
                at most ``c / min(||g_t||, ||g'_t||)`` times the difference of the unclipped ones (the
                radial projection onto a ball of radius ``r`` is non-expansive), so the run is bounded as
                SGD with learning rates ``eta_t s_t``, taking ``||g'_t|| ~ ||g_t||`` (plug-in, A6).
                Without them, clipping is ignored (``s_t = 1``: valid, looser).
        """
        steps = cfg.num_steps if num_steps is None else int(num_steps)
        if not 1 <= steps <= cfg.num_steps:
            raise ValueError(f"num_steps={num_steps!r} is not valid; use 1..cfg.num_steps={cfg.num_steps}.")
        if cfg.optimizer != "sgd":
            raise ValueError(f"cfg.optimizer={cfg.optimizer!r}: the bound is derived for SGD (with momentum); "
                             "use optimizer='sgd'.")
        n = max(1, math.ceil(cfg.data_fraction * n_task_train))
        lrs = np.array([lr_at(t, cfg) for t in range(steps)])
        if cfg.grad_clip > 0 and batch_gradient_norms is not None:
            norms = np.asarray(batch_gradient_norms, dtype=np.float64)
            if norms.shape[0] < steps:
                raise ValueError(f"batch_gradient_norms has {norms.shape[0]} values; need one per step ({steps}).")
            lrs = lrs * np.minimum(1.0, cfg.grad_clip / np.maximum(norms[:steps], 1e-12))
        return cls(tuple(float(v) for v in lrs), min(cfg.batch_size, n), n, cfg.momentum, cfg.weight_decay)


@dataclass(frozen=True)
class Curvature:
    """Curvature constants of assumption A4: the Hessians on the path have spectrum in ``[-rho, beta]``.

    Constant, or a schedule measured at a few steps (``steps``) and interpolated in between (``beta``
    log-linearly, ``rho`` linearly; constant beyond the ends): sharpness falls fast in the first steps
    of fine-tuning, so one value from ``theta_0`` would overstate it for the rest of the run.

    Attributes:
        beta: smoothness, the largest Hessian eigenvalue (``> 0``); a float or one value per step in
            ``steps``.
        rho: ``-lambda_min``: the negative-curvature magnitude when positive, ``0`` for convex losses,
            negative (down to ``-beta``) for strongly convex ones; ``None`` means unknown, i.e.
            ``rho = beta`` (the general non-convex case of HRS).
        steps: the steps at which ``beta`` and ``rho`` were measured (``0`` = ``theta_0``), increasing;
            ``None`` for constants.
    """

    beta: float | tuple[float, ...]
    rho: float | tuple[float, ...] | None = None
    steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = None if self.steps is None else len(self.steps)
        betas = np.atleast_1d(np.asarray(self.beta, dtype=np.float64))
        if (n is None and betas.size != 1) or (n is not None and betas.shape != (n,)):
            raise ValueError(f"beta={self.beta!r} is not valid; use one value, or one per step in steps={self.steps}.")
        if np.any(~(betas > 0)) or np.any(~np.isfinite(betas)):
            raise ValueError(f"beta={self.beta!r} is not valid; use positive, finite smoothness constants.")
        if n is not None and (n == 0 or np.any(np.diff(self.steps) <= 0)):
            raise ValueError(f"steps={self.steps!r} is not valid; use strictly increasing step counts.")
        if self.rho is not None:
            rhos = np.atleast_1d(np.asarray(self.rho, dtype=np.float64))
            if rhos.shape != betas.shape or np.any(~np.isfinite(rhos)) or np.any(rhos < -betas):
                raise ValueError(f"rho={self.rho!r} is not valid; use finite values >= -beta (negative: strongly "
                                 "convex), shaped like beta, or None for rho = beta.")

    def spectrum(self, num_steps: int, weight_decay: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """``(lam_min_t, lam_max_t)`` for ``t = 0..num_steps-1``, shape ``(T,)`` each, weight decay added:
        ``(-rho_t + lambda, beta_t + lambda)``."""
        t = np.arange(num_steps, dtype=np.float64)
        beta = np.asarray(self.beta, dtype=np.float64)
        rho = beta if self.rho is None else np.asarray(self.rho, dtype=np.float64)
        if self.steps is None:
            hi, lo = np.full(num_steps, float(beta)), np.full(num_steps, -float(rho))
        else:
            steps = np.asarray(self.steps, dtype=np.float64)
            hi = np.exp(np.interp(t, steps, np.log(beta)))
            lo = -np.interp(t, steps, rho)
        return lo + weight_decay, hi + weight_decay


# ----------------------------------------------------------------------------- the bound
def amplification(hp: ExpertHyperparameters, curvature: Curvature, regime: str = "quadratic",
                  grid_size: int = 513) -> np.ndarray:
    """Amplification ``a_t`` (shape ``(T,)``): how much a unit gradient difference injected at step ``t``
    can move the final parameters, ``delta_T <= sum_t I_t a_t c_t``.

    Args:
        hp: the expert's run.
        curvature: spectrum bounds ``[-rho_t, beta_t]`` (A4).
        regime: ``"smooth"``: norm recursion ``M_s = [[q_s, eta_s mu], [||H||, mu]]``, valid for any loss
            with that curvature (with ``rho = beta`` and ``momentum = 0`` it is HRS's
            ``eta_t prod_{s>t} (1 + eta_s beta)``); ``"quadratic"``: exact dynamics of a noisy quadratic
            model, the supremum over eigendirections whose eigenvalue keeps its relative place
            ``u`` in the spectrum, ``lam_s = lam_min_s + u (lam_max_s - lam_min_s)``, over ``grid_size``
            values of ``u`` in ``[0, 1]`` (exact for a constant spectrum).
    """
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r} is not valid; use one of {', '.join(REGIMES)}.")
    lrs = np.asarray(hp.lrs, dtype=np.float64)
    mu = hp.momentum
    T = len(lrs)
    lo, hi = curvature.spectrum(T, hp.weight_decay)
    a = np.empty(T)
    with np.errstate(over="ignore", invalid="ignore"):
        if regime == "smooth":
            r = np.array([1.0, 0.0])  # row vector selecting delta_T
            for t in range(T - 1, -1, -1):
                a[t] = r[0] * lrs[t] + r[1]
                q = max(abs(1.0 - lrs[t] * lo[t]), abs(1.0 - lrs[t] * hi[t]))  # ||I - eta H||, H symmetric
                m = np.array([[q, lrs[t] * mu], [max(abs(lo[t]), abs(hi[t])), mu]])
                r = r @ m
        else:
            u = np.linspace(0.0, 1.0, grid_size)
            if np.all(lo == lo[0]) and np.all(hi == hi[0]) and lo[0] < 0 < hi[0]:
                u = np.unique(np.append(u, -lo[0] / (hi[0] - lo[0])))  # include the flat direction
            r0, r1 = np.ones_like(u), np.zeros_like(u)  # row vectors (r0, r1) per direction
            for t in range(T - 1, -1, -1):
                a[t] = np.max(np.abs(-lrs[t] * r0 + r1))
                lam = lo[t] + u * (hi[t] - lo[t])
                # r <- r @ [[1 - eta lam, -eta mu], [lam, mu]]
                r0, r1 = r0 * (1 - lrs[t] * lam) + r1 * lam, -lrs[t] * mu * r0 + mu * r1
    return np.where(np.isnan(a), np.inf, a)


def _per_step(values: float | Sequence[float] | np.ndarray, T: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(T, float(arr))
    if arr.shape != (T,):
        raise ValueError(f"{name} has shape {arr.shape}; use a scalar or one value per step, shape ({T},).")
    if np.any(~np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0; got min {arr.min()!r}.")
    return arr


@dataclass(frozen=True)
class StabilityTerms:
    """The two terms of one expert's squared L2 on-average model stability.

    Attributes:
        sampling: ``(b/n)(1 - b/n) sum_t (a_t 2 G_t / b)^2``: variance of meeting the replaced example.
        drift: ``((2/n) sum_t a_t G_t)^2``: HRS's expected divergence, squared.
        hp: the run the terms are for.
    """

    sampling: float
    drift: float
    hp: ExpertHyperparameters | None = field(default=None, repr=False, compare=False)

    @property
    def l2(self) -> float:
        """``eps^2 = sampling + drift``, the bound on ``E ||A(S^(i)) - A(S)||^2``."""
        return self.sampling + self.drift

    @property
    def epsilon(self) -> float:
        """``eps = sqrt(eps^2)`` (parameter-space units)."""
        return math.sqrt(self.l2)


def expert_stability(hp: ExpertHyperparameters, gradient_norm: float | Sequence[float],
                     curvature: Curvature, regime: str = "quadratic") -> StabilityTerms:
    """Squared L2 on-average model stability of one expert (see the module docstring).

    Args:
        hp: the expert's run ``(eta_t, T, b, n, mu, lambda)``.
        gradient_norm: ``G``, a bound on per-example gradient norms, constant or one value per step
            ``(T,)`` (``G_t`` at the parameters *before* step ``t``).
        curvature: ``[-rho, beta]`` (A4).
        regime: ``"quadratic"`` or ``"smooth"`` (see :func:`amplification`).
    """
    G = _per_step(gradient_norm, hp.num_steps, "gradient_norm")
    a = amplification(hp, curvature, regime)
    b, n = hp.batch_size, hp.n_train
    p = b / n
    w = a * 2.0 * G / b
    with np.errstate(over="ignore", invalid="ignore"):
        sampling = float(p * (1 - p) * np.sum(w ** 2))
        drift = float((p * np.sum(w)) ** 2)
    return StabilityTerms(sampling, drift, hp)


def averaged_stability(terms: Sequence[StabilityTerms]) -> StabilityTerms:
    """Squared L2 stability of ``x_avg = (1/K) sum_k x_k`` w.r.t. replacing one example of one task.

    Each example moves only its own expert, by at most ``eps_k``, so ``x_avg`` moves by ``eps_k / K``;
    averaged over the task whose example is replaced: ``(1/K) sum_k (terms_k) / K^2``.
    """
    if not terms:
        raise ValueError("terms is empty; pass one StabilityTerms per merged expert.")
    K = len(terms)
    return StabilityTerms(sum(t.sampling for t in terms) / K ** 3, sum(t.drift for t in terms) / K ** 3)


def generalization_bound(terms: Sequence[StabilityTerms], lipschitz: float | Sequence[float]) -> float:
    """Bound on the expected generalization gap of ``x_avg`` on the union of the merged tasks.

    ``gap <= (1/K) sum_k L_k eps_k / K`` (Lipschitz form of Lei & Ying 2020, Theorem 2(a), applied
    task by task; ``eps_k`` the L2 stability, which also bounds the L1 one).

    Args:
        terms: each merged expert's :class:`StabilityTerms` (``K`` of them; ``K = 1`` is one expert).
        lipschitz: ``L_k``, the per-example gradient norm of task ``k``'s loss near ``x_avg``: one
            value for all tasks or one per expert.
    """
    K = len(terms)
    if K == 0:
        raise ValueError("terms is empty; pass one StabilityTerms per merged expert.")
    L = np.broadcast_to(np.asarray(lipschitz, dtype=np.float64), (K,)) if np.ndim(lipschitz) == 0 \
        else np.asarray(lipschitz, dtype=np.float64)
    if L.shape != (K,) or np.any(L < 0):
        raise ValueError(f"lipschitz must be >= 0, a scalar or one value per expert ({K}); got {lipschitz!r}.")
    return float(np.sum(L * np.array([t.epsilon for t in terms])) / K ** 2)


def smooth_generalization_bound(eps2: float, beta: float, train_loss: float) -> float:
    """Lei & Ying (2020), Theorem 2(b), optimized over ``gamma``: for a non-negative, beta-smooth loss,
    ``gap <= (beta/gamma) F_S + (beta + gamma)/2 eps^2``, minimal at ``gamma = sqrt(2 beta F_S) / eps``:
    ``gap <= sqrt(2 beta F_S) eps + beta eps^2 / 2``. Needs no Lipschitz constant."""
    if eps2 < 0 or beta <= 0 or train_loss < 0:
        raise ValueError(f"eps2={eps2!r}, beta={beta!r}, train_loss={train_loss!r}: use eps2 >= 0, beta > 0, "
                         "train_loss >= 0.")
    return math.sqrt(2 * beta * train_loss * eps2) + beta * eps2 / 2


def gradient_norm_schedule(probe_steps: Sequence[int], probe_values: Sequence[float], num_steps: int
                           ) -> np.ndarray:
    """``G_t`` for ``t = 0..num_steps-1``, linearly interpolated between probes.

    Args:
        probe_steps: steps at which per-example gradient norms were measured (``0`` = ``theta_0``,
            ``s`` = after ``s`` optimizer steps), increasing.
        probe_values: the measured value at each probe (e.g. the mean per-example norm).
        num_steps: ``T``; steps beyond the last probe keep its value.
    """
    steps = np.asarray(probe_steps, dtype=np.float64)
    vals = np.asarray(probe_values, dtype=np.float64)
    if steps.ndim != 1 or steps.shape != vals.shape or len(steps) == 0 or np.any(np.diff(steps) <= 0):
        raise ValueError(f"probe_steps={list(probe_steps)} and probe_values must be equally long and "
                         "probe_steps strictly increasing.")
    return np.interp(np.arange(num_steps, dtype=np.float64), steps, vals)


