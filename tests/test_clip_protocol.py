"""The clip size runs the public protocol (issue 27): activation, pickle safety, precision, heads,
class names and templates, splits, recipe, third-party experts. CPU only, no downloads: random
weights stand in for OpenAI's, and empty files laid out like the real datasets stand in for them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import mergelab
from mergelab.params import profile_params
from mergelab.benchmarks.clip import model as clip_model
from mergelab.benchmarks.clip.model import ClipModelConfig, create_clip

TINY = {"name": clip_model.TINY_MODEL, "pretrained": None}
CLIP_ENV = ("MERGELAB_CLIP_DATA_ROOT", "MERGELAB_CLIP_EXPERTS_DIR", "MERGELAB_CLIP_WEIGHTS_DIR")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    for var in CLIP_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def offline_openai(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """open_clip's download and checkpoint loading replaced: the ``openai`` tag "loads" by leaving the
    random initialization in place. Returns the list of checkpoints it was asked to load."""
    import open_clip.factory

    loaded: list[str] = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: "/stand-in/openai.pt")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint",
                        lambda model, path, *a, **k: loaded.append(path))
    return loaded


def activation_of_model(model: torch.nn.Module) -> str:
    """The MLP activation a built model runs, read from its modules (independent of the package's helper)."""
    from open_clip.transformer import QuickGELU

    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    assert len(kinds) == 1, kinds
    return kinds.pop()


# ------------------------------------------------------------------------------------------ 1. activation
def test_openai_weights_run_with_quickgelu_in_every_construction_path(tmp_path, offline_openai):
    cfg = ClipModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "w"))
    with_weights = create_clip(cfg, load_weights=True)[0]
    assert offline_openai == ["/stand-in/openai.pt"], "the tag's weights were not loaded"
    from_cache = create_clip(cfg, load_weights=False)[0]
    assert activation_of_model(with_weights) == "QuickGELU"
    assert activation_of_model(from_cache) == "QuickGELU"
    assert clip_model.activation_of_config(cfg) == "QuickGELU"
    assert clip_model.activation_of_model(with_weights.visual) == "QuickGELU"


def test_an_activation_mismatch_fails_loudly(tmp_path, offline_openai, monkeypatch):
    cfg = ClipModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "w"))
    # the construction of open_clip >= 3 without the tag's options: GELU with OpenAI's weights
    monkeypatch.setattr(clip_model, "model_arch_options", lambda c: {})
    with pytest.raises(ValueError, match="QuickGELU mismatch.*ViT-B-32-quickgelu"):
        create_clip(cfg, load_weights=True)


def test_a_local_weights_file_is_identified_by_its_bytes(tmp_path):
    """Every clip cache derives from the model's identity: a local weights file replaced by another of the same
    size and modification time (cp -p, rsync -a) is another model; the same bytes at another path are not."""
    import os
    import shutil

    first, second = tmp_path / "a" / "weights.pt", tmp_path / "b" / "weights.pt"
    first.parent.mkdir(), second.parent.mkdir()
    first.write_bytes(b"\x00" * 64)
    shutil.copy2(first, second)  # same bytes, size and mtime, another path
    ident = ClipModelConfig(name="ViT-B-32", pretrained=str(first), quick_gelu=True).identity()
    assert ident["file"]["size"] == 64 and ident["activation"] == "QuickGELU"
    same = ClipModelConfig(name="ViT-B-32", pretrained=str(second), quick_gelu=True).identity()
    assert same == ident  # the path is not part of it: a moved file keeps every cache
    assert ClipModelConfig(name="ViT-B-32", pretrained=str(first), quick_gelu=False).identity()["activation"] == "GELU"
    stat = os.stat(second)
    second.write_bytes(b"\x01" * 64)  # other weights, same size, and the old mtime put back
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    clip_model._file_digest.cache_clear()  # a later run (another process) reads the file again
    other = ClipModelConfig(name="ViT-B-32", pretrained=str(second), quick_gelu=True).identity()
    assert other["file"]["size"] == 64 and other["file"]["sha256"] != ident["file"]["sha256"]


