"""Small shared helpers: seeding, device choice, configuration hashing and atomic writes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: the report runner and the course tools need these helpers, not torch
    import torch

StateDict = dict[str, "torch.Tensor"]
"""A model's parameters by name (``model.state_dict()``), e.g. ``"conv1.weight": (width, 3, p, p)``."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that the same seed gives the same numbers."""
    check_integer("seed", seed, minimum=0)
    seed = int(seed)
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def check_integer(name: str, value: Any, minimum: int = 1) -> None:
    """Raise a ``ValueError`` naming ``name`` and ``value`` unless ``value`` is an integer (not a bool, not a
    string such as ``"300"``) of at least ``minimum``. ``name`` is written as the user wrote the setting
    (e.g. ``"pretrain num_steps"``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        valid = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} is not valid; use {valid}.")


def task_names(tasks: Any, valid: Sequence[str]) -> tuple[str, ...] | None:
    """The ``tasks`` parameter as a tuple of names (``None`` or empty: ``None``, every task); a single string
    is refused, since iterating it would give its letters."""
    if isinstance(tasks, str):
        raise ValueError(f"tasks={tasks!r} is not valid; give a list of task names, e.g. [{tasks!r}] "
                         f"(valid: {', '.join(valid)}).")
    return tuple(tasks) if tasks else None


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` and ``value`` unless ``value`` is a real number (not a bool, not a
    string such as ``"1e-3"``, finite) in the interval from ``low`` to ``high`` (``None``: unbounded), each end
    closed unless ``low_open`` / ``high_open``."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if ok:
        return
    if high is None and low == 0 and low_open:
        valid = "a positive number"
    elif high is None and low is not None:
        valid = f"a number {'>' if low_open else '>='} {low:g}"
    elif low is None and high is not None:
        valid = f"a number {'<' if high_open else '<='} {high:g}"
    elif low is None:
        valid = "a number"
    else:
        valid = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{name}={value!r} is not valid; use {valid}.")


def pick_device(device: str | None = "auto") -> torch.device:
    """The device to merge and evaluate on.

    Args:
        device: ``"auto"`` (or ``None``) picks CUDA when available, else CPU; ``"cpu"``, ``"cuda"``,
            ``"cuda:1"`` or ``"mps"`` force one.
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device; valid: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'."
        ) from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'.")
    return chosen


def shows_progress(owner: Any, progress: bool | None) -> bool:
    """Whether a step shows a progress bar: ``progress`` when given, else ``owner``'s own ``progress`` setting (a
    benchmark's; ``False`` for an object without one)."""
    return bool(getattr(owner, "progress", False) if progress is None else progress)


