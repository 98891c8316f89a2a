"""Throughput/latency benchmark of the PyTorch mtlz model on CPU.

    /usr/bin/python3 bench/bench_torch.py --model M.safetensors \
        [--threads 1,2] [--batch 64] [--seconds 5] [--latency]

Prints to stdout, one line each (machine-parsable):
    torch version=V mkldnn=True|False
    torch threads=T batch=B: X.X spectra/s
    torch threads=T batch=1 latency: p50=X.XX ms p99=Y.YY ms   (--latency)
A pass is the whole model (both heads) plus the softmax.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mtlz_torch import load_model  # noqa: E402


def run(model, x):
    logits, metal = model(x)
    return torch.softmax(logits, dim=1), metal


def throughput(model, x, seconds):
    for _ in range(3):
        run(model, x)
    n, t0 = 0, time.perf_counter()
    while True:
        run(model, x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * x.shape[0] / dt


def latency(model, x1, seconds, min_calls=200):
    for _ in range(5):
        run(model, x1)
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run(model, x1)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return np.percentile(ms, 50), np.percentile(ms, 99)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", default="1", help="comma-separated list")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_interop_threads(1)
    print(f"torch version={torch.__version__} "
          f"mkldnn={torch.backends.mkldnn.is_available()}", flush=True)
    model, _ = load_model(a.model)
    L = model.arch["input_length"]
    g = torch.Generator().manual_seed(a.seed)
    x = 1.0 + 0.1 * torch.randn(a.batch, 1, L, generator=g)
    x1 = x[:1].clone()
    for t in (int(s) for s in a.threads.split(",") if s):
        torch.set_num_threads(t)
        with torch.inference_mode():
            sps = throughput(model, x, a.seconds)
            print(f"torch threads={t} batch={a.batch}: {sps:.1f} spectra/s", flush=True)
            if a.latency:
                p50, p99 = latency(model, x1, min(a.seconds, 2.0))
                print(f"torch threads={t} batch=1 latency: p50={p50:.2f} ms "
                      f"p99={p99:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
