"""Item Response Theory for classifiers: a multidimensional two-parameter logistic model of which
images a population of models gets right, and the performance estimators MERGE3 and tinyBenchmarks
build on it (methods.md section 5).

Convention, kept everywhere in the package: items are the fitness images ``i = 1..N``, models
``m = 1..M``, abilities ``theta_m`` in ``R^D``, discriminations ``a_i`` in ``R^D``, difficulties
``b_i`` (a scalar, not multiplied by ``D``), and

    P(model m answers item i correctly) = sigmoid(a_i . theta_m - b_i).

Fitting is a maximum a posteriori fit in torch with weak Gaussian priors (``theta ~ N(0, I)``,
``a ~ N(0, prior_sd^2)``, ``b ~ N(0, prior_sd^2)``), full batch, L-BFGS. Why not ``py-irt``: it
brings pyro and a training loop for millions of responses, while our response matrices are at most a
few hundred models by a few thousand images, which a full-batch L-BFGS fit in torch handles in
seconds, deterministic for a seed, with no new dependency. Abilities of new models and the
merged-ability weights of mp-IRT are MAP logistic regressions with a weak prior (Newton's method):
MERGE3's code fits them by unregularized maximum likelihood, which diverges when a small subset is
all right or all wrong; the prior keeps them finite (a documented deviation).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import check_integer, check_number

ANCHOR_SCHEMES = ("random", "clustered")
"""How anchor items are chosen: uniformly at random (MERGE3) or K-means on item parameters (tinyBenchmarks)."""


@dataclass(frozen=True)
class IRTModel:
    """Item parameters of a fitted multidimensional 2PL model.

    Attributes:
        discrimination: ``a``, ``(N, D)``.
        difficulty: ``b``, ``(N,)``.
    """

    discrimination: np.ndarray
    difficulty: np.ndarray

    @property
    def num_items(self) -> int:
        return int(self.difficulty.shape[0])

    @property
    def dim(self) -> int:
        return int(self.discrimination.shape[1])

    def prob(self, theta: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """``P(correct)`` of abilities ``theta`` ``(D,)`` or ``(M, D)`` on ``items`` (default all):
        ``(n,)`` or ``(M, n)``."""
        a = self.discrimination if items is None else self.discrimination[items]
        b = self.difficulty if items is None else self.difficulty[items]
        return _sigmoid(np.asarray(theta, dtype=float) @ a.T - b)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# ---------------------------------------------------------------------------------------- checks
def check_responses(responses: np.ndarray, name: str = "responses") -> np.ndarray:
    """``responses`` as a float array of 0/1, with a clear error when it holds anything else."""
    r = np.asarray(responses)
    if r.size == 0:
        raise ValueError(f"{name} is empty; give at least one 0/1 response.")
    if r.dtype == bool:
        return r.astype(float)
    if not np.issubdtype(r.dtype, np.number) or not np.isin(r, (0, 1)).all():
        bad = r[~np.isin(r, (0, 1))].ravel()[:3] if np.issubdtype(r.dtype, np.number) else r.dtype
        raise ValueError(f"{name} must hold only 0 (wrong) and 1 (right); found {bad!r}.")
    return r.astype(float)


def check_subset(items: Sequence[int] | np.ndarray, num_items: int, name: str = "items") -> np.ndarray:
    """Indices of a subset of ``num_items`` items: non-empty, unique, in range (integers, not a boolean mask)."""
    raw = np.asarray(items)
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{name} must be item indices (integers); got dtype {raw.dtype}"
                         + (" (a boolean mask: pass np.flatnonzero(mask))." if raw.dtype == bool else "."))
    idx = raw.astype(np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{name} is empty; an estimate needs at least one answered item.")
    if idx.size > num_items:
        raise ValueError(f"{name} has {idx.size} items but the model has only N={num_items}; use n <= N.")
    if idx.min() < 0 or idx.max() >= num_items:
        raise ValueError(f"{name} holds index {int(idx.max() if idx.max() >= num_items else idx.min())}, "
                         f"outside 0..{num_items - 1}.")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name} repeats an item; give each item once.")
    return idx


def _check_answers(model: IRTModel, items: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = check_subset(items, model.num_items)
    y = check_responses(answers, "answers").reshape(-1)
    if y.size != idx.size:
        raise ValueError(f"answers has {y.size} entries but items has {idx.size}; give one answer per item.")
    return idx, y


# ---------------------------------------------------------------------------------------- fitting items
def fit_irt(responses: np.ndarray, dim: int, prior_sd: float = 3.0, max_iter: int = 200, seed: int = 0
            ) -> tuple[IRTModel, np.ndarray]:
    """MAP fit of a ``dim``-dimensional 2PL model to a response matrix.

    Args:
        responses: ``(M, N)`` 0/1, model ``m`` right on item ``i``.
        dim: ``D``, the dimension of abilities (>= 1).
        prior_sd: standard deviation of the Gaussian priors on ``a`` and ``b`` (abilities get ``N(0, I)``,
            which fixes the scale the model's rotation freedom leaves).
        max_iter: L-BFGS iterations (full batch).
        seed: the random start of ``a`` and ``theta``.

    Returns:
        ``(model, theta)``: item parameters and the population's abilities ``(M, D)``.
    """
    r = check_responses(responses)
    if r.ndim != 2:
        raise ValueError(f"responses must be a (models, items) matrix; got shape {r.shape}.")
    check_integer("dim", dim)
    check_number("prior_sd", prior_sd, low=0, low_open=True)
    check_integer("max_iter", max_iter)
    M, N = r.shape
    gen = torch.Generator().manual_seed(int(seed))
    y = torch.as_tensor(r, dtype=torch.float64)
    theta = (0.1 * torch.randn(M, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    a = (0.1 * torch.randn(N, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    p_item = y.mean(0).clamp(0.5 / M, 1 - 0.5 / M)
    b = (-torch.log(p_item / (1 - p_item))).clone().requires_grad_()
    opt = torch.optim.LBFGS([theta, a, b], lr=1.0, max_iter=int(max_iter), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = theta @ a.T - b
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = nll + 0.5 * theta.pow(2).sum() + 0.5 * (a.pow(2).sum() + b.pow(2).sum()) / prior_sd ** 2
        loss.backward()
        return loss

    opt.step(closure)
    model = IRTModel(a.detach().numpy().copy(), b.detach().numpy().copy())
    return model, theta.detach().numpy().copy()


def log_likelihood(model: IRTModel, theta: np.ndarray, responses: np.ndarray) -> float:
    """Mean Bernoulli log-likelihood (nats per response) of ``responses`` ``(M, N)`` under abilities
    ``theta`` ``(M, D)``: the held-out score used to choose ``D``."""
    r = check_responses(responses)
    theta = np.asarray(theta, dtype=float)
    if theta.ndim != 2 or theta.shape[1] != model.dim or r.shape != (theta.shape[0], model.num_items):
        raise ValueError(f"theta must be (M, D={model.dim}) and responses (M, N={model.num_items}); got "
                         f"{theta.shape} and {r.shape}.")
    p = np.clip(model.prob(theta), 1e-9, 1 - 1e-9)
    return float(np.mean(r * np.log(p) + (1 - r) * np.log(1 - p)))


# ---------------------------------------------------------------------------------------- abilities
def _map_logistic(X: np.ndarray, offset: np.ndarray, y: np.ndarray, prior_mean: np.ndarray, prior_sd: float,
                  iters: int = 50) -> np.ndarray:
    """MAP weights ``w`` of ``P(y=1) = sigmoid(X w - offset)`` with the prior ``N(prior_mean, prior_sd^2 I)``,
    by Newton's method with step halving (the objective is strictly concave, so the optimum is unique
    and finite even when every ``y`` is 1 or 0)."""
    check_number("prior_sd", prior_sd, low=0, low_open=True)
    w = prior_mean.astype(float).copy()
    prec = 1.0 / prior_sd ** 2

    def objective(w: np.ndarray) -> float:
        z = X @ w - offset
        return float(np.sum(y * z - np.logaddexp(0.0, z)) - 0.5 * prec * np.sum((w - prior_mean) ** 2))

    f = objective(w)
    for _ in range(iters):
        p = _sigmoid(X @ w - offset)
        grad = X.T @ (y - p) - prec * (w - prior_mean)
        hess = (X * (p * (1 - p))[:, None]).T @ X + prec * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            f_new = objective(w + t * step)
            if f_new >= f - 1e-12:
                break
            t *= 0.5
        w, f_old, f = w + t * step, f, f_new
        if abs(f - f_old) < 1e-10 and np.abs(step).max() * t < 1e-8:
            break
    return w


def fit_ability(model: IRTModel, items: Sequence[int] | np.ndarray, answers: Sequence[float] | np.ndarray,
                prior_sd: float = 3.0) -> np.ndarray:
    """Ability ``theta`` ``(D,)`` of one model from its 0/1 ``answers`` on ``items`` (MAP, prior
    ``N(0, prior_sd^2 I)``; MERGE3 uses maximum likelihood from 0, which the weak prior approaches)."""
    idx, y = _check_answers(model, np.asarray(items), np.asarray(answers))
    return _map_logistic(model.discrimination[idx], model.difficulty[idx], y, np.zeros(model.dim), prior_sd)


def fit_merge_weights(model: IRTModel, endpoint_theta: np.ndarray, items: Sequence[int] | np.ndarray,
                      answers: Sequence[float] | np.ndarray, prior_sd: float = 1.0) -> np.ndarray:
    """mp-IRT's weights ``lambda`` ``(K,)``: the merged model's ability is ``lambda @ endpoint_theta``
    (``(K, D)``, the abilities of the endpoints, fitted on every item), ``lambda`` fitted on the merged
    model's ``answers`` to ``items`` (MAP around MERGE3's start ``1/K`` with standard deviation
    ``prior_sd``; unconstrained, as in MERGE3)."""
    idx, y = _check_answers(model, np.asarray(items), np.asarray(answers))
    E = np.asarray(endpoint_theta, dtype=float)
    if E.ndim != 2 or E.shape[1] != model.dim or E.shape[0] < 1 or not np.isfinite(E).all():
        raise ValueError(f"endpoint_theta must be (K >= 1, D={model.dim}) finite abilities; got shape {E.shape}"
                         f"{'' if np.isfinite(E).all() else ' with non-finite values'}.")
    X = model.discrimination[idx] @ E.T
    return _map_logistic(X, model.difficulty[idx], y, np.full(E.shape[0], 1.0 / E.shape[0]), prior_sd)


# ---------------------------------------------------------------------------------------- estimators
def subset_mean(answers: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The plain estimate: the mean of the subset's answers (``weights``: the anchors' shares of all
    items, tinyBenchmarks' weighted anchor mean)."""
    y = check_responses(answers, "answers").reshape(-1)
    if weights is None:
        return float(y.mean())
    w = np.asarray(weights, dtype=float).reshape(-1)
    if w.shape != y.shape or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be {y.size} non-negative numbers with a positive sum; got shape {w.shape}.")
    return float(w @ y / w.sum())


