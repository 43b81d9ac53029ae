"""Hostile input: the chunk decoder and the node server never crash, leak a path or grow."""

import os
import urllib.parse

import numpy as np
import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardfs import envelope
from shardfs.errors import CorruptChunk
from shardfs.manifest import Manifest
from shardfs.stores import MARKER
from shardfs.synth import tensor_bytes

RAW = tensor_bytes(np.random.default_rng(3), (16, 4096), "BF16")
BLOBS = [envelope.encode(RAW, c)[1] for c in envelope.CODECS]


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_decoder_only_ever_raises_corruptchunk(data):
    blob = bytearray(data.draw(st.sampled_from(BLOBS)))
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "extend", "header"]))
        if kind == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[data.draw(st.integers(0, len(blob))):]
        elif kind == "extend":
            blob += data.draw(st.binary(max_size=64))
        elif kind == "header" and len(blob) >= envelope.HEADER_SIZE:
            i = data.draw(st.integers(0, envelope.HEADER_SIZE - 1))
            blob[i] = data.draw(st.integers(0, 255))
    try:
        out = envelope.decode(bytes(blob), envelope.chunk_id(RAW))
    except CorruptChunk:
        return
    assert out == RAW  # anything that decodes is the original: never wrong bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_on_arbitrary_bytes(blob):
    with pytest.raises(CorruptChunk):
        envelope.decode(blob, b"\0" * 32)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_manifest_decoder_on_arbitrary_bytes(data):
    """Bytes that decode at all are a manifest exactly: they encode back to themselves, and
    its offsets tile [0, size). Anything else is CorruptChunk (never another exception)."""
    entries = data.draw(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 1 << 40)),
                                 max_size=6))
    blob = bytearray(data.draw(st.one_of(st.binary(max_size=200),
                                         st.just(Manifest.build(entries).encode()))))
    for _ in range(data.draw(st.integers(0, 3))):  # then cut, flip or extend it
        kind = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if kind == "flip" and blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[data.draw(st.integers(0, len(blob))):]
        else:
            blob += data.draw(st.binary(max_size=48))
    try:
        m = Manifest.decode(bytes(blob))
    except CorruptChunk:
        return
    assert m.encode() == bytes(blob)
    assert list(m.offsets) == [sum(m.lengths[:i]) for i in range(len(m))]
    assert m.size == sum(m.lengths) and len(m.ids) == len(m.lengths) == len(m)


@pytest.fixture
def token_node(nodes, tmp_path):
    tf = tmp_path / "token"
    tf.write_text("s3cret\n")
    node = nodes(1, token_file=str(tf))[0]
    # One chunk first: a node that holds chunks answers 404 for the ones it lacks (an empty
    # root cannot tell "absent" from "not the directory the chunks went to": 503, see
    # test_core's marker tests).
    cid, blob, _ = envelope.encode(b"fuzz" * 100)
    r = urllib3.request("PUT", f"{node.url}/chunks/{cid.hex()}", body=bytes(blob),
                        headers={"Authorization": "Bearer s3cret"})
    assert r.status == 201, r.data
    node.siblings = set(os.listdir(os.path.dirname(node.root)))  # nothing may appear beside the root
    return node


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST"]),
       path=st.one_of(st.text(max_size=80), st.sampled_from(["../../etc/passwd", "..%2f..%2fetc%2fpasswd",
                                                            "a" * 64, "A" * 64, "0" * 63, "0" * 65, "%00"])),
       body=st.binary(max_size=256), auth=st.booleans())
def test_node_server_request_fuzz(token_node, tmp_path, method, path, body, auth):
    http = urllib3.PoolManager(retries=False, timeout=5)
    url = f"{token_node.url}/chunks/{urllib.parse.quote(path, safe='%./')}"
    headers = {"Authorization": "Bearer s3cret"} if auth else {}
    r = http.request(method, url, body=body if method in ("PUT", "POST") else None, headers=headers)
    assert r.status < 500, (method, path, r.status, r.data[:200])
    if method == "PUT":
        assert r.status in (400, 401, 404, 422)  # no fuzzed body hashes to its id
    # nothing but chunk files under the root, and nothing written next to it
    for d, _, files in os.walk(token_node.root):
        for f in files:
            assert len(f) == 64 or f.startswith(".tmp-") or f == MARKER, f
    assert set(os.listdir(os.path.dirname(token_node.root))) == token_node.siblings
    assert token_node.proc.poll() is None
