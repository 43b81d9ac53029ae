"""A version's manifest: the ordered list of (chunk id, raw length) that makes up the file.

Stored in Redis as bytes: b"SFM1", u32 count, then count x (32-byte id, u64 length).
Lengths are per chunk, so fixed-size, tensor-aligned and content-defined chunking all
share this one format.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from .errors import CorruptChunk

_MAGIC = b"SFM1"
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<32sQ")


@dataclass(frozen=True)
class Manifest:
    ids: tuple[bytes, ...]
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]  # start offset of each chunk; offsets[-1] + lengths[-1] == size

    @classmethod
    def build(cls, entries) -> "Manifest":
        ids, lengths, offsets, pos = [], [], [], 0
        for cid, length in entries:
            ids.append(bytes(cid))
            lengths.append(int(length))
            offsets.append(pos)
            pos += int(length)
        return cls(tuple(ids), tuple(lengths), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1] + self.lengths[-1] if self.ids else 0

    def __len__(self) -> int:
        return len(self.ids)

    def locate(self, offset: int) -> int:
        """Index of the chunk holding byte `offset` (offset < size)."""
        return bisect.bisect_right(self.offsets, offset) - 1

    def span(self, offset: int, length: int) -> range:
        """Indexes of the chunks overlapping [offset, offset+length)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(self.locate(offset), self.locate(end - 1) + 1)

    def encode(self) -> bytes:
        return _HEAD.pack(_MAGIC, len(self.ids)) + b"".join(
            _ENTRY.pack(i, n) for i, n in zip(self.ids, self.lengths))

    @staticmethod
    def framing_error(blob: bytes) -> str | None:
        """What is wrong with the header or length of an encoded manifest, or None: a cheap
        check, without decoding its entries."""
        try:
            magic, count = _HEAD.unpack_from(blob)
        except struct.error as e:
            return f"malformed manifest: {e}"
        if magic != _MAGIC:
            return f"malformed manifest: format {bytes(magic)!r} (a newer shardfs?), this release reads {_MAGIC!r}"
        if len(blob) != _HEAD.size + count * _ENTRY.size:
            return f"malformed manifest: {len(blob)} bytes for {count} entries"
        return None

    @classmethod
    def decode(cls, blob: bytes) -> "Manifest":
        try:
            if (why := cls.framing_error(blob)) is not None:
                raise CorruptChunk(why)
            m = cls.build(_ENTRY.iter_unpack(memoryview(blob)[_HEAD.size:]))
            if len(dict(zip(m.ids, m.lengths))) != len(set(zip(m.ids, m.lengths))):
                raise ValueError("one chunk id listed with two lengths")  # (a chunk's bytes are its id)
            return m
        except (struct.error, ValueError) as e:
            raise CorruptChunk(f"malformed manifest: {e}") from None
