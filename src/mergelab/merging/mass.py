"""MASS (MoErging through Adaptive Subspace Selection, ICLR 2026): data-free routing over TSV-C factors.

Each task is stored as its TSV-C factors (:func:`mergelab.merging.tsv.tsv_compress` with
``num_tasks=T``: the top ``floor(min(m, n) / T)`` triplets of every 2-D task matrix, every other
tensor in full). An input goes through two forward passes:

1. **Routing.** The *first-pass* model (``theta_0`` + TSV-M of all ``T`` tasks at coefficient 1, from
   the stored factors) runs up to block ``L``; the input of that block's MLP (the output of ``ln_2``),
   class token, is ``x`` ``(d,)``. For each task ``t``, ``V_t`` ``(d, k)`` holds the stored right
   singular vectors of block ``L``'s ``mlp.c_fc`` task matrix; the residual ``r_t = ||x - V_t V_t^T x||``
   says how far ``x`` lies from the subspace task ``t`` reads. Logits ``-r`` are z-scored across tasks
   (unbiased std + 1e-6) and soft-maxed; the tasks with weight above ``threshold`` (at most ``top_k``,
   largest first) are selected, else the argmax alone.
2. **Prediction.** The *second-pass* model is ``theta_0`` + TSV-M of the selected tasks' stored
   factors (rank as stored, coefficient 1, other tensors averaged; one task gives its own TSV-C
   reconstruction), cached by the *sorted* set of selected tasks in a bounded LRU cache. Among the
   selected tasks' heads, the one with the largest maximum logit predicts; a prediction made with
   another task's head has the wrong classes.

The routing features are read by forward hooks (:mod:`mergelab.merging.mass_features`), with the class token taken
on the axis the encoder's layout puts the batch on.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..task_vectors import TaskVector
from ..utils import StateDict, check_integer, pick_device, state_digest, torch_threads
from .mass_features import _READ_AT, ROUTING_MATRICES, block_features, class_token
from .mass_storage import storage_bytes, storage_of_shapes
from .tsv import CompressedTaskVector, tsv_merge_compressed

FIRST_PASSES = ("tsv_merge", "pretrained")
"""Models the routing features can come from: TSV-M of all tasks (MASS) or ``theta_0`` (ablation)."""

DEFAULT_DEPTH = 0.75
"""Relative depth of the routing block: block ``floor(0.75 * 12) = 9`` of ViT-B's 12 (the official
config's block 9, taken as a 0-based index of ``transformer.resblocks``), block 3 of ``tiny``'s 4."""


# ----------------------------------------------------------------------------- parameters
def routing_block(num_blocks: int, depth: float = DEFAULT_DEPTH, block: int | None = None) -> int:
    """The 0-based index of the routing block: ``block`` when given, else ``floor(depth * num_blocks)``."""
    check_integer("num_blocks", num_blocks)  # the encoder's number of blocks
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < num_blocks:
            raise ValueError(f"block={block!r} does not exist; the encoder has {num_blocks} blocks, valid: "
                             f"0..{num_blocks - 1} (or leave block unset and give depth in [0, 1)).")
        return block
    if not isinstance(depth, (int, float)) or isinstance(depth, bool) or not 0 <= depth < 1:
        raise ValueError(f"depth={depth!r} is not valid; use a relative depth in [0, 1) (block floor(depth * "
                         f"{num_blocks}) of {num_blocks}; the official ViT-B default is 0.75, block 9 of 12).")
    return min(int(math.floor(depth * num_blocks + 1e-9)), num_blocks - 1)


def check_selection(threshold: float, top_k: int) -> None:
    """Refuse a threshold outside (0, 1) or a top-k below 1, naming the valid range."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold={threshold!r} is not valid; use a routing weight in the open interval (0, 1) "
                         "(the official default is 0.2).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is not valid; use an integer >= 1 (the most tasks one input may "
                         "select; the official default is 3).")


