"""The small architectures the alignment chapter trains from scratch, each with its permutation spec.

* :class:`MLP`: ``d_in -> widths[0] -> ... -> widths[-1] -> num_classes`` with ReLU; layer ``i``'s
  hidden units form the group ``P_i``.
* :class:`ResNet`: a small pre-classifier ResNet for small images (``(C, H, W)``, e.g. ``(1, 8, 8)``):
  a 3x3 stem, stages of basic blocks (two 3x3 convs each, the first block of every later stage with
  stride 2 and a 1x1 shortcut), global average pooling and a linear classifier. Normalization is
  **LayerNorm** over channels and positions (``GroupNorm`` with one group, per-channel affine), as in
  the official C2M3 ResNet-20: it has no running statistics, so averaging does not reset them and
  REPAIR has work to do. Convolutions carry a bias so that REPAIR can fold its affine correction into
  them. Groups: one residual-stream permutation per stage (``P_res<s>``: stem, every block's second
  conv and norm, the shortcut conv, the classifier's input) and one inner permutation per block
  (``P_<s>_<b>_inner``).
* :func:`vit_classifier`: open_clip's own ``VisionTransformer`` (the ``tiny`` benchmark's encoder class,
  :func:`mergelab.models.build_tiny_encoder`) as a classifier: its projection ``proj`` maps the CLS token
  to the class logits, and its patch embedding ``conv1`` reads the images' channels. Groups
  (:func:`vit_spec`): one permutation ``P_res`` of the residual stream, shared by everything that writes
  or reads it (patch embedding, class and positional embeddings, every LayerNorm, the attention's input and
  output projections, the MLPs' ``c_fc`` columns and ``c_proj`` rows, ``proj``'s rows), and one per block
  for the MLP's hidden units (``P_mlp<i>``). Inside the attention nothing is permuted. Its own symmetries
  (heads permuted as blocks; within a head, its query and key channels permuted together, and its value
  channels with the matching columns of ``out_proj``) act on slices of ``in_proj_weight``'s rows, which stack
  the queries, keys and values of every head, and a group of a :class:`~.specs.PermutationSpec` permutes a
  whole axis. Beyond permutations, any invertible ``A`` applied to a head's queries with ``A^-T`` on its keys
  leaves their products unchanged (and likewise for its values and ``out_proj``), a continuous symmetry that
  no permutation of units undoes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..utils import check_integer
from .specs import PermutationSpec


class MLP(nn.Module):
    """Fully connected ReLU network; input ``(batch, d_in)`` (images are flattened), output logits
    ``(batch, num_classes)``. Layers are ``fc0 .. fc<L>``, ``fc<L>`` the classifier."""

    def __init__(self, d_in: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        dims = [d_in, *widths, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def mlp_spec(num_hidden: int) -> PermutationSpec:
    """The MLP's spec: hidden layer ``i``'s rows and bias by ``P_i``, the next layer's columns by
    ``P_i``; input and output not permuted."""
    axes: dict[str, tuple[str | None, ...]] = {}
    for i in range(num_hidden + 1):
        rows = f"P_{i}" if i < num_hidden else None
        cols = f"P_{i - 1}" if i > 0 else None
        axes[f"layers.{i}.weight"] = (rows, cols)
        axes[f"layers.{i}.bias"] = (rows,)
    return PermutationSpec(axes)


def layer_norm_2d(channels: int) -> nn.GroupNorm:
    """LayerNorm over ``(C, H, W)`` with a per-channel scale and shift (GroupNorm with one group)."""
    return nn.GroupNorm(1, channels)


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``; shortcut is the identity or a 1x1
    conv and norm when the width or resolution changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.norm1 = layer_norm_2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.norm2 = layer_norm_2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), layer_norm_2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: input ``(batch, in_channels, H, W)``, output logits ``(batch, num_classes)``.

    Args:
        in_channels: image channels.
        widths: channels per stage; stage ``s > 0`` halves the resolution.
        blocks: basic blocks per stage.
        num_classes: classes.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        self.stem_norm = layer_norm_2d(widths[0])
        stages, c = [], widths[0]
        for s, w in enumerate(widths):
            stage = [BasicBlock(c if b == 0 else w, w, 2 if (s > 0 and b == 0) else 1) for b in range(blocks)]
            stages.append(nn.Sequential(*stage))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_onednn():
            x = F.relu(self.stem_norm(self.stem(x)))
            x = self.stages(x)
            return self.head(x.mean(dim=(2, 3)))


@contextlib.contextmanager
def no_onednn() -> Iterator[None]:
    """Convolutions without oneDNN (mkldnn): with ``OMP_NUM_THREADS=1``, torch 2.14's oneDNN convolutions
    of these few-channel 8x8 inputs corrupted the heap (``malloc(): smallbin double linked list
    corrupted``, reproduced 2 of 2 times with widths (4, 8); 0 of 3 without oneDNN). Use it around the
    backward pass too."""
    with warnings.catch_warnings():  # setting the flags warns about Intel GPUs' TF32 on every call
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def resnet_spec(num_stages: int, blocks: int) -> PermutationSpec:
    """The ResNet's spec (see the module docstring for the groups)."""
    axes: dict[str, tuple[str | None, ...]] = {}

    def conv(name: str, rows: str | None, cols: str | None) -> None:
        axes[f"{name}.weight"] = (rows, cols, None, None)
        axes[f"{name}.bias"] = (rows,)

    def norm(name: str, g: str) -> None:
        axes[f"{name}.weight"] = (g,)
        axes[f"{name}.bias"] = (g,)

    conv("stem", "P_res0", None)
    norm("stem_norm", "P_res0")
    for s in range(num_stages):
        res_in, res = f"P_res{max(s - 1, 0)}", f"P_res{s}"
        for b in range(blocks):
            inner, prefix = f"P_{s}_{b}_inner", f"stages.{s}.{b}"
            reads = res_in if b == 0 else res
            conv(f"{prefix}.conv1", inner, reads)
            norm(f"{prefix}.norm1", inner)
            conv(f"{prefix}.conv2", res, inner)
            norm(f"{prefix}.norm2", res)
            if s > 0 and b == 0:
                conv(f"{prefix}.shortcut.0", res, reads)
                norm(f"{prefix}.shortcut.1", res)
    axes["head.weight"] = (None, f"P_res{num_stages - 1}")
    axes["head.bias"] = (None,)
    return PermutationSpec(axes)


