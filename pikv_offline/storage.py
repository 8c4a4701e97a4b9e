"""Where a cache lives: a local folder or an object-store URL (s3://, gs://, ... through fsspec).

    pikv dump-teacher ... --out s3://bucket/caches/run1     (credentials, endpoint: the environment,
    pikv train-student --cache s3://bucket/caches/run1 ...   as boto/s3fs read them: AWS_* variables)

Everything that reads or writes a cache's own files (markers, root metadata, the tokenizer, shard
presence) goes through these functions with the cache's ``root`` and a key relative to it, so the
writer, the reader, verify and the dump hold the same guarantees in both places:
  - a local folder: a file is replaced atomically (a temp file, fsync, rename), shard files are
    fsynced before their unit's marker;
  - an object store: there is no rename, but one PUT is atomic (a reader sees the old object or
    the new one, never a torn one) and a finished PUT is durable and visible (S3 and GCS are
    strongly consistent), so "data first, marker last" needs nothing more.
``file://`` URLs are local folders. A URL's filesystem is made per process (fsspec keys its instance
cache by pid), so a forked DataLoader worker opens its own connection.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile

from .errors import PikvError, brief


LOCAL_SCHEMES = ("file", "local")  # fsspec's names of the local filesystem: plain folders here


def is_url(root: str) -> bool:
    """An object-store URL (not a local folder, not file://)."""
    scheme, sep, _ = root.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() not in LOCAL_SCHEMES


def local(root: str) -> str:
    """A local folder's path (file:// stripped)."""
    scheme, sep, rest = root.partition("://")
    return rest if sep and scheme.lower() in LOCAL_SCHEMES else root


def normalize(root: str) -> str:
    """A local folder's path (file:// stripped), or a URL without trailing slashes (s3://b/p/ is s3://b/p).
    Refuses what cannot hold a cache: an empty path segment (s3://b//p is another key than s3://b/p),
    memory:// (gone with the process)."""
    if not is_url(root):
        return local(root)
    scheme, _, rest = root.partition("://")
    if scheme.lower() == "memory":
        raise PikvError(f"{root}: memory:// keeps a cache only for this process's life; give a folder or an "
                        "object-store URL")
    rest = rest.rstrip("/")
    if "//" in rest:
        raise PikvError(f"{root}: the URL has an empty path segment (//); write it with single slashes")
    return f"{scheme}://{rest}"


def refuse_url(root: str, flag: str, why: str) -> None:
    """One line when a flag that takes a local folder gets a URL (it would become a folder named 's3:')."""
    if "://" in root and is_url(root):
        raise PikvError(f"{flag} {root}: {why}; give a local folder")


def join(root: str, *keys: str) -> str:
    return posixpath.join(root, *keys) if is_url(root) else os.path.join(local(root), *keys)


def _fs(root: str):
    """(fsspec filesystem, path inside it) of a URL."""
    try:
        import fsspec
        with remote(root):
            return fsspec.core.url_to_fs(root)
    except ImportError as e:  # fsspec itself, or the protocol's package (s3fs, gcsfs)
        raise PikvError(f"{root}: this URL needs a filesystem package that is not installed ({brief(e)}); "
                        "pip install 'pikv-offline[cloud]' (s3fs, gcsfs)")
    except ValueError as e:  # an unknown protocol
        raise PikvError(f"{root}: not a URL fsspec can open ({brief(e)}); give a local folder or s3:// gs:// file://")


def zarr_store(root: str, read_only: bool):
    """What zarr.open_group takes for the cache at ``root``."""
    if not is_url(root):
        return local(root)
    import zarr
    _fs(root)  # the clear line when the protocol's package is missing
    return zarr.storage.FsspecStore.from_url(root, read_only=read_only)


def read_bytes(root: str, key: str) -> bytes | None:
    """The file ``key`` under ``root``, or None when there is none (other failures raise OSError)."""
    if not is_url(root):
        try:
            with open(join(root, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    fs, path = _fs(root)
    try:
        with remote(root):
            return fs.cat_file(posixpath.join(path, key))
    except (FileNotFoundError, IsADirectoryError):
        return None


def write_bytes(root: str, key: str, data: bytes) -> None:
    """Atomically: a reader (or a crash) sees the old file or the new one, never a torn one."""
    if is_url(root):
        fs, path = _fs(root)
        with remote(root):
            fs.pipe_file(posixpath.join(path, key), data)
        return
    path = join(root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def names(root: str, key: str = "") -> list[str] | None:
    """The names directly under folder ``key`` (files and folders), or None when there is no such folder."""
    if not is_url(root):
        try:
            return os.listdir(join(root, key))
        except (FileNotFoundError, NotADirectoryError):
            return None
    fs, path = _fs(root)
    folder = posixpath.join(path, key).rstrip("/")
    try:
        with remote(root):
            if fs.isfile(folder):
                return None
            got = fs.ls(folder, detail=False, refresh=True)
    except FileNotFoundError:
        return None
    return sorted({posixpath.basename(p.rstrip("/")) for p in got if p.rstrip("/") != folder})


def sizes(root: str, key: str) -> dict[str, int]:
    """Every file under folder ``key`` -> its size, by path relative to the folder (one listing)."""
    if not is_url(root):
        base, out = join(root, key), {}
        for folder, _, files in os.walk(base):
            for f in files:
                p = os.path.join(folder, f)
                if not os.path.islink(p):
                    out[os.path.relpath(p, base).replace(os.sep, "/")] = os.path.getsize(p)
        return out
    fs, path = _fs(root)
    base = posixpath.join(path, key).rstrip("/")
    try:
        with remote(root):
            found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(base) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(base + "/") and info.get("type") != "directory"}


def size(root: str, key: str) -> int | None:
    """The size of file ``key`` (following a link, as a reader would), or None when it is not a file."""
    if not is_url(root):
        path = join(root, key)
        return os.path.getsize(path) if os.path.isfile(path) else None
    fs, path = _fs(root)
    try:
        with remote(root):
            info = fs.info(posixpath.join(path, key))
    except FileNotFoundError:
        return None
    return int(info.get("size") or 0) if info.get("type") == "file" else None


def exists(root: str) -> bool:
    """Whether anything is at ``root`` (a file, a folder, objects under the prefix)."""
    if not is_url(root):
        return os.path.lexists(local(root))
    fs, path = _fs(root)
    try:
        with remote(root):
            return bool(fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        return False


def is_object(root: str) -> bool:
    """Whether a URL names an object itself (a file), not a prefix that could hold a cache."""
    fs, path = _fs(root)
    try:
        with remote(root):
            return fs.isfile(path)
    except FileNotFoundError:
        return False


def remove(root: str, key: str) -> None:
    """The file or folder ``key`` (nothing when it is not there; a link itself, never its target)."""
    if not is_url(root):
        import shutil
        path = join(root, key)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, path = _fs(root)
    target = posixpath.join(path, key).rstrip("/")
    try:
        with remote(root):
            fs.rm(target, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def sync(root: str, key: str) -> None:
    """File ``key`` on stable storage (an object is, once its PUT returned)."""
    if not is_url(root):
        fd = os.open(join(root, key), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def put_folder(folder: str, root: str, key: str) -> None:
    """The files of local ``folder`` (flat, like a tokenizer's) to folder ``key`` under a URL ``root``."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                write_bytes(root, f"{key}/{name}", f.read())


MAX_FETCHED = 1 << 30  # a tokenizer folder of more than this is not one


def fetch_folder(root: str, key: str) -> str:
    """A local copy of the flat folder ``key`` of a URL ``root`` (a temporary folder, for this process's
    life): what AutoTokenizer.from_pretrained can load. Only plain names are taken, so a stored name
    never becomes a path outside the copy."""
    import atexit
    import shutil

    dest = tempfile.mkdtemp(prefix="pikv-fetched-")
    atexit.register(shutil.rmtree, dest, True)
    total = 0
    for name in names(root, key) or []:
        if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            continue
        data = read_bytes(root, f"{key}/{name}")
        if data is None:  # a folder, not a file
            continue
        total += len(data)
        if total > MAX_FETCHED:
            raise PikvError(f"{join(root, key)}: holds more than {MAX_FETCHED >> 20} MiB; not a tokenizer folder")
        with open(os.path.join(dest, name), "wb") as f:
            f.write(data)
    return dest


REMOTE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec")


@contextlib.contextmanager
def remote(root: str):
    """Inside: a URL's store operation. A failure of the store (unreachable, refused, a malformed endpoint:
    anything but a missing key) becomes one line naming the URL."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PikvError, ImportError):
        raise
    except Exception as e:
        said = remote_failure(e) or _failed(e)
        raise PikvError(f"{root}: {said}") from None


def raise_remote(e: BaseException, root: str) -> None:
    """Raise the one line of an object store's failure when ``e`` (from zarr reading ``root``) is one,
    so that a store that is down is not reported as a damaged cache."""
    said = remote_failure(e) if is_url(root) else None
    if said:
        raise PikvError(f"{root}: {said}") from None


def _failed(e: BaseException) -> str:
    return (f"the object store failed ({type(e).__name__}: {brief(e)}); check the URL, the endpoint (e.g. "
            "AWS_ENDPOINT_URL) and the credentials in the environment, then re-run the same command (a dump "
            "resumes at its committed units)")


def remote_failure(e: BaseException) -> str | None:
    """The one line for an object store's failure (unreachable endpoint, refused credentials, a request
    that failed after the library's retries), or None when ``e`` is not one."""
    seen = e
    while seen is not None:
        module = type(seen).__module__.split(".")[0]
        if module in REMOTE_MODULES:
            return _failed(seen)
        seen = seen.__cause__ or seen.__context__
    return None