def p_irt(model: IRTModel, items: np.ndarray, answers: np.ndarray, theta: np.ndarray) -> float:
    """``(n/N) mean_{i in S} y_i + (1 - n/N) mean_{i not in S} P_i(theta)``: the answered items count as
    they are, the others by the model's probability at ``theta``."""
    idx, y = _check_answers(model, np.asarray(items), np.asarray(answers))
    if np.shape(theta) != (model.dim,) or not np.isfinite(np.asarray(theta, dtype=float)).all():
        raise ValueError(f"theta must be one finite ability vector of shape (D={model.dim},); got {np.asarray(theta)!r}.")
    N, n = model.num_items, idx.size
    if n == N:
        return float(y.mean())
    unseen = np.setdiff1d(np.arange(N), idx, assume_unique=True)
    return float(n / N * y.mean() + (1 - n / N) * model.prob(theta, unseen).mean())


@dataclass(frozen=True)
class Estimates:
    """The four estimates of one model's accuracy over all ``N`` items from ``n`` answered items."""

    subset_mean: float
    p_irt: float
    mp_irt: float
    gmp_irt: float

    def as_dict(self) -> dict[str, float]:
        return {"subset_mean": self.subset_mean, "p_irt": self.p_irt, "mp_irt": self.mp_irt,
                "gmp_irt": self.gmp_irt}


