"""
files.py: how myllm writes a file, one helper for every file it writes (checkpoints, token files, exports).

    with atomic_write("out/ckpt.pt") as f:
        torch.save(checkpoint, f)

The one idea: a file under its real name is always complete. It is written under a temporary name beside
it, flushed, and renamed over the real name; os.replace is atomic on POSIX file systems, so a kill at any
moment leaves either the previous complete file or the new complete one, never a torn file. The temporary
name carries the process id, so two writers never write into one temporary file, and a failed write
removes its temporary file instead of leaving it behind.
"""

import fcntl
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode: str = "wb", sync: bool = True):
    """Open a temporary file for writing; on a clean exit rename it to path, on an error delete it.

    sync: fsync before the rename, so that the rename cannot reach the disk before the data (after a power
    cut a renamed but unsynced file can be empty). Scratch files of a resumable pass may skip it: a killed
    process loses nothing the kernel already holds; only a power cut can, and then the pass must run again
    from the start (without --resume).
    """
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with named_as(path):  # a read-only or missing folder
        f = open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    try:
        with f:
            yield f  # what the caller's own writes raise (a full disk, say) goes up as it is
            with named_as(path):
                f.flush()
                if sync:
                    os.fsync(f.fileno())
        with named_as(path):
            os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


@contextmanager
def named_as(path):
    """An OSError inside names path, the file the caller asked for, rather than the temporary file."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def copy_file(src, dst) -> None:
    """Copy src to dst through atomic_write: a reader of dst never sees half a copy."""
    with open(src, "rb") as source, atomic_write(dst) as f:
        shutil.copyfileobj(source, f)


def lock_folder(folder: str, what: str) -> int:
    """Lock folder for as long as this process lives, or stop with one sentence if another process holds it: two
    runs writing into one folder would overwrite each other's files. The lock is flock on the folder itself (no
    lock file is left behind), and the kernel releases it when the process ends, however it ends, so a killed run
    never leaves a stale lock. Returns the descriptor that holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{folder} is in use by another {what}: wait for it to finish or choose another "
                         "folder") from None
    return fd


def os_error(script: str, e: OSError) -> SystemExit:
    """The one sentence for a file that cannot be written or read: a folder that is a file, read-only, full."""
    return SystemExit(f"{script}: {e.filename}: {e.strerror}" if e.filename else f"{script}: {e}")
