"""Model names are relative paths: `org/model.safetensors`; `/` makes directories in the mount."""

from .errors import UsageError

MAX_COMPONENT = 255
MAX_NAME = 1024


def check_name(name: str) -> str:
    """Return the name if it is a valid model name, else raise UsageError saying why."""
    if not name:
        raise UsageError("model name is empty")
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (a file name from argv, say)
        raise UsageError(f"model name {name!r} is not valid UTF-8; give one with --name") from None
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
    return name
