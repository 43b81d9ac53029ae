"""Model-aware storage: tensor-aligned chunks, dtype-chosen codecs, dedup across versions."""

import hashlib
import io
import json
import re
import struct

import numpy as np
import pytest

from shardfs.chunker import fixed_spans, plan_spans
from shardfs.synth import tensor_bytes


def write_st(path, tensors):
    """tensors: list of (name, dtype, shape, bytes) in file order."""
    header, off = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for *_, data in tensors:
            f.write(data)


def base_tensors(rng, n=20, rows=256):
    return [(f"layer.{i}.weight", "BF16", [rows, 4096], tensor_bytes(rng, (rows, 4096), "BF16")) for i in range(n)]


def test_chunks_start_at_tensors_and_header_is_alone(tmp_path):
    rng = np.random.default_rng(0)
    ts = base_tensors(rng, 6, rows=700) + [("tiny.a", "F32", [10], b"\1" * 40), ("tiny.b", "F32", [10], b"\2" * 40)]
    write_st(tmp_path / "m.st", ts)
    size = (tmp_path / "m.st").stat().st_size
    with open(tmp_path / "m.st", "rb") as f:
        spans = plan_spans(f, size, 1 << 20)
    assert spans[0].dtype == "header"
    assert sum(s.length for s in spans) == size
    assert all(a.offset + a.length == b.offset for a, b in zip(spans, spans[1:]))
    hlen = struct.unpack("<Q", open(tmp_path / "m.st", "rb").read(8))[0] + 8
    starts = {s.offset for s in spans}
    for i in range(6):
        assert hlen + i * 700 * 4096 * 2 in starts  # each big tensor starts a chunk
    assert max(s.length for s in spans) <= 1 << 20
    assert spans[-1].codec == "zstd-g4" and spans[-1].length == 80  # small tensors share one chunk
    assert all(s.codec == "zstd-g2" for s in spans[1:-1])


def write_raw_st(path, header: dict, body: bytes) -> int:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return path.stat().st_size


def tiles(spans, size, chunk):
    assert all(a.offset + a.length == b.offset for a, b in zip(spans, spans[1:]))
    assert spans[0].offset == 0 and sum(s.length for s in spans) == size
    assert max(s.length for s in spans) <= chunk


