"""The mount's namespace, without a kernel: model names as paths, synthesized directories.

Inodes are stable: the root is 1, a directory keeps its inode for the life of the
daemon, and a model version's file inode is FILE_BASE + version id, so a replaced model
gets a new inode while readers of the old one keep theirs (its entry stays in `files`).
`fuse_ops` translates kernel requests into calls on this class and nothing else.
"""

from __future__ import annotations

import logging
import stat
import time
from dataclasses import dataclass

log = logging.getLogger("shardfs.vfs")

ROOT = 1
FILE_BASE = 1 << 40


@dataclass(frozen=True)
class FileEntry:
    inode: int
    name: str
    vid: int
    size: int
    created: float
    sha256: str


@dataclass(frozen=True)
class Attrs:
    inode: int
    mode: int
    size: int
    mtime: float
    nlink: int


def file_inode(vid: int) -> int:
    return FILE_BASE + vid


class IdentityConflict(Exception):
    """The index gives a version id this mount knows to another model version: the index
    was reset or restored under the mount, and its version ids started over. Serving the
    new one under the old inode would hand readers the old version's pages (keep_cache)."""


class Tree:
    def __init__(self):
        self.started = time.time()
        self._dir_inodes: dict[str, int] = {"": ROOT}
        self._next_dir = ROOT + 1
        self.children: dict[int, dict[str, int]] = {ROOT: {}}
        self.parents: dict[int, int] = {ROOT: ROOT}
        self.dir_mtime: dict[int, float] = {ROOT: self.started}
        self.files: dict[int, FileEntry] = {}
        self.current: dict[str, FileEntry] = {}
        self._warned: set[str] = set()

    def update(self, models: dict[str, tuple[int, int, float, str]]) -> set[str]:
        """Replace the namespace with `models` (name -> (vid, size, created, sha256)).

        Returns the names whose version changed, appeared or vanished. Raises
        IdentityConflict, changing nothing, if a version id known here now names another
        version (another model, size, time or hash)."""
        for name, (vid, size, created, sha) in models.items():
            known = self.files.get(file_inode(vid))
            if known is not None and (known.name, known.size, known.created, known.sha256) != (name, size, created, sha):
                raise IdentityConflict(
                    f"version {vid} is {name!r} (sha256 {sha[:12]}) in the index but {known.name!r} "
                    f"(sha256 {known.sha256[:12]}) to this mount")
        changed = {n for n in set(models) | set(self.current)
                   if n not in models or n not in self.current or self.current[n].vid != models[n][0]}
        children: dict[int, dict[str, int]] = {ROOT: {}}
        parents: dict[int, int] = {ROOT: ROOT}  # directory -> its parent (for "..")
        mtimes: dict[int, float] = {ROOT: 0.0}  # a folder's: its newest model's (the same on every mount)
        current = {}
        dir_paths = {p.rstrip("/") for n in models for p in _parents(n)}
        for name in sorted(models):
            if name in dir_paths:
                if name not in self._warned:
                    log.warning("model %r is also a directory of other models; it is hidden", name)
                    self._warned.add(name)
                continue
            vid, size, created, sha = models[name]
            entry = self.files.get(file_inode(vid))
            if entry is None:
                entry = FileEntry(file_inode(vid), name, vid, size, created, sha)
                self.files[entry.inode] = entry
            current[name] = entry
            parent = ROOT
            parts = name.split("/")
            for i, part in enumerate(parts[:-1]):
                path = "/".join(parts[:i + 1])
                ino = self._dir_inodes.get(path)
                if ino is None:
                    ino = self._dir_inodes[path] = self._next_dir
                    self._next_dir += 1
                children.setdefault(parent, {})[part] = ino
                children.setdefault(ino, {})
                parents[ino] = parent
                mtimes[parent] = max(mtimes.get(parent, 0), created)
                parent = ino
            children.setdefault(parent, {})[parts[-1]] = entry.inode
            mtimes[parent] = max(mtimes.get(parent, 0), created)
        mtimes[ROOT] = mtimes[ROOT] or self.started  # (an empty catalogue: when the mount began)
        self.children, self.parents, self.dir_mtime, self.current = children, parents, mtimes, current
        return changed

    def lookup(self, parent: int, name: str) -> int | None:
        return self.children.get(parent, {}).get(name)

    def attrs(self, inode: int) -> Attrs | None:
        if inode in self.children:
            return Attrs(inode, stat.S_IFDIR | 0o555, 0, self.dir_mtime.get(inode, self.started),
                         2 + sum(1 for c in self.children[inode].values() if c in self.children))
        f = self.files.get(inode)
        if f is None:
            return None
        return Attrs(inode, stat.S_IFREG | 0o444, f.size, f.created, 1)

    def listdir(self, inode: int, dots: bool = False) -> list[tuple[str, int]] | None:
        """A directory's entries by name (with `dots`, "." and ".." first, as readdir gives
        them: `ls -a`), or None if inode is not a directory."""
        kids = self.children.get(inode)
        if kids is None:
            return None
        head = [(".", inode), ("..", self.parents.get(inode, ROOT))] if dots else []
        return head + sorted(kids.items())

    def entry(self, inode: int) -> FileEntry | None:
        return self.files.get(inode)

    def resolve(self, path: str) -> int | None:
        ino = ROOT
        for part in filter(None, path.split("/")):
            ino = self.lookup(ino, part)
            if ino is None:
                return None
        return ino


def _parents(name: str):
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])
