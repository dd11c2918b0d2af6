"""Measured generalization of a merged model: per-example losses, control-variate gaps against the
pretrained model, and the measurement of one merge on its tasks' training and test data.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import load_encoder_state
from ..autodiff import per_example_gradient_norms
from .statistics import mean_gap_ci
from ..training import FinetuneConfig, training_indices
from .. import codeversion
from ..utils import StateDict, atomic_write_json, config_hash, read_json, state_digest


# ----------------------------------------------------------------------------- measurement
def head_example_indices(bench: Any, task: str) -> torch.Tensor:
    """Rows ``(n,)`` int64 of ``task``'s training split that its frozen head was built from, by the
    benchmark's own rule (``bench.head_example_rows``, e.g.
    :meth:`mergelab.benchmarks.tiny.TinyBenchmark.head_example_rows`; none for canonical heads and for a
    benchmark without the method, such as clip's text heads). They are excluded from the measured
    training loss: the head fits them, so on them every model (the pretrained one included) looks
    better than on fresh data (assumption A3)."""
    rows = getattr(bench, "head_example_rows", None)
    return rows(task) if rows is not None else torch.empty(0, dtype=torch.long)


def _eval_subset(n: int, max_examples: int | None, seed: int) -> torch.Tensor:
    if max_examples is None or n <= max_examples:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values


_SPARE: tuple[weakref.ReferenceType, nn.Module] | None = None
"""The spare encoder of the benchmark last measured, with a weak reference to that benchmark (not
its ``id``, which a later benchmark may reuse once the first is gone)."""


def _encoder(bench: Any, state: StateDict) -> nn.Module:
    """One reusable encoder module for the benchmark, loaded with ``state`` (building a ViT per call is slow)."""

    global _SPARE
    if _SPARE is None or _SPARE[0]() is not bench:
        _SPARE = (weakref.ref(bench), bench.new_encoder())
    return load_encoder_state(_SPARE[1], state).to(bench.device)


@torch.no_grad()
def per_example_losses(bench: Any, state: StateDict, task: str, X: torch.Tensor, y: torch.Tensor,
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (nats) and correctness of encoder ``state`` on every example of ``(X, y)`` with
    ``task``'s frozen head: two ``(N,)`` tensors (float, bool), in the arithmetic of the benchmark's
    evaluations (``bench.eval_features``: at the clip size, ``model.precision``'s autocast)."""
    batch_size = batch_size or getattr(bench, "eval_batch_size", 256)  # the benchmark's evaluation batch
    enc = _encoder(bench, state).eval()
    head = bench.heads[task].to(bench.device)
    losses, correct = [], []
    for i in range(0, len(y), batch_size):
        logits = head(bench.eval_features(enc, X[i:i + batch_size].to(bench.device)))
        yy = y[i:i + batch_size].to(bench.device)
        losses.append(F.cross_entropy(logits, yy, reduction="none").cpu())
        correct.append((logits.argmax(-1) == yy).cpu())
    return torch.cat(losses), torch.cat(correct)


