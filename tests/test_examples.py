"""The loader examples run end to end: each puts its files into a fresh one-machine shardfs
(embedded redis-server, local node), mounts it, loads through the mount with the framework's
own loader, compares with the original and unmounts. An example exits non-zero on any
difference, so a zero exit plus its OK line is the check."""

import os
import subprocess
import sys

import pytest

from conftest import needs_fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = needs_fuse


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch):
    """An example killed by its timeout never reaches its own clean-up: unmount what it left
    mounted, stop its redis-server and remove its workspace, so no test leaks a mount. Each
    test's examples work in a directory of its own (tests run beside each other), with a
    short path (the embedded Redis's unix socket goes under it)."""
    import contextlib
    import glob
    import shutil
    import signal
    import tempfile

    root = tempfile.mkdtemp(prefix="shardfs-ex-", dir="/var/tmp")
    monkeypatch.setenv("SHARDFS_EXAMPLE_DIR", root)
    yield
    for work in glob.glob(f"{root}/shardfs-example-*"):
        mnt = os.path.join(work, "models")
        if os.path.ismount(mnt) or os.path.realpath(mnt) in open("/proc/mounts").read():
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        pidfile = os.path.join(work, "home", "redis", "redis.pid")
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("example", ["load_safetensors", "load_numpy_memmap", "load_torch_mmap", "load_hf_folder"])
def test_example_loads_through_the_mount(example, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("SHARDFS_REDIS", None)
    env.pop("SHARDFS_HOME", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{example}.py")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ok = [line for line in r.stdout.splitlines() if line.startswith("OK: ")]
    assert ok and "equal" in ok[0], r.stdout
    assert "unmounted" in r.stdout  # and it left no mount behind


def test_example_fails_loudly_on_a_wrong_original(tmp_path):
    """The comparison is real: against a different original the example must fail."""
    from shardfs.synth import write_safetensors
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(str(a), 4 << 20, seed=1)
    write_safetensors(str(b), 4 << 20, seed=2)
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("SHARDFS_REDIS", None)
    env.pop("SHARDFS_HOME", None)
    # put a, then compare the mount with b by pointing the example at a file whose bytes differ
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "import _mounted, load_safetensors\n"
        "orig = _mounted.mounted\n"
        "_mounted_models = {'example/model.safetensors': %r}\n"
        "load_safetensors.mounted = lambda models: orig(_mounted_models)\n"
        "sys.argv = ['x', %r]\n"
        "load_safetensors.main()\n" % (os.path.join(ROOT, "examples"), str(a), str(b)))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "FAILED: tensor" in r.stderr, r.stdout + r.stderr
    assert "unmounted" in r.stdout  # the failure still unmounts


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command runs examples/demo.py (after installing): here at 32 MiB."""
    env = {**os.environ, "HOME": str(tmp_path), "DEMO_SIZE_MB": "32"}
    env.pop("SHARDFS_REDIS", None)
    env.pop("SHARDFS_HOME", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all equal to the original" in r.stdout and "SHA-256 through the mount matches" in r.stdout
    assert r.stdout.rstrip().endswith("demo OK")