def test_aliased_tensors_long_gaps_and_tails_are_cut_once_and_within_the_chunk_size(tmp_path):
    mib = 1 << 20
    # two tensors over the same bytes (aliases), one overlapping them
    p = tmp_path / "alias.st"
    size = write_raw_st(p, {"a": {"dtype": "F32", "shape": [2 * mib // 4], "data_offsets": [0, 2 * mib]},
                            "b": {"dtype": "F32", "shape": [2 * mib // 4], "data_offsets": [0, 2 * mib]},
                            "c": {"dtype": "F32", "shape": [2 * mib // 4], "data_offsets": [mib, 3 * mib]}},
                        bytes(3 * mib))
    with open(p, "rb") as f:
        tiles(plan_spans(f, size, mib), size, mib)
    # a 16-byte tensor, then 9 MiB of unlisted bytes, a tensor, and a 5 MiB tail
    p = tmp_path / "gaps.st"
    size = write_raw_st(p, {"t": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
                            "u": {"dtype": "U8", "shape": [16], "data_offsets": [9 * mib, 9 * mib + 16]}},
                        bytes(14 * mib))
    with open(p, "rb") as f:
        tiles(plan_spans(f, size, 4 * mib), size, 4 * mib)


def test_aliased_tensors_put_and_get_back(cli, nodes, tmp_path):
    from conftest import add_nodes
    add_nodes(cli, nodes, 1)
    p = tmp_path / "alias.safetensors"
    write_raw_st(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(range(16)))
    cli("put", p, "--name", "alias.safetensors")
    cli("get", "alias.safetensors", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == p.read_bytes()


def test_unknown_format_falls_back_to_fixed(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\3\4" + bytes(3 << 20))
    with open(p, "rb") as f:
        assert plan_spans(f, 4 + (3 << 20), 1 << 20) == fixed_spans(4 + (3 << 20), 1 << 20)


def test_hostile_headers_fall_back_to_fixed_chunks_without_an_exception(tmp_path):
    """Each raised out of the chunker (RecursionError, OverflowError): a traceback from put,
    and from the mount's prefetch, which parses the same header."""
    cases = {}
    deep = b"[" * 100000 + b"]" * 100000
    p = tmp_path / "deep.safetensors"
    p.write_bytes(struct.pack("<Q", len(deep)) + deep + bytes(64))
    cases[p] = p.stat().st_size
    p = tmp_path / "inf.safetensors"
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[Infinity,4]}}'
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(4))
    cases[p] = p.stat().st_size
    p = tmp_path / "float.safetensors"
    cases[p] = write_raw_st(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4))
    p = tmp_path / "deep.gguf"  # an array of arrays, 5000 deep, as the value of one key
    key = struct.pack("<Q", 1) + b"x"
    kv = key + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + bytes(64))
    cases[p] = p.stat().st_size
    for path, size in cases.items():
        with open(path, "rb") as f:
            assert plan_spans(f, size, 1 << 20) == fixed_spans(size, 1 << 20), path.name


def test_a_dtype_that_is_not_a_short_name_is_reported_as_unknown(tmp_path):
    from shardfs.chunker import safetensors_named
    p = tmp_path / "odd.safetensors"
    size = write_raw_st(p, {"a": {"dtype": "F32\x1b[2J", "shape": [1], "data_offsets": [0, 4]},
                            "b": {"dtype": "X" * 100, "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
    with open(p, "rb") as f:
        assert [t[3] for t in safetensors_named(f, size)] == ["unknown", "unknown"]


def test_finetune_next_to_its_base_costs_little(cli, nodes, tmp_path):
    n = nodes(1)[0]
    cli("node", "add", n.url)
    rng = np.random.default_rng(1)
    base = base_tensors(rng)
    tune = [(name, dt, shape, tensor_bytes(rng, shape, "BF16") if i % 10 == 3 else data)
            for i, (name, dt, shape, data) in enumerate(base)]  # 10% of tensors changed
    tune.insert(7, ("lora.extra", "BF16", [16, 4096], tensor_bytes(rng, (16, 4096), "BF16")))  # header grows
    write_st(tmp_path / "base.safetensors", base)
    write_st(tmp_path / "tune.safetensors", tune)
    cli("put", tmp_path / "base.safetensors", "--name", "base.safetensors")
    one = sum(f.stat().st_size for f in map(__import__("pathlib").Path, n.chunk_files()))
    cli("put", tmp_path / "tune.safetensors", "--name", "tune.safetensors")
    both = sum(f.stat().st_size for f in map(__import__("pathlib").Path, n.chunk_files()))
    assert both <= 1.15 * one, (both, one)
    for name in ("base", "tune"):
        cli("get", f"{name}.safetensors", tmp_path / f"{name}.out")
        assert hashlib.sha256((tmp_path / f"{name}.out").read_bytes()).digest() == \
            hashlib.sha256((tmp_path / f"{name}.safetensors").read_bytes()).digest()
    rows = {r["name"]: r for r in json.loads(cli("ls", "--json").stdout)}
    assert rows["tune.safetensors"]["shared"] > 0.8 * rows["tune.safetensors"]["stored"]


@pytest.mark.parametrize("dtype,limit", [("BF16", 0.70), ("F32", 0.86)])  # issue 6 asks 0.85 and 0.9
def test_weights_compress_by_dtype(cli, nodes, tmp_path, dtype, limit):
    from shardfs.synth import write_safetensors
    n = nodes(1)[0]
    cli("node", "add", n.url)
    p = tmp_path / "m.safetensors"
    size = write_safetensors(str(p), 24 << 20, seed=4, dtype=dtype)
    cli("put", p)
    info = json.loads(cli("info", "m.safetensors", "--json").stdout)
    assert info["stored"] <= limit * size, info["stored"] / size
    assert dtype in info["dtypes"]


def test_plan_leaves_the_file_at_offset_zero(tmp_path):
    p = tmp_path / "r.bin"
    p.write_bytes(b"\x10" + bytes(7) + b"not json at all" + bytes(100))  # looks like a header length, is not
    with open(p, "rb", buffering=0) as f:
        f.read(3)
        assert plan_spans(f, p.stat().st_size, 1 << 16) == fixed_spans(p.stat().st_size, 1 << 16)
        assert f.tell() == 0
    p.write_bytes(bytes([200]) + bytes(50))  # header length beyond the file
    with open(p, "rb", buffering=0) as f:
        plan_spans(f, 51, 1 << 16)
        assert f.tell() == 0


def write_gguf(path, tensors, alignment=32):
    """A minimal GGUF v3 file: one kv (general.alignment), then (name, ggml type, dims, bytes)."""
    def s(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    head += s("general.alignment") + struct.pack("<II", 4, alignment)
    off, infos, blobs = 0, b"", []
    for name, gtype, dims, data in tensors:
        infos += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", gtype, off)
        pad = -len(data) % alignment
        blobs.append(data + bytes(pad))
        off += len(data) + pad
    meta = head + infos
    meta += bytes(-len(meta) % alignment)
    with open(path, "wb") as f:
        f.write(meta + b"".join(blobs))
    return len(meta)


def test_gguf_chunks_start_at_tensors(tmp_path):
    rng = np.random.default_rng(7)
    ts = [("tok_embd", 30, [4096, 200], tensor_bytes(rng, (200, 4096), "BF16")),
          ("blk.0.attn_q", 0, [4096, 100], tensor_bytes(rng, (100, 4096), "F32")),
          ("blk.0.ffn_q4", 2, [4096, 64], bytes(rng.integers(0, 256, 4096 * 36, dtype=np.uint8)))]
    data_start = write_gguf(tmp_path / "m.gguf", ts)
    size = (tmp_path / "m.gguf").stat().st_size
    with open(tmp_path / "m.gguf", "rb") as f:
        spans = plan_spans(f, size, 1 << 20)
    assert spans[0].offset == 0 and spans[0].length == data_start  # the header is its own chunk
    assert sum(s.length for s in spans) == size
    starts = {s.offset: s for s in spans}
    assert starts[data_start].codec == "zstd-g2"
    f32_start = data_start + len(ts[0][3])
    assert starts[f32_start].codec == "zstd-g4"
    assert starts[f32_start + len(ts[1][3])].dtype == "GGML2"
    garbage = tmp_path / "bad.gguf"
    garbage.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 1) + b"\xff" * 100)
    with open(garbage, "rb") as f:
        assert plan_spans(f, garbage.stat().st_size, 1 << 16) == fixed_spans(garbage.stat().st_size, 1 << 16)
        assert f.tell() == 0


def test_gguf_put_get_roundtrip(cli, nodes, tmp_path):
    from conftest import add_nodes
    add_nodes(cli, nodes, 1)
    rng = np.random.default_rng(8)
    write_gguf(tmp_path / "m.gguf", [("a", 1, [4096, 300], tensor_bytes(rng, (300, 4096), "F16")),
                                     ("b", 0, [4096, 70], tensor_bytes(rng, (70, 4096), "F32"))])
    cli("put", tmp_path / "m.gguf", "--chunk-size", "1MiB")
    cli("get", "m.gguf", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "m.gguf").read_bytes()
    info = json.loads(cli("info", "m.gguf", "--json").stdout)
    assert {"F16", "F32", "header"} <= set(info["dtypes"])


def test_prefetch_follows_the_loaders_name_order(tmp_path):
    """safe_open(...).keys() is sorted by name; a file written layer by layer is not, so the
    prefetch goes by name (layers.10 right after layers.1), each chunk once."""
    from shardfs.chunker import plan_spans as plan
    from shardfs.manifest import Manifest
    from shardfs.reader import OpenModel, prefetch_order

    rng = np.random.default_rng(3)
    tensors = [(f"layers.{i}.w", "BF16", [64, 4096], tensor_bytes(rng, (64, 4096), "BF16")) for i in range(12)]
    path = tmp_path / "m.safetensors"
    write_st(path, tensors)
    size = path.stat().st_size
    with open(path, "rb") as f:
        spans = plan(f, size, 1 << 20)
        head = f.read(spans[0].length)
    man = Manifest.build((bytes([k]) * 32, s.length) for k, s in enumerate(spans))
    m = OpenModel(1, 2, "m.safetensors", size, "", man, {})
    order = prefetch_order(head, m)
    by_start = {s.offset: k for k, s in enumerate(spans)}
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        keys = list(f.keys())
    hdr_len = 8 + struct.unpack("<Q", head[:8])[0]
    offsets = {name: hdr_len + sum(len(t[3]) for t in tensors[:i]) for i, (name, *_r) in enumerate(tensors)}
    assert order == [by_start[offsets[k]] for k in keys]  # one chunk per tensor here
    assert keys[2] == "layers.10.w" and order != sorted(order)
    assert prefetch_order(b"not a checkpoint at all", m) is None


def test_shared_pages_are_assembled_from_every_chunk_on_them():
    """Chunk boundaries off page boundaries (tensor starts), chunks smaller than a page so
    one page spans three chunks, chunks arriving in any order: each page that more than
    one chunk touches comes out once, complete and right, and nothing is left waiting (but
    the marks of assembled pages, which their pushes clear)."""
    from shardfs.manifest import Manifest
    from shardfs.reader import PAGE, OpenModel, shared_pages

    rng = np.random.default_rng(7)
    lengths = [PAGE + 100, 700, 900, 3 * PAGE, 5, PAGE - 5, 2 * PAGE + 1, 333]
    data = rng.integers(0, 256, sum(lengths), dtype=np.uint8).tobytes()
    man = Manifest.build((bytes([k]) * 32, n) for k, n in enumerate(lengths))
    for trial in range(20):
        m = OpenModel(1, 2, "x", len(data), "", man, {})
        got = {}
        for i in rng.permutation(len(lengths)):
            o, n = man.offsets[i], man.lengths[i]
            for at, page in shared_pages(m, int(i), memoryview(data)[o:o + n]):
                assert at not in got
                got[at] = page
        want = {at for at in range(0, len(data), PAGE) if len(man.span(at, PAGE)) > 1}
        assert set(got) == want and m.pieces == dict.fromkeys(want)  # (all marks: no piece waits)
        for at, page in got.items():
            assert page == data[at:at + PAGE]


def test_put_reads_a_chunk_whole_from_a_source_that_answers_in_pieces(tmp_path):
    """One readinto may return less than asked without the file ending (NFS, FUSE): that was
    reported as 'changed size while reading'."""
    import io

    from shardfs.ingest import read_full

    class Dribble(io.RawIOBase):  # a real file, read at most 1000 bytes per call
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def readinto(self, b):
            return self.f.readinto(memoryview(b)[:1000])

    p = tmp_path / "x.bin"
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    with open(p, "rb", buffering=0) as f:
        src = Dribble(f)
        buf = bytearray(4096)
        assert read_full(src, memoryview(buf)) == 4096 and bytes(buf) == data[:4096]
        assert read_full(src, memoryview(buf)) == 4096 and bytes(buf) == data[4096:8192]
        assert read_full(src, memoryview(buf)) == 10_000 - 8192  # the end of the file


def _peak_bytes(fn):
    """(fn(), the peak of Python allocations while it ran)."""
    import tracemalloc
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gguf_key_values_are_skipped_not_built(tmp_path, monkeypatch):
    """Every key/value array was built as a Python list (a 16 MiB u8 array: 16M ints), and a
    key holding 2^24 empty arrays took 1.2 GB; now they are seeked over, within a budget."""
    from shardfs import chunker
    from shardfs.chunker import gguf_tensors
    rng = np.random.default_rng(9)
    path = tmp_path / "m.gguf"
    start = write_gguf(path, [("a", 1, [4096, 64], tensor_bytes(rng, (64, 4096), "F16"))])
    blob = path.read_bytes()
    # the same file with a 16 MiB byte array and a vocabulary of strings before its alignment key
    def s(text):
        return struct.pack("<Q", len(text)) + text
    extra = s(b"big") + struct.pack("<IIQ", 9, 0, 16 << 20) + bytes(16 << 20)
    extra += s(b"vocab") + struct.pack("<IIQ", 9, 8, 1000) + s(b"tok") * 1000
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + extra + blob[24:start]
    head = head[:len(head) - (start - 24 - len(blob[24:start].rstrip(b"\0")))]  # (drop the old padding)
    head += bytes(-len(head) % 32)
    big = tmp_path / "big.gguf"
    big.write_bytes(head + blob[start:])
    with open(big, "rb") as f:
        tensors, peak = _peak_bytes(lambda: gguf_tensors(f, big.stat().st_size))
    assert tensors == [(len(head), big.stat().st_size, "F16")]
    assert peak < 8 << 20, peak  # (the old parser's list alone: 128 MiB)
    # arrays of arrays past the step budget: not model-aware, no exception
    monkeypatch.setattr(chunker, "MAX_GGUF_KV_STEPS", 50_000)  # (the real budget takes seconds to reach)
    hostile = tmp_path / "nested.gguf"
    n = chunker.MAX_GGUF_KV_STEPS + 10
    hostile.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s(b"x") + struct.pack("<IIQ", 9, 9, n)
                        + struct.pack("<IQ", 0, 0) * n)
    with open(hostile, "rb") as f:
        out, peak = _peak_bytes(lambda: gguf_tensors(f, hostile.stat().st_size))
    assert out is None and peak < 8 << 20, peak


def test_a_gguf_with_more_tensors_than_the_limit_is_cut_like_any_file(tmp_path):
    from shardfs.chunker import MAX_GGUF_TENSORS
    p = tmp_path / "many.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, MAX_GGUF_TENSORS + 1, 0) + bytes(1 << 20))
    size = p.stat().st_size
    with open(p, "rb") as f:
        assert plan_spans(f, size, 1 << 16) == fixed_spans(size, 1 << 16)


def test_a_safetensors_header_of_tiny_containers_is_not_parsed(tmp_path):
    """json.loads of `[],[],...` takes ~25x its size (a 100 MiB header: 2.7 GB in put, and
    the mount parses the first chunk's header on every open)."""
    from shardfs.chunker import MAX_PARSED_HEADER, safetensors_named
    meta = b"[" + b"[]," * (3 << 20) + b"[]]"  # 9 MiB of empty lists
    h = b'{"__metadata__":' + meta + b',"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}'
    p = tmp_path / "lists.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
    with open(p, "rb") as f:
        out, peak = _peak_bytes(lambda: safetensors_named(f, p.stat().st_size))
    assert out is None and peak < 2 * len(h), peak
    big = b'{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},"__metadata__":{"x":"' + \
        b"y" * MAX_PARSED_HEADER + b'"}}'
    p.write_bytes(struct.pack("<Q", len(big)) + big + bytes(16))
    with open(p, "rb") as f:
        assert safetensors_named(f, p.stat().st_size) is None
    for bad in (b"\xef\xbb\xbf" + h[:16] + b'"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}',
                '{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}'.encode("utf-16")):
        p.write_bytes(struct.pack("<Q", len(bad)) + bad + bytes(16))  # a BOM, UTF-16: not safetensors
        with open(p, "rb") as f:
            assert safetensors_named(f, p.stat().st_size) is None, bad[:8]


def test_a_safetensors_header_read_in_pieces_still_cuts_at_tensors(tmp_path):
    """The header was read with one read(): a source answering in pieces (the case put's
    read_full is for) lost the tensor-aligned cut and the dtype codecs."""
    import io
    rng = np.random.default_rng(4)
    ts = [(f"t{i:03d}.with.a.long.name.to.grow.the.header", "BF16", [8, 4096], tensor_bytes(rng, (8, 4096), "BF16"))
          for i in range(300)]
    path = tmp_path / "m.safetensors"
    write_st(path, ts)
    size = path.stat().st_size

    class Pieces(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, off, whence=0):
            return self.f.seek(off, whence)

        def tell(self):
            return self.f.tell()

        def readinto(self, b):
            return self.f.readinto(memoryview(b)[:4096])

    with open(path, "rb", buffering=0) as raw:
        whole = plan_spans(raw, size, 1 << 20)
    with open(path, "rb", buffering=0) as raw:
        pieces = plan_spans(Pieces(raw), size, 1 << 20)
    assert whole[0].dtype == "header" and whole[0].length > 4096
    assert pieces == whole


def test_prefetch_order_does_bounded_work_for_tensors_that_alias_one_range(tmp_path):
    """100k tensors over one 8 GiB range cost tensors x chunks (17 s per open in the daemon)."""
    from shardfs.manifest import Manifest
    from shardfs.reader import OpenModel, prefetch_order
    n_tensors, n_chunks, chunk = 3000, 512, 1 << 20
    header = {f"t{i}": {"dtype": "U8", "shape": [n_chunks * chunk], "data_offsets": [0, n_chunks * chunk]}
              for i in range(n_tensors)}
    h = json.dumps(header).encode()
    head = struct.pack("<Q", len(h)) + h
    size = len(head) + n_chunks * chunk
    lengths = [len(head)] + [chunk] * n_chunks
    man = Manifest.build((k.to_bytes(32, "little"), n) for k, n in enumerate(lengths))

    class Counting:  # the manifest, counting the chunk indexes its spans hand out
        def __init__(self, man):
            self.man, self.handed = man, 0

        def __getattr__(self, name):
            return getattr(self.man, name)

        def __len__(self):
            return len(self.man)

        def span(self, off, n):
            r = self.man.span(off, n)
            self.handed += len(r)
            return r
    m = OpenModel(1, 2, "m.safetensors", size, "", man, {})
    m.manifest = Counting(man)
    order = prefetch_order(head, m)
    assert order == list(range(1, n_chunks + 1))  # every tensor chunk once, in file order
    assert m.manifest.handed <= 6 * n_chunks + n_tensors, m.manifest.handed  # (was 3000 x 512)


def test_ls_names_what_replaced_versions_still_hold(cli, nodes, tmp_path):
    """ls's total left out chunks only a kept replaced version uses: the nodes held more than
    any line said until gc pruned that version."""
    import os

    from conftest import add_nodes
    add_nodes(cli, nodes, 1)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 << 20))
    b.write_bytes(os.urandom(2 << 20))
    cli("put", a, "--name", "m.bin", "--chunk-size", "1MiB")
    assert "replaced versions" not in cli("ls").stdout
    cli("put", b, "--name", "m.bin", "--chunk-size", "1MiB", "--force")
    out = cli("ls").stdout
    held = re.search(r"replaced versions of these models hold ([\d.]+) MiB more per replica", out)
    assert held and abs(float(held.group(1)) - 3.0) < 0.01, out
    cli("gc", "--grace", "0")
    assert "replaced versions" not in cli("ls").stdout


def test_tiny_tensors_of_alternating_dtypes_fall_back_to_fixed_chunks():
    """Each change of dtype (or gap) closes a group: 100k 1-byte tensors of alternating
    dtype made 100k chunks of a 6.5 MB file (a put of 20k such took 34 s)."""
    n = 100_000
    hdr = {f"t{i}": {"dtype": "U8" if i % 2 else "I8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    data = struct.pack("<Q", len(h)) + h + bytes(n)
    assert plan_spans(io.BytesIO(data), len(data), 4 << 20) == fixed_spans(len(data), 4 << 20)
    few = {k: v for k, v in hdr.items() if int(k[1:]) < 1000}  # (a thousand: still cut at tensors)
    h = json.dumps(few, separators=(",", ":")).encode()
    data = struct.pack("<Q", len(h)) + h + bytes(1000)
    assert len(plan_spans(io.BytesIO(data), len(data), 4 << 20)) == 1001


def test_a_gguf_name_longer_than_any_real_one_is_not_parsed(tmp_path):
    """A key (or tensor name) may claim up to 100 MiB, and was read and decoded: 200 MB of RSS."""
    p = tmp_path / "long.gguf"
    write_gguf(p, [("x" * ((64 << 10) + 1), 0, [16], bytes(64))])
    size = p.stat().st_size
    with open(p, "rb") as f:
        assert plan_spans(f, size, 1 << 16) == fixed_spans(size, 1 << 16)
    write_gguf(p, [("x" * 1000, 0, [16], bytes(64))])
    with open(p, "rb") as f:
        assert len(plan_spans(f, p.stat().st_size, 1 << 16)) == 2  # header, tensor
