"""Independent check of chapter 06's naive / naive+REPAIR numbers for the tiny MLPs (widths 256,256,256).

Own implementation: the digits split is rebuilt with scikit-learn directly, the models are read straight from
the cached safetensors files, and the forward pass / REPAIR are plain torch (no mergelab.alignment.repair).
mergelab is used only to confirm (a) which cache files belong to seeds 0, 1, 2 of the tiny recipe and
(b) that its split equals ours.

Run (from the repository root, after `make report` has cached chapter 06's models):
    .venv/bin/python docs/c2m3-scratch/repair_naive_check.py
with MERGELAB_DATA_DIR and MERGELAB_RESULTS (the chapter's results file) where they are not the defaults.
"""
import glob
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from scipy.optimize import linear_sum_assignment

torch.set_num_threads(1)
torch.manual_seed(0)
DATA = os.environ.get("MERGELAB_DATA_DIR", "data")
RESULTS = os.environ.get("MERGELAB_RESULTS", "reports/results/06_cycle_consistent_merging.json")
SEEDS = (0, 1, 2)   # notebook: seed = 0, model i from seed + i; the main comparison merges models 0,1,2
H = 3               # hidden layers: layers.0 .. layers.2 ; layers.3 is the classifier (never repaired)

# ---------------------------------------------------------------- data (own split, same recipe as the package)
d = load_digits()
X = (d.images / 16.0).astype(np.float32)
Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
Xtr, Xte = torch.from_numpy(Xtr).flatten(1), torch.from_numpy(Xte).flatten(1)
ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
# no test leakage: no test image is identical to a training image *by index*; (digits has a few exact
# duplicate images across rows, counted here for information)
dup = sum(bool((Xtr == x).all(1).any()) for x in Xte)
print(f"split: train {len(Xtr)}, test {len(Xte)}; test images with an exact duplicate in train: {dup}")

# ---------------------------------------------------------------- which cache files are seeds 0,1,2 of the recipe
recipe = {"arch": "mlp", "batch_size": 64, "epochs": 40, "lr": 0.001, "optimizer": "adam", "warmup_epochs": 0,
          "weight_decay": 0.0, "widths": [256, 256, 256]}
by_seed = {}
for f in glob.glob(f"{DATA}/scratch/mlp-*.json"):
    meta = json.load(open(f))
    c = meta["config"]
    if all(c[k] == v for k, v in recipe.items()) and meta["data"] == {"dataset": "sklearn-digits", "split_seed": 0,
                                                                       "test_fraction": 0.25}:
        by_seed[c["seed"]] = f[:-5] + ".safetensors"
try:  # cross-check with the package's own cache-key function (no training happens here)
    from mergelab.experiments.ch06_models import digits_data
    from mergelab.training.scratch import ScratchConfig, scratch_artifact
    split, key = digits_data({"test_fraction": 0.25, "split_seed": 0})
    for s in SEEDS:
        cfg = ScratchConfig(arch="mlp", widths=(256, 256, 256), epochs=40, batch_size=64, lr=1e-3,
                            optimizer="adam", weight_decay=0.0, warmup_epochs=0, seed=s)
        art = scratch_artifact(cfg, key)
        assert art.exists() and str(art.path) == by_seed[s], (s, art.path, by_seed.get(s))
    assert torch.equal(split.X_train.flatten(1), Xtr) and torch.equal(split.X_test.flatten(1), Xte)
    assert torch.equal(split.y_train, ytr) and torch.equal(split.y_test, yte)
    print("package cache keys and split agree with ours (cached models are loaded, nothing retrained)")
except ImportError:
    print("mergelab not importable: cross-check skipped")
states = [{k: v.double() for k, v in load_file(by_seed[s]).items()} for s in SEEDS]


