"""Node stores: where chunk envelopes live. A node is a URL.

    file:///path      a directory (local disk or any mounted network filesystem)
    http://host:port  a node server (`shardfs node serve`, or nginx with WebDAV)

Both use one layout, so a node directory can be served by either: the envelope of chunk
<hex> lives at <root>/<hex[:2]>/<hex>, served over HTTP as /chunks/<hex>. Objects are
immutable; writes go to a temporary name, are fsynced and renamed into place.

Every method is blocking and thread-safe; callers on trio run them in worker threads.
"""

from __future__ import annotations

import errno
import heapq
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from urllib.parse import urlsplit

import blake3
import urllib3
import urllib3.connection

from . import directio, envelope
from .errors import NodeError, UsageError

HEX_ID = re.compile(r"[0-9a-f]{64}")


TOKEN_MAX = 1024


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            blob = f.read(TOKEN_MAX + 1)
    except OSError as e:
        raise UsageError(f"cannot read token file {path}: {e.strerror}") from None
    token = blob.strip().decode("ascii", "replace")
    if not token:
        raise UsageError(f"token file {path} is empty")
    # (it goes into an HTTP header: a key file given by mistake made a UnicodeDecodeError)
    if len(blob) > TOKEN_MAX or not all(" " < c <= "~" for c in token):
        raise UsageError(f"token file {path} does not hold a token: one line of printable ASCII, at most "
                         f"{TOKEN_MAX} bytes (is it another file, such as a model key?)")
    return token


