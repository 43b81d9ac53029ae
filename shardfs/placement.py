"""Rendezvous (highest-random-weight) hashing: which nodes hold a chunk.

Each (node, chunk) pair gets a score -weight / ln(u), u uniform in (0, 1) from a hash
of both ids; the R highest-scoring nodes hold the chunk. Adding or removing a node only
moves the chunks whose top R it enters or leaves. Chosen locations are recorded in Redis,
so this ordering is a preference, never the only record of where a chunk is.
"""

from __future__ import annotations

import hashlib
import math


def score(node_id: str, chunk_hex: str, weight: float) -> float:
    h = hashlib.blake2b(f"{node_id}\0{chunk_hex}".encode(), digest_size=8).digest()
    u = (int.from_bytes(h, "big") + 1) / (2**64 + 1)  # strictly inside (0, 1)
    return -weight / math.log(u)


def rank(chunk_hex: str, nodes: dict[str, float]) -> list[str]:
    """Node ids in preference order for this chunk; `nodes` maps id -> weight (> 0)."""
    return sorted(nodes, key=lambda nid: score(nid, chunk_hex, nodes[nid]), reverse=True)
