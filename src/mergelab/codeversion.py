"""Versions of the code that makes cached artifacts, so that a cache cannot outlive that code.

Cache keys hash configurations. A fix to the training loop changes no configuration, so without more
a user who pulls it would keep the artifacts the bug made. Each kind of trained artifact therefore
has a version in :data:`CODE_VERSIONS` that enters its cache key, and a fingerprint of the source that
makes it (:data:`SOURCES`: the files' syntax trees without docstrings, so that comments, docstrings
and formatting do not count). ``tests/test_codeversion.py`` compares the fingerprints with the ones
recorded in ``code_fingerprints.json``: a change to that source fails the test until its author
decides. If the change can change what is trained, bump the kind's version (the caches are rebuilt);
if not (a refactor), leave it. Either way record the new fingerprints with
``python -m mergelab.codeversion --update``.

Version 1 is the code that made the caches before versions were recorded: its keys are those of that
time (the version enters a key from 2 on), so existing caches stay valid until a bump.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FINGERPRINTS_FILE = PACKAGE / "code_fingerprints.json"

CODE_VERSIONS: dict[str, int] = {"data": 1, "pretrain": 2, "finetune": 1, "trajectory": 1, "scratch": 1, "evaluation": 1,
                                 "merge": 2, "mass": 3, "ga": 2, "synthetic": 1}
"""Version of the code that makes each kind of cached artifact (bump to rebuild its caches)."""

SOURCES: dict[str, tuple[str, ...]] = {
    # the tiny size's images (task splits and the pretext pool): a bump regenerates them and rebuilds the encoder
    # and every run on them (the version enters benchmarks.tiny.data.generator_key)
    "data": ("benchmarks/tiny/data.py", "benchmarks/tiny/pretext.py"),
    "pretrain": ("training/pretrain.py", "training/finetune.py", "models.py", "benchmarks/tiny/benchmark.py"),
    "finetune": ("training/finetune.py", "models.py", "benchmarks/base.py", "benchmarks/tiny/benchmark.py",
                 "benchmarks/clip/benchmark.py", "benchmarks/clip/training.py", "benchmarks/clip/model.py",
                 "benchmarks/clip/datasets.py", "autodiff.py",  # autocast; images and augmentations; gradient probes
                 "training/sweep.py"),  # the sweep's loop writes experts under the same keys
    "trajectory": ("training/trajectories.py", "training/finetune.py", "models.py", "benchmarks/tiny/benchmark.py",
                   "benchmarks/clip/benchmark.py", "benchmarks/clip/datasets.py",
                   "benchmarks/clip/model.py"),  # the clip size's encoder and preprocessing the trajectories train
    "scratch": ("training/scratch.py", "alignment/architectures.py",  # chapter 06's models from different seeds
                "models.py"),  # the ViT is the tiny encoder's class
    "evaluation": ("benchmarks/base.py", "benchmarks/tiny/benchmark.py", "benchmarks/clip/benchmark.py",
                   "benchmarks/clip/datasets.py", "benchmarks/clip/splits.py", "benchmarks/clip/model.py", "models.py",
                   "analysis/generalization.py", "analysis/responses.py",  # cached accuracies, losses and responses per weights
                   "autodiff.py",  # the per-example gradient norms chapter 01's store keeps
                   "experiments/ch01_hessian.py",  # the Hessian's extreme eigenvalues chapter 01 caches per point
                   "analysis/diagnostics.py",  # chapter 00's linear probes, cached per encoder and task
                   "merging/select.py"),  # at_grid_edge, which the probes' results record
    # chapter 04's MASS results per router and split: routing, second-pass merges, head choice, the mixed batches
    "mass": ("merging/mass.py", "merging/mass_features.py", "merging/tsv/merge.py", "merging/tsv/compress.py",
             "linalg/polar.py", "linalg/svd.py", "linalg/_kernels.py", "linalg/_lapack.py", "experiments/ch04_mass.py",
             "task_vectors.py"),  # the first and second passes are theta_0 + a merged task vector
    # chapter 05's genetic searches: the fitness values their checkpoints store and replay (IRT estimators, the
    # merge each genome makes, the search itself)
    "ga": ("analysis/irt.py", "merging/evolve.py", "experiments/ch05_merge3.py", "task_vectors.py"),
    "merge": ("experiments/ch06_c2m3.py", "experiments/ch06_store.py", "experiments/ch06_models.py",
              "alignment/frank_wolfe.py",
              "alignment/matching.py", "alignment/repair.py", "alignment/specs.py", "alignment/architectures.py",
              "training/scratch.py", "models.py"),  # chapter 06's merge jobs: alignments, merges, REPAIR, their evaluation
    # the clip size's synthetic datasets (``data.synthetic``), written once per data folder: a bump writes them again
    # into a folder of their own (ClipDataConfig.resolve_root), so nothing keeps reading the old images
    "synthetic": ("benchmarks/clip/synthetic.py",),
}
"""The package files (relative to ``src/mergelab``) whose code makes each kind of artifact."""


def _check_kind(kind: str) -> None:
    if kind not in CODE_VERSIONS:
        raise ValueError(f"kind={kind!r} is not valid; use one of {', '.join(CODE_VERSIONS)}.")


def key_part(kind: str) -> dict[str, int]:
    """What a cache key of ``kind`` adds: ``{"code_version": v}`` from version 2 on, else nothing."""
    _check_kind(kind)
    version = CODE_VERSIONS[kind]
    return {"code_version": version} if version > 1 else {}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_fingerprint(kind: str) -> str:
    """SHA-256 (first 16 hex digits) of the syntax trees of :data:`SOURCES` ``[kind]``, docstrings removed."""
    _check_kind(kind)
    digest = hashlib.sha256()
    for name in SOURCES[kind]:
        tree = _strip_docstrings(ast.parse((PACKAGE / name).read_text(encoding="utf-8")))
        digest.update(name.encode() + b"\0" + ast.dump(tree, include_attributes=False).encode() + b"\0")
    return digest.hexdigest()[:16]


PACKAGE_FILES = (".py", ".json", ".safetensors", ".lua")
"""What the package is made of: modules and the data it ships (the tiny encoder's weights and their
record, the book's Lua filter); anything else in the folder (an editor's swap file) is not."""


def package_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the whole package: every module's syntax tree with docstrings
    removed, and the bytes of the data files it ships (:data:`PACKAGE_FILES`). Equal for two checkouts only when all their code and shipped data
    are; the test session names its smoke book's cache folder by it (``tests/conftest.py``), so the
    notebook tests never read an artifact that other code made, whatever the versions say."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in PACKAGE_FILES
                       and "__pycache__" not in p.parts and p != FINGERPRINTS_FILE):
        name = path.relative_to(PACKAGE).as_posix()
        if path.suffix == ".py":
            body = ast.dump(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8"))),
                            include_attributes=False).encode()
        else:
            body = path.read_bytes()
        digest.update(name.encode() + b"\0" + body + b"\0")
    return digest.hexdigest()[:16]


def recorded_fingerprints() -> dict[str, dict[str, object]]:
    """``{kind: {"version", "fingerprint"}}`` as recorded in ``code_fingerprints.json``."""
    return json.loads(FINGERPRINTS_FILE.read_text(encoding="utf-8"))


def stale_kinds() -> list[str]:
    """Kinds whose source or version differs from what ``code_fingerprints.json`` records."""
    recorded = recorded_fingerprints()
    return [k for k in CODE_VERSIONS
            if recorded.get(k) != {"version": CODE_VERSIONS[k], "fingerprint": source_fingerprint(k)}]


def update() -> None:
    """Record the current fingerprints and versions in ``code_fingerprints.json``."""
    from .utils import atomic_write_json

    atomic_write_json(FINGERPRINTS_FILE, {k: {"version": CODE_VERSIONS[k], "fingerprint": source_fingerprint(k)}
                                          for k in CODE_VERSIONS})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergelab.codeversion",
                                     description="Check or record the fingerprints of the code behind cached artifacts.")
    parser.add_argument("--update", action="store_true", help="record the current fingerprints")
    args = parser.parse_args(argv)
    if args.update:
        update()
        print(f"recorded {FINGERPRINTS_FILE}")
        return 0
    stale = stale_kinds()
    for k in stale:
        print(f"{k}: source changed since it was recorded (version {CODE_VERSIONS[k]})")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
