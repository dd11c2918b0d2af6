"""Session 26 of the tiny-benchmark design (session 46 of the project): the cost of a training step and of an
evaluation batch of the tiny encoder at width 64 and width 96, one thread, random weights and images.

usage: python docs/tiny-benchmark-scratch/session26_width_step_cost.py (output: session26_width_step_cost.txt)
"""
import time, torch, torch.nn.functional as F, statistics
from mergelab.models import TinyViTConfig, build_tiny_encoder
torch.set_num_threads(1)
res = {}
for width in (64, 96, 64, 96):
    torch.manual_seed(0)
    enc = build_tiny_encoder(TinyViTConfig(width=width, output_dim=width))
    head = torch.nn.Linear(width, 10)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-4)
    x = torch.randn(64, 3, 32, 32); y = torch.randint(0, 10, (64,))
    def step():
        opt.zero_grad(); F.cross_entropy(head(enc(x)), y).backward(); opt.step()
    for _ in range(5): step()
    ts = []
    for _ in range(30):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    xe = torch.randn(256, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        for _ in range(3): enc(xe)
        te = []
        for _ in range(15):
            t = time.perf_counter(); enc(xe); te.append(time.perf_counter() - t)
    res.setdefault(width, []).append((statistics.median(ts) * 1e3, statistics.median(te) * 1e3))
for w, v in res.items():
    print(w, 'train step (batch 64) ms', [round(a, 1) for a, _ in v], 'eval 256 ms', [round(b, 1) for _, b in v])
