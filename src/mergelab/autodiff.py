"""Derivatives of a model's loss: full-dataset gradients, Hessian-vector products, per-example
gradient norms and extreme Hessian eigenvalues.

The loss is the cross-entropy of ``head(encoder(X))``; gradients are taken with respect to the
encoder's trainable parameters and returned keyed by parameter name (as
:class:`~mergelab.task_vectors.TaskVector` values), so ``-lr * gradient`` compares directly with a
task vector. Every double backward runs attention through PyTorch's math kernel (the fused CPU
kernel has none): :func:`differentiable_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import eigh_tridiagonal
from torch import nn

from .task_vectors import TaskVector, TensorMap, check_compatible
from .utils import check_integer, eval_mode

HVP_METHODS = ("double_backward", "forward_over_reverse")

# ----------------------------------------------------------------------------- gradients and HVPs
class LossGradient(NamedTuple):
    """Mean loss over a dataset and its gradient.

    Attributes:
        loss: mean cross-entropy over all examples (nats).
        gradient: ``d loss / d theta`` per state-dict entry, same shapes as the parameters (zeros for
            floating-point entries that are not trainable parameters).
        n_examples: number of examples averaged.
    """

    loss: float
    gradient: TaskVector
    n_examples: int


def _check_data(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if len(X) != len(y) or len(y) == 0:
        raise ValueError(f"X has {len(X)} rows and y has {len(y)}: pass the same, non-zero number of "
                         "examples and labels.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive integer.")


def _load(encoder: nn.Module, state: Mapping[str, torch.Tensor] | None, device: torch.device | str
          ) -> nn.Module:
    if state is not None:
        own = encoder.state_dict()
        check_compatible(own, state, "state dict")
        with torch.no_grad():
            encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return encoder.to(device)


def _as_taskvector(encoder: nn.Module, tensors: Mapping[str, torch.Tensor]) -> TaskVector:
    """Full state-dict key set (floating entries only, dtype kept), zeros where ``tensors`` has none."""
    out = {}
    for k, v in encoder.state_dict().items():
        if torch.is_floating_point(v):
            t = tensors.get(k)
            out[k] = t.detach().cpu() if t is not None else torch.zeros(v.shape, dtype=v.dtype)
    return TaskVector(out)


@contextmanager
def _full_precision():
    """No TensorFloat-32 on CUDA (matmuls and cuDNN convolutions), so that float32 means float32; a
    no-op on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def _differentiable_attention():
    """Attention through the plain-math kernel: fused CPU kernels have no double backward or
    forward-mode derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def loss_and_gradient(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                      state: Mapping[str, torch.Tensor] | None = None, batch_size: int = 500,
                      device: torch.device | str = "cpu") -> LossGradient:
    """Mean cross-entropy of ``head(encoder(X))`` over the *whole* dataset and its gradient.

    The loss is ``(1/N) sum_i CE_i``, exactly the objective a full-batch fine-tuning step with
    mean reduction descends; the data are visited in order in batches of ``batch_size`` (each
    batch contributes ``sum CE / N``), so the result is deterministic and independent of the
    batch size up to float rounding. The head is frozen (its gradient is never formed).

    Args:
        encoder: maps ``(B, 3, H, W)`` to ``(B, d)``; loaded with ``state`` when given (a copy of
            the weights is written into it; its mode is given back).
        head: frozen head, ``(B, d)`` features to ``(B, C)`` logits. Both run in eval mode and are given back
            in the modes they came in.
        X: ``(N, 3, H, W)`` inputs; y: ``(N,)`` int64 labels.
        state: encoder weights to evaluate the gradient at (default: the encoder's own).
        batch_size: examples per forward/backward pass (memory only, not the result).
        device: where to compute.
    """
    _check_data(X, y, batch_size)
    encoder = _load(encoder, state, device)
    head = head.to(device)
    with eval_mode(encoder, head):
        return _loss_and_gradient(encoder, head, X, y, batch_size, device)


def _loss_and_gradient(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int,
                       device: torch.device | str) -> LossGradient:
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    head_grad = [p.requires_grad for p in head.parameters()]
    for p in head.parameters():
        p.requires_grad_(False)
    n, total = len(y), 0.0
    try:
        for i in range(0, n, batch_size):
            xb, yb = X[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            loss = F.cross_entropy(head(encoder(xb)), yb, reduction="sum") / n
            batch_grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            with torch.no_grad():
                for (name, _), g in zip(params.items(), batch_grads):
                    if g is not None:
                        grads[name] += g
            total += float(loss.detach())
    finally:
        for p, flag in zip(head.parameters(), head_grad):
            p.requires_grad_(flag)
    return LossGradient(total, _as_taskvector(encoder, grads), n)


def dataset_gradient(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     state: Mapping[str, torch.Tensor] | None = None, batch_size: int = 500,
                     device: torch.device | str = "cpu") -> TaskVector:
    """The gradient part of :func:`loss_and_gradient`: ``grad (1/N) sum_i CE_i`` at ``state``."""
    return loss_and_gradient(encoder, head, X, y, state, batch_size, device).gradient


def hessian_vector_product(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                           vector: TensorMap, state: Mapping[str, torch.Tensor] | None = None,
                           batch_size: int = 500, device: torch.device | str = "cpu",
                           method: str = "double_backward") -> TaskVector:
    """``H v``: the Hessian of the dataset's mean cross-entropy at ``state`` times ``vector``.

    Batched like :func:`loss_and_gradient` (each batch's Hessian weighted by its share of
    examples), without ever forming ``H``.

    Args:
        vector: a direction keyed like the encoder's parameters (e.g. the gradient itself).
        method: ``"double_backward"`` (reverse over reverse: the gradient of ``<grad L, v>``) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``); both give the
            same numbers, the second one through :mod:`torch.func`.
    """
    if method not in HVP_METHODS:
        raise ValueError(f"method={method!r} is not valid; use one of {', '.join(HVP_METHODS)}.")
    _check_data(X, y, batch_size)
    encoder = _load(encoder, state, device)
    head = head.to(device)
    with eval_mode(encoder, head):
        return _hessian_vector_product(encoder, head, X, y, vector, batch_size, device, method)


def _hessian_vector_product(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                            vector: TensorMap, batch_size: int, device: torch.device | str, method: str
                            ) -> TaskVector:
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    missing = [k for k in names if k not in vector.keys()]
    if missing:
        raise ValueError(f"vector has no entry for parameter {missing[0]!r}; pass a direction keyed like "
                         "the encoder's parameters (a TaskVector or gradient of the same model).")
    base = {k: v.detach() for k, v in encoder.named_parameters() if k in names}
    v = {k: vector[k].to(device, base[k].dtype).reshape(base[k].shape) for k in names}
    buffers = dict(encoder.named_buffers())
    frozen = {k: p.detach() for k, p in encoder.named_parameters() if k not in names}
    out = {k: torch.zeros_like(p) for k, p in base.items()}
    n = len(y)
    with _differentiable_attention():
        for i in range(0, n, batch_size):
            xb, yb = X[i:i + batch_size].to(device), y[i:i + batch_size].to(device)

            def loss_of(p: dict[str, torch.Tensor], xb=xb, yb=yb) -> torch.Tensor:
                feats = torch.func.functional_call(encoder, {**p, **frozen, **buffers}, (xb,))
                return F.cross_entropy(head(feats), yb, reduction="sum") / n

            if method == "forward_over_reverse":
                _, hv = torch.func.jvp(torch.func.grad(loss_of), (base,), (v,))
            else:
                p = {k: t.clone().requires_grad_(True) for k, t in base.items()}
                g = torch.autograd.grad(loss_of(p), list(p.values()), create_graph=True)
                dot = sum((gi * v[k]).sum() for gi, k in zip(g, p))
                hv = dict(zip(p, torch.autograd.grad(dot, list(p.values()))))
            with torch.no_grad():
                for k in out:
                    out[k] += hv[k].detach()
    return _as_taskvector(encoder, out)

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
    with eval_mode(encoder, head):
        return _per_example_norms(encoder, head, X, y, chunk)


def _per_example_norms(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                       chunk: int) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

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
    return torch.cat(norms).detach()


def _hvp(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
         params: list[torch.Tensor], vec: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        loss = _loss_fn(encoder, head, X, y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [h.detach() for h in torch.autograd.grad(grads, params, grad_outputs=vec)]


@dataclass(frozen=True)
class ExtremeEigenvalues:
    """The extreme Hessian eigenvalues of :func:`hessian_extremes` (the extreme Ritz values of its Lanczos
    run), each with its Ritz residual ``||H x - lambda x||`` for the unit Ritz vector ``x``, in the
    eigenvalue's units. Some eigenvalue of ``H`` lies within ``residual_*`` of the estimate, so a residual
    well under ``|lambda|`` says the estimate has settled to about ``residual / |lambda|``; a residual
    comparable with ``|lambda|`` says more steps would move it. No residual is below the products' rounding,
    ``eps * max |lambda|`` (``eps`` of the parameters' dtype). Ritz values lie inside the spectrum:
    ``lambda_max`` never exceeds the true largest eigenvalue, and ``lambda_min`` is never below the true
    smallest one: ``beta`` and ``rho`` built from them can only be underestimated. A small residual says the
    estimate is near *an* eigenvalue; that it is the extreme one rests on the start vector not being orthogonal
    to its eigenvector (true with probability 1 for a random start)."""

    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float


def lanczos_extremes(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values of a symmetric operator after ``steps`` Lanczos steps from ``start``, with their residuals.

    Full reorthogonalization (Gram-Schmidt against every earlier basis vector, twice) keeps the basis
    orthonormal in float32, so no spurious copies of converged eigenvalues appear. The run stops early when
    the Krylov space becomes invariant (the new direction's norm is within rounding of 0: the residuals are then
    that small, or their floor, below). The tridiagonal matrix's eigenproblem is solved by :func:`scipy.linalg.eigh_tridiagonal`. (``scipy.sparse.linalg.eigsh``
    restarts until a tolerance is met; here the number of products is fixed by the caller, and the residual
    bounds come free from the tridiagonal matrix.)

    Args:
        matvec: ``v -> A v`` for a flat vector ``v`` of shape ``(n,)`` (A symmetric), on ``start``'s device
            and in its dtype, or float32 for a half-precision ``start`` (the basis is kept in at least float32).
        start: the start vector, shape ``(n,)``, any nonzero norm.
        steps: matrix-vector products (at most ``n``; more are cut to ``n``).

    Returns:
        ``(theta, residual)``: the Ritz values in ascending order, shape ``(m,)`` with ``m <= steps``, and
        each one's residual norm ``|beta_m s_m|`` (same units as ``theta``), at least the products' rounding
        ``eps * max |theta|`` (``eps`` of the basis's dtype): in float32 the formula alone can report residuals
        many orders below what the products resolve.
    """
    check_integer("steps", steps)
    n = start.numel()
    steps = min(steps, n)
    start = start.to(torch.promote_types(start.dtype, torch.float32))  # half precision would stop at step 1
    norm = start.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("start must be a finite, nonzero vector.")
    basis = torch.empty((steps, n), dtype=start.dtype, device=start.device)
    basis[0] = start / norm
    alphas: list[float] = []
    betas: list[float] = []
    last = 0.0
    tiny = 100 * torch.finfo(start.dtype).eps
    for j in range(steps):
        q = basis[j]
        w = matvec(q).to(start.dtype)
        alphas.append(float(w @ q))
        used = basis[: j + 1]
        for _ in range(2):  # twice is enough (Kahan: "twice is enough")
            w = w - used.T @ (used @ w)
        beta = float(w.norm())
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0))
        last = beta
        if beta <= tiny * scale:  # invariant subspace: the Ritz values are eigenvalues (to what beta says)
            break
        if j + 1 < steps:
            betas.append(beta)
            basis[j + 1] = w / beta
    theta, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))
    # |beta s| can fall far below what products in this precision resolve: no residual is smaller than their rounding
    floor = torch.finfo(start.dtype).eps * float(np.abs(theta).max())
    return theta, np.maximum(np.abs(last * vectors[-1]), floor)


