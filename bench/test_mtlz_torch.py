"""Self-check of bench/mtlz_torch.py (plain asserts, no pytest).

    /usr/bin/python3 bench/test_mtlz_torch.py

Checks: state_dict names/shapes for the default arch, save -> load_model
round trip gives identical outputs, and a hand-made safetensors file
(metadata, dtypes, offsets) is read correctly and survives a rewrite.
"""
import json
import os
import struct
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mtlz_torch import (DEFAULT_ARCH, MTLforGalSpecZ, load_model,  # noqa: E402
                        load_safetensors, predict, save_safetensors)


def expected_shapes(arch):
    ch, k, cin, out = arch["channels"], arch["kernel"], 1, {}
    for b, c in enumerate(ch):
        out[f"backbone.blocks.{b}.conv1.weight"] = (c, cin, k)
        out[f"backbone.blocks.{b}.conv1.bias"] = (c,)
        out[f"backbone.blocks.{b}.conv2.weight"] = (c, c, k)
        out[f"backbone.blocks.{b}.conv2.bias"] = (c,)
        cin = c
    h = cin // arch["attention_reduction"]
    out["attention.squeeze.weight"] = (h, cin, 1)
    out["attention.squeeze.bias"] = (h,)
    out["attention.excite.weight"] = (cin, h, 1)
    out["attention.excite.bias"] = (cin,)
    for head, n_out in (("class", arch["n_classes"]), ("metal", 1)):
        sizes = [cin] + arch["head_hidden"] + [n_out]
        for i in range(len(sizes) - 1):
            out[f"heads.{head}.fc{i + 1}.weight"] = (sizes[i + 1], sizes[i])
            out[f"heads.{head}.fc{i + 1}.bias"] = (sizes[i + 1],)
    return out


def test_state_dict_layout():
    sd = MTLforGalSpecZ(DEFAULT_ARCH).state_dict()
    exp = expected_shapes(DEFAULT_ARCH)
    assert set(sd) == set(exp), set(sd) ^ set(exp)
    for k, shape in exp.items():
        assert tuple(sd[k].shape) == shape, (k, sd[k].shape, shape)
    assert len(sd) == 5 * 4 + 4 + 2 * 6
    assert tuple(sd["attention.squeeze.weight"].shape) == (16, 256, 1)
    assert tuple(sd["attention.excite.weight"].shape) == (256, 16, 1)


def test_model_round_trip(tmp):
    torch.manual_seed(1)
    model = MTLforGalSpecZ(DEFAULT_ARCH).eval()
    meta = {"mtlz.format_version": "1", "mtlz.arch": json.dumps(DEFAULT_ARCH),
            "mtlz.grid": "3840,9000,1",
            "mtlz.classes": "passive,star_forming,composite,agn",
            "mtlz.target": json.dumps({"offset": 8.5, "scale": 0.25})}
    path = os.path.join(tmp, "m.safetensors")
    save_safetensors(path, model.state_dict(), meta)
    model2, meta2 = load_model(path)
    assert meta2 == meta
    assert not model2.training
    x = (1 + 0.1 * torch.randn(3, 1, DEFAULT_ARCH["input_length"])).numpy()[:, 0]
    p1, m1 = predict(model, meta, x)
    p2, m2 = predict(model2, meta2, x)
    assert np.array_equal(p1, p2) and np.array_equal(m1, m2)
    assert p1.shape == (3, 4) and m1.shape == (3,)
    assert np.allclose(p1.sum(1), 1, atol=1e-6)
    with torch.inference_mode():
        _, raw = model(torch.from_numpy(x).unsqueeze(1))
    assert np.allclose(m1, raw.numpy() * 0.25 + 8.5)


def test_hand_made_file(tmp):
    a = np.arange(6, dtype="<f4").reshape(2, 3) - 2.5
    b = np.array([7, -1], dtype="<i8")
    header = {"__metadata__": {"k": "v"},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "s": {"dtype": "F32", "shape": [], "data_offsets": [40, 44]}}
    hj = json.dumps(header).encode()
    path = os.path.join(tmp, "hand.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj + a.tobytes() + b.tobytes()
                + np.float32(3.5).tobytes())
    t, meta = load_safetensors(path)
    assert meta == {"k": "v"} and set(t) == {"a", "b", "s"}
    assert t["a"].dtype == np.float32 and np.array_equal(t["a"], a)
    assert t["b"].dtype == np.int64 and np.array_equal(t["b"], b)
    assert t["s"].shape == () and t["s"] == 3.5
    path2 = os.path.join(tmp, "hand2.safetensors")
    save_safetensors(path2, t, meta)
    with open(path2, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert n % 8 == 0
    t2, meta2 = load_safetensors(path2)
    assert meta2 == meta and all(np.array_equal(t[k], t2[k]) for k in t)
    # a truncated file must raise, not return garbage
    with open(path, "rb") as f:
        raw = f.read()
    with open(path2, "wb") as f:
        f.write(raw[:-4])
    try:
        load_safetensors(path2)
    except ValueError:
        pass
    else:
        raise AssertionError("truncated file accepted")


if __name__ == "__main__":
    test_state_dict_layout()
    with tempfile.TemporaryDirectory() as tmp:
        test_model_round_trip(tmp)
        test_hand_made_file(tmp)
    print("test_mtlz_torch: all checks passed")
