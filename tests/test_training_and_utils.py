"""Fine-tuning hyperparameters, schedules, and the small utilities every cache relies on."""

from __future__ import annotations

import json
from dataclasses import asdict as dataclasses_asdict, replace

import pytest
import torch
from torch import nn

from mergelab.models import ClassificationHead
from mergelab.training import (FinetuneConfig, PretrainConfig, finetune, frozen_parameters, lr_at, pretrain_attributes,
                               recipe_fields)
from mergelab.utils import atomic_write_json, config_hash, pick_device, seed_everything


def test_lr_schedules():
    cfg = FinetuneConfig(lr=1.0, num_steps=110, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    const = FinetuneConfig(lr=0.3, num_steps=5, warmup_steps=0, schedule="constant")
    assert [lr_at(s, const) for s in range(5)] == [0.3] * 5
    lin = FinetuneConfig(lr=1.0, num_steps=10, warmup_steps=0, schedule="linear")
    assert lr_at(5, lin) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "lion"}, "optimizer='lion' is not valid; use one of sgd, adam, adamw"),
    ({"lr": 0.0}, "lr=0.0 is not valid"),
    ({"batch_size": 0}, "batch_size=0 is not valid"),
    ({"data_fraction": 1.5}, r"data_fraction=1.5 is not valid; use a number in \(0, 1\]"),
    ({"lr": "5e-4"}, r"lr='5e-4' is not valid; use a positive number"),  # a string, as YAML reads '5e-4' quoted
    ({"weight_decay": "0.1"}, r"weight_decay='0.1' is not valid; use a number >= 0"),
    ({"grad_clip": -1.0}, r"grad_clip=-1.0 is not valid; use a number >= 0"),
    ({"momentum": "0.9"}, r"momentum='0.9' is not valid; use a number"),
    ({"seed": "0"}, r"seed='0' is not valid; use an integer >= 0"),
    ({"warmup_steps": 2.5}, r"warmup_steps=2.5 is not valid; use an integer >= 0"),
    ({"num_steps": True}, r"num_steps=True is not valid; use a positive integer"),
    ({"schedule": "step"}, "schedule='step' is not valid"),
    ({"warmup_steps": 500, "num_steps": 10}, "warmup_steps=500 is not valid"),
    ({"frozen": "conv1"}, r"frozen='conv1' is not valid; give a list of parameter or module names"),
    ({"frozen": ["conv1."]}, r"frozen=\['conv1.'\] is not valid"),
    ({"frozen": ["conv1", "conv1"]}, r"frozen=\['conv1', 'conv1'\] is not valid; it names 'conv1' twice"),
])
def test_bad_hyperparameters_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def _toy_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 6, generator=g)
    y = (X[:, 0] > 0).long()
    head = ClassificationHead(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]), logit_scale=10.0)
    return X, y, head


def test_finetune_lowers_the_loss_keeps_the_head_and_is_deterministic():
    X, y, head = _toy_problem()
    cfg = FinetuneConfig(optimizer="sgd", lr=0.1, batch_size=32, num_steps=40, warmup_steps=0, seed=3)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(6, 4)
        head_before = head.weight.clone()
        hist = finetune(model, {"toy": (X, y)}, {"toy": head}, cfg, progress=False)
        assert torch.equal(head.weight, head_before)
        weights.append(model.weight.detach().clone())
    assert sum(hist["loss"][-5:]) < sum(hist["loss"][:5])
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


