"""open_clip's vision-transformer parameter names, interpreted in one place.

Every other module asks this one which kind a parameter is (:func:`layer_kind`), in which order the
layers run (:func:`layer_order`), whether TSV decomposes it (:func:`is_decomposed`) and how
parameters group into blocks (:func:`layer_groups`). The tiny and the clip benchmarks share these
names (the tiny encoder is open_clip's own ``VisionTransformer``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch

LAYER_KINDS = ("attn_in_proj", "attn_out_proj", "mlp_c_fc", "mlp_c_proj", "positional_embedding", "proj",
               "conv1", "text_projection", "other")
"""Layer kinds of open_clip's vision transformer (see :func:`layer_kind`)."""

DECOMPOSED_KINDS = ("attn_in_proj", "attn_out_proj", "mlp_c_fc", "mlp_c_proj", "positional_embedding", "proj")
"""Kinds that TSV decomposes (2-D). ``conv1`` (4-D), ``text_projection`` and ``other`` are averaged."""

# ----------------------------------------------------------------------------- which tensors
def layer_kind(name: str, shape: Sequence[int] | torch.Size | None = None) -> str:
    """The kind of an open_clip vision-transformer parameter, from its name (and shape).

    Returns one of :data:`LAYER_KINDS`: ``attn_in_proj`` (``(3 d, d)``), ``attn_out_proj`` (``(d, d)``),
    ``mlp_c_fc`` (``(4 d, d)``), ``mlp_c_proj`` (``(d, 4 d)``), ``positional_embedding``
    (``(tokens, d)``), ``proj`` (the visual projection ``(d, d_embed)``), ``conv1`` (the 4-D patch
    stem), ``text_projection``, or ``other`` (biases, LayerNorm, class embedding, anything else; a
    2-D tensor of another name is ``other`` but still decomposed, see :func:`is_decomposed`).
    """
    leaf = name.split(".")
    if "text_projection" in name:
        return "text_projection"
    if name.endswith("attn.in_proj_weight"):
        return "attn_in_proj"
    if name.endswith("attn.out_proj.weight"):
        return "attn_out_proj"
    if name.endswith("mlp.c_fc.weight"):
        return "mlp_c_fc"
    if name.endswith("mlp.c_proj.weight"):
        return "mlp_c_proj"
    if leaf[-1] == "positional_embedding":
        return "positional_embedding"
    if leaf[-1] == "proj" and (shape is None or len(shape) == 2):
        return "proj"
    if name.endswith("conv1.weight"):
        return "conv1"
    return "other"


def layer_order(names: Iterable[str]) -> list[str]:
    """Parameter names from input to output: stem and ``positional_embedding``, then the residual
    blocks in depth order (their own order kept within a block), then ``ln_post`` and ``proj``."""
    names = list(names)

    def depth(item: tuple[int, str]) -> tuple[float, int]:
        i, name = item
        parts = name.split(".")
        if "resblocks" in parts:
            return float(parts[parts.index("resblocks") + 1]), i
        if parts[0] in ("ln_post", "proj", "text_projection"):
            return math.inf, i
        return -1.0, i

    return [name for _, name in sorted(enumerate(names), key=depth)]


def is_decomposed(name: str, tensor: torch.Tensor) -> bool:
    """Whether TSV decomposes this parameter: every 2-D tensor except ``text_projection``."""
    return tensor.ndim == 2 and "text_projection" not in name

# ----------------------------------------------------------------------------- per-layer geometry
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn|mlp|ln_1|ln_2)\b")


def layer_groups(keys: Sequence[str], by: str = "block") -> dict[str, list[str]]:
    """Group state-dict keys into layers, in model order.

    Args:
        keys: parameter names (open_clip ``VisionTransformer`` names group best).
        by: ``"parameter"`` (one group per tensor), ``"block"`` (``embedding``, ``block{i}.attn``,
            ``block{i}.mlp``, ``block{i}.norm``, ``output``; unknown names keep their own group) or
            ``"all"`` (one group, ``"total"``).
    """
    keys = list(keys)
    if by == "parameter":
        return {k: [k] for k in keys}
    if by == "all":
        return {"total": keys}
    if by != "block":
        raise ValueError(f"by={by!r} is not valid; use 'parameter', 'block' or 'all'.")
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            part = {"attn": "attn", "mlp": "mlp", "ln_1": "norm", "ln_2": "norm"}[m.group(2)]
            name = f"block{m.group(1)}.{part}"
        elif k.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
            name = "embedding"
        elif k.split(".")[0] in ("ln_post", "proj"):
            name = "output"
        else:
            name = k
        groups.setdefault(name, []).append(k)
    def block_order(group: str) -> tuple[int, int]:
        index, part = group[len("block"):].split(".")
        return int(index), ["attn", "mlp", "norm"].index(part)

    order = ["embedding"] + sorted((g for g in groups if g.startswith("block")), key=block_order)
    order += [g for g in groups if g not in order and g != "output"] + (["output"] if "output" in groups else [])
    return {g: groups[g] for g in order if g in groups}


def short_name(name: str) -> str:
    """A parameter name shortened for tables and axes: ``transformer.resblocks.3.mlp.c_fc.weight`` ->
    ``3.mlp.c_fc`` (the block prefix and the ``weight`` suffix dropped)."""
    return name.replace("transformer.resblocks.", "").replace(".weight", "").replace("_weight", "")
