"""Write ``requirements.lock``: the exact versions of everything ``pip install -e '.[dev,lab]'`` needs.

The closure of mergelab's declared requirements (with the ``dev`` and ``lab`` extras), walked through
the installed distributions' metadata, pinned to the versions installed in this environment, so that
``make env`` on another machine installs what the book was last built with. Packages installed by
hand but not required are left out. Run it with ``make lock`` after changing the environment.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path


EXTRAS = ("dev", "lab")


def closure(root: str = "mergelab", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``root[extras]`` requires."""
    from packaging.markers import default_environment  # here: `make env` runs --for-env in a bare venv, without it
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, str] = {}
    walked: dict[str, set[str]] = {}  # name -> the extras whose requirements were walked ("" for the plain ones)
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    env = default_environment()
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        new = {"", *wanted} - walked.setdefault(key, set())
        if not new:  # reached before with these extras (e.g. jsonschema, then jsonschema[format-nongpl])
            continue
        walked[key] |= new
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in new):
                continue
            dep = canonicalize_name(req.name)
            if dep not in seen:
                try:
                    seen[dep] = metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    continue  # an optional dependency this environment does not have
            todo.append((req.name, tuple(sorted(req.extras))))
    seen.pop(canonicalize_name(root), None)
    return seen


GPU_PINS = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")
"""Pins a CPU-only torch build replaces: torch and torchvision themselves, and the CUDA libraries and Triton that
the regular wheel brings (about 4 GB)."""


def cpu_torch() -> bool:
    """Whether this environment's torch is a CPU-only build (``2.14.1+cpu``, from PyTorch's CPU index)."""
    try:
        return metadata.version("torch").endswith("+cpu")
    except metadata.PackageNotFoundError:
        return False


def without_gpu_pins(lock: str) -> str:
    """``lock`` without the lines of :data:`GPU_PINS` (comments and every other pin kept)."""
    return "".join(line for line in lock.splitlines(keepends=True)
                   if line.startswith("#") or not GPU_PINS.match(_canonical(line.split("==")[0].strip())))


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _write_atomically(path: Path, text: str) -> None:
    """``path`` written through a temporary file beside it and renamed: an interrupted ``make lock`` leaves the old
    lock whole, never a shorter one that ``make env`` would install without an error. (Not
    ``mergelab.utils.atomic_write_text``: ``--for-env`` runs in a bare venv, before mergelab is installed.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``lock.py``: write requirements.lock. ``lock.py --for-env OUT``: write the lock ``make env`` installs to OUT
    (requirements.lock itself, or without :data:`GPU_PINS` when a CPU-only torch is installed: it is kept)."""
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    if argv[:1] == ["--for-env"]:
        lock = (root / "requirements.lock").read_text(encoding="utf-8")
        if cpu_torch():
            print(f"torch {metadata.version('torch')} is a CPU-only build: keeping it (requirements.lock's torch, "
                  "torchvision, CUDA and Triton pins are skipped)")
            lock = without_gpu_pins(lock)
        _write_atomically(Path(argv[1]), lock)
        return 0
    pins = closure()
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    header = ("# Exact versions of mergelab's requirements (dev and lab extras) as last built and tested;\n"
              "# written by `make lock` (scripts/lock.py), used by `make env` when present.\n"
              f"# Python {sys.version.split()[0]}, {platform.system()} {platform.machine()} (the pins of CUDA\n"
              "# libraries are this platform's; make env uses the lock on this platform only)\n")
    out = Path(__file__).resolve().parents[1] / "requirements.lock"
    _write_atomically(out, header + "\n".join(lines) + "\n")
    print(f"wrote {out} ({len(lines)} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
