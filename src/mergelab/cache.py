"""Artifacts cached on disk: a state dict (safetensors) and its JSON sidecar, keyed by a configuration.

Every cache of the package (pretrained encoders, heads, experts, sweep checkpoints, trajectories)
follows one pattern, written here once:

* the name is ``<prefix>-<key>.safetensors`` in a folder, ``key`` a hash of everything that made the
  artifact (:func:`mergelab.utils.config_hash`), so a changed configuration is a new file;
* writes are atomic (temporary file, then rename), the weights first and the sidecar last, so an
  artifact counts as complete only when both exist, and an interrupted run never leaves a half
  artifact that is read back;
* the sidecar records the SHA-256 of the weights file, checked on every load: a corrupt or truncated
  file is reported with its path and rebuilt by :meth:`Artifact.get_or_build`, never silently used;
* :meth:`Artifact.get_or_build` builds and saves what is missing, otherwise loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .utils import StateDict, atomic_save_safetensors, atomic_write_json, config_hash, load_safetensors, read_json


class CorruptArtifactError(RuntimeError):
    """A cached file that does not hold what was written: names the file and how to rebuild it."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"cached file {path} is corrupt: {why}. Delete it (and its .json sidecar) to have it "
                         "rebuilt, or run `make clean-cache`.")
        self.path = path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_lock(path: Path) -> Any:
    """An inter-process lock (:mod:`filelock`) for building the cache file ``path``: processes sharing a
    data folder (a report's chapters side by side, JupyterLab, a sweep's workers) build it once, the others
    wait and then read it. The lock file is ``<path's folder>/.locks/<name>.lock``, out of the way of
    anything that lists the cache folder. Use as ``with build_lock(path): ...``, checking again inside
    whether another process built the file meanwhile."""
    from filelock import FileLock

    locks = Path(path).parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{Path(path).name}.lock"))


def result_path(owner: Any, folder: str, key: Callable[[], Mapping[str, Any]]) -> Path | None:
    """Where a result that is numbers, not weights, is kept: ``<owner.cache_dir>/<folder>/<config_hash(key())>.json``,
    ``key()`` naming everything the result depends on (called only here: digests of weights cost time). ``None`` when
    ``owner`` (a benchmark) has no ``cache_dir`` or no ``evaluation_key`` to name its data with: such a result is
    computed, not cached."""
    cache_dir = getattr(owner, "cache_dir", None)
    if cache_dir is None or not hasattr(owner, "evaluation_key"):
        return None
    return Path(cache_dir) / folder / f"{config_hash(dict(key()))}.json"


def read_result(path: Path | None, required: Collection[str]) -> dict[str, Any] | None:
    """The JSON mapping at ``path`` when it holds every key of ``required``; ``None`` when there is no path, no file, a
    damaged one or one without them (it is computed again and rewritten)."""
    cached = read_json(path) if path is not None else None
    return cached if isinstance(cached, dict) and set(required) <= set(cached) else None


@dataclass(frozen=True)
class Artifact:
    """One cached state dict ``path`` (``.safetensors``) with its sidecar ``path.with_suffix('.json')``."""

    path: Path

    @classmethod
    def at(cls, folder: str | Path, prefix: str, key: str) -> Artifact:
        """``<folder>/<prefix>-<key>.safetensors``."""
        return cls(Path(folder) / f"{prefix}-{key}.safetensors")

    @property
    def sidecar(self) -> Path:
        """The JSON file beside the weights: what made them (configuration, log, timings)."""
        return self.path.with_suffix(".json")

    def exists(self) -> bool:
        """Both the weights and the sidecar are there (the sidecar is written last)."""
        return self.path.is_file() and self.sidecar.is_file()

    def load(self, device: str | torch.device = "cpu") -> StateDict:
        """The cached tensors, on ``device``, after checking the file against the sidecar's checksum
        (:class:`CorruptArtifactError` when it does not match or cannot be read)."""
        self._check_sha256(file_sha256(self.path))
        return self._parse(lambda: load_safetensors(self.path, device))

    def load_with_sha256(self, device: str | torch.device = "cpu") -> tuple[StateDict, str]:
        """The cached tensors and the SHA-256 of the very bytes they were read from (one read of the file, so a
        file rewritten meanwhile cannot pair other weights with this digest), checked like :meth:`load` against
        the sidecar's checksum when it records one."""
        from safetensors.torch import load as load_bytes

        data = self.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self._check_sha256(sha)
        return {k: v.to(device) for k, v in self._parse(lambda: load_bytes(data)).items()}, sha

    def _check_sha256(self, actual: str) -> None:
        """:class:`CorruptArtifactError` when the sidecar records a SHA-256 other than ``actual`` (the file's)."""
        expected = self.meta().get("sha256") if self.sidecar.is_file() else None
        if expected is not None and actual != expected:
            raise CorruptArtifactError(self.path, "its SHA-256 differs from the one recorded when it was written")

    def _parse(self, read: Callable[[], StateDict]) -> StateDict:
        """``read()``, its failure to parse the file raised as :class:`CorruptArtifactError`."""
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CorruptArtifactError(self.path, f"it cannot be read ({type(err).__name__}: {err})") from None

    def meta(self) -> dict[str, Any]:
        """The sidecar's contents; a clear error when the artifact is not cached."""
        if not self.sidecar.is_file():
            raise FileNotFoundError(f"no cached artifact at {self.sidecar}: build it first (the notebook or "
                                    "function that makes it writes it there).")
        return json.loads(self.sidecar.read_text())

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
             metadata: Mapping[str, str] | None = None) -> None:
        """Write the tensors, then the sidecar, each atomically (``metadata``: safetensors' own strings)."""
        atomic_save_safetensors(self.path, dict(tensors), metadata=dict(metadata) if metadata else None)
        atomic_write_json(self.sidecar, {**dict(meta), "sha256": file_sha256(self.path)})

    def get_or_build(self, build: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
                     metadata: Mapping[str, str] | None = None) -> StateDict:
        """The cached tensors; when they are missing or corrupt, ``build() -> (tensors, meta)`` makes them
        (again) first, saying so for a corrupt file.

        The build holds a lock file beside the artifact (``.locks/<name>.safetensors.lock``, :mod:`filelock`), so
        processes sharing a data folder (a report and JupyterLab, the test processes, the workers of a
        sweep) build it once: the others wait, then load what the first one saved."""
        state = self._load_complete()
        if state is not None:
            return state
        with build_lock(self.path):
            state = self._load_complete()  # built by another process while this one waited?
            if state is None:
                tensors, meta = build()
                self.save(tensors, meta, metadata)
                state = self.load()
        return state

    def _load_complete(self) -> StateDict | None:
        """The cached tensors, or ``None`` when the artifact is missing or corrupt (saying so)."""
        if not self.exists():
            return None
        try:
            return self.load()
        except CorruptArtifactError as err:
            print(f"{err} Rebuilding it.")
            return None
