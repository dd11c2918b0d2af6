"""MASS's routing features: the class token where a block's routing matrix reads its input, taken by forward hooks.

The class token is read on the axis the encoder's layout puts the batch on: open_clip's ``Transformer`` runs
batch-first ``(N, L, D)`` by default and sequence-first ``(L, N, D)`` when ``batch_first`` is false (open_clip <= 2.0
always did); the official code's ``x[0]`` assumes the latter. Both the ``tiny`` and the ``clip`` encoders are
open_clip ``VisionTransformer`` s, so one hook serves both. :mod:`mergelab.merging.mass` routes on these features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ROUTING_MATRICES = ("mlp.c_fc", "attn.in_proj", "mlp.c_proj")
"""Task matrices a router can project onto; each is read at its own input (see :data:`_READ_AT`)."""

_READ_AT = {"mlp.c_fc": ("mlp", "input"), "attn.in_proj": ("ln_1", "output"), "mlp.c_proj": ("mlp.c_proj", "input")}
"""Where the features a routing matrix multiplies are taken in a block: ``mlp.c_fc`` reads the MLP's
input (``ln_2``'s output), ``attn.in_proj`` reads ``ln_1``'s output, ``mlp.c_proj`` the MLP's hidden
activations. (``attn.out_proj`` is applied inside ``nn.MultiheadAttention`` without a module call, so
no hook sees its input.)"""


class _Captured(Exception):
    """Raised by a hook once every feature asked for is captured: the rest of the forward is skipped."""


def _tokens_layout(encoder: nn.Module) -> tuple[bool | None, int | None]:
    """``(batch_first, tokens)``: the transformer's declared layout (``None`` when it does not say) and
    the number of tokens (rows of ``positional_embedding``)."""
    transformer = getattr(encoder, "transformer", None)
    batch_first = getattr(transformer, "batch_first", None)
    pos = getattr(encoder, "positional_embedding", None)
    return (None if batch_first is None else bool(batch_first)), (int(pos.shape[0]) if pos is not None else None)


def class_token(x: torch.Tensor, batch_size: int, batch_first: bool | None, tokens: int | None = None) -> torch.Tensor:
    """The class token ``(N, D)`` of a block's activations ``(N, L, D)`` (batch-first) or ``(L, N, D)``.

    ``batch_first=None`` infers the layout from the shape (the batch axis has ``batch_size`` entries,
    the token axis ``tokens``). A shape that contradicts the layout is an error, not a silent read of
    the first image's tokens.
    """
    if x.ndim != 3:
        raise ValueError(f"expected block activations (N, L, D) or (L, N, D); got shape {tuple(x.shape)}.")
    if batch_first is None:
        fits = [bf for bf in (True, False) if x.shape[0 if bf else 1] == batch_size
                and (tokens is None or x.shape[1 if bf else 0] == tokens)]
        if len(fits) != 1:
            raise ValueError(f"cannot tell the token layout of activations {tuple(x.shape)} for a batch of "
                             f"{batch_size} images with {tokens} tokens; set the encoder's transformer.batch_first.")
        batch_first = fits[0]
    axis = 0 if batch_first else 1
    if x.shape[axis] != batch_size or (tokens is not None and x.shape[1 - axis] != tokens):
        raise ValueError(f"activations of shape {tuple(x.shape)} do not fit the {'batch' if batch_first else 'sequence'}"
                         f"-first layout for a batch of {batch_size} images with {tokens} tokens: the class token "
                         "would be read on the wrong axis.")
    return x[:, 0] if batch_first else x[0]


@torch.no_grad()
def block_features(encoder: nn.Module, images: torch.Tensor, points: Sequence[tuple[int, str]]
                   ) -> dict[tuple[int, str], torch.Tensor]:
    """Class-token features ``(N, d)`` where each ``(block, routing matrix)`` of ``points`` reads its input.

    The forward stops once the deepest point is captured. ``encoder`` is an open_clip
    ``VisionTransformer`` (``transformer.resblocks``), already on the images' device and in eval mode.
    """
    if not points:
        return {}
    for _, matrix in points:
        if matrix not in _READ_AT:
            raise ValueError(f"routing_matrix={matrix!r} is not valid; use one of {', '.join(ROUTING_MATRICES)}.")
    batch_first, tokens = _tokens_layout(encoder)
    n = images.shape[0]
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook_for(point: tuple[int, str], kind: str):
        def take(x: torch.Tensor) -> None:
            captured[point] = class_token(x, n, batch_first, tokens).float()
            if len(captured) == len(set(points)):
                raise _Captured

        if kind == "input":
            return lambda module, args: take(args[0])
        return lambda module, args, output: take(output)

    try:
        for point in set(points):
            block, matrix = point
            name, kind = _READ_AT[matrix]
            module = encoder.get_submodule(f"transformer.resblocks.{block}.{name}")
            hook = hook_for(point, kind)
            handles.append(module.register_forward_pre_hook(hook) if kind == "input" else module.register_forward_hook(hook))
        try:
            encoder(images)
        except _Captured:
            pass
    finally:
        for h in handles:
            h.remove()
    return captured
