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
from urllib.parse import unquote, urlsplit

import redis

from .config import home  # noqa: F401 - connect.home, as callers know it
from .errors import IndexUnavailable, UsageError
from .index import Index

MAX_SOCKET_PATH = 100
# A Redis that is up but still loading its AOF (the first command after a reboot starts the
# embedded one) answers every command with LOADING: wait this long for it, not fail.
LOADING_WAIT = 60.0


def display_url(url: str) -> str:
    """The URL with any password replaced (in the authority and in a password= query
    parameter), for messages. Never raises, whatever the URL."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = "&".join("password=***" if q.lower().startswith("password=") else q for q in parts.query.split("&")) \
            if parts.query else parts.query
        out = url.replace(parts.netloc, netloc, 1) if netloc != parts.netloc else url
        if query != parts.query:  # (by hand: urlunsplit turns unix:///path into unix:/path)
            out = out.split("?", 1)[0] + "?" + query + (f"#{parts.fragment}" if parts.fragment else "")
        return out
    except ValueError:
        return url.split("://", 1)[0] + "://***"


def embedded_url(state_dir: str) -> str:
    return "unix://" + os.path.join(state_dir, "redis", "redis.sock")


def _alive(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
        return True
    except redis.BusyLoadingError:
        return True  # up, still loading its AOF
    except redis.RedisError:
        return False


def _running(rdir: str, sock: str) -> int | None:
    """The pid of an embedded redis-server still running for this socket (its pid file
    names it), answering or not."""
    try:
        with open(os.path.join(rdir, "redis.pid")) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    return pid if b"redis-server" in cmdline and os.fsencode(sock) in cmdline else None


def ensure_embedded(state_dir: str) -> str:
    rdir = os.path.join(state_dir, "redis")
    sock = os.path.join(rdir, "redis.sock")
    url = "unix://" + sock
    if any(ord(c) < 32 or ord(c) == 127 for c in state_dir):
        raise UsageError(f"SHARDFS_HOME {state_dir!r} holds a control character (a newline?); fix it")
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:  # (the kernel's limit is in bytes)
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
        pid = _running(rdir, sock)
        if pid is not None:  # running but slow to answer (loading, busy, stopped): never start a second
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if _alive(url):
                    return url
                if _running(rdir, sock) is None:
                    break  # it ended meanwhile: start one below
                time.sleep(0.5)
            else:
                raise IndexUnavailable(f"the embedded redis-server (pid {pid}) does not answer on {sock}; "
                                       f"see {rdir}/redis.log (stopped? out of memory?)")
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


last_url: str | None = None  # the URL the last open_index used (for error messages)


def open_index(flag: str | None = None, timeout: float = 5.0, loading_wait: float = LOADING_WAIT) -> Index:
    global last_url
    url = last_url = resolve_url(flag)
    try:
        parsed = urlsplit(url)
    except ValueError as e:
        raise UsageError(f"bad Redis URL {display_url(url)}: {e}") from None
    db = unquote(parsed.path).strip("/")
    if parsed.scheme in ("redis", "rediss") and db and not db.isdigit():  # (redis-py took it for db 0)
        raise UsageError(f"bad Redis URL {display_url(url)}: the database after the host must be a number "
                         f"(redis://HOST:PORT/0), not {db!r}")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      health_check_interval=30)
    except ValueError as e:
        raise UsageError(f"bad Redis URL {display_url(url)}: {e}") from None
    idx = Index(client, display_url(url))
    idx.ping(loading_wait=loading_wait)
    return idx
