"""The shardfs demo: ingest a model, mount it, load it through the mount, verify it.

Runs on one machine with zero configuration: an embedded redis-server under a fresh
SHARDFS_HOME, three `shardfs node serve` nodes on loopback, R=2.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from shardfs.synth import write_safetensors

SIZE = int(os.environ.get("DEMO_SIZE_MB", "256")) << 20


def sh(*args, **kw):
    print("$ shardfs " + " ".join(map(str, args)), flush=True)
    r = subprocess.run([sys.executable, "-m", "shardfs", *map(str, args)], text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"demo failed at: shardfs {' '.join(map(str, args))}")
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 << 20):
            h.update(b)
    return h.hexdigest()


def load_safetensors(path):
    """Map every tensor of a safetensors file (bf16 kept as its uint16 bit pattern)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = mm[8 + n + a:8 + n + b].view(np.uint16).reshape(t["shape"])
    return out


def main():
    work = tempfile.mkdtemp(prefix="shardfs-demo-", dir="/var/tmp")
    os.environ["SHARDFS_HOME"] = os.path.join(work, "home")
    os.environ.pop("SHARDFS_REDIS", None)
    model = os.path.join(work, "llama-synthetic.safetensors")
    mnt = os.path.join(work, "models")
    os.makedirs(mnt)
    print(f"demo workspace: {work}")
    print(f"writing a {SIZE >> 20} MiB synthetic bf16 safetensors model ...", flush=True)
    write_safetensors(model, SIZE, seed=0)
    procs = []
    mounted = False
    try:
        for i in range(3):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shardfs", "node", "serve", "--root", os.path.join(work, f"node{i}"),
                 "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            sh("node", "add", f"http://127.0.0.1:{port}")
        sh("put", model, "--name", "demo/llama-synthetic.safetensors", "--replicas", "2")
        sh("ls")
        sh("mount", mnt)
        mounted = True
        path = os.path.join(mnt, "demo/llama-synthetic.safetensors")
        t0 = time.monotonic()
        got, ref = load_safetensors(path), load_safetensors(model)
        for name in ref:
            if not np.array_equal(got[name], ref[name]):
                sys.exit(f"demo failed: tensor {name} differs through the mount")
        dt = time.monotonic() - t0
        print(f"loaded {len(ref)} tensors through the mount in {dt:.1f}s: all equal to the original")
        del got, ref  # close the memory maps, or the mount stays busy
        if sha256(path) != sha256(model):
            sys.exit("demo failed: SHA-256 through the mount differs")
        print("SHA-256 through the mount matches the original file")
        sh("cache", "stats", "--mount", mnt)
        sh("umount", mnt)
        mounted = False
        print("demo OK")
    finally:
        if mounted:
            subprocess.run([sys.executable, "-m", "shardfs", "umount", mnt])
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt])
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
        pidfile = os.path.join(os.environ["SHARDFS_HOME"], "redis", "redis.pid")
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        if os.environ.get("DEMO_KEEP") != "1":
            subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
