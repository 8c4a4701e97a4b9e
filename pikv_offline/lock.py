"""Exclusive locks on a run's or a dump's output folder, held for the process's life.

    with hold(os.path.join(out, LOCK), what=f"--out {out}", by="training run"): ...

fcntl.flock on a file in the folder: the kernel drops the lock when the process dies, however it
dies, so a crash never leaves a stale lock behind; the file names its holder for the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from .errors import PikvError


@contextlib.contextmanager
def hold(path: str, *, what: str, by: str):
    try:  # never through a symlink: a planted one would have us truncate its target
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise PikvError(f"{what}: cannot open its lock file {path} ({e.strerror}); remove it if it is a link")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise PikvError(f"{what} is in use by another {by} ({owner}); wait for it to finish or choose another folder")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    try:
        yield
    finally:
        f.close()
