"""The 8 vision tasks of the ``clip`` size: loaders, split rules, class names and prompt templates.

Every task is read from a *data root* (``DATA=/path`` in ``make``, i.e. ``MERGELAB_CLIP_DATA_ROOT``)
in one documented folder layout (``docs/clip.md``), with torchvision's dataset class where one
exists (Cars, DTD, EuroSAT, GTSRB, MNIST, SUN397, SVHN) and a plain folder of images for RESISC45.

Splits:

* ``test``: the dataset's official test split; for datasets without one in torchvision, the
  official split files when they are in the data root (RESISC45, SUN397), else a seeded hold-out
  (:data:`HOLDOUT_TEST_FRACTION`, seed 0) of all images.
* ``train`` / ``val``: the public benchmark's rule: ``val`` is 10 % of the training split, at most
  5,000 examples, drawn with a permutation seeded by 0; ``train`` is the rest (:func:`train_val_split`).

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

VAL_FRACTION = 0.1
MAX_VAL_EXAMPLES = 5000
VAL_SEED = 0
HOLDOUT_SEED = 0
HOLDOUT_TEST_FRACTION = {"EuroSAT": 0.1, "RESISC45": 0.2, "SUN397": 0.5}
"""Share of all images held out as ``test`` when a dataset has no official test split at hand."""

SPLIT_RULE_VERSION = 1
"""Bump when a split rule changes, so that cached experts and evaluations keyed by it are not reused."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")

# ----------------------------------------------------------------------------------------------
# class names and prompt templates (authored here; Cars and SUN397 read theirs from the dataset)
# ----------------------------------------------------------------------------------------------
DIGITS = [str(d) for d in range(10)]

DTD_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
]
"""DTD's 47 texture folders (sorted); the class name is the folder name."""

EUROSAT_CLASSES = {
    "AnnualCrop": "annual cropland",
    "Forest": "forest",
    "HerbaceousVegetation": "herbaceous vegetation or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial or commercial buildings",
    "Pasture": "pasture",
    "PermanentCrop": "permanent cropland such as orchards",
    "Residential": "residential buildings",
    "River": "river",
    "SeaLake": "sea or lake",
}
"""EuroSAT RGB folder name -> the words given to the text encoder (folders sorted = label order)."""

GTSRB_CLASSES = [
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h",
    "speed limit 70 km/h", "speed limit 80 km/h", "end of speed limit 80 km/h", "speed limit 100 km/h",
    "speed limit 120 km/h", "no overtaking", "no overtaking by trucks", "right of way at the next intersection",
    "priority road", "yield", "stop", "no vehicles", "no trucks", "no entry", "general caution",
    "dangerous curve to the left", "dangerous curve to the right", "double curve", "bumpy road",
    "slippery road", "road narrows on the right", "road work", "traffic signals", "pedestrians",
    "children crossing", "bicycles crossing", "beware of ice or snow", "wild animals crossing",
    "end of all speed and passing limits", "turn right ahead", "turn left ahead", "ahead only",
    "go straight or right", "go straight or left", "keep right", "keep left", "roundabout",
    "end of no overtaking", "end of no overtaking by trucks",
]
"""GTSRB's 43 sign classes, indexed by the numeric class id (folder ``000NN`` / ``ClassId``)."""

RESISC45_FOLDERS = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
    "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
    "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]
