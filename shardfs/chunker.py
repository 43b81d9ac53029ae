"""Cutting a file into chunks. The manifest stores (id, length), so any cut works.

safetensors files are cut along their own table of contents: the header is its own chunk
and every tensor of at least chunk_size/8 starts a chunk (smaller neighbours share one,
larger ones split into chunk_size pieces). Changing one tensor, or the header's length, then leaves
every other chunk byte-identical, so a fine-tune stored next to its base costs only the
tensors it changed. Each chunk also gets a codec hint from its tensors' dtype.
GGUF files are cut the same way along their tensor table (tensor extents run from one
tensor's offset to the next, so no quantization block sizes are needed). Other files
(.pt zips, .bin) are cut into fixed-size chunks.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

from .errors import UsageError

DEFAULT_CHUNK = 4 << 20
MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20
MAX_HEADER = 100 << 20  # safetensors' own limit
# Headers parsed for a model-aware cut (put) and for prefetch (the mount daemon, on every
# open) stay within these: JSON of tiny containers (`[],[],...`) takes ~25 times its size
# once parsed (a 100 MiB one took 2.7 GB). A real header holds a few hundred bytes per 3
# containers of a tensor entry; one past either limit is cut like any other file.
MAX_PARSED_HEADER = 16 << 20
CONTAINER_BYTES = 8  # at most one { or [ per this many header bytes
MAX_GGUF_NAME = 64 << 10  # a GGUF key or tensor name (real ones: under 100 bytes)
# A tensor-aligned cut may make at most this many more chunks than a fixed one: tiny tensors
# of alternating dtypes (or gaps between them) each closed a group, 100k chunks for 6.5 MB.
EXTRA_SPANS = 4096

# dtype -> codec name: byte grouping by element width, none for bytes and packed types.
# Floats use zstd streams: lz4 cannot entropy-code an exponent byte (bf16 0.67 of raw against
# 0.84 with lz4, fp32 0.84 against 0.92), and the tuned zstd encodes faster and decodes as fast.
DTYPE_CODEC = {"BF16": "zstd-g2", "F16": "zstd-g2", "I16": "lz4-g2", "U16": "lz4-g2",
               "F32": "zstd-g4", "I32": "lz4-g4", "U32": "lz4-g4",
               "F64": "lz4-g4", "I64": "lz4-g4", "U64": "lz4-g4",
               "I8": "lz4", "U8": "lz4", "BOOL": "lz4", "F8_E4M3": "lz4", "F8_E5M2": "lz4"}


@dataclass(frozen=True)
class Span:
    offset: int
    length: int
    codec: str | None = None  # None: let the encoder try
    dtype: str | None = None


def check_chunk_size(size: int) -> int:
    if not MIN_CHUNK <= size <= MAX_CHUNK:
        raise UsageError(f"chunk size must be between 64 KiB and 64 MiB, not {size} bytes")
    return size


def fixed_spans(file_size: int, chunk_size: int = DEFAULT_CHUNK) -> list[Span]:
    return [Span(off, min(chunk_size, file_size - off)) for off in range(0, file_size, chunk_size)]


def safetensors_tensors(f, file_size: int):
    """[(start, end, dtype)] of the tensor data in file order, or None if not safetensors.

    Leaves the file positioned at 0."""
    try:
        return _safetensors_tensors(f, file_size)
    finally:
        f.seek(0)


def _safetensors_tensors(f, file_size: int):
    named = safetensors_named(f, file_size)
    return None if named is None else sorted((s, e, d) for _n, s, e, d in named)


def safetensors_named(f, file_size: int):
    """[(name, start, end, dtype)] of a safetensors file's tensors in header order, or None.

    Reads from the file's position 0 (f may be a BytesIO over its first chunk)."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(MAX_PARSED_HEADER, file_size - 8):
        return None
    raw = f.read(n)
    if 0 < len(raw) < n:  # (a source may return less per read)
        parts, got = [raw], len(raw)
        while got < n and (more := f.read(n - got)):
            parts.append(more)
            got += len(more)
        raw = b"".join(parts)
    if len(raw) != n or raw.count(b"{") + raw.count(b"[") > n // CONTAINER_BYTES + 64:
        return None
    try:  # (UTF-8 only, as safetensors has it: json.loads would take UTF-16 or a BOM from bytes)
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # (RecursionError: nesting 100k deep)
        return None
    if not isinstance(header, dict):
        return None
    base = 8 + n
    out = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return None
        if type(a) is not int or type(b) is not int:  # (not 4.0, true, "4" or Infinity)
            return None
        d = t.get("dtype")  # (shown by `info`: no control characters, no essays)
        out.append((name, base + a, base + b, d if isinstance(d, str) and d.isprintable() and len(d) <= 32
                    else "unknown"))
    if any(s < base or e > file_size or e < s for _n, s, e, _d in out):
        return None
    return out