ESTIMATORS = ("subset_mean", "p_irt", "mp_irt", "gmp_irt")


def estimate_accuracy(model: IRTModel, items: np.ndarray, answers: np.ndarray, endpoint_theta: np.ndarray,
                      weights: np.ndarray | None = None, gmp_weight: float = 0.5, ability_prior_sd: float = 3.0,
                      merge_prior_sd: float = 1.0) -> Estimates:
    """All four estimators for one model that answered ``items`` (methods.md section 5).

    p-IRT fits the ability on the subset directly; mp-IRT uses ``lambda @ endpoint_theta``
    (:func:`fit_merge_weights`); gmp-IRT is ``gmp_weight * subset mean + (1 - gmp_weight) * mp-IRT``
    (MERGE3 fixes 0.5). ``weights`` (clustered anchors) weight the subset mean.
    """
    idx, y = _check_answers(model, np.asarray(items), np.asarray(answers))
    if not 0 <= gmp_weight <= 1:
        raise ValueError(f"gmp_weight={gmp_weight!r} is not valid; use a number in [0, 1].")
    mean = subset_mean(y, weights)
    theta = fit_ability(model, idx, y, ability_prior_sd)
    lam = fit_merge_weights(model, endpoint_theta, idx, y, merge_prior_sd)
    mp = p_irt(model, idx, y, lam @ np.asarray(endpoint_theta, dtype=float))
    return Estimates(mean, p_irt(model, idx, y, theta), mp, gmp_weight * mean + (1 - gmp_weight) * mp)


