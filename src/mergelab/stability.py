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
    Hessian-vector power iteration at ``theta_0`` and along trajectories; weight decay ``lambda`` adds
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
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .training import FinetuneConfig, lr_at, training_indices
from .utils import StateDict

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
                of every step (recorded by :func:`mergelab.sweep.sweep`). Clipping rescales step ``t``'s
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


# ----------------------------------------------------------------------------- constants from runs
def _loss_fn(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(encoder(X)), y)


def per_example_gradient_norms(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                               chunk: int = 32) -> torch.Tensor:
    """``||grad_theta CE(head(encoder(x_j)), y_j)||`` for every example, over the encoder's trainable
    parameters, shape ``(N,)``. Uses ``torch.func.vmap`` in chunks; the model is not modified."""
    from torch.func import functional_call, grad, vmap

    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X has {len(X)} examples and y {len(y)}; pass the same, non-zero number.")
    was_training = encoder.training
    encoder.eval()
    params = {k: v.detach() for k, v in encoder.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in encoder.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(encoder, {**p, **buffers}, (x[None],))
        return F.cross_entropy(head(out), t[None])

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    norms = []
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        for i in range(0, len(X), chunk):
            g = per_grad(params, X[i:i + chunk], y[i:i + chunk])
            norms.append(torch.sqrt(sum((v.reshape(v.shape[0], -1).float() ** 2).sum(1) for v in g.values())))
    encoder.train(was_training)
    return torch.cat(norms).detach()


def _hvp(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
         params: list[torch.Tensor], vec: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        loss = _loss_fn(encoder, head, X, y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=vec)]


def hessian_extreme_eigenvalues(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                                iters: int = 10, seed: int = 0) -> tuple[float, float]:
    """``(lam_max, lam_min)`` of the Hessian of the mean cross-entropy on ``(X, y)`` w.r.t. the encoder's
    trainable parameters, by power iteration on Hessian-vector products (double backward).

    ``lam_max`` is the eigenvalue of largest magnitude (the top one for losses whose negative
    curvature is small, as here); ``lam_min`` comes from power iteration on ``H - lam_max I``.
    ``iters`` products each: a few iterations give the order of magnitude, which is what A4 needs.
    """
    if iters < 1:
        raise ValueError(f"iters={iters!r} is not valid; use a positive number of power iterations.")
    was_training = encoder.training
    encoder.eval()
    params = [p for p in encoder.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)

    def normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
        norm = torch.sqrt(sum((x ** 2).sum() for x in v))
        return [x / norm for x in v]

    def power(shift: float) -> float:
        # drawn on the CPU, so the start vectors are the same on any device
        v = normalize([torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params])
        lam = 0.0
        for _ in range(iters):
            hv = [h - shift * x for h, x in zip(_hvp(encoder, head, X, y, params, v), v)]
            lam = float(sum((h * x).sum() for h, x in zip(hv, v)))
            v = normalize(hv)
        return lam + shift

    lam_max = power(0.0)
    lam_min = power(lam_max)
    encoder.train(was_training)
    return (max(lam_max, lam_min), min(lam_max, lam_min))


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


# ----------------------------------------------------------------------------- measurement
def head_example_indices(bench: Any, task: str) -> torch.Tensor:
    """Training examples the frozen head of ``task`` was built from (``head_shots`` per class), by the
    rule of :attr:`mergelab.benchmark.TinyBenchmark.heads`: the first of each class in a permutation
    seeded with 0. They are excluded from the measured training loss: the head fits them, so on them
    every model (the pretrained one included) looks better than on fresh data (assumption A3)."""
    _, y = bench.split(task, "train")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shots = getattr(getattr(bench, "config", None), "head_shots", 0)
    picked = [order[y[order] == c][:shots] for c in range(int(y.max()) + 1)] if shots else []
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def _eval_subset(n: int, max_examples: int | None, seed: int) -> torch.Tensor:
    if max_examples is None or n <= max_examples:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values


_SPARE: tuple[weakref.ReferenceType, nn.Module] | None = None
"""The spare encoder of the benchmark last measured, with a weak reference to that benchmark (not
its ``id``, which a later benchmark may reuse once the first is gone)."""


def _encoder(bench: Any, state: StateDict) -> nn.Module:
    """One reusable encoder module for the benchmark, loaded with ``state`` (building a ViT per call is slow)."""
    from .models import load_encoder_state

    global _SPARE
    if _SPARE is None or _SPARE[0]() is not bench:
        _SPARE = (weakref.ref(bench), bench.new_encoder())
    return load_encoder_state(_SPARE[1], state).to(bench.device)


@torch.no_grad()
def per_example_losses(bench: Any, state: StateDict, task: str, X: torch.Tensor, y: torch.Tensor,
                       batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (nats) and correctness of encoder ``state`` on every example of ``(X, y)`` with
    ``task``'s frozen head: two ``(N,)`` tensors (float, bool)."""
    enc = _encoder(bench, state).eval()
    head = bench.heads[task].to(bench.device)
    losses, correct = [], []
    for i in range(0, len(y), batch_size):
        logits = head(enc(X[i:i + batch_size].to(bench.device)))
        yy = y[i:i + batch_size].to(bench.device)
        losses.append(F.cross_entropy(logits, yy, reduction="none").cpu())
        correct.append((logits.argmax(-1) == yy).cpu())
    return torch.cat(losses), torch.cat(correct)


def control_variate_gap(train: torch.Tensor, test: torch.Tensor, ref_train: torch.Tensor, ref_test: torch.Tensor
                        ) -> tuple[float, float]:
    """Generalization gap ``mean(test) - mean(train)`` with a control variate: a reference model measured
    on the same examples, independent of the training data, so that its gap has expectation zero.

    Returns ``(gap - c * ref_gap, c)`` with ``c = cov(loss, ref_loss) / var(ref_loss)`` over the pooled
    examples (train and test together, so that ``c`` does not depend on the split): the
    variance-minimizing coefficient. With losses of several nats per example, the raw gap's sampling
    noise (tenths of a nat for a thousand examples) is larger than the gap; the reference removes the
    part of it that the two models share.
    """
    loss = torch.cat([train, test]).double()
    ref = torch.cat([ref_train, ref_test]).double()
    var = float(ref.var())
    c = float(((loss - loss.mean()) * (ref - ref.mean())).mean() / var) if var > 0 else 0.0
    gap = float(test.double().mean() - train.double().mean())
    ref_gap = float(ref_test.double().mean() - ref_train.double().mean())
    return gap - c * ref_gap, c


def measure_merge(bench: Any, state: StateDict, experts: Mapping[str, FinetuneConfig],
                  max_examples: int | None = None, probe_size: int = 0, seed: int = 0,
                  reference: StateDict | None = None, reference_cache: dict | None = None) -> dict[str, Any]:
    """Generalization of a merged model on the union of the merged tasks.

    Args:
        bench: the benchmark (``split``, ``images``, ``heads``, ``new_encoder``, ``device``).
        state: the merged encoder.
        experts: task -> the config of the expert merged for it (gives the examples it saw).
        max_examples: evaluate on at most this many seen-train and test examples per task (a fixed
            random subset; ``None``: all).
        probe_size: also measure ``L_k``, the mean per-example gradient norm of task ``k`` at the merged
            model on this many seen training examples (``0``: skip).
        seed: seed of the evaluation subsets.
        reference: a model independent of the fine-tuning data (the pretrained encoder), measured on
            the *same* examples: its gap has expectation zero, so subtracting it times the
            variance-minimizing coefficient (:func:`control_variate_gap`) estimates the same expected
            gap with much of the sampling noise removed (``gap_vs_reference``).
        reference_cache: a dict reused across calls to keep the reference's per-example losses.

    Returns:
        ``train_loss`` (on the examples the experts saw, except the head's, see
        :func:`head_example_indices`), ``test_loss``, ``generalization_gap``
        (test minus train), ``train_accuracy``, ``test_accuracy``: unweighted means over tasks;
        ``gap_vs_reference`` with a reference; ``per_task`` with the same keys; ``lipschitz`` per task
        when ``probe_size > 0``.
    """
    if not experts:
        raise ValueError("experts is empty; pass task -> FinetuneConfig for every merged task.")
    cache = {} if reference_cache is None else reference_cache
    per_task: dict[str, dict[str, float]] = {}
    lipschitz: dict[str, float] = {}
    for task, cfg in experts.items():
        _, y = bench.split(task, "train")
        seen = training_indices(len(y), cfg)  # the rows the task's expert trained on
        seen = seen[~torch.isin(seen, head_example_indices(bench, task))]
        seen = seen[_eval_subset(len(seen), max_examples, seed)]
        _, yt = bench.split(task, "test")
        test = _eval_subset(len(yt), max_examples, seed + 1)
        # bench.images: the clip benchmark decodes each subset once and keeps it (a sweep measures
        # hundreds of merges on the same subsets); images of the tiny benchmark are in memory
        X_seen, X_test = bench.images(task, "train", seen), bench.images(task, "test", test)
        tr, tr_ok = per_example_losses(bench, state, task, X_seen, y[seen])
        te, te_ok = per_example_losses(bench, state, task, X_test, yt[test])
        tr_loss, te_loss = float(tr.mean()), float(te.mean())
        per_task[task] = {"train_loss": tr_loss, "test_loss": te_loss, "generalization_gap": te_loss - tr_loss,
                          "train_accuracy": float(tr_ok.float().mean()), "test_accuracy": float(te_ok.float().mean())}
        if reference is not None:
            key = (task, cfg.data_fraction, cfg.seed, max_examples, seed)
            if key not in cache:
                cache[key] = (per_example_losses(bench, reference, task, X_seen, y[seen])[0],
                              per_example_losses(bench, reference, task, X_test, yt[test])[0])
            gap_cv, c = control_variate_gap(tr, te, *cache[key])
            per_task[task]["gap_vs_reference"] = gap_cv
            per_task[task]["control_coefficient"] = c
        if probe_size > 0:
            probe = seen[:probe_size]
            enc = _encoder(bench, state)
            lipschitz[task] = float(per_example_gradient_norms(
                enc, bench.heads[task].to(bench.device), X_seen[:probe_size].to(bench.device),
                y[probe].to(bench.device)).mean())
    keys = ["train_loss", "test_loss", "generalization_gap", "train_accuracy", "test_accuracy"]
    keys += ["gap_vs_reference"] if reference is not None else []
    out: dict[str, Any] = {k: float(np.mean([v[k] for v in per_task.values()])) for k in keys}
    out["per_task"] = per_task
    if probe_size > 0:
        out["lipschitz"] = lipschitz
    return out


# ----------------------------------------------------------------------------- constants of a sweep
def expert_terms(bench: Any, task: str, cfg: FinetuneConfig, curvature: Curvature, regime: str = "quadratic",
                 statistic: str = "mean") -> StabilityTerms:
    """:func:`expert_stability` of a cached sweep checkpoint, with ``G_t`` interpolated from the
    gradient-norm probes in its log (``statistic``: ``"mean"`` or ``"max"`` per-example norm)."""
    from .sweep import checkpoint_log

    if statistic not in ("mean", "max"):
        raise ValueError(f"statistic={statistic!r} is not valid; use 'mean' or 'max'.")
    log = checkpoint_log(bench, task, cfg)
    probe = log.get("gradient_norm_probe") or {}
    if not probe.get("steps"):
        raise ValueError(f"the checkpoint of task={task!r}, cfg={cfg} has no gradient-norm probes; "
                         "run sweep(..., probe_size=8) to record them.")
    G = gradient_norm_schedule(probe["steps"], probe[statistic], cfg.num_steps)
    hp = ExpertHyperparameters.from_config(cfg, len(bench.split(task, "train")[1]),
                                           batch_gradient_norms=log.get("batch_gradient_norm") or None)
    return expert_stability(hp, G, curvature, regime)


def estimate_curvature(bench: Any, points: Sequence[tuple[str, int, StateDict]], batch_size: int = 32,
                       iters: int = 8, seed: int = 0) -> tuple[Curvature, list[dict[str, Any]]]:
    """The curvature schedule of assumption A4 from Hessian power iteration at several points.

    Args:
        points: ``(task, step, encoder state)`` triples, e.g. ``theta_0`` at step 0 and a run's
            checkpoints; each is evaluated on the first ``batch_size`` training examples of ``task``
            with its head.

    Returns:
        ``Curvature`` with, at every measured step, ``beta = max lam_max`` and ``rho = -min lam_min``
        over the points of that step (a constant when all points are at one step), and one row per
        point.
    """
    if not points:
        raise ValueError("points is empty; pass (task, step, state) triples, e.g. [('colours', 0, pretrained)].")
    rows = []
    for i, (task, step, state) in enumerate(points):
        X, y = bench.split(task, "train")
        enc = bench.new_encoder(state).to(bench.device)
        lam_max, lam_min = hessian_extreme_eigenvalues(enc, bench.heads[task].to(bench.device),
                                                       X[:batch_size].to(bench.device),
                                                       y[:batch_size].to(bench.device), iters, seed + i)
        rows.append({"task": task, "step": int(step), "lambda_max": lam_max, "lambda_min": lam_min})
    steps = sorted({r["step"] for r in rows})
    beta = tuple(max(r["lambda_max"] for r in rows if r["step"] == s) for s in steps)
    rho = tuple(-min(r["lambda_min"] for r in rows if r["step"] == s) for s in steps)
    if len(steps) == 1:
        return Curvature(beta=beta[0], rho=rho[0]), rows
    return Curvature(beta=beta, rho=rho, steps=tuple(steps)), rows


# ----------------------------------------------------------------------------- the merge experiment
HYPERPARAMETERS = ("lr", "batch_size", "data_fraction", "num_steps")
"""The fine-tuning hyperparameters whose effect on ``x_avg`` the experiment measures."""


@dataclass(frozen=True)
class ExpertGrid:
    """The grid of experts: a centre recipe and levels of each hyperparameter around it.

    Attributes:
        base: the centre recipe; its ``num_steps`` is the centre step count.
        levels: hyperparameter (one of :data:`HYPERPARAMETERS`) -> levels, each including the centre
            value. Levels whose mean is the centre (e.g. arithmetic) let heterogeneous merges be
            compared with homogeneous ones at equal average hyperparameters.
        checkpoints: step counts checkpointed from every run (``num_steps`` levels are added).
        seeds: fine-tuning seeds; merge draw ``d`` uses ``seeds[d % len(seeds)]``.
        factorial: every combination of lr x batch size x data fraction; else one at a time.
    """

    base: FinetuneConfig
    levels: Mapping[str, tuple[Any, ...]]
    checkpoints: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    factorial: bool = False

    def __post_init__(self) -> None:
        for name, values in self.levels.items():
            if name not in HYPERPARAMETERS:
                raise ValueError(f"levels has {name!r}; valid hyperparameters: {', '.join(HYPERPARAMETERS)}.")
            if self.centre(name) not in values:
                raise ValueError(f"levels[{name!r}]={list(values)} must include the centre value "
                                 f"{self.centre(name)!r} (from base).")
        if not self.seeds:
            raise ValueError("seeds is empty; pass at least one fine-tuning seed.")

    def centre(self, name: str) -> Any:
        return getattr(self.base, name)

    @property
    def steps(self) -> tuple[int, ...]:
        """Every checkpointed step count."""
        return tuple(sorted(set(self.checkpoints) | set(self.levels.get("num_steps", ())) | {self.base.num_steps}))

    def recipes(self, seed: int | None = None) -> list[FinetuneConfig]:
        """Configurations at the centre step count (lr x batch x fraction, factorial or one at a time)."""
        base = self.base if seed is None else replace(self.base, seed=seed)
        axes = {k: v for k, v in self.levels.items() if k != "num_steps"}
        if self.factorial:
            from .sweep import config_grid

            return config_grid(base, **axes)
        from .sweep import one_at_a_time

        return one_at_a_time(base, **axes)

    def at(self, step: int, seed: int | None = None) -> FinetuneConfig:
        """The centre recipe's checkpoint at ``step`` (``seed``: default the base's)."""
        return replace(self.base, num_steps=step, **({} if seed is None else {"seed": seed}))

    def configs(self) -> list[FinetuneConfig]:
        """Every recipe for every seed, with ``num_steps`` = the last checkpoint (for :func:`sweep`)."""
        top = max(self.steps)
        return [replace(c, num_steps=top) for s in self.seeds for c in self.recipes(s)]

    def varied(self, cfg: FinetuneConfig) -> tuple[str, ...]:
        """The hyperparameters in which ``cfg`` differs from the centre."""
        return tuple(h for h in HYPERPARAMETERS if getattr(cfg, h) != self.centre(h))


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the experiment.

    Attributes:
        draw: index of the random task subset.
        experts: ``(task, config)`` per merged expert (``config.num_steps`` = its checkpoint).
        kind: ``"homogeneous"`` (one recipe for all) or ``"heterogeneous"`` (one hyperparameter's levels
            spread over the tasks, the others at the centre).
        varied: for homogeneous merges, the hyperparameters off the centre (``()`` at the centre); for
            heterogeneous ones, the spread hyperparameter.
        method: merge method (``"weight_averaging"``, ``"ties"``, ``"dare"``...).
        options: the method's options as sorted ``(name, value)`` pairs.
    """

    draw: int
    experts: tuple[tuple[str, FinetuneConfig], ...]
    kind: str
    varied: tuple[str, ...]
    method: str = "weight_averaging"
    options: tuple[tuple[str, Any], ...] = ()


def plan_merges(grid: ExpertGrid, tasks: Sequence[str], merge_size: int = 3, num_draws: int = 4, seed: int = 0,
                sparsify: Mapping[str, Mapping[str, Any]] | None = None) -> list[MergeSpec]:
    """The merges of the experiment, for ``num_draws`` random subsets of ``merge_size`` tasks.

    Per draw: a homogeneous merge for every recipe and checkpoint; a heterogeneous merge per
    hyperparameter whose levels can be spread evenly over the tasks (``merge_size`` a multiple of the
    number of levels), in a random order; and, for each method in ``sparsify`` (name -> options), the
    centre homogeneous and the heterogeneous merges again with that method.
    """
    if not 1 <= merge_size <= len(tasks):
        raise ValueError(f"merge_size={merge_size!r} is not valid; use 1..{len(tasks)} (the tasks available).")
    if num_draws < 1:
        raise ValueError(f"num_draws={num_draws!r} is not valid; use a positive integer.")
    rng = np.random.default_rng(seed)
    specs: list[MergeSpec] = []
    for d in range(num_draws):
        chosen = sorted(rng.choice(list(tasks), size=merge_size, replace=False).tolist())
        run_seed = grid.seeds[d % len(grid.seeds)]
        centre = replace(grid.base, seed=run_seed)
        homo = []
        for cfg in grid.recipes(run_seed):
            for s in grid.steps:
                c = replace(cfg, num_steps=s)
                homo.append(MergeSpec(d, tuple((t, c) for t in chosen), "homogeneous", grid.varied(c)))
        hetero = []
        for h, levels in grid.levels.items():
            if merge_size % len(levels):
                continue
            order = np.tile(np.asarray(levels, dtype=object), merge_size // len(levels))[rng.permutation(merge_size)]
            experts = tuple((t, replace(centre, **{h: type(grid.centre(h))(v)})) for t, v in zip(chosen, order))
            hetero.append(MergeSpec(d, experts, "heterogeneous", (h,)))
        specs += homo + hetero
        base_specs = [s for s in homo if s.varied == ()] + hetero
        for method, options in (sparsify or {}).items():
            opts = tuple(sorted(dict(options).items()))
            specs += [replace(s, method=method, options=opts) for s in base_specs]
    return specs


class _StateCache:
    """Expert state dicts loaded on demand, the least recently used dropped beyond ``max_bytes``
    (tiny experts all fit; a grid of ViT-B-32 experts, 350 MB each, would not)."""

    def __init__(self, load: Any, max_bytes: float) -> None:
        self.load, self.max_bytes = load, max_bytes
        self.items: dict[Any, StateDict] = {}

    def __getitem__(self, key: Any) -> StateDict:
        if key in self.items:
            self.items[key] = self.items.pop(key)  # most recently used last
            return self.items[key]
        state = self.load(key)
        self.items[key] = state
        size = lambda st: sum(v.numel() * v.element_size() for v in st.values())  # noqa: E731
        while len(self.items) > 1 and sum(size(v) for v in self.items.values()) > self.max_bytes:
            self.items.pop(next(iter(self.items)))
        return state


def run_merges(bench: Any, specs: Sequence[MergeSpec], curvature: Curvature,
               regimes: Sequence[str] = REGIMES, max_examples: int | None = 500, probe_size: int = 4,
               progress: bool = True, state_cache_gb: float = 8.0) -> "Any":
    """Merge, measure and bound every spec; one row per merge (a pandas DataFrame).

    Experts are the sweep's checkpoints (:func:`mergelab.sweep.checkpoint_state`), kept in memory up to
    ``state_cache_gb`` GiB between merges.

    Measured (:func:`measure_merge`): ``train_loss``, ``test_loss``, ``generalization_gap``,
    ``gap_vs_pretrained`` (the gap with the pretrained model on the same examples as a control
    variate, :func:`control_variate_gap`: a lower-variance estimate of the same expectation),
    ``train_accuracy``, ``test_accuracy``;
    ``lipschitz`` (mean ``L_k``). Predicted, for simple averaging
    only (the bound says nothing about sparsified merges): ``bound_<regime>`` and the averaged
    stability's ``sampling_<regime>`` and ``drift_<regime>`` (:func:`averaged_stability`).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .merging import merge
    from .sweep import checkpoint_state
    from .task_vectors import TaskVector

    pre = bench.pretrained_state()
    reference_cache: dict = {}
    states = _StateCache(lambda key: checkpoint_state(bench, *key), max_bytes=state_cache_gb * 2**30)
    terms_cache: dict[tuple[str, FinetuneConfig, str], StabilityTerms] = {}
    rows = []
    for spec in tqdm(specs, desc="merges", disable=not progress, mininterval=1.0):
        tvs = []
        for task, cfg in spec.experts:
            tvs.append(TaskVector.from_states(pre, states[task, cfg]))
        merged = merge(spec.method, pre, tvs, **dict(spec.options))
        configs = dict(spec.experts)
        m = measure_merge(bench, merged, configs, max_examples=max_examples, probe_size=probe_size,
                          seed=spec.draw, reference=pre, reference_cache=reference_cache)
        row: dict[str, Any] = {
            "draw": spec.draw, "tasks": "+".join(t for t, _ in spec.experts), "kind": spec.kind,
            "varied": "+".join(spec.varied) if spec.varied else "centre", "method": spec.method,
            **{f"mean_{h}": float(np.mean([getattr(c, h) for _, c in spec.experts])) for h in HYPERPARAMETERS},
            **{h: ",".join(str(getattr(c, h)) for _, c in spec.experts) for h in HYPERPARAMETERS},
            "seed": spec.experts[0][1].seed,
            **{k: m[k] for k in ("train_loss", "test_loss", "generalization_gap", "train_accuracy",
                                 "test_accuracy")},
            "gap_vs_pretrained": m["gap_vs_reference"],
            "lipschitz": float(np.mean(list(m["lipschitz"].values()))) if probe_size > 0 else float("nan"),
        }
        for regime in regimes:
            if spec.method != "weight_averaging" or probe_size == 0:
                row.update({f"bound_{regime}": float("nan"), f"sampling_{regime}": float("nan"),
                            f"drift_{regime}": float("nan")})
                continue
            terms = []
            for task, cfg in spec.experts:
                if (task, cfg, regime) not in terms_cache:
                    terms_cache[task, cfg, regime] = expert_terms(bench, task, cfg, curvature, regime)
                terms.append(terms_cache[task, cfg, regime])
            avg = averaged_stability(terms)
            row.update({f"bound_{regime}": generalization_bound(terms, [m["lipschitz"][t] for t, _ in spec.experts]),
                        f"sampling_{regime}": avg.sampling, f"drift_{regime}": avg.drift})
        rows.append(row)
    return pd.DataFrame(rows)


def rank_correlations(df: Any, predicted: str, measured: str = "gap_vs_pretrained") -> dict[str, dict[str, float]]:
    """Spearman rank correlation between a predicted and a measured column of :func:`run_merges`' table.

    Computed over every simple-averaging merge (``"overall"``), and per hyperparameter over the
    homogeneous merges that differ from the centre in that hyperparameter only (the centre included).
    Each entry: ``spearman``, ``p_value``, ``n``, and ``spearman_within_draw``: the same after
    subtracting each draw's centre merge from the measured value and from the log of the predicted
    one, so that differences between task subsets do not count. NaN with fewer than 3 merges or a
    constant column.
    """
    from scipy.stats import spearmanr

    if predicted not in df or measured not in df:
        raise ValueError(f"columns {predicted!r} and {measured!r} must be in the table; have: {', '.join(df.columns)}.")
    avg = df[(df["method"] == "weight_averaging") & np.isfinite(df[predicted].astype(float))].copy()
    centre = avg[(avg["kind"] == "homogeneous") & (avg["varied"] == "centre")].set_index("draw")
    with np.errstate(divide="ignore"):
        avg["_pred_w"] = np.log(avg[predicted].astype(float)) - np.log(avg["draw"].map(centre[predicted]).astype(float))
    avg["_meas_w"] = avg[measured] - avg["draw"].map(centre[measured])

    def rho(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            return float("nan"), float("nan")
        res = spearmanr(x, y)
        return float(res.statistic), float(res.pvalue)

    def corr(part: Any) -> dict[str, float]:
        r, p = rho(part[predicted].to_numpy(float), part[measured].to_numpy(float))
        rw, _ = rho(part["_pred_w"].to_numpy(float), part["_meas_w"].to_numpy(float))
        return {"spearman": r, "p_value": p, "n": int(len(part)), "spearman_within_draw": rw}

    out = {"overall": corr(avg)}
    homo = avg[avg["kind"] == "homogeneous"]
    for h in HYPERPARAMETERS:
        out[h] = corr(homo[homo["varied"].isin(["centre", h])])
    return out


# ----------------------------------------------------------------------------- tables for the figures
def trajectory_table(bench: Any, table: Any) -> Any:
    """Gradient-norm probes along every run of a :func:`mergelab.sweep.sweep` table (long format).

    One row per run and probe: the run's ``task``, ``lr``, ``batch_size``, ``data_fraction``, ``seed``,
    the ``step``, ``gradient_norm_mean`` and ``gradient_norm_max`` (per-example, over the probe), and
    ``batch_gradient_norm`` (unclipped mini-batch norm at that step, mean of the 5 steps before it).
    """
    import pandas as pd

    from .sweep import checkpoint_log, row_config

    rows = []
    last = table.sort_values("step").groupby(["task", "lr", "batch_size", "data_fraction", "seed"]).tail(1)
    for _, r in last.iterrows():
        log = checkpoint_log(bench, r["task"], row_config(r))
        probe, norms = log.get("gradient_norm_probe") or {}, log.get("batch_gradient_norm") or []
        for i, step in enumerate(probe.get("steps", [])):
            window = norms[max(0, step - 5):step] if step > 0 else norms[:1]
            rows.append({"task": r["task"], "lr": r["lr"], "batch_size": r["batch_size"],
                         "data_fraction": r["data_fraction"], "seed": r["seed"], "step": step,
                         "gradient_norm_mean": probe["mean"][i], "gradient_norm_max": probe["max"][i],
                         "batch_gradient_norm": float(np.mean(window)) if window else float("nan")})
    return pd.DataFrame(rows)


def hyperparameter_effects(df: Any, grid: ExpertGrid, predicted: str) -> Any:
    """Homogeneous simple-averaging merges along each hyperparameter's slice (others at the centre).

    Long format: ``hyperparameter``, ``level``, ``draw``, ``generalization_gap``, ``test_accuracy``,
    ``predicted`` (the ``predicted`` column) and ``predicted_relative`` (divided by the same draw's
    centre merge, so that draws with different tasks are comparable).
    """
    import pandas as pd

    homo = df[(df["kind"] == "homogeneous") & (df["method"] == "weight_averaging")]
    centre = homo[homo["varied"] == "centre"].set_index("draw")
    rows = []
    for h in grid.levels:
        part = homo[homo["varied"].isin(["centre", h])]
        for _, r in part.iterrows():
            rows.append({"hyperparameter": h, "level": r[f"mean_{h}"], "draw": r["draw"],
                         "generalization_gap": r["generalization_gap"], "gap_vs_pretrained": r["gap_vs_pretrained"],
                         "test_accuracy": r["test_accuracy"],
                         "train_loss": r["train_loss"], "predicted": r[predicted],
                         "predicted_relative": r[predicted] / centre.loc[r["draw"], predicted]})
    return pd.DataFrame(rows)


def heterogeneity_table(df: Any, predicted: str) -> Any:
    """Heterogeneous merges against the homogeneous centre merge of the same draw and method (equal
    average hyperparameters when the levels' mean is the centre).

    One row per draw, method and spread hyperparameter: ``gap_homogeneous``, ``gap_heterogeneous`` (both
    ``gap_vs_pretrained``),
    ``test_acc_homogeneous``, ``test_acc_heterogeneous``, ``predicted_homogeneous``,
    ``predicted_heterogeneous``.
    """
    import pandas as pd

    rows = []
    for (draw, method), part in df.groupby(["draw", "method"]):
        homo = part[(part["kind"] == "homogeneous") & (part["varied"] == "centre")]
        if homo.empty:
            continue
        h0 = homo.iloc[0]
        for _, r in part[part["kind"] == "heterogeneous"].iterrows():
            rows.append({"draw": draw, "method": method, "hyperparameter": r["varied"],
                         "gap_homogeneous": h0["gap_vs_pretrained"], "gap_heterogeneous": r["gap_vs_pretrained"],
                         "test_acc_homogeneous": h0["test_accuracy"], "test_acc_heterogeneous": r["test_accuracy"],
                         "predicted_homogeneous": h0[predicted], "predicted_heterogeneous": r[predicted]})
    return pd.DataFrame(rows)


def expert_table(bench: Any, grid: ExpertGrid, tasks: Sequence[str], hyperparameter: str = "lr",
                 max_examples: int | None = 500, seed: int | None = None) -> Any:
    """Each expert measured on its own task (``K = 1``) along one hyperparameter's levels and every
    checkpoint: ``task``, ``level``, ``step``, ``train_loss``, ``test_loss``, ``generalization_gap``,
    ``gap_vs_pretrained``, ``test_accuracy``."""
    import pandas as pd

    from .sweep import checkpoint_state

    if hyperparameter not in grid.levels or hyperparameter == "num_steps":
        raise ValueError(f"hyperparameter={hyperparameter!r} is not valid; use one of "
                         f"{[h for h in grid.levels if h != 'num_steps']}.")
    base = grid.base if seed is None else replace(grid.base, seed=seed)
    pre, cache = bench.pretrained_state(), {}
    rows = []
    for task in tasks:
        for level in grid.levels[hyperparameter]:
            for step in grid.steps:
                cfg = replace(base, **{hyperparameter: level, "num_steps": step})
                m = measure_merge(bench, checkpoint_state(bench, task, cfg), {task: cfg}, max_examples=max_examples,
                                  reference=pre, reference_cache=cache)
                rows.append({"task": task, "level": level, "step": step,
                             **{k: m[k] for k in ("train_loss", "test_loss", "generalization_gap", "test_accuracy")},
                             "gap_vs_pretrained": m["gap_vs_reference"]})
    return pd.DataFrame(rows)