def test_a_local_weights_file_must_say_its_activation_which_the_file_does_not_carry(tmp_path):
    """open_clip checks the activation of a tag, not of a file: OpenAI's weights in a local file would run with
    plain GELU under the name ViT-B-32, and every number would be wrong without a warning."""
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"is a local checkpoint, which does not say its MLP activation: set model "
                                         r"quick_gelu: true for OpenAI's weights \(or use the name ViT-B-32-quickgelu\)"):
        ClipModelConfig(name="ViT-B-32", pretrained=str(weights)).identity()
    assert ClipModelConfig(name="ViT-B-32-quickgelu", pretrained=str(weights)).identity()["activation"] == "QuickGELU"
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts the architecture name 'ViT-B-32-quickgelu'"):
        ClipModelConfig(name="ViT-B-32-quickgelu", pretrained=str(weights), quick_gelu=False).identity()
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts the architecture name 'ViT-B-32-quickgelu'"):
        ClipModelConfig(name="ViT-B-32-quickgelu", pretrained=None, quick_gelu=False).identity()  # random init too
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts the pretrained tag 'openai'"):
        ClipModelConfig(name="ViT-B-32", pretrained="openai", quick_gelu=False).identity()
    with pytest.raises(ValueError, match=r"model quick_gelu='yes' is not valid"):
        ClipModelConfig(quick_gelu="yes")
    with pytest.raises(ValueError, match=r"model experts_dir=5 is not valid; use a folder path or null"):
        ClipModelConfig(experts_dir=5)
    with pytest.raises(ValueError, match=r"model init_seed=-1 is not valid"):
        ClipModelConfig(init_seed=-1)


def test_the_activation_keys_every_cache(monkeypatch):
    openai = ClipModelConfig(name="ViT-B-32", pretrained="openai")
    laion = ClipModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert openai.identity()["activation"] == "QuickGELU" and laion.identity()["activation"] == "GELU"
    assert ClipModelConfig(**TINY).identity()["activation"] == "GELU"
    bench = mergelab.load_benchmark("clip", device="cpu", progress=False, model=dict(TINY),
                                    data={"synthetic": True, "num_workers": 0}, tasks=["MNIST"])
    before = (bench.key, bench.cache_dir, bench._head_key("MNIST"), bench._eval_key("MNIST", "test"),
              bench.run_key("expert", ["MNIST"], mergelab.FinetuneConfig()))
    monkeypatch.setattr(clip_model, "activation_of_config", lambda cfg: "QuickGELU")
    after = (bench.key, bench.cache_dir, bench._head_key("MNIST"), bench._eval_key("MNIST", "test"),
             bench.run_key("expert", ["MNIST"], mergelab.FinetuneConfig()))
    assert all(a != b for a, b in zip(before, after)), list(zip(before, after))


# ------------------------------------------------------------------------------------------ 3. precision
@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_is_fp16_without_native_bf16(monkeypatch, capability, expected):
    # recent torch says bf16 is "supported" on a V100 or T4 because it counts emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert clip_model.amp_dtype(torch.device("cuda", 0), "auto") == expected
    assert clip_model.amp_dtype(torch.device("cuda", 0), "fp32") is None
    assert clip_model.amp_dtype(torch.device("cpu"), "auto") is None


def test_the_public_recipe_runs_in_fp32_and_the_precision_keys_experts(monkeypatch):
    assert ClipModelConfig().precision == "fp32"
    bench = mergelab.load_benchmark("clip", device="cpu", progress=False, model=dict(TINY),
                                    data={"synthetic": True, "num_workers": 0}, tasks=["MNIST"])
    assert bench.precision == "fp32"
    cfg = mergelab.FinetuneConfig()
    fp32 = bench.run_key("expert", ["MNIST"], cfg)
    bench.amp = torch.bfloat16
    assert bench.precision == "bf16" and bench.run_key("expert", ["MNIST"], cfg) != fp32


