"""Benchmark TSV-M: the fast merge in ``mergelab.merging.tsv`` against a plain per-task, per-layer reference.

Task vectors are synthetic and shaped like open_clip ViT-B-32's image tower (every parameter of
``open_clip.create_model("ViT-B-32").visual``). Each 2-D task matrix is *random low-rank plus noise*:
a rank ``min(m, n) / 4`` part with random Gaussian factors and singular values decaying like
``1 / i`` (the smooth decay fine-tuning updates show), plus i.i.d. Gaussian noise holding 10 % of the
Frobenius norm; other tensors are small Gaussian updates.

Two measurements per number of tasks ``T``:

1. **Per layer, interleaved.** For the 2-D matrices of the first ``--blocks`` residual blocks plus
   ``positional_embedding`` and ``proj``, each layer is merged by the reference
   (:func:`mergelab.merging.tsv.tsv_merge_matrix_reference`: one ``torch.linalg.svd`` per task, polar factors
   by SVD, torch's default threads), by the same reference restricted to one thread, and by the fast
   variants, one after the other, so that changes in the machine's load hit all of them alike.
   The reference and the default solver merge each layer ``--repeat`` times (default 3), in turns,
   and each layer's time is the median of its rounds: on a shared 2-core machine one timing moves by
   about 10 %, so a single round can put the ratio on either side of a target it typically meets or
   misses. The whole-model ratio of each round is printed too, so the spread stays visible.
   Relative difference: ``||fast - reference||_F / ||reference||_F`` over all those layers.
   The 12 residual blocks of ViT-B-32 have identical shapes, so the whole model's time is estimated
   by counting each measured block layer ``12 / blocks`` times and ``positional_embedding`` and
   ``proj`` once; the speed-up is reported both on the layers measured and on that whole-model
   estimate (the figure the target is about). Every solver runs once on a small stack first, so
   that one-time set-up (thread pools, library look-ups) is not charged to the first layer.
2. **End to end.** :func:`mergelab.merging.tsv.tsv_merge` on the whole model (all 12 blocks and every other
   tensor; on the CPU it merges whole layers side by side), run ``--repeat`` times: median wall time,
   median CPU time, peak memory (from one more run), its speed-up over the reference's whole-model
   estimate (conservative: the end-to-end time also includes averaging the other tensors and adding
   the update to the pretrained weights), and its relative difference from the reference on the
   layers measured in 1.

Memory: :class:```memory.PeakMemory`` (``perf/memory.py``)`: the peak resident set size above the resident size
before the call (``VmHWM`` from ``/proc/self/status``, reset before each measurement by writing ``5``
to ``/proc/self/clear_refs``, after the C allocator has handed unused memory back to the system;
where that is not allowed, the peak of ``psutil`` samples every 10 ms). On a GPU:
``torch.cuda.max_memory_allocated``. Memory is measured in one more, untimed call per layer and solver
(and one more whole-model run), not in the timed ones: handing freed memory back makes the next call
pay for fresh pages, and without it a call that reuses memory freed by an earlier one looks free
(the per-layer peaks at ``T = 20`` read 0 MiB before this was separated).

Run ``python perf/bench_tsv.py`` (``make bench``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memory import PeakMemory, memory_method
from mergelab.layers import layer_kind
from mergelab.merging.tsv import tsv_merge, tsv_merge_matrices, tsv_merge_matrix_reference
from mergelab.task_vectors import TaskVector
from mergelab.utils import torch_threads


TARGET_SPEEDUP = 3.0
"""The issue's target: TSV-M at least this many times faster than the reference (2-core CPU) ..."""
TARGET_REL_DIFF = 1e-3
"""... with a relative difference from the reference below this."""


# ----------------------------------------------------------------------------- synthetic task vectors
def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip ViT-B-32's image tower (built once, without weights)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    shapes = {k: tuple(v.shape) for k, v in model.visual.state_dict().items() if torch.is_floating_point(v)}
    del model
    return shapes


