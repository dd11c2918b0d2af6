"""When a chapter runs again: its content hash (:func:`content_hash`) and the stamp of its last successful run
(``<reports>/.stamps/<notebook>.<profile>.sha256``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mergelab import paths
from mergelab.codeversion import PACKAGE_FILES
from mergelab.params import benchmark_param_files

STAMPS_DIR = ".stamps"


def package_dir() -> Path:
    """The ``mergelab`` package's source folder, whose files (:data:`PACKAGE_FILES`) are part of every content hash."""
    return Path(paths.__file__).resolve().parent


INPUT_VARIABLES = ("MERGELAB_CLIP_DATA_ROOT", "MERGELAB_CLIP_EXPERTS_DIR", "MERGELAB_PRETRAIN", "MERGELAB_FINETUNE")
"""Environment settings that change what a chapter reads (the clip datasets' folder, imported experts, and whether
the tiny size trains instead of taking the shipped encoder and runs): part of every content hash when set."""


def environment_inputs() -> list[tuple[str, str]]:
    """``(variable, value)`` of each of :data:`INPUT_VARIABLES` that is set, a folder as its absolute path; the
    imported experts' folder also by the size and modification time of every file in it (a checkpoint written
    again reruns the chapters). Files written again inside the datasets' folder are not looked for (walking
    hundreds of thousands of images at every ``make report`` would cost more than it saves): ``FORCE=1`` then."""
    out = []
    for var in INPUT_VARIABLES:
        value = os.environ.get(var)
        if not value:
            continue
        if var.endswith(("_ROOT", "_DIR")):
            folder = Path(value).expanduser().resolve()
            value = str(folder)
            if var == "MERGELAB_CLIP_EXPERTS_DIR" and folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                value += "".join(f"\0{p.relative_to(folder).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                 for p in files)
        out.append((var, value))
    return out


def content_hash(notebook: Path, params: Path, profile: str, source_dir: Path | None = None) -> str:
    """SHA-256 of the notebook, its parameter files (the chapter's and the profile's benchmark block),
    the profile, the settings of :func:`environment_inputs` and the package's files under ``source_dir``: every
    ``*.py`` and the data it ships (:data:`PACKAGE_FILES`: the shipped encoder, heads and default runs, code
    fingerprints, the book's filter).

    ``source_dir`` defaults to the installed package (``src/mergelab``); files are hashed in sorted
    order with their relative paths, so renaming a module changes the hash too.
    """
    source_dir = Path(source_dir) if source_dir is not None else package_dir()
    digest = hashlib.sha256()
    for label, data in (
        ("notebook", Path(notebook).read_bytes()),
        ("params", Path(params).read_bytes()),
        *(("benchmark params", f.read_bytes()) for f in benchmark_param_files(Path(params).parent)),
        ("profile", profile.encode()),
        *((f"environment {var}", value.encode()) for var, value in environment_inputs()),
    ):
        digest.update(f"{label}\0{len(data)}\0".encode() + data)
    sources = (p for p in source_dir.rglob("*") if p.suffix in PACKAGE_FILES and "__pycache__" not in p.parts)
    for source in sorted(p for p in sources if p.is_file()):
        data = source.read_bytes()
        digest.update(f"src\0{source.relative_to(source_dir).as_posix()}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def stamp_path(reports: Path, notebook: str, profile: str) -> Path:
    """``<reports>/.stamps/<notebook>.<profile>.sha256``."""
    return Path(reports) / STAMPS_DIR / f"{notebook}.{profile}.sha256"


def is_up_to_date(reports: Path, notebook: str, profile: str, digest: str) -> bool:
    """True when the executed notebook exists and the stamp of its last run holds ``digest``."""
    stamp = stamp_path(reports, notebook, profile)
    if not (Path(reports) / f"{notebook}.ipynb").is_file() or not stamp.is_file():
        return False
    return stamp.read_text(encoding="utf-8").strip() == digest


def clear_stamps(reports: Path, notebook: str) -> None:
    """Remove the stamps of ``notebook`` under every profile. A run clears them when it starts: a chapter writes
    its results file part-way through, so until the run succeeds no earlier run of it counts as up to date (an
    interrupted or failed run would otherwise leave an old executed notebook beside new results)."""
    folder = Path(reports) / STAMPS_DIR
    for old in folder.glob(f"{notebook}.*.sha256"):
        if "." not in old.name[len(notebook) + 1 : -len(".sha256")]:
            old.unlink(missing_ok=True)


def write_stamp(reports: Path, notebook: str, profile: str, digest: str) -> Path:
    """Record a successful run; stamps of other profiles go, since the executed copy is now this one."""
    stamp = stamp_path(reports, notebook, profile)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    clear_stamps(reports, notebook)
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(digest + "\n", encoding="utf-8")
    os.replace(tmp, stamp)
    return stamp