GGML_DTYPE = {0: "F32", 1: "F16", 30: "BF16", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_GGUF_ITEMS = 1 << 24
# Tensor infos are kept (~200 bytes each parsed); key/value items are skipped, not built,
# but each string or nested array in them is a read: both capped, so a hostile header
# costs bounded memory and time (a real one: a few thousand tensors, ~0.5M vocabulary strings).
MAX_GGUF_TENSORS = 1 << 19
MAX_GGUF_KV_STEPS = 1 << 21


def gguf_tensors(f, file_size: int):
    """[(start, end, dtype)] of a GGUF file's tensor data in file order, or None.

    Leaves the file positioned at 0."""
    # (its key/values are read field by field: a vocabulary of 150k strings is 300k reads,
    # one syscall each from put's unbuffered file without a buffer in front)
    buf = io.BufferedReader(f, 1 << 20) if isinstance(f, io.RawIOBase) else f
    try:
        return _gguf_tensors(buf, file_size)
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, RecursionError):
        return None
    finally:
        if buf is not f:
            buf.detach()  # f stays open (a seek of buf may stay within its buffer: seek f itself)
        f.seek(0)


def _gguf_tensors(f, file_size: int):
    f.seek(0)
    head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        return None
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3) or n_tensors > MAX_GGUF_TENSORS or n_kv > MAX_GGUF_ITEMS:
        return None
    steps = 0

    def read(n):
        data = f.read(n)
        if len(data) != n:
            raise ValueError("truncated GGUF header")
        return data

    def string():
        (n,) = struct.unpack("<Q", read(8))
        if n > MAX_GGUF_NAME:
            raise ValueError("GGUF key or tensor name too long")
        return read(n).decode()

    def skip_bytes(n):
        if f.tell() + n > file_size:
            raise ValueError("truncated GGUF header")
        f.seek(n, io.SEEK_CUR)

    def skip(t):
        """Past one value of type t, building nothing (only general.alignment is used)."""
        nonlocal steps
        steps += 1
        if steps > MAX_GGUF_KV_STEPS:
            raise ValueError("GGUF key/values too many")
        if t in _GGUF_SCALAR:
            skip_bytes(struct.calcsize(_GGUF_SCALAR[t]))
        elif t == 8:
            skip_bytes(struct.unpack("<Q", read(8))[0])
        elif t == 9:
            it, n = struct.unpack("<IQ", read(12))
            if it in _GGUF_SCALAR:  # one seek for the whole array
                skip_bytes(n * struct.calcsize(_GGUF_SCALAR[it]))
            else:
                for _ in range(n):
                    skip(it)
        else:
            raise ValueError(f"unknown GGUF value type {t}")

    alignment = 32
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack("<I", read(4))
        if key == "general.alignment" and t in _GGUF_SCALAR and t not in (6, 7, 12):  # an integer
            fmt = _GGUF_SCALAR[t]
            v = struct.unpack(fmt, read(struct.calcsize(fmt)))[0]
            if v > 0:
                alignment = v
        else:
            skip(t)
    infos = []
    for _ in range(n_tensors):
        string()
        (n_dims,) = struct.unpack("<I", read(4))
        if n_dims > 8:
            raise ValueError("too many GGUF dimensions")
        read(8 * n_dims)
        gtype, offset = struct.unpack("<IQ", read(12))
        infos.append((offset, GGML_DTYPE.get(gtype, f"GGML{gtype}")))
    base = -(-f.tell() // alignment) * alignment
    infos.sort()
    out = []
    for i, (off, dtype) in enumerate(infos):
        end = infos[i + 1][0] if i + 1 < len(infos) else file_size - base
        out.append((base + off, base + end, dtype))
    if not out or out[0][0] < base or any(e > file_size or e < s for s, e, _ in out):
        return None
    return out


def plan_spans(f, file_size: int, chunk_size: int = DEFAULT_CHUNK) -> list[Span]:
    """Chunk spans covering the file, tensor-aligned for safetensors and GGUF."""
    tensors = safetensors_tensors(f, file_size) or gguf_tensors(f, file_size)
    if not tensors:
        return fixed_spans(file_size, chunk_size)
    spans = [Span(0, tensors[0][0], "lz4", "header")]
    pos = tensors[0][0]
    group_start, group_dtype = None, None

    def close_group(end):
        nonlocal group_start
        if group_start is not None and end > group_start:
            spans.append(Span(group_start, end - group_start, DTYPE_CODEC.get(group_dtype), group_dtype))
        group_start = None

    for start, end, dtype in tensors:
        start = max(start, pos)  # tensors may share bytes (aliases): each byte is cut once
        if end <= start:
            continue
        if start > pos:  # a gap between tensors: its own span
            close_group(pos)
            spans.append(Span(pos, start - pos))
        size = end - start
        if size >= max(MIN_CHUNK, chunk_size // 8):
            # big enough to stand alone: grouping it would let one inserted tensor shift
            # every later group boundary and defeat dedup
            close_group(start)
            for off in range(start, end, chunk_size):
                spans.append(Span(off, min(chunk_size, end - off), DTYPE_CODEC.get(dtype), dtype))
        else:
            if group_start is not None and (end - group_start > chunk_size or dtype != group_dtype):
                close_group(start)
            if group_start is None:
                group_start, group_dtype = start, dtype
        pos = max(pos, end)
    close_group(pos)
    if pos < file_size:
        spans.append(Span(pos, file_size - pos))
    # a header, gap or tail is cut like any other long stretch (a chunk holds at most MAX_CHUNK)
    out = [Span(off, min(chunk_size, s.offset + s.length - off), s.codec, s.dtype)
           for s in spans if s.length > 0 for off in range(s.offset, s.offset + s.length, chunk_size)]
    if len(out) > -(-file_size // chunk_size) + EXTRA_SPANS:
        return fixed_spans(file_size, chunk_size)  # (every chunk costs index space and round trips)
    return out
