"""Session 26 of the tiny-benchmark design (session 46 of the project): one training step of chapter 06's ResNet
(widths 32, 64, one block, batch 64 of 1 x 8 x 8 inputs, SGD, one thread) by convolution backend, on random data.

MODE: `package` (oneDNN off, as `alignment.architectures.no_onednn` runs it: NNPACK forward), `nonnpack` (NNPACK off
too: torch's slow_conv2d), `mkldnn` (oneDNN on: not safe here, see `no_onednn`'s docstring), `mm` (each convolution
as `F.unfold` and one matrix product). Output of the session's runs: session26_resnet_conv_backends.txt.

usage: python docs/tiny-benchmark-scratch/session26_resnet_conv_backends.py MODE
"""
import contextlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mergelab.alignment import architectures as A

torch.set_num_threads(1)
mode = sys.argv[1]


@contextlib.contextmanager
def backend():
    with torch.backends.mkldnn.flags(enabled=(mode == "mkldnn")):
        with torch.backends.nnpack.flags(enabled=(mode != "nonnpack")):
            yield


def conv_mm(x, w, b, stride, padding):
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (B, C * kh * kw, Ho * Wo)
    out = torch.matmul(w.reshape(O, -1), cols)
    return (out if b is None else out + b[:, None]).reshape(B, O, Ho, Wo)


class MMConv(nn.Conv2d):
    def _conv_forward(self, x, w, b):
        return conv_mm(x, w, b, self.stride[0], self.padding[0])


A.no_onednn = backend  # the model's forward enters the same backend as the backward
torch.manual_seed(0)
m = A.ResNet(1, [32, 64], 1, 10)
if mode == "mm":
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.__class__ = MMConv
x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
opt = torch.optim.SGD(m.parameters(), lr=0.01)


def step():
    opt.zero_grad()
    with backend():
        loss = F.cross_entropy(m(x), y)
        loss.backward()
    opt.step()
    return float(loss.detach())


for _ in range(5):
    step()
t = time.perf_counter()
for _ in range(50):
    loss = step()
print(mode, "step ms", round((time.perf_counter() - t) / 50 * 1000, 1), "loss", round(loss, 4))