class _PatchEmbedding(nn.Conv2d):
    """The ViT's patch embedding (``conv1``, no bias) run without oneDNN, like the ResNet's convolutions
    (:func:`no_onednn`): its input is the same few-channel 8x8 images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_onednn():
            return super().forward(x)


def vit_classifier(in_shape: Sequence[int], num_classes: int, width: int, layers: int, heads: int,
                   patch_size: int) -> nn.Module:
    """open_clip's ``VisionTransformer`` as a classifier of images ``(batch, C, S, S)``: output logits
    ``(batch, num_classes)`` (the CLS token after ``ln_post``, times ``proj`` of shape ``(width, num_classes)``).

    Args:
        in_shape: one input's shape ``(C, S, S)`` (square images; ``patch_size`` must divide ``S``).
        num_classes: classes (the tower's ``output_dim``).
        width: the residual stream's width; the MLP's hidden width is ``4 * width``.
        layers: residual attention blocks.
        heads: attention heads per block (must divide ``width``).
        patch_size: patch side in pixels.
    """
    from ..models import TinyViTConfig, build_tiny_encoder

    if len(in_shape) != 3:
        raise ValueError(f"in_shape={tuple(in_shape)} is not valid for the ViT; give one image's shape (C, S, S).")
    channels, height, side = (int(s) for s in in_shape)
    if height != side:
        raise ValueError(f"in_shape={tuple(in_shape)} is not valid for the ViT; it needs square images (C, S, S).")
    model = build_tiny_encoder(TinyViTConfig(image_size=side, patch_size=patch_size, width=width, layers=layers,
                                             heads=heads, output_dim=num_classes))
    model.conv1 = _PatchEmbedding(channels, width, patch_size, patch_size, bias=False)  # open_clip's reads 3 channels
    return model


def vit_spec(layers: int) -> PermutationSpec:
    """The spec of :func:`vit_classifier`'s ``layers`` blocks, in open_clip's parameter names: those of the default
    ``VisionTransformer`` (e.g. ViT-B-32's ``model.visual``); variants with LayerScale, no ``ln_pre`` or an
    attentional pooler have other parameters, which :meth:`~.specs.PermutationSpec.validate` names. See the
    module docstring for the groups."""
    check_integer("layers", layers)
    res = "P_res"
    axes: dict[str, tuple[str | None, ...]] = {
        "conv1.weight": (res, None, None, None), "class_embedding": (res,), "positional_embedding": (None, res),
        "ln_pre.weight": (res,), "ln_pre.bias": (res,), "ln_post.weight": (res,), "ln_post.bias": (res,),
        "proj": (res, None)}
    for i in range(layers):
        block, hidden = f"transformer.resblocks.{i}", f"P_mlp{i}"
        for norm in ("ln_1", "ln_2"):
            axes[f"{block}.{norm}.weight"] = (res,)
            axes[f"{block}.{norm}.bias"] = (res,)
        axes[f"{block}.attn.in_proj_weight"] = (None, res)  # rows: the stacked q, k, v of every head (not permuted)
        axes[f"{block}.attn.in_proj_bias"] = (None,)
        axes[f"{block}.attn.out_proj.weight"] = (res, None)
        axes[f"{block}.attn.out_proj.bias"] = (res,)
        axes[f"{block}.mlp.c_fc.weight"] = (hidden, res)
        axes[f"{block}.mlp.c_fc.bias"] = (hidden,)
        axes[f"{block}.mlp.c_proj.weight"] = (res, hidden)
        axes[f"{block}.mlp.c_proj.bias"] = (res,)
    return PermutationSpec(axes)


ARCHITECTURES = ("mlp", "resnet", "vit")
"""What :func:`build_model` builds."""


def check_vit_settings(arch: str, widths: Sequence[int], heads: int | None, patch_size: int | None) -> None:
    """The ViT's settings, checked where a model is configured and where it is built: ``heads`` and ``patch_size``
    are required for ``arch="vit"`` (positive integers, ``heads`` dividing the one width) and refused, by name,
    for the other architectures. ``patch_size`` against the images' side is checked by :func:`vit_classifier`."""
    vit = {"heads": heads, "patch_size": patch_size}
    if arch != "vit":
        given = {k: v for k, v in vit.items() if v is not None}
        if given:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} "
                             f"{'is a ViT setting; leave it' if len(given) == 1 else 'are ViT settings; leave them'} "
                             f"out for arch={arch!r}.")
        return
    for name, value in vit.items():
        if value is None:
            raise ValueError(f"{name} is missing; the ViT needs heads (dividing the width) and patch_size "
                             "(dividing the images' side), e.g. heads: 2, patch_size: 2.")
        check_integer(name, value)
    if len(widths) != 1:
        raise ValueError(f"widths={list(widths)} is not valid for the ViT; give one entry, the residual "
                         "stream's width (the number of blocks is `blocks`).")
    if int(widths[0]) % int(heads):
        raise ValueError(f"heads={heads} is not valid; it must divide the width {widths[0]} "
                         f"(e.g. {[h for h in range(1, int(widths[0]) + 1) if int(widths[0]) % h == 0][:6]}).")