class _StemAndBody(nn.Module):
    """A two-part model: ``stem`` (6 -> 6) then ``body`` (6 -> 4), the names ``frozen`` addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.stem(x)))


def test_frozen_parameters_keep_their_bits_while_the_rest_trains_and_every_flag_comes_back():
    X, y, head = _toy_problem()
    torch.manual_seed(0)
    model = _StemAndBody()
    model.body.bias.requires_grad_(False)  # the caller's own flag on another parameter comes back too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(optimizer="adamw", lr=0.05, batch_size=32, num_steps=20, warmup_steps=0, weight_decay=0.5,
                         frozen=["stem"])
    hist = finetune(model, {"toy": (X, y)}, {"toy": head}, cfg, progress=False)
    after = model.state_dict()
    assert torch.equal(after["stem.weight"], before["stem.weight"]) and torch.equal(after["stem.bias"], before["stem.bias"])
    assert not torch.equal(after["body.weight"], before["body.weight"])  # weight decay too leaves the stem alone
    assert torch.equal(after["body.bias"], before["body.bias"])
    assert sum(hist["loss"][-3:]) < sum(hist["loss"][:3])
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert frozen_parameters(model, ("stem",)) == ["stem.weight", "stem.bias"]
    assert frozen_parameters(model, ("body.weight",)) == ["body.weight"]  # a parameter's own name
    with pytest.raises(ValueError, match=r"frozen=\['conv1'\] has 'conv1', which is no parameter or module of the "
                                         r"encoder; its top-level names are body, stem"):
        finetune(_StemAndBody(), {"toy": (X, y)}, {"toy": head}, replace(cfg, frozen=("conv1",)), progress=False)
    with pytest.raises(ValueError, match="'ste', which is no parameter"):  # a prefix of a name is not the module
        frozen_parameters(model, ("ste",))


def test_a_recipe_that_freezes_nothing_keeps_the_keys_it_had_before_the_setting_existed():
    whole = FinetuneConfig(lr=5e-4, seed=2)
    legacy = {k: v for k, v in dataclasses_asdict(whole).items() if k != "frozen"}
    assert recipe_fields(whole) == legacy and config_hash(whole) == config_hash(legacy)
    stem = replace(whole, frozen=("conv1",))
    assert recipe_fields(stem) == {**legacy, "frozen": ["conv1"]} and config_hash(stem) != config_hash(whole)
    assert FinetuneConfig(frozen=["b", "a"]) == FinetuneConfig(frozen=("a", "b"))  # one setting, one key


def test_finetune_records_the_gradient_norm_before_clipping(monkeypatch):
    X, y, head = _toy_problem()
    seen: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        norm = clip(params, max_norm, *args, **kwargs)
        seen.append(float(norm))
        assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))) <= max_norm * 1.001
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = FinetuneConfig(optimizer="sgd", lr=0.1, batch_size=32, num_steps=6, warmup_steps=0, seed=3, grad_clip=1e-3)
    hist = finetune(nn.Linear(6, 4), {"toy": (X, y)}, {"toy": head}, cfg, progress=False)
    assert len(hist["grad_norm"]) == 6 and hist["grad_norm"] == seen
    assert min(hist["grad_norm"]) > 1e-3, "the norms are those before clipping"
    plain = finetune(nn.Linear(6, 4), {"toy": (X, y)}, {"toy": head}, replace(cfg, grad_clip=0.0), progress=False)
    assert plain["grad_norm"] == []


def test_data_fraction_uses_a_subset():
    X, y, head = _toy_problem()
    seen = []

    class Spy(nn.Linear):
        def forward(self, x):
            seen.append(x)
            return super().forward(x)

    finetune(Spy(6, 4), {"toy": (X, y)}, {"toy": head},
             FinetuneConfig(batch_size=8, num_steps=30, warmup_steps=0, data_fraction=0.25), progress=False)
    rows = {tuple(r.tolist()) for batch in seen for r in batch}
    assert len(rows) == 32  # ceil(0.25 * 128) distinct examples


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    import hashlib

    # the digest is SHA-256 of compact, key-sorted JSON: the same in every process and version (cache keys rely on it)
    assert config_hash({"b": [1, 2], "a": 1}) == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()[:16]
    # a dataclass is hashed by the fields it records (a recipe's: every field, `frozen` only where it is set)
    assert config_hash(FinetuneConfig(), length=64) == hashlib.sha256(
        json.dumps(recipe_fields(FinetuneConfig()), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config_hash(PretrainConfig(), length=64) == hashlib.sha256(
        json.dumps(dataclasses_asdict(PretrainConfig()), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config_hash(FinetuneConfig(lr=0.1)) != config_hash(FinetuneConfig(lr=0.2))


def test_state_digest_reads_the_values_whatever_the_strides():
    """Equal tensors digest alike however they are laid out (a column sliced from a wider matrix is contiguous
    with a stride of 5 on its size-1 dimension), and another value, name, shape or dtype digests otherwise."""
    from mergelab.utils import state_digest

    wide = torch.arange(20.0).reshape(4, 5)
    column = wide.T[:, :1]  # (5, 1), strides (1, 5)
    assert column.is_contiguous() and column.stride(-1) != 1
    digest = state_digest({"w": column})
    assert digest == state_digest({"w": column.clone(memory_format=torch.contiguous_format)})
    assert digest == state_digest({"w": torch.arange(0.0, 5.0).reshape(5, 1)})
    assert len({digest, state_digest({"v": column}), state_digest({"w": column.reshape(1, 5)}),
                state_digest({"w": column.double()}), state_digest({"w": column + 1})}) == 5


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path):
    import json

    import numpy as np
    import torch

    payload = {"nan": float("nan"), "inf": np.float32("inf"), "ok": 0.5, "rows": [{"x": float("-inf")}, {"x": 2}],
               "tensor": torch.tensor([1.0, float("nan")])}
    loose = atomic_write_json(tmp_path / "loose.json", payload)
    assert "NaN" in loose.read_text()
    strict = atomic_write_json(tmp_path / "strict.json", payload, strict=True)

    def refuse(constant):
        raise ValueError(f"{constant} in strict JSON")

    data = json.loads(strict.read_text(), parse_constant=refuse)
    assert data == {"nan": None, "inf": None, "ok": 0.5, "rows": [{"x": None}, {"x": 2}], "tensor": [1.0, None]}


def test_seed_and_device_helpers():
    seed_everything(1)
    a = torch.rand(3)
    seed_everything(1)
    torch.testing.assert_close(a, torch.rand(3))
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='quantum' is not a device"):
        pick_device("quantum")
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)


def test_on_step_sees_every_step_with_the_updated_model():
    X, y, head = _toy_problem()
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    snapshots = {}
    finetune(model, {"toy": (X, y)}, {"toy": head},
             FinetuneConfig(optimizer="sgd", lr=0.1, batch_size=32, num_steps=5, warmup_steps=0),
             progress=False, on_step=lambda step, m: snapshots.__setitem__(step, m.weight.detach().clone()))
    assert list(snapshots) == [1, 2, 3, 4, 5]
    torch.testing.assert_close(snapshots[5], model.weight.detach())
    assert not torch.equal(snapshots[1], snapshots[5])


def test_pretrain_attributes_learns_the_pretext_labels():
    
    g = torch.Generator().manual_seed(0)
    X = torch.rand(64, 4, generator=g)
    attrs = torch.stack([(X[:, 0] > 0.5).long(), (X[:, 1] > 0.5).long()], dim=1)
    torch.manual_seed(0)
    model = nn.Linear(4, 8)
    losses = pretrain_attributes(model, X, attrs, [2, 2], PretrainConfig(num_steps=60, batch_size=32, lr=0.05,
                                                                        warmup_steps=0), lambda x: x,
                                 progress=False)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    with pytest.raises(ValueError, match="objective='mae' is not valid; use one of contrastive, attributes"):
        PretrainConfig(objective="mae")


def test_torch_threads_sets_the_number_for_the_block_and_restores_it_even_on_error():
    from mergelab.utils import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_setup_takes_the_chapter_s_parameters_from_the_namespace_and_builds_its_benchmark_once():
    from mergelab import report
    from mergelab.notebook import setup
    from mergelab.params import ReportError

    names = report.profile_params("tiny", "00_benchmark_and_baselines")
    namespace = {**report.profile_params("smoke", "00_benchmark_and_baselines"), "unrelated": 1}
    session = setup("00_benchmark_and_baselines", namespace)
    assert set(session.parameters) == set(names) and "unrelated" not in session.parameters
    assert session.seed == namespace["seed"] and session.parameters["tasks"] == namespace["tasks"]
    assert session.bench is session.bench and session.bench.tasks == tuple(namespace["tasks"])
    with pytest.raises(ValueError, match="needs the parameters .*merge_methods.*run the parameters cell"):
        setup("00_benchmark_and_baselines", {k: v for k, v in namespace.items() if k != "merge_methods"})
    # a value set by `papermill -p` or in JupyterLab is checked as the report runner checks a parameter file's
    with pytest.raises(ReportError, match=r"00_benchmark_and_baselines's parameters: parameter seeds=3 is a number; "
                                          r".* expects a list"):
        setup("00_benchmark_and_baselines", {**namespace, "seeds": 3})


def test_atomic_writes_honour_the_umask(tmp_path):
    import os

    from mergelab.utils import atomic_save_safetensors

    previous = os.umask(0o002)
    try:
        a = atomic_write_json(tmp_path / "a.json", {"x": 1})
        b = atomic_save_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert oct(a.stat().st_mode & 0o777) == oct(0o664) and oct(b.stat().st_mode & 0o777) == oct(0o664)


def test_interactive_runs_write_to_the_lab_folder_and_runner_runs_where_told(monkeypatch, tmp_path):
    from mergelab import notebook, paths

    monkeypatch.delenv("MERGELAB_REPORTS_DIR", raising=False)
    monkeypatch.delenv("MERGELAB_RESULTS_DIR", raising=False)
    monkeypatch.setattr(paths, "project_root", lambda: tmp_path)
    assert notebook.use_lab_folder()
    assert paths.reports_dir() == (tmp_path / "reports" / "lab").resolve()
    assert paths.results_dir() == (tmp_path / "reports" / "lab" / "results").resolve()
    monkeypatch.setenv("MERGELAB_REPORTS_DIR", str(tmp_path / "book"))  # what make report sets for its kernels
    assert not notebook.use_lab_folder()
    assert paths.reports_dir() == (tmp_path / "book").resolve()


def test_times_phrase_says_fewer_or_more_by_the_ratio_of_the_larger_to_the_smaller():
    from mergelab.notebook import times_phrase

    assert times_phrase(34_400, 112_000) == "3.3x fewer"
    assert times_phrase(140_000, 112_000) == "1.2x more"
    assert times_phrase(5_600, 112_000) == "20x fewer"  # no decimal from 10 on
    assert times_phrase(3, 3) == "as many"
    assert times_phrase(1, 2, fewer="cheaper", more="dearer") == "2.0x cheaper"
    with pytest.raises(ValueError, match="use two positive numbers"):
        times_phrase(0, 10)


def test_main_result_states_the_headline_and_every_claim_not_reproduced_or_undecided():
    from mergelab.notebook import main_result

    claims = [{"claim": "A holds.", "status": "reproduced"}, {"claim": "B holds.", "status": "not_reproduced"},
              {"claim": "C holds (paper: 1)", "status": "not_testable"}]
    text = main_result("X reaches .9", claims, "07_x", undecided="not decided")
    assert text.startswith("**Main result of this run**: X reaches .9; 1 of 3 claims reproduced")
    assert "; not reproduced: B holds; not decided: C holds (paper: 1). The numbers" in text  # one period, at the end
    assert text.endswith("The numbers behind every figure are in `reports/results/07_x.json`.")
    assert main_result("Y", claims[:1], "07_x") == ("**Main result of this run**: Y; 1 of 1 claims reproduced. "
                                                    "The numbers behind every figure are in `reports/results/07_x.json`.")


def test_shift_crop_moves_each_image_by_at_most_pad_pixels_and_pad_zero_keeps_it():
    from mergelab.training.pretrain import shift_crop

    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert shift_crop(x, 0, torch.Generator().manual_seed(1)) is x
    out = shift_crop(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):  # every view is one crop of its own padded image
        crops = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert crops, f"image {i} is not a shifted crop"
    assert not all(torch.equal(out[i], x[i]) for i in range(len(x)))  # some images moved


def test_task_view_keeps_position_and_colour_and_scales_each_images_brightness_within_its_range():
    from mergelab.training.pretrain import task_view

    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.05
    out = task_view(x, torch.Generator().manual_seed(1), shift=0, brightness=0.1, noise=0.0)
    factor = out / x  # no shift, no noise, nothing clamped (pixels <= .85 * 1.1): one factor per image
    per_image = factor.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert per_image.min() >= 0.9 - 1e-6 and per_image.max() <= 1.1 + 1e-6
    assert per_image[:, 0].std() > 0.01  # images get their own factors
    noisy = task_view(x, torch.Generator().manual_seed(1), noise=0.05)
    assert noisy.min() >= 0 and noisy.max() <= 1 and 0.02 < float((noisy - out).std()) < 0.08
    torch.testing.assert_close(task_view(x, torch.Generator().manual_seed(1)), noisy)  # same seed, same view


def _factor_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(48, 3, 8, 8, generator=g)
    targets = {"kind": (X[:, 0].mean((1, 2)) > 0.5).long(), "regression": X[:, 1].mean((1, 2))[:, None],
               "strokes": (X[:, 2, :2, :2].flatten(1) > 0.5).float()}
    return X, targets, torch.rand(40, 3, 8, 8, generator=g)


def test_pretrain_factors_adds_the_contrastive_term_on_unlabelled_images_reproducibly():
    from mergelab.training.pretrain import pretrain_factors

    X, targets, unlabelled = _factor_problem()
    cfg = dict(num_steps=6, batch_size=16, lr=0.01, warmup_steps=0, unlabelled_batch=8)

    def run(weight: float, images=unlabelled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
        losses = pretrain_factors(model, X, targets, {"kind": 2}, PretrainConfig(**cfg, unlabelled_weight=weight),
                                  lambda x: x, progress=False, unlabelled=images)
        return losses, model[1].weight.detach().clone()

    plain, with_term = run(0.0), run(0.5)
    assert with_term[0][0] > plain[0][0] + 0.1  # the first step's loss adds .5 x InfoNCE (about .5 log 15)
    assert not torch.equal(plain[1], with_term[1])
    again = run(0.5)
    assert again[0] == with_term[0] and torch.equal(again[1], with_term[1])  # same seed, same weights
    assert run(0.0, images=None)[0] == plain[0]  # off: the images are not even needed
    with pytest.raises(ValueError, match="unlabelled_weight=0.5 needs unlabelled images, at least unlabelled_batch=8; got none"):
        run(0.5, images=None)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "1e-3"}, r"pretrain lr='1e-3' is not valid; use a positive number"),
    ({"lr": 0}, r"pretrain lr=0 is not valid; use a positive number"),
    ({"weight_decay": "0.05"}, r"pretrain weight_decay='0.05' is not valid; use a number >= 0"),
    ({"temperature": "0.2"}, r"pretrain temperature='0.2' is not valid; use a positive number"),
    ({"warmup_steps": "200"}, r"pretrain warmup_steps='200' is not valid; use an integer >= 0"),
    ({"num_steps": 3000.0}, r"pretrain num_steps=3000.0 is not valid; use a positive integer"),
    ({"seed": -1}, r"pretrain seed=-1 is not valid; use an integer >= 0"),
    ({"view_noise": "0.05"}, r"pretrain view_noise='0.05' is not valid; use a number >= 0"),
])
def test_pretrain_config_refuses_values_of_the_wrong_type_before_any_data_is_made(kwargs, match):
    """A number written as a string (``lr: "1e-3"``) fails here, naming the setting, not later inside AdamW."""
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**kwargs)


def test_check_number_and_check_integer_accept_numpy_scalars_and_name_the_valid_range():
    import numpy as np

    from mergelab.utils import check_integer, check_number

    check_integer("seed", np.int64(3), minimum=0)  # what a sweep may pass
    check_number("lr", np.float32(1e-3), low=0, low_open=True)
    check_number("noise", 0, low=0, high=1, high_open=True)
    with pytest.raises(ValueError, match=r"noise=1 is not valid; use a number in \[0, 1\)"):
        check_number("noise", 1, low=0, high=1, high_open=True)
    with pytest.raises(ValueError, match=r"x=-inf is not valid; use a number <= 2"):
        check_number("x", float("-inf"), high=2)  # inside the bound, but not finite
    with pytest.raises(ValueError, match=r"lr=nan is not valid; use a positive number"):
        check_number("lr", float("nan"), low=0, low_open=True)
    with pytest.raises(ValueError, match=r"k=1 is not valid; use an integer >= 2"):
        check_integer("k", 1, minimum=2)


def test_pretrain_config_refuses_bad_contrastive_settings_naming_them():
    with pytest.raises(ValueError, match="unlabelled_weight=-1 is not valid; use a number >= 0"):
        PretrainConfig(unlabelled_weight=-1)
    with pytest.raises(ValueError, match="unlabelled_batch=1 is not valid"):
        PretrainConfig(unlabelled_batch=1)
    with pytest.raises(ValueError, match="view_shift=-2 is not valid"):
        PretrainConfig(view_shift=-2)
    with pytest.raises(ValueError, match="view_brightness=1.5 is not valid; use 0 <= value < 1"):
        PretrainConfig(view_brightness=1.5)
    with pytest.raises(ValueError, match="unlabelled_batch=True is not valid"):
        PretrainConfig(unlabelled_batch=True)
    with pytest.raises(ValueError, match="only used by objective 'factors', not 'contrastive'"):
        PretrainConfig(objective="contrastive", unlabelled_weight=0.5)


def test_the_contrastive_term_contrasts_two_views_of_the_same_images_and_trains_its_projection(monkeypatch):
    from mergelab.training import pretrain as P

    X, targets, unlabelled = _factor_problem()
    seen = []
    real_view = P.task_view

    def recording_view(x, g, *args):
        seen.append(x.clone())
        return real_view(x, g, *args)

    monkeypatch.setattr(P, "task_view", recording_view)
    captured = {}
    real_loop = P._pretrain_loop

    def capturing_loop(model, params, cfg, n, step_loss, desc, progress):
        captured["params"], captured["desc"] = params, desc
        before = [p.detach().clone() for p in params]
        losses = real_loop(model, params, cfg, n, step_loss, desc, progress)
        captured["moved"] = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
        return losses

    monkeypatch.setattr(P, "_pretrain_loop", capturing_loop)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    cfg = PretrainConfig(num_steps=5, batch_size=16, lr=0.01, warmup_steps=0, unlabelled_weight=0.5, unlabelled_batch=8)
    P.pretrain_factors(model, X, targets, {"kind": 2}, cfg, lambda x: x, progress=False, unlabelled=unlabelled)
    assert len(seen) == 2 * cfg.num_steps  # two views a step ...
    for a, b in zip(seen[::2], seen[1::2]):  # ... of the same images
        assert torch.equal(a, b) and a.shape == (8, 3, 8, 8)
    # drawn without replacement: 5 steps of 8 are one pass over the 40 images, each once (a repeated
    # image in a batch would be its own negative in InfoNCE)
    drawn = torch.cat(seen[::2])
    match = (drawn.flatten(1)[:, None] == unlabelled.flatten(1)[None]).all(-1)  # (40 drawn, 40 images)
    assert torch.equal(match.sum(0), torch.ones(40, dtype=torch.long))
    assert "unlabelled task images" in captured["desc"]
    # the encoder (2 tensors), the factor probe (2) and the projection head (2 linear layers: 4) all train
    assert len(captured["params"]) == 8 and all(captured["moved"])
    with pytest.raises(ValueError, match="view_shift=8 is not valid for images of \\(8, 8\\) pixels; use 0..7"):
        P.pretrain_factors(model, X, targets, {"kind": 2}, replace(cfg, view_shift=8),
                           lambda x: x, progress=False, unlabelled=unlabelled)


def test_pretraining_line_says_where_the_encoder_came_from():
    from mergelab.notebook import pretraining_line

    shipped = pretraining_line({"loss": [1.0] * 3000, "wall_time_s": 250.0, "shipped": True})
    assert shipped.startswith("pretraining: shipped with mergelab (3000 steps") and "250 s" in shipped
    assert "MERGELAB_PRETRAIN=1" in shipped
    assert pretraining_line({"loss": [1.0] * 40, "wall_time_s": 12.4}) == "pretraining: 40 steps in 12 s (cached after the first run)"
    assert pretraining_line({"loss": [], "source": "open_clip openai"}) == "no pretraining run here: open_clip openai"


def test_finetuning_line_counts_shipped_trained_and_cached_runs():
    from mergelab.notebook import finetuning_line

    shipped = [{"wall_time_s": 10.4, "shipped": True}, {"wall_time_s": 9.8, "shipped": True}]
    made = [{"wall_time_s": 7.0}]
    line = finetuning_line(shipped, 0)
    assert line.startswith("fine-tuning runs: 2: 2 shipped with mergelab (made by this code: 20 s of training")
    assert "MERGELAB_FINETUNE=1" in line and "trained here" not in line and "cache" not in line
    assert finetuning_line(made * 3, 3) == "fine-tuning runs: 3: 3 trained here"
    assert finetuning_line(shipped + made * 2, 1) == (
        "fine-tuning runs: 4: 2 shipped with mergelab (made by this code: 20 s of training, one thread per run; "
        "MERGELAB_FINETUNE=1 with an empty data folder trains them here), 1 trained here, 1 from the cache or imported")


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": "1e-3"}, r"lr='1e-3' is not valid; use a positive number"),
    ({"momentum": 1.0}, r"momentum=1.0 is not valid; use a number in \[0, 1\)"),
    ({"widths": "128"}, r"widths='128' is not valid; use a non-empty list of positive integers"),
    ({"widths": [64, 0]}, r"widths=0 is not valid; use a positive integer"),
    ({"warmup_epochs": -1}, r"warmup_epochs=-1 is not valid; use an integer >= 0"),
    ({"arch": "vgg"}, r"arch='vgg' is not valid; use one of mlp, resnet, vit"),
    ({"heads": 2}, r"heads=2 is a ViT setting; leave it out for arch='mlp'"),
    ({"heads": 2, "patch_size": 2}, r"heads=2, patch_size=2 are ViT settings; leave them out for arch='mlp'"),
    ({"arch": "vit", "widths": [32], "patch_size": 2}, r"heads is missing; the ViT needs heads"),
    ({"arch": "vit", "widths": [32, 32], "heads": 2, "patch_size": 2}, r"widths=\[32, 32\] is not valid for the ViT"),
    ({"arch": "vit", "widths": [32], "heads": 3, "patch_size": 2}, r"heads=3 is not valid; it must divide the width 32"),
    ({"arch": "vit", "widths": [32], "heads": 2, "patch_size": 0}, r"patch_size=0 is not valid; use a positive integer"),
])
def test_scratch_config_refuses_bad_values_naming_them(kwargs, match):
    """Chapter 06's recipe: a quoted number is refused by name, not converted or failing inside the optimizer."""
    from mergelab.training.scratch import ScratchConfig

    with pytest.raises(ValueError, match=match):
        ScratchConfig(**kwargs)
    assert ScratchConfig(lr=1, weight_decay=0).lr == 1.0  # integers still read as the floats they hash as


