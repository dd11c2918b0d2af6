"""Scratch experiment: build a tiny benchmark variant and measure the issue-16 diagnostics.

usage: python scratch/exp.py '{"pre_steps": 1500, ...}'   (json overrides of CFG below)
"""
import hashlib, json, math, os, sys, time
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
import pretext2 as P
import mergelab
from mergelab.benchmark import TinyBenchmark, TinyBenchmarkConfig, normalize_images
from mergelab.models import TinyViTConfig, build_tiny_encoder, ClassificationHead, encode, load_encoder_state
from mergelab.training import FinetuneConfig, finetune, lr_at, batch_stream
from mergelab.task_vectors import task_vectors_from, TaskVector
from mergelab.merging import merge
from mergelab.tinydata import TASKS

CFG = dict(n_pretext=20000, pre_steps=1500, pre_bs=128, pre_lr=2e-3, pre_wd=0.05, pre_warm=100,
           width=64, layers=4, heads=4, patch=8, out=64, pretext="v2",
           head="canonical", centre="none", scale=30.0,
           ft_lr=2e-4, ft_wd=0.1, ft_steps=300, ft_bs=64, ft_warm=30, seeds=[0], stage="all",
           tasks=list(TASKS))
CFG.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
C = CFG
tasks = C["tasks"]
CACHE = os.path.join(os.path.dirname(__file__), "cache"); os.makedirs(CACHE, exist_ok=True)
def h(d): return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
log = {"cfg": C}
def say(*a):
    print(*a, flush=True)

# ---------------------------------------------------------------- pretext
pkey = h({"n": C["n_pretext"], "v": C["pretext"], "gen": 2})
ppath = f"{CACHE}/pretext-{pkey}.npz"
if os.path.exists(ppath):
    f = np.load(ppath); PX = f["X"]; PT = {k[2:]: f[k] for k in f.files if k.startswith("t_")}
else:
    t = time.time(); PX, PT = P.draw_pretext(np.random.default_rng([0, 999]), C["n_pretext"], 0.08)
    say("pretext generated", time.time() - t); np.savez(ppath, X=PX, **{"t_" + k: v for k, v in PT.items()})
REG = ["count", "x", "y", "logr", "hue_c", "hue_s", "val", "or_c", "or_s", "nv", "hole", "tex_c", "tex_s", "tex_p", "bg_c", "bg_s", "bg_v"]
R = np.stack([PT[k] for k in REG], 1); mu, sd = np.nanmean(R, 0), np.nanstd(R, 0) + 1e-6
R = torch.from_numpy((R - mu) / sd).float(); S = torch.from_numpy(PT["strokes"]).float()
K = torch.from_numpy(PT["kind"]); TX = torch.from_numpy(PT["texture"]); PXt = torch.from_numpy(PX)

mcfg = TinyViTConfig(width=C["width"], layers=C["layers"], heads=C["heads"], patch_size=C["patch"], output_dim=C["out"])
ekey = h({k: C[k] for k in ("n_pretext", "pre_steps", "pre_bs", "pre_lr", "pre_wd", "pre_warm", "width", "layers", "heads", "patch", "out", "pretext")} | {"gen": 2})
epath = f"{CACHE}/enc-{ekey}.pt"
if os.path.exists(epath):
    pre, plog = torch.load(epath)
else:
    torch.manual_seed(0)
    enc = build_tiny_encoder(mcfg).train()
    lin = nn.Linear(C["out"], len(P.KINDS) + len(P.TEXTURES) + len(REG) + P.N_SEG)
    params = list(enc.parameters()) + list(lin.parameters())
    opt = torch.optim.AdamW(params, lr=C["pre_lr"], weight_decay=C["pre_wd"])
    sched = FinetuneConfig(lr=C["pre_lr"], num_steps=C["pre_steps"], warmup_steps=C["pre_warm"], schedule="cosine")
    stream = batch_stream(len(PX), C["pre_bs"], 0)
    t0 = time.time(); losses = []
    for step in range(C["pre_steps"]):
        for g in opt.param_groups: g["lr"] = lr_at(step, sched)
        idx = stream()
        z = lin(enc(normalize_images(PXt[idx])))
        a, b, c = len(P.KINDS), len(P.TEXTURES), len(REG)
        lk = F.cross_entropy(z[:, :a], K[idx], ignore_index=-100)
        lt = F.cross_entropy(z[:, a:a + b], TX[idx])
        r, m = R[idx], ~torch.isnan(R[idx])
        lr_ = ((z[:, a + b:a + b + c] - torch.nan_to_num(r)) ** 2 * m).sum() / m.sum()
        s, ms = S[idx], ~torch.isnan(S[idx])
        ls = (F.binary_cross_entropy_with_logits(z[:, a + b + c:], torch.nan_to_num(s), reduction="none") * ms).sum() / ms.sum().clamp_min(1) * 4
        loss = lk + lt + lr_ * 2 + ls
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        losses.append([float(loss.detach()), float(lk), float(lt), float(lr_), float(ls)])
        if step % 100 == 0: say(step, np.round(np.mean(losses[-100:], 0), 3), f"{time.time() - t0:.0f}s")
    plog = {"losses": losses[::10], "time": time.time() - t0, "final": np.mean(losses[-100:], 0).tolist()}
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    torch.save((pre, plog), epath)
say("pretrain", plog["time"], plog["final"])
log["pretrain"] = {"time_s": plog["time"], "final_loss": plog["final"]}

