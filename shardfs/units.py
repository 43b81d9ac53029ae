"""Parsing and printing byte sizes."""

import re

from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
          "tib": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read size {text!r}; use e.g. 4MiB, 512K, 10G")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n < 1 << 80:  # (a few hundred digits are infinity as a float)
        raise UsageError(f"size {text.strip() if isinstance(text, str) else text!r} is too large")
    return int(n)


_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '1d'; 'never' is infinity."""
    if str(text).strip().lower() == "never":
        return float("inf")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SECONDS:
        raise UsageError(f"cannot read duration {text!r}; use e.g. 90s, 15m, 2h, 1d or never")
    seconds = float(m.group(1)) * _SECONDS[m.group(2).lower()]
    if seconds == float("inf"):
        raise UsageError(f"duration {text!r} is too large; for no limit say never")
    return seconds


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
