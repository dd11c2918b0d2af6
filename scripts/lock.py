"""Write ``requirements.lock``: the exact versions of everything ``pip install -e '.[dev,lab]'`` needs.

The closure of mergelab's declared requirements (with the ``dev`` and ``lab`` extras), walked through
the installed distributions' metadata, pinned to the versions installed in this environment, so that
``make env`` on another machine installs what the book was last built with. Packages installed by
hand but not required are left out. Run it with ``make lock`` after changing the environment.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("dev", "lab")


def closure(root: str = "mergelab", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``root[extras]`` requires."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None:
                env = default_environment()
                if not any(req.marker.evaluate({**env, "extra": e}) for e in ("", *wanted)):
                    continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            try:
                seen[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency this environment does not have
            todo.append((req.name, tuple(sorted(req.extras))))
    seen.pop(canonicalize_name(root), None)
    return seen


def main() -> int:
    pins = closure()
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    header = ("# Exact versions of mergelab's requirements (dev and lab extras) as last built and tested;\n"
              "# written by `make lock` (scripts/lock.py), used by `make env` when present.\n"
              f"# Python {sys.version.split()[0]}, {platform.system()} {platform.machine()} (the pins of CUDA\n"
              "# libraries are this platform's; make env uses the lock on this platform only)\n")
    out = Path(__file__).resolve().parents[1] / "requirements.lock"
    out.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(lines)} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