"""NWPU-RESISC45's 45 scene folders (sorted); the class name is the folder with spaces."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": ("a photo of a {}.", "a photo of the {}, a car.", "a close-up photo of a {} on the road."),
    "DTD": ("a photo of a {} texture.", "a close-up of a {} surface.", "a {} pattern.",
            "a photo of a {} material."),
    "EuroSAT": ("a satellite photo of {}.", "an aerial image showing {}.", "a remote sensing image of {}."),
    "GTSRB": ('a photo of a "{}" traffic sign.', "a road sign that means {}.", "a German traffic sign: {}."),
    "MNIST": ('a photo of the handwritten digit "{}".', "the number {} written by hand."),
    "RESISC45": ("a satellite photo of {}.", "an aerial photograph of {}.", "a remote sensing image of {}.",
                 "a top-down view of {} from above."),
    "SUN397": ("a photo of a {}.", "a photo taken in a {}.", "a scene showing a {}."),
    "SVHN": ('a photo of the house number digit "{}".', "a street number plate showing the digit {}."),
}
"""Prompt templates per task: each class embedding is the mean over templates of the text embedding."""

OBTAIN = {
    "Cars": "Stanford Cars is no longer downloadable from its original site; torchvision documents the "
            "expected files (torchvision.datasets.StanfordCars). Community mirrors (e.g. on Kaggle) carry "
            "the same devkit and image folders.",
    "DTD": "torchvision.datasets.DTD(root=<data root>, download=True) writes it (or download dtd-r1.0.1.tar.gz "
           "from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it into <data root>/dtd/).",
    "EuroSAT": "torchvision.datasets.EuroSAT(root=<data root>, download=True) writes it (RGB version, 27,000 "
               "images).",
    "GTSRB": "torchvision.datasets.GTSRB(root=<data root>, split='train'|'test', download=True) writes it.",
    "MNIST": "torchvision.datasets.MNIST(root=<data root>, train=True|False, download=True) writes it.",
    "RESISC45": "download NWPU-RESISC45 (e.g. from https://www.tensorflow.org/datasets/catalog/resisc45 or its "
                "mirrors) and extract it so that <data root>/resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg "
                "exist; optionally add the split files resisc45-{train,val,test}.txt next to it.",
    "SUN397": "torchvision.datasets.SUN397(root=<data root>, download=True) writes it; add Training_01.txt and "
              "Testing_01.txt from https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip to "
              "<data root>/SUN397/ for the official split.",
    "SVHN": "torchvision.datasets.SVHN(root=<data root>/svhn, split='train'|'test', download=True) writes it.",
}

LAYOUT = {
    "Cars": "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test/, cars_test_annos_withlabels.mat}",
    "DTD": "<root>/dtd/dtd/images/<class>/*.jpg and <root>/dtd/dtd/labels/{train1,val1,test1}.txt",
    "EuroSAT": "<root>/eurosat/2750/<Class>/*.jpg (10 class folders: AnnualCrop ... SeaLake)",
    "GTSRB": "<root>/gtsrb/GTSRB/Training/000NN/*.ppm, <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm and "
             "<root>/gtsrb/GT-final_test.csv",
    "MNIST": "<root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and <root>/MNIST/raw/{train,t10k}-labels-idx1-ubyte",
    "RESISC45": "<root>/resisc45/NWPU-RESISC45/<class>/*.jpg (45 class folders), optional "
                "<root>/resisc45/resisc45-{train,val,test}.txt",
    "SUN397": "<root>/SUN397/ClassName.txt, <root>/SUN397/<letter>/<class>[/<sub>]/sun_*.jpg, optional "
              "<root>/SUN397/{Training_01,Testing_01}.txt",
    "SVHN": "<root>/svhn/{train,test}_32x32.mat",
}


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
# split rules
# ----------------------------------------------------------------------------------------------
def train_val_split(n: int, val_fraction: float = VAL_FRACTION, max_val: int = MAX_VAL_EXAMPLES,
                    seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, val)`` in a training split of ``n`` examples, by the public benchmark's rule.

    ``n_val = min(floor(val_fraction * n), max_val)``; a permutation of ``range(n)`` drawn by
    ``torch.randperm`` with a generator seeded by ``seed`` gives ``train`` (its first ``n - n_val``
    entries) and ``val`` (the rest), which is what ``torch.utils.data.random_split`` does.
    """
    n_val = min(int(n * val_fraction), max_val)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[: n - n_val], perm[n - n_val:]


def holdout_split(n: int, test_fraction: float, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, test)`` of a seeded hold-out: ``floor(test_fraction * n)`` test examples
    drawn by a permutation seeded by ``seed``; both lists sorted."""
    n_test = int(n * test_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def capped(indices: np.ndarray, limit: int | None, seed: int = 1) -> np.ndarray:
    """At most ``limit`` of ``indices``: a seeded random subset (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).numpy()[:limit]
    return indices[pick]


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
    """One official split: a base dataset, the positions used, and their labels."""

    base: Dataset
    indices: np.ndarray
    labels: np.ndarray  # aligned with ``indices``


@dataclass
class TaskSource:
    """A task's official train and test pools and its class names."""

    task: str
    class_names: list[str]
    train: Pool
    test: Pool


def _pool(base: Dataset, labels: Sequence[int], indices: np.ndarray | None = None) -> Pool:
    labels = np.asarray(labels, dtype=np.int64)
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
    return Pool(base, idx, labels[idx])


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
    return TaskSource("MNIST", DIGITS, _pool(tr, tr.targets.numpy()), _pool(te, te.targets.numpy()))


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
    return TaskSource("SVHN", DIGITS, _pool(tr, tr.labels), _pool(te, te.labels))


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
    from torch.utils.data import ConcatDataset
    from torchvision.datasets import DTD

    data = root / "dtd" / "dtd"
    labels_dir = data / "labels"
    _require("DTD", root, data / "images", *(labels_dir / f"{s}1.txt" for s in ("train", "val", "test")))
    parts = {s: _torchvision("DTD", root, data, lambda s=s: DTD(str(root), split=s, partition=1))
             for s in ("train", "val", "test")}
    names = {s: [Path(f).parent.name for f in d._image_files] for s, d in parts.items()}
    train_base = ConcatDataset([parts["train"], parts["val"]])  # train1 + val1; val is carved by the rule
    train_labels = _named_labels("DTD", root, labels_dir, names["train"] + names["val"], DTD_CLASSES)
    test_labels = _named_labels("DTD", root, labels_dir, names["test"], DTD_CLASSES)
    return TaskSource("DTD", list(DTD_CLASSES), _pool(train_base, train_labels),
                      _pool(parts["test"], test_labels))


