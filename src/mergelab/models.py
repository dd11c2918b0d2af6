"""Image encoders and frozen classification heads.

The ``tiny`` encoder is open_clip's own :class:`open_clip.transformer.VisionTransformer`, the class
behind ViT-B-32's image tower, at laptop size: its state dict has the same parameter names and layer
kinds (``conv1.weight``, ``positional_embedding``, ``transformer.resblocks.{i}.attn.in_proj_weight``,
``...mlp.c_fc.weight``, ``proj``, ...), so every merge method and analysis runs unchanged on both sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .utils import StateDict, check_integer, check_number, eval_mode


@dataclass(frozen=True)
class TinyViTConfig:
    """Shape of the tiny vision transformer.

    Attributes:
        image_size: input side in pixels (images are ``(3, image_size, image_size)``).
        patch_size: patch side in pixels; ``(image_size / patch_size) ** 2`` tokens plus a class token.
        width: token dimension ``d``.
        layers: number of residual attention blocks.
        heads: attention heads per block (``width`` must be divisible by it).
        mlp_ratio: hidden size of each MLP as a multiple of ``width``.
        output_dim: dimension of the projected image embedding (``proj`` is ``(width, output_dim)``).
    """

    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    output_dim: int = 64

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "output_dim"):
            check_integer(name, getattr(self, name))
        check_number("mlp_ratio", self.mlp_ratio, low=0, low_open=True)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}; "
                f"valid: one of {[p for p in range(1, self.image_size + 1) if self.image_size % p == 0]}."
            )
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}.")


def build_tiny_encoder(cfg: TinyViTConfig | None = None) -> nn.Module:
    """A randomly initialized open_clip ``VisionTransformer`` of the given shape.

    Input ``(B, 3, H, W)`` normalized images; output ``(B, output_dim)`` embeddings.
    """
    from open_clip.transformer import VisionTransformer

    cfg = cfg or TinyViTConfig()
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.output_dim,
    )


class ClassificationHead(nn.Module):
    """A frozen CLIP-style head: ``logits = logit_scale * normalize(features) @ normalize(weight).T``.

    Args:
        weight: ``(n_classes, d)`` class embeddings (text prototypes for CLIP, feature prototypes for
            ``tiny``); rows are L2-normalized here.
        logit_scale: temperature multiplier (CLIP uses ``logit_scale.exp()`` = 100).
    """

    def __init__(self, weight: torch.Tensor, logit_scale: float = 100.0) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"head weight must be (n_classes, d); got shape {tuple(weight.shape)}.")
        self.register_buffer("weight", F.normalize(weight.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    def digest(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights and scale: part of every cache key that
        depends on the head."""
        blob = self.weight.detach().cpu().contiguous().numpy().tobytes() + repr(self.logit_scale).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` features to ``(B, n_classes)`` logits."""
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.T


def load_encoder_state(encoder: nn.Module, state: StateDict) -> nn.Module:
    """Load ``state`` into ``encoder`` strictly, with an error naming the first mismatch."""
    own = encoder.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"state dict is missing parameter {key!r} of shape {tuple(value.shape)}; "
                             "is it a checkpoint of a different architecture?")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"parameter {key!r} has shape {tuple(state[key].shape)} in the state dict "
                             f"but {tuple(value.shape)} in the model: a different architecture.")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"state dict has parameter {extra[0]!r} that the model does not have "
                         f"({len(extra)} unexpected in all): a different architecture.")
    encoder.load_state_dict(state, strict=True)
    return encoder


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512,
           device: torch.device | str = "cpu",
           forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Embeddings of ``images`` ``(N, 3, H, W)`` as ``(N, output_dim)`` float32 on the CPU.

    ``forward(encoder, batch)``: how a batch on ``device`` is encoded (a benchmark's ``eval_features``, which
    runs its evaluations' arithmetic); default ``encoder(batch)`` in the encoder's own dtype.

    The encoder runs in eval mode and is given back in its own; like ``nn.Module.to``, moving it to ``device``
    happens in place (it stays there, so that repeated calls do not copy it back and forth)."""
    encoder = encoder.to(device)
    run = forward or (lambda module, batch: module(batch))
    with eval_mode(encoder):
        out = [run(encoder, images[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
