"""Encryption at rest: sealed chunks, keyed ids, clear errors for a wrong or missing key."""

import errno
import json
import os

import pytest

from conftest import add_nodes, needs_fuse, sha256_file
from shardfs import envelope
from shardfs.crypto import Keyring
from shardfs.errors import CorruptChunk

PLAIN = b"top secret weights! " * 5000


def test_sealed_envelope_roundtrip_and_keyed_ids():
    k1, k2 = Keyring(os.urandom(32)), Keyring(os.urandom(32))
    cid, blob, _ = envelope.encode(PLAIN, keyring=k1)
    assert envelope.is_sealed(blob) and b"top secret" not in blob
    assert envelope.decode(blob, cid, k1) == PLAIN
    assert cid != envelope.chunk_id(PLAIN) and cid != envelope.chunk_id(PLAIN, k2)  # not linkable
    assert envelope.encode(PLAIN, keyring=k1)[1] != blob  # a fresh nonce per chunk
    for key in (None, k2):
        with pytest.raises(CorruptChunk):
            envelope.decode(blob, cid, key)
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(CorruptChunk):
        envelope.decode(bytes(bad), cid, k1)


@pytest.fixture
def keys(tmp_path):
    k, other = tmp_path / "key", tmp_path / "other.key"
    k.write_bytes(os.urandom(32))
    other.write_text(os.urandom(32).hex())
    return k, other


def test_put_encrypt_get_verify(cli, nodes, tmp_path, keys):
    key, other = keys
    ns = add_nodes(cli, nodes, 2)
    src = tmp_path / "secret.bin"
    src.write_bytes(PLAIN * 40)
    r = cli("put", src, "--name", "secret.bin", "--encrypt", check=False)
    assert r.returncode == 2 and "--key-file" in r.stderr
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", key, "--chunk-size", "1MiB")
    for n in ns:  # nodes hold only ciphertext
        for f in n.chunk_files():
            assert b"top secret" not in open(f, "rb").read()
    cli("get", "secret.bin", tmp_path / "out", "--key-file", key)
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    for args, words in (((), "is encrypted; give its key"), (("--key-file", other), "another key")):
        r = cli("get", "secret.bin", tmp_path / "out2", *args, check=False)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out2").exists()
    assert "0 bad copies" in cli("verify", "--key-file", key).stdout
    assert "skipping secret.bin" in cli("verify").stdout


def test_a_broken_configured_key_file_stops_only_encrypted_models(cli, nodes, tmp_path, keys):
    key, _ = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "w.bin"
    src.write_bytes(PLAIN * 40)
    cli("put", src, "--name", "plain.bin")
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", key)
    broken = {"SHARDFS_KEY_FILE": str(tmp_path / "no-such.key")}
    # plain models do not need the key, so it is not read
    cli("get", "plain.bin", tmp_path / "out", env=broken)
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert "0 bad copies" in cli("verify", "plain.bin", env=broken).stdout
    # an encrypted one does: one line that names the file and where it was set
    for args in (("get", "secret.bin", tmp_path / "out2"), ("verify", "secret.bin"), ("verify",)):
        r = cli(*args, check=False, env=broken)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "no-such.key" in r.stderr and "SHARDFS_KEY_FILE" in r.stderr
    assert not (tmp_path / "out2").exists()
    cli("get", "secret.bin", tmp_path / "out2", "--key-file", key, env=broken)  # the flag wins
    assert (tmp_path / "out2").read_bytes() == src.read_bytes()


def test_the_index_holds_no_plain_hash_of_an_encrypted_file(cli, nodes, tmp_path, keys):
    import hashlib
    key, other = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "secret.bin"
    src.write_bytes(PLAIN * 40)
    cli("put", src, "--name", "plain.bin")
    cli("put", src, "--name", "a.bin", "--encrypt", "--key-file", key)
    cli("put", src, "--name", "b.bin", "--encrypt", "--key-file", other)
    info = {n: json.loads(cli("info", n, "--json").stdout) for n in ("plain.bin", "a.bin", "b.bin")}
    plain = hashlib.sha256(src.read_bytes()).hexdigest()
    assert info["plain.bin"]["sha256"] == plain
    assert len({info[n]["sha256"] for n in info}) == 3  # nothing links the three
    assert info["a.bin"]["file_hash"] == "hmac-sha256"
    r = cli("get", "a.bin", tmp_path / "out", "--key-file", key)  # and get still verifies the whole file
    assert "keyed hash" in r.stdout and (tmp_path / "out").read_bytes() == src.read_bytes()


@needs_fuse
def test_mount_decrypts_with_the_key_and_refuses_without(cli, nodes, tmp_path, keys, mounts):
    key, _ = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "secret.bin"
    src.write_bytes(PLAIN * 40)
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", key, "--chunk-size", "1MiB")
    m = mounts("--key-file", key)
    assert sha256_file(m.file("secret.bin")) == sha256_file(src)
    plain = mounts()
    with pytest.raises(OSError) as e:
        open(plain.file("secret.bin"), "rb")
    assert e.value.errno == errno.EACCES
    assert os.path.ismount(plain.path)


def test_a_node_replaces_a_damaged_sealed_copy_only_with_a_body_that_arrived_intact(nodes):
    """A node keeps an existing sealed copy on a second PUT (it cannot check ciphertext), so a
    damaged copy that verify could not delete stayed, and was reported stored again. With the
    body's hash sent along, an intact body replaces it; a body damaged on its way is refused."""
    import urllib3
    from shardfs.stores import SEALED_HASH, open_store
    [srv] = nodes(1)
    k = Keyring(os.urandom(32))
    cid, blob, _ = envelope.encode(PLAIN, keyring=k)
    h = cid.hex()
    store = open_store(srv.url)
    store.put(h, blob)
    [path] = [f for f in srv.chunk_files() if os.path.basename(f) == h]
    damaged = bytearray(blob)
    damaged[-5] ^= 0x40  # bit rot in the ciphertext: the header still says all is well
    with open(path, "wb") as f:
        f.write(damaged)
    with pytest.raises(CorruptChunk):
        envelope.decode(store.get(h), cid, k)
    store.put(h, blob)  # (what put and verify --repair send)
    assert envelope.decode(store.get(h), cid, k) == PLAIN
    http = urllib3.PoolManager()
    for headers, status in (({SEALED_HASH: "00" * 32}, 422), ({}, 201)):
        r = http.request("PUT", f"{srv.url}/chunks/{h}", body=bytes(damaged), headers=headers)
        assert r.status == status, (headers, r.status, r.data)
    assert open(path, "rb").read() == blob  # neither replaced the good copy
