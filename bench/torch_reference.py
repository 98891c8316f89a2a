"""Float64 PyTorch reference outputs for cross-checking the C implementation.

    /usr/bin/python3 bench/torch_reference.py --model M.safetensors \
        --input X.f32 --n N [--output out.json]

X.f32 holds N x L little-endian float32 spectra (L = arch input_length).
Writes JSON {"probs": [[C floats] x N], "metal": [N floats, metallicity
after mtlz.target scale/offset], "metal_raw": [N raw head outputs],
"features": [[C_feat floats] x N] (GAP features after attention)}.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mtlz_torch import load_model, target_transform  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--output")
    a = ap.parse_args()

    model, meta = load_model(a.model)
    model = model.double().eval()
    L = model.arch["input_length"]
    x = np.fromfile(a.input, dtype="<f4", count=a.n * L)
    if x.size != a.n * L:
        sys.exit(f"{a.input}: expected {a.n}x{L} floats, found {x.size}")
    xt = torch.from_numpy(x.astype(np.float64)).reshape(a.n, 1, L)
    with torch.inference_mode():
        feats = model.features(xt)
        logits = model.heads["class"](feats)
        metal = model.heads["metal"](feats).squeeze(1)
        probs = torch.softmax(logits, dim=1)
    off, scale = target_transform(meta)
    out = {"probs": probs.tolist(),
           "metal": (metal * scale + off).tolist(),
           "metal_raw": metal.tolist(),
           "features": feats.tolist()}
    text = json.dumps(out)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
