"""Writing files so that a crash never leaves a torn one, and the hash that says a file is the one we mean.

Every file minift writes that matters (checkpoints, best/, converted weights, fetched wheels) goes through
here: written under a temporary name, then renamed into place. A rename is atomic on one file system, so
a reader sees the old version or the new one, never half of each.
"""
import hashlib
import os
import shutil
from pathlib import Path


def atomic_write(path, write):
    """write(tmp_path), then rename onto `path`: a crash midway leaves the old file, never a torn one."""
    tmp = Path(str(path) + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_folder(dest):
    """An empty folder beside `dest` to write a new version of it into (then `replace_folder`)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
    tmp.mkdir(parents=True)
    return tmp


def replace_folder(tmp, dest):
    """Swap the complete folder `tmp` in as `dest` by two renames: dest -> dest.old, tmp -> dest. A crash
    between them leaves dest.old whole, and `existing_folder` finds it."""
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def existing_folder(dest):
    """`dest`, or the dest.old that a crash between replace_folder's two renames left behind."""
    dest = Path(dest)
    old = dest.with_name(dest.name + ".old")
    return old if not dest.exists() and old.exists() else dest


def sha256_of(path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time so a big file does not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
