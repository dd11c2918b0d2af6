"""Chapter 06's ViT (session 38 of the project): how much of the aligned pair's average is lost in the attention.

Usage, from the repository's root: ``MERGELAB_DATA_DIR=<folder> python docs/c2m3-scratch/vit_attention_probe.py`` (the chapter's tiny ViT recipe, five models from
seeds 0-4, cached like the chapter's; one worker). Prints the first two models' average after weight matching, with
the attention tensors (or the MLPs) kept from the first model instead of averaged, and along the line from the first
model to the matched second with and without the attention held at the first model's.
"""

from __future__ import annotations

import yaml

from mergelab.experiments import ch06_c2m3 as ch
from mergelab.training.scratch import evaluate_state

if __name__ == "__main__":
    params = yaml.safe_load(open("params/tiny/06_cycle_consistent_merging.yaml"))
    t = ch.train_all({"vit": params["architectures"]["vit"]}, params["num_models"], 0, params["digits"])["vit"]
    split = ch.digits_data(params["digits"])[0]

    def acc(state):
        return round(evaluate_state(t.model, state, split.X_test, split.y_test)["accuracy"], 3)

    for keep in ([".attn."], [".mlp."], [".attn.", "ln_"]):
        average, keeping, kept = ch.pair_merges_keeping(t, keep, seed=0)
        print(f"keep {keep}: {len(kept)} tensors; aligned average {acc(average)}, keeping {acc(keeping)}")
    a, b = t.states[0], ch.matched_to(t, t.states[0], t.states[1], seed=0)
    for lam in (0.1, 0.2, 0.3, 0.5):
        line = {k: (1 - lam) * a[k] + lam * b[k] for k in a}
        held = {k: (a[k] if ".attn." in k else v) for k, v in line.items()}
        print(f"lambda {lam}: the line {acc(line)}, attention held at the first model's {acc(held)}")
