"""Import existing expert checkpoints: plain state dicts and the pickled modules of the public experts.

Accepted files, per task (first match wins, names compared case-insensitively):

* ``<folder>/<Task>.safetensors``, ``<Task>.pt``, ``<Task>.pth``, ``<Task>.bin``;
* ``<folder>/<Task>/finetuned.{safetensors,pt,pth,bin}``;
* ``<folder>/<Task>/model.safetensors`` or ``pytorch_model.bin``: a Hugging Face ``CLIPVisionModel``
  saved with ``save_pretrained`` (FusionBench's ``tanganke/clip-vit-base-patch32_<task>`` experts),
  whose parameter names are mapped to open_clip's (:func:`hf_vision_to_open_clip`);
* ``<folder>/<Task>Val/finetuned.pt``, ``nonlinear_finetuned.pt`` or ``finetuned.safetensors`` (with
  ``<Task>/finetuned.pt``, the layouts the public task-vector experts were released in).

The order is :func:`checkpoint_candidates`' (docs/clip.md lists it too).

A file may hold a state dict (of the image tower, of the whole CLIP model, or nested under
``"state_dict"``/``"model"``), or a whole pickled module. The image tower is found by its
``conv1.weight`` key, whatever prefix it has (``visual.``, ``model.visual.``, ...).

Unpickling runs whatever code the file names (a checkpoint can call ``os.system``), so a file that
is not a plain state dict (``torch.load(weights_only=True)`` fails) is refused unless the caller opts
in with ``allow_pickle=True`` (``model.allow_pickle: true``): only for checkpoints you trust, such as
the task-vector release's ``finetuned.pt`` modules. Classes the pickle names but this environment
lacks (e.g. the public code's ``src.modeling.ImageEncoder``) are then replaced by empty ``nn.Module``
stand-ins, which is enough to read their parameters.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...task_vectors import check_compatible
from ...utils import StateDict

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
ANCHOR = "conv1.weight"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of another architecture; the message names it."""


def _children(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in folder.iterdir()} if folder.is_dir() else {}


def checkpoint_candidates(folder: Path, task: str) -> list[Path]:
    """Paths (existing or not) looked at for ``task`` in ``folder``, in order."""
    names = [f"{task}{s}" for s in CHECKPOINT_SUFFIXES]
    names += [f"{task}/finetuned{s}" for s in CHECKPOINT_SUFFIXES]
    names += [f"{task}/model.safetensors", f"{task}/pytorch_model.bin"]  # a saved Hugging Face model folder
    names += [f"{task}Val/finetuned.pt", f"{task}Val/nonlinear_finetuned.pt", f"{task}Val/finetuned.safetensors"]
    return [folder / n for n in names]