# ---------------------------------------------------------------- plain forward
def forward(st, x, upto=None):
    """Logits; with ``upto`` = i, also the list of pre-activations z_0..z_i of the hidden layers."""
    h, zs = x.double(), []
    for i in range(H):
        z = h @ st[f"layers.{i}.weight"].T + st[f"layers.{i}.bias"]
        zs.append(z)
        h = torch.relu(z)
    return h @ st[f"layers.{H}.weight"].T + st[f"layers.{H}.bias"], zs


def acc(st, x=Xte, y=yte):
    return float((forward(st, x)[0].argmax(1) == y).double().mean())


def stats(st, x, i):
    z = forward(st, x)[1][i]
    return z.mean(0), z.std(0, unbiased=False)


def average(sts):
    return {k: sum(s[k] for s in sts) / len(sts) for k in sts[0]}


def my_repair(merged, ends, x, layers=range(H), fix_std=True, fix_mean=True):
    """REPAIR by unit index (naive merge = identity frame), layer by layer, re-measuring the merged model."""
    m = {k: v.clone() for k, v in merged.items()}
    for i in layers:
        goals = [stats(e, x, i) for e in ends]
        mu_g = torch.stack([g[0] for g in goals]).mean(0)
        sd_g = torch.stack([g[1] for g in goals]).mean(0)
        mu, sd = stats(m, x, i)
        a = sd_g / sd.clamp_min(1e-8) if fix_std else torch.ones_like(sd)
        b = (mu_g - a * mu) if fix_mean else torch.zeros_like(mu)
        m[f"layers.{i}.weight"] = m[f"layers.{i}.weight"] * a[:, None]
        m[f"layers.{i}.bias"] = m[f"layers.{i}.bias"] * a + b
    return m


def random_perm(st, g):
    """The same function with every hidden layer's units randomly permuted."""
    out = {k: v.clone() for k, v in st.items()}
    prev = None
    for i in range(H + 1):
        W, b = out[f"layers.{i}.weight"], out[f"layers.{i}.bias"]
        if prev is not None:
            W = W[:, prev]
        if i < H:
            p = torch.randperm(W.shape[0], generator=g)
            W, b, prev = W[p], b[p], p
        out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = W, b
    return out


naive = average(states)
rows = {}
for i, s in enumerate(states):
    rows[f"endpoint_{i} (seed {SEEDS[i]})"] = acc(s)
rows["ensemble (mean of the 3 logits)"] = float((sum(forward(s, Xte)[0] for s in states).argmax(1) == yte).double().mean())
rows["naive average"] = acc(naive)
rep = my_repair(naive, states, Xtr)
rows["naive + REPAIR (train stats, layers 0,1,2)"] = acc(rep)
rows["naive + REPAIR (TEST stats, layers 0,1,2)"] = acc(my_repair(naive, states, Xte))
rows["naive + REPAIR layer 0 only"] = acc(my_repair(naive, states, Xtr, layers=[0]))
rows["naive + REPAIR layers 0,1"] = acc(my_repair(naive, states, Xtr, layers=[0, 1]))
rows["naive + REPAIR layer 1 only"] = acc(my_repair(naive, states, Xtr, layers=[1]))
rows["naive + REPAIR layer 2 only"] = acc(my_repair(naive, states, Xtr, layers=[2]))
rows["naive + REPAIR std only (train)"] = acc(my_repair(naive, states, Xtr, fix_mean=False))
rows["naive + REPAIR mean only (train)"] = acc(my_repair(naive, states, Xtr, fix_std=False))
# control: scramble B's and C's units (same functions) before averaging: if .936 needed some accidental
# correspondence of unit i across seeds, this would drop
g = torch.Generator().manual_seed(1)
scr = [states[0]] + [random_perm(s, g) for s in states[1:]]
assert all(torch.allclose(forward(a, Xte)[0], forward(b, Xte)[0], atol=1e-8) for a, b in zip(states, scr))
rows["control: B,C randomly permuted, naive"] = acc(average(scr))
rows["control: B,C randomly permuted, naive + REPAIR"] = acc(my_repair(average(scr), scr, Xtr))
# what the train accuracy of the repaired naive merge is
rows["naive + REPAIR: TRAIN accuracy"] = acc(rep, Xtr, ytr)