bench = TinyBenchmark(TinyBenchmarkConfig(model=mcfg, tasks=tuple(tasks)), device="cpu", progress=False)
enc = bench.new_encoder(pre).eval()
def feats(X): return F.normalize(encode(enc, X), dim=-1)

# ---------------------------------------------------------------- linear probe
from sklearn.linear_model import LogisticRegression
lp = {}
for t in tasks:
    Xtr, ytr = bench.split(t, "train"); Xte, yte = bench.split(t, "test")
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(feats(Xtr).numpy(), ytr.numpy())
    lp[t] = round(float(clf.score(feats(Xte).numpy(), yte.numpy())), 3)
say("linear probe", lp, "mean", round(np.mean(list(lp.values())), 3))
log["linear_probe"] = lp
if C["stage"] == "probe":
    json.dump(log, open(f"{CACHE}/log-{h(C)}.json", "w"), indent=1); sys.exit()

# ---------------------------------------------------------------- heads
pre_mean = F.normalize(encode(enc, normalize_images(PXt[:4000])), dim=-1).mean(0)
heads = {}
for t in tasks:
    if C["head"] == "canonical":
        Xc = torch.from_numpy(P.canonical(t)); Cn, V = Xc.shape[:2]
        f = feats(normalize_images(Xc.reshape(Cn * V, 3, 32, 32))).reshape(Cn, V, -1).mean(1)
    else:  # few-shot in-domain prototypes
        X, y = bench.split(t, "train"); g = torch.Generator().manual_seed(0); order = torch.randperm(len(y), generator=g)
        f = torch.stack([feats(X[order[y[order] == c][:8]]).mean(0) for c in range(int(y.max()) + 1)])
    if C["centre"] == "classes": f = f - f.mean(0, keepdim=True)
    heads[t] = ClassificationHead(f, C["scale"])
bench._heads = heads
bench.heads  # noqa
def zs_stats(state, split):
    out = {}
    e = bench.new_encoder(state).eval()
    with torch.no_grad():
        for t in tasks:
            X, y = bench.split(t, split); lg = heads[t](e(X)); p = lg.softmax(-1)
            out[t] = dict(acc=round(float((lg.argmax(-1) == y).float().mean()), 3), ce=round(float(F.cross_entropy(lg, y)), 2),
                          conf=round(float(p.max(-1).values.mean()), 2))
    return out
zs = zs_stats(pre, "test")
say("zero-shot test", zs)
say("zero-shot mean acc", round(np.mean([v["acc"] for v in zs.values()]), 3), "ce", round(np.mean([v["ce"] for v in zs.values()]), 2),
    "conf", round(np.mean([v["conf"] for v in zs.values()]), 2))
log["zero_shot_test"] = zs
if C["stage"] == "heads":
    json.dump(log, open(f"{CACHE}/log-{h(C)}.json", "w"), indent=1); sys.exit()

