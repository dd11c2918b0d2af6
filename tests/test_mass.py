"""MASS: routing by subspace residuals, second-pass models from stored TSV-C factors, head choice."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from mergelab.merging import merge
from mergelab.merging.mass import (MassRouter, block_features, cache_key, choose_head, class_token, official_reading, routing_bases, routing_block,
                                   routing_weights, select_tasks, storage_bytes, storage_of_shapes,
                                   subspace_residuals)
from mergelab.merging.mass_storage import model_shapes
from mergelab.merging.tsv import tsv_compress, tsv_merge_compressed, tsv_reconstruct
from mergelab.models import ClassificationHead, TinyViTConfig, build_tiny_encoder
from mergelab.task_vectors import TaskVector

CFG = TinyViTConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, output_dim=8)
TASKS = ("a", "b", "c", "d")
ROUTE = "transformer.resblocks.1.mlp.c_fc.weight"  # (64, 16): k = 16 // 4 = 4 triplets per task


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_encoder(CFG).eval()


def orthogonal_setup(seed: int = 0):
    """Four task vectors whose block-1 ``c_fc`` matrices read mutually orthogonal 4-dim subspaces of R^16
    (and write mutually orthogonal ones of R^64)."""
    enc = encoder()
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    left, _ = torch.linalg.qr(torch.randn(64, 16, generator=g, dtype=torch.float64))
    tvs, subspaces = {}, {}
    for i, t in enumerate(TASKS):
        P = basis[:, 4 * i:4 * i + 4].float()
        subspaces[t] = P
        vec = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        scale = torch.tensor([4.0, 3.0, 2.0, 1.0]) * (1 + i)
        vec[ROUTE] = (left[:, 4 * i:4 * i + 4].float() * scale) @ P.T  # rank 4, row space span(P), columns orthogonal
        tvs[t] = TaskVector(vec)
    compressed = {t: tsv_compress(tv, num_tasks=len(TASKS)) for t, tv in tvs.items()}
    heads = {t: ClassificationHead(torch.randn(3 + i, CFG.output_dim, generator=g), 30.0)
             for i, t in enumerate(TASKS)}
    return enc, pre, tvs, compressed, heads, subspaces


def router(**options) -> tuple[MassRouter, dict]:
    enc, pre, tvs, compressed, heads, subspaces = orthogonal_setup()
    r = MassRouter(pre, compressed, enc, heads, device="cpu", **{"block": 1, **options})
    return r, {"pre": pre, "tvs": tvs, "compressed": compressed, "subspaces": subspaces, "heads": heads}


def test_inputs_inside_one_task_subspace_are_routed_to_that_task():
    r, s = router()
    g = torch.Generator().manual_seed(1)
    for t in TASKS:
        x = torch.randn(5, 4, generator=g) @ s["subspaces"][t].T  # (5, 16) inside task t's subspace
        routing = r.route_features(x)
        assert routing.residuals[:, TASKS.index(t)].abs().max() < 1e-4
        assert (routing.residuals[:, [i for i, u in enumerate(TASKS) if u != t]] > 0.1).all()
        assert routing.argmax == [t] * 5 and routing.selected == [(t,)] * 5
        assert torch.allclose(routing.weights.sum(1), torch.ones(5))


def test_routing_maths_z_scores_softmax_threshold_and_top_k():
    residuals = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 2.0]])
    w = routing_weights(residuals)
    # row 1: logits (0, -1, -1, -1), mean -0.75, unbiased std 0.5: z = (1.5, -0.5, -0.5, -0.5)
    z = torch.tensor([1.5, -0.5, -0.5, -0.5]) / (1 + 2e-6)
    assert torch.allclose(w[0], z.softmax(0), atol=1e-5)
    assert select_tasks(w, 0.2, 3)[0] == (0,)
    # several above the threshold: largest first, capped at top_k; none above: the argmax alone
    w2 = torch.tensor([[0.3, 0.1, 0.35, 0.25], [0.26, 0.24, 0.25, 0.25]])
    assert select_tasks(w2, 0.2, 3) == [(2, 0, 3), (0, 2, 3)]
    assert select_tasks(w2, 0.2, 2) == [(2, 0), (0, 2)]
    assert select_tasks(w2, 0.9, 3) == [(2,), (0,)]
    assert torch.equal(routing_weights(torch.tensor([[3.0]])), torch.ones(1, 1))  # one task: weight 1
    x = torch.tensor([[3.0, 4.0]])
    bases = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]]])  # task 0 reads e1, task 1 stores no direction
    assert torch.allclose(subspace_residuals(x, bases), torch.tensor([[4.0, 5.0]]))


def test_one_selected_task_gives_its_tsv_c_reconstruction():
    r, s = router()
    for t in ("a", "c"):
        expected = tsv_reconstruct(s["compressed"][t]).apply_to(s["pre"])
        got = r.model_for([t]).state_dict()
        for k, v in expected.items():
            assert torch.allclose(got[k], v, atol=1e-5), k
    # and all tasks give TSV-M at coefficient 1 (the first pass): the stored ranks are TSV-M's
    merged = merge("tsv_merge", s["pre"], list(s["tvs"].values()), coefficient=1.0, device=None)
    first = r.first_pass_model.state_dict()
    for k, v in merged.items():
        assert torch.allclose(first[k], v, atol=1e-4), k


def test_tsv_merge_of_stored_factors_keeps_the_stored_rank_and_refuses_mixed_ranks():
    _, pre, tvs, compressed, *_ = orthogonal_setup()
    two = tsv_merge_compressed([compressed["a"], compressed["b"]])
    # a's and b's block-1 c_fc read orthogonal subspaces: TSV-M of the two is their sum
    summed = tsv_reconstruct(compressed["a"])[ROUTE] + tsv_reconstruct(compressed["b"])[ROUTE]
    assert torch.allclose(two[ROUTE], summed, atol=1e-5)
    assert torch.linalg.matrix_rank(two[ROUTE]) == 8  # 2 x the stored 4, not 16 // 2 = 8 recomputed per task
    assert torch.allclose(two["conv1.weight"], (tvs["a"]["conv1.weight"] + tvs["b"]["conv1.weight"]) / 2)
    wider = tsv_compress(tvs["c"], num_tasks=2)
    with pytest.raises(ValueError, match="different ranks"):
        tsv_merge_compressed([compressed["a"], wider])


def test_head_with_the_largest_max_logit_predicts():
    logits = {"a": torch.tensor([[1.0, 5.0], [0.0, 0.5], [2.0, 2.0]]),
              "b": torch.tensor([[4.0, 0.0, 1.0], [3.0, 0.0, 1.0], [1.0, 2.0, 0.0]])}
    tasks, labels = choose_head(logits)
    assert tasks == ["a", "b", "a"]  # ties go to the first head given
    assert labels.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="logits is empty"):
        choose_head({})


def test_the_official_reading_cuts_or_zero_pads_the_chosen_heads_logits_to_the_inputs_classes():
    """The official MASS code's ``pad_output``: a head with more classes is cut to the input's task's count, one
    with fewer is padded with zeros (which win where every logit is negative)."""
    from mergelab.merging.mass import official_reading

    wide = torch.tensor([0.1, 0.3, 0.2, 5.0])
    assert official_reading(wide, 4) == 3 and official_reading(wide, 3) == 1  # the largest is cut away
    narrow = torch.tensor([-2.0, -1.0])
    assert official_reading(narrow, 2) == 1 and official_reading(narrow, 5) == 2  # a padded zero is the largest
    assert official_reading(torch.tensor([3.0, 1.0]), 5) == 0
    batch = torch.stack([narrow, torch.tensor([3.0, 1.0])])  # rows at once, as predict reads them
    assert official_reading(batch, 5).tolist() == [2, 0] and official_reading(batch, 1).tolist() == [0, 0]


def test_predict_on_a_mixed_batch_uses_the_selected_heads_and_the_oracle_on_the_same_features():
    r, s = router(top_k=2, threshold=0.2)
    torch.manual_seed(3)
    images = torch.randn(6, 3, 16, 16)
    truth = ["a", "b", "c", "d", "a", "b"]
    out = r.predict(images, true_tasks=truth)
    assert len(out.head_task) == 6 and out.label.shape == (6,) and out.oracle_label.shape == (6,)
    for i, (sel, head) in enumerate(zip(out.routing.selected, out.head_task)):
        assert head in sel and 1 <= len(sel) <= 2
        with torch.no_grad():
            feats = r.model_for(sel)(images[i:i + 1])
        best = max(sel, key=lambda t: float(s["heads"][t](feats).max()))
        assert head == best and int(out.label[i]) == int(s["heads"][head](feats).argmax())
        assert int(out.oracle_label[i]) == int(s["heads"][truth[i]](feats).argmax())
        n_true = s["heads"][truth[i]](feats).shape[-1]
        assert int(out.official_label[i]) == int(official_reading(s["heads"][head](feats)[0], n_true))
    with pytest.raises(ValueError, match="true_tasks has 2 entries for 6 images"):
        r.predict(images, true_tasks=["a", "b"])
    with pytest.raises(ValueError, match="true_tasks holds 'zz', not a task of this router; valid: a, b, c, d"):
        r.predict(images, true_tasks=truth[:5] + ["zz"])
    with pytest.raises(ValueError, match=r"residuals must be \(N, T=4\), one column per task"):
        r.route_residuals(torch.rand(6, 3))


def test_both_passes_run_in_the_benchmarks_arithmetic():
    """With ``amp`` (the clip size's model.precision) routing and the second pass run under autocast, as the
    benchmark evaluates MASS's baselines: the same features as the merged models run by hand in bf16, not fp32."""
    r, s = router(top_k=1, amp=torch.bfloat16)
    fp32, _ = router(top_k=1)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = r.predict(images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        point = (r.block, r.routing_matrix)
        feats = block_features(r.first_pass_model, images, [point])[point]
    assert torch.equal(r.features(images), feats.float())
    assert not torch.equal(r.features(images), fp32.features(images))  # bf16 rounding shows
    for i, sel in enumerate(out.routing.selected):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = s["heads"][sel[0]](r.model_for(sel)(images[i:i + 1]).float())
        assert int(out.label[i]) == int(logits.argmax())
    from mergelab.experiments import ch04_mass as ch04

    class Bench:  # what make_router reads of a benchmark; amp as the clip size resolves model.precision bf16
        heads, device, amp = s["heads"], torch.device("cpu"), torch.bfloat16

        def new_encoder(self):
            return encoder()

    assert ch04.make_router(Bench(), s["pre"], s["compressed"], block=1).amp == torch.bfloat16
    Bench.amp = None
    assert ch04.make_router(Bench(), s["pre"], s["compressed"], block=1).amp is None


def test_cache_keys_do_not_depend_on_selection_order_and_the_cache_is_bounded():
    assert cache_key(("c", "a", "b")) == cache_key(("b", "c", "a")) == ("a", "b", "c")
    r, _ = router(cache_size=2)
    first = r.model_for(["b", "a"])
    assert r.model_for(["a", "b"]) is first and (r.hits, r.misses) == (1, 1)
    r.model_for(["c"])
    r.model_for(["d", "a"])  # a third set: the least recently used, (a, b), goes
    assert r.cached_keys == [("c",), ("a", "d")]
    assert r.model_for(["a", "b"]) is not first and r.misses == 4


def seq_first(enc: torch.nn.Module) -> torch.nn.Module:
    """The same weights run sequence-first, as open_clip <= 2.0 did: (L, N, D) between blocks."""
    import copy

    out = copy.deepcopy(enc)
    out.transformer.batch_first = False
    for block in out.transformer.resblocks:
        block.attn.batch_first = False
    return out


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_class_token_is_read_per_image_whatever_the_layout(layout):
    enc = encoder()
    model = enc if layout == "batch_first" else seq_first(enc)
    torch.manual_seed(4)
    images = torch.randn(5, 3, 16, 16) * 0.1
    images[0] = torch.randn(3, 16, 16) * 3  # the first image differs from the others
    with torch.no_grad():
        assert torch.allclose(model(images), enc(images), atol=1e-5)  # the two layouts compute the same
    points = [(1, "mlp.c_fc"), (0, "attn.in_proj"), (1, "mlp.c_proj")]
    batch = block_features(model, images, points)
    for i in range(5):
        alone = block_features(model, images[i:i + 1], points)
        for p in points:
            assert torch.allclose(batch[p][i], alone[p][0], atol=1e-5), (p, i)
    assert batch[(1, "mlp.c_proj")].shape == (5, 64)
    # the official x[0] on a batch-first tensor reads the first image's tokens, not each image's class token
    tokens = torch.randn(5, 5, 16)  # (N, L, D) with N = L: shapes alone cannot tell
    assert torch.equal(class_token(tokens, 5, True), tokens[:, 0])
    assert not torch.equal(class_token(tokens, 5, False), tokens[:, 0])


def test_activations_on_the_wrong_axis_are_refused():
    x = torch.randn(5, 3, 16)  # (L=5 tokens, N=3 images, D)
    with pytest.raises(ValueError, match="wrong axis"):
        class_token(x, 3, batch_first=True, tokens=5)
    assert torch.equal(class_token(x, 3, batch_first=None, tokens=5), x[0])  # inferred: sequence-first
    with pytest.raises(ValueError, match="cannot tell the token layout"):
        class_token(torch.randn(4, 4, 16), 4, batch_first=None, tokens=4)


@pytest.mark.parametrize("options, message", [
    ({"threshold": 0.0}, r"threshold=0.0 is not valid; use a routing weight in the open interval \(0, 1\)"),
    ({"threshold": 1.0}, r"threshold=1.0 is not valid"),
    ({"threshold": -0.2}, r"threshold=-0.2 is not valid"),
    ({"top_k": 0}, r"top_k=0 is not valid; use an integer >= 1"),
    ({"top_k": 1.5}, r"top_k=1.5 is not valid"),
    ({"block": 2}, r"block=2 does not exist; the encoder has 2 blocks, valid: 0..1"),
    ({"block": -1}, r"block=-1 does not exist"),
    ({"block": None, "depth": 1.0}, r"depth=1.0 is not valid; use a relative depth in \[0, 1\)"),
    ({"routing_matrix": "attn.out_proj"}, r"routing_matrix='attn.out_proj' is not valid; use one of mlp.c_fc"),
    ({"first_pass": "ties"}, r"first_pass='ties' is not valid; use one of tsv_merge, pretrained"),
    ({"cache_size": 0}, r"cache_size=0 is not valid"),
])
def test_bad_parameters_name_the_parameter_and_the_valid_range(options, message):
    with pytest.raises(ValueError, match=message):
        router(**options)


def test_routing_block_is_relative_to_depth():
    assert routing_block(12) == 9  # the official ViT-B block
    assert routing_block(4) == 3 and routing_block(2) == 1 and routing_block(24) == 18
    assert routing_block(12, depth=0.0) == 0 and routing_block(12, block=11) == 11
    with pytest.raises(ValueError, match="num_blocks=0 is not valid"):
        routing_block(0)


def test_storage_counts_the_model_the_factors_and_the_dense_tensors():
    """Counted by hand: a float32 model of one 6 x 4 matrix, a 6-vector and an integer buffer (not a weight),
    two tasks at TSV-C's rank floor(4 / 2) = 2."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g), "n": torch.tensor(3)}
    compressed = {t: tsv_compress(TaskVector({"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}),
                                  num_tasks=2) for t in "ab"}
    s = storage_bytes(pre, compressed)
    assert s["model_bytes"] == (24 + 6) * 4  # the integer buffer is not a weight
    assert s["factor_bytes"] == 2 * (6 * 2 + 2 + 4 * 2) * 4  # per task U (6, 2), s (2,), V (4, 2)
    assert s["dense_bytes"] == 2 * 6 * 4  # per task the bias in full
    assert s["total_bytes"] == 120 + 176 + 48 and s["storage_multiple"] == pytest.approx(344 / 120)
    assert s["largest_dense"] == "b" and s["largest_dense_share"] == pytest.approx(6 / 30)
    assert s["total_bytes"] == s["model_bytes"] + sum(c.nbytes() for c in compressed.values())


def test_storage_counts_a_tensor_no_task_changed_once_in_the_model():
    """The experts froze the patch stem: its task vectors are zero, TSV-C stores nothing for them, and the storage
    (counted on the factors, and from the shapes with the stem named unchanged) keeps it once, in theta_0."""
    torch.manual_seed(0)
    pre = build_tiny_encoder(TinyViTConfig(width=16, layers=2, heads=2, patch_size=8, output_dim=8)).state_dict()
    weights = {k: v for k, v in pre.items() if v.is_floating_point()}
    moved = {t: TaskVector({k: torch.randn_like(v) for k, v in weights.items()}) for t in "abc"}
    frozen = {t: TaskVector({k: torch.zeros_like(v) if k == "conv1.weight" else v for k, v in tv.items()})
              for t, tv in moved.items()}
    every, stem_frozen = ({t: tsv_compress(tv, num_tasks=3) for t, tv in tvs.items()} for tvs in (moved, frozen))
    a, b = storage_bytes(pre, every), storage_bytes(pre, stem_frozen)
    stem = pre["conv1.weight"].numel() * 4
    assert a["unchanged"] == [] and b["unchanged"] == ["conv1.weight"]
    assert b["dense_bytes"] == a["dense_bytes"] - 3 * stem and b["factor_bytes"] == a["factor_bytes"]
    assert b["storage_multiple"] == pytest.approx(a["storage_multiple"] - 3 * stem / a["model_bytes"])
    assert a["largest_dense"] == "conv1.weight" and b["largest_dense"] != "conv1.weight"
    shapes = model_shapes(pre)
    computed = storage_of_shapes(shapes, 3, unchanged=["conv1.weight"])
    for key in ("model_bytes", "factor_bytes", "dense_bytes", "total_bytes", "largest_dense", "unchanged"):
        assert computed[key] == b[key], key
    with pytest.raises(ValueError, match="unchanged names 'conv9.weight'.*valid"):
        storage_of_shapes(shapes, 3, unchanged=["conv9.weight"])


def test_storage_from_shapes_equals_the_bytes_of_compressed_task_vectors():
    # a tiny open_clip ViT (4-D conv stem, matrices, biases and norms) and three tasks compressed at TSV-C's rank
    torch.manual_seed(0)
    pre = build_tiny_encoder(TinyViTConfig(width=16, layers=2, heads=2, patch_size=8, output_dim=8)).state_dict()
    compressed = {t: tsv_compress(TaskVector({k: torch.randn_like(v) for k, v in pre.items() if v.is_floating_point()}),
                                  num_tasks=3) for t in "abc"}
    shapes = model_shapes(pre)
    computed, counted = storage_of_shapes(shapes, 3), storage_bytes(pre, compressed)
    for key in ("model_bytes", "factor_bytes", "dense_bytes", "total_bytes"):
        assert computed[key] == counted[key], key
    assert computed["storage_multiple"] == pytest.approx(counted["storage_multiple"])
    assert computed["largest_dense"] == "conv1.weight"  # the patch stem: 16 x 3 x 8 x 8 weights
    assert computed["largest_dense_share"] == pytest.approx(16 * 3 * 8 * 8 / sum(math.prod(s) for s in shapes.values()))
    with pytest.raises(ValueError, match="num_tasks=0 is not valid"):
        storage_of_shapes(shapes, 0)
    with pytest.raises(ValueError, match="shapes is empty"):
        storage_of_shapes({}, 3)


def test_other_routing_options_share_the_second_pass_cache():
    r, s = router()
    model = r.model_for(["a", "c"])
    other = r.with_options(block=0, routing_matrix="attn.in_proj", threshold=0.3, top_k=1, first_pass="pretrained")
    assert other.model_for(["c", "a"]) is model
    assert (other.block, other.routing_matrix, other.threshold, other.top_k) == (0, "attn.in_proj", 0.3, 1)
    assert torch.equal(other.bases, routing_bases(s["compressed"], 0, "attn.in_proj"))
    assert not torch.equal(other.bases, r.bases)
    assert (r.block, r.routing_matrix, r.first_pass) == (1, "mlp.c_fc", "tsv_merge")  # the original is unchanged
    # a new matrix alone keeps the router's own block (not the default depth's); depth moves it
    at0 = r.with_options(block=0)
    assert at0.block == 0 and at0.with_options(routing_matrix="attn.in_proj").block == 0
    assert at0.with_options(depth=0.5).block == routing_block(r.num_blocks, 0.5)
    with pytest.raises(ValueError, match="with_options has no option 'polar'"):
        r.with_options(polar="svd")
    with pytest.raises(ValueError, match="top_k=0 is not valid"):
        r.with_options(top_k=0)


def test_routers_sharing_a_memo_predict_what_each_predicts_alone():
    """An ablation's routers (other blocks, matrices, selection, first pass) on one batch with one memo give
    the predictions each gives alone, while the memo holds one entry per first pass and routing point and
    computes an image's features under a selected set once for all of them."""
    r, _ = router(top_k=2, threshold=0.2)
    torch.manual_seed(5)
    images = torch.randn(8, 3, 16, 16)
    truth = ["a", "b", "c", "d"] * 2
    options = [{}, {"top_k": 1}, {"threshold": 0.05, "top_k": 3}, {"block": 0}, {"routing_matrix": "attn.in_proj"},
               {"first_pass": "pretrained"}]
    routers = [r.with_options(**o) for o in options]
    memo: dict = {}
    shared = [x.predict(images, true_tasks=truth, memo=memo) for x in routers]
    alone = [x.predict(images, true_tasks=truth) for x in routers]
    for a, b in zip(shared, alone):
        assert a.routing.selected == b.routing.selected and a.head_task == b.head_task
        assert torch.equal(a.label, b.label) and torch.equal(a.oracle_label, b.oracle_label)
        assert torch.allclose(a.routing.residuals, b.routing.residuals)
    points = [k for k in memo if k[0] == "first pass"]
    assert sorted(points) == sorted({("first pass", x.first_pass, x.block, x.routing_matrix) for x in routers})
    groups = {(k, tuple(i for i, kk in enumerate(p.routing.keys) if kk == k)) for p in shared for k in p.routing.keys}
    slots = {key[1:]: feats for key, feats in memo.items() if key[0] == "second pass"}
    assert set(slots) == groups  # one entry per set and group of images some router sent there
    for x in routers:  # and each router reads the very bits it computes alone (same sub-batch, same rounding)
        own: dict = {}
        x.predict(images, true_tasks=truth, memo=own)
        for key, feats in own.items():
            if key[0] == "second pass":
                assert torch.equal(memo[key], feats)


def test_one_first_pass_read_at_every_point_gives_each_routers_features_bit_for_bit(tmp_path, monkeypatch):
    """An ablation reads every routing point its routers need from one first pass per first-pass model (the forward
    stops at the deepest point): each point's features are the bits a router reading there computes alone, and every
    router's evaluation is the one it gets alone."""
    from mergelab.experiments import ch04_mass as ch04

    r, _ = router()
    torch.manual_seed(7)
    images = torch.randn(8, 3, 16, 16)
    options = [{}, {"block": 0}, {"routing_matrix": "attn.in_proj"}, {"block": 0, "routing_matrix": "mlp.c_proj"},
               {"first_pass": "pretrained"}, {"first_pass": "pretrained", "block": 0}]
    routers = [r.with_options(**o) for o in options]
    at = r.features_at(images, [(x.block, x.routing_matrix) for x in routers[:4]])
    assert len(at) == 4 and all(torch.equal(at[(x.block, x.routing_matrix)], x.features(images)) for x in routers[:4])
    passes = []
    real = MassRouter.features_at
    monkeypatch.setattr(MassRouter, "features_at", lambda self, *a: passes.append(self.first_pass) or real(self, *a))
    bench = _MixedBench(tmp_path)
    together = ch04.evaluate_routers(routers, bench, "val", batch_size=6, seed=1, examples=2, cache=False)
    batches = len(passes) // 2
    assert batches >= 2 and sorted(passes) == ["pretrained"] * batches + ["tsv_merge"] * batches  # one pass each
    for x, result in zip(routers, together):
        alone = ch04.evaluate_mass(x, bench, "val", batch_size=6, seed=1, examples=2, cache=False)
        assert {k: v for k, v in result.items() if k != "second_pass_models_built"} == {
            k: v for k, v in alone.items() if k != "second_pass_models_built"}


def test_time_per_image_pairs_rounds_and_gives_the_median_ratio_an_interval():
    from mergelab.experiments import ch04_mass as ch04

    r, s = router()
    merged = r._module(merge("tsv_merge", s["pre"], list(s["tvs"].values()), coefficient=1.0, device=None))
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = ch04.time_per_image(r, merged, images, repeats=4)
    assert len(t["ratios"]) == 4 and t["repeats"] == 4 and t["batch"] == 12
    assert t["cold_repeats"] == ch04.COLD_REPEATS == 3  # cold rounds build every second-pass model: at most three
    assert t["ratio"] == pytest.approx(statistics.median(t["ratios"]))
    ci = t["ratio_interval"]
    assert ci["n"] == 4 and ci["ci_low"] <= t["ratio"] <= ci["ci_high"]
    assert min(t["ratios"]) <= ci["ci_low"] and ci["ci_high"] <= max(t["ratios"])
    assert all(v > 0 for v in (t["forward_s"], t["mass_s"], t["mass_cold_s"], t["first_pass_s"]))
    assert len(t["first_pass_ratios"]) == 4 and t["first_pass_ratio"] == pytest.approx(statistics.median(t["first_pass_ratios"]))
    assert t["second_pass_ratio"] == pytest.approx(statistics.median([a - b for a, b in zip(t["ratios"], t["first_pass_ratios"])]))
    assert t["second_pass_sets"] == len(set(r.route(images).keys)) >= 1  # one sub-batch per distinct selected set
    assert r.cached_keys  # the warm rounds ran on the router's own cache; the cold ones on a copy
    one = ch04.time_per_image(r, merged, images, repeats=1)
    assert len(one["ratios"]) == 1 and one["ratio"] == one["ratios"][0]
    assert math.isnan(one["ratio_interval"]["ci_low"]) and math.isnan(one["ratio_interval"]["ci_high"])  # one round: no interval
    with pytest.raises(ValueError, match="timing_repeats=0 is not valid"):
        ch04.time_per_image(r, merged, images, repeats=0)


@pytest.mark.parametrize("low, high, status", [(2.0, 2.6, "reproduced"), (3.1, 3.6, "not_reproduced"),
                                               (2.7, 3.3, "not_testable"), (float("nan"), float("nan"), "not_testable")])
def test_the_time_claim_is_judged_by_the_interval_of_the_median_ratio(low, high, status):
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    methods = {m: {"normalized_accuracy": 0.8, "per_task_accuracy": {"a": 0.8}} for m in ("mass", "tsv_merge_validated")}
    methods["experts"] = {"normalized_accuracy": 1.0, "per_task_accuracy": {"a": 1.0}}
    timing = {"ratio": (low + high) / 2, "ratios": [low, high], "ratio_interval": {"estimate": (low + high) / 2,
              "ci_low": low, "ci_high": high, "n": 15, "level": 0.95, "method": "bootstrap (percentile)"}}
    out = ch04.claims(methods, {"contains_true": 0.9, "argmax_true": 0.8}, 2.0, timing, pd.DataFrame(columns=["study"]),
                      1, "tiny", {"a": 100}, {"a": 1.0})
    row = next(c for c in out if c["claim"].startswith("Two forward passes"))
    assert row["status"] == status
    assert row["evidence"]["ratio_ci_high"] == high or math.isnan(high)


@pytest.mark.parametrize("mass, tsv, n, status", [
    ({"a": 0.96, "b": 0.95}, {"a": 0.85, "b": 0.85}, 5000, ("reproduced", "reproduced")),
    ({"a": 0.91, "b": 0.92}, {"a": 0.85, "b": 0.85}, 50, ("not_testable", "not_testable")),
    ({"a": 0.70, "b": 0.72}, {"a": 0.70, "b": 0.70}, 5000, ("not_reproduced", "not_reproduced")),
])
def test_the_accuracy_claims_are_judged_by_the_test_sets_sampling_error(mass, tsv, n, status):
    """MASS >= .90 normalized and MASS >= TSV-M + .05: reproduced only when the whole binomial interval clears
    the bar, not reproduced when it lies wholly below, else not testable (few test images)."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    experts = {"a": 1.0, "b": 1.0}
    methods = {"mass": {"normalized_accuracy": sum(mass.values()) / 2, "per_task_accuracy": mass},
               "tsv_merge_validated": {"normalized_accuracy": sum(tsv.values()) / 2, "per_task_accuracy": tsv},
               "experts": {"normalized_accuracy": 1.0, "per_task_accuracy": experts}}
    ci = {"estimate": 2.0, "ci_low": 1.9, "ci_high": 2.1, "n": 15, "level": 0.95, "method": "bootstrap (percentile)"}
    out = ch04.claims(methods, {"contains_true": 0.95, "argmax_true": 0.9}, 2.0, {"ratio": 2.0, "ratio_interval": ci},
                      pd.DataFrame(columns=["study"]), 1, "tiny", {"a": n, "b": n}, experts)
    keeps, beats = out[0], out[1]
    assert (keeps["status"], beats["status"]) == status
    assert keeps["evidence"]["mass_normalized_ci"]["ci_low"] < methods["mass"]["normalized_accuracy"]
    routing = out[2]
    assert routing["evidence"]["contains_true_ci"]["n"] == 2 * n


def test_the_top_k_claim_is_not_testable_where_normalized_accuracy_is_undefined():
    """Tiny smoke splits can leave an expert at 0 on validation: normalized accuracy is NaN there, and the
    top-k claim says not testable instead of failing the chapter."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    rows = [{"study": "selection", "block": 1, "threshold": 0.2, "top_k": k, "normalized_accuracy": float("nan"),
             "per_task_accuracy": {"a": 0.5}, "examples": {"a": 10}} for k in (1, 2, 3)]
    methods = {m: {"normalized_accuracy": 0.5, "per_task_accuracy": {"a": 0.5}}
               for m in ("mass", "tsv_merge_validated", "experts")}
    ci = {"estimate": 2.0, "ci_low": 1.9, "ci_high": 2.1, "n": 3, "level": 0.95, "method": "bootstrap (percentile)"}
    out = ch04.claims(methods, {"contains_true": 0.5, "argmax_true": 0.5}, 2.0, {"ratio": 2.0, "ratio_interval": ci},
                      pd.DataFrame(rows), 1, "smoke", {"a": 10}, {"a": 0.0})
    top_k = next(c for c in out if c["claim"].startswith("Selecting up to 2 or 3"))
    assert top_k["status"] == "not_testable" and top_k["evidence"]["best_top_k"] == 2