def test_torch_lower_bound_has_the_amp_grad_scaler():
    import tomllib

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    deps = tomllib.loads(text)["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.replace(" ", "").startswith("torch>="))
    major, minor = (int(x) for x in torch_dep.split(">=")[1].split(".")[:2])
    assert (major, minor) >= (2, 3), f"{torch_dep}: torch.amp.GradScaler(device_type) needs torch 2.3"


# ------------------------------------------------------------------------------------------ 2. pickles
class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_without_allow_pickle(tmp_path):
    from mergelab.benchmarks.clip.checkpoints import CheckpointError, read_checkpoint

    marker = tmp_path / "command-ran"
    path = tmp_path / "Evil.pt"
    torch.save({"x": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"allow_pickle: true") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickle's code ran although allow_pickle was not given"
    with pytest.raises(ValueError, match="allow_pickle='yes' is not valid"):
        ClipModelConfig(allow_pickle="yes")


def test_a_release_style_pickle_loads_with_allow_pickle(tmp_path, monkeypatch):
    import sys
    import types

    from mergelab.benchmarks.clip.checkpoints import CheckpointError, load_expert

    mod = types.ModuleType("src_release_modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    ImageEncoder.__module__, ImageEncoder.__qualname__ = mod.__name__, "ImageEncoder"
    mod.ImageEncoder = ImageEncoder
    clip = create_clip(ClipModelConfig(**TINY))[0]
    reference = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(0.5)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save(ImageEncoder(clip), tmp_path / "finetuned.pt")
    monkeypatch.delitem(sys.modules, mod.__name__)  # as on a machine without the public code
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_expert(tmp_path / "finetuned.pt", reference)
    loaded = load_expert(tmp_path / "finetuned.pt", reference, allow_pickle=True)
    assert all(torch.equal(loaded[k], v) for k, v in clip.visual.state_dict().items())


# ------------------------------------------------------------------------------------------ 7. HF experts
def _to_hf_names(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip image tower under transformers' CLIPVisionModel names (written out here, independently
    of the package's mapping): separate q/k/v projections, no visual projection."""
    top = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
    block = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out = {"vision_model.embeddings.position_ids": torch.arange(visual["positional_embedding"].shape[0])[None]}
    for k, v in visual.items():
        if k in top:
            out["vision_model." + top[k]] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            dst = f"vision_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part.clone()
            else:
                module, kind = rest.rsplit(".", 1)
                out[f"{dst}{block[module]}.{kind}"] = v
        else:
            assert k == "proj", k
    return out


def test_fusionbench_hf_experts_are_mapped_to_open_clip_names(tmp_path):
    from safetensors.torch import save_file

    from mergelab.benchmarks.clip.checkpoints import find_expert_checkpoint, load_expert

    clip = create_clip(ClipModelConfig(**TINY))[0]
    reference = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    expert = {k: v + 0.25 * torch.randn_like(v) for k, v in reference.items()}
    (tmp_path / "SVHN").mkdir()
    save_file({k: v.contiguous() for k, v in _to_hf_names(expert).items()}, str(tmp_path / "SVHN" / "model.safetensors"))
    path = find_expert_checkpoint(tmp_path, "SVHN")
    loaded = load_expert(path, reference)
    assert set(loaded) == set(reference)
    for k in reference:
        want = reference[k] if k == "proj" else expert[k]  # a CLIPVisionModel has no projection: the pretrained one
        assert torch.equal(loaded[k], want), k
    # a CLIPModel-style file carries visual_projection (embed_dim, width): it is used, transposed
    with_projection = {**_to_hf_names(expert), "visual_projection.weight": expert["proj"].t().contiguous()}
    torch.save(with_projection, tmp_path / "SVHN.pt")
    assert torch.equal(load_expert(tmp_path / "SVHN.pt", reference)["proj"], expert["proj"])


# ------------------------------------------------------------------------------------------ 4. names, templates
def test_class_names_and_templates_are_the_public_ones():
    from mergelab.benchmarks.clip import datasets as ds

    # counts and entries of the public lists (task_vectors src/datasets/templates.py and classnames)
    counts = {"Cars": 8, "DTD": 8, "EuroSAT": 3, "GTSRB": 3, "MNIST": 1, "RESISC45": 18, "SUN397": 2, "SVHN": 1}
    assert {t: len(v) for t, v in ds.TEMPLATES.items()} == counts
    assert ds.TEMPLATES["MNIST"] == ds.TEMPLATES["SVHN"] == ('a photo of the number: "{}".',)
    assert ds.TEMPLATES["SUN397"] == ("a photo of a {}.", "a photo of the {}.")
    assert ds.TEMPLATES["EuroSAT"] == ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                                       "a centered satellite photo of the {}.")
    assert ds.TEMPLATES["GTSRB"][0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert ds.TEMPLATES["Cars"][3] == "i love my {}!" and ds.TEMPLATES["DTD"][-1] == "a photo of the {} object."
    assert ds.TEMPLATES["RESISC45"][0] == "satellite imagery of {}." and ds.TEMPLATES["RESISC45"][-1] == "aerial view of the {}."
    assert [ds.EUROSAT_CLASSES[c] for c in sorted(ds.EUROSAT_CLASSES)] == [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea"]
    assert len(ds.GTSRB_CLASSES) == 43 and ds.GTSRB_CLASSES[0] == "red and white circle 20 kph speed limit"
    assert ds.GTSRB_CLASSES[14] == "stop" and ds.GTSRB_CLASSES[-1].endswith("no passing for trucks has ended")
    names, label_of_entry = ds.sun397_public_classes(["/a/abbey", "/b/bakery/shop", "/b/bakery_x",
                                                      "/a/apartment_building/outdoor"])
    assert names == ["abbey", "apartment building outdoor", "bakery shop", "bakery x"]
    assert label_of_entry.tolist() == [0, 2, 3, 1]


# ------------------------------------------------------------------------------------------ 5. splits
def _touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = str(folder)
    for n in names:  # ~100,000 files per test: plain os calls, not a Path and a touch() each
        os.close(os.open(os.path.join(base, n), os.O_CREAT | os.O_WRONLY, 0o644))


@pytest.fixture
def many_files_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder for ~100,000 empty files: in memory (``/dev/shm``) where the machine has it, else
    ``tmp_path``. On a disk, creating them while the other test process writes its caches took 27 s of
    system time in ``make test`` (2 s alone); in memory no journal is involved."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mergelab-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_public_split_sizes_on_folders_laid_out_like_the_real_datasets(many_files_dir):
    """Empty image files in the real layouts and numbers (labels are read without decoding images)."""
    from mergelab.benchmarks.clip import datasets as ds

    root = many_files_dir / "root"
    # RESISC45: 45 x 700 images, the public 60/20/20 split files
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in ds.RESISC45_FOLDERS:
        files = [f"{c}_{i:03d}.jpg" for i in range(1, 701)]
        _touch(root / "resisc45" / "NWPU-RESISC45" / c, files)
        rows["train"] += files[:420]
        rows["val"] += files[420:560]
        rows["test"] += files[560:]
    for split, names in rows.items():
        (root / "resisc45" / f"resisc45-{split}.txt").write_text("\n".join(names[::-1]) + "\n")
    # EuroSAT RGB: 27,000 images in its 10 class folders
    eurosat = {"AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500,
               "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000, "River": 2500,
               "SeaLake": 3000}
    for c, n in eurosat.items():
        _touch(root / "eurosat" / "2750" / c, [f"{c}_{i}.jpg" for i in range(1, n + 1)])
    # SUN397: 397 categories, partition 1 lists 50 training and 50 testing images of each
    entries = [f"/{chr(97 + i % 26)}/scene_{i:03d}" + ("/indoor" if i % 7 == 0 else "") for i in range(397)]
    (root / "SUN397").mkdir(parents=True)
    (root / "SUN397" / "ClassName.txt").write_text("\n".join(entries) + "\n")
    lists: dict[str, list[str]] = {"Training_01": [], "Testing_01": []}
    for k, e in enumerate(entries):
        files = [f"sun_{k:03d}{i:03d}.jpg" for i in range(100)]
        _touch(root / "SUN397" / e.lstrip("/"), files)
        lists["Training_01"] += [f"{e}/{f}" for f in files[:50]]
        lists["Testing_01"] += [f"{e}/{f}" for f in files[50:]]
    for name, names in lists.items():
        (root / "SUN397" / f"{name}.txt").write_text("\n".join(names) + "\n")

    def sizes(task: str) -> tuple[int, int, int]:
        source = ds.load_source(task, root)
        return tuple(len(ds.make_split(source, s)) for s in ("train", "val", "test"))

    assert sizes("RESISC45") == (17_010, 1_890, 6_300)  # public: RESISC45Val carved from the 18,900 of train
    assert sizes("EuroSAT") == (21_600, 2_700, 2_700)  # public: EuroSAT_splits
    assert sizes("SUN397") == (17_865, 1_985, 19_850)  # public: SUN397Val carved from 19,850
    # RESISC45's training pool is in ImageFolder's order whatever the order of the split file
    source = ds.load_source("RESISC45", root)
    names = [Path(source.train.base.files[i]).name for i in source.train.indices]
    assert names == sorted(rows["train"], key=lambda n: (n.rsplit("_", 1)[0], n))
    # the EuroSAT rule is deterministic and stratified (10 % of each class as test, 10 % as val)
    again = ds.load_source("EuroSAT", root)
    assert np.array_equal(again.test.indices, ds.load_source("EuroSAT", root).test.indices)
    assert np.bincount(again.test.labels).tolist() == [n // 10 for n in eurosat.values()]
    # the public prepared EuroSAT split is read as it is when present
    for split, n in (("train", 8), ("val", 1), ("test", 1)):
        for c in eurosat:
            _touch(root / "EuroSAT_splits" / split / c, [f"{c}_{split}_{i}.jpg" for i in range(n)])
    assert sizes("EuroSAT") == (80, 10, 10)
    # a prepared folder that lacks a split is named, not replaced silently by mergelab's own split
    import shutil

    shutil.rmtree(root / "EuroSAT_splits" / "val")
    with pytest.raises(ds.DatasetNotFoundError, match=r"EuroSAT_splits/val \(EuroSAT_splits lacks val: the public "
                                                      r"split needs its train, val and test folders"):
        ds.load_source("EuroSAT", root)
    # SUN397's images are indexed in sorted order whatever order the file system lists them in
    sun = ds.load_source("SUN397", root)
    files = [p.as_posix() for p in sun.train.base._image_files]
    assert files == sorted(files)


def test_missing_split_files_are_refused_with_where_to_get_them(tmp_path):
    from mergelab.benchmarks.clip import datasets as ds

    root = tmp_path / "root"
    for c in ds.RESISC45_FOLDERS[:2]:
        _touch(root / "resisc45" / "NWPU-RESISC45" / c, [f"{c}_001.jpg"])
    with pytest.raises(ds.DatasetNotFoundError, match=r"resisc45-train\.txt.*required.*remote_sensing_representations"):
        ds.load_source("RESISC45", root)
    (root / "SUN397").mkdir()
    (root / "SUN397" / "ClassName.txt").write_text("/a/abbey\n")
    _touch(root / "SUN397" / "a" / "abbey", ["sun_001.jpg"])
    with pytest.raises(ds.DatasetNotFoundError, match=r"Training_01\.txt.*required.*Partitions\.zip"):
        ds.load_source("SUN397", root)


# ------------------------------------------------------------------------------------------ 6. recipe
def test_public_recipe_is_the_clip_default_with_the_public_epochs(monkeypatch):
    from mergelab.benchmarks.clip.benchmark import PUBLIC_EPOCHS, PUBLIC_RECIPE, ClipDataConfig

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "params" / "clip").glob("[0-9]*.yaml")):
        params = profile_params("clip", path.stem)
        assert params["model"]["precision"] == "fp32", path.name
        assert params["model"]["allow_pickle"] is False, path.name
    chapter0 = profile_params("clip", "00_benchmark_and_baselines")
    assert chapter0["data"]["train_epochs"] == "public"
    assert PUBLIC_EPOCHS == {"Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15,
                             "SUN397": 14, "SVHN": 4}
    bench = mergelab.load_benchmark("clip", device="cpu", progress=False, model=dict(TINY), tasks=["MNIST"],
                                    data={"synthetic": True, "num_workers": 0, "train_epochs": "public"})
    n = len(bench.dataset("MNIST", "train"))
    recipe = bench.expert_recipe("MNIST")
    assert recipe.num_steps == 5 * -(-n // PUBLIC_RECIPE.batch_size) and recipe.lr == PUBLIC_RECIPE.lr
    # the public MNIST run: 55,000 training images, 430 batches of 128 (the last partial), 5 epochs
    monkeypatch.setattr(bench, "dataset", lambda task, split: range(55_000))
    assert bench.expert_recipe("MNIST").num_steps == 2150
    with pytest.raises(ValueError, match="train_epochs=7 is not valid"):
        ClipDataConfig(train_epochs=7)
    # other recipes (a sweep's, chapter 1's SGD grid) keep their own number of steps
    sgd = mergelab.FinetuneConfig(optimizer="sgd", lr=0.005, num_steps=250, warmup_steps=0, schedule="constant")
    assert bench.expert_recipe("MNIST", sgd) == sgd


def test_a_release_head_beside_imported_experts_scores_them(tmp_path, monkeypatch):
    """Imported public experts are scored with the head they were trained against (``head_<Task>.pt``,
    a pickled linear layer whose rows are logit_scale x normalized class embeddings), not a rebuilt one."""
    from mergelab.benchmarks.clip.checkpoints import CheckpointError
    from mergelab.benchmarks.clip.synthetic import write_synthetic_datasets

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    root = write_synthetic_datasets(tmp_path / "datasets")
    plain = mergelab.load_benchmark("clip", device="cpu", progress=False, model=dict(TINY), tasks=["MNIST"],
                                    data={"root": str(root), "num_workers": 0})
    folder = tmp_path / "release"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(plain.pretrained_state(), str(folder / "MNIST.safetensors"))
    rows = torch.nn.functional.normalize(torch.randn(10, plain.heads["MNIST"].weight.shape[1]), dim=-1)
    head = torch.nn.Linear(rows.shape[1], 10)
    with torch.no_grad():
        head.weight.copy_(100.0 * rows)
        head.bias.zero_()
    torch.save(head, folder / "head_MNIST.pt")  # a pickle, as the release ships it

    def imported(allow_pickle: bool):
        return mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["MNIST"],
                                       model={**TINY, "experts_dir": str(folder), "allow_pickle": allow_pickle},
                                       data={"root": str(root), "num_workers": 0})

    with pytest.raises(CheckpointError, match="allow_pickle: true"):
        imported(False).heads["MNIST"]
    bench = imported(True)
    got = bench.heads["MNIST"]
    torch.testing.assert_close(got.weight, rows)
    assert got.logit_scale == pytest.approx(100.0, rel=1e-5)
    assert got.digest() != plain.heads["MNIST"].digest()
    (folder / "head_MNIST.pt").rename(folder / "head_MNISTVal.pt")  # the TSV code's name for it
    got = imported(True).heads["MNIST"]
    torch.testing.assert_close(got.weight, rows)
    torch.save(torch.nn.Linear(rows.shape[1], 7), folder / "head_MNIST.pt")  # another task's head, found first
    with pytest.raises(CheckpointError, match="7 rows; the task has 10 classes"):
        imported(True).heads["MNIST"]


def test_chapters_side_by_side_write_the_synthetic_datasets_once(tmp_path, monkeypatch):
    """Two lanes of `make report PROFILE=clip_smoke` on a fresh data folder both ask for the synthetic datasets:
    the second waits on the first's build lock instead of writing (or reading) the same files at the same time."""
    import threading

    from mergelab.benchmarks.clip import config as clip_config
    from mergelab.benchmarks.clip import synthetic
    from mergelab.cache import build_lock

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    writes = []
    real = synthetic.write_synthetic_datasets
    monkeypatch.setattr(synthetic, "write_synthetic_datasets", lambda root: writes.append(root) or real(root, tasks=["MNIST"]))
    root = tmp_path / "clip" / "synthetic"
    root.mkdir(parents=True)
    cfg = clip_config.ClipDataConfig(synthetic=True)
    lock = build_lock(root / ".complete")
    lock.acquire()  # another chapter is writing them
    got = []
    waiting = threading.Thread(target=lambda: got.append(cfg.resolve_root()))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and not writes  # it waits, writing nothing
    lock.release()
    waiting.join(timeout=30)
    assert got == [root] and writes == [root] and (root / ".complete").is_file()
    assert cfg.resolve_root() == root and writes == [root]  # complete: read, never written again


def test_synthetic_datasets_of_another_writer_version_go_to_a_folder_of_their_own(tmp_path, monkeypatch):
    """The synthetic datasets are written once per data folder and read by every clip_smoke run after: a new version
    of their writer must not keep reading the old images (they carry no key of their own)."""
    from mergelab import codeversion
    from mergelab.benchmarks.clip import config as clip_config
    from mergelab.benchmarks.clip import synthetic

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    writes = []
    real = synthetic.write_synthetic_datasets
    monkeypatch.setattr(synthetic, "write_synthetic_datasets", lambda root: writes.append(root) or real(root, tasks=["MNIST"]))
    cfg = clip_config.ClipDataConfig(synthetic=True)
    assert codeversion.CODE_VERSIONS["synthetic"] == 1 and cfg.resolve_root() == tmp_path / "clip" / "synthetic"
    monkeypatch.setitem(codeversion.CODE_VERSIONS, "synthetic", 2)
    assert cfg.resolve_root() == tmp_path / "clip" / "synthetic-v2"
    assert writes == [tmp_path / "clip" / "synthetic", tmp_path / "clip" / "synthetic-v2"]
    assert (tmp_path / "clip" / "synthetic-v2" / ".complete").is_file()
