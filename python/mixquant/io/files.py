"""Files in and out: atomic, no-clobber writes, and reads that open only regular files.

Every file mixquant writes (bit configs, exported models, JSON results, reports,
plots) goes through :func:`write_bytes_atomic`, and every file it parses
(bit configs, exported models) is read with :func:`read_regular`.

Writing: the destination is checked first (:func:`check_destination`), the
payload goes to a temporary file created next to it with an unpredictable name
and ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted file or symlink is never
opened), is fsync'ed, then hard-linked into place (no overwrite: fails if the
name was taken meanwhile) or renamed over the old file (overwrite). A
destination that exists and is not a regular file or a symlink (a directory,
FIFO, socket or device) is refused with or without overwrite; a symlink is
replaced, never written through.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["check_destination", "write_bytes_atomic", "write_text_atomic", "read_regular", "concatenate_into",
           "publish_folder", "TEMP_PREFIX", "TEMP_SUFFIX"]

TEMP_PREFIX = ".mixquant-"
TEMP_SUFFIX = ".tmp"
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_destination(path: PathLike, overwrite: bool = False) -> str:
    """Check that ``path`` can be written, before any work is done; return it as a ``str``.

    Raises (each message names ``path``):

    * FileExistsError: ``path`` exists (a dangling symlink included) and ``overwrite`` is False;
    * ValueError: ``path`` exists and is a directory, FIFO, socket or device (with or without ``overwrite``),
      or ``path`` is empty;
    * FileNotFoundError / NotADirectoryError: its folder does not exist / is not a folder;
    * PermissionError: its folder is not writable.
    """
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(f"output path {path!r} is empty or not a str")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, "a folder on the output path is a file", path) from None
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise ValueError(f"output {path!r} exists and is {_kind(st.st_mode)}; give a file name")
        if not overwrite:
            raise FileExistsError(f"{path!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise FileNotFoundError(errno.ENOENT, "the output folder does not exist", path)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "the output folder is not a folder", path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the output folder is not writable", path)
    return path


def _create_temp(folder: str, path: str) -> "tuple[int, str]":
    for _ in range(100):
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp  # the umask applies, as for any new file
        except FileExistsError:
            continue  # a name taken (planted or not): draw another
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot write next to it ({exc.strerror})", path) from None
    raise FileExistsError(errno.EEXIST, "no free temporary name in its folder", path)


def write_bytes_atomic(path: PathLike, payload: bytes, overwrite: bool = False) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one.

    The destination is checked by :func:`check_destination` (same errors).
    Without ``overwrite`` an existing ``path`` raises FileExistsError, checked
    again atomically when the finished file is hard-linked into place. An
    exception (or a kill) mid-write leaves ``path`` absent or unchanged; after a
    kill a hidden ``.mixquant-*.tmp`` file may remain in the folder.
    """
    path = check_destination(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(folder, path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            check_destination(path, overwrite=True)  # it may have become a directory or FIFO meanwhile
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError:
                raise FileExistsError(f"{path!r} exists; pass overwrite=True (CLI: --overwrite) to replace it") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # A file system without hard links: rename, after a last check that the name is free.
                if os.path.lexists(path):
                    raise FileExistsError(f"{path!r} exists; pass overwrite=True (CLI: --overwrite) to replace it") from None
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def write_text_atomic(path: PathLike, text: str, overwrite: bool = False) -> None:
    """UTF-8 text version of :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"), overwrite)


def read_regular(path: PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``max_bytes`` bytes.

    The file is opened without blocking (a FIFO is refused, not waited on) and
    checked on the open descriptor, so what is read is what was checked.
    Raises ValueError for a directory, FIFO, socket or device and for a file
    that is (or grows) larger than ``max_bytes``; FileNotFoundError if missing.
    """
    shown = repr(os.fspath(path))
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or /dev/zero would block or never end
            raise ValueError(f"{shown} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise ValueError(f"{shown} is {st.st_size} bytes, larger than any {what} ({max_bytes})")
        os.set_blocking(fd, True)
        chunks = []
        remaining = max_bytes + 1  # the file may grow after the fstat
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > max_bytes:
        raise ValueError(f"{shown} is larger than any {what} ({max_bytes} bytes)")
    return raw


def concatenate_into(sources: "list[str]", dest: PathLike, chunk: int = 16 << 20) -> None:
    """Write the bytes of ``sources`` one after the other into ``dest``, a new file (never an existing one,
    a planted symlink included: created with ``O_CREAT | O_EXCL | O_NOFOLLOW``), streaming ``chunk`` bytes at a time."""
    fd = os.open(os.fspath(dest), _TEMP_FLAGS, 0o666)
    with os.fdopen(fd, "wb") as out:
        for src in sources:
            with open(src, "rb") as fh:
                while True:
                    block = fh.read(chunk)
                    if not block:
                        break
                    out.write(block)


def publish_folder(staged: PathLike, final: PathLike) -> str:
    """Move a finished folder (made privately beside ``final``) into place; if another process published
    ``final`` first, keep theirs and drop ours. Returns ``final``."""
    import shutil

    staged, final = os.fspath(staged), os.fspath(final)
    if os.path.lexists(final):
        shutil.rmtree(staged, ignore_errors=True)
        if not os.path.isdir(final) or os.path.islink(final):
            raise ValueError(f"{final!r} exists and is not a folder made by mixquant")
        return final
    try:
        os.rename(staged, final)  # a folder rename never replaces an existing, non-empty one
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)
        if not os.path.isdir(final):
            raise
    return final