def disk_id(path: str) -> str | None:
    """Which filesystem on which running machine holds `path`: "<boot id>:<st_dev>", or None.

    The mount compares a node's with its cache's: chunks of a node on the cache's own
    filesystem are already on the reader's disk, so a decoded second copy there would only
    compete with them for that disk (see Reader)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat(path).st_dev}"
    except OSError:
        return None


def root_id(path: str) -> str | None:
    """Which directory on which running machine `path` is: "<boot id>:<st_dev>:<st_ino>",
    or None. Two node URLs with one root_id are one directory (file:///x and file:///x/.,
    a symlink, an HTTP server in front of it): as two nodes they would be replicas in name
    only."""
    disk = disk_id(path)
    try:
        return f"{disk}:{os.stat(path).st_ino}" if disk else None
    except OSError:
        return None


# A node's root holds this file from the time it is made a node (node add, or a node server
# creating its --root). "Chunk not found" from a root without it is not believed: the
# directory is not the one the chunks went to (a disk that is not mounted leaves its empty
# mountpoint, a path recreated or replaced), and verify --repair would otherwise drop every
# copy it lists there as missing: lost chunks, for good. Nor is a chunk written into such a
# root: the first write used to leave the marker, after which the empty mountpoint passed
# for the node's directory and its real chunks for missing.
MARKER = ".shardfs-node"


def root_marked(root: str) -> bool:
    return os.path.exists(os.path.join(root, MARKER))


def mark_root(root: str) -> None:
    """Leave the marker in a root that holds chunks (once; durable before it is relied on)."""
    path = os.path.join(root, MARKER)
    if os.path.exists(path):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # (empty: counts no bytes)
    except FileExistsError:
        return
    fsync_dir(root)


def init_root(path: str, adopt: bool) -> str | None:
    """Make `path` a node directory: create it if it is missing (parents included) and leave
    the marker. An existing directory without the marker is marked only when `adopt` (an
    admin naming it in `node add`) or when it holds chunks (written before markers existed);
    otherwise it stays unmarked and refuses writes. Returns None, or why it cannot be made."""
    existed = os.path.isdir(path)
    why = make_dir(path)
    if why:
        return why
    try:
        if not existed or adopt or root_marked(path) or _holds_chunks(path):
            mark_root(path)
    except OSError as e:
        return f"cannot write {MARKER} in it: {e.strerror}"
    return None


def write_refused(root: str) -> str | None:
    """Why no chunk may be written under root now (see MARKER), or None."""
    why = not_found_why(root)
    return f"{why}; if it is the node's directory, `touch {os.path.join(root, MARKER)}`" if why else None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_found_why(root: str) -> str | None:
    """None if "not found" under root can be believed; else why not."""
    if not os.path.isdir(root):
        return f"the node directory {root} is gone"
    if not root_marked(root):
        if _holds_chunks(root):  # (written before markers existed: it is the directory)
            try:
                mark_root(root)
            except OSError:
                pass  # (a reader of a node it cannot write to: it asks again next time)
            return None
        return (f"the node directory {root} has no {MARKER}: it is not the directory its chunks were "
                "written to (a disk not mounted? a directory replaced?)")
    return None


def _holds_chunks(root: str) -> bool:
    try:
        with os.scandir(root) as top:
            for sub in top:
                if len(sub.name) == 2 and sub.is_dir(follow_symlinks=False):
                    with os.scandir(sub.path) as inner:
                        if any(HEX_ID.fullmatch(e.name) for e in inner):
                            return True
    except OSError:
        pass
    return False


def foreign_entries(root: str) -> list[str]:
    """Names in a directory that a node directory does not hold (its marker, chunk fan-out
    folders, temp files; lost+found of a filesystem's root): `node add` of a directory in use
    for something else (`file:///`, a home directory) would mix chunk folders into it."""
    try:
        with os.scandir(root) as it:
            return sorted(e.name for e in it if not (
                e.name in (MARKER, "lost+found") or e.name.startswith(TEMP_PREFIX)
                or (len(e.name) == 2 and e.name in _FANOUT and e.is_dir(follow_symlinks=False))))
    except OSError:
        return []


_FANOUT = {f"{i:02x}" for i in range(256)}
TEMP_PREFIX = ".tmp-"  # write_atomic's temp files (renamed into place once durable)
TEMP_MAX_AGE = 3600.0  # no write in progress is this old: older ones a killed writer left


def remove_stale_temp(dirpath: str, name: str, now: float) -> bool:
    """Remove dirpath/name if it is a temp file a killed writer left; whether it was."""
    if not name.startswith(TEMP_PREFIX):
        return False
    path = os.path.join(dirpath, name)
    try:
        if now - os.stat(path).st_mtime <= TEMP_MAX_AGE:
            return False
        os.unlink(path)
        return True
    except OSError:  # (gone meanwhile, or not ours to remove)
        return False


def sweep_temps(root: str) -> int:
    """Remove the temp files writers killed mid-write left under root; returns how many."""
    now = time.time()
    return sum(remove_stale_temp(dirpath, name, now) for dirpath, _dirs, files in os.walk(root) for name in files)


def make_dir(path: str) -> str | None:
    """Create a directory (and its parents) if it is missing: None once it exists, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        return None
    except OSError as e:
        return "not a directory" if os.path.exists(path) else e.strerror


def chunk_relpath(hex_id: str) -> str:
    if not HEX_ID.fullmatch(hex_id):
        raise ValueError(f"malformed chunk id {hex_id!r}")
    return f"{hex_id[:2]}/{hex_id}"


class NodeStore(ABC):
    url: str

    @abstractmethod
    def get(self, hex_id: str) -> bytes:
        """The envelope, or NodeError (missing=True when the node does not have it)."""

    @abstractmethod
    def put(self, hex_id: str, blob: bytes) -> None:
        """Store an envelope durably; NodeError(full=True) when out of space."""

    @abstractmethod
    def has(self, hex_id: str) -> bool:
        """Whether the node holds the chunk; NodeError when it cannot tell (unreachable, or
        a root that is not the node's directory: see MARKER)."""

    @abstractmethod
    def delete(self, hex_id: str) -> None:
        """Remove a chunk; removing an absent chunk is not an error, unless the node cannot
        tell it is absent (NodeError: see MARKER)."""

    @abstractmethod
    def health(self, used: bool = True) -> dict:
        """{"used": bytes held, "free": bytes free, "disk": disk_id of its root (optional)};
        NodeError when unreachable. used=False: a liveness probe; "used" may be None where
        it is costly to count."""

    def unsure(self) -> str | None:
        """Why this node cannot tell that a chunk is absent (its directory lacks MARKER), or
        None. gc deletes nothing through such a node: a delete of a chunk "not found" there
        would forget a copy hidden under a disk that did not mount."""
        return None

    @abstractmethod
    def probe_write(self) -> None:
        """NodeError if a put here would be refused now (read-only, wrong token), without
        leaving anything behind."""

    def sweep_temps(self) -> int:
        """Remove temp files killed writers left here; how many (a server sweeps its own)."""
        return 0

    def close(self) -> None:
        pass


class FileStore(NodeStore):
    def __init__(self, url: str, root: str):
        self.url = url
        self.root = root
        self.direct = hasattr(os, "O_DIRECT")  # reads bypass the page cache (directio.py)

    def _path(self, hex_id: str) -> str:
        return os.path.join(self.root, chunk_relpath(hex_id))

    def get(self, hex_id):
        try:
            blob, self.direct = directio.read_whole(self._path(hex_id), self.direct, max_size=envelope.MAX_STORED)
            return blob
        except FileNotFoundError:
            why = not_found_why(self.root)
            if why:
                raise NodeError(self.url, f"chunk {hex_id[:16]} not found, but {why}") from None
            raise NodeError(self.url, f"chunk {hex_id[:16]} not found", missing=True) from None
        except OSError as e:
            raise NodeError(self.url, f"cannot read chunk {hex_id[:16]}: {e.strerror}") from None

    def put(self, hex_id, blob):
        if not os.path.isdir(self.root):  # (never recreate a root that went away: see MARKER)
            raise NodeError(self.url, f"the node directory {self.root} is gone")
        why = write_refused(self.root)  # (each time: one stat, against an fsync per chunk)
        if why:
            raise NodeError(self.url, f"cannot store chunk {hex_id[:16]}: {why}")
        self.direct = write_atomic(self._path(hex_id), blob, self.url, self.direct)

    def has(self, hex_id):
        if os.path.exists(self._path(hex_id)):
            return True
        why = not_found_why(self.root)
        if why:
            raise NodeError(self.url, f"chunk {hex_id[:16]} not found, but {why}")
        return False

    def delete(self, hex_id):
        try:
            os.unlink(self._path(hex_id))
        except FileNotFoundError:
            why = not_found_why(self.root)  # (gc would forget a copy hidden under an unmounted disk)
            if why:
                raise NodeError(self.url, f"cannot delete chunk {hex_id[:16]}: not found, but {why}") from None
        except OSError as e:
            raise NodeError(self.url, f"cannot delete chunk {hex_id[:16]}: {e.strerror}") from None

    def sweep_temps(self):
        return sweep_temps(self.root)

    def unsure(self):
        return not_found_why(self.root)

    def probe_write(self):
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX + "probe-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise NodeError(self.url, f"cannot write in {self.root}: {e.strerror}") from None

    def health(self, used=True):
        if not os.path.isdir(self.root):
            raise NodeError(self.url, f"directory {self.root} does not exist")
        # counting what a directory holds walks every chunk file: only when asked (node ls, doctor)
        return {"used": dir_usage(self.root) if used else None, "free": shutil.disk_usage(self.root).free,
                "disk": disk_id(self.root), "root": root_id(self.root)}


def write_atomic(path: str, blob, node: str = "", direct: bool = True) -> bool:
    """tmp + rename + fsyncs, so a reader never sees a partial chunk (shared with the server),
    and the chunk, under its name, is on disk when this returns (before the index records it).

    The file's fsync comes after the rename, then the directory's. On a journaling filesystem
    the first commits the rename with the data, and the second finds it committed already:
    one commit per chunk. An fsync before the rename and the directory's after cost two:
    put ran at 228 against 274 MiB/s with no directory fsync at all (same run of the bench).

    A page-aligned blob goes with O_DIRECT where the filesystem takes it (no copy into
    the page cache; directio.py). Returns whether O_DIRECT is still worth trying here."""
    d = os.path.dirname(path)
    tmp = None
    try:
        if not os.path.isdir(d):
            try:
                os.mkdir(d)  # (the root must exist: a vanished one is not recreated, see MARKER)
            except FileExistsError:
                pass
            fsync_dir(os.path.dirname(d))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=TEMP_PREFIX)
        try:
            os.fchmod(fd, 0o644)  # (mkstemp's 0600 would keep other users and servers out)
            direct = directio.write_all(fd, blob, direct)
            os.rename(tmp, path)  # (complete: readers see the whole chunk from here on)
            tmp = None
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(d)  # (POSIX promises the name only with this: see above)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise NodeError(node or d, f"cannot store chunk: {e.strerror}", full=full) from None
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return direct


