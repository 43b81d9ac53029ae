"""Settings: flag > environment > config file > default, and where each value came from.

The config file is TOML: --config FILE, else $SHARDFS_CONFIG, else
$SHARDFS_HOME/config.toml, else /etc/shardfs/config.toml (the first that exists):

    redis = "redis://:secret@10.0.0.1:6379/0"
    cache_dir = "/var/cache/shardfs"
    cache_size = "200G"
    read_ahead = "64MiB"
    memory = "128MiB"
    replicas = 2
    token_file = "/etc/shardfs/node.token"
"""

from __future__ import annotations

import os
import stat
import tomllib

from .errors import UsageError
from .units import parse_size

MAX_CONFIG = 1 << 20  # bytes: a config file is a few lines


def home() -> str:
    """$SHARDFS_HOME: the state directory (embedded Redis, logs, the default cache and node).
    (Here, not in connect: finding the config must not import redis, which `node serve` and
    `--help` do without.)"""
    return os.path.abspath(os.environ.get("SHARDFS_HOME") or os.path.expanduser("~/.local/share/shardfs"))


def _home_cache():
    return os.path.join(home(), "cache")


def _copies(v) -> int:
    n = int(v)
    if n < 1:
        raise ValueError(f"{v!r}: must be at least 1")
    return n


# key -> (environment variable, parser, default or callable giving it, what it is)
SETTINGS = {
    "redis": ("SHARDFS_REDIS", str, None, "Redis index URL (unset: embedded redis-server)"),
    "cache_dir": ("SHARDFS_CACHE_DIR", str, _home_cache, "mount cache directory"),
    "cache_size": ("SHARDFS_CACHE_SIZE", parse_size, None, "mount cache bound (unset: 10% of its disk)"),
    "read_ahead": ("SHARDFS_READ_AHEAD", parse_size, 64 << 20, "largest readahead window"),
    "memory": ("SHARDFS_MEMORY", parse_size, 128 << 20, "mount in-memory chunk buffer"),
    "replicas": ("SHARDFS_REPLICAS", _copies, None, "copies per chunk for put (unset: min(2, live nodes))"),
    "token_file": ("SHARDFS_TOKEN_FILE", str, None, "node write token file for `node add`"),
    "key_file": ("SHARDFS_KEY_FILE", str, None, "encryption key file (put --encrypt, get, verify, mount)"),
}


def config_path(flag: str | None) -> str | None:
    if flag:
        return flag
    if os.environ.get("SHARDFS_CONFIG"):
        return os.environ["SHARDFS_CONFIG"]
    for p in (os.path.join(home(), "config.toml"), "/etc/shardfs/config.toml"):
        if os.path.exists(p):
            return p
    return None


class Config:
    def __init__(self, path: str | None):
        self.path = path
        self.file: dict = {}
        if path:
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):  # (/dev/zero was read until memory ran out)
                        raise UsageError(f"config file {path} is not a regular file")
                    if st.st_size > MAX_CONFIG:
                        raise UsageError(f"config file {path} is {st.st_size} bytes; a config file "
                                         f"is at most {MAX_CONFIG}")
                    self.file = tomllib.load(f)
            except FileNotFoundError:
                raise UsageError(f"config file {path} does not exist") from None
            except IsADirectoryError:
                raise UsageError(f"config file {path} is a directory") from None
            except OSError as e:
                raise UsageError(f"config file {path}: {e.strerror}") from None
            except ValueError as e:  # TOMLDecodeError and bad UTF-8 are ValueErrors
                raise UsageError(f"config file {path}: {e}") from None
            unknown = sorted(set(self.file) - set(SETTINGS))
            if unknown:
                raise UsageError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(SETTINGS)}")

    def resolve(self, key: str, flag=None):
        """(value, source) for a setting, source one of flag / env NAME / file PATH / default."""
        env, parse, default, _ = SETTINGS[key]
        try:
            if flag is not None:
                return flag, "flag"
            if os.environ.get(env):
                return parse(os.environ[env]), f"env {env}"
            if key in self.file:
                v = self.file[key]
                if isinstance(v, bool) or not isinstance(v, (str, int)) or (parse is str and not isinstance(v, str)) \
                        or (isinstance(v, int) and v < 0):
                    raise UsageError(f"{v!r} is not a valid value")
                if v == "":  # (an empty cache_dir was the current directory)
                    raise UsageError("is empty; leave the line out for the default")
                return parse(v), f"file {self.path}"
        except (ValueError, UsageError) as e:
            raise UsageError(f"setting {key}: {e}") from None
        return (default() if callable(default) else default), "default"


def apply(args) -> Config:
    """Fill every setting the parsed command has (flag left None) from env, file or default."""
    cfg = Config(config_path(getattr(args, "config", None)))
    args.sources = {}  # setting -> where its value came from (for error messages)
    for key in SETTINGS:
        if hasattr(args, key):
            value, args.sources[key] = cfg.resolve(key, getattr(args, key))
            setattr(args, key, value)
    return cfg


def show(cfg: Config, args) -> None:
    lines = [f"config file: {cfg.path or '(none)'}"]  # every value read before any is printed
    for key, (_env, _p, _d, what) in SETTINGS.items():
        value, source = cfg.resolve(key, getattr(args, key, None) if key == "redis" else None)
        if key == "redis" and value:
            from .connect import display_url
            value = display_url(value)  # (never a password on the screen)
        lines.append(f"{key:<11} = {value!s:<40} ({source})  # {what}")
    print("\n".join(lines))
