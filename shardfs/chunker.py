"""Cutting a file into chunks. Fixed-size for now; the manifest allows any lengths."""

from __future__ import annotations

from .errors import UsageError

DEFAULT_CHUNK = 4 << 20
MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20


def check_chunk_size(size: int) -> int:
    if not MIN_CHUNK <= size <= MAX_CHUNK:
        raise UsageError(f"chunk size must be between 64 KiB and 64 MiB, not {size} bytes")
    return size


def fixed_spans(file_size: int, chunk_size: int = DEFAULT_CHUNK):
    """Yield (offset, length) spans covering the file."""
    for off in range(0, file_size, chunk_size):
        yield off, min(chunk_size, file_size - off)