def _load_eurosat(root: Path) -> TaskSource:
    from torchvision.datasets import EuroSAT

    folder = root / "eurosat" / "2750"
    _require("EuroSAT", root, folder)
    ds = _torchvision("EuroSAT", root, folder, lambda: EuroSAT(str(root)))
    order = sorted(EUROSAT_CLASSES)
    labels = _named_labels("EuroSAT", root, folder, [Path(p).parent.name for p, _ in ds.samples], order)
    tr, te = holdout_split(len(labels), HOLDOUT_TEST_FRACTION["EuroSAT"])
    return TaskSource("EuroSAT", [EUROSAT_CLASSES[c] for c in order], _pool(ds, labels, tr),
                      _pool(ds, labels, te))


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
    split_files = {s: base / f"resisc45-{s}.txt" for s in ("train", "val", "test")}
    if all(p.is_file() for p in split_files.values()):
        position = {f.name: i for i, f in enumerate(files)}

        def read(path: Path) -> list[int]:
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            missing = [n for n in names if n not in position]
            if missing:
                raise _missing("RESISC45", root, folder / missing[0], f"listed in {path.name}")
            return [position[n] for n in names]

        tr = np.array(read(split_files["train"]) + read(split_files["val"]), dtype=np.int64)
        te = np.array(read(split_files["test"]), dtype=np.int64)
    else:
        tr, te = holdout_split(len(files), HOLDOUT_TEST_FRACTION["RESISC45"])
    return TaskSource("RESISC45", [c.replace("_", " ") for c in RESISC45_FOLDERS], _pool(ds, labels, tr),
                      _pool(ds, labels, te))


def sun397_class_name(entry: str) -> str:
    """Words for a SUN397 category path: ``"/a/apartment_building/outdoor"`` -> ``"apartment building (outdoor)"``."""
    parts = [p for p in entry.strip().strip("/").split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # drop the leading letter folder
        parts = parts[1:]
    words = [p.replace("_", " ") for p in parts]
    return words[0] + "".join(f" ({w})" for w in words[1:])


def _load_sun397(root: Path) -> TaskSource:
    from torchvision.datasets import SUN397

    data = root / "SUN397"
    _require("SUN397", root, data / "ClassName.txt")
    ds = _torchvision("SUN397", root, data, lambda: SUN397(str(root)))
    entries = [ln.strip() for ln in (data / "ClassName.txt").read_text().splitlines() if ln.strip()]
    names = [sun397_class_name(e) for e in entries]
    labels = np.asarray(ds._labels, dtype=np.int64)
    if not len(labels):
        raise _missing("SUN397", root, data, "no sun_*.jpg images below it")
    train_file, test_file = data / "Training_01.txt", data / "Testing_01.txt"
    if train_file.is_file() and test_file.is_file():
        position = {"/" + p.relative_to(data).as_posix(): i for i, p in enumerate(ds._image_files)}

        def read(path: Path) -> np.ndarray:
            rows = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            missing = [r for r in rows if r not in position]
            if missing:
                raise _missing("SUN397", root, data / missing[0].lstrip("/"), f"listed in {path.name}")
            return np.array([position[r] for r in rows], dtype=np.int64)

        tr, te = read(train_file), read(test_file)
    else:
        tr, te = holdout_split(len(labels), HOLDOUT_TEST_FRACTION["SUN397"])
    return TaskSource("SUN397", names, _pool(ds, labels, tr), _pool(ds, labels, te))


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
        """Hash of the split's identity (task, split, size, labels): part of cache keys."""
        h = hashlib.sha256(f"{self.task}|{self.split}|{len(self)}|v{SPLIT_RULE_VERSION}".encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(np.ascontiguousarray(self.indices).tobytes())
        return h.hexdigest()[:16]


def make_split(source: TaskSource, split: str, limit: int | None = None) -> TaskSplit:
    """``split`` of ``source`` by the rules in this module's docstring, capped at ``limit`` examples."""
    check_split(split)
    if split == "test":
        positions = np.arange(len(source.test.indices))
        return TaskSplit(source.task, split, source.test, capped(positions, limit))
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