def test_timings_adds_the_all_threads_figure_only_on_a_cpu_with_more_threads():
    from mergelab.experiments import ch04_mass as ch04
    from mergelab.utils import torch_threads

    r, s = router()
    merged = r._module(merge("tsv_merge", s["pre"], list(s["tvs"].values()), coefficient=1.0, device=None))
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch_threads(1):
        one, every = ch04.timings(r, merged, images, repeats=3)
        assert one["threads"] == 1 and every is None
    with torch_threads(2):
        one, every = ch04.timings(r, merged, images, repeats=3)
        assert one["threads"] == 1 and every["threads"] == 2 and len(every["ratios"]) == 3
        assert torch.get_num_threads() == 2  # the caller's setting is restored


def test_reference_storage_reads_vit_b32_shapes_and_goes_beside_the_storage_claim():
    """The public encoder's storage from its shapes alone (built on the meta device): its patch stem is the
    largest tensor kept in full, the multiple grows with the number of tasks, and the storage claim carries it
    as evidence while its status reads the benchmark's own figure."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    at8, at20 = ch04.reference_storage(8), ch04.reference_storage(20)
    assert at8["model"] == "ViT-B-32" and at8["largest_dense"] == "conv1.weight"
    assert at8["model_bytes"] == 4 * 87_849_216  # ViT-B-32's image encoder, float32
    assert at8["largest_dense_share"] == pytest.approx(768 * 3 * 32 * 32 / 87_849_216)
    assert 2.0 < at8["storage_multiple"] < at20["storage_multiple"] < 3.0
    with pytest.raises(ValueError, match="model='ViT-Z' is not valid"):
        ch04.reference_storage(8, "ViT-Z")
    experts = {"a": 1.0}
    methods = {m: {"normalized_accuracy": 1.0, "per_task_accuracy": experts} for m in ("mass", "tsv_merge_validated", "experts")}
    ci = {"estimate": 2.0, "ci_low": 1.9, "ci_high": 2.1, "n": 3, "level": 0.95, "method": "bootstrap (percentile)"}
    out = ch04.claims(methods, {"contains_true": 1.0, "argmax_true": 1.0}, 2.8, {"ratio": 2.0, "ratio_interval": ci},
                      pd.DataFrame(columns=["study"]), 1, "tiny", {"a": 100}, experts, storage_reference=at8)
    storage = next(c for c in out if c["claim"].startswith("MASS stores"))
    assert storage["status"] == "not_reproduced"  # 2.8 > 2.5 whatever the reference
    assert storage["evidence"]["reference_storage_multiple"] == at8["storage_multiple"]
    assert storage["evidence"]["reference_largest_dense"] == "conv1.weight"


def test_the_selection_study_is_read_against_the_defaults():
    import pandas as pd

    from mergelab.experiments.ch04_mass import selection_against_default

    abl = pd.DataFrame({"study": ["selection"] * 4 + ["layer"], "threshold": [0.2, 0.2, 0.05, 0.05, 0.2],
                        "top_k": [3, 1, 1, 3, 3], "normalized_accuracy": [0.72, 0.80, 0.82, float("nan"), 0.99]})
    got = selection_against_default(abl, 0.2, 3)  # the layer study's .99 and the undefined row do not count
    assert got == {"default": 0.72, "threshold": 0.05, "top_k": 1, "normalized_accuracy": 0.82, "is_default": False}
    assert selection_against_default(abl[abl["top_k"] == 3], 0.2, 3)["is_default"] is True
    assert selection_against_default(abl, 0.1, 2) is None  # the default was not in the study


def test_mass_with_the_selection_chosen_on_validation_reads_the_study_and_flags_an_edge():
    import pandas as pd

    from mergelab.experiments.ch04_mass import validated_selection

    r, _ = router()  # the official defaults: threshold 0.2, top-k 3
    study = {"study": ["selection"] * 6, "threshold": [0.05, 0.2, 0.5] * 2, "top_k": [1] * 3 + [2] * 3}
    argmax_best = pd.DataFrame({**study, "normalized_accuracy": [0.82, 0.82, 0.82, 0.70, 0.72, 0.71]})
    with_default = pd.concat([argmax_best, pd.DataFrame({"study": ["selection"], "threshold": [0.2], "top_k": [3],
                                                         "normalized_accuracy": [0.73]})], ignore_index=True)
    tuned, pick = validated_selection(r, with_default)
    assert (tuned.threshold, tuned.top_k) == (0.05, 1) and tuned is not r and tuned._models is r._models  # one cache
    assert pick == {"threshold": 0.05, "top_k": 1, "validation_normalized": 0.82, "chosen_on_validation": True,
                    "threshold_acts": False, "at_grid_edge": False}  # top-k 1: the threshold does not act
    inner = with_default.assign(normalized_accuracy=[0.7, 0.7, 0.7, 0.71, 0.9, 0.72, 0.73])
    assert validated_selection(r, inner)[1]["at_grid_edge"] is False  # threshold 0.2, top-k 2: inside both grids
    low = with_default.assign(normalized_accuracy=[0.7, 0.7, 0.7, 0.9, 0.72, 0.71, 0.73])
    assert validated_selection(r, low)[1]["at_grid_edge"] is True  # top-k 2 at the smallest threshold studied
    largest_k = with_default.assign(normalized_accuracy=[0.7] * 6 + [0.9])
    assert validated_selection(r, largest_k)[1]["at_grid_edge"] is True  # the largest top-k studied
    without_default = validated_selection(r, argmax_best.assign(normalized_accuracy=[0.7] * 5 + [0.75]))[1]
    assert (without_default["threshold"], without_default["top_k"]) == (0.5, 2)  # the defaults were not studied
    same, pick = validated_selection(r, pd.DataFrame({"study": ["layer"], "threshold": [0.2], "top_k": [3],
                                                      "normalized_accuracy": [0.9]}))
    assert same is r and pick["chosen_on_validation"] is False  # no selection study: the router as it is


def test_routing_bases_refuse_tasks_stored_at_other_ranks():
    torch.manual_seed(0)
    pre = build_tiny_encoder(TinyViTConfig(width=16, layers=2, heads=2, patch_size=8, output_dim=8)).state_dict()
    compressed = {t: tsv_compress(TaskVector({k: torch.randn_like(v) for k, v in pre.items() if v.is_floating_point()}),
                                  num_tasks=n) for t, n in (("a", 2), ("b", 4))}
    with pytest.raises(ValueError, match=r"store 'transformer.resblocks.1.mlp.c_fc.weight' at different shapes "
                                         r"\(a: \(16, 8\), b: \(16, 4\)\)"):
        routing_bases(compressed, 1)


def test_compress_tasks_refuses_no_tasks():
    from mergelab.experiments.ch04_mass import compress_tasks

    with pytest.raises(ValueError, match=r"task_vectors is empty; pass \{task: TaskVector\}"):
        compress_tasks({})


def test_the_router_uses_copies_of_the_heads_and_leaves_the_callers_in_their_mode():
    enc, pre, tvs, compressed, heads, subspaces = orthogonal_setup()
    for h in heads.values():
        h.train()
    r = MassRouter(pre, compressed, enc, heads, device="cpu", block=1)
    assert all(h.training for h in heads.values())
    assert all(r.heads[t] is not heads[t] and not r.heads[t].training for t in TASKS)
    images = torch.rand(3, 3, CFG.image_size, CFG.image_size)
    assert r.predict(images).label.shape == (3,)
    assert all(h.training for h in heads.values())


class _MixedBench:
    """Four tasks of random 16x16 images with a cache folder and an evaluation key per task and split (what
    :func:`mergelab.experiments.ch04_mass.evaluate_routers` keys its cache on)."""

    def __init__(self, cache_dir, data: str = "v1") -> None:
        g = torch.Generator().manual_seed(3)
        self.cache_dir, self.data = cache_dir, data
        self.X = {t: torch.randn(5, 3, 16, 16, generator=g) for t in TASKS}
        self.y = {t: torch.randint(0, 3, (5,), generator=g) for t in TASKS}

    def split(self, task, split):
        return self.X[task], self.y[task]

    def images(self, task, split, rows):
        return self.X[task][rows]

    def evaluation_key(self, task, split):
        return f"{task}/{split}/{self.data}"


def test_mass_results_are_cached_per_router_and_configuration(tmp_path, monkeypatch):
    """A re-run reads each router's result back without a forward pass; in an ablation only the routers without a
    result run; other options, weights, data or batches are other files; a damaged file runs again."""
    from mergelab.experiments import ch04_mass as ch04

    _, s = router()
    order = ("d", "b", "a", "c")  # not sorted: a result read back keeps the router's order of tasks
    r = MassRouter(s["pre"], {t: s["compressed"][t] for t in order}, encoder(), s["heads"], device="cpu", block=1)
    bench = _MixedBench(tmp_path)
    fresh = ch04.evaluate_mass(r, bench, "val", batch_size=6, seed=1, examples=2, cache=False)
    assert not (tmp_path / "mass").exists()
    first = ch04.evaluate_mass(r, bench, "val", batch_size=6, seed=1, examples=2)

    def numbers(result):  # what the router predicted; second_pass_models_built counts the models this run built
        return {k: v for k, v in result.items() if k != "second_pass_models_built"}

    assert numbers(first) == numbers(fresh) and first["n"] == {t: 5 for t in TASKS}
    runs = []
    real = ch04._run_routers
    monkeypatch.setattr(ch04, "_run_routers", lambda routers, *a: runs.append(len(routers)) or real(routers, *a))
    again = ch04.evaluate_mass(r, bench, "val", batch_size=6, seed=1, examples=2)
    assert again == first and runs == []
    # in the tasks' order, as computed: means over tasks and figures read them in that order
    assert list(again["per_task_accuracy"]) == list(first["per_task_accuracy"]) == list(order)
    assert [list(e["residuals"]) for e in again["examples"]] == [list(order)] * 2
    assert list(again["routing"]["per_task_contains_true"]) == list(order) == list(again["n"])
    both = ch04.evaluate_routers([r, r.with_options(top_k=1)], bench, "val", batch_size=6, seed=1, examples=2)
    assert both[0] == first and runs == [1]  # only the new router ran
    assert numbers(both[1]) == numbers(ch04.evaluate_mass(r.with_options(top_k=1), bench, "val", batch_size=6,
                                                          seed=1, examples=2, cache=False))
    key = dict(split="val", batch_size=6, seed=1, max_per_task=None, examples=2)
    path = ch04.result_path(r, bench, **key)
    others = [ch04.result_path(r.with_options(threshold=0.3), bench, **key),
              ch04.result_path(r.with_options(block=0), bench, **key),
              ch04.result_path(r, _MixedBench(tmp_path, data="v2"), **key),
              ch04.result_path(r, bench, **{**key, "seed": 2}), ch04.result_path(r, bench, **{**key, "examples": 0}),
              ch04.result_path(r, bench, **{**key, "max_per_task": 3})]
    heads = {t: ClassificationHead(h.weight.detach(), 10.0) for t, h in s["heads"].items()}  # another scale
    others.append(ch04.result_path(MassRouter(s["pre"], {t: s["compressed"][t] for t in order}, encoder(), heads,
                                              device="cpu", block=1), bench, **key))
    assert len({path, *others}) == len(others) + 1
    others.append(ch04.result_path(MassRouter(s["pre"], {t: s["compressed"][t] for t in order}, encoder(), s["heads"],
                                              device="cpu", block=1, cache_size=2), bench, **key))  # more models built
    assert len({path, *others}) == len(others) + 1
    assert ch04.result_path(r.with_options(), bench, **key) == path
    path.write_text("{")
    runs.clear()
    assert numbers(ch04.evaluate_mass(r, bench, "val", batch_size=6, seed=1, examples=2)) == numbers(first)
    assert runs == [1]


def test_routers_of_other_tasks_or_another_order_are_not_evaluated_together(tmp_path):
    """The mixed batches are drawn from the first router's tasks: another order would change which images each
    batch holds, and a result cached under the other router's own key would not be what it gives alone."""
    from mergelab.experiments import ch04_mass as ch04

    r, s = router()
    order = ["d", "c", "b", "a"]
    reordered = MassRouter(s["pre"], {t: s["compressed"][t] for t in order}, encoder(), s["heads"], device="cpu", block=1)
    with pytest.raises(ValueError, match=r"routers must share one list of tasks in one order.*\['d', 'c', 'b', 'a'\]"):
        ch04.evaluate_routers([r, reordered], _MixedBench(tmp_path), "val", batch_size=6, seed=1)


