"""Side-by-side inference benchmark on one GPU: mtlz's CUDA engine (through
`mtlz bench --engine cuda`) against PyTorch running the same safetensors
model on the same device, at the same batch sizes, in one run.

    python3 bench/gpu_vs_torch.py --mtlz build/tools/mtlz --model M.safetensors \
        [--batch 1,8,64,512,4096] [--seconds 2] [--compile-budget 240]

PyTorch variants (its best is the reference, per batch size):
  eager     cuDNN with PyTorch's defaults (TF32 allowed for convolutions)
  graph     the eager model captured in a CUDA graph (torch.cuda.CUDAGraph)
  compile   torch.compile (default mode; max-autotune takes minutes per
            shape, more than a device call allows) + a CUDA graph
Every variant is timed the way the mtlz engine works: input from pinned
host memory, forward, softmax, outputs back to the host, synchronised; the
device-only rate (input already on the GPU, no copy back) is printed too.
Peaks: an 8192^3 fp32 and TF32 matmul through torch, measured here.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mtlz_torch import load_model  # noqa: E402

MFLOP = None


def peak(tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        ev0.record()
        a @ b
        ev1.record()
        ev1.synchronize()
        times.append(ev0.elapsed_time(ev1) / 1e3)
    torch.backends.cuda.matmul.allow_tf32 = False
    times.sort()
    return 2 * 8192 ** 3 / times[len(times) // 2] / 1e12


def timed(fn, seconds):
    """Median per-call seconds of fn() (which synchronises), after warm-up."""
    for _ in range(5):
        fn()
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(lat) < 20:
        c = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - c)
    lat.sort()
    return lat[len(lat) // 2]


def torch_variants(model, B, L, seconds, compile_ok):
    res = {}
    xh = torch.randn(B, 1, L).mul_(0.1).add_(1.0).pin_memory()
    xd = xh.cuda()
    out_p = torch.empty(B, 4).pin_memory()
    out_m = torch.empty(B).pin_memory()

    def fwd(x):
        logits, metal = model(x)
        return torch.softmax(logits, dim=1), metal

    def make_graph(f):
        static_x = xd.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                f(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = f(static_x)
        return g, static_x, static_out

    with torch.inference_mode():
        def eager_copy():
            p, m = fwd(xh.cuda(non_blocking=True))
            out_p.copy_(p, non_blocking=True)
            out_m.copy_(m, non_blocking=True)
            torch.cuda.synchronize()

        def eager_dev():
            fwd(xd)
            torch.cuda.synchronize()
        res["eager"] = (timed(eager_copy, seconds), timed(eager_dev, seconds))

        g, sx, so = make_graph(fwd)

        def graph_copy():
            sx.copy_(xh, non_blocking=True)
            g.replay()
            out_p.copy_(so[0], non_blocking=True)
            out_m.copy_(so[1], non_blocking=True)
            torch.cuda.synchronize()

        def graph_dev():
            g.replay()
            torch.cuda.synchronize()
        res["graph"] = (timed(graph_copy, seconds), timed(graph_dev, seconds))
        del g

        if compile_ok:
            t0 = time.perf_counter()
            torch._dynamo.reset()  # a fresh compile per batch size (no recompile limit)
            cm = torch.compile(model, dynamic=False)

            def cfwd(x):
                logits, metal = cm(x)
                return torch.softmax(logits, dim=1), metal
            cfwd(xd)
            torch.cuda.synchronize()
            ct = time.perf_counter() - t0
            g, sx, so = make_graph(cfwd)

            def cgraph_copy():
                sx.copy_(xh, non_blocking=True)
                g.replay()
                out_p.copy_(so[0], non_blocking=True)
                out_m.copy_(so[1], non_blocking=True)
                torch.cuda.synchronize()

            def cgraph_dev():
                g.replay()
                torch.cuda.synchronize()
            res["compile"] = (timed(cgraph_copy, seconds), timed(cgraph_dev, seconds), ct)
    return res


def mtlz_rate(binary, model, B, precision, mc, seconds):
    cmd = [binary, "bench", "--engine", "cuda", "--model", model, "--batch", str(B),
           "--mc", str(mc), "--seconds", str(seconds), "--no-preprocess", "--threads", "1",
           "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    m = re.search(r"p50_ms=([0-9.]+) p99_ms=([0-9.]+): ([0-9.]+) spectra/s", out.stdout)
    if not m:
        sys.stdout.write(out.stdout + out.stderr)
        return None
    print("  " + out.stdout.strip().splitlines()[-1], flush=True)
    return float(m.group(3)), float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mtlz", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,8,64,512,4096")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--mc", type=int, default=100, help="MC passes for the mtlz MC rows")
    ap.add_argument("--compile-budget", type=float, default=240.0,
                    help="stop compiling new batch sizes after this many seconds")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    model, meta = load_model(a.model)
    model = model.cuda().eval()
    L = 5161
    mflop = 110.7
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}, cudnn.allow_tf32="
          f"{torch.backends.cudnn.allow_tf32}", flush=True)
    p32, ptf = peak(False), peak(True)
    print(f"measured matmul peaks: fp32 {p32:.1f} TFLOP/s, tf32 {ptf:.1f} TFLOP/s", flush=True)

    rows = []
    spent = 0.0
    for B in batches:
        print(f"batch {B}:", flush=True)
        ours = mtlz_rate(a.mtlz, a.model, B, "fp32", 0, a.seconds)
        ours_tf = mtlz_rate(a.mtlz, a.model, B, "tf32", 0, a.seconds)
        ours_mc = mtlz_rate(a.mtlz, a.model, B, "fp32", a.mc, a.seconds) if B in (1, 64, 512) else None
        t = torch_variants(model, B, L, a.seconds, spent < a.compile_budget)
        if "compile" in t:
            spent += t["compile"][2]
        for k, v in t.items():
            extra = f" (compile {v[2]:.0f} s)" if len(v) > 2 else ""
            print(f"  torch {k:8s}: {B / v[0]:12.1f} spectra/s with copies, "
                  f"{B / v[1]:12.1f} device-only{extra}", flush=True)
        best_k = max(t, key=lambda k: B / t[k][0])
        best = B / t[best_k][0]
        rows.append((B, ours, ours_tf, ours_mc, best_k, best, t))

    print("\nSUMMARY (spectra/s, input from pinned host memory, outputs back, synchronised)")
    print(f"{'batch':>6} {'mtlz fp32':>11} {'mtlz tf32':>11} {'torch best':>11} {'(variant)':>9} "
          f"{'fp32/best':>9} {'tf32/best':>9} {'fp32 TF/s':>9} {'%fp32pk':>7} {'%tf32pk':>7} "
          f"{'mtlz mc=' + str(a.mc):>12}")
    for B, ours, ours_tf, ours_mc, bk, best, t in rows:
        r32 = ours[0] if ours else float("nan")
        rtf = ours_tf[0] if ours_tf else float("nan")
        tfs = r32 * mflop * 1e6 / 1e12
        print(f"{B:6d} {r32:11.1f} {rtf:11.1f} {best:11.1f} {bk:>9} {r32 / best:9.2f} "
              f"{rtf / best:9.2f} {tfs:9.2f} {100 * tfs / p32:6.1f}% {100 * tfs / ptf:6.1f}% "
              f"{(ours_mc[0] if ours_mc else float('nan')):12.1f}")


if __name__ == "__main__":
    main()
