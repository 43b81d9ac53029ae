"""Model names are relative paths: `org/model.safetensors`; `/` makes directories in the mount."""

import os
import unicodedata

from .errors import UsageError

MAX_COMPONENT = 255
MAX_NAME = 1024


def check_name(name: str, new: bool = True) -> str:
    """Return the name if it is a valid model name, else raise UsageError saying why.

    new=False (naming a model that exists, as rm does) skips the rules added later for new
    names, so a model put before them can still be named."""
    if not name:
        raise UsageError("model name is empty")
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (a file name from argv, say)
        raise UsageError(f"model name {os.fsencode(name)!r} is not valid UTF-8"
                         + ("; give one with --name" if new else "")) from None
    if len(encoded) > MAX_NAME:
        raise UsageError(f"model name is longer than {MAX_NAME} bytes")
    if name.startswith("/"):
        raise UsageError(f"model name {name!r} is absolute; use a relative path like org/model.safetensors")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UsageError(f"model name {name!r} contains NUL or control characters")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UsageError(f"model name {name!r} has an empty, '.' or '..' component")
        if len(part.encode()) > MAX_COMPONENT:
            raise UsageError(f"model name component {part[:40]!r}... is longer than {MAX_COMPONENT} bytes")
        if new and part != part.strip():  # `org/m ` would list like the folder `org/m`
            raise UsageError(f"model name {name!r} has a component that starts or ends with a space")
    if new:
        odd = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
        if odd:  # invisible or reordering characters (U+202E makes x\u202egpj.exe show as xexe.jpg)
            raise UsageError(f"model name {name!r} contains the invisible or control character "
                             f"U+{ord(odd[0]):04X} ({unicodedata.name(odd[0], 'unnamed')})")
    return name
