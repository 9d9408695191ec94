"""Atomic file writes: a killed process leaves the previous file intact.

Content goes to a temporary file in the destination's folder (`.NAME.XXXXXXXX.tmp`),
is flushed and fsync'd, then renamed over the destination (rename is atomic within
one file system), and the folder is fsync'd so the rename itself survives a crash.
A process killed mid-write leaves only its temporary file, which
`remove_stale_temp_files` clears.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from cnnlab.errors import CnnlabError

# Out of space, out of quota, or past the process's file size limit (RLIMIT_FSIZE):
# the user can fix these, so they are one line, not a traceback.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The temporary names this module makes: mkstemp's and `atomic_copy`'s eight random characters.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a binary stream that replaces `path` only when the block ends without error.

    A full disk (or a file size limit) is a CnnlabError; the temporary file is removed
    and the previous `path` kept, whatever ends the block early.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions an ordinary open() would.
        os.chmod(tmp_name, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            fd = -1  # the file object owns it now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if fd != -1:
            os.close(fd)
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise CnnlabError(
                f"cannot write {path}: {exc.strerror}; the previous {path.name} (if any) is kept: "
                "free some space (or raise the file size limit) and try again"
            ) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(source: Path, target: Path) -> None:
    """Make `target` hold what `source` holds, atomically.

    A hard link where the file system has them: no bytes copied, and since every
    write here replaces a file rather than changing it, the two names stay independent.
    """
    source, target = Path(source), Path(target)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(source, tmp)
    except OSError:
        with atomic_open(target) as f, open(source, "rb") as original:
            shutil.copyfileobj(original, f)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (this module's names only); those removed.

    Only for a folder no other process is writing to.
    """
    folder = Path(folder)
    stale = sorted(p for p in folder.glob(".*.tmp") if is_temp_file(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable: the folder's entry list must reach the disk too."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not let folders be opened; the rename is done regardless
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temp_file(name: str) -> bool:
    """Whether `name` is one of this module's temporary files (what a killed writer leaves behind)."""
    return bool(_TEMP_NAME.match(name))