def dir_usage(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


SMALL_ANSWER = 64 << 10  # bytes: the most read of an answer that is not a chunk (health, errors)


def _small(store_url: str, r, what: str, limit: int = SMALL_ANSWER, deadline: float = 10.0,
           cut: bool = False) -> bytes:
    """The body of an answer that is not a chunk (r opened with preload_content=False), read
    to at most `limit` bytes within `deadline` seconds: a node answering with an endless,
    huge or trickled body is a failed node, not a client out of memory or a thread held.
    With `cut`, a longer body gives its first `limit` bytes (an error's text) instead."""
    late = _deadlines.watch(r, deadline)
    try:
        body = r.read(limit + 1, decode_content=False)
        if late[0]:
            raise OSError("shut")
        if len(body) > limit:
            r.close()
            if cut:
                return body[:limit]
            raise NodeError(store_url, f"{what}: an answer of over {limit} bytes")
        return body
    except (urllib3.exceptions.HTTPError, OSError) as e:
        r.close()
        if late[0]:
            raise NodeError(store_url, f"{what}: the answer took over {deadline:g} s") from None
        raise NodeError(store_url, f"{what}: {type(e).__name__}: {e}") from None
    finally:
        _deadlines.done(late)
        r.release_conn()


def _why(r, body: bytes | None = None) -> str:
    """The first line of an error answer's text (r.data, or `body`), as ": text" (or "")."""
    body = r.data if body is None else body
    text = body[:500].decode("utf-8", "replace").strip().splitlines()
    return f": {text[0]}" if text and text[0].isprintable() else ""


# A node cannot check a sealed envelope's content (it holds no key), only its header. With
# this header (BLAKE3 of the body as sent) it can tell the body arrived intact, and then
# replaces a copy it holds already: that copy may be the damaged one verify found and could
# not delete, which the node would otherwise keep and report stored.
SEALED_HASH = "X-Shardfs-Body-Blake3"
BODY_DEADLINE = float(os.environ.get("SHARDFS_BODY_DEADLINE", "60"))  # seconds for a whole chunk answer


class _Deadlines:
    """One thread that shuts a response's socket for reading if it is still being read at
    its deadline (the read waiting on it then fails at once). One thread for every GET, not
    a timer thread each: a cold read makes hundreds of GETs a second."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []  # (when, seq, entry); entry = [fired, response or None once done]
        self._seq = 0
        self._thread = None

    def watch(self, r, seconds: float) -> list:
        entry = [False, r]
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq, entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shardfs-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    @staticmethod
    def done(entry: list) -> None:
        entry[1] = None  # (its heap slot goes when its time comes)

    def _run(self):
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2][1] is None:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cv.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait > 0:
                        self._cv.wait(wait)
                        continue
                    entry = heapq.heappop(self._heap)[2]
                    r = entry[1]
                    if r is not None:
                        entry[0] = True
                        break
            try:
                r.shutdown()
            except Exception:  # noqa: BLE001 - released or closed meanwhile: nothing to stop
                pass


_deadlines = _Deadlines()
HEALTH_TIMEOUT = 3.0  # seconds for a node's /health answer (chunk requests wait 10)


class _Shut:
    """What _Deadlines shuts for a connection still waiting for its answer's head: only
    while it waits (the deadline thread may get here just after the answer came, and the
    connection may be back in the pool, carrying another request, by then)."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()
        self._waiting = True
        self.fired = False

    def shutdown(self):
        with self._lock:
            if self._waiting and self.conn.sock is not None:
                self.fired = True
                self.conn.sock.shutdown(socket.SHUT_RDWR)

    def end(self) -> bool:
        """The wait is over; whether the deadline cut it."""
        with self._lock:
            self._waiting = False
            return self.fired


class _HeadDeadline:
    """A connection whose answer's status line and headers must all arrive within the read
    timeout. urllib3's timeout bounds each socket read: a node trickling its headers a byte
    a second held a fetch thread for good, and a few such nodes every thread of a mount's
    pool (no read then reached a good replica)."""

    def getresponse(self):
        wait = self.timeout if isinstance(self.timeout, (int, float)) else None
        if not wait:
            return super().getresponse()
        shut = _Shut(self)
        late = _deadlines.watch(shut, wait)
        try:
            r = super().getresponse()
        except BaseException:
            if shut.end():
                raise urllib3.exceptions.ReadTimeoutError(None, "", f"no answer within {wait:g} s") from None
            raise
        finally:
            _deadlines.done(late)
        if shut.end():  # (cut off mid-headers, http.client takes the end for theirs)
            r.close()
            raise urllib3.exceptions.ReadTimeoutError(None, "", f"no answer within {wait:g} s")
        return r


class _HTTPConnection(_HeadDeadline, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_HeadDeadline, urllib3.connection.HTTPSConnection):
    pass


class HttpStore(NodeStore):
    """Client of a node server. urllib3 keeps keep-alive connections per node."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0, connect_timeout: float = 2.0):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self._prefix = parts.path.rstrip("/")
        self._pool = urllib3.connection_from_url(
            self.url, maxsize=32, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=timeout))
        self._pool.ConnectionCls = (_HTTPSConnection if isinstance(self._pool, urllib3.HTTPSConnectionPool)
                                    else _HTTPConnection)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._connect_timeout = connect_timeout

    def _request(self, method, path, preload_content=True, **kw):
        sent = False  # whether a request went out that the node may have acted on
        try:
            try:
                return self._pool.request(method, self._prefix + path, preload_content=preload_content, **kw)
            except urllib3.exceptions.ProtocolError:
                sent = True
                # The connection dropped before an answer: most often a kept-alive one the
                # node closed (its idle timeout) just as this request went out on it. Once
                # more, on a new connection: every request here is idempotent (chunks are
                # immutable and named by their hash). A node refusing connections is not
                # retried (NewConnectionError), nor one that does not answer in time.
                return self._pool.request(method, self._prefix + path, preload_content=preload_content, **kw)
        except urllib3.exceptions.ReadTimeoutError:
            waited = kw.get("timeout", self._pool.timeout).read_timeout
            raise NodeError(self.url, f"{method} {path}: no answer within {waited:g} s "
                            "(connected, but the node did not answer)", unsure=True) from None
        except urllib3.exceptions.HTTPError as e:
            # (a request that never reached the node took no effect; any other may have)
            sent = sent or not isinstance(e, (urllib3.exceptions.NewConnectionError,
                                              urllib3.exceptions.ConnectTimeoutError))
            raise NodeError(self.url, f"{method} failed: {type(e).__name__}: {e}", unsure=sent) from None

    def get(self, hex_id):
        r = self._request("GET", "/chunks/" + hex_id, preload_content=False)
        done = False
        try:
            if r.status != 200:
                try:
                    text = _small(self.url, r, "GET", limit=500, cut=True)
                except NodeError:
                    text = b""
                raise NodeError(self.url, f"GET chunk {hex_id[:16]}: HTTP {r.status}{_why(r, text)}",
                                missing=r.status == 404)
            # No body larger than any envelope is read into memory: a node (or a proxy in
            # front of it) answering with an endless or huge body is a failed node, not an
            # out-of-memory mount.
            length = r.headers.get("Content-Length")
            if length is not None and not (length.isascii() and length.isdigit()):  # ("²".isdigit())
                raise NodeError(self.url, f"GET chunk {hex_id[:16]}: a Content-Length of {length!r}")
            if length is not None and int(length) > envelope.MAX_STORED:
                raise NodeError(self.url, f"GET chunk {hex_id[:16]}: an answer of {length} bytes is not a chunk")
            # urllib3's timeout bounds each socket read, not the answer: a node trickling a
            # byte now and then held this thread (one of the pool's) for as long as it liked.
            late = _deadlines.watch(r, BODY_DEADLINE)
            try:
                if length is not None and not r.chunked:
                    data = r.read(decode_content=False)  # (Content-Length bytes, into one buffer)
                else:  # chunked (which overrides a Content-Length sent with it): read up to the bound
                    parts, n = [], 0
                    for part in r.stream(1 << 20, decode_content=False):
                        n += len(part)
                        if n > envelope.MAX_STORED:
                            raise NodeError(self.url, f"GET chunk {hex_id[:16]}: an answer of over "
                                            f"{envelope.MAX_STORED} bytes is not a chunk")
                        parts.append(part)
                    data = b"".join(parts)
                if late[0]:
                    raise OSError("shut")  # (whatever the read made of it: see below)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if late[0]:
                    raise NodeError(self.url, f"GET chunk {hex_id[:16]}: the answer took over "
                                    f"{BODY_DEADLINE:g} s") from None
                if isinstance(e, urllib3.exceptions.ReadTimeoutError):
                    raise NodeError(self.url, f"GET chunk {hex_id[:16]}: the answer stopped for over "
                                    f"{self._pool.timeout.read_timeout:g} s") from None
                if isinstance(e, OSError):
                    raise
                raise NodeError(self.url, f"GET chunk {hex_id[:16]}: {type(e).__name__}: {e}") from None
            finally:
                _deadlines.done(late)
            done = True
            return data
        finally:
            if not done:
                r.close()  # (a body left unread: the connection is not used again)
            r.release_conn()

    def put(self, hex_id, blob):
        headers = {**self._auth, "Content-Type": "application/octet-stream"}
        if envelope.is_sealed(blob):  # (see SEALED_HASH)
            headers[SEALED_HASH] = blake3.blake3(blob, max_threads=1).hexdigest()
        r = self._request("PUT", "/chunks/" + hex_id, body=blob, headers=headers, preload_content=False)
        text = _small(self.url, r, f"PUT chunk {hex_id[:16]}")
        if r.status in (200, 201, 204):
            return
        raise NodeError(self.url, f"PUT chunk {hex_id[:16]}: HTTP {r.status}{_why(r, text)}",
                        full=r.status == 507)

    def has(self, hex_id):
        r = self._request("HEAD", "/chunks/" + hex_id)
        if r.status in (200, 404):
            return r.status == 200
        raise NodeError(self.url, f"HEAD chunk {hex_id[:16]}: HTTP {r.status}")

    def delete(self, hex_id):
        r = self._request("DELETE", "/chunks/" + hex_id, headers=self._auth, preload_content=False)
        text = _small(self.url, r, "DELETE chunk")
        if r.status not in (200, 204, 404):
            raise NodeError(self.url, f"DELETE chunk: HTTP {r.status}{_why(r, text)}")

    def unsure(self):  # (a server says why; nginx answers 503 without the marker: a NodeError)
        return self.health(used=False).get("unsure")

    def probe_write(self):  # deleting an id no chunk has: the server checks the token, changes nothing
        self.delete("0" * 64)
        if self.health(used=False).get("writable") is False:  # (a server that says: nginx does not)
            raise NodeError(self.url, "the node's directory is read-only")

    def health(self, used=True):  # the server keeps its own count: cheap either way
        # (a short wait: a node that accepts but hangs must not stall `node ls`, `doctor` or a
        # put's node check for the whole chunk timeout)
        r = self._request("GET", "/health", timeout=urllib3.Timeout(connect=self._connect_timeout,
                                                                    read=HEALTH_TIMEOUT), preload_content=False)
        text = _small(self.url, r, "health", deadline=HEALTH_TIMEOUT)
        if r.status != 200:
            raise NodeError(self.url, f"health: HTTP {r.status}{_why(r, text)}")
        import json
        try:
            got = json.loads(text)
        except (ValueError, RecursionError):  # (RecursionError: a few thousand nested arrays)
            got = None
        if not isinstance(got, dict):
            raise NodeError(self.url, "health answer is not a JSON object")
        return got

    def close(self):
        self._pool.close()


def open_store(url: str, token: str | None = None) -> NodeStore:
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UsageError(f"node URL {url!r} contains control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        raise UsageError(f"node URL {url!r} does not parse: {e}") from None
    if parts.scheme == "file":
        if not parts.path.startswith("/") or parts.netloc not in ("", "localhost"):
            raise UsageError(f"file node URL must be file:///absolute/path, not {url!r}")
        return FileStore(url, parts.path)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise UsageError(f"node URL {url!r} has no host")
        try:
            port = parts.port  # (raises for a port out of 0..65535 or not a number)
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise UsageError(f"node URL {url!r} has a bad port; use http://host:1..65535")
        return HttpStore(url, token)
    raise UsageError(f"unsupported node URL {url!r}; use file:///path or http://host:port")
