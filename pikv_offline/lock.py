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


LEASE_S = 60.0  # an object-store lock not renewed for this long is a dead holder's


@contextlib.contextmanager
def hold_at(root: str, key: str, *, what: str, by: str):
    """hold() on file ``key`` of a local folder; on an object store (no flock there) a lease: an object
    naming its holder, renewed by a thread every LEASE_S / 4 while held and removed at the end. A lease
    renewed within LEASE_S is refused, unless its holder is a process of this host that is gone; one
    older than that is a crashed holder's and is taken over. Two starts within a second of each other
    are told apart by reading the lease back after a pause: the later PUT wins and the other refuses."""
    from . import storage

    if not storage.is_url(root):
        with hold(storage.join(root, key), what=what, by=by):
            yield
        return
    import json
    import threading
    import uuid

    def read():
        try:
            got = json.loads(storage.read_bytes(root, key) or b"null")
        except ValueError:  # a torn lease cannot be: one PUT; an edited one holds nothing
            return None
        return got if isinstance(got, dict) and isinstance(got.get("renewed"), (int, float)) else None

    def refuse(old):
        said = lambda k: str(old.get(k))[:60]  # noqa: E731  (a stranger's lease: its fields shown, cut short)
        raise PikvError(f"{what} is in use by another {by} (pid {said('pid')} on {said('host')} since {said('since')}, "
                        f"its lease renewed {time.time() - old['renewed']:.0f}s ago); wait for it to finish, or for "
                        f"its lease to lapse ({LEASE_S:.0f}s after it stopped), or choose another --out; if no dump "
                        f"runs there, delete {storage.join(root, key)}")

    old = read()
    # a lease renewed in the future by more than any clock skew is not one (edited): taken over
    if old is not None and -3600 < time.time() - old["renewed"] < LEASE_S and not _gone(old):
        refuse(old)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "renewed": time.time()}
    storage.write_bytes(root, key, json.dumps(me).encode())
    time.sleep(1.0)
    now = read()
    if now is None or now.get("token") != me["token"]:
        refuse(now or me)
    stop = threading.Event()

    def renew():
        while not stop.wait(LEASE_S / 4):
            with contextlib.suppress(Exception):  # a missed renewal is retried; LEASE_S allows three
                storage.write_bytes(root, key, json.dumps({**me, "renewed": time.time()}).encode())

    thread = threading.Thread(target=renew, name="pikv-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            if (read() or {}).get("token") == me["token"]:
                storage.remove(root, key)


def _gone(lease: dict) -> bool:
    """Whether the lease's holder is a process of this host that no longer runs."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return lease["pid"] == os.getpid()  # our own pid: a lease of an earlier life of this pid number
