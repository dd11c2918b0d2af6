"""Chapter 06's ViT (session 38 of the project): do permutations inside the attention help the aligned average?

The chapter's spec (`mergelab.alignment.vit_spec`) leaves the attention's inner units in place, because a spec group
permutes a whole axis and ``in_proj_weight`` stacks the queries, keys and values of every head. This probe aligns them
anyway, on a *view* of each model: per block, the queries, keys and values as ``(heads, head_dim, width)`` tensors
(biases ``(heads, head_dim)``) and ``out_proj.weight`` as ``(width, heads, head_dim)``, with three more groups per
block: the heads as blocks (``P_head<i>``), one permutation of the query-key channels within every head
(``P_qk<i>``, the same for every head: a subgroup of the symmetry) and one of the value channels (``P_vo<i>``, with
``out_proj``'s columns). The view is matched with the package's own weight matching, MergeMany and C2M3, then mapped
back to open_clip's tensors and averaged.

Usage, from the repository's root: ``MERGELAB_DATA_DIR=<folder> python docs/c2m3-scratch/vit_heads_probe.py`` (the chapter's tiny ViT models, cached like the
chapter's).
"""

from __future__ import annotations

import yaml

from mergelab.alignment import (
    PermutationSpec,
    apply_permutation,
    average_states,
    c2m3_frank_wolfe,
    merge_aligned,
    merge_many,
    vit_spec,
    weight_matching,
)
from mergelab.experiments import ch06_c2m3 as ch
from mergelab.training.scratch import evaluate_state

ATTN = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def to_view(state, layers, heads):
    out = {k: v for k, v in state.items() if not any(k.endswith(a) for a in ATTN[:3])}
    width = state["ln_pre.weight"].numel()
    d = width // heads
    for i in range(layers):
        p = f"transformer.resblocks.{i}.attn."
        w, b = state[p + "in_proj_weight"], state[p + "in_proj_bias"]
        for j, name in enumerate("qkv"):
            out[p + name + "_w"] = w[j * width:(j + 1) * width].reshape(heads, d, width)
            out[p + name + "_b"] = b[j * width:(j + 1) * width].reshape(heads, d)
        out[p + "out_w"] = state[p + "out_proj.weight"].reshape(width, heads, d)
    return out


def from_view(view, layers, heads):
    import torch

    out = {k: v for k, v in view.items() if not k.split(".")[-1] in ("q_w", "k_w", "v_w", "q_b", "k_b", "v_b", "out_w")}
    width = view["ln_pre.weight"].numel()
    for i in range(layers):
        p = f"transformer.resblocks.{i}.attn."
        out[p + "in_proj_weight"] = torch.cat([view[p + n + "_w"].reshape(width, width) for n in "qkv"])
        out[p + "in_proj_bias"] = torch.cat([view[p + n + "_b"].reshape(width) for n in "qkv"])
        out[p + "out_proj.weight"] = view[p + "out_w"].reshape(width, width)
    return out


def view_spec(layers, heads_inside):
    axes = {k: v for k, v in vit_spec(layers).axes.items() if not any(k.endswith(a) for a in ATTN[:3])}
    for i in range(layers):
        p = f"transformer.resblocks.{i}.attn."
        head, qk, vo = (f"P_head{i}", f"P_qk{i}", f"P_vo{i}") if heads_inside else (None, None, None)
        for n in "qk":
            axes[p + n + "_w"] = (head, qk, "P_res")
            axes[p + n + "_b"] = (head, qk)
        axes[p + "v_w"] = (head, vo, "P_res")
        axes[p + "v_b"] = (head, vo)
        axes[p + "out_w"] = ("P_res", head, vo)
    return PermutationSpec(axes)


if __name__ == "__main__":
    import torch

    params = yaml.safe_load(open("params/tiny/06_cycle_consistent_merging.yaml"))
    recipe = params["architectures"]["vit"]
    t = ch.train_all({"vit": recipe}, params["num_models"], 0, params["digits"])["vit"]
    split = ch.digits_data(params["digits"])[0]
    layers, heads = recipe["blocks"], recipe["heads"]

    def acc(state):
        return round(evaluate_state(t.model, state, split.X_test, split.y_test)["accuracy"], 3)

    views = [to_view(s, layers, heads) for s in t.states]
    back = from_view(views[0], layers, heads)
    assert back.keys() == t.states[0].keys() and all(torch.equal(back[k], v) for k, v in t.states[0].items())  # exact
    from mergelab.alignment import random_permutations

    for inside in (False, True):
        spec = view_spec(layers, inside)
        spec.validate(views[0])
        shuffled = apply_permutation(spec, random_permutations(spec.group_sizes(views[0]), torch.Generator().manual_seed(1)),
                                     views[0])  # every group of the view permuted: the same function
        with torch.no_grad():
            t.model.load_state_dict(t.states[0])
            before = t.model.eval()(split.X_test)
            t.model.load_state_dict(from_view(shuffled, layers, heads))
            change = float((t.model(split.X_test) - before).abs().max())
        print(f"groups {sorted(spec.group_sizes(views[0]))}: largest logit change under a random permutation {change:.1e}")
        a, b = views[0], views[1]
        pair = average_states([a, apply_permutation(spec, weight_matching(spec, a, b, seed=0), b)])
        three = views[:3]
        mm = merge_aligned(spec, three, merge_many(spec, three, seed=0))
        fw = merge_aligned(spec, three, c2m3_frank_wolfe(spec, three, seed=0).perms)
        print(f"attention permuted inside: {inside}; aligned pair {acc(from_view(pair, layers, heads))}, "
              f"MergeMany of 3 {acc(from_view(mm, layers, heads))}, C2M3 of 3 {acc(from_view(fw, layers, heads))}")
