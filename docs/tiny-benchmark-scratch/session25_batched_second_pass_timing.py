"""Session 25: MASS's second pass on chapter 04's first mixed test batch (tiny, one thread): one forward pass,
the per-set models (the package), and the scratch batched second pass (set by set low-rank products, "loop", or
batched products over per-row factors, "bmm"); then MASS's predict split into its parts. Run from the repository
root with MERGELAB_DATA_DIR set; argument: timing rounds."""
import time, cProfile, pstats, sys
import torch
import mergelab
from mergelab.params import profile_params
from mergelab.experiments import ch04_mass as ch04
from mergelab.task_vectors import task_vectors_from
from mergelab.notebook import setup
import importlib.util, pathlib
_spec = importlib.util.spec_from_file_location('msp', pathlib.Path(__file__).with_name('session25_batched_second_pass.py'))
msp = importlib.util.module_from_spec(_spec); sys.modules['msp'] = msp; _spec.loader.exec_module(msp)

P = profile_params("tiny", "04_mass_routing")
session = setup("04_mass_routing", dict(P))
bench = session.bench
pretrained = bench.pretrained_state()
experts = bench.experts(mergelab.FinetuneConfig.from_params(P["finetune"], seed=P["seed"]))
tvs = task_vectors_from(pretrained, experts)
compressed = ch04.compress_tasks(tvs, svd=P["svd"])
router = ch04.make_router(bench, pretrained, compressed, depth=P["depth"], routing_matrix=P["routing_matrix"],
                          threshold=P["threshold"], top_k=P["top_k"], cache_size=P["cache_size"])
images, _, _ = next(ch04.mixed_batches(bench, "test", list(tvs), P["batch_size"], P["seed"]))
merged = router.first_pass_model
torch.set_num_threads(1)
routing = router.route(images)
groups = {}
for i, k in enumerate(routing.keys): groups.setdefault(k, []).append(i)
idx = {k: torch.tensor(r) for k, r in groups.items()}
bsp = msp.BatchedSecondPass(router._module(router.pretrained))
updates = {k: msp.set_update([router.compressed[t] for t in k]) for k in groups}
models = {k: router.model_for(k) for k in groups}
def clock(fn):
    s = time.perf_counter(); fn(); return time.perf_counter() - s
res = {"forward": [], "per_set": [], "loop": [], "bmm": []}
with torch.no_grad():
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
        res["forward"].append(clock(lambda: merged(images)))
        res["per_set"].append(clock(lambda: [models[k](images[idx[k]]) for k in groups]))
        msp.GATHER_BYTES = 0
        res["loop"].append(clock(lambda: bsp(images, groups, updates)))
        msp.GATHER_BYTES = 64 * 2**20
        res["bmm"].append(clock(lambda: bsp(images, groups, updates)))
import statistics as st
f = st.median(res["forward"])
for k, v in res.items():
    print(f"{k:8s} median {st.median(v)*1e3:6.1f} ms  {st.median(v)/f:.2f}x  (min {min(v)*1e3:.1f})")
res2 = {"forward": [], "predict": [], "features": [], "route": [], "per_set": []}
with torch.no_grad():
    for r in range(10):
        res2["forward"].append(clock(lambda: merged(images)))
        res2["predict"].append(clock(lambda: router.predict(images)))
        res2["features"].append(clock(lambda: router.features(images)))
        feats = router.features(images)
        res2["route"].append(clock(lambda: router.route_features(feats)))
        res2["per_set"].append(clock(lambda: [models[k](images[idx[k]]) for k in groups]))
f = st.median(res2["forward"])
for k, v in res2.items():
    print(f"{k:8s} median {st.median(v)*1e3:6.1f} ms  {st.median(v)/f:.2f}x  (min {min(v)*1e3:.1f})")
pr = cProfile.Profile(); pr.enable()
with torch.no_grad():
    for _ in range(5): router.predict(images)
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(25)
