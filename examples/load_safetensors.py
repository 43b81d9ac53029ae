"""Load a safetensors checkpoint through the mount with safetensors' own loader.

    python examples/load_safetensors.py [MODEL.safetensors]

With no argument it writes a 64 MiB synthetic bf16 model. The file is put into a fresh
one-machine shardfs, mounted, opened with `safe_open` (which memory-maps it), and every
tensor is compared with the same tensor read from the original file.
"""

import gc
import os
import sys

import torch
from safetensors import safe_open

from _mounted import mounted, original_or
from shardfs.synth import write_safetensors


def main():
    original = original_or(lambda p: write_safetensors(p, 64 << 20, seed=1), "synthetic.safetensors")
    with mounted({"example/model.safetensors": original}) as mnt:
        path = os.path.join(mnt, "example/model.safetensors")
        with safe_open(path, framework="pt") as got, safe_open(original, framework="pt") as ref:
            names = list(ref.keys())
            if sorted(got.keys()) != sorted(names):
                sys.exit("FAILED: the tensor names differ through the mount")
            for name in names:
                a, b = got.get_tensor(name), ref.get_tensor(name)
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    sys.exit(f"FAILED: tensor {name} differs through the mount")
            del a, b
        gc.collect()  # drop the memory maps before unmounting
        print(f"OK: {len(names)} tensors loaded with safe_open through the mount equal the original")


if __name__ == "__main__":
    main()