def test_the_routing_study_is_cached_for_the_packages_score_only(tmp_path, monkeypatch):
    """Chapter 04's temperature sweep reads its table back on a re-run; a score of one's own (the students'
    exercise) is computed every time, since a function's code cannot key a cache."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    r, _ = router()
    bench = _MixedBench(tmp_path)
    temperatures = [0.5, 1.0, 4.0]
    first = ch04.routing_study(r, bench, "val", temperatures, batch_size=6, seed=1)
    assert list(first.columns) == list(ch04.ROUTING_COLUMNS) and len(first) == 3
    pd.testing.assert_frame_equal(first, ch04.routing_study(r, bench, "val", np.array(temperatures), batch_size=6,
                                                            seed=1))  # a NumPy array of temperatures: the same table
    pd.testing.assert_frame_equal(first, ch04.routing_study(r, bench, "val", temperatures, batch_size=6, seed=1,
                                                            cache=False))
    calls = []
    real = r.features
    monkeypatch.setattr(r, "features", lambda images: calls.append(len(images)) or real(images))
    pd.testing.assert_frame_equal(ch04.routing_study(r, bench, "val", temperatures, batch_size=6, seed=1), first)
    assert calls == []
    ch04.routing_study(r, bench, "val", temperatures, score=lambda x, b: subspace_residuals(x, b), batch_size=6, seed=1)
    assert sum(calls) == 20  # every image of the four tasks, computed again
    paths = {ch04.routing_study_path(r, bench, "val", t, 6, 1, None) for t in ([0.5, 1.0, 4.0], [1.0], [0.5, 1.0])}
    paths |= {ch04.routing_study_path(r, bench, "val", temperatures, 6, 2, None),
              ch04.routing_study_path(r.with_options(block=0), bench, "val", temperatures, 6, 1, None),
              ch04.result_path(r, bench, "val", 6, 1, None, 0)}
    assert len(paths) == 6


def test_mass_accuracy_counts_an_image_right_only_when_read_with_its_own_head_and_label(tmp_path):
    """evaluate_mass's figures equal a count made by hand from the router's predictions: an image is right for
    MASS only when the chosen head is its own task's and the label matches (another task's head has other
    classes, even where its index happens to match); the oracle figure reads the true task's head."""
    from mergelab.experiments import ch04_mass as ch04

    r, _ = router(top_k=2, threshold=0.1)
    bench = _MixedBench(tmp_path)
    got = ch04.evaluate_mass(r, bench, "val", batch_size=6, seed=1, cache=False)
    right, oracle, official, contains, argmax, n = ({t: 0 for t in TASKS} for _ in range(6))
    other_head_same_index = 0
    for images, labels, truth in ch04.mixed_batches(bench, "val", list(TASKS), 6, 1):
        out = r.predict(images, true_tasks=truth)
        for i, t in enumerate(truth):
            n[t] += 1
            same = int(out.label[i]) == int(labels[i])
            right[t] += int(out.head_task[i] == t and same)
            other_head_same_index += int(out.head_task[i] != t and same)
            official[t] += int(same)  # every task has 3 classes: the official reading is the chosen head's argmax
            oracle[t] += int(int(out.oracle_label[i]) == int(labels[i]))
            contains[t] += int(t in out.routing.selected[i])
            argmax[t] += int(out.routing.argmax[i] == t)
    assert got["n"] == n
    assert got["per_task_accuracy"] == pytest.approx({t: right[t] / n[t] for t in TASKS})
    assert got["oracle_head_accuracy"] == pytest.approx({t: oracle[t] / n[t] for t in TASKS})
    assert got["official_scoring_accuracy"] == pytest.approx({t: official[t] / n[t] for t in TASKS})
    assert sum(official.values()) == sum(right.values()) + other_head_same_index
    total = sum(n.values())
    assert got["routing"]["contains_true"] == pytest.approx(sum(contains.values()) / total)
    assert got["routing"]["argmax_true"] == pytest.approx(sum(argmax.values()) / total)
    assert other_head_same_index > 0  # the case the rule is about occurs in this data (3 classes per task)


