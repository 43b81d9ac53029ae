"""The control socket of a running mount: cache stats, evict, warm, pin, unpin.

A unix stream socket (mode 0600; the peer's uid is checked with SO_PEERCRED: only the
mount's owner and root are answered). One request per connection, one JSON object per
line: {"op": ..., "names": [...], "all": bool}. The daemon answers with zero or more
{"progress": done, "total": n, "name": ...} lines (a warm), {"alive": true} lines (every 5 s
while it works), and one final {"ok": true, "result": ...} or {"ok": false, "error": "..."}.

The socket lives in a private per-user directory, named after the mountpoint, so the
CLI finds it from the mountpoint alone; the mount root also names it in the xattr
user.shardfs.control.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile

import trio

from .cache import FULL_WHY
from .errors import ChunkUnavailable, NotFound, ShardfsError, UsageError
from .mounttab import resolve, within
from .units import human

log = logging.getLogger("shardfs.control")

MAX_REQUEST = 1 << 20
KEEPALIVE = 5.0  # while it works, the daemon sends a line at least this often


def answer_wait() -> float:
    """The longest a client waits for a word from the daemon (SHARDFS_CONTROL_WAIT, 120 s).
    The daemon sends one at least every KEEPALIVE seconds while it works (_kept_alive), so
    this bounds a stopped or stuck daemon, not a long request."""
    raw = os.environ.get("SHARDFS_CONTROL_WAIT", "120")
    try:
        wait = float(raw)
    except ValueError:
        wait = 0
    if not 0 < wait < 1e9:
        raise UsageError(f"SHARDFS_CONTROL_WAIT={raw!r}: give the seconds to wait for the mount, e.g. 120")
    return wait


def socket_path(mountpoint: str, uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    # (not realpath: it stats the mount's root, which never returns if the daemon is hung)
    key = hashlib.sha256(os.fsencode(resolve(mountpoint))).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"shardfs-{uid}", f"{key}.sock")


def private_dir(d: str, uid: int | None = None) -> bool:
    """Whether d is a real directory of uid (this process's by default) that nobody else
    may write to or list. The socket directory sits in /tmp: one another user made first
    could swap our socket for theirs, or leave one nobody listens on, which makes a live
    mount look like a killed one."""
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == (os.geteuid() if uid is None else uid) \
        and not st.st_mode & 0o077


# -- daemon side ------------------------------------------------------------------------

async def serve(daemon, task_status=trio.TASK_STATUS_IGNORED):
    path = daemon.control_path
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not private_dir(os.path.dirname(path)):
            sock.close()
            raise ShardfsError(f"cannot make the control socket {path}: its directory is not private to "
                               f"this user (another user's, a link, or open to others); remove it and mount again")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise ShardfsError(f"cannot make the control socket {path}: {e.strerror or e}") from None
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _handle(daemon, stream), [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _send(stream, obj) -> None:
    await stream.send_all((json.dumps(obj) + "\n").encode())


async def _handle(daemon, stream) -> None:
    req = {}
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, daemon.uid):
            await _send(stream, {"ok": False, "error": "permission denied: not the mount's owner or root"})
            return
        buf = b""
        while b"\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            if len(buf) > MAX_REQUEST:
                await _send(stream, {"ok": False, "error": "request too large"})
                return
        req = json.loads(buf.split(b"\n", 1)[0])
        if not isinstance(req, dict):
            raise UsageError("a control request is one JSON object")
        lock = trio.Lock()  # (the keep-alive and a warm's progress share the stream)

        async def send(obj):
            async with lock:
                await _send(stream, obj)
        # A warm stops when its client leaves (Ctrl-C): what it fetched stays cached. Other
        # requests are short, and end what they began.
        result = await _kept_alive(send, lambda tell: _dispatch(daemon, req, tell),
                                   stop_when_left=req.get("op") == "warm")
        await _send(stream, {"ok": True, "result": result})
    except (ShardfsError, ValueError, KeyError, TypeError) as e:
        try:
            await _send(stream, {"ok": False, "error": str(e)})
        except trio.BrokenResourceError:
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        if req.get("op") == "warm":  # (Ctrl-C on `cache warm`: it stopped; see _kept_alive)
            log.info("cache warm of %s stopped: its client left", ", ".join(map(str, req.get("names") or [])))
    except Exception as e:  # noqa: BLE001 - a bug: logged, and the client is told, not left hanging
        log.exception("control request failed")
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
            e = e.exceptions[0]  # (a warm's error comes out of its nursery wrapped)
        why = str(e) if isinstance(e, ShardfsError) else f"internal error {e!r} (see its log)"
        try:
            await _send(stream, {"ok": False, "error": f"the mount failed to answer: {why}"})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    finally:
        await stream.aclose()


async def _kept_alive(send, work, stop_when_left: bool = False):
    """await work(tell) while a line goes to the client every KEEPALIVE seconds: the client
    waits for a word from the daemon (answer_wait()), however long the work takes. work
    sends its own lines with tell. With stop_when_left, the work is cancelled once a line
    finds the client gone (then trio.BrokenResourceError: there is no one to answer)."""
    box = {}
    scope = trio.CancelScope()

    async def tell(obj):
        try:
            await send(obj)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if stop_when_left:
                scope.cancel()
            raise

    async def alive():
        try:
            while True:
                await trio.sleep(KEEPALIVE)
                await tell({"alive": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left (the work goes on, unless stop_when_left)
    async with trio.open_nursery() as n:
        n.start_soon(alive)
        with scope:
            try:
                box["result"] = await work(tell)
            except Exception as e:  # noqa: BLE001 - raised below, outside the nursery (not grouped)
                box["error"] = e
            finally:
                n.cancel_scope.cancel()
    if scope.cancel_called and "result" not in box:  # (caught by the nursery's scope, also cancelled)
        raise trio.BrokenResourceError("the client left")
    if "error" in box:
        raise box["error"]
    return box["result"]


async def _models(daemon, req):
    names = req.get("names") or []
    if not names:
        raise UsageError("give one or more model names (or --all where allowed)")
    out = {}  # (each model once: a folder named 20k times over made a list of millions)
    for name in dict.fromkeys(names):
        if name.endswith("/"):  # a folder: every model under it
            found = [n for n in daemon.tree.current if n.startswith(name)]
            if not found:
                raise NotFound(f"no models under {name!r} in this mount")
            out.update(dict.fromkeys(found))
        else:
            daemon.entry_by_name(name)
            out[name] = None
        await trio.sleep(0)  # (a long request does not hold up reads)
    models = []
    for n in out:
        models.append(await daemon.open_model(daemon.entry_by_name(n)))
        await trio.sleep(0)
    return models


async def _dispatch(daemon, req, send):
    op = req.get("op")
    cache, reader = daemon.cache, daemon.reader
    if op == "stats":
        models = []
        cached_of = await daemon.cached_bytes_of(list(daemon.tree.current.values()))
        for name, entry in sorted(daemon.tree.current.items()):
            cached, distinct = cached_of.get(entry.vid, (None, None))
            models.append({"name": name, "version": entry.vid, "size": entry.size, "cached": cached,
                           # (of its distinct chunks: a chunk that repeats is cached once)
                           "cached_pct": round(100 * cached / distinct, 1) if cached is not None and distinct
                           else (100.0 if cached is not None else None),
                           "pinned": name in cache.pins(), "open": daemon.open_count.get(entry.vid, 0),
                           "prefetching": entry.vid in daemon._prefetching})
        return {"cache": cache.stats(), "models": models, "redis_ok": daemon.redis_ok,
                "index_conflict": daemon.index_conflict,
                "memory_buffer": reader.mem.used, "bytes_served": reader.bytes_served,
                "bytes_pushed": reader.bytes_pushed,
                "chunks_fetched": reader.fetched, "local_uncached": reader.local_uncached,
                "failovers": daemon.pool.failovers, "hedges": daemon.pool.hedges,
                "corrupt_copies": daemon.pool.corrupt_copies, "versions_in_memory": len(daemon.models),
                "polls": daemon.polls}
    if op == "evict":
        unremoved, kept = [], 0
        if req.get("all"):
            freed = await trio.to_thread.run_sync(cache.evict_all, unremoved)
            reader.mem.clear()
            for m in list(daemon.models.values()):
                await daemon.drop_kernel_pages(m)
        else:
            freed = 0
            ms = await _models(daemon, req)
            # chunks these models share with pinned others stay: evicting a model must not
            # undo another's pin (a pinned model lost its cached chunks to `evict` of a sibling)
            keep = cache.pinned_except({m.name for m in ms})
            kept = cache.cached_bytes({h for m in ms for h in m.hexes} & keep)
            for m in ms:
                freed += await trio.to_thread.run_sync(cache.evict, [h for h in m.hexes if h not in keep],
                                                       unremoved)
                reader.forget(m.hexes)
                await daemon.drop_kernel_pages(m)
        return {"freed": freed, "kept_pinned": kept,
                "unremoved": sum(n for n, _ in unremoved),
                "unremoved_count": len(unremoved), "why": unremoved[0][1] if unremoved else ""}
    if op == "warm":
        total = 0
        warmed = await _models(daemon, req)
        for m in warmed:
            state = {}

            def progress(done, size, state=state):
                state["done"], state["size"] = done, size

            async def ticker(m=m, state=state):
                try:
                    while True:
                        await trio.sleep(0.2)
                        if "done" in state:
                            await send({"progress": state["done"], "total": state["size"], "name": m.name})
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client left: tell cancelled the warm

            failure = None
            async with trio.open_nursery() as n:
                n.start_soon(ticker)
                try:
                    total += await reader.warm(m, progress)
                except ChunkUnavailable as e:
                    failure = str(e)  # raised after the nursery: errors inside it arrive grouped
                finally:
                    n.cancel_scope.cancel()
            if failure:
                raise ShardfsError(failure)
            await send({"progress": m.size, "total": m.size, "name": m.name})
        # every chunk went in, but a later one may have pushed an earlier one out again (LRU)
        for m in warmed:
            got, distinct = cache.cached_of(m.hexes, m.manifest.lengths)
            if got < distinct:
                break
        else:
            return {"bytes": total}
        if cache.full == "disk" or cache._free_disk() - cache.free_floor < distinct - got:
            # its disk has no room for the rest: a larger --cache-size would not help
            raise ShardfsError(f"{m.name}: only {human(got)} of its {human(distinct)} of chunks stayed in the "
                               f"cache: {FULL_WHY['disk']} ({human(cache.free_floor)} kept free on the cache's "
                               f"disk); free space there, or move the cache to a larger disk")
        if distinct > cache.limit:
            raise ShardfsError(f"{m.name}: its {human(distinct)} of chunks is more than the cache's whole limit "
                               f"({human(cache.limit)}): raise --cache-size (only {human(got)} stayed)")
        raise ShardfsError(f"{m.name}: only {human(got)} of its {human(distinct)} of chunks stayed in the cache "
                           f"(limit {human(cache.limit)}, {human(cache.used)} used): "
                           f"the models asked for (with what else is being read) do not fit; "
                           f"raise --cache-size, warm fewer, or pin them")
    if op == "pin":
        async with daemon.pin_lock:  # (see Daemon.pin_lock)
            ms = await _models(daemon, req)
            for m in ms:  # (writes the pins file: not on this thread)
                await trio.to_thread.run_sync(cache.pin, m.name, m.hexes, abandon_on_cancel=False)
        need = sum(dict(pair for m in ms for pair in zip(m.hexes, m.manifest.lengths)).values())
        return {"pinned": [m.name for m in ms], "bytes": need, "limit": cache.limit}
    if op == "unpin":
        async with daemon.pin_lock:
            return await _unpin(daemon, req)
    raise UsageError(f"unknown control op {op!r}")


async def _unpin(daemon, req):
    cache = daemon.cache
    names, missing = [], []
    pinned = cache.pins()
    for name in req.get("names") or []:
        if name.endswith("/"):  # a folder, as for pin: every pinned model under it
            under = [n for n in pinned if n.startswith(name)]
            names += under
            missing += [] if under else [name]
        elif name in pinned:
            names.append(name)
        else:
            missing.append(name)
    if missing:  # (before any is unpinned: a command that fails changes nothing)
        raise NotFound(f"not pinned: {', '.join(missing)}")
    names = list(dict.fromkeys(names))
    for name in names:
        await trio.to_thread.run_sync(cache.unpin, name, abandon_on_cancel=False)
    return {"unpinned": names}


# -- client side ------------------------------------------------------------------------

def request(mountpoint: str, req: dict, on_progress=None, timeout: float | None = None):
    """Send req, pass progress lines to on_progress, return the result. timeout: the longest
    wait for any line (default answer_wait())."""
    timeout = answer_wait() if timeout is None else timeout
    path = socket_path(mountpoint)
    if os.path.exists(path) and not private_dir(os.path.dirname(path)):
        raise ShardfsError(f"{os.path.dirname(path)} is not private to this user: not trusting the control "
                           "socket in it")
    if not os.path.exists(path):
        # a mount started by another user (root) names its socket in an xattr
        got = within(os.getxattr, mountpoint, "user.shardfs.control")
        if got is None:
            raise ShardfsError(f"the mount at {mountpoint} does not answer: its daemon is stopped or stuck "
                               f"(`shardfs umount --force {mountpoint}` stops it)")
        if isinstance(got, OSError):
            raise ShardfsError(f"{mountpoint} is not a running shardfs mount (no control socket)")
        path = os.fsdecode(got)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall((json.dumps(req) + "\n").encode())
        f = s.makefile("rb")
        for line in f:
            try:
                msg = json.loads(line)
            except ValueError:  # (a daemon killed mid-answer)
                raise ShardfsError(f"the mount at {mountpoint} sent a garbled answer") from None
            if msg.get("alive"):
                continue
            if "progress" in msg:
                if on_progress:
                    on_progress(msg)
                continue
            if not msg.get("ok"):
                raise ShardfsError(msg.get("error", "control request failed"))
            return msg.get("result")
        raise ShardfsError("the mount closed the control connection without an answer")
    except TimeoutError:
        raise ShardfsError(f"the mount at {mountpoint} has not answered for {timeout:g} s: its daemon is stopped "
                           f"or stuck (`shardfs umount --force {mountpoint}` stops it)") from None
    except OSError as e:
        raise ShardfsError(f"cannot talk to the mount at {mountpoint}: {e}") from None
    finally:
        s.close()
