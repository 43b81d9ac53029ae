"""Finding the Redis index: --redis flag > SHARDFS_REDIS > an embedded redis-server.

The embedded server listens on a unix socket under $SHARDFS_HOME/redis with AOF
persistence, so one machine needs no configuration at all.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

import redis

from .errors import IndexUnavailable, UsageError
from .index import Index

MAX_SOCKET_PATH = 100


def home() -> str:
    return os.path.abspath(os.environ.get("SHARDFS_HOME") or os.path.expanduser("~/.local/share/shardfs"))


def display_url(url: str) -> str:
    """The URL with any password replaced, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def embedded_url(state_dir: str) -> str:
    return "unix://" + os.path.join(state_dir, "redis", "redis.sock")


def _alive(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
        return True
    except redis.RedisError:
        return False


def ensure_embedded(state_dir: str) -> str:
    rdir = os.path.join(state_dir, "redis")
    sock = os.path.join(rdir, "redis.sock")
    url = "unix://" + sock
    if len(sock) > MAX_SOCKET_PATH:
        raise IndexUnavailable(f"SHARDFS_HOME path is too long for a unix socket ({sock}); use a shorter one")
    if os.path.exists(sock) and _alive(url):
        return url
    exe = shutil.which("redis-server")
    if exe is None:
        raise IndexUnavailable("redis-server not found on PATH; install it (apt-get install redis-server) "
                               "or point --redis / SHARDFS_REDIS at a server")
    try:
        os.makedirs(rdir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise IndexUnavailable(f"cannot create the embedded Redis directory {rdir}: {e.strerror}; set "
                               f"SHARDFS_HOME to a directory you can write, or point --redis at a server") from None
    with open(os.path.join(rdir, "start.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two CLIs starting at once start one server
        if os.path.exists(sock) and _alive(url):
            return url
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        cmd = [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--dir", rdir,
               "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "yes",
               "--pidfile", os.path.join(rdir, "redis.pid"), "--logfile", os.path.join(rdir, "redis.log"),
               "--save", ""]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise IndexUnavailable(f"could not start redis-server: {(r.stderr or r.stdout).strip()[:200]}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(sock) and _alive(url):
                return url
            time.sleep(0.05)
    raise IndexUnavailable(f"embedded redis-server did not come up; see {rdir}/redis.log")


def resolve_url(flag: str | None = None) -> str:
    return flag or os.environ.get("SHARDFS_REDIS") or ensure_embedded(home())


def open_index(flag: str | None = None, timeout: float = 5.0) -> Index:
    url = resolve_url(flag)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      health_check_interval=30)
    except ValueError as e:
        raise UsageError(f"bad Redis URL {display_url(url)}: {e}") from None
    idx = Index(client, display_url(url))
    idx.ping()
    return idx
