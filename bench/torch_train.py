"""The training step of mtlz-retrain in PyTorch, for a side-by-side speed
comparison (bench/train_vs_torch.sh): the same model (loaded from the same
safetensors file), batch of random spectra with labels as `mtlz bench
--train` makes them, focal loss (alpha 0.25, gamma 2) + masked MAE, backward,
Adam at 1e-3, dropout active.

    /usr/bin/python3 bench/torch_train.py --model M.safetensors \
        [--threads 1,2] [--batch 128] [--seconds 10] [--device cpu|cuda]

With --device cuda the batch lives on the GPU and every step is
synchronised (cuDNN with PyTorch's default TF32 for convolutions).

Prints one line per thread count:
    torch train device=D threads=T batch=B: X.X spectra/s, Y.YYYY s/step, Z s per epoch of 60000
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
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model, _ = load_model(a.model)
    model = model.to(dev)
    model.train()
    L = model.arch["input_length"]
    g = torch.Generator().manual_seed(1)
    x = 0.5 + torch.rand(a.batch, 1, L, generator=g)
    cls = torch.arange(a.batch) % 4
    sf = cls == 1
    oh = 8.5 + 0.3 * torch.rand(a.batch, generator=g)
    x, cls, sf, oh = x.to(dev), cls.to(dev), sf.to(dev), oh.to(dev)
    print(f"torch version={torch.__version__} mkldnn={torch.backends.mkldnn.is_available()} "
          f"device={a.device}")
    for t in (int(v) for v in a.threads.split(",")):
        torch.set_num_threads(t)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            step(model, opt, x, cls, oh, sf)   # warm-up
        sync()
        n, t0 = 0, time.perf_counter()
        while True:
            step(model, opt, x, cls, oh, sf)
            sync()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= a.seconds:
                break
        print(f"torch train device={a.device} threads={t} batch={a.batch}: "
              f"{n * a.batch / dt:.1f} spectra/s, {dt / n:.4f} s/step, "
              f"{60000 / (n * a.batch / dt):.1f} s per epoch of 60000", flush=True)


if __name__ == "__main__":
    main()
