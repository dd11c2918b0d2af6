"""open_clip models for the ``clip`` size: loading, zero-shot heads from the text tower, precision.

Only the image tower (``model.visual``) is fine-tuned and merged; its state dict has the same names
as the ``tiny`` encoder's. The text tower is used once, to build each task's zero-shot head (class
names times prompt templates through the text encoder, normalized, averaged over templates,
normalized again; logits scaled by ``logit_scale.exp()``), and then dropped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import paths
from ...utils import atomic_write_text, check_integer, eval_mode

TINY_MODEL = "mergelab-tiny-ViT-32"
"""A laptop-sized CLIP (2-layer, width-64 towers, 224 px, patch 32) registered with open_clip for smoke
tests; any open_clip name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``) works the same way."""

_TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights could not be loaded; the message says where they were looked for and how to get them."""


@dataclass(frozen=True)
class ClipModelConfig:
    """Which open_clip model to start from, and where its files live.

    Attributes:
        name: open_clip architecture (``"ViT-B-32"``, ``"ViT-B-16"``, ``"ViT-L-14"``, ...).
        pretrained: open_clip pretrained tag (``"openai"``), a local checkpoint file, or ``None`` for a
            randomly initialized model (seeded by ``init_seed``; tests and smoke runs).
        cache_dir: where open_clip downloads weights; ``None``: ``$MERGELAB_CLIP_WEIGHTS_DIR``, else
            ``<data>/clip/weights``.
        init_seed: seed of the random initialization when ``pretrained`` is ``None``.
        experts_dir: a folder of existing expert checkpoints to import instead of fine-tuning
            (``None``: ``$MERGELAB_CLIP_EXPERTS_DIR`` when set, else fine-tune); see
            :func:`mergelab.benchmarks.clip.checkpoints.find_expert_checkpoint` for the accepted layouts.
        precision: arithmetic of fine-tuning and evaluation on GPU: ``"fp32"`` (the public recipe, the
            default), or mixed precision: ``"auto"`` (bf16 on GPUs with native bf16, compute capability
            >= 8.0, else fp16), ``"bf16"``, ``"fp16"``. CPU always runs fp32.
        allow_pickle: let expert and head checkpoints that are pickled modules (the task-vector release's
            ``finetuned.pt`` and ``head_<Task>.pt``) be unpickled. Unpickling runs code the file names, so
            it is off by default: such files are refused with a message naming this option.
        quick_gelu: the MLP activation of weights read from a local checkpoint file, which the file does not
            carry: ``True`` for OpenAI's weights (QuickGELU), ``False`` for weights trained with GELU (e.g.
            LAION's). Required with a file unless the architecture's name says it (``*-quickgelu``); with a
            tag it must agree with the tag or be ``None``.
    """

    name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    init_seed: int = 0
    experts_dir: str | None = None
    precision: str = "fp32"
    allow_pickle: bool = False
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"model precision={self.precision!r} is not valid; use one of {', '.join(PRECISIONS)}.")
        if not isinstance(self.allow_pickle, bool):
            raise ValueError(f"model allow_pickle={self.allow_pickle!r} is not valid; use true (unpickle trusted "
                             "checkpoints) or false.")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ValueError(f"model pretrained={self.pretrained!r} is not valid; use an open_clip tag such as "
                             "'openai', a checkpoint file, or null for a random initialization.")
        if self.quick_gelu is not None and not isinstance(self.quick_gelu, bool):
            raise ValueError(f"model quick_gelu={self.quick_gelu!r} is not valid; use true (OpenAI's weights), false "
                             "(weights trained with GELU) or null (the tag or the architecture's name decides).")
        check_integer("model init_seed", self.init_seed, minimum=0)
        for name in ("cache_dir", "experts_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"model {name}={value!r} is not valid; use a folder path or null.")

    @property
    def pretrained_file(self) -> bool:
        """Whether ``pretrained`` names a local checkpoint file (rather than a tag, or ``None``)."""
        return self.pretrained is not None and os.path.isfile(os.path.expanduser(self.pretrained))

    def weights_dir(self) -> Path:
        """The folder open_clip downloads pretrained weights into."""
        value = self.cache_dir or os.environ.get("MERGELAB_CLIP_WEIGHTS_DIR")
        path = Path(value).expanduser() if value else paths.data_dir() / "clip" / "weights"
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()

    def experts_folder(self) -> Path | None:
        """The folder of experts to import, or ``None`` to fine-tune them."""
        value = self.experts_dir or os.environ.get("MERGELAB_CLIP_EXPERTS_DIR")
        return Path(value).expanduser() if value else None

    def identity(self) -> dict[str, Any]:
        """What defines the pretrained model (keys every cache derived from it): name, weights and the
        activation of its MLPs (:func:`activation_of_config`), which the weights do not carry."""
        out: dict[str, Any] = {"name": self.name, "pretrained": self.pretrained,
                               "activation": activation_of_config(self)}
        if self.pretrained is None:
            out["init_seed"] = self.init_seed
        elif self.pretrained_file:
            path = str(Path(self.pretrained).expanduser().resolve())
            stat = os.stat(path)
            # the bytes define the weights, not where they lie: a copy that keeps size and mtime (cp -p, rsync -a)
            # is told apart, the same file at another path (moved, or written ~/w.pt) is the same model
            out["pretrained"] = "file"
            out["file"] = {"size": stat.st_size, "sha256": _file_digest(path, stat.st_size, stat.st_mtime_ns)}
        return out


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a local weights file (about a second for ViT-B-32's 350 MB), read once per process while
    its size and modification time stay the same (they are arguments only to tell a rewritten file apart)."""
    from ...cache import file_sha256

    return file_sha256(path)


def register_tiny_config() -> None:
    """Register :data:`TINY_MODEL` with open_clip (idempotent; the JSON lives in the data cache)."""
    import open_clip

    if TINY_MODEL in open_clip.list_models():
        return
    folder = paths.data_dir() / "clip" / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_MODEL}.json"
    text = json.dumps(_TINY_CONFIG, indent=2)
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)  # another process may be reading it
    open_clip.add_model_config(path)


def check_model_name(name: str) -> str:
    import open_clip

    if name == TINY_MODEL:
        register_tiny_config()
    if name not in open_clip.list_models():
        similar = [m for m in open_clip.list_models() if m.startswith("ViT-")][:12]
        raise ValueError(f"model name={name!r} is not an open_clip architecture; valid include "
                         f"{', '.join(similar)}, ... (open_clip.list_models()) and {TINY_MODEL!r} for smoke tests.")
    return name


def looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def model_arch_options(cfg: ClipModelConfig) -> dict[str, Any]:
    """Architecture and preprocessing options implied by a pretrained tag, without loading its weights."""
    import open_clip

    if cfg.pretrained is None or cfg.pretrained_file:  # no tag to say the activation: the name or quick_gelu does
        named = bool((open_clip.get_model_config(cfg.name) or {}).get("quick_gelu", False))
        if named and cfg.quick_gelu is False:  # open_clip's force_quick_gelu can only switch QuickGELU on
            raise ValueError(f"model quick_gelu=False contradicts the architecture name {cfg.name!r}, which builds "
                             "QuickGELU; use the name without -quickgelu, or quick_gelu: true or null.")
        if cfg.pretrained_file and cfg.quick_gelu is None and not named:
            # open_clip checks the activation of a tag, not of a file: OpenAI's weights would run with plain GELU
            raise ValueError(
                f"model pretrained={cfg.pretrained!r} is a local checkpoint, which does not say its MLP activation: "
                f"set model quick_gelu: true for OpenAI's weights (or use the name {cfg.name}-quickgelu), false for "
                "weights trained with GELU (e.g. LAION's). Or keep pretrained: openai with model.cache_dir at a "
                "copy of open_clip's weight cache, which checks it.")
        return {} if cfg.quick_gelu is None else {"force_quick_gelu": cfg.quick_gelu}
    if looks_like_path(cfg.pretrained):
        raise WeightsNotFoundError(
            f"model pretrained={cfg.pretrained!r} looks like a checkpoint file but {Path(cfg.pretrained).expanduser()} "
            f"does not exist. Put the open_clip checkpoint of {cfg.name} there, or use a pretrained tag such as "
            "'openai' (downloaded into the weight cache on first use).")
    tag = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise ValueError(f"model pretrained={cfg.pretrained!r} is not a tag of {cfg.name!r}; valid: "
                         f"{', '.join(tags) or '(none)'}, a local checkpoint file, or null (random init).")
    if cfg.quick_gelu is not None and cfg.quick_gelu != bool(tag.get("quick_gelu", False)):
        raise ValueError(f"model quick_gelu={cfg.quick_gelu!r} contradicts the pretrained tag {cfg.pretrained!r}, whose "
                         f"weights were trained with {'QuickGELU' if tag.get('quick_gelu') else 'GELU'}; leave it null.")
    out: dict[str, Any] = {"force_quick_gelu": bool(tag.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if tag.get(key) is not None:
            out[arg] = tag[key]
    return out


def activation_of_config(cfg: ClipModelConfig) -> str:
    """``"QuickGELU"`` or ``"GELU"``: the MLP activation :func:`create_clip` builds for ``cfg``.

    QuickGELU when the architecture says so (``*-quickgelu`` names) or when the pretrained tag was
    trained with it (OpenAI's weights); read from open_clip's configs, without building anything.
    """
    import open_clip

    check_model_name(cfg.name)
    model_cfg = open_clip.get_model_config(cfg.name) or {}
    arch = model_arch_options(cfg)  # first: it refuses a file without its activation, or one that contradicts the name
    quick = bool(model_cfg.get("quick_gelu", False)) or bool(arch.get("force_quick_gelu", False))
    return "QuickGELU" if quick else "GELU"


def activation_of_model(model: nn.Module) -> str:
    """``"QuickGELU"`` or ``"GELU"``: the activation the MLPs of ``model`` (a CLIP or its image tower)
    actually run; an error when it has both or neither."""
    import open_clip.transformer as oct

    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (oct.QuickGELU, nn.GELU))}
    if len(kinds) != 1:
        raise ValueError(f"the model's MLPs use activations {sorted(kinds) or 'none'}; expected exactly one of "
                         "QuickGELU, GELU.")
    return kinds.pop()


QUICKGELU_MISMATCH = "QuickGELU mismatch"
"""Start of open_clip's warning when a model is built with another activation than its weights'."""


@contextlib.contextmanager
def _fail_on_activation_mismatch(cfg: ClipModelConfig) -> Iterator[None]:
    """Turn open_clip's QuickGELU mismatch warning into an error: weights run with the wrong activation
    give wrong numbers without any other sign."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if QUICKGELU_MISMATCH in str(w.message):
            raise ValueError(
                f"model name={cfg.name!r} pretrained={cfg.pretrained!r}: open_clip built the model with another "
                f"MLP activation than the weights were trained with ({w.message}). Running them so silently "
                "changes every number. Use an architecture whose activation matches (e.g. ViT-B-32-quickgelu "
                "for OpenAI's weights) or report this as a bug.")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def create_clip(cfg: ClipModelConfig, load_weights: bool = True):
    """``(model, preprocess_train, preprocess_val, tokenizer)`` for ``cfg`` on the CPU, in fp32.

    Both branches build the architecture and preprocessing of ``cfg.pretrained`` (QuickGELU for
    OpenAI's weights, mean/std, interpolation: :func:`model_arch_options`). With ``load_weights=False``
    no weights are read or downloaded: the caller loads a cached state instead. open_clip's warning
    that the activation differs from the weights' is an error, and the activation built is checked
    against :func:`activation_of_config`. A random initialization is seeded by ``cfg.init_seed``;
    the global random state is left as it was.
    """
    import open_clip

    check_model_name(cfg.name)
    arch = model_arch_options(cfg)
    if cfg.pretrained is None or not load_weights:
        # Seeded from cfg.init_seed without touching the caller's random stream (fork_rng restores it).
        # open_clip warns that it initialized randomly: here that is the point.
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(cfg.init_seed)
            model, pre_train, pre_val = open_clip.create_model_and_transforms(cfg.name, pretrained=None, **arch)
    else:
        cache = cfg.weights_dir()
        try:
            with _fail_on_activation_mismatch(cfg):
                model, pre_train, pre_val = open_clip.create_model_and_transforms(
                    cfg.name, pretrained=os.path.expanduser(cfg.pretrained), cache_dir=str(cache), **arch)
        except ValueError as err:
            if QUICKGELU_MISMATCH in str(err):
                raise
            raise _weights_error(cfg, cache, err) from None
        except Exception as err:  # noqa: BLE001 - network, hub and file errors all end here
            raise _weights_error(cfg, cache, err) from None
    built, expected = activation_of_model(model), activation_of_config(cfg)
    if built != expected:
        raise ValueError(f"model name={cfg.name!r} pretrained={cfg.pretrained!r} was built with {built} where its "
                         f"weights need {expected}; the numbers would be wrong. Report this as a bug.")
    tokenizer = open_clip.get_tokenizer(cfg.name)
    model.eval()
    return model, pre_train, pre_val, tokenizer


def _weights_error(cfg: ClipModelConfig, cache: Path, err: Exception) -> WeightsNotFoundError:
    """The error for weights that could not be loaded: where they were looked for and how to get them."""
    import open_clip

    source = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) or {}
    where = source.get("hf_hub") or source.get("url") or cfg.pretrained
    return WeightsNotFoundError(
        f"could not load model name={cfg.name!r} pretrained={cfg.pretrained!r}: looked in the weight "
        f"cache {cache} (model.cache_dir, $MERGELAB_CLIP_WEIGHTS_DIR or WEIGHTS=/path with make). "
        f"open_clip downloads the file there on first use from {where} (needs internet); on an "
        "offline machine copy that cache folder from a machine that has it (keeping pretrained as it is), or set "
        "model.pretrained to a local checkpoint file together with model.quick_gelu (true for OpenAI's weights). "
        f"Underlying error: {type(err).__name__}: {err}")


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, class_names: list[str], templates: tuple[str, ...],
                      device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Zero-shot class embeddings ``(n_classes, d)``: for each class, the normalized text embeddings of
    ``template.format(name)`` averaged over templates, then normalized.

    The model runs in eval mode and is given back in its own; like ``nn.Module.to``, moving it to ``device``
    happens in place."""
    model = model.to(device)
    texts = [t.format(c) for c in class_names for t in templates]
    emb = []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i:i + batch_size]).to(device)
            emb.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    per_class = torch.cat(emb).reshape(len(class_names), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes in bf16 natively: compute capability 8.0 or more (Ampere on).

    ``torch.cuda.is_bf16_supported()`` is not used: it also counts bf16 emulated on older GPUs (V100,
    T4), which is much slower than their native fp16.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def amp_dtype(device: torch.device, precision: str = "fp32") -> torch.dtype | None:
    """The autocast dtype for ``device`` under ``precision`` (``None``: full fp32, the public recipe).

    ``"auto"`` is bf16 on GPUs with native bf16 (:func:`native_bf16`), else fp16 (with a loss scaler).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"model precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}.")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A mixed-precision context on GPU (a no-op context when ``dtype`` is ``None``)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
