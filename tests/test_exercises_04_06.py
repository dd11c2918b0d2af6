"""What the exercises of chapters 04-06 rely on: the checkers a student's function must pass (the
package's own function passes them, typical mistakes do not), the routing temperature and the routing
study of exercise 4.3, and the permuted-copy merge of exercise 6.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_mass import CFG, TASKS, orthogonal_setup

from mergelab.alignment import build_model, cycle_error
from mergelab.analysis.irt import IRTModel, p_irt
from mergelab.experiments import ch04_mass as ch04
from mergelab.experiments import ch05_merge3 as ch05
from mergelab.experiments import ch06_c2m3 as ch06
from mergelab.merging.mass import MassRouter, routing_weights, subspace_residuals
from mergelab.training.scratch import ScratchConfig, load_digits_split


# ------------------------------------------------------------------------------ chapter 04
def test_the_package_routing_score_passes_its_contract_and_typical_mistakes_do_not():
    ch04.check_routing_score(subspace_residuals)

    def pythagoras(x, bases):  # also right: ||x||^2 minus the projection's squared norm, rounded in float32
        inside = torch.einsum("nd,tdk->ntk", x, bases).pow(2).sum(-1)
        return (x.pow(2).sum(-1, keepdim=True) - inside).abs().sqrt()

    ch04.check_routing_score(pythagoras)

    def squared(x, bases):
        return subspace_residuals(x, bases) ** 2

    def projection(x, bases):  # the part inside the subspace, not outside
        return torch.einsum("nd,tdk->ntk", x, bases).norm(dim=-1)

    def transposed(x, bases):
        return subspace_residuals(x, bases).T

    def in_place(x, bases):
        out = subspace_residuals(x, bases)
        x.zero_()
        return out

    for wrong, message in ((squared, "not its square"), (projection, "differ from"), (transposed, r"expected \(N, T\)"),
                           (in_place, "in place")):
        with pytest.raises(AssertionError, match=message):
            ch04.check_routing_score(wrong)


def test_routing_temperature_sharpens_or_flattens_the_weights_and_refuses_bad_values():
    residuals = torch.tensor([[0.0, 1.0, 2.0, 2.5], [1.0, 0.5, 0.0, 3.0]])
    base = routing_weights(residuals)
    assert torch.equal(routing_weights(residuals, 1.0), base)
    cold, hot = routing_weights(residuals, 0.1), routing_weights(residuals, 10.0)
    assert (cold.max(1).values > base.max(1).values).all() and (hot.max(1).values < base.max(1).values).all()
    assert torch.equal(cold.argmax(1), base.argmax(1)) and torch.equal(hot.argmax(1), base.argmax(1))
    assert torch.allclose(routing_weights(residuals, 1e4), torch.full((2, 4), 0.25), atol=1e-3)
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="temperature="):
            routing_weights(residuals, bad)


class _Bench:
    """The two calls :func:`ch04.mixed_batches` makes of a benchmark, on random images."""

    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(3)
        self.data = {t: (torch.randn(n, 3, CFG.image_size, CFG.image_size, generator=g), torch.zeros(n, dtype=torch.long))
                     for t in TASKS}

    def split(self, task: str, split: str):
        return self.data[task]

    def images(self, task: str, split: str, idx):
        return self.data[task][0][list(idx)]


def test_routing_study_matches_mass_routing_and_the_temperature_extremes():
    enc, pre, _, compressed, heads, _ = orthogonal_setup()
    router = MassRouter(pre, compressed, enc, heads, device="cpu", block=1, threshold=0.2, top_k=3)
    bench = _Bench()
    study = ch04.routing_study(router, bench, "val", temperatures=[1e-3, 1.0, 1e3], batch_size=5, seed=1)
    mass = ch04.evaluate_mass(router, bench, "val", batch_size=5, seed=1)["routing"]
    at = study.set_index("temperature")
    assert at.loc[1.0, "contains_true"] == pytest.approx(mass["contains_true"])
    assert at.loc[1.0, "mean_selected"] == pytest.approx(mass["mean_selected"])
    assert (study["argmax_true"] == mass["argmax_true"]).all()  # the temperature never moves the argmax
    # very cold: one weight near 1, only the argmax passes; very hot: every weight near 1/4 > 0.2, top-k pass
    assert at.loc[1e-3, "mean_selected"] == 1 and at.loc[1e-3, "contains_true"] == at.loc[1e-3, "argmax_true"]
    assert at.loc[1e3, "mean_selected"] == 3
    strict = ch04.routing_study(router.with_options(threshold=0.3), bench, "val", temperatures=[1e3], batch_size=5)
    assert strict["mean_selected"].iloc[0] == 1  # 1/4 < 0.3: nothing passes, the argmax alone
    assert ch04.routing_study(router, bench, "val", score=lambda x, b: subspace_residuals(x, b) * 2,
                              batch_size=5, seed=1)["argmax_true"].iloc[0] == mass["argmax_true"]
    with pytest.raises(ValueError, match="expected"):
        ch04.routing_study(router, bench, "val", score=lambda x, b: subspace_residuals(x, b).T, batch_size=5)


# ------------------------------------------------------------------------------ chapter 05
def test_the_package_p_irt_passes_its_contract_and_typical_mistakes_do_not():
    ch05.check_p_irt(p_irt)

    def all_items(model, items, answers, theta):  # the model's probabilities over every item
        n, N = len(items), model.num_items
        return float(n / N * np.mean(answers) + (1 - n / N) * model.prob(theta).mean())

    def unweighted(model, items, answers, theta):
        unseen = np.setdiff1d(np.arange(model.num_items), items)
        return float((np.mean(answers) + model.prob(theta, unseen).mean()) / 2)

    def returns_array(model, items, answers, theta):
        return np.array([p_irt(model, items, answers, theta)])

    for wrong, message in ((all_items, "NOT answered"), (unweighted, "n/N"), (returns_array, "return a float")):
        with pytest.raises(AssertionError, match=message):
            ch05.check_p_irt(wrong)


def test_p_irt_contract_uses_a_model_where_its_cases_differ():
    """The checker's cases tell the mistakes apart: p-IRT differs from the subset mean and from the
    all-items variant on its model."""
    rng = np.random.default_rng(0)
    model = IRTModel(rng.normal(size=(40, 2)), rng.normal(size=40))
    theta, items = rng.normal(size=2), np.sort(rng.choice(40, 10, replace=False))
    answers = (rng.random(10) < 0.5).astype(float)
    assert abs(p_irt(model, items, answers, theta) - answers.mean()) > 0.01


# ------------------------------------------------------------------------------ chapter 06
def test_the_package_cycle_error_passes_its_contract_and_typical_mistakes_do_not():
    def package(ab, bc, ca):
        return cycle_error({"g": ab}, {"g": bc}, {"g": ca})["g"]

    ch06.check_cycle_error(package)
    ch06.check_cycle_error(lambda ab, bc, ca: float((ca[bc[ab]] != torch.arange(len(ab))).float().mean()))  # float32

    def count(ab, bc, ca):
        return float((ca[bc[ab]] != torch.arange(len(ab))).sum())

    def reversed_order(ab, bc, ca):
        return float((ab[bc[ca]] != torch.arange(len(ab))).float().mean())

    def tensor(ab, bc, ca):
        return (ca[bc[ab]] != torch.arange(len(ab))).float().mean()

    def in_place(ab, bc, ca):
        out = package(ab, bc, ca)
        ab[:] = torch.arange(len(ab))
        return out

    for wrong, message in ((count, "not a count"), (reversed_order, "in that order"), (tensor, "Python float"),
                           (in_place, "in place")):
        with pytest.raises(AssertionError, match=message):
            ch06.check_cycle_error(wrong)


@pytest.mark.parametrize("arch", ["mlp", "resnet", "vit"])
def test_a_permuted_copy_averages_badly_and_weight_matching_undoes_the_permutation(arch):
    data = load_digits_split()
    widths = {"mlp": (16, 16), "resnet": (4, 8), "vit": (16,)}[arch]
    vit = {"heads": 2, "patch_size": 2} if arch == "vit" else {}
    cfg = ScratchConfig(arch=arch, widths=widths, epochs=1, seed=0, **vit)
    torch.manual_seed(0)
    model, spec = build_model(arch, tuple(data.X_train.shape[1:]), data.num_classes, widths, 1, **vit)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t = ch06.Trained(arch, model, spec, [state], cfg)
    r = ch06.permuted_copy_merge(t, data, seed=1)
    assert r["permuted_copy"] == r["model"]  # the same function
    assert r["matched_max_weight_difference"] == 0.0 and r["matched_average"] == r["model"]
