"""Fixtures that start real services on loopback: redis-server, node servers, the CLI.

Nothing here is a mock: Redis is a real redis-server in a temp dir, nodes are real
`shardfs node serve` processes, and the CLI runs as a subprocess like a user would run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from shardfs.synth import write_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fs_type(path: str) -> str:
    """The type of the filesystem `path` is on (from /proc/self/mounts: the longest match)."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind


def pytest_configure(config):
    # Where /tmp is a tmpfs (Debian 13's default), every page stays in memory: the tests of
    # reads around the page cache would skip and O_DIRECT is not what it is on a disk. Their
    # temp dirs go to /var/tmp then (xdist's workers get theirs under this one).
    if config.option.basetemp is None and "PYTEST_XDIST_WORKER" not in os.environ:
        import tempfile
        if fs_type(tempfile.gettempdir()) == "tmpfs" and fs_type("/var/tmp") not in ("tmpfs", ""):
            config.option.basetemp = f"/var/tmp/shardfs-pytest-{os.getuid()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether `proc` itself holds the listening TCP socket on `port`. A port free when
    free_port() picked it may be taken before the server binds it (by the other pytest
    worker's server, or as an outgoing connection's source port); a test that only checked
    that something answers there could go on with another test's server."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


def start_listening(launch, what: str, port: int | None = None, tries: int = 5, timeout: float = 20.0):
    """launch(port) -> Popen of a server that listens on 127.0.0.1:port. Returns (port, proc)
    once that very process listens there. A server that exits first most likely found its
    port taken: it is started again on another free port (unless `port` was given: a restart
    on the port a test registered). Raises with the server's stderr (when piped) otherwise."""
    for attempt in range(1 if port is not None else tries):
        p = port if port is not None else free_port()
        proc = launch(p)
        deadline = time.monotonic() + timeout
        while not listens(proc, p):
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"timed out waiting for {what} on port {p}")
            time.sleep(0.05)
        else:
            return p, proc
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    raise RuntimeError(f"{what} exited at start (last on port {p}): {err or 'no output'}")


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class RedisProc:
    def __init__(self, workdir: str):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (the CI script installs it)")
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = None
        self.url = None
        self.proc = None

    def start(self, *extra: str):
        """redis-server with `extra` options, on a free loopback port the first time (see
        start_listening) and on the same one again after stop(); returns once it answers."""
        def launch(port):
            return subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--save", "", "--appendonly", "yes", "--protected-mode", "yes", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port, self.proc = start_listening(launch, "redis-server", port=self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up():
            try:
                return client.ping()
            except redis.AuthenticationError:
                return True  # (it answers: a test's own users and passwords are its business)
            except redis.RedisError:
                return False
        try:
            wait_for(up, what="redis-server")
        except TimeoutError:
            self.proc.kill()
            self.proc.wait()
            raise
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        return redis.Redis.from_url(self.url)


