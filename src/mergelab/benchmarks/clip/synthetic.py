"""Small synthetic stand-ins for the 8 clip datasets, written in each dataset's documented layout.

For tests and the ``clip_smoke`` profile: a few tiny images per class, in exactly the files and
folders the loaders of :mod:`mergelab.benchmarks.clip.datasets` read (idx files for MNIST, ``.mat`` files for
SVHN and Cars, ``.ppm`` and a CSV for GTSRB, split lists for DTD, RESISC45 and SUN397). The images
are a class-dependent colour plus noise, so the numbers measured on them mean nothing; what they
exercise is every loader, split rule and label mapping.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import DTD_CLASSES, EUROSAT_CLASSES, GTSRB_CLASSES, RESISC45_FOLDERS, TASKS, check_task

SUN397_SYNTHETIC = ["/a/abbey", "/b/beach", "/k/kitchen", "/a/apartment_building/outdoor", "/f/forest_path"]
CARS_SYNTHETIC = ["AM General Hummer SUV 2000", "Audi TT Hatchback 2011", "Ford Mustang Convertible 2007",
                  "Tesla Model S Sedan 2012"]


def _image(rng: np.random.Generator, label: int, n_classes: int, size: int, mode: str = "RGB") -> Image.Image:
    hue = np.array([np.cos(2 * np.pi * label / n_classes + k) for k in (0, 2.1, 4.2)])
    base = 127 + 90 * hue
    pixels = np.clip(base[None, None, :] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    return img.convert("L") if mode == "L" else img


def _classes(n_all: int, n_classes: int) -> list[int]:
    """``n_classes`` class ids spread over ``range(n_all)`` (always including 0 and the last)."""
    return sorted({int(round(x)) for x in np.linspace(0, n_all - 1, min(n_classes, n_all))})


def _idx_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(struct.pack(">IIII", 0x0803, len(images), *images.shape[1:]) + images.tobytes())


def _idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", n_train), ("t10k", n_test)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.stack([np.asarray(_image(rng, int(c), 10, 28, "L")) for c in labels])
        _idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_svhn(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int) -> None:
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.stack([np.asarray(_image(rng, int(c), 10, 32)) for c in labels], axis=-1)  # (32, 32, 3, N)
        savemat(folder / f"{split}_32x32.mat", {"X": images, "y": np.where(labels == 0, 10, labels)[:, None]})


def write_gtsrb(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int,
                n_classes: int = 4) -> None:
    base = root / "gtsrb"
    classes = _classes(len(GTSRB_CLASSES), n_classes)
    for c in classes:
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _image(rng, c, len(GTSRB_CLASSES), size).save(folder / f"00000_{i:05d}.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True, exist_ok=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    k = 0
    for c in classes:
        for _ in range(n_test):
            name = f"{k:05d}.ppm"
            _image(rng, c, len(GTSRB_CLASSES), size).save(test_dir / name)
            rows.append(f"{name};{size};{size};0;0;{size - 1};{size - 1};{c}")
            k += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def write_dtd(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int,
              n_classes: int = 4) -> None:
    data = root / "dtd" / "dtd"
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in _classes(len(DTD_CLASSES), n_classes):
        name = DTD_CLASSES[c]
        folder = data / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        counts = {"train": n_train, "val": 1, "test": n_test}
        k = 0
        for split, count in counts.items():
            for _ in range(count):
                fname = f"{name}_{k:04d}.jpg"
                _image(rng, c, len(DTD_CLASSES), size).save(folder / fname)
                lists[split].append(f"{name}/{fname}")
                k += 1
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for split, rows in lists.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")


def write_eurosat(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int) -> None:
    order = sorted(EUROSAT_CLASSES)
    for c, name in enumerate(order):
        folder = root / "eurosat" / "2750" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_test):
            _image(rng, c, len(order), size).save(folder / f"{name}_{i + 1}.jpg")


def write_resisc45(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int,
                   n_classes: int = 4) -> None:
    base = root / "resisc45"
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in _classes(len(RESISC45_FOLDERS), n_classes):
        name = RESISC45_FOLDERS[c]
        folder = base / "NWPU-RESISC45" / name
        folder.mkdir(parents=True, exist_ok=True)
        k = 1
        for split, count in (("train", n_train), ("val", 1), ("test", n_test)):
            for _ in range(count):
                fname = f"{name}_{k:03d}.jpg"
                _image(rng, c, len(RESISC45_FOLDERS), size).save(folder / fname)
                lists[split].append(fname)
                k += 1
    for split, rows in lists.items():
        (base / f"resisc45-{split}.txt").write_text("\n".join(rows) + "\n")


def write_sun397(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int) -> None:
    data = root / "SUN397"
    data.mkdir(parents=True, exist_ok=True)
    (data / "ClassName.txt").write_text("\n".join(SUN397_SYNTHETIC) + "\n")
    lists: dict[str, list[str]] = {"Training_01": [], "Testing_01": []}
    for c, entry in enumerate(SUN397_SYNTHETIC):
        folder = data / entry.strip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_test):
            fname = f"sun_{c:03d}{i:04d}.jpg"
            _image(rng, c, len(SUN397_SYNTHETIC), size).save(folder / fname)
            lists["Training_01" if i < n_train else "Testing_01"].append(f"{entry}/{fname}")
    for name, rows in lists.items():
        (data / f"{name}.txt").write_text("\n".join(rows) + "\n")


def write_cars(root: Path, rng: np.random.Generator, n_train: int, n_test: int, size: int) -> None:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty(len(CARS_SYNTHETIC), dtype=object)
    names[:] = CARS_SYNTHETIC
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, per_class, folder, annos in (
            ("train", n_train, base / "cars_train", base / "devkit" / "cars_train_annos.mat"),
            ("test", n_test, base / "cars_test", base / "cars_test_annos_withlabels.mat")):
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for c in range(len(CARS_SYNTHETIC)):
            for _ in range(per_class):
                fname = f"{len(records) + 1:05d}.jpg"
                _image(rng, c, len(CARS_SYNTHETIC), size).save(folder / fname)
                records.append((fname, c + 1))  # the devkit numbers classes from 1
        annotations = np.zeros(len(records), dtype=[("fname", object), ("class", object)])
        for i, (fname, cls) in enumerate(records):
            annotations[i] = (fname, np.uint8(cls))
        savemat(annos, {"annotations": annotations})


WRITERS = {"Cars": write_cars, "DTD": write_dtd, "EuroSAT": write_eurosat, "GTSRB": write_gtsrb,
           "MNIST": write_mnist, "RESISC45": write_resisc45, "SUN397": write_sun397, "SVHN": write_svhn}


def write_synthetic_datasets(root: str | Path, tasks: Iterable[str] = TASKS, n_train: int = 6, n_test: int = 4,
                             image_size: int = 24, seed: int = 0) -> Path:
    """Write tiny synthetic versions of ``tasks`` under ``root`` in the documented layouts.

    Args:
        root: the data root to create (``<root>/MNIST/raw/...``, ``<root>/svhn/...``, ...).
        tasks: which of the 8 tasks to write.
        n_train, n_test: images per class in the official train and test splits (DTD and RESISC45
            also get one official validation image per class, which joins train).
        image_size: side of the stored images in pixels (the model's transform resizes them).
        seed: seeds the pixel noise.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(tasks):
        task = check_task(task)
        WRITERS[task](root, np.random.default_rng(seed + 1000 * i), n_train, n_test, image_size)
    return root