def _first_file(folder: Path, candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` (paths under ``folder``) that is a file, names compared case-insensitively."""
    top = _children(folder)
    for candidate in candidates:
        parts = candidate.relative_to(folder).parts
        node = top.get(parts[0].lower())
        for part in parts[1:]:
            node = _children(node).get(part.lower()) if node is not None else None
        if node is not None and node.is_file():
            return node
    return None


def find_expert_checkpoint(folder: str | Path, task: str) -> Path:
    """The checkpoint file of ``task`` in ``folder`` (see the module docstring for the layouts)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"the experts folder {folder} does not exist. It should hold one checkpoint per task, e.g. "
            f"{folder}/{task}.safetensors or {folder}/{task}/finetuned.pt (docs/clip.md, 'Experts from a folder'); set it "
            "with model.experts_dir or $MERGELAB_CLIP_EXPERTS_DIR, or leave it unset to fine-tune the experts.")
    found = _first_file(folder, checkpoint_candidates(folder, task))
    if found is not None:
        return found
    looked = ", ".join(str(p.relative_to(folder)) for p in checkpoint_candidates(folder, task)[:7])
    raise CheckpointError(
        f"no checkpoint for task {task!r} in the experts folder {folder}: looked for {looked}, ... "
        "(names case-insensitive). Save the fine-tuned image encoder there as a state dict (safetensors or "
        ".pt) or copy the released experts in their original layout (docs/clip.md, 'Experts from a folder').")


class _Stub(nn.Module):
    """Stand-in for a class a pickle names but this environment lacks: keeps whatever state it had."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            super().__setstate__(state)  # nn.Module fills in attributes that older pickles lack
        else:
            self.__dict__["_pickled_state"] = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": f"mergelab.stub.{module}"})


_tolerant_pickle = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load, loads=pickle.loads,
                                         __name__="pickle")


def _state_from_object(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)) and not isinstance(inner, torch.Tensor):
                found = _state_from_object(inner, path)
                if any(k.endswith(ANCHOR) for k in found):
                    return found
        return obj
    raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or a module.")


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (state dict, or pickled module with ``allow_pickle``), on the CPU.

    Args:
        path: a ``.safetensors`` file or a ``torch.save`` file.
        allow_pickle: unpickle a file that is not a plain state dict (runs the code it names: only for
            trusted files). Without it such a file is refused with a :class:`CheckpointError` that
            names the option.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as safe_err:  # noqa: BLE001 - not a plain state dict: a pickle, only when asked
        if not allow_pickle:
            reason = str(safe_err).strip().splitlines()[0][:200] if str(safe_err).strip() else type(safe_err).__name__
            raise CheckpointError(
                f"checkpoint {path} is not a plain state dict (torch.load(weights_only=True) refused it: "
                f"{reason}). It is a pickle, and unpickling runs whatever code it names. If you trust the "
                "file (e.g. the task-vector release's finetuned.pt), set allow_pickle: true under model in "
                "the parameters (ClipModelConfig(allow_pickle=True)); or convert it once to a state dict "
                "(safetensors) on a machine where loading it is safe.") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}. Expected a "
                                  "state dict (safetensors or torch.save) or a pickled module.") from None
    state = _state_from_object(obj, path)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


HF_ANCHOR = "embeddings.patch_embedding.weight"
"""Key that marks a Hugging Face ``transformers`` CLIP vision tower (FusionBench's experts)."""

_HF_BLOCK = {"self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
             "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
             "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
             "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
             "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}
_HF_TOP = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
           "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}


def hf_vision_to_open_clip(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None,
                           path: str | Path = "checkpoint") -> StateDict:
    """An open_clip image tower's state dict from a Hugging Face ``CLIPVisionModel`` (or ``CLIPModel``) one.

    The same architecture under other names: ``embeddings.patch_embedding`` is ``conv1``,
    ``pre_layrnorm``/``post_layernorm`` are ``ln_pre``/``ln_post``, block ``i``'s separate ``q_proj``,
    ``k_proj``, ``v_proj`` are stacked (in that order) into ``attn.in_proj_weight``/``in_proj_bias``,
    ``layer_norm1/2`` are ``ln_1/2``, ``mlp.fc1/fc2`` are ``mlp.c_fc/c_proj``. The projection ``proj``
    ``(width, embed_dim)`` is ``visual_projection.weight`` transposed when the file has it (a
    ``CLIPModel``); a ``CLIPVisionModel`` has none, and then ``reference['proj']`` (the pretrained
    model's, which fine-tuning with a frozen projection leaves unchanged) is used.
    """
    anchors = sorted((k for k in state if k.endswith(HF_ANCHOR)), key=len)
    if not anchors:
        raise CheckpointError(f"checkpoint {path} has no Hugging Face CLIP vision tower (no key ends in {HF_ANCHOR!r}).")
    prefix = anchors[0][: -len(HF_ANCHOR)]
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out: StateDict = {}
    for hf, oc in _HF_TOP.items():
        if hf in inner:
            out[oc] = inner[hf]
    blocks = sorted({int(k.split(".")[2]) for k in inner if k.startswith("encoder.layers.")})
    for i in blocks:
        src = f"encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [inner.get(f"{src}self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")]
            if any(p is None for p in parts):
                raise CheckpointError(f"checkpoint {path}: block {i} lacks one of self_attn.q/k/v_proj.{kind}.")
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        for hf, oc in _HF_BLOCK.items():
            if src + hf in inner:
                out[dst + oc] = inner[src + hf]
    projection = [k for k in state if k.endswith("visual_projection.weight")]
    if projection:
        out["proj"] = state[projection[0]].t().contiguous()
    elif reference is not None and "proj" in reference:
        out["proj"] = reference["proj"].clone()
    return out


def image_tower_state(state: Mapping[str, torch.Tensor], path: str | Path = "checkpoint",
                      reference: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """The image tower's entries of ``state`` in open_clip's names, prefix (``visual.``, ``model.visual.``,
    ...) removed; a Hugging Face CLIP vision tower is renamed by :func:`hf_vision_to_open_clip` (which
    takes the projection from ``reference`` when the file has none)."""
    anchors = sorted((k for k in state if k == ANCHOR or k.endswith("." + ANCHOR)), key=len)
    if not anchors:
        if any(k.endswith(HF_ANCHOR) for k in state):
            return hf_vision_to_open_clip(state, reference, path)
        first = ", ".join(list(state)[:3]) or "(no tensors)"
        raise CheckpointError(f"checkpoint {path} has no ViT image tower: no key ends in {ANCHOR!r} (open_clip) or "
                              f"{HF_ANCHOR!r} (Hugging Face CLIP) (first keys: {first}); it is not an open_clip or "
                              "transformers CLIP state dict.")
    prefix = anchors[0][: -len(ANCHOR)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_expert(path: str | Path, reference: Mapping[str, torch.Tensor], allow_pickle: bool = False) -> StateDict:
    """The image-tower state dict in ``path``, checked against ``reference`` (the pretrained tower).

    Floating-point entries are converted to ``reference``'s dtype. A checkpoint of another
    architecture is refused with the first key or shape that differs. ``allow_pickle``: see
    :func:`read_checkpoint`.
    """
    visual = image_tower_state(read_checkpoint(path, allow_pickle), path, reference)
    try:
        check_compatible(reference, visual, f"checkpoint {path}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return {k: (visual[k].to(v.dtype) if torch.is_floating_point(v) else visual[k]).contiguous()
            for k, v in reference.items()}


def base_candidates(folder: Path, task: str) -> list[Path]:
    """Pretrained-model checkpoints a release keeps beside its experts (existing or not), the task's own first: the
    task-vector release's ``zeroshot.pt`` (at the top, and per task), the TSV release's
    ``<Task>Val/nonlinear_zeroshot.pt``."""
    names = [f"{task}/zeroshot.safetensors", f"{task}/zeroshot.pt", f"{task}Val/nonlinear_zeroshot.pt",
             f"{task}Val/zeroshot.pt", "zeroshot.safetensors", "zeroshot.pt", "nonlinear_zeroshot.pt"]
    return [folder / n for n in names]


BASE_TOLERANCE = 1e-6
"""Largest absolute difference, per weight, between a release's pretrained image tower and this benchmark's for the
two to count as the same model (both are the same fp16 weights in fp32, so they are equal; the slack is for
rounding in a re-export)."""


def check_release_base(folder: str | Path, task: str, reference: Mapping[str, torch.Tensor],
                       allow_pickle: bool = False, already: Collection[Path] = ()) -> Path | None:
    """Refuse experts whose release holds a pretrained model other than ``reference`` (the benchmark's pretrained
    image tower): their task vectors, ``expert - reference``, would carry the difference between the two starting
    points. Returns the release's pretrained checkpoint that was compared, or ``None`` when the folder has none
    (:func:`base_candidates`) or it is a pickle and ``allow_pickle`` is off (then it is not read, and a warning says
    so). A path in ``already`` (compared before: one ``zeroshot.pt`` serves every task of a release) is returned
    without reading it again."""
    import warnings

    folder = Path(folder).expanduser()
    path = _first_file(folder, base_candidates(folder, task)) if folder.is_dir() else None
    if path is None or path in already:
        return path
    try:
        state = image_tower_state(read_checkpoint(path, allow_pickle), path, reference)
    except CheckpointError as err:
        if allow_pickle or "allow_pickle" not in str(err):
            raise
        warnings.warn(f"the release's pretrained model {path} was not compared with this benchmark's: it is a pickle "
                      "and model.allow_pickle is off. Set it to true for a release you trust, to check that the experts "
                      "start from the same weights.", stacklevel=2)
        return None
    check_compatible(reference, state, f"the release's pretrained model {path}")
    worst = max(((float((state[k].float() - v.float()).abs().max()), k) for k, v in reference.items()
                 if torch.is_floating_point(v)), default=(0.0, ""))
    if worst[0] > BASE_TOLERANCE:
        raise CheckpointError(
            f"the experts in {folder} were fine-tuned from the pretrained model {path}, which is not this benchmark's: "
            f"its image tower differs by up to {worst[0]:.3g} (in {worst[1]!r}). Their task vectors would carry that "
            "difference. Use the model and weights the release was made from (model.name, model.pretrained; the "
            "public experts start from open_clip's 'openai' weights with QuickGELU), or fine-tune the experts here.")
    return path


def find_release_head(folder: str | Path, task: str) -> Path | None:
    """A release's head of ``task`` in ``folder``, or ``None``: ``head_<Task>.pt`` (the task-vector release), else
    ``head_<Task>Val.pt`` (the TSV code's name: it trains on the ``<Task>Val`` datasets); names compared case-insensitively, as the experts'."""
    folder = Path(folder)
    return _first_file(folder, [folder / f"head_{task}.pt", folder / f"head_{task}Val.pt"])


def read_release_head(path: str | Path, n_classes: int, allow_pickle: bool = False) -> tuple[torch.Tensor, float]:
    """``(weight (n_classes, d), logit_scale)`` of a release's ``head_<Task>.pt``.

    The release pickles its ``ClassificationHead``: a linear layer whose rows are ``logit_scale`` times
    the normalized class embeddings (zero bias, inputs normalized), so the rows' common norm is the
    logit scale. Unpickling needs ``allow_pickle`` (see :func:`read_checkpoint`). A head whose row count
    is not the task's number of classes is refused (it belongs to another label order or task).
    """
    tensors = read_checkpoint(path, allow_pickle=allow_pickle)
    weights = [v for k, v in tensors.items() if k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1:
        raise CheckpointError(f"{path} holds {len(weights)} 2-D weights; a release head holds one (n_classes, d).")
    weight = weights[0].float()
    if weight.shape[0] != n_classes:
        raise CheckpointError(f"{path} has {weight.shape[0]} rows; the task has {n_classes} classes, so it is "
                              "another task's head or another label order.")
    return weight, float(weight.norm(dim=1).mean())
