"""Deployment pieces: systemd units (systemd-analyze verify) and sd_notify from the mount."""

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, needs_fuse, wait_for


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("template,instance", [("shardfs-node@.service", "shardfs-node@disk1.service"),
                                               ("shardfs-mount@.service", "shardfs-mount@models.service")])
def test_units_verify(tmp_path, template, instance):
    exe = os.path.join(os.path.dirname(sys.executable), "shardfs")
    assert os.access(exe, os.X_OK), "the shardfs console script is installed next to python"
    text = open(os.path.join(ROOT, "systemd", template)).read().replace("/usr/local/bin/shardfs", exe)
    unit = tmp_path / instance
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Unknown key" not in r.stderr and "Unknown section" not in r.stderr, r.stderr


# options with which systemd runs a service in a mount namespace of its own (systemd.exec(5))
NAMESPACING = ("ProtectHome", "ProtectSystem", "ProtectKernelModules", "ProtectKernelTunables",
               "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname", "PrivateTmp",
               "PrivateDevices", "PrivateMounts", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
               "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory",
               "RootImage", "MountAPIVFS", "PrivateNetwork", "PrivateUsers", "MountFlags")


def test_the_mount_unit_mounts_in_the_hosts_namespace():
    """With any of these, the FUSE mount is made in the service's own mount namespace and
    never shows on the host (the unit had ProtectHome=, ProtectKernelModules= and
    ProtectControlGroups=)."""
    lines = open(os.path.join(ROOT, "systemd", "shardfs-mount@.service")).read().splitlines()
    keys = {ln.split("=", 1)[0].strip() for ln in lines if "=" in ln and not ln.lstrip().startswith("#")}
    assert not keys & set(NAMESPACING), keys & set(NAMESPACING)


@needs_fuse
def test_foreground_mount_sends_ready_and_stopping(cli, tmp_path, nodes):
    n = nodes(1)[0]
    cli("node", "add", n.url)
    f = tmp_path / "m.bin"
    f.write_bytes(b"x" * 100000)
    cli("put", f, "--name", "m.bin")
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(20)
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {**cli.env, "NOTIFY_SOCKET": sock_path}
    proc = subprocess.Popen([sys.executable, "-m", "shardfs", "mount", str(mp), "--foreground",
                             "--cache-dir", str(tmp_path / "cache")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        msg = listener.recv(4096).decode()
        assert "READY=1" in msg
        assert os.path.ismount(mp) and open(mp / "m.bin", "rb").read() == b"x" * 100000
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(20) == 0
        wait_for(lambda: not os.path.ismount(mp), what="unmount")
    finally:
        if proc.poll() is None:
            proc.kill()
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)])
        listener.close()


@pytest.mark.parametrize("script", ["bench_mount.py", "bench_put.py", "soak.py"])
def test_benchmark_scripts_start(script):
    """The benchmarks run only by hand: at least they must import against the code as it is
    (bench_mount.py imported a helper a refactor had renamed)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr
