"""`pikv dump-teacher ... --repair`: recompute only the damaged units of a cache this command wrote.

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE --repair
    torchrun --nproc-per-node 2 -m pikv_offline dump-teacher ... --repair      (any world size)

With the teacher and the data at hand nothing of a damaged cache needs trusting: rank 0, holding the
dump's lock, first makes the skeleton whole again from the command (fix_skeleton): the root attributes
when they do not validate, the metadata of every array and group that differs from what this command
creates, the tokenizer when it does not load or hash to the key's. Then every rank checks its share of
the units with verify's own per-unit check plus the data's rows (find_damaged); rank 0 un-commits the
damaged ones (uncommit: marker and shard files removed), and the dump recomputes them as it resumes
any cache. The dump then runs verify's full check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import zarr

from ..cache import format as F
from ..cache import layout as Y
from ..cache.reader import open_cache, read_root_attrs
from ..cache.verify import unit_problem
from ..cache.writer import create_arrays
from .. import storage
from ..data import Prepared
from ..errors import PikvError


def _root(out: str, key: str, n_seqs: int) -> tuple[Y.RootAttrs | None, str, int | None]:
    """(the root attributes at ``out`` when they are valid and agree with the units' markers, else None;
    why not; the unit size of this command's markers, or None when it has none). The markers
    are the evidence: a root edited consistently (another k with its key recomputed, other counts or
    unit size) that none of them agrees with is rebuilt. Refuses a folder that holds another command's
    cache, or neither a root nor a unit of this command's."""
    raw = read_root_attrs(out)
    attrs, why = None, "no zarr.json with pikv attributes"
    if raw is not None:
        try:
            attrs = Y.RootAttrs.from_dict(raw, out)
        except PikvError as e:
            why = str(e)
    size, holds = _markers(out, key, n_seqs)
    if attrs is not None and holds and (attrs.cache_key, attrs.n_sequences, attrs.unit_seqs) != (key, n_seqs, size):
        return None, "its root attributes disagree with its units' markers (edited?)", size
    if attrs is not None and attrs.cache_key != key:
        raise PikvError(f"--repair: --out {out} holds a cache of other inputs (key {attrs.cache_key}, this command's "
                        f"{key}); repair it with the command that wrote it (see `pikv inspect`)")
    if attrs is None and size is None and (raw or {}).get("cache_key") != key:
        raise PikvError(f"--repair: the root of --out {out} is damaged or missing ({why}) and none of its units were "
                        "written by this command: nothing to repair from (dump into a new --out)")
    return attrs, why, size


def check_ours(out: str, key: str, n_seqs: int) -> None:
    """Before anything is written to ``out`` (not even the lock): it holds this command's cache, maybe damaged."""
    _root(out, key, n_seqs)


def fix_skeleton(out: str, fresh: Y.RootAttrs, tokenizer, vocab: int, trust_remote_code: bool = False) -> list[str]:
    """Rank 0: the root attributes, array metadata and tokenizer of the cache at ``out`` as this command
    (``fresh``: its root attributes for a new cache) makes them; returns what it changed, one line each.
    Refuses a folder with another command's cache or nothing of this command's in it."""
    notes = []
    attrs, why, unit_seqs = _root(out, fresh.cache_key, fresh.n_sequences)
    if attrs is None:
        attrs = dataclasses.replace(fresh, unit_seqs=unit_seqs or fresh.unit_seqs, complete=False)
        path = os.path.join(out, "zarr.json")
        if os.path.lexists(path):
            _remove(path)
        zarr.create_group(out, overwrite=False, attributes={Y.ROOT_ATTR: attrs.to_dict()})
        notes.append(f"rebuilt the root attributes ({why})")
    elif attrs.n_sequences != fresh.n_sequences:
        raise PikvError(f"--repair keeps the cache's {attrs.n_sequences} sequences and this command asks for "
                        f"{fresh.n_sequences}: give --max-sequences {attrs.n_sequences} to repair it (extend it "
                        "afterwards with the larger count)")
    notes += _fix_metadata(out, attrs, vocab)
    for name in F.ARRAY_NAMES:  # a stored array of a target this cache does not have: not its data
        path = os.path.join(out, name)
        if name not in F.present_arrays(attrs.targets) and os.path.lexists(path):
            _remove(path)
            notes.append(f"removed {name}, which this cache's targets do not have")
    units = os.path.join(out, Y.UNITS_DIR)
    if os.path.lexists(units) and (os.path.islink(units) or not os.path.isdir(units)):
        _remove(units)
        notes.append(f"removed {Y.UNITS_DIR}, which was not a folder")
    cache = open_cache(out, allow_incomplete=True, check=False)
    try:
        cache.check_tokenizer(trust_remote_code)
    except PikvError:
        path = cache.tokenizer_path
        if os.path.lexists(path):
            _remove(path)
        tokenizer.save_pretrained(path)
        notes.append(f"saved the tokenizer again (the one in {Y.TOKENIZER_DIR}/ did not load or was another)")
    return notes


def find_damaged(out: str, prep: Prepared, rank: int, world_size: int) -> dict[int, str]:
    """This rank's share of the units (layout.rank_units) that hold a marker but fail verify's check, or
    that a complete cache lacks: {unit: what is wrong}. Units an incomplete cache has not committed
    yet are not damage; the dump writes them anyway."""
    cache = open_cache(out, allow_incomplete=True, check=False)
    a = cache.attrs
    marked = Y.committed_units(out)
    bad, files = {}, cache.shard_files()
    for u in Y.rank_units(a.n_sequences, a.unit_seqs, rank, world_size):
        if u not in marked and not a.complete:
            continue
        ids = Y.unit_sample_ids(u, a.n_sequences, a.unit_seqs, Y.order_seed(a.data["fingerprint"]))
        _, problem = unit_problem(cache, u, prep.take(ids), files)
        if problem:
            bad[u] = problem
    return bad


def uncommit(out: str, units: list[int]) -> None:
    """Rank 0: ``units`` are to be written again: their markers and shard files go (a damaged shard file
    would be read back to merge a partial write), and the cache is marked incomplete until they are in."""
    cache = open_cache(out, allow_incomplete=True, check=False)
    root = zarr.open_group(storage.zarr_store(out, read_only=False), mode="r+")
    # incomplete first: a repair stopped halfway leaves no complete cache
    root.attrs[Y.ROOT_ATTR] = dataclasses.replace(cache.attrs, complete=False, content_sha256=None).to_dict()
    if storage.is_url(out):  # no links or partial folders on an object store: the objects go
        for u in units:
            Y.remove_marker(out, u)
            for name, arr in cache.arrays.items():
                storage.remove(out, f"{name}/{Y.shard_key(arr, u)}")
        return
    for u in units:
        marker = os.path.join(out, Y.marker_name(u))
        if os.path.lexists(marker):
            _remove(marker)
        for name, arr in cache.arrays.items():
            rel = os.path.join(name, Y.shard_key(arr, u))
            _clear_way(out, os.path.dirname(rel))
            if os.path.lexists(os.path.join(out, rel)):
                _remove(os.path.join(out, rel))


def describe_damage(cache_attrs: Y.RootAttrs, bad: dict[int, str], limit: int = 3) -> str:
    def where(u):
        start, stop = Y.unit_range(u, cache_attrs.n_sequences, cache_attrs.unit_seqs)
        return f"unit {u} (sequences [{start}, {stop}))"

    shown = "; ".join(f"{where(u)} {why}" for u, why in sorted(bad.items())[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} damaged unit{'s' if len(bad) != 1 else ''}: {shown}{more}"


def _markers(out: str, key: str, n_seqs: int) -> tuple[int | None, bool]:
    """(the unit size of this command's markers at ``out``, or None when it has none; whether one of them
    commits its unit for this command's cache of ``n_seqs`` sequences, layout.UnitMarker.holds)."""
    try:
        units = sorted(Y.committed_units(out))
    except PikvError:
        return None, False
    mine = []
    for u in units:
        try:
            m = Y.read_marker(out, u)
        except PikvError:
            continue
        if m is not None and m.cache_key == key:
            mine.append((u, m))
    # a full unit's size divides its start (a last, shorter one would not)
    size = next((m.stop - m.start for u, m in mine
                 if m.stop > m.start and m.start % (m.stop - m.start) == 0 and m.start // (m.stop - m.start) == u), None)
    return size, size is not None and any(m.holds(u, n_seqs, size, key) for u, m in mine)


def _fix_metadata(out: str, attrs: Y.RootAttrs, vocab: int) -> list[str]:
    """Every array's and group's zarr.json as create_arrays writes it for these attributes (written into
    a scratch folder and compared), replaced where missing, unreadable or different."""
    notes = []
    scratch = tempfile.mkdtemp(prefix="pikv-repair-")
    try:
        zarr.open_group(scratch, mode="w")
        create_arrays(scratch, attrs.n_sequences, seq_len=attrs.seq_len, targets=attrs.targets, vocab_size=vocab,
                      unit_seqs=attrs.unit_seqs)
        for folder, _, files in sorted(os.walk(scratch)):
            if folder == scratch or "zarr.json" not in files:
                continue
            rel = os.path.relpath(folder, scratch)
            with open(os.path.join(folder, "zarr.json")) as f:
                want = json.load(f)
            dst = os.path.join(out, rel, "zarr.json")
            try:
                with open(dst) as f:
                    have = json.load(f)
            except (OSError, ValueError):
                have = None
            if have == want:
                continue
            _clear_way(out, rel)
            os.makedirs(os.path.join(out, rel), exist_ok=True)
            if os.path.lexists(dst):
                _remove(dst)
            fd, tmp = tempfile.mkstemp(dir=os.path.join(out, rel), prefix=".zarr.json.")  # a new file: no planted link
            with os.fdopen(fd, "wb") as f, open(os.path.join(folder, "zarr.json"), "rb") as src:
                f.write(src.read())
            os.replace(tmp, dst)
            notes.append(f"rewrote the metadata of {rel} ({'missing or unreadable' if have is None else 'changed'})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return notes


def _clear_way(out: str, rel: str) -> None:
    """Make folder ``out/rel`` one a repair may write in: a part of it that is a symbolic link is refused (a
    repair writes and deletes only inside the cache's folder); a part that is a file, where a folder
    belongs, is removed."""
    path = out
    for part in [p for p in rel.split(os.sep) if p]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise PikvError(f"--repair: {path} is a symbolic link, and a repair writes only inside the cache's folder; "
                            "replace the link by a folder with its contents (or re-dump the cache)")
        if not os.path.lexists(path):
            return
        if not os.path.isdir(path):
            os.remove(path)
            return


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)

