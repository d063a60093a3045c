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

import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode: str = "wb", sync: bool = True):
    """Open a temporary file for writing; on a clean exit rename it to path, on an error delete it.

    sync: fsync before the rename, so that the rename cannot reach the disk before the data (after a power
    cut a renamed but unsynced file can be empty). Scratch files of a resumable pass may skip it: a killed
    process loses nothing the kernel already holds, and a power cut only makes that pass run again.
    """
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def copy_file(src, dst) -> None:
    """Copy src to dst through atomic_write: a reader of dst never sees half a copy."""
    with open(src, "rb") as source, atomic_write(dst) as f:
        shutil.copyfileobj(source, f)
