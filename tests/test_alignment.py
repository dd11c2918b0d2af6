"""Permutation specs, weight matching, MergeMany, C2M3's Frank-Wolfe and REPAIR on small generated models."""

from __future__ import annotations

import pytest
import torch

from mergelab.alignment import (
    PermutationSpec,
    SpecError,
    apply_permutation,
    average_states,
    build_model,
    c2m3_frank_wolfe,
    c2m3_gradient,
    c2m3_objective,
    cycle_error,
    invert,
    merge_aligned,
    merge_many,
    objective_at,
    pairwise_from_universe,
    random_permutations,
    repair,
    weight_matching,
)
from mergelab.alignment.frank_wolfe import (
    _along_segment,
    _gradient_and_terms,
    _segment_terms,
    permutation_matrix,
    sinkhorn,
)
from mergelab.training.scratch import ScratchConfig, evaluate_state, load_digits_split, train_from_scratch

ARCHS = {"mlp": dict(widths=(16, 12, 10)), "resnet": dict(widths=(6, 8), blocks=2),
         "vit": dict(widths=(16,), blocks=2, heads=2, patch_size=2)}  # open_clip's VisionTransformer


def _model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(arch, (1, 8, 8), 10, **ARCHS[arch])


def _permuted_copies(arch: str, k: int, seed: int = 0):
    model, spec = _model(arch, seed)
    state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 100)
    sizes = spec.group_sizes(state)
    copies = [apply_permutation(spec, random_permutations(sizes, g), state) for _ in range(k)]
    return model, spec, state, copies


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_permuting_by_the_spec_leaves_outputs_unchanged(arch):
    model, spec, state, copies = _permuted_copies(arch, 1)
    x = torch.rand(7, 1, 8, 8)
    model.eval()
    before = model(x)
    assert any(not torch.equal(copies[0][k], state[k]) for k in state), "the permutation moved nothing"
    model.load_state_dict(copies[0])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_inverse_permutation_undoes_a_permutation():
    _, spec, state, _ = _permuted_copies("resnet", 0)
    perms = random_permutations(spec.group_sizes(state), torch.Generator().manual_seed(3))
    back = apply_permutation(spec, {g: invert(p) for g, p in perms.items()}, apply_permutation(spec, perms, state))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_spec_validation_names_the_offending_parameter():
    _, spec, state, _ = _permuted_copies("mlp", 0)
    missing = PermutationSpec({k: v for k, v in spec.axes.items() if k != "layers.1.bias"})
    with pytest.raises(SpecError, match="'layers.1.bias'.*not in the permutation spec"):
        missing.validate(state)
    extra = PermutationSpec({**spec.axes, "layers.9.weight": (None, None)})
    with pytest.raises(SpecError, match="'layers.9.weight'.*not in the model"):
        extra.validate(state)
    wrong_rank = PermutationSpec({**spec.axes, "layers.0.bias": ("P_0", None)})
    with pytest.raises(SpecError, match="'layers.0.bias' has shape"):
        wrong_rank.validate(state)
    inconsistent = PermutationSpec({**spec.axes, "layers.2.bias": ("P_0",)})  # P_0 has 16 units, layer 2 has 10
    with pytest.raises(SpecError, match="'layers.2.bias' axis 0 has size 10.*group 'P_0' has size 16"):
        inconsistent.validate(state)
    with pytest.raises(SpecError, match="on two axes"):
        PermutationSpec({"w": ("P_0", "P_0")})
    with pytest.raises(SpecError, match="group 'P_1' is not a permutation"):
        sizes = spec.group_sizes(state)
        apply_permutation(spec, {g: torch.zeros(n, dtype=torch.long) if g == "P_1" else torch.arange(n)
                                 for g, n in sizes.items()}, state)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_weight_matching_recovers_a_permuted_copy_exactly(arch):
    _, spec, state, (copy,) = _permuted_copies(arch, 1)
    perms = weight_matching(spec, state, copy, seed=1)
    aligned = apply_permutation(spec, perms, copy)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_many_and_c2m3_recover_the_original_from_permuted_copies(arch):
    model, spec, state, copies = _permuted_copies(arch, 3)
    x = torch.rand(20, 1, 8, 8)
    model.load_state_dict(state)
    reference = model(x)
    naive = average_states(copies)
    assert max(float((naive[k] - state[k]).abs().max()) for k in state) > 1e-2  # naive averaging mixes units
    for perms in (merge_many(spec, copies, seed=0), c2m3_frank_wolfe(spec, copies, seed=0).perms):
        merged = merge_aligned(spec, copies, perms)
        # equal to the original up to one permutation of the shared frame: same function
        model.load_state_dict(merged)
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
        back = weight_matching(spec, state, merged)
        aligned = apply_permutation(spec, back, merged)
        torch.testing.assert_close(aligned, state, rtol=1e-6, atol=1e-6)