def hessian_extremes(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     iters: int = 20, seed: int = 0) -> ExtremeEigenvalues:
    """The largest and smallest eigenvalues of the Hessian of the mean cross-entropy on ``(X, y)`` w.r.t. the
    encoder's trainable parameters, by the Lanczos method on Hessian-vector products
    (:func:`lanczos_extremes`), with their Ritz residuals (:class:`ExtremeEigenvalues`).

    One Krylov space gives both ends, so ``iters`` products estimate both. The gradient's graph is built
    once and each product is one more backward pass through it (double backward). The start vector is drawn
    from ``seed`` on the CPU, so it is the same on every device. Memory: ``iters`` basis vectors of the
    parameters' size on their device (ViT-B-32, 88M parameters, 20 steps: 7 GB of float32).

    Args:
        iters: Hessian-vector products (Lanczos steps), at least 1; with 1 both ends are the Rayleigh quotient
            of the start vector.
    """
    check_integer("iters", iters)
    params = [p for p in encoder.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    g = torch.Generator().manual_seed(seed)
    start = torch.cat([torch.randn(p.shape, generator=g).reshape(-1) for p in params])
    start = start.to(params[0].device, params[0].dtype)
    # the caller's modes back, also after an error or an interrupt; float32 products on CUDA (no TF32, whose
    # rounding the residuals' floor would not know); the fused CPU attention has no double backward
    with eval_mode(encoder, head), _full_precision(), _differentiable_attention():
        grads = torch.autograd.grad(_loss_fn(encoder, head, X, y), params, create_graph=True)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            parts = [x.view_as(p).to(p.dtype) for x, p in zip(torch.split(v, sizes), params)]
            hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv]).detach()

        theta, residual = lanczos_extremes(matvec, start, iters)
    return ExtremeEigenvalues(float(theta[-1]), float(theta[0]), float(residual[-1]), float(residual[0]))


def hessian_extreme_eigenvalues(encoder: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor,
                                iters: int = 20, seed: int = 0) -> tuple[float, float]:
    """``(lam_max, lam_min)`` of :func:`hessian_extremes` (the same Lanczos run, without the residuals)."""
    r = hessian_extremes(encoder, head, X, y, iters, seed)
    return (r.lambda_max, r.lambda_min)
