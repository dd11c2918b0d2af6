"""The 8 vision tasks of the ``clip`` size: loaders, split rules, class names and prompt templates.

Every task is read from a *data root* (``DATA=/path`` in ``make``, i.e. ``MERGELAB_CLIP_DATA_ROOT``)
in one documented folder layout (``docs/clip.md``), with torchvision's dataset class where one
exists (Cars, DTD, EuroSAT, GTSRB, MNIST, SUN397, SVHN) and a plain folder of images for RESISC45.

Splits (the public benchmark's, mlfoundations/task_vectors and the official TSV code):

* ``test``: the dataset's official test split; RESISC45 and SUN397 need their official split files
  (``resisc45-test.txt``, ``Testing_01.txt``) and are refused without them; EuroSAT has none: the
  public ``EuroSAT_splits/test`` folder when present, else :func:`eurosat_split` (a documented,
  deterministic rule of the same sizes).
* ``train`` / ``val``: the public benchmark's rule: ``val`` is 10 % of the training split, at most
  5,000 examples, drawn with a permutation seeded by 0; ``train`` is the rest (:func:`train_val_split`).
  EuroSAT is the exception, as in the public code: its ``val`` is a fixed split of its own.

Training pools are in the order the public code's ``ImageFolder`` lists them (class folder, then file
name, sorted) wherever it reads folders, so that the permutation picks the same ``val`` images.

Labels are always read without decoding a single image, so counting a split is instant.
Everything is lazy: a task's files are listed only when it is first used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

TASKS: tuple[str, ...] = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
"""The 8 tasks of the public task-vector benchmark, in its usual (alphabetical) order."""

SPLITS = ("train", "val", "test")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")

from .splits import (  # noqa: F401  (re-exported)
    EUROSAT_HOLDOUT_FRACTION, HOLDOUT_SEED, MAX_VAL_EXAMPLES, SPLIT_RULE_VERSION, VAL_FRACTION, VAL_SEED, capped,
    eurosat_split, train_val_split)
from .public import (  # noqa: F401  (re-exported)
    DIGITS, DTD_CLASSES, EUROSAT_CLASSES, GTSRB_CLASSES, LAYOUT, OBTAIN, RESISC45_FOLDERS, TEMPLATES)

class DatasetNotFoundError(FileNotFoundError):
    """A task's data is missing or not in the documented layout; the message says where and how to fix."""


def check_task(task: str) -> str:
    """The canonical task name (case-insensitive match), or an error listing the valid ones."""
    if isinstance(task, str):
        for t in TASKS:
            if t.lower() == task.lower():
                return t
    raise ValueError(f"task={task!r} is not a clip task; valid: {', '.join(TASKS)}.")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {', '.join(SPLITS)}.")
    return split


def _missing(task: str, root: Path, looked_at: Path, detail: str = "") -> DatasetNotFoundError:
    extra = f" ({detail})" if detail else ""
    return DatasetNotFoundError(
        f"{task}: dataset not found under the data root {root}: looked for {looked_at}{extra}. "
        f"Expected layout: {LAYOUT[task]}. How to get it: {OBTAIN[task]} "
        "Layouts of all 8 tasks: docs/clip.md.")


def _require(task: str, root: Path, *paths: Path) -> None:
    for p in paths:
        if not p.exists():
            raise _missing(task, root, p)


# ----------------------------------------------------------------------------------------------
# sources: one base dataset per official split, with labels read without decoding images
# ----------------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Images from a list of files: ``dataset[i] -> (PIL RGB image, label)``."""

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int]) -> None:
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[i]) as img:
            return img.convert("RGB"), int(self.labels[i])


@dataclass
class Pool:
    """One official split: a base dataset, the positions used, and their labels.

    ``files``: the file each position of ``base`` reads (``None`` when the base keeps no list, e.g. MNIST);
    ``data_files``: files that hold the whole pool (MNIST's idx files, SVHN's ``.mat``). Their sizes and
    modification times enter :meth:`TaskSplit.fingerprint`, so images replaced in place are new data."""

    base: Dataset
    indices: np.ndarray
    labels: np.ndarray  # aligned with ``indices``
    files: Sequence[str] | None = None
    data_files: tuple[str, ...] = ()