# ---------------------------------------------------------------- experts and merges
def ev(state, split="test", ts=None): return bench.evaluate(state, split, ts or tasks)
def mean(d): return float(np.mean(list(d.values())))
from mergelab.tsv import layer_kind, tsv_compress, tsv_reconstruct
results = []
for seed in C["seeds"]:
    fcfg = FinetuneConfig(optimizer="adamw", lr=C["ft_lr"], weight_decay=C["ft_wd"], batch_size=C["ft_bs"], num_steps=C["ft_steps"],
                          schedule="cosine", warmup_steps=C["ft_warm"], seed=seed)
    experts, times = {}, {}
    for t in tasks:
        e = bench.new_encoder(pre); t0 = time.time()
        hist = finetune(e, {t: bench.split(t, "train")}, {t: heads[t]}, fcfg, progress=False)
        times[t] = time.time() - t0
        experts[t] = {k: v.detach().clone() for k, v in e.state_dict().items()}
    say("expert time per task (s)", {t: round(v, 1) for t, v in times.items()})
    tvs = task_vectors_from(pre, experts)
    exp_test = {t: ev(experts[t], "test", [t])[t] for t in tasks}
    exp_val = {t: ev(experts[t], "val", [t])[t] for t in tasks}
    zs_val = ev(pre, "val"); zs_test = ev(pre, "test")
    say(f"seed {seed} experts test", {t: round(v, 3) for t, v in exp_test.items()}, "mean", round(mean(exp_test), 3))
    # relative norms by kind
    pn = math.sqrt(sum(float((v.double() ** 2).sum()) for v in pre.values() if v.is_floating_point()))
    kinds = {}
    for k, v in pre.items():
        if v.is_floating_point(): kinds.setdefault(layer_kind(k, v.shape), []).append(k)
    rel = {t: round(tvs[t].norm() / pn, 4) for t in tasks}
    relk = {kd: round(float(np.mean([math.sqrt(sum(float((tvs[t][k].double() ** 2).sum()) for k in ks)) /
                                     max(1e-12, math.sqrt(sum(float((pre[k].double() ** 2).sum()) for k in ks))) for t in tasks])), 4)
            for kd, ks in kinds.items()}
    say("rel norm", rel, relk)
    # own-task curve on val
    own = {t: {a: round(ev(tvs[t].apply_to(pre, a), "val", [t])[t], 3) for a in (0.1, 0.3, 0.5, 1.0)} for t in tasks}
    gain03 = {t: round((own[t][0.3] - zs_val[t]) / max(1e-9, exp_val[t] - zs_val[t]), 2) for t in tasks}
    say("own-task gain fraction at 0.3", gain03)
    # cross-task at 0.3 (val)
    cross = {}
    for s in tasks:
        acc = ev(tvs[s].apply_to(pre, 0.3), "val")
        cross[s] = {t: round(acc[t] - zs_val[t], 3) for t in tasks if t != s}
    offd = [v for s in cross for v in cross[s].values()]
    say("cross-task 0.3: mean", round(np.mean(offd), 3), "min", round(min(offd), 3))
    # TA sweep on val, normalized
    def norm(d, ref): return float(np.mean([d[t] / ref[t] for t in tasks]))
    tvl = [tvs[t] for t in tasks]
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
    ta_val = {a: norm(ev(merge("task_arithmetic", pre, tvl, coefficient=a) if a > 0 else pre, "val"), exp_val) for a in grid}
    a_ta = max(ta_val, key=ta_val.get)
    ta_test = ev(merge("task_arithmetic", pre, tvl, coefficient=a_ta) if a_ta > 0 else pre)
    wa_test = ev(merge("weight_averaging", pre, tvl))
    upd = mergelab.tsv.tsv_update(tvl, device="cpu")
    def tsv_at(a): return {k: (pre[k] + a * upd[k].to(pre[k].dtype)) if k in upd else pre[k] for k in pre}
    tgrid = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0]
    tsv_val = {a: norm(ev(tsv_at(a), "val"), exp_val) for a in tgrid}
    a_tsv = max(tsv_val, key=tsv_val.get)
    tsv_test = ev(tsv_at(a_tsv))
    tsvc = {t: ev(tsv_reconstruct(tsv_compress(tvs[t], num_tasks=len(tasks))).apply_to(pre, 1.0), "test", [t])[t] for t in tasks}
    r = dict(seed=seed, experts=mean(exp_test), zero_shot=mean(zs_test), ta=mean(ta_test), ta_alpha=a_ta, ta_norm=norm(ta_test, exp_test),
             wa=mean(wa_test), tsv=mean(tsv_test), tsv_alpha=a_tsv, tsvc_norm=norm(tsvc, exp_test), ta_val_curve={str(k): round(v, 3) for k, v in ta_val.items()},
             tsv_val_curve={str(k): round(v, 3) for k, v in tsv_val.items()}, rel=rel, relk=relk, gain03=gain03, cross_mean=float(np.mean(offd)),
             cross_min=float(min(offd)), expert_time=float(np.mean(list(times.values()))), exp_test=exp_test, ta_test=ta_test)
    say(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("rel", "exp_test", "ta_test")}))
    results.append(r)
log["results"] = results
keys = ["experts", "zero_shot", "ta", "ta_norm", "wa", "tsv", "tsvc_norm"]
log["summary"] = {k: [round(float(np.mean([r[k] for r in results])), 3), round(float(np.std([r[k] for r in results])), 3)] for k in keys}
say("SUMMARY", log["summary"], "lp/exp", round(np.mean(list(lp.values())) / log["summary"]["experts"][0], 3))
json.dump(log, open(f"{CACHE}/log-{h(C)}.json", "w"), indent=1)