def test_scratch_cache_keys_name_the_vit_settings_only_for_the_vit():
    """The MLP's and ResNet's models and merges stay cached across the ViT's arrival: their keys name the fields
    they always named, and the ViT's name its heads and patch size."""
    from mergelab.training.scratch import ScratchConfig

    before_vit = {"arch", "widths", "blocks", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                  "optimizer", "momentum", "seed"}
    assert set(ScratchConfig(arch="resnet", widths=(4, 8)).key()) == before_vit
    vit = ScratchConfig(arch="vit", widths=(32,), blocks=2, heads=2, patch_size=2)
    assert vit.key() == {**ScratchConfig(arch="vit", widths=(32,), blocks=2, heads=4, patch_size=2).key(), "heads": 2}
    assert vit.key()["patch_size"] == 2


def test_scratch_cache_names_are_pinned(monkeypatch, tmp_path):
    """The names a cached model from scratch is stored under, pinned: a change to the key's structure (a field added,
    renamed or hashed otherwise) moves every user's cached models and chapter 06's merges, so it must be a decision
    (a version bump, :mod:`mergelab.codeversion`), not a side effect. The MLP's and the ResNet's names are what the
    code before the ViT's arrival (``0778a2f^``) computes, the ViT's what the code of its arrival's session does."""
    from mergelab.training.scratch import ScratchConfig, scratch_artifact

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    data_key = {"dataset": "digits", "seed": 0}
    assert scratch_artifact(ScratchConfig(arch="mlp", widths=(64, 64), seed=3), data_key).path.name == \
        "mlp-62e8431a23113c35.safetensors"
    assert scratch_artifact(ScratchConfig(arch="resnet", widths=(4, 8), seed=1), data_key).path.name == \
        "resnet-0bdbb21822e8384b.safetensors"
    vit = ScratchConfig(arch="vit", widths=(32,), blocks=2, heads=2, patch_size=2, seed=2)  # as the ViT arrived (b4d9ab0)
    assert scratch_artifact(vit, data_key).path.name == "vit-8b166c4968be5da1.safetensors"


