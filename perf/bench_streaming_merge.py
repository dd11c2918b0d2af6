"""Peak memory and time of task arithmetic and TIES over T ViT-B-32-sized task vectors, on the CPU.

The package's merge methods work one parameter tensor at a time (streaming): besides their inputs
they hold the merged model and one layer of every task. A naive implementation stacks the T
flattened task vectors into a ``(T, n_params)`` matrix first. This script measures both.

How it is measured: every (method, implementation) runs in a fresh Python process, which builds
the pretrained state dict and T task vectors with the shapes of the open_clip image tower (random
values, seeded), then runs the merge once inside :class:`perf/memory.py's PeakMemory`: memory the C
allocator holds unused (temporaries of building the inputs) is handed back to the system, the
resident set size is read (``VmRSS`` in ``/proc/self/status``), the kernel's peak-RSS counter is
reset (``echo 5 > /proc/self/clear_refs``), and after the merge the peak (``VmHWM``) is read.
*Extra peak* = peak - resident before the merge: the memory the merge itself needs on top of its
inputs. Time is wall-clock time of the merge call (``time.perf_counter``). Where the peak counter
cannot be reset, the peak of RSS samples every 10 ms is reported and marked ``*``.

Usage: ``python perf/bench_streaming_merge.py [--model ViT-B-32] [--tasks 8] [--json out.json]``.
A naive run is skipped (and says so) when the machine lacks the memory it would need.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GB = 2**30
METHODS = ("task_arithmetic", "ties")
IMPLEMENTATIONS = ("streaming", "naive")


# ------------------------------------------------------------------------------------------ worker
def tower_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip ``model``'s image tower, without allocating its weights."""
    import open_clip
    import torch

    from mergelab.benchmarks.clip.model import check_model_name

    check_model_name(model)
    cfg = open_clip.get_model_config(model)
    try:
        from open_clip.model import _build_vision_tower

        with torch.device("meta"):
            tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    except Exception:  # noqa: BLE001 - private helper moved: build the whole model instead
        tower = open_clip.create_model(model, pretrained=None).visual
    return {k: tuple(v.shape) for k, v in tower.state_dict().items()}


def build_inputs(model: str, n_tasks: int, seed: int = 0):
    """A pretrained state dict and ``n_tasks`` task vectors (update scale 1e-3) with ``model``'s shapes."""
    import torch

    from mergelab.task_vectors import TaskVector

    shapes = tower_shapes(model)
    g = torch.Generator().manual_seed(seed)
    pretrained = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    tvs = [TaskVector({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}) for _ in range(n_tasks)]
    return pretrained, tvs


def naive_merge(method: str, pretrained, tvs, coefficient: float, density: float = 0.2):
    """The same merges computed on the ``(T, n_params)`` matrix of stacked, flattened task vectors.

    Naive in layout only: it holds all T flattened task vectors at once, but works row by row and in
    place where it can, so its extra memory is the stacked matrix plus a few model-sized vectors.
    """
    import torch

    keys = list(tvs[0].keys())
    stacked = torch.stack([tv.flatten(keys) for tv in tvs])  # (T, n_params)
    if method == "task_arithmetic":
        update = stacked.sum(0).mul_(coefficient)
    else:
        k = max(1, int(round((1 - density) * stacked.shape[1])))
        for row in stacked:  # trim: keep the top ``density`` share of each task by magnitude
            magnitude = row.abs()
            row.masked_fill_(magnitude <= magnitude.kthvalue(k).values, 0.0)
            del magnitude
        elected = torch.sign(stacked.sum(0))
        total = torch.zeros_like(elected)
        count = torch.zeros_like(elected)
        for row in stacked:  # disjoint mean over the tasks that agree with the elected sign
            agree = (torch.sign(row) == elected) & (row != 0)
            total += torch.where(agree, row, 0.0)
            count += agree
        update = torch.where(count > 0, total / count.clamp_min(1), 0.0).mul_(coefficient)
    out, pos = {}, 0
    for key in keys:
        v = pretrained[key]
        out[key] = v + update[pos:pos + v.numel()].reshape(v.shape)
        pos += v.numel()
    return out


def run_worker(model: str, n_tasks: int, method: str, implementation: str) -> dict:
    """One merge measured on every core (:func:`_measure`); the caller's torch thread count is restored."""
    from mergelab.utils import torch_threads

    with torch_threads(max(1, os.cpu_count() or 1)):  # every core, then the caller's count back (a test calls this)
        return _measure(model, n_tasks, method, implementation)


