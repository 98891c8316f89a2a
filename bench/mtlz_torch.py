"""PyTorch reference of the mtlz model (paper "MTLforGalSpecZ") and a
numpy-only safetensors reader/writer, for benchmarking and cross-checking
the C implementation.

Run with Debian's /usr/bin/python3 (python3-torch, python3-numpy).

    model, meta = load_model("model.safetensors")
    probs, metallicity = predict(model, meta, x)   # x: [B, L] float array

The state_dict names match what core/model.c writes:
backbone.blocks.{b}.conv{1,2}.{weight,bias}, attention.{squeeze,excite}.*,
heads.{class,metal}.fc{1..n+1}.{weight,bias}.
"""
import json
import struct

import numpy as np
import torch
from torch import nn

DEFAULT_ARCH = {
    "input_length": 5161, "channels": [16, 32, 64, 128, 256], "kernel": 3,
    "padding": 1, "pool": 3, "attention_reduction": 16,
    "head_hidden": [128, 64], "n_classes": 4, "dropout": 0.5,
}

# safetensors dtype string <-> numpy dtype (little-endian)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8",
           "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_NP2ST = {np.dtype(v): k for k, v in _DTYPES.items()}


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------
def load_safetensors(path):
    """Reads a safetensors file. Returns ({name: np.ndarray}, {key: str})."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: header length {n} exceeds file size")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    buf = memoryview(raw)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dt = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(buf)) or end - begin != count * dt.itemsize:
            raise ValueError(f"{path}: bad data_offsets for '{name}'")
        arr = np.frombuffer(buf[begin:end], dtype=dt, count=count)
        tensors[name] = arr.reshape(shape).astype(dt.newbyteorder("="), copy=True)
    return tensors, dict(meta)


def save_safetensors(path, tensors, metadata=None):
    """Writes {name: array-like} (numpy or torch) and {key: str} metadata as
    safetensors. Floats become F32 (what mtlz reads); integer/bool arrays
    keep their dtype."""
    header, chunks, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        a = np.asarray(t)
        if a.dtype.newbyteorder("=") not in _NP2ST or a.dtype == np.float64:
            a = a.astype(np.float32)       # mtlz models are F32
        st = _NP2ST[a.dtype.newbyteorder("=")]
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": st,
                        "shape": list(a.shape),
                        "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-len(hj) % 8)            # pad so the buffer is 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for c in chunks:
            f.write(c)


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------
class Block(nn.Module):
    """conv1 -> ReLU -> conv2 -> ReLU -> MaxPool (floor)."""

    def __init__(self, cin, c, kernel, padding, pool):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, c, kernel, stride=1, padding=padding)
        self.conv2 = nn.Conv1d(c, c, kernel, stride=1, padding=padding)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool1d(pool, stride=pool)

    def forward(self, x):
        return self.pool(self.relu(self.conv2(self.relu(self.conv1(x)))))


class Backbone(nn.Module):
    def __init__(self, arch):
        super().__init__()
        cin, blocks = 1, []
        for c in arch["channels"]:
            blocks.append(Block(cin, c, arch["kernel"], arch["padding"], arch["pool"]))
            cin = c
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Attention(nn.Module):
    """Squeeze-and-excitation over channels."""

    def __init__(self, c, reduction):
        super().__init__()
        self.squeeze = nn.Conv1d(c, c // reduction, 1)
        self.excite = nn.Conv1d(c // reduction, c, 1)

    def forward(self, x):
        s = x.mean(dim=2, keepdim=True)
        s = torch.sigmoid(self.excite(torch.relu(self.squeeze(s))))
        return x * s


class Head(nn.Module):
    """Dropout -> fc1 -> ReLU -> ... -> fc{n+1} (no activation at the end)."""

    def __init__(self, cin, hidden, out, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        sizes = [cin] + list(hidden) + [out]
        self.n_fc = len(sizes) - 1
        for i in range(self.n_fc):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x):
        x = self.dropout(x)
        for i in range(self.n_fc):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_fc - 1:
                x = torch.relu(x)
        return x


class MTLforGalSpecZ(nn.Module):
    """1D CNN with a classification head and a metallicity regression head.
    forward(x [B,1,L]) -> (class logits [B,n_classes], metal [B] raw)."""

    def __init__(self, arch=None):
        super().__init__()
        self.arch = dict(arch or DEFAULT_ARCH)
        c = self.arch["channels"][-1]
        self.backbone = Backbone(self.arch)
        red = int(self.arch.get("attention_reduction", 0) or 0)
        self.attention = Attention(c, red) if red > 0 else None
        hid, p = self.arch["head_hidden"], self.arch["dropout"]
        self.heads = nn.ModuleDict({
            "class": Head(c, hid, self.arch["n_classes"], p),
            "metal": Head(c, hid, 1, p),
        })

    def features(self, x):
        """[B,1,L] -> GAP features [B,C] after attention, before the heads."""
        x = self.backbone(x)
        if self.attention is not None:
            x = self.attention(x)
        return x.mean(dim=2)

    def forward(self, x):
        f = self.features(x)
        return self.heads["class"](f), self.heads["metal"](f).squeeze(1)


def load_model(path):
    """Loads an mtlz safetensors file. Returns (model in eval mode, metadata)."""
    tensors, meta = load_safetensors(path)
    if meta.get("mtlz.format_version", "1") != "1":
        raise ValueError(f"{path}: unsupported mtlz.format_version")
    arch = json.loads(meta["mtlz.arch"]) if "mtlz.arch" in meta else DEFAULT_ARCH
    model = MTLforGalSpecZ(arch)
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def target_transform(meta):
    """(offset, scale) from mtlz.target; (0, 1) when absent."""
    t = json.loads(meta.get("mtlz.target", '{"offset":0,"scale":1}'))
    return float(t.get("offset", 0.0)), float(t.get("scale", 1.0))


def predict(model, meta, x):
    """x [B, L] -> (softmax probabilities [B,C], metallicity [B]) as numpy,
    computed in the model's dtype."""
    dtype = next(model.parameters()).dtype
    xt = torch.as_tensor(np.asarray(x)).to(dtype).reshape(len(x), 1, -1)
    with torch.inference_mode():
        logits, metal = model.eval()(xt)
        probs = torch.softmax(logits, dim=1)
    off, scale = target_transform(meta)
    return probs.numpy(), metal.numpy() * scale + off