# ---------------------------------------------------------------------------------------- anchors
def select_anchors(model: IRTModel, n: int, scheme: str = "random", seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` anchor items and their weights (shares of all items, summing to 1).

    ``random``: uniform without replacement, equal weights (MERGE3). ``clustered``: K-means with ``n``
    clusters on the items' parameters ``[a_i, b_i]``; each cluster's anchor is the item nearest its
    centre, weighted by the cluster's share of the items (tinyBenchmarks).
    """
    N = model.num_items
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= N:
        raise ValueError(f"n={n!r} is not valid; use a number of anchors in 1..{N} (the number of items).")
    if scheme not in ANCHOR_SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not valid; use one of {', '.join(ANCHOR_SCHEMES)}.")
    check_integer("seed", seed, minimum=0)
    n = int(n)
    rng = np.random.default_rng(seed)
    if scheme == "random" or n == N:
        return np.sort(rng.choice(N, size=n, replace=False)), np.full(n, 1.0 / n)
    from sklearn.cluster import KMeans

    features = np.column_stack([model.discrimination, model.difficulty])
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="openmp"):  # Lloyd's partial sums per thread: the same centres on any core count
        km = KMeans(n_clusters=n, n_init=1, random_state=int(seed)).fit(features)
    anchors, weights = np.empty(n, dtype=np.int64), np.empty(n)
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        dist = np.linalg.norm(features[members] - km.cluster_centers_[c], axis=1)
        anchors[c], weights[c] = members[np.argmin(dist)], members.size / N
    order = np.argsort(anchors)
    return anchors[order], weights[order]