# ----------------------------------------------------------------------------- routing maths
def subspace_residuals(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``r[i, t] = ||x_i - V_t V_t^T x_i||_2``: distance of each input to each task's subspace.

    Args:
        x: ``(N, d)`` features (not normalized, as in the official code).
        bases: ``(T, d, k)``, each ``V_t`` with orthonormal (or zero) columns.

    Returns:
        ``(N, T)`` residual norms.
    """
    coords = torch.einsum("nd,tdk->ntk", x, bases)
    return (x.unsqueeze(1) - torch.einsum("ntk,tdk->ntd", coords, bases)).norm(dim=-1)


def subspace_energy(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``e[i, t] = ||V_t^T x_i||^2 / ||x_i||^2``: the share of each input's squared norm inside each task's
    subspace, in [0, 1] (0 for an input of norm 0). With orthonormal ``V_t`` it is ``1 - (r_t / ||x||)^2`` for the
    residual of :func:`subspace_residuals`; a diagnostic of how far the tasks' subspaces overlap on the inputs,
    not part of MASS's routing.

    Args:
        x: ``(N, d)`` features.
        bases: ``(T, d, k)``, each ``V_t`` with orthonormal (or zero) columns.

    Returns:
        ``(N, T)`` shares.
    """
    if x.ndim != 2 or bases.ndim != 3 or bases.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (N, d) and bases (T, d, k) with the same d; got {tuple(x.shape)} and "
                         f"{tuple(bases.shape)}.")
    inside = torch.einsum("nd,tdk->ntk", x, bases).square().sum(-1)
    return inside / x.square().sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def routing_weights(residuals: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over tasks of the z-scored logits ``-r`` (unbiased std + 1e-6) divided by ``temperature``
    (> 0; MASS: 1), ``(N, T)``. With one task the weight is 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not valid; use a positive number (MASS uses 1).")
    logits = -residuals
    if residuals.shape[1] == 1:
        return torch.ones_like(residuals)
    z = (logits - logits.mean(1, keepdim=True)) / (logits.std(1, unbiased=True, keepdim=True) + 1e-6)
    return (z / temperature).softmax(1)


def select_tasks(weights: torch.Tensor, threshold: float, top_k: int) -> list[tuple[int, ...]]:
    """Per input, the task indices with weight above ``threshold`` (at most ``top_k``, largest weight
    first), or the argmax alone when none passes."""
    check_selection(threshold, top_k)
    order = weights.argsort(1, descending=True)
    out = []
    for w, idx in zip(weights.tolist(), order.tolist()):
        kept = tuple(i for i in idx[:top_k] if w[i] > threshold)
        out.append(kept or (idx[0],))
    return out


@dataclass
class Routing:
    """Where a batch was routed.

    Attributes:
        tasks: the router's task names (columns of the tensors).
        residuals: ``(N, T)`` subspace residuals.
        weights: ``(N, T)`` routing weights (rows sum to 1).
        selected: per input, the selected task names, largest weight first.
    """

    tasks: tuple[str, ...]
    residuals: torch.Tensor
    weights: torch.Tensor
    selected: list[tuple[str, ...]]

    @property
    def argmax(self) -> list[str]:
        """Per input, the task with the largest weight."""
        return [self.tasks[i] for i in self.weights.argmax(1).tolist()]

    @property
    def keys(self) -> list[tuple[str, ...]]:
        """Per input, the cache key of its second-pass model: the selected set, sorted."""
        return [cache_key(s) for s in self.selected]


def cache_key(selected: Sequence[str]) -> tuple[str, ...]:
    """The second-pass model's key: the selected tasks, sorted (the official key depends on order)."""
    return tuple(sorted(set(selected)))


def routing_bases(compressed: Mapping[str, CompressedTaskVector], block: int, matrix: str = "mlp.c_fc"
                  ) -> torch.Tensor:
    """``(T, d_in, k)``: each task's stored right singular vectors of block ``block``'s ``matrix``."""
    if matrix not in _READ_AT:
        raise ValueError(f"routing_matrix={matrix!r} is not valid; use one of {', '.join(ROUTING_MATRICES)}.")
    suffix = "attn.in_proj_weight" if matrix == "attn.in_proj" else f"{matrix}.weight"
    name = f"transformer.resblocks.{block}.{suffix}"
    missing = [t for t, c in compressed.items() if name not in c.factors]
    if missing:
        raise ValueError(f"task {missing[0]!r} stores no factors for {name!r}; compress the task vectors with "
                         "tsv_compress(..., num_tasks=T) on an open_clip VisionTransformer.")
    ranks = {t: c.factors[name][2].shape for t, c in compressed.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"the tasks store {name!r} at different shapes ({', '.join(f'{t}: {tuple(r)}' for t, r in ranks.items())}); "
                         "compress every task with the same num_tasks (or k) on one architecture.")
    return torch.stack([c.factors[name][2].float() for c in compressed.values()])


# ----------------------------------------------------------------------------- the router
@dataclass
class MassPrediction:
    """MASS predictions for a batch.

    Attributes:
        routing: :class:`Routing` of the batch.
        head_task: per input, the task whose head predicted (largest maximum logit among the selected).
        label: ``(N,)`` the class index in that head.
        oracle_label: ``(N,)`` the class index in the true task's head (when the true tasks were given).
        official_label: ``(N,)`` the official MASS code's reading (when the true tasks were given): the argmax of the
            chosen head's logits cut or zero-padded to the true task's class count, so that another task's head can
            give a right index (:func:`official_reading`).
    """

    routing: Routing
    head_task: list[str]
    label: torch.Tensor
    oracle_label: torch.Tensor | None = None
    official_label: torch.Tensor | None = None


class MassRouter:
    """MASS as a model wrapper over stored TSV-C factors.

    Args:
        pretrained: ``theta_0``.
        compressed: task name to its :class:`CompressedTaskVector` (``tsv_compress(tau_t, num_tasks=T)``).
        encoder: an encoder module of the architecture (open_clip ``VisionTransformer``); copies of it
            hold the first- and second-pass weights.
        heads: task name to its frozen head (features ``(N, d)`` to logits ``(N, C_t)``); heads must be
            comparable (same scale, normalized features) for the max-logit choice to mean anything.
        depth: relative depth of the routing block in ``[0, 1)`` (block ``floor(depth * blocks)``).
        block: the routing block's 0-based index instead of ``depth``.
        routing_matrix: which stored task matrix of that block defines the subspaces
            (:data:`ROUTING_MATRICES`; MASS: ``"mlp.c_fc"``).
        threshold: routing weight a task needs to be selected, in ``(0, 1)``.
        top_k: most tasks selected per input, ``>= 1``.
        first_pass: ``"tsv_merge"`` (MASS) or ``"pretrained"`` (ablation).
        cache_size: second-pass models kept (least recently used dropped), ``>= 1``.
        device: where models run (``"auto"``: the GPU when there is one).
        polar: polar-factor method of the TSV-M merges.
        amp: the autocast dtype of both passes (``None``: full fp32), as the benchmark evaluates its other
            models (``bench.amp`` at the clip size), so that MASS and its baselines share one arithmetic.
    """

    def __init__(self, pretrained: StateDict, compressed: Mapping[str, CompressedTaskVector], encoder: nn.Module,
                 heads: Mapping[str, nn.Module], depth: float = DEFAULT_DEPTH, block: int | None = None,
                 routing_matrix: str = "mlp.c_fc", threshold: float = 0.2, top_k: int = 3,
                 first_pass: str = "tsv_merge", cache_size: int = 16, device: str | torch.device | None = "auto",
                 polar: str = "gram", amp: torch.dtype | None = None) -> None:
        if not compressed:
            raise ValueError("compressed is empty; pass one CompressedTaskVector per task.")
        missing = [t for t in compressed if t not in heads]
        if missing:
            raise ValueError(f"no head for task {missing[0]!r}; heads has: {', '.join(heads)}.")
        check_selection(threshold, top_k)
        if first_pass not in FIRST_PASSES:
            raise ValueError(f"first_pass={first_pass!r} is not valid; use one of {', '.join(FIRST_PASSES)}.")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size={cache_size!r} is not valid; use an integer >= 1 (second-pass models kept).")
        if routing_matrix not in _READ_AT:
            raise ValueError(f"routing_matrix={routing_matrix!r} is not valid; use one of {', '.join(ROUTING_MATRICES)}.")
        blocks = getattr(getattr(encoder, "transformer", None), "resblocks", None)
        if blocks is None:
            raise ValueError("encoder has no transformer.resblocks; MASS routes open_clip VisionTransformer encoders.")
        self.tasks: tuple[str, ...] = tuple(compressed)
        self.num_blocks = len(blocks)
        self.block = routing_block(self.num_blocks, depth, block)
        self.routing_matrix = routing_matrix
        self.threshold, self.top_k = float(threshold), int(top_k)
        self.first_pass, self.cache_size, self.polar, self.amp = first_pass, cache_size, polar, amp
        self.device = pick_device(device) if isinstance(device, str) or device is None else torch.device(device)
        self.pretrained = {k: v.detach() for k, v in pretrained.items()}
        self.compressed = dict(compressed)
        # copies (a head is a few kilobytes): the caller's heads keep their device and mode
        self.heads = {t: copy.deepcopy(heads[t]).to(self.device).eval() for t in self.tasks}
        self._template = copy.deepcopy(encoder).cpu()
        self.bases = routing_bases(self.compressed, self.block, routing_matrix).to(self.device)
        self._first: nn.Module | None = None
        self._models: OrderedDict[tuple[str, ...], nn.Module] = OrderedDict()
        self.hits = self.misses = 0
        self._weights_digest: dict[str, object] | None = None  # fingerprint()'s digests, computed on first use

    def with_options(self, **changes) -> "MassRouter":
        """A router with other routing options (``depth``/``block``, ``routing_matrix``, ``threshold``,
        ``top_k``, ``first_pass``) that shares this one's second-pass cache (and its first-pass model
        when ``first_pass`` is unchanged): the second-pass models depend on the selected set only."""
        allowed = {"depth", "block", "routing_matrix", "threshold", "top_k", "first_pass"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"with_options has no option {unknown[0]!r}; valid: {', '.join(sorted(allowed))}.")
        new = copy.copy(self)
        threshold, top_k = changes.get("threshold", self.threshold), changes.get("top_k", self.top_k)
        check_selection(threshold, top_k)
        new.threshold, new.top_k = float(threshold), int(top_k)
        first_pass = changes.get("first_pass", self.first_pass)
        if first_pass not in FIRST_PASSES:
            raise ValueError(f"first_pass={first_pass!r} is not valid; use one of {', '.join(FIRST_PASSES)}.")
        if first_pass != self.first_pass:
            new.first_pass, new._first = first_pass, None
        if {"depth", "block", "routing_matrix"} & set(changes):
            # a new depth or block moves the routing point; a new matrix alone keeps this router's block
            new.block = (routing_block(self.num_blocks, changes.get("depth", DEFAULT_DEPTH), changes.get("block"))
                         if {"depth", "block"} & set(changes) else self.block)
            new.routing_matrix = changes.get("routing_matrix", self.routing_matrix)
            new.bases = routing_bases(self.compressed, new.block, new.routing_matrix).to(self.device)
        return new

    def fingerprint(self) -> dict[str, object]:
        """What decides this router's predictions on a given input, as JSON-able values (a cache key's part):
        digests of ``theta_0``, of every task's stored factors and dense tensors and of its head (weights and
        scale), the template encoder's class, and the routing options (block, routing matrix, threshold, top-k,
        first pass, polar method, autocast dtype, device type). ``cache_size`` is left out: it changes speed, not
        predictions.
        The weights' digest is computed once and shared with the routers :meth:`with_options` makes after it."""
        if self._weights_digest is None:
            parts = {"pretrained": state_digest(self.pretrained),
                     "heads": {t: _head_digest(self.heads[t]) for t in self.tasks}}
            for t in self.tasks:
                c = self.compressed[t]
                tensors = {f"factor.{name}.{i}": f[i] for name, f in c.factors.items() for i in range(3)}
                tensors.update({f"dense.{name}": v for name, v in c.dense.items()})
                parts[f"task.{t}"] = state_digest(tensors)
            self._weights_digest = parts
        return {"weights": self._weights_digest, "tasks": list(self.tasks),
                "encoder": f"{type(self._template).__module__}.{type(self._template).__qualname__}",
                "block": self.block, "num_blocks": self.num_blocks, "routing_matrix": self.routing_matrix,
                "threshold": self.threshold, "top_k": self.top_k, "first_pass": self.first_pass, "polar": self.polar,
                "amp": str(self.amp), "device": self.device.type}

    # -------------------------------------------------------------- models
    def merged_update(self, tasks: Sequence[str]) -> TaskVector:
        """TSV-M (coefficient 1) of ``tasks``' stored factors, rank as stored."""
        unknown = [t for t in tasks if t not in self.compressed]
        if unknown or not tasks:
            raise ValueError(f"tasks={list(tasks)!r} must be a non-empty subset of {', '.join(self.tasks)}.")
        factors = [self.compressed[t] for t in cache_key(tasks)]
        if self.device.type == "cuda":
            return tsv_merge_compressed(factors, polar=self.polar, device=self.device)
        # one thread: these polar factors are small, and on a shared CPU a second thread made them 50x slower
        with torch_threads(1):
            return tsv_merge_compressed(factors, polar=self.polar)

    def _module(self, state: StateDict) -> nn.Module:
        module = copy.deepcopy(self._template)
        module.load_state_dict(state, strict=True)
        return module.to(self.device).eval()

    @property
    def first_pass_model(self) -> nn.Module:
        """The routing model: ``theta_0`` + TSV-M of all tasks (or ``theta_0`` alone)."""
        if self._first is None:
            state = (self.merged_update(self.tasks).apply_to(self.pretrained) if self.first_pass == "tsv_merge"
                     else self.pretrained)
            self._first = self._module(state)
        return self._first

    def model_for(self, selected: Sequence[str]) -> nn.Module:
        """The second-pass model of a selected set (cached by the sorted set; LRU, ``cache_size`` models)."""
        key = cache_key(selected)
        if key in self._models:
            self.hits += 1
            self._models.move_to_end(key)
            return self._models[key]
        self.misses += 1
        model = self._module(self.merged_update(key).apply_to(self.pretrained))
        self._models[key] = model
        while len(self._models) > self.cache_size:
            self._models.popitem(last=False)
        return model

    @property
    def cached_keys(self) -> list[tuple[str, ...]]:
        """Keys of the second-pass models in the cache, least recently used first."""
        return list(self._models)

    # -------------------------------------------------------------- routing and prediction
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` routing features: class token at the routing matrix's input in the first pass."""
        point = (self.block, self.routing_matrix)
        return self.features_at(images, [point])[point]

    @torch.no_grad()
    def features_at(self, images: torch.Tensor, points: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        """``{(block, routing matrix): (N, d)}``: :meth:`features` at each point, from one first pass that stops at
        the deepest; each equals, bit for bit, what a router reading at that point alone computes."""
        with self.autocast():
            return block_features(self.first_pass_model, images.to(self.device), points)

    def autocast(self) -> torch.autocast:
        """The context both passes run in: ``torch.autocast`` at :attr:`amp` on :attr:`device` (off when ``amp``
        is ``None``); a baseline timed against MASS runs in it too."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def route_features(self, x: torch.Tensor) -> Routing:
        """:class:`Routing` of features ``(N, d)`` already taken at the routing point."""
        return self.route_residuals(subspace_residuals(x.to(self.device).float(), self.bases))

    @torch.no_grad()
    def route_residuals(self, residuals: torch.Tensor, temperature: float = 1.0) -> Routing:
        """:class:`Routing` of ``(N, T)`` residuals (one column per router task, in :attr:`tasks` order):
        the weights at ``temperature`` (MASS: 1) and the router's threshold and top-k."""
        if residuals.ndim != 2 or residuals.shape[1] != len(self.tasks):
            raise ValueError(f"residuals must be (N, T={len(self.tasks)}), one column per task of {', '.join(self.tasks)}; "
                             f"got shape {tuple(residuals.shape)}.")
        weights = routing_weights(residuals, temperature)
        chosen = select_tasks(weights, self.threshold, self.top_k)
        return Routing(self.tasks, residuals.cpu(), weights.cpu(), [tuple(self.tasks[i] for i in s) for s in chosen])

    def route(self, images: torch.Tensor) -> Routing:
        """Route a batch ``(N, 3, H, W)`` of images of any mix of tasks."""
        return self.route_features(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, true_tasks: Sequence[str] | None = None,
                memo: dict | None = None) -> MassPrediction:
        """Route ``images`` ``(N, 3, H, W)``, run each through its selected set's second-pass model and
        predict with the selected head of largest maximum logit. With ``true_tasks`` (one per image),
        also the prediction of the true task's head on the same features (the oracle-head ablation).
        ``memo``: a dict kept by the caller for this batch and passed to every router of an ablation
        (:meth:`with_options`) on it: the routing features of each first pass and routing point, and the features
        of each group of images routed to one set, are then computed once for all routers that need them (a group
        is shared only when its rows are the same, so that every router's result is the bits it gives alone)."""
        if true_tasks is not None and len(true_tasks) != len(images):
            raise ValueError(f"true_tasks has {len(true_tasks)} entries for {len(images)} images; give one per image.")
        unknown = sorted({t for t in true_tasks or () if t not in self.tasks})
        if unknown:
            raise ValueError(f"true_tasks holds {unknown[0]!r}, not a task of this router; valid: {', '.join(self.tasks)}.")
        images = images.to(self.device)
        memo = {} if memo is None else memo
        point = ("first pass", self.first_pass, self.block, self.routing_matrix)
        if point not in memo:
            memo[point] = self.features(images)
        routing = self.route_features(memo[point])
        n = len(images)
        label = torch.zeros(n, dtype=torch.long)
        oracle = torch.zeros(n, dtype=torch.long) if true_tasks is not None else None
        official = torch.zeros(n, dtype=torch.long) if true_tasks is not None else None
        head_task: list[str] = [""] * n
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, key in enumerate(routing.keys):
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            # shared only by routers that send exactly these rows to this set: the same sub-batch, so the same bits
            # as a router run alone (another composition can move float rounding)
            slot = ("second pass", key, tuple(rows))
            if slot not in memo:
                model = self.model_for(key)
                with self.autocast():
                    memo[slot] = model(images[torch.tensor(rows, device=self.device)]).float()
            feats = memo[slot]
            logits = {t: self.heads[t](feats) for t in key}
            chosen, labels = choose_head(logits)
            label[rows] = labels.cpu()
            for r, t in zip(rows, chosen):
                head_task[r] = t
            if true_tasks is not None:
                for t in {true_tasks[r] for r in rows}:
                    sub = [j for j, r in enumerate(rows) if true_tasks[r] == t]
                    own = self.heads[t](feats[sub])
                    oracle[[rows[j] for j in sub]] = own.argmax(-1).cpu()  # type: ignore[index]
                    for c in {chosen[j] for j in sub}:  # read with head c, scored against task t's classes
                        js = [j for j in sub if chosen[j] == c]
                        official[[rows[j] for j in js]] = official_reading(logits[c][js], own.shape[-1]).cpu()  # type: ignore[index]
        return MassPrediction(routing, head_task, label, oracle, official)


def _head_digest(head: nn.Module) -> str:
    """A head's own digest where it has one (:meth:`mergelab.models.ClassificationHead.digest`: weights and logit
    scale), else its state dict's (:func:`~mergelab.utils.state_digest`)."""
    digest = getattr(head, "digest", None)
    return digest() if callable(digest) else state_digest(head.state_dict())


def official_reading(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The classes the official MASS code reads from the chosen head's ``logits`` ``(..., C)`` for inputs of a task
    with ``num_classes`` classes: the argmax of the logits cut to ``num_classes``, or padded with zeros up to it (its
    ``pad_output``); shape ``(...)``. Compared with the inputs' labels, an index from another task's head can count
    as right."""
    if logits.shape[-1] >= num_classes:
        return logits[..., :num_classes].argmax(-1)
    return torch.nn.functional.pad(logits, (0, num_classes - logits.shape[-1])).argmax(-1)


def choose_head(logits: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Per input, the head (task) whose largest logit is largest, and its predicted class.

    Args:
        logits: task name to ``(N, C_t)`` logits of the same ``N`` inputs.

    Returns:
        ``(task per input, class index (N,) in that task's head)``; ties go to the first task given.
    """
    if not logits:
        raise ValueError("logits is empty; give at least one head's logits.")
    names = list(logits)
    best = torch.stack([logits[t].max(-1).values for t in names], 1)  # (N, heads)
    which = best.argmax(1)
    labels = torch.stack([logits[t].argmax(-1) for t in names], 1).gather(1, which[:, None]).squeeze(1)
    return [names[int(w)] for w in which.tolist()], labels


__all__ = ["DEFAULT_DEPTH", "FIRST_PASSES", "ROUTING_MATRICES", "MassPrediction", "MassRouter", "Routing",
           "block_features", "cache_key", "check_selection", "choose_head", "official_reading", "class_token",
           "routing_bases", "routing_block", "routing_weights", "select_tasks", "storage_bytes", "storage_of_shapes",
           "subspace_energy", "subspace_residuals"]
