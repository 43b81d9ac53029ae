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
    for f in (k, other):
        f.chmod(0o600)  # (readable by others: a warning on every use, see below)
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


def _mounted_secret(cli, nodes, tmp_path, key, mounts):
    """secret.bin put encrypted under key on one node, and a mount given that key."""
    add_nodes(cli, nodes, 1)
    src = tmp_path / "secret.bin"
    src.write_bytes(PLAIN * 40)
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", key, "--chunk-size", "1MiB")
    return mounts("--key-file", key), src


@needs_fuse
def test_mount_decrypts_with_the_key_and_refuses_without(cli, nodes, tmp_path, keys, mounts):
    key, _ = keys
    m, src = _mounted_secret(cli, nodes, tmp_path, key, mounts)
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
    for headers, status in (({SEALED_HASH: "00" * 32}, 422), ({SEALED_HASH: "é" * 64}, 422),
                            ({SEALED_HASH: "x"}, 422), ({}, 201)):
        r = http.request("PUT", f"{srv.url}/chunks/{h}", body=bytes(damaged), headers=headers)
        assert r.status == status, (headers, r.status, r.data)
    assert open(path, "rb").read() == blob  # neither replaced the good copy


def test_get_writes_the_plaintext_with_the_umask_and_keeps_a_replaced_files_mode(cli, nodes, tmp_path, keys):
    """get forced 0644 on what it wrote: an encrypted model's plaintext readable by every
    local user, whatever the umask, and a 0600 file it replaced widened too."""
    import stat
    key, _ = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "secret.bin"
    src.write_bytes(PLAIN * 10)
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", key)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    private = {**cli.env, "SHELL_UMASK": "077"}
    import subprocess
    import sys
    r = subprocess.run(["sh", "-c", 'umask "$SHELL_UMASK"; exec "$0" -m shardfs "$@"', sys.executable,
                        "get", "secret.bin", str(tmp_path / "out"), "--key-file", str(key)],
                       env=private, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "out") == 0o600 and (tmp_path / "out").read_bytes() == src.read_bytes()
    shared = tmp_path / "shared"
    shared.write_bytes(b"old")
    shared.chmod(0o640)
    cli("get", "secret.bin", shared, "--key-file", key, "--force")  # (the test's own umask: 022)
    assert mode(shared) == 0o640 and shared.read_bytes() == src.read_bytes()
    cli("get", "secret.bin", tmp_path / "new", "--key-file", key)
    assert mode(tmp_path / "new") == 0o666 & ~_umask()


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_verify_of_a_model_needs_only_its_current_versions_key(cli, nodes, tmp_path, keys):
    """verify NAME checked every kept version and refused when an older one was under a key
    since rotated (or the model was encrypted before and is plain now)."""
    key, other = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "w.bin"
    src.write_bytes(PLAIN * 10)
    cli("put", src, "--name", "r.bin", "--encrypt", "--key-file", key)
    cli("put", src, "--name", "r.bin", "--encrypt", "--key-file", other, "--force")  # the key rotated
    cli("put", src, "--name", "q.bin", "--encrypt", "--key-file", key)
    cli("put", src, "--name", "q.bin", "--force")  # plain now
    for args in (("r.bin", "--key-file", other), ("q.bin",)):
        r = cli("verify", *args, check=False)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert "0 bad copies" in r.stdout and "skipping" in r.stdout and "encrypted with a key not given" in r.stdout
    r = cli("verify", "r.bin", "--key-file", key, check=False)  # the current version's key is still needed
    assert r.returncode == 2 and "another key" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_key_file_others_can_read_is_warned_about(cli, nodes, tmp_path, keys):
    key, _ = keys
    add_nodes(cli, nodes, 1)
    src = tmp_path / "w.bin"
    src.write_bytes(PLAIN * 10)
    r = cli("put", src, "--name", "s.bin", "--encrypt", "--key-file", key)
    assert "read by other users" not in r.stderr
    key.chmod(0o644)
    r = cli("get", "s.bin", tmp_path / "out", "--key-file", key)
    assert r.stderr.count("\n") == 1 and f"key file {key} can be read by other users (mode 644)" in r.stderr
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


@needs_fuse
def test_a_pin_that_cannot_follow_a_version_under_another_key_is_warned_about_once(cli, nodes, tmp_path, keys, mounts):
    """The pin's move was retried at every poll (every 2 s), with a warning each time, for
    as long as the mount ran."""
    from conftest import wait_for
    key, other = keys
    m, src = _mounted_secret(cli, nodes, tmp_path, key, mounts)
    m.cli("cache", "pin", "secret.bin", "--mount", m.path)
    src.write_bytes(PLAIN * 41)
    cli("put", src, "--name", "secret.bin", "--encrypt", "--key-file", other, "--chunk-size", "1MiB", "--force")

    def warnings():
        with open(m.log, errors="replace") as f:
            return f.read().count("cannot move the pin of secret.bin")
    wait_for(lambda: warnings() >= 1, timeout=15, what="the warning")
    m.wait_polls(3)
    assert warnings() == 1
    with pytest.raises(OSError) as e:
        open(m.file("secret.bin"), "rb")
    assert e.value.errno == errno.EACCES and os.path.ismount(m.path)