def _measure(model: str, n_tasks: int, method: str, implementation: str) -> dict:
    import torch

    import mergelab
    from memory import PeakMemory
    pretrained, tvs = build_inputs(model, n_tasks)
    inputs_bytes = sum(v.numel() * v.element_size() for v in pretrained.values())
    inputs_bytes += sum(v.numel() * v.element_size() for tv in tvs for v in tv.vector.values())
    options = {"coefficient": 0.3} if method == "task_arithmetic" else {"coefficient": 1.0, "density": 0.2}
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        if implementation == "streaming":
            merged = mergelab.merge(method, pretrained, tvs, **options)
        else:
            merged = naive_merge(method, pretrained, tvs, **options)
        seconds = time.perf_counter() - start
    checksum = float(sum(torch.sum((merged[k].double() - pretrained[k].double()) ** 2) for k in pretrained))
    n_params = sum(v.numel() for v in pretrained.values())
    return {"model": model, "tasks": n_tasks, "method": method, "implementation": implementation,
            "n_params": n_params, "model_gb": n_params * 4 / GB, "inputs_gb": inputs_bytes / GB,
            "seconds": seconds, "rss_before_gb": mem.base_bytes / GB, "extra_peak_gb": mem.extra_bytes / GB,
            "peak_gb": (mem.base_bytes + mem.extra_bytes) / GB,
            "memory_method": mem.method, "peak_exact": mem.exact, "update_sq_norm": checksum}


# ------------------------------------------------------------------------------------------ driver
def available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def needed_gb(model_gb: float, n_tasks: int, implementation: str, method: str) -> float:
    """A generous estimate of a run's total memory: inputs plus what the merge allocates."""
    inputs = model_gb * (n_tasks + 1)
    if implementation == "streaming":
        return inputs + 3 * model_gb
    return inputs + model_gb * (n_tasks * 2 + 6)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture whose image-tower shapes are used")
    parser.add_argument("--tasks", type=int, default=8, help="number of task vectors T")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.model, args.tasks, *args.worker)))
        return []

    shapes = tower_shapes(args.model)
    model_gb = sum(int(__import__("math").prod(s)) for s in shapes.values()) * 4 / GB
    rows = []
    print(f"Streaming vs naive merges: {args.tasks} task vectors shaped like the {args.model} image tower "
          f"({model_gb * GB / 4 / 1e6:.1f} M parameters, {model_gb:.2f} GB in fp32), CPU, {os.cpu_count()} cores.")
    print("Extra peak = peak RSS during the merge minus RSS before it (inputs excluded); one fresh process per row.")
    header = f"{'method':<16} {'implementation':<14} {'time (s)':>9} {'extra peak (GB)':>16} {'x model':>8} {'inputs (GB)':>12}"
    print(header)
    print("-" * len(header))
    for method in METHODS:
        for impl in IMPLEMENTATIONS:
            need, have = needed_gb(model_gb, args.tasks, impl, method), available_gb()
            if need > 0.8 * have:
                print(f"{method:<16} {impl:<14} skipped: needs about {need:.1f} GB, {have:.1f} GB available")
                rows.append({"method": method, "implementation": impl, "skipped": True, "needed_gb": need,
                             "available_gb": have})
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--tasks", str(args.tasks), "--worker", method, impl]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method:<16} {impl:<14} failed: {proc.stderr.strip().splitlines()[-1:]}")
                rows.append({"method": method, "implementation": impl, "failed": proc.stderr[-2000:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            extra = row["extra_peak_gb"]
            mark = "" if row["peak_exact"] else "*"
            print(f"{method:<16} {impl:<14} {row['seconds']:>9.2f} {extra:>15.2f}{mark or ' '} "
                  f"{extra / model_gb:>8.1f} {row['inputs_gb']:>12.2f}")
    done = {(r["method"], r["implementation"]): r for r in rows if "seconds" in r}
    for method in METHODS:
        s, n = done.get((method, "streaming")), done.get((method, "naive"))
        if s and n:
            rel = abs(s["update_sq_norm"] - n["update_sq_norm"]) / max(n["update_sq_norm"], 1e-30)
            print(f"{method}: streaming and naive agree to a relative {rel:.1e} in ||merged - pretrained||^2.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from mergelab.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