class ExampleStore:
    """Per-example measurements of one model (losses and correctness on a subset of a split, the
    Lipschitz probe), cached on disk beside its evaluations: ``<cache_dir>/eval/<digest[:2]>/<digest>.examples.json``
    (the digest is :func:`mergelab.utils.state_digest` of the weights). An entry's key holds what the
    benchmark's evaluations are keyed by (:meth:`_eval_key`: head, data, device, the evaluation code's
    version), the kind of measurement and a digest of the example indices, so a re-run of chapter 01
    measures no merge twice. A benchmark without evaluation keys (a test's stand-in) caches nothing.
    Values are float32 and bool as computed, so a cached result equals a computed one exactly. New entries
    are written together by :meth:`flush` (once per merge measured, not once per entry: encoding the
    growing file again after each of a merge's seven measurements took a third of chapter 01's time)."""

    def __init__(self, bench: Any, state: StateDict) -> None:
        self.bench, self.path, self.entries, self.dirty = bench, None, {}, False
        if hasattr(bench, "_eval_key") and hasattr(bench, "_eval_path"):
            self.path = bench._eval_path(state_digest(state)).with_suffix(".examples.json")
            self.entries = read_json(self.path, {})  # missing or unreadable: measure again and rewrite it

    def _get(self, kind: str, task: str, split: str | tuple[str, ...], indices: torch.Tensor,
             compute: Callable[[], Any], encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> Any:
        if self.path is None:
            return compute()
        digest = hashlib.sha256(torch.as_tensor(indices, dtype=torch.long).numpy().tobytes()).hexdigest()[:24]
        # a measurement on rows of several splits names each split's data
        data = (self.bench._eval_key(task, split) if isinstance(split, str)
                else [self.bench._eval_key(task, s) for s in split])
        key = config_hash({"kind": kind, "eval": data, "indices": digest,
                           **codeversion.key_part("evaluation")})
        if key not in self.entries:
            self.entries[key] = encode(compute())
            self.dirty = True
        return decode(self.entries[key])

    def flush(self) -> None:
        """Write the entries measured since the last flush (atomically: the whole file or the old one)."""
        if self.path is not None and self.dirty:
            atomic_write_json(self.path, self.entries)
            self.dirty = False

    def losses(self, task: str, split: str, indices: torch.Tensor,
               compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`per_example_losses` on rows ``indices`` of ``split`` (``compute`` runs it when not cached)."""
        return self._get("losses", task, split, indices, compute,
                         lambda r: {"loss": r[0].tolist(), "correct": r[1].tolist()},
                         lambda e: (torch.tensor(e["loss"], dtype=torch.float32), torch.tensor(e["correct"], dtype=torch.bool)))

    def value(self, kind: str, task: str, split: str | tuple[str, ...], indices: torch.Tensor,
              compute: Callable[[], float]) -> float:
        """One number measured on rows ``indices`` of ``split``, or of several splits (a tuple: each split's data
        enters the key), e.g. the Lipschitz probe on training and validation rows."""
        return self._get(kind, task, split, indices, compute, float, float)


def control_variate_gap(train: torch.Tensor, test: torch.Tensor, ref_train: torch.Tensor, ref_test: torch.Tensor
                        ) -> tuple[float, float]:
    """Generalization gap ``mean(test) - mean(train)`` with a control variate: a reference model measured
    on the same examples, independent of the training data, so that its gap has expectation zero.

    Returns ``(gap - c * ref_gap, c)`` with ``c = cov(loss, ref_loss) / var(ref_loss)`` over the pooled
    examples (train and test together, so that ``c`` does not depend on the split): the
    variance-minimizing coefficient. With losses of several nats per example, the raw gap's sampling
    noise (tenths of a nat for a thousand examples) is larger than the gap; the reference removes the
    part of it that the two models share.
    """
    loss = torch.cat([train, test]).double()
    ref = torch.cat([ref_train, ref_test]).double()
    var = float(ref.var())
    c = float(((loss - loss.mean()) * (ref - ref.mean())).mean() / var) if var > 0 else 0.0
    gap = float(test.double().mean() - train.double().mean())
    ref_gap = float(ref_test.double().mean() - ref_train.double().mean())
    return gap - c * ref_gap, c


def measure_merge(bench: Any, state: StateDict, experts: Mapping[str, FinetuneConfig],
                  max_examples: int | None = None, probe_size: int = 0, seed: int = 0,
                  reference: StateDict | None = None, reference_cache: dict | None = None) -> dict[str, Any]:
    """Generalization of a merged model on the union of the merged tasks.

    Args:
        bench: the benchmark (``split``, ``images``, ``heads``, ``new_encoder``, ``device``).
        state: the merged encoder.
        experts: task -> the config of the expert merged for it (gives the examples it saw).
        max_examples: evaluate on at most this many seen-train and test examples per task (a fixed
            random subset; ``None``: all).
        probe_size: also measure ``L_k``, the mean per-example gradient norm of task ``k`` at the merged
            model, over this many of the examples its expert saw *and* as many validation examples, which
            no expert saw (``0``: skip). Per-example norms are heavy-tailed, and the seen examples are the
            ones the expert fitted: a few seen examples alone give an erratic, low value of the norm the
            loss has over the task's distribution, which the bound's Lipschitz constant stands for
            (docs/ch01-scratch/lipschitz_probe.py measures both probes on chapter 01's experts).
        seed: seed of the evaluation subsets.
        reference: a model independent of the fine-tuning data (the pretrained encoder), measured on
            the *same* examples: its gap has expectation zero, so subtracting it times the
            variance-minimizing coefficient (:func:`control_variate_gap`) estimates the same expected
            gap with much of the sampling noise removed (``gap_vs_reference``).
        reference_cache: a dict reused across calls to keep the reference's per-example losses.

    Returns:
        ``train_loss`` (on the examples the experts saw, except the head's, see
        :func:`head_example_indices`), ``test_loss``, ``generalization_gap``
        (test minus train), ``train_accuracy``, ``test_accuracy``: unweighted means over tasks;
        ``gap_vs_reference`` with a reference; ``generalization_gap_ci`` and (with a reference)
        ``gap_vs_reference_ci``: :func:`mergelab.analysis.statistics.mean_gap_ci` of the per-example
        losses (the controlled ones minus ``c`` times the reference's), when every split has 2+
        examples; ``per_task`` with the same keys; ``lipschitz`` per task
        when ``probe_size > 0``.
    """
    if not experts:
        raise ValueError("experts is empty; pass task -> FinetuneConfig for every merged task.")
    cache = {} if reference_cache is None else reference_cache
    store = ExampleStore(bench, state)
    per_task: dict[str, dict[str, float]] = {}
    lipschitz: dict[str, float] = {}
    raw_losses: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    controlled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:  # what was measured is kept, even when a later task fails
        for task, cfg in experts.items():
            _, y = bench.split(task, "train")
            seen = training_indices(len(y), cfg)  # the rows the task's expert trained on
            seen = seen[~torch.isin(seen, head_example_indices(bench, task))]
            seen = seen[_eval_subset(len(seen), max_examples, seed)]
            _, yt = bench.split(task, "test")
            test = _eval_subset(len(yt), max_examples, seed + 1)
            # bench.images: the clip benchmark decodes each subset once and keeps it (a sweep measures
            # hundreds of merges on the same subsets); images of the tiny benchmark are in memory. Read only
            # when something is measured: a re-run finds the merge's losses in its ExampleStore.
            loaded: dict[str, torch.Tensor] = {}

            def images(split: str, rows: torch.Tensor, task: str = task) -> torch.Tensor:
                if split not in loaded:
                    loaded[split] = bench.images(task, split, rows)
                return loaded[split]

            tr, tr_ok = store.losses(task, "train", seen,
                                     lambda: per_example_losses(bench, state, task, images("train", seen), y[seen]))
            te, te_ok = store.losses(task, "test", test,
                                     lambda: per_example_losses(bench, state, task, images("test", test), yt[test]))
            tr_loss, te_loss = float(tr.mean()), float(te.mean())
            per_task[task] = {"train_loss": tr_loss, "test_loss": te_loss, "generalization_gap": te_loss - tr_loss,
                              "train_accuracy": float(tr_ok.float().mean()),
                              "test_accuracy": float(te_ok.float().mean())}
            raw_losses[task] = (tr.double().numpy(), te.double().numpy())
            if reference is not None:
                key = (task, cfg.data_fraction, cfg.seed, max_examples, seed)
                if key not in cache:
                    cache[key] = (per_example_losses(bench, reference, task, images("train", seen), y[seen])[0],
                                  per_example_losses(bench, reference, task, images("test", test), yt[test])[0])
                gap_cv, c = control_variate_gap(tr, te, *cache[key])
                per_task[task]["gap_vs_reference"] = gap_cv
                per_task[task]["control_coefficient"] = c
                ref_tr, ref_te = (r.double().numpy() for r in cache[key])
                controlled[task] = (raw_losses[task][0] - c * ref_tr, raw_losses[task][1] - c * ref_te)
            if probe_size > 0:
                _, yv = bench.split(task, "val")
                unseen = _eval_subset(len(yv), probe_size, seed + 2)

                def probe(task: str = task, unseen: torch.Tensor = unseen, yv: torch.Tensor = yv,
                          seen: torch.Tensor = seen, y: torch.Tensor = y) -> float:
                    X_probe = torch.cat([bench.images(task, "train", seen[:probe_size]),
                                         bench.images(task, "val", unseen)])
                    y_probe = torch.cat([y[seen[:probe_size]], yv[unseen]])
                    return float(per_example_gradient_norms(_encoder(bench, state), bench.heads[task].to(bench.device),
                                                            X_probe.to(bench.device), y_probe.to(bench.device)).mean())

                lipschitz[task] = store.value("lipschitz", task, ("train", "val"),
                                              torch.cat([seen[:probe_size], -1 - unseen]), probe)
    finally:
        store.flush()
    keys = ["train_loss", "test_loss", "generalization_gap", "train_accuracy", "test_accuracy"]
    keys += ["gap_vs_reference"] if reference is not None else []
    out: dict[str, Any] = {k: float(np.mean([v[k] for v in per_task.values()])) for k in keys}
    if all(len(a) > 1 and len(b) > 1 for a, b in raw_losses.values()):  # intervals need 2+ examples per split
        out["generalization_gap_ci"] = mean_gap_ci({t: v[0] for t, v in raw_losses.items()},
                                                   {t: v[1] for t, v in raw_losses.items()})
        if reference is not None:
            out["gap_vs_reference_ci"] = mean_gap_ci({t: v[0] for t, v in controlled.items()},
                                                     {t: v[1] for t, v in controlled.items()})
    out["per_task"] = per_task
    if probe_size > 0:
        out["lipschitz"] = lipschitz
    return out
