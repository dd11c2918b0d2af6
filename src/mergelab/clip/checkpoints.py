"""Import existing expert checkpoints: plain state dicts and the pickled modules of the public experts.

Accepted files, per task (first match wins, names compared case-insensitively):

* ``<folder>/<Task>.safetensors``, ``<Task>.pt``, ``<Task>.pth``, ``<Task>.bin``;
* ``<folder>/<Task>/finetuned.{pt,safetensors}`` and ``<folder>/<Task>Val/finetuned.pt`` or
  ``nonlinear_finetuned.pt`` (the layouts the public task-vector experts were released in).

A file may hold a state dict (of the image tower, of the whole CLIP model, or nested under
``"state_dict"``/``"model"``), or a whole pickled module. The image tower is found by its
``conv1.weight`` key, whatever prefix it has (``visual.``, ``model.visual.``, ...).

Pickled modules execute code when loaded: only import checkpoints you trust. Classes the pickle names
but this environment lacks (e.g. the public code's ``src.modeling.ImageEncoder``) are replaced by
empty ``nn.Module`` stand-ins, which is enough to read their parameters.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..task_vectors import check_compatible
from ..utils import StateDict

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
    names += [f"{task}Val/finetuned.pt", f"{task}Val/nonlinear_finetuned.pt", f"{task}Val/finetuned.safetensors"]
    return [folder / n for n in names]


def find_expert_checkpoint(folder: str | Path, task: str) -> Path:
    """The checkpoint file of ``task`` in ``folder`` (see the module docstring for the layouts)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"the experts folder {folder} does not exist. It should hold one checkpoint per task, e.g. "
            f"{folder}/{task}.safetensors or {folder}/{task}/finetuned.pt (docs/clip.md, 'Experts'); set it "
            "with model.experts_dir or $MERGELAB_CLIP_EXPERTS_DIR, or leave it unset to fine-tune the experts.")
    top = _children(folder)
    for candidate in checkpoint_candidates(folder, task):
        parts = candidate.relative_to(folder).parts
        node = top.get(parts[0].lower())
        for part in parts[1:]:
            node = _children(node).get(part.lower()) if node is not None else None
        if node is not None and node.is_file():
            return node
    looked = ", ".join(str(p.relative_to(folder)) for p in checkpoint_candidates(folder, task)[:7])
    raise CheckpointError(
        f"no checkpoint for task {task!r} in the experts folder {folder}: looked for {looked}, ... "
        "(names case-insensitive). Save the fine-tuned image encoder there as a state dict (safetensors or "
        ".pt) or copy the released experts in their original layout (docs/clip.md, 'Experts').")


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


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (state dict or pickled module), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain state dict: try the pickled module
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"could not read checkpoint {path}: {type(err).__name__}: {err}. Expected a "
                                  "state dict (safetensors or torch.save) or a pickled module.") from None
    state = _state_from_object(obj, path)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def image_tower_state(state: Mapping[str, torch.Tensor], path: str | Path = "checkpoint") -> StateDict:
    """The image tower's entries of ``state`` with their prefix (``visual.``, ``model.visual.``, ...) removed."""
    anchors = sorted((k for k in state if k == ANCHOR or k.endswith("." + ANCHOR)), key=len)
    if not anchors:
        first = ", ".join(list(state)[:3]) or "(no tensors)"
        raise CheckpointError(f"checkpoint {path} has no ViT image tower: no key ends in {ANCHOR!r} "
                              f"(first keys: {first}); it is of a different architecture.")
    prefix = anchors[0][: -len(ANCHOR)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_expert(path: str | Path, reference: Mapping[str, torch.Tensor]) -> StateDict:
    """The image-tower state dict in ``path``, checked against ``reference`` (the pretrained tower).

    Floating-point entries are converted to ``reference``'s dtype. A checkpoint of another
    architecture is refused with the first key or shape that differs.
    """
    visual = image_tower_state(read_checkpoint(path), path)
    try:
        check_compatible(reference, visual, f"checkpoint {path}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return {k: (visual[k].to(v.dtype) if torch.is_floating_point(v) else visual[k]).contiguous()
            for k, v in reference.items()}
