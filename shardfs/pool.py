"""The registered nodes as stores: health probes and verified reads with failover.

Blocking and thread-safe: the CLI calls it from worker threads, the mount from
trio.to_thread. Every byte it returns has been decoded and hashed against its chunk id;
a node that answers with a bad copy only causes a failover (logged once per copy).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from . import envelope
from .errors import ChunkUnavailable, CorruptChunk, NodeError
from .index import Node
from .metrics import FETCH_SECONDS, NODE_ERRORS
from .placement import rank
from .stores import NodeStore, open_store

log = logging.getLogger("shardfs.pool")

COOLDOWN = 5.0  # seconds a node that failed is tried last
DISK_RETRY = 60.0  # seconds before a node that did not say where its chunks live is asked again
HEDGE_AFTER = float(os.environ.get("SHARDFS_HEDGE_AFTER", "1.0"))  # seconds before racing a 2nd replica
# A read gives up (ChunkUnavailable) when no replica has answered for this long: a file://
# node on a hung network filesystem blocks in the kernel with no timeout of its own, and an
# HTTP node's timeout is per socket read, so one that trickles is never cut off by it.
READ_DEADLINE = float(os.environ.get("SHARDFS_READ_DEADLINE", "120"))
ATTEMPTS = 32  # requests to nodes running at once (threads); one node may hold half of them


class NodePool:
    def __init__(self, nodes: dict[str, Node]):
        self.nodes = dict(nodes)
        self._stores: dict[str, NodeStore] = {}
        self._lock = threading.Lock()
        self._failed_at: dict[str, float] = {}
        self._reported: set[tuple[str, str]] = set()
        self._disks: dict[str, tuple[str | None, float]] = {}  # node id -> (disk_id, when asked)
        self.corrupt_copies = 0
        self.failovers = 0
        self.hedges = 0
        self._hedge_pool = ThreadPoolExecutor(ATTEMPTS, thread_name_prefix="fetch")
        # requests started per node and not yet answered: a hung node holds its threads until
        # it answers, so it is not given more than half of them (the others are for the rest)
        self._running: dict[str, int] = {}

    def store(self, nid: str) -> NodeStore:
        with self._lock:
            st = self._stores.get(nid)
            if st is None:
                node = self.nodes.get(nid)
                if node is None:  # unregistered while a read was on its way
                    raise NodeError(nid, "node is no longer registered")
                st = self._stores[nid] = open_store(node.url, node.token)
            return st

    def update(self, nodes: dict[str, Node]) -> None:
        with self._lock:
            for nid in list(self._stores):
                if nid not in nodes or nodes[nid].url != self.nodes[nid].url:
                    self._stores.pop(nid).close()
                    self._disks.pop(nid, None)
            self.nodes = dict(nodes)

    def probe(self, used: bool = False) -> dict[str, dict | NodeError]:
        """Health of every node, probed in parallel: id -> health dict or the error.
        used=True also counts the bytes each node holds (slow on big file:// nodes)."""
        def one(nid):
            try:
                return nid, self.store(nid).health(used)
            except NodeError as e:
                return nid, e
        if not self.nodes:
            return {}
        with ThreadPoolExecutor(len(self.nodes)) as ex:
            return dict(ex.map(one, self.nodes))

    def mark_failed(self, nid: str) -> None:
        self._failed_at[nid] = time.monotonic()

    def order(self, hex_id: str, locs) -> list[str]:
        """Replica preference: rendezvous order, recently failed nodes last, unknown nodes dropped."""
        nodes = self.nodes  # (one snapshot: update() replaces it from other threads)
        known = {n: nodes[n].weight for n in locs if n in nodes}
        ranked = rank(hex_id, known)
        now = time.monotonic()
        return sorted(ranked, key=lambda n: now - self._failed_at.get(n, -1e9) < COOLDOWN)

    def disk_of(self, nid: str) -> str | None:
        """The disk_id of the filesystem holding a node's chunks, or None when the node does
        not say. Asked once per node (a failed ask is retried after DISK_RETRY seconds), and
        never an error: the answer only decides whether the mount caches the node's chunks."""
        now = time.monotonic()
        with self._lock:
            known = self._disks.get(nid)
            if known is not None and (known[0] is not None or now - known[1] < DISK_RETRY):
                return known[0]
        disk, st = None, None
        try:
            st = self.store(nid)
            answer = st.health(used=False)
            disk = answer.get("disk") if isinstance(answer, dict) else None
            disk = disk if isinstance(disk, str) else None
        except Exception as e:  # noqa: BLE001 - unreachable now, a URL gone bad, a broken answer
            log.debug("node %s does not say which filesystem holds its chunks: %s", nid, e)
        with self._lock:
            if st is not None and self._stores.get(nid) is st:  # not replaced meanwhile (update)
                self._disks[nid] = (disk, now)
        return disk

    def read(self, hex_id: str, locs, keyring=None) -> bytes:
        return self.read_from(hex_id, locs, keyring)[0]

    def read_from(self, hex_id: str, locs, keyring=None) -> tuple[bytes, str]:
        """Raw bytes of a chunk, verified, from the first replica that serves a good copy,
        and the id of the node that served it.

        Replicas are tried in preference order; a replica that has not answered within
        HEDGE_AFTER seconds is raced by a request to the next one (a hung or slow node
        costs that delay, not its full timeout). Errors, timeouts and bad copies fail over.
        With no answer from any replica for READ_DEADLINE seconds: ChunkUnavailable."""
        cid = bytes.fromhex(hex_id)
        order = self.order(hex_id, locs)
        errors: list[str] = []
        pending: dict = {}
        nxt = 0
        deadline = time.monotonic() + READ_DEADLINE
        try:
            while pending or nxt < len(order):
                if nxt < len(order):
                    nid = order[nxt]
                    nxt += 1
                    with self._lock:
                        busy = self._running.get(nid, 0) >= ATTEMPTS // 2
                        if not busy:
                            self._running[nid] = self._running.get(nid, 0) + 1
                    if busy:
                        errors.append(f"{nid}: {ATTEMPTS // 2} requests to it are still unanswered")
                        continue
                    pending[self._hedge_pool.submit(self._attempt, nid, hex_id, cid, keyring)] = nid
                left = deadline - time.monotonic()
                if left <= 0:
                    for fut, nid in pending.items():
                        if fut.running():
                            self.mark_failed(nid)
                        errors.append(f"{nid}: no answer within {READ_DEADLINE:g} s")
                    break
                timeout = min(HEDGE_AFTER, left) if nxt < len(order) else left
                done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for fut in done:
                    nid = pending.pop(fut)
                    try:
                        return fut.result(), nid
                    except NodeError as e:  # (_attempt marked the node failed)
                        errors.append(str(e))
                    except CorruptChunk as e:
                        self.report_corrupt(hex_id, nid, e)
                        errors.append(f"{nid}: corrupt copy ({e})")
                    if nxt < len(order):
                        with self._lock:  # an error sends us on to the next replica
                            self.failovers += 1
                if not done and pending and nxt < len(order):
                    with self._lock:
                        self.hedges += 1
                    for fut, nid in pending.items():  # no answer in HEDGE_AFTER: asked last for a while
                        if fut.running():  # (not one still queued behind other requests)
                            self.mark_failed(nid)
        finally:
            for fut, nid in pending.items():  # a hung request ends when it ends; nobody waits for it
                if fut.cancel():  # (never started: it holds no thread)
                    with self._lock:
                        self._running[nid] -= 1
        raise ChunkUnavailable(f"chunk {hex_id[:16]}: no replica could serve it: "
                               + "; ".join(errors or ["no locations"]))

    def _attempt(self, nid: str, hex_id: str, cid: bytes, keyring=None) -> bytes:
        t0 = time.monotonic()
        try:
            raw = envelope.decode(self.store(nid).get(hex_id), cid, keyring)
        except (NodeError, CorruptChunk) as e:
            NODE_ERRORS.labels(nid).inc()
            if isinstance(e, NodeError) and not e.missing:
                self.mark_failed(nid)  # here, not by the reader: nobody waits for a raced request
            raise
        except Exception as e:  # noqa: BLE001 - (a URL the store refuses, MemoryError): that
            NODE_ERRORS.labels(nid).inc()  # node fails, the next replica is still tried
            self.mark_failed(nid)
            raise NodeError(nid, f"{type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._running[nid] -= 1
        FETCH_SECONDS.labels(nid).observe(time.monotonic() - t0)
        return raw

    def report_corrupt(self, hex_id: str, nid: str, err: Exception) -> None:
        with self._lock:
            if (hex_id, nid) in self._reported:
                return
            self._reported.add((hex_id, nid))
            self.corrupt_copies += 1
        node = self.nodes.get(nid)
        log.warning("corrupt copy of chunk %s on node %s (%s): %s", hex_id, nid, node.url if node else "?", err)

    def close(self) -> None:
        with self._lock:
            for st in self._stores.values():
                st.close()
            self._stores.clear()
        self._hedge_pool.shutdown(wait=False, cancel_futures=True)