def keeps_global_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``fn`` so that torch's global random state is saved before the call and put back after it.

    For functions that seed torch themselves (``torch.manual_seed(cfg.seed)``, so that their result depends on
    their configuration only): the caller's random stream then goes on where it was, whether or not the
    function ran (a cached expert skips it). The CPU generator always; every CUDA device's generator wherever CUDA
    is available, initializing it if need be (a generator that ``fn`` itself initialized would otherwise keep the
    seed ``fn`` queued for it). Inside ``fn`` nothing changes, so its results are the same bits as without it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then restore the number."""
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def size_threads(owner: Any) -> contextlib.AbstractContextManager[None]:
    """:func:`torch_threads` at ``owner``'s ``train_threads`` (a benchmark's: the tiny size fixes one; ``None``, the
    caller's count, for a size or an object without it). What is cached under a key that names no thread count is
    computed in it, so that a report lane and a notebook on more cores give the same bits."""
    return torch_threads(getattr(owner, "train_threads", None))


@contextlib.contextmanager
def eval_mode(*modules: "torch.nn.Module") -> Iterator[None]:
    """Run the block with every module in eval mode, then give each (and each submodule) back the training
    flag it came in with, also after an error or an interrupt."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Run the block with the environment variables ``values`` set (``None``: unset), then restore each
    to what it was (unset again if it was unset)."""
    def put(variables: Mapping[str, str | None]) -> None:
        for key, value in variables.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    put(values)
    try:
        yield
    finally:
        put(saved)


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file is missing or unreadable (a cache that is read
    this way is rebuilt, not trusted, when a write was cut short or the file was damaged)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


_PLAIN = frozenset({int, float, bool, str, type(None)})
"""Types JSON writes as they are."""


def to_jsonable(value: Any, ordered: bool = False) -> Any:
    """``value`` as JSON can write it, recursively: dataclasses as mappings (their ``recorded_fields()`` where they
    have one, e.g. :class:`~mergelab.training.FinetuneConfig`; keys sorted, as strings), tuples
    as lists, paths as strings, NumPy scalars and arrays and torch tensors as numbers and lists; anything else
    unchanged. What :func:`atomic_write_json` writes and :func:`config_hash` hashes. ``ordered``: mappings keep
    their keys' order instead (a result whose per-task dicts are read back in the tasks' order)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        recorded = getattr(value, "recorded_fields", None)  # a dataclass that leaves settings out of its record
        return to_jsonable(recorded() if callable(recorded) else dataclasses.asdict(value), ordered)
    if isinstance(value, Mapping):
        items = value.items() if ordered else sorted(value.items(), key=lambda kv: str(kv[0]))
        return {str(k): to_jsonable(v, ordered) for k, v in items}
    if isinstance(value, (list, tuple)):
        if all(type(v) in _PLAIN for v in value):  # a list of numbers (per-example losses): nothing to convert
            return list(value)
        return [to_jsonable(v, ordered) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def config_hash(config: Any, length: int = 16) -> str:
    """A stable hex digest of a configuration (dataclass, mapping or JSON-able value).

    Keys are sorted, so two configurations that are equal as mappings hash alike.
    """
    blob = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex, 24 digits) of a state dict's names, shapes, dtypes and bytes, in key order: the key
    under which evaluations of a model are cached."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        # flat first: a contiguous tensor with a trailing dimension of size 1 may keep a stride != 1 there
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _umask() -> int:
    """The process's file-creation mask: from ``/proc/self/status`` on Linux (no change to the process),
    else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename: never a half-written file.

    The file gets the mode ``open`` would give it (``0o666`` less the umask), not the ``0o600`` of a
    temporary file, so a cache shared by a group (a course server) stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the file ``src`` to ``dst`` (contents and permission bits) through a temporary file beside ``dst``:
    an interrupted copy leaves ``dst`` as it was, never half written."""
    import shutil

    return atomic_write(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, recursively, for strict JSON."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def nan_for_none(value: Any) -> Any:
    """``value`` with every ``None`` inside it replaced by NaN, recursively: numbers read back from strict
    JSON, where :func:`finite_or_none` wrote a measured NaN (or an infinity, which comes back as NaN) as null."""
    if isinstance(value, Mapping):
        return {k: nan_for_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_for_none(v) for v in value]
    return float("nan") if value is None else value


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, payload: Any, strict: bool = False, ordered: bool = False) -> Path:
    """Write ``payload`` as indented JSON atomically; dataclasses, arrays and tensors are converted.

    ``strict``: write standard JSON, every NaN or infinity as ``null`` (Python's default writes the
    non-standard ``NaN``, which browsers and most other languages refuse). ``ordered``: keep the mappings'
    key order (:func:`to_jsonable`; by default keys are sorted)."""
    data = to_jsonable(payload, ordered)
    if strict:
        data = finite_or_none(data)
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=not strict)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n"))


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors with safetensors atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=dict(metadata or {})))


def atomic_save_npz(path: str | Path, compress: bool = True, **arrays: np.ndarray) -> Path:
    """Save NumPy arrays as an ``.npz`` atomically, compressed unless ``compress`` is false (noisy float
    images shrink by a fifth and cost 15x the CPU time to read back; :func:`numpy.load` reads both)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)

    return atomic_write(Path(path), write)


def read_npz(path: str | Path, warn: bool = True) -> dict[str, np.ndarray] | None:
    """Every array of the ``.npz`` in ``path``, read into memory, or ``None`` when the file is missing or
    unreadable (a damaged cache is made again, not trusted: an interrupted write cannot leave one, see
    :func:`atomic_write`, but a crash of the machine or a full disk can); a damaged file is named in a warning
    (``warn``), compressed or not."""
    import warnings
    import zipfile
    import zlib

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        if warn:
            warnings.warn(f"{path} is unreadable ({type(err).__name__}: {err}); making it again.", RuntimeWarning,
                          stacklevel=2)
        return None


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> StateDict:
    """Load a safetensors file into a state dict on ``device``."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def clone_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached copy of a state dict (same devices and dtypes)."""
    return {k: v.detach().clone() for k, v in state.items()}
