"""Pure units: chunk envelope, codecs, manifest, names, placement."""

import os

import numpy as np
import pytest

from shardfs import envelope, placement
from shardfs.errors import CorruptChunk, UsageError
from shardfs.manifest import Manifest
from shardfs.names import check_name
from shardfs.synth import tensor_bytes
from shardfs.units import parse_size


@pytest.fixture(scope="module")
def bf16():
    return tensor_bytes(np.random.default_rng(0), (256, 4096), "BF16")


def test_roundtrip_every_codec(bf16):
    for name in envelope.CODECS:
        cid, blob, codec = envelope.encode(bf16, name)
        assert cid == envelope.chunk_id(bf16)
        assert envelope.decode(blob, cid) == bf16


def test_default_picks_grouping_for_bf16_and_raw_for_random(bf16):
    _, blob, codec = envelope.encode(bf16)
    assert codec == envelope.CODEC_ZSTD_GROUP2
    assert len(blob) < 0.70 * len(bf16)
    rnd = os.urandom(1 << 20)
    _, blob, codec = envelope.encode(rnd)
    assert codec == envelope.CODEC_RAW
    assert envelope.decode(blob) == rnd


def test_fp32_groups_by_four():
    f32 = tensor_bytes(np.random.default_rng(1), (128, 4096), "F32")
    _, blob, codec = envelope.encode(f32, "lz4-g4")
    assert codec == envelope.CODEC_LZ4_GROUP4
    assert len(blob) < 0.93 * len(f32)  # lz4 cannot entropy-code the sign+exponent byte
    assert envelope.decode(blob) == f32
    _, blob, codec = envelope.encode(f32, "zstd-g4")
    assert codec == envelope.CODEC_ZSTD_GROUP4
    assert len(blob) <= 0.87 * len(f32)  # zstd's Huffman stage can
    assert envelope.decode(blob) == f32


def test_zstd_grouping_beats_lz4_on_bf16(bf16):
    _, lz, _ = envelope.encode(bf16, "lz4-g2")
    _, zs, codec = envelope.encode(bf16, "zstd-g2")
    assert codec == envelope.CODEC_ZSTD_GROUP2 and len(zs) < 0.85 * len(lz)
    assert envelope.decode(zs) == bf16


def test_f16_high_bytes_compress_with_zstd_although_lz4_cannot():
    """The skip-if-incompressible probe must use the codec's own compressor."""
    f16 = tensor_bytes(np.random.default_rng(3), (256, 4096), "F16")
    _, blob, codec = envelope.encode(f16, "zstd-g2")
    assert codec == envelope.CODEC_ZSTD_GROUP2 and len(blob) < 0.87 * len(f16)
    assert envelope.decode(blob) == f16


def test_grouped_layout_is_fixed():
    """Envelopes written by earlier releases keep decoding: build one by hand from the spec."""
    import struct
    raw = bytes([1, 2, 3, 4, 5, 6, 7])  # words 0x0201, 0x0403, 0x0605, then tail 7
    streams = [bytes([1, 3, 5]), bytes([2, 4, 6])]
    payload = b"".join(struct.pack("<BI", 0, 3) for _ in streams) + b"".join(streams) + bytes([7])
    cid = envelope.chunk_id(raw)
    head = envelope.HEADER.pack(b"SFCK", 1, envelope.CODEC_LZ4_GROUP2, 0, len(raw), len(payload), cid)
    assert envelope.decode(head + payload, cid) == raw
    four = bytes(range(1, 10))
    np.testing.assert_array_equal(envelope._group(four, 4), [[1, 5], [2, 6], [3, 7], [4, 8]])


def test_zstd_stream_damage_is_caught(bf16):
    import struct
    import zstandard
    cid, blob, _ = envelope.encode(bf16, "zstd-g2")
    bad = bytearray(blob)
    bad[-100] ^= 0xFF  # inside the compressed exponent stream
    with pytest.raises(CorruptChunk):
        envelope.decode(bytes(bad), cid)
    # a stream that declares a huge size is refused before anything is allocated for it
    n = 4
    bomb = zstandard.ZstdCompressor().compress(bytes(16 << 20))  # declares 16 MiB for a 4-byte stream
    payload = struct.pack("<BI", 2, len(bomb)) + struct.pack("<BI", 0, n) + bomb + bytes(n)
    head = envelope.HEADER.pack(b"SFCK", 1, envelope.CODEC_ZSTD_GROUP2, 0, 2 * n, len(payload), cid)
    with pytest.raises(CorruptChunk, match="wrong length"):
        envelope.decode(head + payload)