class NodeProc:
    """A real `shardfs node serve` process on a loopback port."""

    def __init__(self, root: str, token_file: str | None = None):
        self.root = root
        self.token_file = token_file
        self.port = None
        self.url = None
        self.proc = None

    def start(self):
        """Starts the server: on a free port the first time, on the same port again after
        a kill or stop (the node's URL is registered)."""
        def launch(port):
            cmd = [sys.executable, "-m", "shardfs", "node", "serve", "--root", self.root,
                   "--listen", f"127.0.0.1:{port}"]
            if self.token_file:
                cmd += ["--token-file", self.token_file]
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port, self.proc = start_listening(launch, f"node server for {self.root}", port=self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def chunk_files(self):
        out = []
        for d, _, files in os.walk(self.root):
            out += [os.path.join(d, f) for f in files if len(f) == 64]
        return out


@pytest.fixture
def redis_proc(tmp_path):
    r = RedisProc(str(tmp_path / "redis")).start()
    yield r
    r.stop()


@pytest.fixture
def nodes(tmp_path):
    """Factory: nodes(n) starts n node servers; all are stopped at teardown."""
    started = []

    def make(n=1, token_file=None):
        out = [NodeProc(str(tmp_path / f"node{len(started) + k}"), token_file) for k in range(n)]
        started.extend(out)
        with ThreadPoolExecutor(n) as pool:  # their start-ups overlap
            return list(pool.map(NodeProc.start, out))
    yield make
    for node in started:
        node.stop()


class Cli:
    def __init__(self, env):
        self.env = env

    def run(self, *args, check=True, input=None, timeout=300, env=None, cwd=None):
        r = subprocess.run([sys.executable, "-m", "shardfs", *map(str, args)], capture_output=True,
                           text=True, env={**self.env, **(env or {})}, input=input, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise AssertionError(f"shardfs {' '.join(map(str, args))} exited {r.returncode}:\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def __call__(self, *args, **kw):
        return self.run(*args, **kw)


@pytest.fixture
def base_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDFS_")}
    env["SHARDFS_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def cli(redis_proc, base_env):
    """The CLI pointed at this test's own redis-server."""
    return Cli({**base_env, "SHARDFS_REDIS": redis_proc.url})


@pytest.fixture(scope="session")
def model_256(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "synthetic-256m.safetensors"
    write_safetensors(str(path), 256 << 20, seed=1)
    return path


@pytest.fixture(scope="session")
def model_small(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "synthetic-24m.safetensors"
    write_safetensors(str(path), 24 << 20, seed=2)
    return path


def fuse_usable() -> str | None:
    """None if real mounts can run here, else the reason they cannot."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


# Every test node keeps its chunks under tmp_path, on the cache's filesystem, and a mount
# reads such nodes' chunks without caching them. Tests of how the cache fills, evicts and
# counts ask it to cache them as it caches remote nodes' chunks.
CACHE_LOCAL = "--cache-local-nodes"

needs_fuse = pytest.mark.skipif(fuse_usable() is not None, reason=f"no usable FUSE: {fuse_usable()}")


class Mount:
    """`shardfs mount` in a subprocess (the real CLI, the real daemon, a real kernel mount)."""

    def __init__(self, cli: Cli, path, cache_dir, *extra):
        self.cli, self.path, self.cache_dir, self.extra = cli, str(path), str(cache_dir), extra
        os.makedirs(self.path, exist_ok=True)
        self.pid = None

    def mount(self):
        r = self.cli("mount", self.path, "--cache-dir", self.cache_dir, *self.extra)
        self.pid = int(r.stdout.split("daemon pid ")[1].split(")")[0].split(",")[0])
        self.log = r.stdout.split(", log ")[1].rsplit(")", 1)[0]
        return self

    def tracebacks(self) -> str:
        """The daemon log from the first Python traceback on ('' if none): a daemon bug."""
        try:
            with open(self.log, errors="replace") as f:
                text = f.read()
        except (OSError, AttributeError):
            return ""
        at = text.find("Traceback (most recent call last)")
        return text[max(0, at - 300):at + 3000] if at >= 0 else ""

    def umount(self, check=True):
        return self.cli("umount", self.path, check=check)

    def cleanup(self):
        if os.path.ismount(self.path) and not _stale(self.path):
            self.umount(check=False)  # a clean unmount: the daemon's shutdown path runs every time
            deadline = time.monotonic() + 10
            while self.pid and not gone(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if os.path.ismount(self.path) or _stale(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        if self.pid and _is_daemon(self.pid, self.path):  # (never a process that reused the pid)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stats(self) -> dict:
        return json.loads(self.cli("cache", "stats", "--json", "--mount", self.path).stdout)

    def wait_polls(self, n: int, timeout: float = 60.0) -> None:
        """Until the daemon has polled the index n more times (what "nothing changed a few
        polls later" waits on, rather than a sleep a loaded machine can outrun)."""
        start = self.stats()["polls"]
        wait_for(lambda: self.stats()["polls"] >= start + n, timeout=timeout, what=f"{n} more index polls")

    def file(self, name):
        return os.path.join(self.path, name)


def gone(pid) -> bool:
    """The process has exited: no such pid, or a zombie. (Daemonized processes are reparented
    to init, and this sandbox's init reaps them only every ~2 s; waiting for the pid itself to
    vanish cost ~1.6 s per mount in teardowns alone.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _is_daemon(pid, path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.fsencode(str(path)) in f.read()
    except OSError:
        return False


def _stale(path):
    try:
        os.stat(path)
        return False
    except OSError:
        return True


@pytest.fixture
def mounts(tmp_path, cli):
    """Factory: mounts(*extra_args) mounts a fresh mountpoint with its own cache dir."""
    made = []

    def make(*extra, cache_dir=None):
        n = len(made)
        m = Mount(cli, tmp_path / f"mnt{n}", cache_dir or (tmp_path / f"cache{n}"), *extra)
        made.append(m)
        return m.mount()
    yield make
    failed = []
    for m in made:  # every one, even after one fails
        try:
            m.cleanup()
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(f"{m.path}: {e!r}")
    assert not failed, failed
    for m in made:  # whatever a test did, the daemon must not have crashed or logged a bug
        assert not m.tracebacks(), m.tracebacks()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_nodes(cli, nodes, n, token_file=None):
    """Start n node servers and register each (n1, n2, ... in order).

    Registered through the index in this process, not by n `shardfs node add` runs: most
    tests only need nodes, and each CLI run costs ~0.4 s of interpreter start-up, ~110 times
    in the suite. The CLI's own `node add` (probe, token, refusals) is tested where it is
    the point (test_core, test_doctor, test_disk_full)."""
    procs = nodes(n, token_file=token_file)
    url = cli.env.get("SHARDFS_REDIS")
    if url is None or token_file is not None:
        for p in procs:
            assert "added node" in cli("node", "add", p.url).stdout
        return procs
    from shardfs.index import Index
    client = redis.Redis.from_url(url)
    try:
        for p in procs:
            Index(client, url).add_node(p.url)
    finally:
        client.close()
    return procs


@pytest.fixture
def small_fs(tmp_path):
    """Factory: small_fs(size) mounts a tmpfs of that size (a disk that fills up quickly)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = []

    def make(size: str):
        d = tmp_path / f"small-fs{len(made)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)], check=True)
        made.append(d)
        return d
    yield make
    for d in made:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def ctrl_c_default():
    # A shell that starts a job in the background without job control (as CI runners may)
    # sets SIGINT to ignored, children inherit that and Python then installs no Ctrl-C
    # handler: the child gets SIGINT back as a terminal would deliver it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
