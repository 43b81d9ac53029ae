"""A reproducible synthetic checkpoint with the byte statistics of real weights.

bf16 tensors drawn from normal(0, 0.02) (float32 -> upper 16 bits), 4096-wide 2-D
tensors, written as a valid safetensors file. Random bytes or zeros would make
compression look useless or magical; this does not.
"""

from __future__ import annotations

import json
import struct

import numpy as np

WIDTH = 4096


def tensor_plan(total_bytes: int, width: int = WIDTH, dtype: str = "BF16") -> list[tuple[str, list[int]]]:
    """Names and shapes of tensors adding up to about total_bytes."""
    item = 2 if dtype in ("BF16", "F16") else 4
    rows_total = max(1, total_bytes // (width * item))
    plan, i = [], 0
    while rows_total > 0:
        rows = min(rows_total, 1024 if i % 3 else 4096)  # mix of sizes like q/k/v/mlp weights
        plan.append((f"model.layers.{i // 3}.w{i % 3}", [rows, width]))
        rows_total -= rows
        i += 1
    return plan


def tensor_bytes(rng: np.random.Generator, shape, dtype: str = "BF16") -> bytes:
    f = rng.normal(0.0, 0.02, size=int(np.prod(shape))).astype(np.float32)
    if dtype == "BF16":
        return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "F16":
        return f.astype(np.float16).tobytes()
    return f.tobytes()


def write_safetensors(path: str, total_bytes: int, seed: int = 0, dtype: str = "BF16",
                      width: int = WIDTH) -> int:
    """Write the synthetic model; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    plan = tensor_plan(total_bytes, width, dtype)
    item = 2 if dtype in ("BF16", "F16") else 4
    header, off = {"__metadata__": {"format": "pt", "generator": "shardfs.synth"}}, 0
    for name, shape in plan:
        n = shape[0] * shape[1] * item
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for _name, shape in plan:
            f.write(tensor_bytes(rng, shape, dtype))
    return 8 + len(hjson) + off


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="write a synthetic bf16 safetensors model")
    ap.add_argument("path")
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    a = ap.parse_args()
    from .units import parse_size
    print(write_safetensors(a.path, parse_size(a.size), a.seed, a.dtype))