@dataclass
class TaskSource:
    """A task's official train and test pools and its class names; ``val`` when the public benchmark
    fixes it (EuroSAT), else ``None`` and ``val`` is carved from ``train`` (:func:`train_val_split`)."""

    task: str
    class_names: list[str]
    train: Pool
    test: Pool
    val: Pool | None = None
    own_split: bool = False
    """The pools are mergelab's own split of a dataset the public benchmark split its own way, a split no file
    list records (EuroSAT without ``EuroSAT_splits/``): experts fine-tuned elsewhere trained on other images."""


def example_files(base: Dataset) -> list[str] | None:
    """The file each example of ``base`` is read from, in its order: :class:`ImageFiles`' list, torchvision's
    ``_samples`` (GTSRB, Cars), ``samples`` (``ImageFolder``: EuroSAT) or ``_image_files`` (DTD, SUN397); ``None``
    for a dataset that keeps its images in a few files (MNIST, SVHN: see :attr:`Pool.data_files`)."""
    if isinstance(base, ImageFiles):
        return base.files
    for name in ("_samples", "samples"):
        samples = getattr(base, name, None)
        if samples is not None:
            return [str(sample[0]) for sample in samples]
    files = getattr(base, "_image_files", None)
    return None if files is None else [str(f) for f in files]


def files_stamp(paths: Sequence[str]) -> str:
    """SHA-256 (16 hex digits) of the size and modification time (ns) of each file of ``paths``, in order: what
    changes when a file is written again, as ``make`` reads it. Neither the paths nor the data root enter it, so
    a data folder moved or copied with its times (``cp -a``, ``rsync -a``) keeps its caches."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _pool(base: Dataset, labels: Sequence[int], indices: np.ndarray | None = None,
          data_files: Sequence[str | Path] = ()) -> Pool:
    labels = np.asarray(labels, dtype=np.int64)
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
    return Pool(base, idx, labels[idx], example_files(base), tuple(str(f) for f in data_files))


def _torchvision(task: str, root: Path, looked_at: Path, build: Callable[[], Any]) -> Any:
    """Call a torchvision constructor; its errors become one clear :class:`DatasetNotFoundError`."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - any reader error (scipy, PIL, csv...) means unusable files
        raise _missing(task, root, looked_at,
                       f"torchvision could not read it: {type(err).__name__}: {err}") from None


def _load_mnist(root: Path) -> TaskSource:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    _require("MNIST", root, *(raw / f"{s}-{k}" for s in ("train", "t10k")
                              for k in ("images-idx3-ubyte", "labels-idx1-ubyte")))
    tr = _torchvision("MNIST", root, raw, lambda: MNIST(str(root), train=True))
    te = _torchvision("MNIST", root, raw, lambda: MNIST(str(root), train=False))
    files = {s: [raw / f"{s}-{k}" for k in ("images-idx3-ubyte", "labels-idx1-ubyte")] for s in ("train", "t10k")}
    return TaskSource("MNIST", DIGITS, _pool(tr, tr.targets.numpy(), data_files=files["train"]),
                      _pool(te, te.targets.numpy(), data_files=files["t10k"]))


def _svhn_class():
    from torchvision.datasets import SVHN

    class SVHNFiles(SVHN):
        """torchvision's SVHN without the MD5 check of the ``.mat`` files (existence only)."""

        def _check_integrity(self) -> bool:  # noqa: D401
            return os.path.isfile(os.path.join(self.root, self.filename))

    return SVHNFiles


def _load_svhn(root: Path) -> TaskSource:
    folder = root / "svhn"
    _require("SVHN", root, folder / "train_32x32.mat", folder / "test_32x32.mat")
    cls = _svhn_class()
    tr = _torchvision("SVHN", root, folder, lambda: cls(str(folder), split="train"))
    te = _torchvision("SVHN", root, folder, lambda: cls(str(folder), split="test"))
    return TaskSource("SVHN", DIGITS, _pool(tr, tr.labels, data_files=[folder / "train_32x32.mat"]),
                      _pool(te, te.labels, data_files=[folder / "test_32x32.mat"]))