@pytest.mark.parametrize("n", [0, 1, 3, 5, 4097])
def test_odd_lengths_keep_their_tail(n):
    raw = bytes(range(256)) * (n // 256 + 1)
    raw = raw[:n]
    for name in envelope.CODECS:
        _, blob, _ = envelope.encode(raw, name)
        assert envelope.decode(blob) == raw


def test_decode_rejects_every_kind_of_damage(bf16):
    cid, blob, _ = envelope.encode(bf16)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(CorruptChunk):
        envelope.decode(bytes(bad), cid)
    with pytest.raises(CorruptChunk):
        envelope.decode(blob[:-1], cid)
    with pytest.raises(CorruptChunk):
        envelope.decode(b"XXXX" + blob[4:], cid)
    with pytest.raises(CorruptChunk):
        envelope.decode(blob, b"\0" * 32)
    with pytest.raises(CorruptChunk):
        envelope.decode(blob[:10])
    future = bytearray(blob)
    future[4] = 99
    with pytest.raises(CorruptChunk, match="version"):
        envelope.decode(bytes(future))


def test_manifest_roundtrip_and_lookup():
    m = Manifest.build([(b"a" * 32, 10), (b"b" * 32, 5), (b"c" * 32, 7)])
    assert m.size == 22
    assert Manifest.decode(m.encode()) == m
    assert m.locate(0) == 0 and m.locate(9) == 0 and m.locate(10) == 1 and m.locate(21) == 2
    assert list(m.span(8, 4)) == [0, 1]
    assert list(m.span(22, 4)) == []
    with pytest.raises(CorruptChunk):
        Manifest.decode(m.encode()[:-1])


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/./b", "../x", "a/..", "x\0y", "tab\there",
                                 "a" * 256, "/".join(["d"] * 600)])
def test_bad_names_are_refused(bad):
    with pytest.raises(UsageError):
        check_name(bad)


def test_good_names():
    assert check_name("org/llama-3-8b.safetensors") == "org/llama-3-8b.safetensors"


def test_sizes():
    assert parse_size("4MiB") == 4 << 20
    assert parse_size("64k") == 64 << 10
    with pytest.raises(UsageError):
        parse_size("lots")


def test_rendezvous_is_stable_and_weighted():
    nodes = {"n1": 1.0, "n2": 1.0, "n3": 1.0}
    ids = [os.urandom(32).hex() for _ in range(3000)]
    first = [placement.rank(h, nodes)[0] for h in ids]
    assert all(placement.rank(h, nodes)[0] == f for h, f in zip(ids, first))
    counts = {n: first.count(n) for n in nodes}
    assert all(800 < c < 1200 for c in counts.values()), counts
    # Adding a node moves only chunks whose winner becomes the new node.
    more = {**nodes, "n4": 1.0}
    moved = [h for h, f in zip(ids, first) if placement.rank(h, more)[0] not in (f, "n4")]
    assert moved == []
    heavy = {"n1": 3.0, "n2": 1.0}
    wins = sum(placement.rank(h, heavy)[0] == "n1" for h in ids)
    assert 0.7 < wins / len(ids) < 0.8


def test_a_small_chunk_is_never_stored_larger_than_raw():
    """The grouped codecs' stream table (5 bytes a stream) counts against the saving: a few
    hundred compressible bytes were stored larger than raw."""
    for n in range(2, 400, 2):
        raw = (np.arange(n // 2, dtype=np.uint16) % 3 + 0x3F00).astype("<u2").tobytes()
        for name in envelope.CODECS:
            _, blob, _ = envelope.encode(raw, name)
            assert len(blob) - envelope.HEADER_SIZE <= len(raw), (n, name)
            assert envelope.decode(blob) == raw