# ---------------------------------------------------------------- the package's numbers
res = json.load(open(RESULTS))["architectures"]["mlp"]
meth = res["methods"]
pkg = {"endpoint_0 (seed 0)": meth["endpoint_0"]["accuracy"], "endpoint_1 (seed 1)": meth["endpoint_1"]["accuracy"],
       "endpoint_2 (seed 2)": meth["endpoint_2"]["accuracy"], "naive average": meth["naive"]["accuracy"],
       "naive + REPAIR (train stats, layers 0,1,2)": meth["naive_repair"]["accuracy"]}
print(f"\n{'':50s} {'ours':>7s} {'package':>8s}")
for k, v in rows.items():
    print(f"{k:50s} {v:7.4f} {pkg[k]:8.4f}" if k in pkg else f"{k:50s} {v:7.4f}")
print("package per-set entries:", res.get("merge_sets", {}).get("per_set"))

# the package's cached naive_repair state (main comparison) against ours, weight by weight
for f in sorted(glob.glob(f"{DATA}/merges/mlp-*.safetensors")):
    t = load_file(f)
    if "state/naive_repair/layers.0.weight" in t:
        pk = {k.split("/", 2)[2]: v.double() for k, v in t.items() if k.startswith("state/naive_repair/")}
        pn = {k.split("/", 2)[2]: v.double() for k, v in t.items() if k.startswith("state/naive/")}
        print(f"cached merge {os.path.basename(f)}: max |naive_pkg - naive_ours| = "
              f"{max(float((pn[k] - naive[k]).abs().max()) for k in naive):.2e}, max |repair_pkg - repair_ours| = "
              f"{max(float((pk[k] - rep[k]).abs().max()) for k in rep):.2e}, acc of cached naive_repair = {acc(pk):.4f}")

# ---------------------------------------------------------------- why does it work?
print("\n--- explanation measurements (training inputs) ---")
flat = lambda s: torch.cat([v.flatten() for v in s.values()])
for a, b in ((0, 1), (0, 2), (1, 2)):
    ta, tb = flat(states[a]), flat(states[b])
    print(f"||theta_{a} - theta_{b}|| / ||theta_{a}|| = {float((ta - tb).norm() / ta.norm()):.3f}")
W = [s["layers.0.weight"] for s in states]
cos = torch.nn.functional.cosine_similarity(W[0], W[1], dim=1)
print(f"layer-0 rows, cos(W_A[i], W_B[i]) same index: mean {cos.mean():.3f}, |cos| mean {cos.abs().mean():.3f}, "
      f"max {cos.max():.3f}")

# distance from init (torch.manual_seed(seed) then nn.Linear init, as the package's new_model does)
from torch import nn
for s_i, s in zip(SEEDS, states):
    torch.manual_seed(s_i)
    dims = [64, 256, 256, 256, 10]
    init = {}
    for i, (p, q) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(p, q)
        init[f"layers.{i}.weight"], init[f"layers.{i}.bias"] = lin.weight.double(), lin.bias.double()
    per = {i: float((s[f"layers.{i}.weight"] - init[f"layers.{i}.weight"]).norm() / init[f"layers.{i}.weight"].norm())
           for i in range(H + 1)}
    print(f"seed {s_i}: ||W_i - W_i(init)|| / ||W_i(init)|| per layer: " + ", ".join(f"{v:.2f}" for v in per.values()))


def corr_matrix(za, zb):
    za = (za - za.mean(0)) / za.std(0).clamp_min(1e-12)
    zb = (zb - zb.mean(0)) / zb.std(0).clamp_min(1e-12)
    return za.T @ zb / len(za)