def _leaves_the_stream(call):
    """``call()``'s result, after checking that the global torch random stream goes on after it exactly as if it
    had not run (``torch.rand(3)`` after seed 123)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    out = call()
    assert torch.equal(torch.rand(3), expected), "the call reseeded or drew from the caller's random stream"
    return out


def test_seeded_training_functions_leave_the_callers_random_stream_alone_and_do_not_read_it():
    """finetune, the three pretraining objectives, the tiny size's pretraining and new_model seed torch from their
    configuration: the caller's stream goes on where it was (an expert read from the cache and one trained here
    leave a notebook's later random draws equal), and their results are the same from any caller's state."""
    from mergelab.training.pretrain import pretrain_contrastive, pretrain_factors
    from mergelab.training.scratch import ScratchConfig, load_digits_split, new_model

    X, y, head = _toy_problem()
    cfg = FinetuneConfig(optimizer="sgd", lr=0.1, batch_size=32, num_steps=3, warmup_steps=0, seed=3)
    start = nn.Linear(6, 4).state_dict()

    def tuned(model: nn.Module) -> torch.Tensor:
        finetune(model, {"toy": (X, y)}, {"toy": head}, cfg, progress=False)
        return model.weight.detach().clone()

    first, second = nn.Linear(6, 4), nn.Linear(6, 4)
    first.load_state_dict(start)
    second.load_state_dict(start)
    weights = _leaves_the_stream(lambda: tuned(first))
    torch.manual_seed(999)  # another caller's state: the same run
    assert torch.equal(tuned(second), weights)

    images, targets, unlabelled = _factor_problem()
    pre = PretrainConfig(num_steps=2, batch_size=16, lr=0.01, warmup_steps=0, unlabelled_batch=8)

    def model():  # seeded here, so the layers start alike for every call
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))

    for run in (lambda m: pretrain_contrastive(m, images, pre, lambda x: x, progress=False),
                lambda m: pretrain_attributes(m, images.flatten(1), torch.stack([targets["kind"]] * 2, 1), [2, 2], pre,
                                              lambda x: x, progress=False),
                lambda m: pretrain_factors(m, images, targets, {"kind": 2}, PretrainConfig(**{**pre.__dict__,
                                           "unlabelled_weight": 0.5}), lambda x: x, progress=False, unlabelled=unlabelled)):
        state = torch.random.get_rng_state()
        m = model()
        torch.random.set_rng_state(state)  # model() seeded the stream: the check starts from the caller's
        _leaves_the_stream(lambda: run(m))
    scratch = ScratchConfig(arch="mlp", widths=(8,), epochs=1, seed=5)
    data = load_digits_split()
    built = _leaves_the_stream(lambda: new_model(scratch, data)[0].state_dict())
    torch.manual_seed(999)
    assert all(torch.equal(v, new_model(scratch, data)[0].state_dict()[k]) for k, v in built.items())


def test_the_tiny_size_pretrains_without_touching_the_callers_random_stream(data_dir):
    import mergelab

    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, tasks=["colours"],
                                    data={"n_train": 16, "n_val": 8, "n_test": 8, "n_pretext": 32},
                                    model={"width": 16, "layers": 1, "heads": 2},
                                    pretrain={"num_steps": 1, "batch_size": 8, "warmup_steps": 0, "unlabelled_weight": 0.0},
                                    head_shots=1)
    _leaves_the_stream(bench.pretrained_state)


def test_an_encoder_loaded_with_weights_leaves_the_callers_random_stream_alone(data_dir):
    """Training builds encoders and a cached run does not: a loaded encoder's overwritten initialization must not draw
    from the global stream, or a cold and a warm run would leave a notebook's later draws different."""
    import mergelab

    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False, tasks=["colours"],
                                    data={"n_train": 16, "n_val": 8, "n_test": 8, "n_pretext": 32},
                                    model={"width": 16, "layers": 1, "heads": 2},
                                    pretrain={"num_steps": 1, "batch_size": 8, "warmup_steps": 0, "unlabelled_weight": 0.0},
                                    head_shots=1)
    state = bench.pretrained_state()
    enc = _leaves_the_stream(lambda: bench.new_encoder(state))
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in state.items())
    torch.manual_seed(0)
    first = bench.new_encoder().state_dict()
    second = bench.new_encoder().state_dict()  # without weights: a new random module each time
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_importing_the_plotting_helper_keeps_the_callers_matplotlib_backend():
    """It once switched any backend but Jupyter's to Agg at import, so `plt.show()` of a script or a terminal
    IPython session that imported mergelab.notebook silently stopped opening windows."""
    import os
    import subprocess
    import sys

    code = "import matplotlib; import mergelab.notebook; print(matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MPLBACKEND": "svg"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1].lower() == "svg"


