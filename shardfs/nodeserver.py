"""`shardfs node serve`: the built-in HTTP node.

    GET/HEAD /chunks/<id>   the envelope (sendfile); 404 when absent from the directory the
                            chunks went to, 503 when that cannot be told (stores.MARKER)
    PUT /chunks/<id>        token required; the body must decode and hash to <id> (a sealed
                            one: carry it), and never replaces a sealed chunk already there
    DELETE /chunks/<id>     token required; 404 and 503 as for GET
    GET /health             {"used": bytes, "free": bytes, "chunks": n, "disk": "<boot id>:<st_dev>",
                             "root": "<boot id>:<st_dev>:<st_ino>", "writable": bool}

Ids must be 64 lowercase hex digits, so no request names a path outside the root.
Bodies are bounded by the largest possible envelope. Decoding a PUT body runs in a
worker thread so concurrent GETs keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import shutil
import signal
import time

import blake3
from aiohttp import web

from . import envelope
from .errors import CorruptChunk, NodeError, UsageError
from .stores import (HEX_ID, MARKER, SEALED_HASH, chunk_relpath, disk_id, init_root, not_found_why, read_token,
                     remove_stale_temp, root_id, write_atomic, write_refused)

log = logging.getLogger("shardfs.node")

PUT_BODIES = 4  # PUT bodies held at once (each up to envelope.MAX_STORED, ~64 MiB): the rest wait
KEEPALIVE = 75.0  # seconds an idle client connection is kept open
# seconds for a PUT's whole body: a client that stops sending mid-body (a `shardfs put`
# suspended with Ctrl-Z) held one of the PUT_BODIES slots for good, and four of them every PUT
PUT_BODY_DEADLINE = float(os.environ.get("SHARDFS_PUT_BODY_DEADLINE", "60"))


class NodeServer:
    def __init__(self, root: str, token: str | None):
        self.root = os.path.abspath(root)
        self.token = token
        self.used = 0
        self.chunks = 0
        self._bodies = asyncio.Semaphore(PUT_BODIES)
        self._ids: dict[str, list] = {}  # chunk id -> [lock, users]: see _one_at_a_time
        why = init_root(self.root, adopt=False)  # (marks a root it creates, never an empty one it finds)
        if why:
            raise UsageError(f"--root {root}: {why}")
        refused = write_refused(self.root)
        if refused:
            log.warning("writes are refused until the node directory is marked: %s", refused)
        now, swept = time.time(), 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if HEX_ID.fullmatch(name):
                    size = _size(os.path.join(dirpath, name))  # (None: deleted meanwhile, by gc through file://)
                    if size is not None:
                        self.chunks += 1
                        self.used += size
                else:
                    swept += remove_stale_temp(dirpath, name, now)  # left by a server killed mid-PUT
        if swept:
            log.info("removed %d temp file(s) a killed writer left under %s", swept, self.root)
        _raise_fd_limit()  # each GET holds a file open while it is sent

    def app(self) -> web.Application:
        app = web.Application(client_max_size=envelope.MAX_STORED, middlewares=[_count_requests])
        app.router.add_get("/health", self.health)
        app.router.add_get("/chunks/{cid}", self.get)  # (add_get routes HEAD too)
        app.router.add_put("/chunks/{cid}", self.put)
        app.router.add_delete("/chunks/{cid}", self.delete)
        return app

    def _path(self, request) -> str:
        cid = request.match_info["cid"]
        if not HEX_ID.fullmatch(cid):
            raise web.HTTPBadRequest(text="malformed chunk id\n")
        return os.path.join(self.root, chunk_relpath(cid))

    def _authorize(self, request) -> None:
        if self.token is None:
            return
        # "Bearer" is a scheme name, so any case (RFC 9110 11.1); the token itself is exact
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self.token.encode()):
            raise web.HTTPUnauthorized(text="missing or wrong token\n")

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, cid: str):
        """PUTs and DELETEs of one chunk id, one at a time: each looks at what the directory
        holds, changes it, and counts the change (used, chunks). Interleaved across the
        awaits in between, they counted one file twice, or a deleted one as kept (-1 chunks)."""
        slot = self._ids.setdefault(cid, [asyncio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._ids[cid]

    def _root_ok(self) -> None:
        if not os.path.isdir(self.root):
            raise web.HTTPServiceUnavailable(text=f"the node directory {self.root} is gone\n")

    async def health(self, request):
        self._root_ok()
        free = shutil.disk_usage(self.root).free
        return web.json_response({"used": self.used, "free": free, "chunks": self.chunks,
                                  "disk": disk_id(self.root), "root": root_id(self.root),
                                  "writable": os.access(self.root, os.W_OK),  # (False on a read-only mount)
                                  "unsure": not_found_why(self.root)})  # (see stores.NodeStore.unsure)

    async def get(self, request):
        path = self._path(request)
        # 404 says "this node does not have it", and verify --repair drops such copies: only
        # for a chunk truly absent from the directory the chunks went to (see stores.MARKER).
        # Any other failure is 503, a node that cannot answer now. The file is opened once and
        # sent from that descriptor: aiohttp's FileResponse opens by path again and answers 404
        # for any error there (out of file descriptors included).
        loop = asyncio.get_running_loop()
        try:
            f = await loop.run_in_executor(None, open, path, "rb", 0)
        except FileNotFoundError:
            why = not_found_why(self.root)
            if why:
                raise web.HTTPServiceUnavailable(text=why + "\n")
            raise web.HTTPNotFound()
        except OSError as e:
            raise web.HTTPServiceUnavailable(text=f"cannot read the chunk: {e.strerror}\n")
        with f:  # (a DELETE meanwhile unlinks the name; this descriptor still sends it whole)
            size = os.fstat(f.fileno()).st_size
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Cache-Control": "public, max-age=31536000, immutable"})
            resp.content_length = size
            await resp.prepare(request)  # (sends the headers)
            try:
                if request.method != "HEAD" and size:
                    if request.transport is None:
                        raise ConnectionResetError("the client went away")
                    await loop.sendfile(request.transport, f, 0, size)  # (copies if sendfile cannot)
                await resp.write_eof()
            except ConnectionError as e:  # a client that hung up mid-body (a read abandoned at its
                log.debug("GET %s: %s", request.match_info["cid"], e)  # deadline): routine
                resp.force_close()
        return resp

    async def put(self, request):
        path = self._path(request)
        self._authorize(request)
        if request.content_length is not None and request.content_length > envelope.MAX_STORED:
            raise web.HTTPRequestEntityTooLarge(envelope.MAX_STORED, request.content_length)
        self._root_ok()  # (before the body: a node that cannot take it says so at once)
        why = write_refused(self.root)
        if why:
            raise web.HTTPServiceUnavailable(text=why + "\n")
        async with self._bodies:  # each body is held whole while it is checked: a few at once
            return await self._put(request, path)

    async def _put(self, request, path):
        try:
            async with asyncio.timeout(PUT_BODY_DEADLINE):
                body = await request.read()  # bounded by client_max_size
        except TimeoutError:
            resp = web.Response(status=408, text=f"the body did not arrive within {PUT_BODY_DEADLINE:g} s\n")
            resp.force_close()  # (the rest of that body must not be read as a request)
            return resp
        cid = bytes.fromhex(request.match_info["cid"])
        try:
            sealed_checked = False
            if envelope.is_sealed(body):
                # encrypted: the node holds no key, so it checks the envelope, not the content;
                # readers verify the content against the keyed id
                if envelope.read_header(body)[3] != cid:
                    raise CorruptChunk("envelope carries another chunk id")
                sent = request.headers.get(SEALED_HASH)
                if sent is not None and not HEX_ID.fullmatch(sent.lower()):
                    raise CorruptChunk(f"{SEALED_HASH} is not a BLAKE3 hash in hex")
                if sent is not None:
                    got = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: blake3.blake3(body, max_threads=1).hexdigest())
                    if not hmac.compare_digest(sent.lower(), got):
                        raise CorruptChunk(f"body does not match its {SEALED_HASH}")
                    sealed_checked = True
            else:
                await asyncio.get_running_loop().run_in_executor(None, envelope.decode, body, cid)
        except CorruptChunk as e:
            raise web.HTTPUnprocessableEntity(text=f"body does not hash to its id: {e}\n")
        self._root_ok()
        why = write_refused(self.root)  # (see stores.MARKER)
        if why:
            raise web.HTTPServiceUnavailable(text=why + "\n")
        async with self._one_at_a_time(request.match_info["cid"]):
            was = _size(path)
            if was is not None and envelope.is_sealed(body) and not sealed_checked:
                # A sealed body can only be checked against its id's header, and against the
                # hash the client sent of it (stores.SEALED_HASH): without that, a second PUT must
                # not replace a copy that may be good with one that may have been damaged on its way.
                return web.Response(status=201)
            try:
                await asyncio.get_running_loop().run_in_executor(None, write_atomic, path, body)
            except NodeError as e:
                now = _size(path)  # (a failure after the rename leaves the new file in place)
                self.used += (now or 0) - (was or 0)
                self.chunks += (now is not None) - (was is not None)
                if e.full:
                    raise web.HTTPInsufficientStorage(text="node is out of space\n")
                raise web.HTTPInternalServerError(text=f"{e}\n")
            self.used += len(body) - (was or 0)
            self.chunks += was is None
        return web.Response(status=201)

    async def delete(self, request):
        path = self._path(request)
        self._authorize(request)
        async with self._one_at_a_time(request.match_info["cid"]):
            return self._delete(path)

    def _delete(self, path: str):
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            why = not_found_why(self.root)  # (as for GET: gc forgets a copy a 404 calls gone)
            if why:
                raise web.HTTPServiceUnavailable(text=why + "\n")
            raise web.HTTPNotFound()
        except OSError as e:
            raise web.HTTPServiceUnavailable(text=f"cannot delete the chunk: {e.strerror}\n")
        self.used -= size
        self.chunks -= 1
        return web.Response(status=204)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _raise_fd_limit() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


@web.middleware
async def _count_requests(request, handler):
    from .metrics import NODE_BYTES_SENT, NODE_REQUESTS
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        NODE_REQUESTS.labels(request.method, str(e.status)).inc()
        raise
    NODE_REQUESTS.labels(request.method, str(resp.status)).inc()
    if request.method == "GET" and resp.status == 200:
        NODE_BYTES_SENT.inc(resp.content_length or 0)
    return resp


def parse_listen(listen: str, option: str = "--listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} wants HOST:PORT with a port of 1..65535, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(root: str, listen: str, token_file: str | None, metrics: str | None = None) -> None:
    host, port = parse_listen(listen)
    token = read_token(token_file)
    top = os.path.abspath(root)  # the outermost directory of --root this call creates, if any
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    created = not os.path.exists(top)
    server = NodeServer(root, token)
    try:
        _run(server, host, port, listen, token, metrics)
    except UsageError:
        if created:  # a node that never served leaves no new empty directories behind
            d = server.root
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, MARKER))  # (its own, made with the directory)
            while True:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == top:
                    break
                d = os.path.dirname(d)
        raise


def _run(server: NodeServer, host: str, port: int, listen: str, token, metrics) -> None:
    if metrics:
        from .metrics import node_metrics, serve_metrics
        serve_metrics(metrics, lambda: node_metrics(server))
    async def main():
        # (aiohttp keeps an idle connection, and the file a stalled GET sends from, ~1 h)
        runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                               keepalive_timeout=KEEPALIVE)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from None
        if token is None:  # (once listening: a bind error is the one line, not a warning first)
            log.warning("no --token-file: any client that reaches %s can write and delete chunks", listen)
        print(f"shardfs node serving {server.root} on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
