"""User-facing errors.

A ShardfsError is something the user can act on: the CLI prints its message as one
line and exits with its exit_code. Anything else escaping is a bug and keeps its
traceback.
"""


class ShardfsError(Exception):
    exit_code = 1


class UsageError(ShardfsError):
    exit_code = 2


class NotFound(ShardfsError):
    pass


class NameClash(ShardfsError):
    """A name taken (or made a folder) by a put that published first: refused as the same
    check before the upload refuses it, with the same status."""
    exit_code = 2


class IndexUnavailable(ShardfsError):
    """Redis could not be reached."""


class NoNodes(ShardfsError):
    pass


class CorruptChunk(Exception):
    """A chunk envelope failed its header, length or hash check (never user-facing alone)."""


class UnknownFormat(CorruptChunk):
    """An envelope of a version or codec this release does not know: a newer shardfs wrote
    it. Unreadable here, but not known to be damaged, so never deleted as a bad copy."""


class BadRecord(ShardfsError):
    """A version record in the index is malformed (or missing): `vid`."""

    def __init__(self, message: str, vid: int | None = None):
        super().__init__(message)
        self.vid = vid

    @classmethod
    def missing(cls, vid: int, name: str) -> "BadRecord":
        """A version that model `name` lists, whose record is not there."""
        return cls(f"version record {vid} of {name!r} is missing", vid)


class NodeError(Exception):
    """A node could not serve or store a chunk. `full` is set when it is out of space;
    `unsure` when the request went out and no answer came (a store may have taken effect)."""

    def __init__(self, node: str, message: str, full: bool = False, missing: bool = False,
                 unsure: bool = False):
        super().__init__(f"{node}: {message}")
        self.node = node
        self.full = full
        self.missing = missing
        self.unsure = unsure


class KeyMismatch(ShardfsError):
    """An encrypted model was opened without its key (or with another one)."""


class ChunkUnavailable(ShardfsError):
    """No replica could serve a verified copy of a chunk."""