def test_strip_plots_jitter_the_same_whatever_ran_before_and_leave_the_global_stream_alone():
    """seaborn draws a strip plot's jitter from NumPy's global random state: a chapter's figure must not move with
    what a cold or a warm run drew before it."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from mergelab import plotting

    data = pd.DataFrame({"group": ["a"] * 5 + ["b"] * 5, "value": np.arange(10.0)})

    def dots(prior: int) -> np.ndarray:
        np.random.seed(prior)
        np.random.rand(prior)  # whatever ran before
        before = np.random.get_state()[1].copy()
        fig, ax = plt.subplots()
        plotting.strip(data=data, x="group", y="value", ax=ax)
        assert (np.random.get_state()[1] == before).all()  # the caller's stream is where it was
        out = np.concatenate([c.get_offsets() for c in ax.collections])
        plt.close(fig)
        return out

    first = dots(1)
    assert np.array_equal(first, dots(7))
    fig, ax = plt.subplots()
    plotting.strip(data, x="group", y="value", ax=ax)  # data first, as seaborn takes it
    assert np.array_equal(np.concatenate([c.get_offsets() for c in ax.collections]), first)
    plt.close(fig)
    assert not np.allclose(first[:, 0], np.round(first[:, 0]))  # jittered, not on the category centres


def test_bar_methods_puts_the_legend_of_a_split_beside_the_bars_not_over_them():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from mergelab import plotting

    df = pd.DataFrame({"method": ["a", "a", "b", "b"], "architecture": ["x", "y", "x", "y"],
                       "accuracy": [0.97, 0.98, 0.96, 0.99]})  # bars up to the top of the axes, where a legend sat
    fig, ax = plt.subplots()
    plotting.bar_methods(df, "accuracy", ax=ax, hue="architecture")
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1 - 1  # right of the axes: no bar hidden under it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]
    plt.close(fig)
    fig, ax = plt.subplots()
    plotting.bar_methods(df[df.architecture == "x"], "accuracy", ax=ax)  # no split: no legend to move
    assert ax.get_legend() is None
    plt.close(fig)


def test_finetune_and_the_curvature_probes_give_the_callers_modules_back_in_their_modes():
    """finetune's heads keep the mode they came in (the model ends in eval, as documented); the per-example
    gradient norms and the Hessian's extreme eigenvalues give the encoder back in its mode, even after an error."""
    from mergelab.autodiff import hessian_extreme_eigenvalues, per_example_gradient_norms

    X, y, head = _toy_problem()
    model = nn.Linear(6, 4)
    head.train()
    finetune(model, {"toy": (X, y)}, {"toy": head}, FinetuneConfig(num_steps=1, batch_size=8, warmup_steps=0),
             progress=False)
    assert head.training and not model.training
    head.eval()
    model.train()
    assert per_example_gradient_norms(model, head, X[:4], y[:4]).shape == (4,) and model.training
    assert len(hessian_extreme_eigenvalues(model, head, X[:8], y[:8], iters=1)) == 2 and model.training
    bad = torch.full((4,), 7)  # a label outside the head's 2 classes: the loss fails inside
    for probe in (lambda: per_example_gradient_norms(model, head, X[:4], bad),
                  lambda: hessian_extreme_eigenvalues(model, head, X[:4], bad, iters=1)):
        with pytest.raises((IndexError, RuntimeError)):
            probe()
        assert model.training


def test_the_dataset_derivatives_give_the_callers_encoder_and_head_back_in_their_modes():
    """loss_and_gradient and hessian_vector_product compute in eval mode and give both modules back in the modes
    they came in, submodules included, also after an error."""
    from mergelab.autodiff import hessian_vector_product, loss_and_gradient

    X, y, head = _toy_problem()
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 4))
    model.train()
    model[1].eval()  # a mixed state: the parent trains, one child does not
    head.train()
    modes = lambda: ([m.training for m in model.modules()], head.training)  # noqa: E731
    before = modes()
    grad = loss_and_gradient(model, head, X[:8], y[:8]).gradient
    assert modes() == before
    hessian_vector_product(model, head, X[:8], y[:8], grad)
    assert modes() == before
    bad = torch.full((4,), 7)  # a label outside the head's 2 classes: the loss fails inside
    for probe in (lambda: loss_and_gradient(model, head, X[:4], bad),
                  lambda: hessian_vector_product(model, head, X[:4], bad, grad)):
        with pytest.raises((IndexError, RuntimeError)):
            probe()
        assert modes() == before


def test_eval_mode_runs_the_block_in_eval_and_restores_every_submodules_flag():
    from mergelab.utils import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]