def test_c2m3_maps_are_cycle_consistent_and_pairwise_matching_need_not_be():
    torch.manual_seed(0)
    spec = build_model("mlp", (1, 8, 8), 10, widths=(24, 24))[1]
    states = [dict(build_model("mlp", (1, 8, 8), 10, widths=(24, 24))[0].state_dict()) for _ in range(3)]
    res = c2m3_frank_wolfe(spec, states, seed=0, max_iter=50)
    a, b, c = res.perms
    err = cycle_error(pairwise_from_universe(a, b), pairwise_from_universe(b, c), pairwise_from_universe(c, a))
    assert err == {g: 0.0 for g in spec.groups}
    # the matrices compose to the identity around the cycle, to float64 rounding
    pa, pb, pc = ({g: permutation_matrix(p[g]) for g in p} for p in res.perms)
    for g in spec.groups:
        around = (pa[g] @ pb[g].T) @ (pb[g] @ pc[g].T) @ (pc[g] @ pa[g].T)
        torch.testing.assert_close(around, torch.eye(around.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    pairwise = cycle_error(weight_matching(spec, states[0], states[1]), weight_matching(spec, states[1], states[2]),
                           weight_matching(spec, states[2], states[0]))
    assert sum(pairwise.values()) > 0  # independent random models: pairwise maps do not compose to the identity


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_objective_at_scores_any_maps_by_the_aligned_weights_inner_products(arch):
    _, spec, state, copies = _permuted_copies(arch, 3)

    def by_hand(perms):  # sum over permuted tensors and pairs of models of the aligned weights' inner products
        aligned = [apply_permutation(spec, p, s) for p, s in zip(perms, copies)]
        return sum(float((aligned[i][n].double() * aligned[j][n].double()).sum())
                   for n in spec.axes for i in range(3) for j in range(i + 1, 3))

    sizes = spec.group_sizes(state)
    identity = [{g: torch.arange(n) for g, n in sizes.items()}] * 3
    fw, mm = c2m3_frank_wolfe(spec, copies, seed=0), merge_many(spec, copies, seed=0)
    assert objective_at(spec, copies, identity) == pytest.approx(by_hand(identity), rel=1e-9)
    assert objective_at(spec, copies, fw.perms) == fw.objective_rounded == pytest.approx(by_hand(fw.perms), rel=1e-9)
    # permuted copies of one model: both methods find the alignment that undoes the permutations, the best score
    best = objective_at(spec, [state] * 3, identity)
    assert objective_at(spec, copies, mm) == pytest.approx(best, rel=1e-9) and fw.objective_rounded == pytest.approx(best, rel=1e-9)
    assert objective_at(spec, copies, identity) < best
    with pytest.raises(ValueError, match="perms has 2 entries for 3 models"):
        objective_at(spec, copies, identity[:2])


def test_frank_wolfe_objective_never_decreases_and_steps_are_in_unit_interval():
    torch.manual_seed(1)
    spec = build_model("mlp", (1, 8, 8), 10, widths=(10, 8))[1]
    states = [dict(build_model("mlp", (1, 8, 8), 10, widths=(10, 8))[0].state_dict()) for _ in range(3)]
    res = c2m3_frank_wolfe(spec, states, seed=0, max_iter=40, patience=3)
    assert all(b >= a - 1e-9 for a, b in zip(res.objective, res.objective[1:]))
    assert all(0.0 <= t <= 1.0 for t in res.step_sizes)
    assert res.iterations == len(res.step_sizes) <= 40
    if res.converged:  # stopped by the rule: the last `patience` gains are small
        gains = [b - a for a, b in zip(res.objective, res.objective[1:])][-3:]
        assert all(g < 1e-6 * max(1.0, abs(res.objective[-4])) for g in gains)
    with pytest.raises(ValueError, match="max_iter=0"):
        c2m3_frank_wolfe(spec, states, max_iter=0)
    with pytest.raises(ValueError, match=r"noise=-1 is not valid; use a number >= 0"):
        c2m3_frank_wolfe(spec, states, noise=-1)


def test_frank_wolfe_stops_after_patience_small_gains_and_not_before():
    """The stopping rule fires: on permuted copies of one model (one step reaches the optimum) the search stops, well
    before ``max_iter``, at the first iteration that ends ``patience`` consecutive small gains; with ``tol=0`` no gain
    is small (gains are >= 0), so it runs to ``max_iter`` and says it did not converge."""
    _, spec, _, copies = _permuted_copies("mlp", 3)
    for patience in (1, 3, 6):
        res = c2m3_frank_wolfe(spec, copies, seed=0, max_iter=50, patience=patience)
        gains = [b - a for a, b in zip(res.objective, res.objective[1:])]
        small = [g < 1e-6 * max(1.0, abs(a)) for g, a in zip(gains, res.objective)]
        first = next(i + 1 for i in range(len(small)) if i + 1 >= patience and all(small[i + 1 - patience:i + 1]))
        assert res.converged and res.iterations == first < 50, (patience, res.iterations, small)
    never = c2m3_frank_wolfe(spec, copies, seed=0, max_iter=12, patience=1, tol=0.0)
    assert not never.converged and never.iterations == 12


def test_matching_inputs_are_checked_by_name():
    torch.manual_seed(3)
    spec = build_model("mlp", (1, 8, 8), 10, widths=(10, 8))[1]
    states = [dict(build_model("mlp", (1, 8, 8), 10, widths=(10, 8))[0].state_dict()) for _ in range(3)]
    perms = merge_many(spec, states, max_iter=2)
    with pytest.raises(ValueError, match="perms has 2 entries for 3 states"):
        merge_aligned(spec, states, perms[:2])  # zip would have averaged two models silently
    with pytest.raises(ValueError, match="max_iter=0 is not valid"):
        merge_many(spec, states, max_iter=0)
    with pytest.raises(SpecError, match="no permutation for group"):
        weight_matching(spec, states[0], states[1], init={})
    bad = {g: torch.zeros_like(p) for g, p in perms[0].items()}
    with pytest.raises(SpecError, match="is not a permutation of range"):
        weight_matching(spec, states[0], states[1], init=bad)


def test_c2m3_gradient_matches_finite_differences():
    torch.manual_seed(2)
    spec = build_model("resnet", (1, 8, 8), 10, widths=(3, 4), blocks=1)[1]
    states = [{k: v.double() for k, v in build_model("resnet", (1, 8, 8), 10, widths=(3, 4), blocks=1)[0]
               .state_dict().items()} for _ in range(2)]
    sizes = spec.group_sizes(states[0])
    g = torch.Generator().manual_seed(0)
    mats = [{k: sinkhorn(torch.rand(n, n, generator=g, dtype=torch.float64) + 0.1) for k, n in sizes.items()}
            for _ in states]
    grads = c2m3_gradient(spec, states, mats)
    direction = torch.randn(4, 4, generator=g, dtype=torch.float64)
    eps = 1e-6
    plus = [dict(m) for m in mats]
    plus[1]["P_res1"] = mats[1]["P_res1"] + eps * direction
    minus = [dict(m) for m in mats]
    minus[1]["P_res1"] = mats[1]["P_res1"] - eps * direction
    numeric = (c2m3_objective(spec, states, plus) - c2m3_objective(spec, states, minus)) / (2 * eps)
    assert numeric == pytest.approx(float((grads[1]["P_res1"] * direction).sum()), rel=1e-6)


@pytest.mark.parametrize("case", ["mlp", "resnet", "three_axes"])
def test_line_search_values_equal_the_objective_along_the_segment(case):
    """The Frank-Wolfe line search evaluates f((1 - t) P + t S) from segment terms built out of the
    gradient's transforms and index selections; it must equal the objective computed directly."""
    g = torch.Generator().manual_seed(5)
    if case == "three_axes":  # no architecture here has a tensor permuted on 3 axes: the generic path
        spec = PermutationSpec({"w": ("A", "B", "C"), "v": ("A", None), "u": (None,)})
        states = [{"w": torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
                   "v": torch.randn(3, 2, generator=g, dtype=torch.float64),
                   "u": torch.randn(6, generator=g, dtype=torch.float64)} for _ in range(3)]
    else:
        torch.manual_seed(4)
        spec = _model(case)[1]
        states = [{k: v.double() for k, v in _model(case, seed)[0].state_dict().items()} for seed in range(3)]
    sizes = spec.group_sizes(states[0])
    mats = [{k: sinkhorn(torch.rand(n, n, generator=g, dtype=torch.float64) + 0.1) for k, n in sizes.items()}
            for _ in states]
    targets = [{k: permutation_matrix(torch.randperm(n, generator=g)) for k, n in sizes.items()} for _ in states]
    _, transforms = _gradient_and_terms(spec, states, mats)
    terms = {name: [_segment_terms(spec, name, s[name], m, tg, *tr[p])
                    for p, (m, s, tg) in enumerate(zip(mats, states, targets))] for name, tr in transforms.items()}
    constant = _along_segment({n: [[s[n]] for s in states] for n, axes in spec.axes.items()
                               if all(a is None for a in axes)}, 0.0, 0.0)
    for t in (0.0, 0.3, 0.71, 1.0):
        mixed = [{k: (1 - t) * m[k] + t * tg[k] for k in m} for m, tg in zip(mats, targets)]
        assert _along_segment(terms, constant, t) == pytest.approx(c2m3_objective(spec, states, mixed), rel=1e-10)


def test_repair_leaves_a_model_whose_statistics_already_match_unchanged():
    model, _ = _model("resnet", 0)
    endpoints = [_model("resnet", 0)[0] for _ in range(2)]  # identical endpoints: their mean statistics match
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changes = repair(model, endpoints, torch.rand(64, 1, 8, 8))
    assert changes and all(c["max_scale_change"] < 1e-6 and c["max_shift"] < 1e-6 for c in changes.values())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_the_vit_spec_names_open_clips_parameters_and_refuses_what_does_not_fit():
    from mergelab.alignment import SpecError, vit_spec

    model, spec = _model("vit")
    assert type(model).__module__ == "open_clip.transformer"  # the tiny benchmark's encoder class itself
    state = model.state_dict()
    spec.validate(state)
    sizes = spec.group_sizes(state)
    assert sizes == {"P_res": 16, "P_mlp0": 64, "P_mlp1": 64}
    assert spec.axes["transformer.resblocks.1.attn.in_proj_weight"] == (None, "P_res")  # heads stay in place
    with pytest.raises(SpecError, match=r"'transformer.resblocks.1.ln_1.weight' of the permutation spec is not"):
        vit_spec(2).validate({k: v for k, v in state.items() if "resblocks.1.ln_1.weight" not in k})
    with pytest.raises(SpecError, match=r"'transformer.resblocks.2.ln_1.weight' of the permutation spec is not.*12 unknown"):
        vit_spec(3).validate(state)
    # the settings are checked by the function ScratchConfig checks them with (its tests read every message)
    with pytest.raises(ValueError, match=r"heads=2 is a ViT setting; leave it out for arch='mlp'"):
        build_model("mlp", (1, 8, 8), 10, (8,), heads=2)
    with pytest.raises(ValueError, match=r"widths=\[8, 8\] is not valid for the ViT; give one entry"):
        build_model("vit", (1, 8, 8), 10, (8, 8), heads=2, patch_size=2)
    with pytest.raises(ValueError, match=r"patch_size is missing; the ViT needs"):
        build_model("vit", (1, 8, 8), 10, (8,), heads=2)
    with pytest.raises(ValueError, match=r"arch='vgg' is not a supported architecture"):
        build_model("vgg", (1, 8, 8), 10, (8,), heads=2)
    with pytest.raises(ValueError, match=r"in_shape=\(1, 8, 6\) is not valid for the ViT; it needs square images"):
        build_model("vit", (1, 8, 6), 10, (8,), heads=2, patch_size=2)
    with pytest.raises(ValueError, match=r"in_shape=\(8, 8\) is not valid for the ViT; give one image's shape"):
        build_model("vit", (8, 8), 10, (8,), heads=2, patch_size=2)
    with pytest.raises(ValueError, match=r"layers=0 is not valid; use a positive integer"):
        vit_spec(0)


def test_repair_sets_a_vits_mlp_units_to_the_endpoints_mean_statistics_over_images_and_tokens():
    x = torch.rand(64, 1, 8, 8)
    endpoints = [_model("vit", s)[0] for s in (1, 2)]
    merged = _model("vit", 3)[0]
    names = [f"transformer.resblocks.{i}.mlp.c_fc" for i in range(2)]
    repair(merged, endpoints, x, names=names)

    def stats(model, name):  # by hand: the (batch, tokens, units) output, pooled over batch and tokens
        seen = []
        handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        with torch.no_grad():
            model.eval()(x)
        handle.remove()
        out = seen[0].double()
        assert out.ndim == 3 and out.shape[-1] == 64 and out.shape[1] != 64  # units last, tokens in between
        out = out.reshape(-1, out.shape[-1])
        return out.mean(0), out.std(0, unbiased=False)

    for name in names:
        goal = [stats(e, name) for e in endpoints]
        mu, sd = stats(merged, name)
        torch.testing.assert_close(mu, (goal[0][0] + goal[1][0]) / 2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd, (goal[0][1] + goal[1][1]) / 2, rtol=1e-4, atol=1e-4)


def test_layer_statistics_of_a_linear_layer_pool_every_axis_but_the_last():
    """A transformer's MLP writes (batch, tokens, channels): its channels are the last axis, not axis 1."""
    from mergelab.alignment import channel_stats

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(12, 7, 6)  # 12 inputs of 7 tokens: 7 != 5, so reading axis 1 would not even have 5 channels
    mu, sd = channel_stats(net, "0", x, batch_size=5)
    with torch.no_grad():
        out = net(x).double().reshape(-1, 5)
    torch.testing.assert_close(mu, out.mean(0))
    torch.testing.assert_close(sd, out.std(0, unbiased=False))


def test_repair_names_what_it_cannot_correct():
    mlp, _ = _model("mlp", 0)
    with pytest.raises(ValueError, match=r"no layer of the types modules=\('Conv2d',\) to correct; pass names="):
        repair(mlp, [_model("mlp", 1)[0]], torch.rand(8, 1, 8, 8))  # an MLP: nothing would be corrected, silently
    resnet, _ = _model("resnet", 0)
    with pytest.raises(ValueError, match="X is empty"):
        repair(resnet, [_model("resnet", 1)[0]], torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match="batch_size=0 is not valid"):
        repair(resnet, [_model("resnet", 1)[0]], torch.rand(8, 1, 8, 8), batch_size=0)


def test_repair_sets_the_merged_statistics_to_the_endpoints_mean():
    from mergelab.alignment import channel_stats

    x = torch.rand(128, 1, 8, 8)
    endpoints = [_model("resnet", s)[0] for s in (1, 2)]
    merged = _model("resnet", 3)[0]
    repair(merged, endpoints, x)
    for name in ("stem", "stages.1.0.conv2", "stages.1.0.shortcut.0"):
        goal = [channel_stats(e, name, x) for e in endpoints]
        mu, sd = channel_stats(merged, name, x)
        torch.testing.assert_close(mu, (goal[0][0] + goal[1][0]) / 2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd, (goal[0][1] + goal[1][1]) / 2, rtol=1e-4, atol=1e-4)


def test_a_trained_model_and_its_permuted_copies_merge_back_to_its_accuracy():
    data = load_digits_split()
    cfg = ScratchConfig(arch="mlp", widths=(32, 32), epochs=3, batch_size=64, lr=3e-3, seed=0)
    state, log = train_from_scratch(cfg, data)
    model, spec = build_model("mlp", (1, 8, 8), 10, widths=(32, 32))
    original = evaluate_state(model, state, data.X_test, data.y_test)
    assert original["accuracy"] > 0.5 and log["steps"] == 3 * -(-len(data.X_train) // 64)
    g = torch.Generator().manual_seed(5)
    copies = [apply_permutation(spec, random_permutations(spec.group_sizes(state), g), state) for _ in range(3)]
    merged = merge_aligned(spec, copies, c2m3_frank_wolfe(spec, copies).perms)
    assert evaluate_state(model, merged, data.X_test, data.y_test)["accuracy"] == original["accuracy"]
    naive = evaluate_state(model, average_states(copies), data.X_test, data.y_test)
    assert naive["accuracy"] < original["accuracy"]


def test_frank_wolfe_result_names_the_iterations_where_its_objective_fell():
    from mergelab.alignment.frank_wolfe import FrankWolfeResult

    assert FrankWolfeResult(perms=[], objective=[1.0, 2.0, 2.0, 3.0]).falls == []  # rising or flat: never fell
    assert FrankWolfeResult(perms=[], objective=[1.0, 3.0, 2.5, 4.0, 3.9]).falls == [2, 4]
    assert FrankWolfeResult(perms=[]).falls == []


def test_the_cycle_error_is_the_share_of_units_sent_elsewhere():
    identity = {"h": torch.arange(4)}
    swap = {"h": torch.tensor([1, 0, 2, 3])}  # one transposition: two of four units leave their place
    assert cycle_error(swap, identity, identity) == {"h": 0.5}
    assert cycle_error(swap, swap, identity) == {"h": 0.0}  # the swap undone on the way round
    three = {"h": torch.tensor([1, 2, 0, 3])}
    assert cycle_error(three, identity, identity) == {"h": 0.75}