@pytest.mark.parametrize("contains, n, first_pass, status", [
    (0.95, 2000, (0.95, 0.80), ("reproduced", "reproduced")),      # routing well above .90; TSV-M's first pass ahead
    (0.80, 2000, (0.80, 0.95), ("not_reproduced", "not_reproduced")),  # well below .90; the pretrained one ahead
    (0.91, 40, (0.90, 0.89), ("not_testable", "not_testable")),    # few images: neither interval decides
])
def test_the_routing_claims_are_judged_by_their_intervals(contains, n, first_pass, status):
    """Routing accuracy >= .90 (Wilson interval over the test inputs) and the TSV-M first pass against the pretrained
    one (validation ablation at the default block): each reproduced, not reproduced or not testable by its interval."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    experts = {"a": 1.0, "b": 1.0}
    methods = {m: {"normalized_accuracy": 0.9, "per_task_accuracy": {"a": 0.9, "b": 0.9}}
               for m in ("mass", "tsv_merge_validated")}
    methods["experts"] = {"normalized_accuracy": 1.0, "per_task_accuracy": experts}
    ci = {"estimate": 2.0, "ci_low": 1.9, "ci_high": 2.1, "n": 15, "level": 0.95, "method": "bootstrap (percentile)"}
    examples = {"a": n // 2, "b": n // 2}
    ablations = pd.DataFrame([
        {"study": "layer", "routing_matrix": "mlp.c_fc", "block": 1, "first_pass": "tsv_merge",
         "contains_true": first_pass[0], "examples": examples},
        {"study": "first_pass", "routing_matrix": "mlp.c_fc", "block": 1, "first_pass": "pretrained",
         "contains_true": first_pass[1], "examples": examples}])
    out = ch04.claims(methods, {"contains_true": contains, "argmax_true": 0.8}, 2.0, {"ratio": 2.0, "ratio_interval": ci},
                      ablations, 1, "tiny", {"a": n // 2, "b": n // 2}, experts)
    routing = next(c for c in out if "Routing finds the task" in c["claim"])
    first = next(c for c in out if "first pass beats routing on the pretrained" in c["claim"])
    assert (routing["status"], first["status"]) == status
    assert first["evidence"]["tsv_merge_first_pass_contains_true"] == first_pass[0]


@pytest.mark.parametrize("acc, best, status", [
    ({1: 0.80, 2: 0.90, 3: 0.88}, 2, "reproduced"),      # top-k 2 ahead of 1 by 10 points on 2,000 images a task
    ({1: 0.90, 2: 0.80, 3: 0.82}, 3, "not_reproduced"),  # the best of 2 and 3 (3) still behind 1
    ({1: 0.85, 2: 0.85, 3: 0.84}, 2, "not_testable"),    # level: the interval straddles 0
])
def test_the_top_k_claim_compares_the_better_of_top_k_2_and_3_with_routing_to_one(acc, best, status):
    """The claim reads top-k 1 against whichever of 2 and 3 scores higher (normalized, validation, threshold .2),
    and judges the difference by its binomial interval."""
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    experts = {"a": 1.0, "b": 1.0}
    rows = [{"study": "selection", "block": 1, "threshold": 0.2, "top_k": k, "normalized_accuracy": v,
             "per_task_accuracy": {"a": v, "b": v}, "examples": {"a": 2000, "b": 2000}} for k, v in acc.items()]
    rows += [{**rows[0], "threshold": 0.5, "normalized_accuracy": 0.99}]  # another threshold: not read
    methods = {m: {"normalized_accuracy": 0.5, "per_task_accuracy": {"a": 0.5, "b": 0.5}}
               for m in ("mass", "tsv_merge_validated", "experts")}
    ci = {"estimate": 2.0, "ci_low": 1.9, "ci_high": 2.1, "n": 3, "level": 0.95, "method": "bootstrap (percentile)"}
    out = ch04.claims(methods, {"contains_true": 0.5, "argmax_true": 0.5}, 2.0, {"ratio": 2.0, "ratio_interval": ci},
                      pd.DataFrame(rows), 1, "tiny", {"a": 2000, "b": 2000}, experts)
    top_k = next(c for c in out if c["claim"].startswith("Selecting up to 2 or 3"))
    assert top_k["evidence"]["best_top_k"] == best and top_k["status"] == status
    assert top_k["evidence"]["top_k_1"] == acc[1]


def test_subspace_energy_is_one_inside_a_subspace_zero_outside_and_matches_the_residual():
    from mergelab.merging.mass import subspace_energy

    _, s = router()
    bases = torch.stack([s["subspaces"][t] for t in TASKS])  # (4, 16, 4), mutually orthogonal
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g) @ s["subspaces"]["b"].T
    e = subspace_energy(x, bases)
    assert torch.allclose(e[:, 1], torch.ones(3), atol=1e-5) and e[:, [0, 2, 3]].abs().max() < 1e-5
    y = torch.randn(6, 16, generator=g)  # the four subspaces span R^16: the shares add up to 1
    assert torch.allclose(subspace_energy(y, bases).sum(1), torch.ones(6), atol=1e-5)
    r = subspace_residuals(y, bases)
    assert torch.allclose(subspace_energy(y, bases), 1 - r ** 2 / (y ** 2).sum(1, keepdim=True), atol=1e-5)
    zero_column = torch.cat([bases[:1], torch.zeros(1, 16, 4)])  # a task that stores no direction: share 0
    assert subspace_energy(y, zero_column)[:, 1].abs().max() == 0
    assert torch.equal(subspace_energy(torch.zeros(1, 16), bases), torch.zeros(1, 4))  # norm 0: 0, not NaN
    with pytest.raises(ValueError, match=r"x must be \(N, d\) and bases \(T, d, k\)"):
        subspace_energy(torch.zeros(2, 8), bases)


def test_subspace_overlap_averages_each_tasks_inputs_over_every_subspace(tmp_path):
    """Row t of the overlap is the mean share of task t's routing features inside each subspace, whatever the
    batch size; rows and columns follow the router's tasks."""
    from mergelab.experiments import ch04_mass as ch04
    from mergelab.merging.mass import subspace_energy

    r, _ = router()
    bench = _MixedBench(tmp_path)
    overlap = ch04.subspace_overlap(r, bench, "val", batch_size=2)
    assert list(overlap.index) == list(TASKS) and list(overlap.columns) == list(TASKS)
    for t in TASKS:
        expected = subspace_energy(r.features(bench.X[t]), r.bases.float()).mean(0)
        assert np.allclose(overlap.loc[t].to_numpy(), expected.numpy(), atol=1e-6), t
    assert ((overlap >= 0) & (overlap <= 1 + 1e-6)).all().all()
    assert np.allclose(ch04.subspace_overlap(r, bench, "val", batch_size=5).to_numpy(), overlap.to_numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        ch04.subspace_overlap(r, bench, "val", batch_size=0)



def test_subspace_overlap_is_cached_by_router_split_and_batch_size(tmp_path, monkeypatch):
    """A re-run reads the table back without a forward pass (rows and columns in the router's order); another batch
    size is another file; ``cache=False`` writes nothing."""
    from mergelab.experiments import ch04_mass as ch04

    r, _ = router()
    bench = _MixedBench(tmp_path)
    assert not ch04.subspace_overlap(r, bench, "val", batch_size=2, cache=False).empty
    assert not (tmp_path / "mass").exists()
    first = ch04.subspace_overlap(r, bench, "val", batch_size=2)
    assert ch04.subspace_overlap_path(r, bench, "val", 2).is_file()
    monkeypatch.setattr(MassRouter, "features", lambda self, images: pytest.fail("computed again"))
    again = ch04.subspace_overlap(r, bench, "val", batch_size=2)
    assert list(again.index) == list(TASKS) and list(again.columns) == list(TASKS)
    assert np.allclose(again.to_numpy(), first.to_numpy(), atol=1e-12)
    assert ch04.subspace_overlap_path(r, bench, "val", 3) != ch04.subspace_overlap_path(r, bench, "val", 2)


def test_the_accuracy_budget_splits_masss_loss_into_rank_routing_and_head():
    from mergelab.experiments import ch04_mass as ch04

    rows = {"experts": {"normalized_accuracy": 1.0}, "tsv_compress": {"normalized_accuracy": 0.95},
            "mass_oracle_head": {"normalized_accuracy": 0.84}, "mass": {"normalized_accuracy": 0.73}}
    budget = ch04.accuracy_budget(rows)
    assert budget == pytest.approx({"compression": 0.05, "routing": 0.11, "head_choice": 0.11, "total": 0.27})
    assert budget["compression"] + budget["routing"] + budget["head_choice"] == pytest.approx(budget["total"])


def test_the_overlap_summary_names_the_closest_call_and_the_largest_share_off_the_diagonal():
    import pandas as pd

    from mergelab.experiments import ch04_mass as ch04

    tasks = ["a", "b", "c"]
    overlap = pd.DataFrame([[0.6, 0.5, 0.1], [0.2, 0.7, 0.55], [0.1, 0.3, 0.9]], index=tasks, columns=tasks)
    s = ch04.overlap_summary(overlap)
    # leads: a .6 - .5 = .1, b .7 - .55 = .15, c .9 - .3 = .6: a is the closest call, b's subspace its rival
    assert (s["closest"], s["own"], s["rival"], s["rival_share"]) == ("a", 0.6, "b", 0.5)
    assert (s["off_inputs"], s["off_subspace"], s["off_share"], s["off_own"]) == ("b", "c", 0.55, 0.7)
    with pytest.raises(ValueError, match="overlap must be square"):
        ch04.overlap_summary(overlap.drop(columns="c"))