def _load_gtsrb(root: Path) -> TaskSource:
    from torchvision.datasets import GTSRB

    base = root / "gtsrb"
    _require("GTSRB", root, base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images",
             base / "GT-final_test.csv")
    tr = _torchvision("GTSRB", root, base, lambda: GTSRB(str(root), split="train"))
    te = _torchvision("GTSRB", root, base, lambda: GTSRB(str(root), split="test"))
    # torchvision numbers the training folders it finds; the class id is the folder's number.
    try:
        train_labels = [int(Path(p).parent.name) for p, _ in tr._samples]
    except ValueError as err:
        raise _missing("GTSRB", root, base / "GTSRB" / "Training",
                       f"class folders must be numbered 00000..00042: {err}") from None
    test_labels = [int(c) for _, c in te._samples]
    bad = sorted({c for c in train_labels + test_labels if not 0 <= c < len(GTSRB_CLASSES)})
    if bad:
        raise _missing("GTSRB", root, base, f"class ids {bad[:5]} are outside 0..{len(GTSRB_CLASSES) - 1}")
    return TaskSource("GTSRB", list(GTSRB_CLASSES), _pool(tr, train_labels), _pool(te, test_labels))


def _named_labels(task: str, root: Path, where: Path, names: Sequence[str], order: Sequence[str]) -> list[int]:
    """Map each example's class folder name to its index in ``order``, with a clear error if unknown."""
    index = {n: i for i, n in enumerate(order)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise _missing(task, root, where, f"unknown class folder(s) {unknown[:5]}; valid: {', '.join(order)}")
    return [index[n] for n in names]


def _load_dtd(root: Path) -> TaskSource:
    from torchvision.datasets import DTD

    data = root / "dtd" / "dtd"
    labels_dir = data / "labels"
    _require("DTD", root, data / "images", *(labels_dir / f"{s}1.txt" for s in ("train", "val", "test")))
    parts = {s: _torchvision("DTD", root, data, lambda s=s: DTD(str(root), split=s, partition=1))
             for s in ("train", "val", "test")}
    # train1 + val1 form the training pool (val is carved by the rule), in the order of the public
    # code's ImageFolder over the merged folder: class folder, then file name
    merged = sorted((Path(f) for s in ("train", "val") for f in parts[s]._image_files),
                    key=lambda f: (f.parent.name, f.name))
    train_labels = _named_labels("DTD", root, labels_dir, [f.parent.name for f in merged], DTD_CLASSES)
    test_labels = _named_labels("DTD", root, labels_dir, [Path(f).parent.name for f in parts["test"]._image_files],
                                DTD_CLASSES)
    return TaskSource("DTD", list(DTD_CLASSES), _pool(ImageFiles(merged, train_labels), train_labels),
                      _pool(parts["test"], test_labels))


def _load_eurosat(root: Path) -> TaskSource:
    order = sorted(EUROSAT_CLASSES)
    names = [EUROSAT_CLASSES[c] for c in order]
    prepared = root / "EuroSAT_splits"
    absent = [s for s in SPLITS if not (prepared / s).is_dir()]
    if prepared.is_dir() and absent:  # not silently mergelab's own split where the public one was meant
        raise _missing("EuroSAT", root, prepared / absent[0], f"EuroSAT_splits lacks {', '.join(absent)}: the public "
                       "split needs its train, val and test folders; remove EuroSAT_splits to use mergelab's own "
                       "split of eurosat/2750 instead")
    if not absent:
        # the public benchmark's split, as its code reads it: three ImageFolders (train, val, test)
        pools = {}
        for split in SPLITS:
            folder = prepared / split
            present = sorted(p.name for p in folder.iterdir() if p.is_dir())
            _named_labels("EuroSAT", root, folder, present, order)
            files = [f for c in present for f in _list_images(folder / c)]
            if not files:
                raise _missing("EuroSAT", root, folder, "no images in the class folders")
            labels = _named_labels("EuroSAT", root, folder, [f.parent.name for f in files], order)
            pools[split] = _pool(ImageFiles(files, labels), labels)
        return TaskSource("EuroSAT", names, pools["train"], pools["test"], pools["val"])
    from torchvision.datasets import EuroSAT

    folder = root / "eurosat" / "2750"
    if not folder.exists():
        raise _missing("EuroSAT", root, prepared, f"nor {folder}")
    ds = _torchvision("EuroSAT", root, folder, lambda: EuroSAT(str(root)))
    labels = _named_labels("EuroSAT", root, folder, [Path(p).parent.name for p, _ in ds.samples], order)
    tr, va, te = eurosat_split(labels)
    return TaskSource("EuroSAT", names, _pool(ds, labels, tr), _pool(ds, labels, te), _pool(ds, labels, va),
                      own_split=True)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _load_resisc45(root: Path) -> TaskSource:
    base = root / "resisc45"
    folder = base / "NWPU-RESISC45"
    _require("RESISC45", root, folder)
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    _named_labels("RESISC45", root, folder, present, RESISC45_FOLDERS)
    files = [f for c in present for f in _list_images(folder / c)]
    if not files:
        raise _missing("RESISC45", root, folder, "no images in the class folders")
    labels = _named_labels("RESISC45", root, folder, [f.parent.name for f in files], RESISC45_FOLDERS)
    ds = ImageFiles(files, labels)
    split_files = {s: base / f"resisc45-{s}.txt" for s in ("train", "test")}
    for path in split_files.values():
        if not path.is_file():
            raise _missing("RESISC45", root, path, "the public split files are required: the public benchmark "
                           "trains on resisc45-train.txt only and tests on resisc45-test.txt")
    position = {f.name: i for i, f in enumerate(files)}

    def read(path: Path) -> np.ndarray:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        missing = [n for n in names if n not in position]
        if missing:
            raise _missing("RESISC45", root, folder / missing[0], f"listed in {path.name}")
        return np.sort(np.array([position[n] for n in names], dtype=np.int64))  # ImageFolder's order

    # the public training split is resisc45-train.txt alone (18,900 images); resisc45-val.txt is unused
    tr, te = read(split_files["train"]), read(split_files["test"])
    return TaskSource("RESISC45", [c.replace("_", " ") for c in RESISC45_FOLDERS], _pool(ds, labels, tr),
                      _pool(ds, labels, te))


def sun397_public_classes(entries: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The public class names and label order of SUN397 from ``ClassName.txt``'s entries.

    The public code reads SUN397 prepared as one folder per class named after the entry without its
    leading slash, ``/`` replaced by ``_`` (``/a/apartment_building/outdoor`` ->
    ``a_apartment_building_outdoor``); its ``ImageFolder`` sorts these folders, and the class name is
    the folder without its letter prefix, ``_`` as spaces (``apartment building outdoor``).

    Returns:
        ``(names, label_of_entry)``: public names in public label order, and for entry ``i`` of
        ``ClassName.txt`` its public label.
    """
    folders = [e.strip().lstrip("/").replace("/", "_") for e in entries]
    order = sorted(range(len(folders)), key=lambda i: folders[i])
    label_of_entry = np.empty(len(folders), dtype=np.int64)
    label_of_entry[order] = np.arange(len(folders))
    return [folders[i][2:].replace("_", " ") for i in order], label_of_entry


def _load_sun397(root: Path) -> TaskSource:
    from torchvision.datasets import SUN397

    data = root / "SUN397"
    _require("SUN397", root, data / "ClassName.txt")
    train_file, test_file = data / "Training_01.txt", data / "Testing_01.txt"
    for path in (train_file, test_file):
        if not path.is_file():
            raise _missing("SUN397", root, path, "the official partition files are required: without them the "
                           "split is neither the public one nor the same on two machines")
    ds = _torchvision("SUN397", root, data, lambda: SUN397(str(root)))
    # torchvision lists the images in the file system's order (rglob): sorted, an index names one image on every
    # copy of the data (rsync, another disk), and so do the splits' fingerprints
    order = sorted(range(len(ds._image_files)), key=lambda i: ds._image_files[i].as_posix())
    ds._image_files = [ds._image_files[i] for i in order]
    ds._labels = [ds._labels[i] for i in order]
    entries = [ln.strip() for ln in (data / "ClassName.txt").read_text().splitlines() if ln.strip()]
    names, label_of_entry = sun397_public_classes(entries)
    labels = label_of_entry[np.asarray(ds._labels, dtype=np.int64)] if len(ds._labels) else np.zeros(0, np.int64)
    if not len(labels):
        raise _missing("SUN397", root, data, "no sun_*.jpg images below it")
    position = {"/" + p.relative_to(data).as_posix(): i for i, p in enumerate(ds._image_files)}

    def read(path: Path) -> np.ndarray:
        rows = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        missing = [r for r in rows if r not in position]
        if missing:
            raise _missing("SUN397", root, data / missing[0].lstrip("/"), f"listed in {path.name}")
        idx = np.array([position[r] for r in rows], dtype=np.int64)
        # the public ImageFolder's order: class folder (public label), then file name
        return idx[np.lexsort(([Path(r).name for r in rows], labels[idx]))]

    return TaskSource("SUN397", names, _pool(ds, labels, read(train_file)), _pool(ds, labels, read(test_file)))


def _load_cars(root: Path) -> TaskSource:
    from torchvision.datasets import StanfordCars

    base = root / "stanford_cars"
    _require("Cars", root, base / "devkit" / "cars_meta.mat", base / "devkit" / "cars_train_annos.mat",
             base / "cars_train", base / "cars_test", base / "cars_test_annos_withlabels.mat")
    tr = _torchvision("Cars", root, base, lambda: StanfordCars(str(root), split="train"))
    te = _torchvision("Cars", root, base, lambda: StanfordCars(str(root), split="test"))
    names = [str(c) for c in tr.classes]
    return TaskSource("Cars", names, _pool(tr, [c for _, c in tr._samples]), _pool(te, [c for _, c in te._samples]))


LOADERS: dict[str, Callable[[Path], TaskSource]] = {
    "Cars": _load_cars, "DTD": _load_dtd, "EuroSAT": _load_eurosat, "GTSRB": _load_gtsrb,
    "MNIST": _load_mnist, "RESISC45": _load_resisc45, "SUN397": _load_sun397, "SVHN": _load_svhn,
}


def load_source(task: str, root: str | Path) -> TaskSource:
    """Read ``task``'s official pools from ``root`` (clear error when missing or misplaced)."""
    task = check_task(task)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"the clip data root {root} does not exist. Put the datasets there (layouts in docs/clip.md) "
            "and point to it with DATA=/path (make), MERGELAB_CLIP_DATA_ROOT or data.root in the parameters.")
    return LOADERS[task](root)


# ----------------------------------------------------------------------------------------------
# one split of one task, with a transform
# ----------------------------------------------------------------------------------------------
class TaskSplit(Dataset):
    """One split of one task: ``dataset[i] -> (transform(image), label)``.

    Attributes:
        task, split: names.
        labels: ``(N,)`` int64 labels, read without decoding images.
    """

    def __init__(self, task: str, split: str, pool: Pool, positions: np.ndarray,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.task, self.split = task, split
        self.base = pool.base
        self.indices = pool.indices[positions]
        self.labels = pool.labels[positions]
        self.transform = transform
        self.files = None if pool.files is None else [pool.files[int(i)] for i in self.indices]
        self.data_files = pool.data_files
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> "TaskSplit":
        """The same examples with another transform (a shallow copy)."""
        out = object.__new__(TaskSplit)
        out.__dict__.update(self.__dict__)
        out.transform = transform
        return out

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.base[int(self.indices[i])][0]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def fingerprint(self) -> str:
        """Hash of the split's identity (task, split, size, labels, example indices) and of its files' sizes and
        modification times (:func:`files_stamp`: an image written again, in place under the same name and label,
        makes a new fingerprint): part of cache keys. Computed once per split object (one ``stat`` per example)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.task}|{self.split}|{len(self)}|v{SPLIT_RULE_VERSION}".encode())
            h.update(np.ascontiguousarray(self.labels).tobytes())
            h.update(np.ascontiguousarray(self.indices).tobytes())
            h.update(files_stamp([*(self.files or ()), *self.data_files]).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def make_split(source: TaskSource, split: str, limit: int | None = None) -> TaskSplit:
    """``split`` of ``source`` by the rules in this module's docstring, capped at ``limit`` examples."""
    check_split(split)
    if split == "test":
        positions = np.arange(len(source.test.indices))
        return TaskSplit(source.task, split, source.test, capped(positions, limit))
    if source.val is not None:  # a fixed public val split (EuroSAT): train is the whole training pool
        if split == "val":
            return TaskSplit(source.task, split, source.val, capped(np.arange(len(source.val.indices)), limit))
        return TaskSplit(source.task, split, source.train, capped(np.arange(len(source.train.indices)), limit))
    train, val = train_val_split(len(source.train.indices))
    return TaskSplit(source.task, split, source.train, capped(train if split == "train" else val, limit))


class ImageView:
    """Lazy, indexable images of a split: ``view[i]`` is ``(3, H, W)``, ``view[a:b]`` a stacked tensor."""

    def __init__(self, dataset: TaskSplit) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | slice | Sequence[int]) -> torch.Tensor:
        if isinstance(item, slice):
            return torch.stack([self.dataset[i][0] for i in range(*item.indices(len(self)))])
        if isinstance(item, (list, tuple, np.ndarray, torch.Tensor)):
            return torch.stack([self.dataset[int(i)][0] for i in item])
        return self.dataset[int(item)][0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self[0].shape) if len(self) else (0,)