def synthetic_task_matrix(m: int, n: int, g: torch.Generator, noise: float = 0.1, scale: float = 1e-3
                          ) -> torch.Tensor:
    """Random low-rank plus noise: rank ``min(m, n) // 4`` with singular values ``~ 1 / i`` and
    Gaussian noise holding ``noise`` of the Frobenius norm; entries of size about ``scale``."""
    r = max(1, min(m, n) // 4)
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    left = torch.randn(m, r, generator=g) / m ** 0.5
    right = torch.randn(n, r, generator=g) / n ** 0.5
    low_rank = (left * s) @ right.T
    low_rank *= (1 - noise ** 2) ** 0.5 / low_rank.norm()
    rand = torch.randn(m, n, generator=g)
    out = low_rank + rand * (noise / rand.norm())
    return out * (scale * (m * n) ** 0.5)


def synthetic_task_vectors(shapes: dict[str, tuple[int, ...]], num_tasks: int, seed: int) -> list[TaskVector]:
    out = []
    for t in range(num_tasks):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        vec = {}
        for k, shape in shapes.items():
            if len(shape) == 2 and "text_projection" not in k:
                vec[k] = synthetic_task_matrix(shape[0], shape[1], g)
            else:
                vec[k] = 1e-3 * torch.randn(shape, generator=g)
        out.append(TaskVector(vec))
    return out


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """One solver's measurements over the layers: wall and CPU seconds per layer and round."""

    walls: dict[str, list[float]] = field(default_factory=dict)
    cpus: dict[str, list[float]] = field(default_factory=dict)
    multiplicity: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    peak_mib: float = 0.0

    def add(self, key: str, kind: str, multiplicity: float, wall: float, cpu: float) -> None:
        self.walls.setdefault(key, []).append(wall)
        self.cpus.setdefault(key, []).append(cpu)
        self.multiplicity[key], self.kinds[key] = multiplicity, kind

    @property
    def medians(self) -> dict[str, float]:
        """Each layer's median wall time over the rounds."""
        return {key: statistics.median(w) for key, w in self.walls.items()}

    @property
    def wall_s(self) -> float:
        return sum(self.medians.values())

    @property
    def cpu_s(self) -> float:
        return sum(statistics.median(c) for c in self.cpus.values())

    @property
    def model_s(self) -> float:
        """The whole model's estimate: each layer's median wall time times the layers it stands for."""
        return sum(w * self.multiplicity[key] for key, w in self.medians.items())

    @property
    def rounds(self) -> int:
        return min((len(w) for w in self.walls.values()), default=0)

    def round_model_s(self, r: int) -> float:
        """The whole model's estimate from round ``r`` alone."""
        return sum(w[r] * self.multiplicity[k] for k, w in self.walls.items())

    @property
    def per_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, w in self.medians.items():
            out[self.kinds[key]] = out.get(self.kinds[key], 0.0) + w
        return out

    def rel_diff(self) -> float:
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else float("nan")


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """``fn()`` with its wall time and CPU time (seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - w, time.process_time() - c


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one untimed ``fn()`` above the level at its start, MiB (:class:`PeakMemory`).

    Separate from :func:`timed`: an exact measurement first hands memory freed earlier back to the
    system, so the call measured pays for fresh pages (about 2 % of a fast layer's time here)."""
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_mib


def runners(stack: torch.Tensor, variants: dict, single_thread_reference: bool
            ) -> dict[str, Callable[[], torch.Tensor]]:
    """Every solver's merge of one layer ``(T, m, n)``, by name: the reference, its 1-thread run
    (if asked for), then ``variants`` (name to ``tsv_merge_matrices`` options); a name containing
    ``"1 thread"`` runs with one torch thread."""

    def on_one_thread(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch_threads(1):
                return fn()
        return run

    mats = list(stack)
    out = {"reference": lambda: tsv_merge_matrix_reference(mats)}
    if single_thread_reference:
        out["reference, 1 thread"] = on_one_thread(out["reference"])
    for name, options in variants.items():
        fn = functools.partial(tsv_merge_matrices, stack, **options)
        out[name] = on_one_thread(fn) if "1 thread" in name else fn
    return out


def block_multiplicity(key: str, blocks: int) -> float:
    """How many layers of ViT-B-32 a measured layer stands for: ``12 / blocks`` for a residual
    block's matrix, 1 for the others."""
    return 12 / blocks if key.startswith("transformer.resblocks.") else 1.0


def warm_up(num_tasks: int, device: torch.device, variants: dict) -> None:
    """Run every solver once on a small stack, so one-time set-up is not timed."""
    stack = torch.randn(num_tasks, 256, 192, generator=torch.Generator().manual_seed(0)).to(device)
    for fn in runners(stack, variants, single_thread_reference=False).values():
        fn()


def per_layer(task_vectors: list[TaskVector], keys: list[str], device: torch.device, variants: dict,
              single_thread_reference: bool, blocks: int, references: dict[str, torch.Tensor] | None = None,
              repeat: int = 1) -> dict[str, Timing]:
    """Time every solver layer by layer; the reference's merged layers are kept in ``references``.

    Each layer is merged ``repeat`` times, one round after the other, by the reference and by the
    first (default) variant; the others, and the 1-thread reference, run in the first round only.
    Times are per-layer medians over the rounds; the relative differences come from the first round.
    Then every solver merges the layer once more, untimed, for its peak memory (:func:`peak_memory`).
    """
    warm_up(len(task_vectors), device, variants)
    default = next(iter(variants))
    timings: dict[str, Timing] = {}  # filled in the order of runners(): reference first
    for key in keys:
        stack = torch.stack([tv[key] for tv in task_vectors]).to(device)
        kind = layer_kind(key, stack.shape[1:])
        merges = runners(stack, variants, single_thread_reference)
        for r in range(repeat):
            runs = {name: timed(fn, device) for name, fn in merges.items()
                    if r == 0 or name in ("reference", default)}
            for name, (_, w, c) in runs.items():
                timings.setdefault(name, Timing()).add(key, kind, block_multiplicity(key, blocks), w, c)
            if r == 0:  # every round merges the same way: differences from the first
                ref = runs["reference"][0].double()
                if references is not None:
                    references[key] = runs["reference"][0].cpu()
                ref_sq = float(ref.pow(2).sum())
                for name, (out, *_) in runs.items():
                    timings[name].diff_sq += float((out.double() - ref).pow(2).sum())
                    timings[name].ref_sq += ref_sq
                del runs, ref
        for name, fn in merges.items():
            timings[name].peak_mib = max(timings[name].peak_mib, peak_memory(fn, device))
    return timings


def end_to_end(task_vectors: list[TaskVector], device: torch.device, references: dict[str, torch.Tensor],
               repeat: int = 1) -> dict:
    """Whole-model ``tsv_merge`` (zero pretrained weights, so the merged state is the update), run
    ``repeat`` times: median wall and CPU time, every run's wall time, and the relative difference of
    the first run's result from ``references``; then once more, untimed, for the peak memory."""
    pretrained = {k: torch.zeros_like(v) for k, v in task_vectors[0].items()}

    def merge() -> dict[str, torch.Tensor]:
        return tsv_merge(pretrained, task_vectors, device=device)

    walls, cpus = [], []
    for r in range(repeat):
        merged, w, c = timed(merge, device)
        walls.append(w)
        cpus.append(c)
        if r == 0:
            diff_sq = sum(float((merged[k].double().cpu() - ref.double()).pow(2).sum())
                          for k, ref in references.items())
        del merged
    ref_sq = sum(float(ref.double().pow(2).sum()) for ref in references.values())
    return {"wall_s": statistics.median(walls), "walls": walls, "cpu_s": statistics.median(cpus),
            "peak_mib": peak_memory(merge, device), "memory_method": memory_method(device.type),
            "rel_diff": (diff_sq / ref_sq) ** 0.5}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 20], help="numbers of task vectors T")
    parser.add_argument("--blocks", type=int, default=1,
                        help="residual blocks (of 12) whose matrices are compared with the reference layer by layer")
    parser.add_argument("--no-single-thread-reference", action="store_true",
                        help="skip the reference restricted to one thread")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the whole-model tsv_merge run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the layer-by-layer timing of the reference and the default solver, "
                             "and runs of the end-to-end merge (medians are reported)")
    parser.add_argument("--device", default="auto", help="'auto' (the GPU when there is one), 'cpu' or 'cuda'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.blocks <= 12:
        parser.error(f"--blocks={args.blocks} is not valid; use 1..12 (ViT-B-32 has 12 residual blocks).")
    if args.repeat < 1:
        parser.error(f"--repeat={args.repeat} is not valid; use 1 or more rounds.")
    if any(t < 1 for t in args.tasks):
        parser.error(f"--tasks={args.tasks} is not valid; use positive numbers of tasks.")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"TSV-M benchmark | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | device {device} | "
          f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    shapes = vit_b32_shapes()
    keys = [k for k, s in shapes.items() if len(s) == 2 and "text_projection" not in k
            and (not k.startswith("transformer.resblocks.") or int(k.split(".")[2]) < args.blocks)]
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"ViT-B-32 image tower: {len(shapes)} tensors, {n_params / 1e6:.1f} M parameters; "
          f"layer-by-layer comparison on {len(keys)} matrices (blocks 0..{args.blocks - 1}, "
          "positional_embedding, proj)")
    variants = {
        "fast: gram float64 (default)": {},
        "fast: gram float32": {"gram_dtype": "float32"},
        "randomized, 1 thread": {"svd": "randomized", "n_iter": 4},
    }
    for T in args.tasks:
        start = time.perf_counter()
        tvs = synthetic_task_vectors(shapes, T, args.seed)
        print(f"\nT = {T}: built {T} task vectors ({T * n_params * 4 / 2**30:.1f} GiB) in "
              f"{time.perf_counter() - start:.0f} s; merging layer by layer ...", flush=True)
        references: dict[str, torch.Tensor] = {}
        timings = per_layer(tvs, keys, device, variants, not args.no_single_thread_reference, args.blocks,
                            references, repeat=args.repeat)
        ref = timings["reference"]
        ref1 = timings.get("reference, 1 thread")
        print(f"{'method':34s} {'wall s':>8s} {'CPU s':>8s} {'x ref':>7s} {'x ref 1t':>9s} | "
              f"{'model s':>8s} {'x ref':>7s} {'x ref 1t':>9s} | {'rel. diff':>10s} {'peak MiB':>9s}")
        for name, tm in timings.items():
            print(f"{name:34s} {tm.wall_s:8.2f} {tm.cpu_s:8.2f} {ref.wall_s / tm.wall_s:7.2f} "
                  f"{(ref1.wall_s / tm.wall_s if ref1 else float('nan')):9.2f} | {tm.model_s:8.1f} "
                  f"{ref.model_s / tm.model_s:7.2f} {(ref1.model_s / tm.model_s if ref1 else float('nan')):9.2f} | "
                  f"{tm.rel_diff():10.2e} {tm.peak_mib:9.0f}")
        fast = timings["fast: gram float64 (default)"]
        kinds = sorted(fast.per_kind)
        print("wall s per layer kind: " + "; ".join(
            f"{k}: ref {ref.per_kind[k]:.1f} / fast {fast.per_kind[k]:.1f}" for k in kinds))
        if fast.rounds > 1:
            per_round = [ref.round_model_s(r) / fast.round_model_s(r) for r in range(fast.rounds)]
            print(f"default solver, whole-model estimate in each of the {fast.rounds} rounds: "
                  + ", ".join(f"{x:.2f}x" for x in per_round)
                  + f" (range {min(per_round):.2f}x to {max(per_round):.2f}x; the table uses per-layer medians)")
        if not args.no_end_to_end:
            e2e = end_to_end(tvs, device, references, repeat=args.repeat)
            runs = (f" (median of {len(e2e['walls'])} runs: " + ", ".join(f"{w:.1f}" for w in e2e["walls"]) + " s)"
                    if len(e2e["walls"]) > 1 else "")
            print(f"end to end, tsv_merge on the whole model (T = {T}): wall {e2e['wall_s']:.1f} s{runs}, "
                  f"CPU {e2e['cpu_s']:.1f} s, peak memory +{e2e['peak_mib']:.0f} MiB ({e2e['memory_method']}); "
                  f"{ref.model_s / e2e['wall_s']:.2f}x the reference's whole-model estimate ({ref.model_s:.0f} s)"
                  + (f", {ref1.model_s / e2e['wall_s']:.2f}x its 1-thread one" if ref1 else "")
                  + f"; rel. diff on the layers measured {e2e['rel_diff']:.2e}", flush=True)
        speedups = [ref.model_s / fast.model_s] + ([ref.model_s / e2e["wall_s"]] if not args.no_end_to_end else [])
        rel_diffs = [fast.rel_diff()] + ([e2e["rel_diff"]] if not args.no_end_to_end else [])
        met = min(speedups) >= TARGET_SPEEDUP and max(rel_diffs) < TARGET_REL_DIFF
        print(f"target (>= {TARGET_SPEEDUP:g}x the reference on the whole model, rel. diff < {TARGET_REL_DIFF:g}), "
              f"default solver, T = {T}: {'met' if met else 'NOT met'} ({' / '.join(f'{x:.2f}x' for x in speedups)}"
              f"{' (layers / end to end)' if len(speedups) > 1 else ' (layers)'}, rel. diff "
              f"{' / '.join(f'{x:.1e}' for x in rel_diffs)})",
              flush=True)
        del tvs
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"(on {os.cpu_count()} CPUs: above {os.cpu_count()} means other processes competed for the cores)")
    print("wall s / CPU s: the layers measured. model s: the whole model's 2-D layers, estimated from them "
          f"(each block layer counted 12 / {args.blocks} times). x ref: reference wall time / this wall time "
          "(torch's default threads); x ref 1t: against the reference run on one thread. "
          "rel. diff: ||merged - reference||_F / ||reference||_F over the layers measured. peak MiB: the "
          f"largest peak memory of one layer's merge above its start, from one more untimed merge per layer "
          f"({memory_method('cpu')} on the CPU).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
