"""Memory-map a NumPy array file through the mount.

    python examples/load_numpy_memmap.py

Writes a 64 MiB float32 .npy array, puts it into a fresh one-machine shardfs, mounts it and
maps it with `np.load(mmap_mode="r")`; random slices and then the whole array are compared
with the original.
"""

import gc
import os
import sys

import numpy as np

from _mounted import mounted, scratch_dir


def main():
    original = os.path.join(scratch_dir(), "embeddings.npy")
    rng = np.random.default_rng(0)
    np.save(original, rng.standard_normal((16384, 1024), dtype=np.float32))
    with mounted({"example/embeddings.npy": original}) as mnt:
        got = np.load(os.path.join(mnt, "example/embeddings.npy"), mmap_mode="r")
        ref = np.load(original, mmap_mode="r")
        if got.shape != ref.shape or got.dtype != ref.dtype:
            sys.exit("FAILED: shape or dtype differs through the mount")
        for row in rng.integers(0, ref.shape[0], 200):  # random page faults first
            if not np.array_equal(got[row], ref[row]):
                sys.exit(f"FAILED: row {row} differs through the mount")
        if not np.array_equal(got, ref):
            sys.exit("FAILED: the array differs through the mount")
        shape = got.shape
        del got, ref
        gc.collect()  # drop the memory maps before unmounting
        print(f"OK: a {shape} float32 array memory-mapped through the mount equals the original")


if __name__ == "__main__":
    main()
