"""The two small architectures the alignment chapter trains from scratch, each with its permutation spec.

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
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

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


def build_model(arch: str, in_shape: Sequence[int], num_classes: int, widths: Sequence[int],
                blocks: int = 1) -> tuple[nn.Module, PermutationSpec]:
    """A freshly initialized model of ``arch`` (``"mlp"`` or ``"resnet"``) and its permutation spec.

    Args:
        arch: ``"mlp"`` or ``"resnet"``.
        in_shape: one input's shape, ``(C, H, W)``.
        num_classes: classes.
        widths: hidden widths (MLP) or channels per stage (ResNet).
        blocks: basic blocks per stage (ResNet only).
    """
    if arch == "mlp":
        d_in = 1
        for s in in_shape:
            d_in *= int(s)
        return MLP(d_in, widths, num_classes), mlp_spec(len(widths))
    if arch == "resnet":
        return ResNet(int(in_shape[0]), widths, blocks, num_classes), resnet_spec(len(widths), blocks)
    raise ValueError(f"arch={arch!r} is not a supported architecture; use 'mlp' or 'resnet'.")
