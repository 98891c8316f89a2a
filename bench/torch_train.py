"""The training step of mtlz-retrain in PyTorch, for a side-by-side speed
comparison (bench/train_vs_torch.sh): the same model (loaded from the same
safetensors file), batch of random spectra with labels as `mtlz bench
--train` makes them, focal loss (alpha 0.25, gamma 2) + masked MAE, backward,
Adam at 1e-3, dropout active.

    /usr/bin/python3 bench/torch_train.py --model M.safetensors \
        [--threads 1,2] [--batch 128] [--seconds 10]

Prints one line per thread count:
    torch train threads=T batch=B: X.X spectra/s, Y.YYY s/step
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mtlz_torch import load_model  # noqa: E402


def step(model, opt, x, cls, oh, sf):
    logits, metal = model(x)
    logp = torch.log_softmax(logits, dim=1).gather(1, cls[:, None]).squeeze(1)
    pt = logp.exp()
    focal = (-0.25 * (1 - pt) ** 2 * logp).mean()
    mae = (metal[sf] - oh[sf]).abs().mean()
    loss = focal + mae
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    model, _ = load_model(a.model)
    model.train()
    L = model.arch["input_length"]
    g = torch.Generator().manual_seed(1)
    x = 0.5 + torch.rand(a.batch, 1, L, generator=g)
    cls = torch.arange(a.batch) % 4
    sf = cls == 1
    oh = 8.5 + 0.3 * torch.rand(a.batch, generator=g)
    print(f"torch version={torch.__version__} mkldnn={torch.backends.mkldnn.is_available()}")
    for t in (int(v) for v in a.threads.split(",")):
        torch.set_num_threads(t)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        step(model, opt, x, cls, oh, sf)   # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            step(model, opt, x, cls, oh, sf)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= a.seconds:
                break
        print(f"torch train threads={t} batch={a.batch}: {n * a.batch / dt:.1f} spectra/s, "
              f"{dt / n:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
