"""What every backend's feature ``files`` shares: the path check, resolution against a working
directory, and the chunked copy that never holds a whole file.

The rule kept here: a path is refused (InputError, naming the sandbox) before anything is sent
when it is empty, not a string, or holds a NUL byte; a relative path is joined to the sandbox's
working directory as plain text (``..`` is folded by :func:`posixpath.normpath`), since only the
sandbox itself can say where a symlink in it leads.
"""

from __future__ import annotations

import posixpath
from typing import BinaryIO, Callable, Iterator

from sandboxer.errors import InputError

__all__ = ["CHUNK", "DEFAULT_MODE", "check_mode", "check_path", "chunks", "copy_into", "not_root", "resolve"]

#: Bytes moved per read or write of a streamed file.
CHUNK = 1024 * 1024
#: The permission bits of a file write_file makes when it is given no mode (the contract's default).
DEFAULT_MODE = 0o644


def check_path(path: object, *, backend: str, sandbox: str) -> str:
    """``path`` if it can name a file in a sandbox; else InputError naming the sandbox and the value."""
    if not isinstance(path, str):
        raise InputError(f"{backend}: sandbox {sandbox}: a file path must be a string, got "
                         f"{type(path).__name__} {path!r}")
    if not path:
        raise InputError(f"{backend}: sandbox {sandbox}: the file path is empty; give an absolute path, or one "
                         "relative to the sandbox's working directory")
    if "\x00" in path:
        raise InputError(f"{backend}: sandbox {sandbox}: the file path {path!r} holds a NUL byte, which no "
                         "filesystem accepts")
    return path


def check_mode(mode: object, *, backend: str, sandbox: str, path: str) -> int:
    """The permission bits write_file sets: ``mode``, or :data:`DEFAULT_MODE` for None; anything but
    an int from 0 to 0o7777 is InputError naming the sandbox, the path and the value."""
    if mode is None:
        return DEFAULT_MODE
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InputError(f"{backend}: sandbox {sandbox}: the mode for {path!r} must be permission bits, an int "
                         f"from 0 to 0o7777 (e.g. 0o644), got {mode!r}")
    return mode


def not_root(target: str, *, backend: str, sandbox: str, path: str) -> None:
    """InputError when ``target`` (absolute) is the sandbox's root directory, which remove_file never removes."""
    if posixpath.normpath(target) == "/":
        raise InputError(f"{backend}: sandbox {sandbox}: {path!r} is the root of its filesystem, which remove_file "
                         "does not remove; tear the sandbox down instead")


def resolve(path: str, workdir: str | None) -> str:
    """``path`` as an absolute, normalised path: a relative one is taken from ``workdir``
    (returned relative, normalised, when ``workdir`` is None: the backend resolves it itself)."""
    if posixpath.isabs(path):
        return posixpath.normpath(path)
    if workdir is None:
        return posixpath.normpath(path)
    return posixpath.normpath(posixpath.join(workdir, path))


def chunks(source: BinaryIO, counted: list[int], size: int = CHUNK) -> Iterator[bytes]:
    """``source`` read to EOF in chunks of at most ``size`` bytes; ``counted[0]`` keeps the total so far."""
    while True:
        data = source.read(size)
        if not data:
            return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"the file source must be opened in binary mode (its read() returned "
                             f"{type(data).__name__})")
        counted[0] += len(data)
        yield bytes(data)


def copy_into(pieces: Iterator[bytes] | Callable[[int], bytes], sink: BinaryIO) -> int:
    """Write every piece (an iterator of chunks, or a ``read(n)`` function, read to EOF) into
    ``sink``; returns the bytes written."""
    total = 0
    if callable(pieces):
        read = pieces
        pieces = iter(lambda: read(CHUNK), b"")
    for piece in pieces:
        if piece:
            sink.write(piece)
            total += len(piece)
    return total
