import time, sys, torch
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from mergelab.models import TinyViTConfig, build_tiny_encoder
for w, bs in [(64, 128), (64, 64), (96, 128), (96, 64)]:
    enc = build_tiny_encoder(TinyViTConfig(width=w, output_dim=w) if w != 64 else TinyViTConfig()); opt = torch.optim.AdamW(enc.parameters(), 1e-3)
    x = torch.randn(bs, 3, 32, 32); ts = []
    for i in range(12):
        t = time.process_time(); loss = enc(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step(); ts.append(time.process_time() - t)
    ts = sorted(ts[2:]); print(w, bs, "cpu s/step median", round(ts[len(ts)//2], 4), "min", round(ts[0], 4), flush=True)