zA = forward(states[0], Xtr)[1]
zB = forward(states[1], Xtr)[1]
zn = forward(naive, Xtr)[1]
zr = forward(rep, Xtr)[1]
zend = [forward(s, Xtr)[1] for s in states]
print("per hidden layer (pre-activations z):")
for i in range(H):
    C = corr_matrix(zA[i], zB[i])
    r, c = linear_sum_assignment(-C.numpy())
    same = torch.diagonal(C)
    goal_sd = torch.stack([z[i].std(0, unbiased=False) for z in zend]).mean(0)
    ratio = zn[i].std(0, unbiased=False) / goal_sd
    # how much of each endpoint's unit i the merged (repaired) unit i carries
    cmr = torch.stack([torch.diagonal(corr_matrix(zr[i], z[i])) for z in zend]).mean(0)
    cmn = torch.stack([torch.diagonal(corr_matrix(zn[i], z[i])) for z in zend]).mean(0)
    print(f" layer {i}: corr(A_i, B_i) same index mean {same.mean():+.3f} (|.| {same.abs().mean():.3f}); "
          f"best-matched mean {C.numpy()[r, c].mean():.3f}; naive sd / goal sd: mean {ratio.mean():.3f} "
          f"(median {ratio.median():.3f}); corr(merged_i, endpoint_i) naive {cmn.mean():.3f} repaired {cmr.mean():.3f}")

# is the repaired merge behaving like an ensemble? agreement of predictions and logit correlation
ens = sum(forward(s, Xte)[0] for s in states) / 3
lr_ = forward(rep, Xte)[0]
print(f"test: repaired-naive predictions agree with the ensemble on {float((lr_.argmax(1) == ens.argmax(1)).double().mean()):.3f}; "
      f"corr(logits) = {float(torch.corrcoef(torch.stack([lr_.flatten(), ens.flatten()]))[0, 1]):.3f}")
for i, s in enumerate(states):
    lo = forward(s, Xte)[0]
    print(f"  corr(repaired logits, endpoint {i} logits) = {float(torch.corrcoef(torch.stack([lr_.flatten(), lo.flatten()]))[0, 1]):.3f}")

# how the readout's signal decomposes: logits of the repaired merge vs (1/3) sum_m W3_m h_m (each endpoint's
# own last hidden layer through its own readout)
print("superposition: merged last hidden h vs each endpoint's: corr of post-ReLU units by index:",
      ", ".join(f"{float(torch.diagonal(corr_matrix(torch.relu(zr[2]), torch.relu(z[2]))).nanmean()):.3f}" for z in zend))

# linear probe on the (unrepaired) naive average's last hidden layer: is the information there?
from sklearn.linear_model import LogisticRegression
for name, st in (("naive", naive), ("naive+REPAIR", rep)):
    htr = torch.relu(forward(st, Xtr)[1][2]).numpy()
    hte = torch.relu(forward(st, Xte)[1][2]).numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(htr, ytr.numpy())
    print(f"linear probe on {name}'s last hidden layer: test acc {clf.score(hte, yte.numpy()):.4f}")
# random-feature baseline: an untrained MLP of the same shape (seed 0 init), probe on its last hidden layer
torch.manual_seed(123)
rnd = {}
for i, (p, q) in enumerate(zip([64, 256, 256, 256], [256, 256, 256, 10])):
    lin = nn.Linear(p, q)
    rnd[f"layers.{i}.weight"], rnd[f"layers.{i}.bias"] = lin.weight.detach().double(), lin.bias.detach().double()
htr = torch.relu(forward(rnd, Xtr)[1][2]).numpy()
hte = torch.relu(forward(rnd, Xte)[1][2]).numpy()
clf = LogisticRegression(max_iter=2000, C=1.0).fit(htr, ytr.numpy())
print(f"linear probe on an UNTRAINED random MLP's last hidden layer: test acc {clf.score(hte, yte.numpy()):.4f}")
