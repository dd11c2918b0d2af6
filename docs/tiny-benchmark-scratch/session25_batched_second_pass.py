"""Session 25 (scratch, not in the package: measured slower than the per-set models on this CPU, see
docs/tiny-benchmark.md section 25). MASS's second pass over a mixed batch in one forward: every image through ``theta_0`` plus its selected set's update.

The second-pass model of a selected set ``S`` is ``theta_0 + Delta_S``, where ``Delta_S`` is the TSV-M of ``S``'s
stored factors (:func:`mergelab.merging.tsv.tsv_merge_compressed_factors`): per decomposed matrix a product
``(U * s) @ V.T`` of rank ``r`` (the selected tasks' stored triplets, e.g. ``r <= 3 k``), every other tensor the mean
of the tasks' dense updates. Running one model per set runs the batch as one sub-batch per set, each paying a whole
forward's fixed costs (dozens of sets a mixed batch on a CPU). Here the batch runs once through ``theta_0``'s weights,
and each set's update is added where it acts:

* a linear map ``y = x W^T + b`` gets ``(x V) (U s)^T`` for its rows of the set (two thin products, no ``(m, n)``
  matrix) and the set's bias update;
* LayerNorm scales, biases, the class embedding, the positional embedding and LayerScale get the set's update
  gathered per image;
* the patch convolution (no bias in open_clip) gets the set's update convolved with its rows, when a set has one
  (a stem frozen while the experts fine-tuned has none).

Images are sorted by set so that each set's rows are one contiguous slice. The result equals each set's model run on
its own rows up to float rounding (the same arithmetic, summed in another order). Supported: open_clip
``VisionTransformer`` with ``ResidualAttentionBlock`` s (the ``tiny`` and ``clip`` encoders; batch-first or not, since
the weights alone are read), class-token or average pooling, no attentional pooler; :func:`check_supported` says why
another encoder is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.linalg import polar_factors, stack_kept
from mergelab.merging.tsv import CompressedTaskVector


def tsv_merge_compressed_factors(compressed, polar="gram", device=None):
    """mergelab.merging.tsv.tsv_merge_compressed before its matrices are multiplied out (same steps)."""
    factors, dense = {}, {}
    first = compressed[0]
    for name in first.shapes:
        if name in first.factors:
            home = first.factors[name][0].device
            U, s, V = (torch.stack([c.factors[name][i] for c in compressed]).float() for i in range(3))
            U, s, V = stack_kept(U, s, V)
            U_perp, V_perp = polar_factors([U, V], polar)
            factors[name] = (U_perp, s, V_perp, home)
        else:
            dense[name] = torch.stack([c.dense_tensor(name).float() for c in compressed]).mean(0)
    return factors, dense


@dataclass
class SetUpdate:
    """One selected set's update of ``theta_0``, as the batched second pass applies it.

    Attributes:
        low_rank: decomposed parameter name to ``(A (m, r), B (n, r))`` with update ``A @ B.T`` (``A = U * s``).
        dense: every other parameter's update (float32); a parameter no task of the set changed is left out.
    """

    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]

    def matrix(self, name: str) -> torch.Tensor | None:
        """The update of parameter ``name`` as a full tensor (``None``: unchanged)."""
        if name in self.low_rank:
            A, B = self.low_rank[name]
            return A @ B.T
        return self.dense.get(name)


def set_update(compressed: Sequence[CompressedTaskVector], polar: str = "gram",
               device: str | torch.device | None = None) -> SetUpdate:
    """The :class:`SetUpdate` of TSV-M (coefficient 1) over ``compressed`` (the selected tasks' stored factors),
    on ``device``: the update :func:`mergelab.merging.tsv.tsv_merge_compressed` returns, kept factored."""
    factors, dense = tsv_merge_compressed_factors(compressed, polar=polar, device=device)
    low_rank = {name: ((U * s).to(device or home), V.to(device or home)) for name, (U, s, V, home) in factors.items()}
    kept = {name: (v.to(device) if device is not None else v) for name, v in dense.items() if bool(v.any())}
    return SetUpdate(low_rank, kept)


def check_supported(encoder: nn.Module) -> None:
    """Raise ``ValueError`` naming what the batched second pass cannot run on this encoder (it reads an open_clip
    ``VisionTransformer``'s weights and reproduces its forward); return quietly when it can."""
    from open_clip.transformer import LayerNorm, LayerNormFp32, ResidualAttentionBlock, VisionTransformer

    def refuse(why: str) -> None:
        raise ValueError(f"the batched second pass does not support this encoder: {why}; use second_pass='per_set'.")

    if not isinstance(encoder, VisionTransformer):
        refuse(f"it is a {type(encoder).__name__}, not an open_clip VisionTransformer")
    if getattr(encoder, "attn_pool", None) is not None:
        refuse("it has an attentional pooler (attn_pool)")
    if getattr(encoder, "output_tokens", False):
        refuse("it returns tokens (output_tokens=True)")
    if getattr(encoder, "pool_type", "tok") not in ("tok", "avg"):
        refuse(f"pool_type={encoder.pool_type!r} (supported: 'tok', 'avg')")
    if encoder.conv1.bias is not None:
        refuse("its patch convolution has a bias")
    norms = [encoder.ln_pre, encoder.ln_post] + [m for b in encoder.transformer.resblocks for m in (b.ln_1, b.ln_2)]
    if any(not isinstance(n, (LayerNorm, LayerNormFp32, nn.LayerNorm)) or n.weight is None for n in norms):
        refuse("a norm layer is not an affine LayerNorm")
    for i, block in enumerate(encoder.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            refuse(f"block {i} is a {type(block).__name__}, not a self-attention ResidualAttentionBlock")
        if list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"]:
            refuse(f"block {i}'s MLP is {list(block.mlp._modules)}, not c_fc, gelu, c_proj")
        attn = block.attn
        if (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None
                or attn.add_zero_attn):
            refuse(f"block {i}'s attention is not a plain MultiheadAttention with one input projection and biases")


GATHER_BYTES = 64 * 2**20
"""Most bytes of per-row low-rank factors one matrix's update may gather for the batched products (``N (m + n) r``
float32 values); above it the update runs set by set (e.g. ViT-B's MLP on a large batch)."""


class BatchedSecondPass:
    """Runs a mixed batch through ``theta_0`` plus each image's :class:`SetUpdate` in one forward.

    Args:
        encoder: the open_clip ``VisionTransformer`` holding ``theta_0`` (its weights are read, its modules'
            activation and norm types reused; it is not changed), on the device the images come on, in eval mode.
    """

    def __init__(self, encoder: nn.Module) -> None:
        check_supported(encoder)
        self.encoder = encoder.eval()
        self.names = {id(p): n for n, p in encoder.named_parameters()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, groups: Mapping[object, Sequence[int]],
                 updates: Mapping[object, SetUpdate]) -> torch.Tensor:
        """Features ``(N, D)`` of ``images`` ``(N, 3, H, W)``; ``groups`` maps a set to its rows (every row in
        exactly one set), ``updates`` each set to its :class:`SetUpdate`."""
        n = images.shape[0]
        keys = list(groups)
        order = torch.tensor([r for k in keys for r in groups[k]], dtype=torch.long, device=images.device)
        if order.numel() != n or torch.unique(order).numel() != n:
            raise ValueError(f"groups must hold every row of the batch of {n} exactly once; they hold "
                             f"{order.numel()} rows, {torch.unique(order).numel()} distinct.")
        bounds, start = [], 0
        for k in keys:
            bounds.append((start, start + len(groups[k])))
            start += len(groups[k])
        sets = [updates[k] for k in keys]
        index = torch.repeat_interleave(torch.arange(len(keys), device=images.device),
                                        torch.tensor([e - s for s, e in bounds], device=images.device))
        run = _Run(self, sets, bounds, index)
        out = run.forward(images[order])
        result = torch.empty_like(out)
        result[order] = out
        return result


class _Run:
    """One batched forward: the sets' updates, their row slices in the sorted batch, and each row's set."""

    def __init__(self, owner: BatchedSecondPass, sets: Sequence[SetUpdate], bounds: Sequence[tuple[int, int]],
                 index: torch.Tensor) -> None:
        self.owner, self.sets, self.bounds, self.index = owner, sets, bounds, index
        self._rows: dict[str, torch.Tensor] = {}

    def _name(self, p: torch.Tensor) -> str:
        return self.owner.names[id(p)]

    def _per_row(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """``base`` plus each row's set update of ``name``: ``(N, *base.shape)``, or ``(1, *base.shape)`` when no set
        changes it; computed once per run."""
        if name not in self._rows:
            deltas = [s.matrix(name) for s in self.sets]
            if all(d is None for d in deltas):
                self._rows[name] = base.unsqueeze(0)
            else:
                zero = torch.zeros((), device=base.device)
                table = base.float() + torch.stack([zero.expand(base.shape) if d is None else d.to(base.device)
                                                    for d in deltas])
                self._rows[name] = table[self.index].to(base.dtype)
        return self._rows[name]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x (N, ..., n) -> (N, ..., m)``: ``F.linear`` with ``theta_0``'s weight, plus each set's update."""
        b_rows = self._per_row(self._name(bias), bias) if bias is not None else None
        per_row_bias = b_rows is not None and b_rows.shape[0] > 1
        y = F.linear(x, weight, None if per_row_bias else bias)
        self._add_update(y, x, self._name(weight), transposed=False)
        if per_row_bias:
            y += b_rows.to(y.dtype).view(b_rows.shape[0], *([1] * (y.ndim - 2)), -1)
        return y

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An affine LayerNorm with each row's scale and bias (open_clip's casts kept)."""
        from open_clip.transformer import LayerNormFp32

        orig = x.dtype
        x_in = x.float() if isinstance(module, LayerNormFp32) else x
        x_hat = F.layer_norm(x_in, module.normalized_shape, None, None, module.eps)
        w = self._per_row(self._name(module.weight), module.weight)
        b = self._per_row(self._name(module.bias), module.bias)
        shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (-1,)
        return (x_hat * w.view(shape) + b.view(shape)).to(orig)

    def scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """LayerScale with each row's gamma, or the identity."""
        gamma = getattr(module, "gamma", None)
        if gamma is None:
            return module(x)
        g = self._per_row(self._name(gamma), gamma)
        return x * g.view(g.shape[0], *([1] * (x.ndim - 2)), -1).to(x.dtype)

    def attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        n, length, d = x.shape
        heads = attn.num_heads
        qkv = self.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, length, d)
        return self.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.owner.encoder
        conv = enc.conv1
        x = conv(images)
        w_name = self._name(conv.weight)
        for s, (a, b) in zip(self.sets, self.bounds):
            if w_name in s.dense:
                x[a:b] += F.conv2d(images[a:b], s.dense[w_name].to(x.dtype), stride=conv.stride, padding=conv.padding)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, grid ** 2, width)
        cls = self._per_row(self._name(enc.class_embedding), enc.class_embedding)
        x = torch.cat([cls.to(x.dtype).expand(x.shape[0], -1).unsqueeze(1), x], dim=1)
        x = x + self._per_row(self._name(enc.positional_embedding), enc.positional_embedding).to(x.dtype)
        x = self.norm(enc.ln_pre, x)
        for block in enc.transformer.resblocks:
            x = x + self.scale(block.ls_1, self.attention(block, self.norm(block.ln_1, x)))
            h = self.linear(self.norm(block.ln_2, x), block.mlp.c_fc.weight, block.mlp.c_fc.bias)
            h = self.linear(block.mlp.gelu(h), block.mlp.c_proj.weight, block.mlp.c_proj.bias)
            x = x + self.scale(block.ls_2, h)
        if getattr(enc, "final_ln_after_pool", False):
            pooled, _ = enc._global_pool(x)
            pooled = self.norm(enc.ln_post, pooled)
        else:
            pooled, _ = enc._global_pool(self.norm(enc.ln_post, x))
        if enc.proj is None:
            return pooled
        out = pooled @ enc.proj
        self._add_update(out, pooled, self._name(enc.proj), transposed=True)  # proj is (width, out): x @ W
        return out

    def _add_update(self, y: torch.Tensor, x: torch.Tensor, name: str, transposed: bool) -> None:
        """``y += x @ Delta^T`` (``x @ Delta`` when ``transposed``) row by row, ``Delta`` each row's set update of
        the matrix ``name``. Low-rank updates run as two batched products over per-row factors padded to the largest
        rank when those fit in :data:`GATHER_BYTES`, else set by set on the set's rows; dense ones set by set."""
        low = [(s.low_rank[name], bounds) for s, bounds in zip(self.sets, self.bounds) if name in s.low_rank]
        if low:
            # Delta = A B^T; x Delta^T = (x B) A^T, and x Delta = (x A) B^T: "inner" meets x, "outer" leaves
            inner = [(A if transposed else B) for (A, B), _ in low]
            outer = [(B if transposed else A) for (A, B), _ in low]
            rank = max(f.shape[1] for f in inner)
            n, m = inner[0].shape[0], outer[0].shape[0]
            if len(low) == len(self.sets) and y.shape[0] * (n + m) * rank * 4 <= GATHER_BYTES:
                def table(fs):
                    return torch.stack([F.pad(f, (0, rank - f.shape[1])) for f in fs])[self.index].to(x.dtype)
                xs = x if x.ndim == 3 else x.unsqueeze(1)
                ys = y if y.ndim == 3 else y.unsqueeze(1)
                ys += torch.bmm(torch.bmm(xs, table(inner)), table(outer).transpose(1, 2))
            else:
                for (i, o), (_, (a, b)) in zip(zip(inner, outer), low):
                    y[a:b] += (x[a:b] @ i.to(x.dtype)) @ o.T.to(x.dtype)
        for s, (a, b) in zip(self.sets, self.bounds):
            if name in s.dense:
                d = s.dense[name].to(x.dtype)
                y[a:b] += x[a:b] @ d if transposed else F.linear(x[a:b], d)


__all__ = ["BatchedSecondPass", "SetUpdate", "check_supported", "set_update"]
