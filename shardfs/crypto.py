"""Optional encryption at rest: a key file seals each chunk with AES-256-GCM.

    key file       32 random bytes, raw or as 64 hex digits (`head -c32 /dev/urandom > key`)
    chunk id       keyed BLAKE3 of the raw bytes (key derived from the file), so equal
                   plaintexts are not linkable between keys and nodes never see a plain hash
    sealing        fresh 96-bit nonce per chunk, the chunk id bound as associated data
    fingerprint    recorded with each version, so a mount or `get` with the wrong key (or
                   none) fails with a clear error before reading, never with garbage bytes
    file hash      HMAC-SHA256 of the whole file (key derived from the file) in the version's
                   sha256 field (stats "file_hash": "hmac-sha256"): a plain SHA-256 there
                   would link equal plaintexts across keys for anyone who reads the index

Nodes hold only ciphertext. The reader's local cache holds verified plaintext chunks, like
the page cache does; put it on an encrypted disk if that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import UsageError

log = logging.getLogger("shardfs.crypto")

NONCE = 12


class Keyring:
    def __init__(self, key: bytes):
        if len(key) != 32:
            raise UsageError("an encryption key must be 32 bytes")
        self._aead = AESGCM(key)
        self.id_key = blake3.blake3(key, derive_key_context="shardfs 2026 chunk id").digest()
        self.fingerprint = blake3.blake3(key, derive_key_context="shardfs 2026 key fingerprint").hexdigest()[:16]
        self._file_key = blake3.blake3(key, derive_key_context="shardfs 2026 file hash").digest()

    @classmethod
    def from_file(cls, path: str) -> "Keyring":
        try:  # (non-blocking: a FIFO or a device named by mistake must not hang the command)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    raise UsageError(f"key file {path} is not a regular file")
                if mode & 0o044:  # (ssh refuses such a key; a warning keeps existing setups working)
                    log.warning("key file %s can be read by other users (mode %03o): `chmod 600 %s`",
                                path, stat.S_IMODE(mode), path)
                data = f.read(201)
        except OSError as e:
            raise UsageError(f"cannot read key file {path}: {e.strerror}") from None
        if len(data) > 200:
            raise UsageError(f"key file {path} must hold 32 bytes (raw or 64 hex digits); it holds more")
        text = data.strip()
        if len(text) == 64:
            try:
                return cls(bytes.fromhex(text.decode()))
            except ValueError:
                pass
        if len(data) == 32:
            return cls(data)
        raise UsageError(f"key file {path} must hold 32 bytes (raw or 64 hex digits)")

    def load(self) -> "Keyring":  # (a Keyring is its own key source; see KeyFile)
        return self

    def file_hash(self):
        """A hashlib-like object: the keyed hash recorded for an encrypted file."""
        return hmac.new(self._file_key, digestmod=hashlib.sha256)

    def chunk_id(self, raw) -> bytes:
        return blake3.blake3(raw, key=self.id_key, max_threads=1).digest()

    def seal(self, payload: bytes, cid: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(payload), cid)

    def open(self, sealed, cid: bytes) -> bytes | None:
        """The payload, or None if the ciphertext or tag does not verify."""
        sealed = bytes(sealed)
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], cid)
        except (InvalidTag, ValueError):
            return None


class KeyFile:
    """A key file named by --key-file or the key_file setting, read the first time an
    encrypted model needs it: a missing or broken key file then stops only commands that
    touch encrypted models, and its error says where the path was set."""

    def __init__(self, path: str, source: str = "flag"):
        self.path = path
        self.source = source  # "flag", "env SHARDFS_KEY_FILE", "file PATH" (config.resolve)
        self._keyring: Keyring | None = None

    def load(self) -> Keyring:
        if self._keyring is None:
            try:
                self._keyring = Keyring.from_file(self.path)
            except UsageError as e:
                if self.source == "flag":
                    raise
                where = self.source.replace("env ", "the environment's ").replace("file ", "the config file ")
                raise UsageError(f"{e} (the key_file setting, from {where})") from None
        return self._keyring