def build_model(arch: str, in_shape: Sequence[int], num_classes: int, widths: Sequence[int],
                blocks: int = 1, heads: int | None = None, patch_size: int | None = None,
                ) -> tuple[nn.Module, PermutationSpec]:
    """A freshly initialized model of ``arch`` (one of :data:`ARCHITECTURES`) and its permutation spec.

    Args:
        arch: ``"mlp"``, ``"resnet"`` or ``"vit"``.
        in_shape: one input's shape, ``(C, H, W)``.
        num_classes: classes.
        widths: hidden widths (MLP), channels per stage (ResNet) or ``[width]``, the residual stream's
            width (ViT, one entry).
        blocks: basic blocks per stage (ResNet) or residual attention blocks (ViT).
        heads, patch_size: attention heads per block and patch side in pixels (ViT only, required there).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not a supported architecture; use one of {', '.join(ARCHITECTURES)}.")
    check_vit_settings(arch, widths, heads, patch_size)
    if arch == "vit":
        return (vit_classifier(in_shape, num_classes, int(widths[0]), blocks, heads, patch_size),
                vit_spec(blocks))
    if arch == "mlp":
        d_in = 1
        for s in in_shape:
            d_in *= int(s)
        return MLP(d_in, widths, num_classes), mlp_spec(len(widths))
    return ResNet(int(in_shape[0]), widths, blocks, num_classes), resnet_spec(len(widths), blocks)
