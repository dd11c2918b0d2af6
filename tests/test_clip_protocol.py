"""The clip size runs the public protocol (issue 27): activation, pickle safety, precision, heads,
class names and templates, splits, recipe, third-party experts. CPU only, no downloads: random
weights stand in for OpenAI's, and empty files laid out like the real datasets stand in for them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mergelab
from mergelab.clip import model as clip_model
from mergelab.clip.model import ClipModelConfig, create_clip

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
