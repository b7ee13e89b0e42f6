"""The run directory: checked writable before any work, and owned by one run at a time.

A run takes ``DIR/.cpbench.lock``: an exclusive ``flock`` on the file, which also holds the owner's
pid, host, start time and command as JSON. The kernel releases a ``flock`` when its process dies,
however it dies (kill -9 included), so a lock file left behind by a dead run on this host is found
free and taken over: a stale lock needs no pid probing, and a pid reused by an unrelated process
cannot keep a directory locked. The JSON is for the one-line message a second run prints
(``RunDirectoryError``), naming who owns the directory.

Why not ``O_CREAT | O_EXCL`` alone: a crash leaves the file behind, and telling a live owner from a
dead one then needs the pid (useless across hosts). ``flock`` answers "is the owner alive" itself,
also for another host on a shared file system that supports it (NFSv4 maps it to a lease).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import RunDirectoryError

__all__ = ["LOCK_FILE", "RunLock", "check_writable", "read_owner"]

LOCK_FILE = ".cpbench.lock"


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) and prove it writable, or one-line :class:`RunDirectoryError`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file, not a directory; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    probe = out / f".cpbench-write-test-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("x")
        probe.unlink()
    except OSError as exc:
        raise RunDirectoryError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None
    return out


def read_owner(lock_path: str | Path) -> dict:
    """What the lock file says about its owner (empty when unreadable)."""
    try:
        data = json.loads(Path(lock_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another cpbench run"
    since = owner.get("started_at")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (since {when})"


class RunLock:
    """An exclusive lock on a run directory; a context manager. ``stale_owner`` is set when a dead
    run's lock file was taken over."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None
        self.stale_owner: dict | None = None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirectoryError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
                raise RunDirectoryError(
                    f"{self.path.parent} is in use by {_describe(read_owner(self.path))}; wait for it to finish, "
                    f"or choose another --out") from None
            # the owner we raced may have unlinked the file between our open and our flock: then we
            # hold a lock on a deleted inode, and must start again on the path's current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = os.read(fd, 65536)
        if previous.strip():
            with contextlib.suppress(ValueError):
                self.stale_owner = json.loads(previous) or None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding the lock: a waiting run then re-checks the inode (see acquire)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
