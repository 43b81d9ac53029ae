"""Load a PyTorch `.pt` checkpoint through the mount with `torch.load(mmap=True)`.

    python examples/load_torch_mmap.py [CHECKPOINT.pt]

With no argument it saves a small synthetic state dict (bf16, fp32 and int64 tensors). The
file is put into a fresh one-machine shardfs, mounted, loaded with
`torch.load(path, mmap=True, weights_only=True)` (tensor storages map the mounted file), and
every tensor is compared with `torch.load` of the original file.
"""

import gc
import os
import sys

import torch

from _mounted import mounted, original_or


def synthetic_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(8):
        sd[f"layers.{i}.attn.weight"] = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(1024, 2048, generator=g)
        sd[f"layers.{i}.norm.bias"] = torch.randn(1024, generator=g)
    sd["position_ids"] = torch.arange(4096)
    return sd


def main():
    original = original_or(lambda p: torch.save(synthetic_state_dict(), p), "checkpoint.pt")
    with mounted({"example/checkpoint.pt": original}) as mnt:
        got = torch.load(os.path.join(mnt, "example/checkpoint.pt"), mmap=True, weights_only=True)
        ref = torch.load(original, weights_only=True)
        if sorted(got) != sorted(ref):
            sys.exit("FAILED: the state dict keys differ through the mount")
        for name, b in ref.items():
            a = got[name]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                sys.exit(f"FAILED: tensor {name} differs through the mount")
        n = len(ref)
        del got, ref, a, b
        gc.collect()  # drop the memory maps before unmounting
        print(f"OK: {n} tensors loaded with torch.load(mmap=True) through the mount equal the original")


if __name__ == "__main__":
    main()
