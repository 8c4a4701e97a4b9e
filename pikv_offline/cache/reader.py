"""Open a teacher cache and read its sequences; refuses an incomplete, unknown-version or damaged cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr

from .. import storage
from ..errors import PikvError, brief
from . import format as F
from . import layout as Y


def read_root_attrs(path: str) -> dict | None:
    """The cache's root attributes, or None when ``path`` holds no pikv cache."""
    try:
        if storage.is_url(path) and storage.read_bytes(path, "zarr.json") is None:
            return None
        if not storage.is_url(path) and not os.path.isfile(os.path.join(storage.local(path), "zarr.json")):
            return None
        group = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
    except PikvError:
        raise
    except Exception as e:
        storage.raise_remote(e, path)
        return None
    attrs = group.attrs.get(Y.ROOT_ATTR)
    return dict(attrs) if isinstance(attrs, dict) else None


def decode(raw: dict[str, np.ndarray], encoding: str, top_k: int | None = None,
           by_prob: bool = False, rich: tuple = ()) -> dict[str, np.ndarray]:
    """Stored arrays of some rows -> decoded ones: ids int64, log-probs float32, counts int64, and
    ``tnorm`` [.., nT] float32 with its T=1 column of zeros. A target the cache does not hold comes
    back empty (e.g. [S, L, 0] head ids of a pure sampling cache), so callers need no special case.
    Each format.RichArray in ``rich`` comes back as float32 [S, L, *shape] under its name."""
    shape = raw[F.INPUT_IDS].shape
    out = {F.INPUT_IDS: raw[F.INPUT_IDS], F.LOSS_MASK: raw[F.LOSS_MASK], F.SAMPLE_ID: raw[F.SAMPLE_ID]}
    if F.HEAD_IDS in raw:
        out[F.HEAD_IDS], out[F.HEAD_LOGPROBS] = F.decode_head(raw[F.HEAD_IDS], raw[F.HEAD_LOGPROBS], encoding, top_k,
                                                              by_prob)
    else:
        out[F.HEAD_IDS], out[F.HEAD_LOGPROBS] = np.zeros((*shape, 0), np.int64), np.zeros((*shape, 0), np.float32)
    out[F.TNORM] = F.decode_tnorm(raw.get(F.TNORM), shape)
    if F.TAIL_IDS in raw:
        out[F.TAIL_IDS] = F.decode_gaps(raw[F.TAIL_IDS])
        out[F.TAIL_LOGPROBS] = F.decode_logprobs(raw[F.TAIL_LOGPROBS], encoding)
        out[F.TAIL_COUNTS] = raw[F.TAIL_COUNTS].astype(np.int64)
    else:
        out.update({F.TAIL_IDS: np.zeros((*shape, 0), np.int64), F.TAIL_LOGPROBS: np.zeros((*shape, 0), np.float32),
                    F.TAIL_COUNTS: np.zeros((*shape, 0), np.int64)})
    for a in rich:
        out[a.name] = F.decode_tensor(raw[a.name], raw.get(a.scale_name), a.encoding, a.group)
    return out


@dataclass
class Cache:
    path: str
    attrs: Y.RootAttrs  # checked when the cache was opened
    arrays: dict  # array name -> zarr array over all sequences
    tensorstore: dict | None = None  # array name -> TensorStore handle, when the rows are read through it
    _fetched: str | None = None  # the local copy of a URL cache's tokenizer

    @property
    def tokenizer_path(self) -> str:
        """A local folder holding the cache's tokenizer (fetched once from an object store)."""
        if not storage.is_url(self.path):
            return os.path.join(storage.local(self.path), Y.TOKENIZER_DIR)
        if self._fetched is None:
            self._fetched = storage.fetch_folder(self.path, Y.TOKENIZER_DIR)
        return self._fetched

    @property
    def logits(self) -> dict:
        return self.attrs.targets["logits"]

    @property
    def top_k(self) -> int:
        return int(self.logits["top_k"])

    @property
    def draws(self) -> int:
        """Draws of the sampled tail per position (0: none)."""
        return int(self.logits.get("sampled_tail", 0))

    @property
    def tail_temperatures(self) -> list[float]:
        """The temperatures the sampled tail's slots cycle over ([] without a tail; FORMAT.md)."""
        return [float(t) for t in self.logits.get("tail_temperatures", [])]

    @property
    def encoding(self) -> str:
        return self.logits["encoding"]

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.logits["temperatures"]]

    @property
    def seq_len(self) -> int:
        return self.attrs.seq_len

    @property
    def n(self) -> int:
        """Sequences the cache covers (all committed when it is complete)."""
        return self.attrs.n_sequences

    @property
    def names(self) -> tuple[str, ...]:
        return F.present_arrays(self.attrs.targets)

    @property
    def logit_names(self) -> tuple[str, ...]:
        return F.logit_arrays(self.top_k, len(self.temperatures), self.draws)

    @property
    def rich(self) -> list:
        """Every stored rich target array (format.RichArray)."""
        return F.rich_arrays(self.attrs.targets)

    @property
    def relative_error(self) -> float:
        """The stored log-probs' relative rounding error (their encoding's)."""
        return F.ENCODINGS[self.encoding].relative_error

    def check_tokenizer(self, trust_remote_code: bool = False) -> None:
        """The saved tokenizer is the one the cache was written with (its hash), so checkpoints copy the right one.
        Code it ships (an auto_map) runs only with ``trust_remote_code`` (never a prompt: False, not None)."""
        from transformers import AutoTokenizer

        from ..modeling import code_refused, tokenizer_hash

        where = storage.join(self.path, Y.TOKENIZER_DIR)  # its place in the cache, not a fetched copy
        try:
            tok = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=trust_remote_code)
        except PikvError:
            raise
        except Exception as e:
            raise PikvError(code_refused(e, "the cache's tokenizer", where)
                            or f"{where}: the cache's tokenizer does not load ({brief(e)}); the cache is "
                            "damaged, re-dump it")
        if tokenizer_hash(tok) != self.attrs.tokenizer_sha256:
            raise PikvError(f"{where}: the cache's tokenizer is not the one it was written with (hash "
                            "differs); the cache is damaged, re-dump it")

    def first_unreadable(self, rows: np.ndarray, names: tuple[str, ...] | None = None) -> str:
        """The first array (of ``names``, default all) whose ``rows`` do not read: to name it in an error."""
        for name in names or self.names:
            try:
                self.arrays[name].oindex[np.asarray(rows)]
            except Exception as e:
                storage.raise_remote(e, self.path)
                return name
        return "an array"

    def missing_shard(self, u: int, files: dict | None = None) -> tuple[str, str] | None:
        """(array, shard file key) of the first array whose shard file of unit ``u`` is missing or empty, or
        None: such a shard reads back as the fill value (zeros), not as an error. ``files`` (shard_files)
        answers from one listing per array instead of a look per file (an object store's round trips)."""
        for name, arr in self.arrays.items():
            key = Y.shard_key(arr, u)
            if files is not None:
                size = files[name].get(key)
            else:
                size = storage.size(self.path, f"{name}/{key}")
            if not size:
                return name, key
        return None

    def shard_files(self) -> dict[str, dict[str, int]] | None:
        """For a URL cache, array name -> {file key: size} of every object in its folder (one listing per
        array); None for a local one, whose files are looked at one by one (a stat is cheap)."""
        return {name: storage.sizes(self.path, name) for name in self.arrays} if storage.is_url(self.path) else None

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of array ``name``: through TensorStore when opened so
        (bench/readers.py: ~6x zarr-python's default on 2 cores, the same values), else zarr-python."""
        if self.tensorstore is not None:
            return self.tensorstore[name][np.asarray(rows, np.int64)].read().result()
        return self.arrays[name].oindex[rows]

    def committed_units(self) -> list[int]:
        """The units with a marker, of those the cache covers, in order."""
        return sorted(u for u in Y.committed_units(self.path) if u < self.attrs.n_units)

    def read(self, start: int, stop: int, top_k: int | None = None) -> dict[str, np.ndarray]:
        """Sequences [start, stop), decoded, the head most probable first.

        ``top_k`` truncates at read time (the stored head is exact, so its best k' are too), so one
        cache serves a sweep over k.
        """
        return decode({name: self.arrays[name][start:stop] for name in self.names}, self.encoding, top_k,
                      by_prob=True, rich=tuple(self.rich))

    def read_all(self, top_k: int | None = None, first: int | None = None) -> dict[str, np.ndarray]:
        """Sample ids [0, ``first``) (default: all), in sample-id order (for tests, verify, small caches)."""
        first = self.n if first is None else min(first, self.n)
        blocks = -(-first // (Y.SHUFFLE_UNITS * self.attrs.unit_seqs))  # a block holds its own ids, shuffled
        got = self.read(0, min(self.n, blocks * Y.SHUFFLE_UNITS * self.attrs.unit_seqs), top_k)
        order = np.argsort(got[F.SAMPLE_ID], kind="stable")[:first]
        return {name: a[order] for name, a in got.items()}

    def bytes_per_array(self) -> dict[str, int]:
        """Stored (compressed) bytes of each array."""
        return {name: int(self.arrays[name].nbytes_stored()) for name in self.names}


def open_cache(path: str, allow_incomplete: bool = False, check: bool = True, reader: str = "zarr") -> Cache:
    """The cache at ``path``, its root attributes validated; with ``check`` (not for a repair, which
    looks at every unit itself) also the cheap checks of _check_open. ``reader`` (auto, zarr, tensorstore) is what
    Cache.take reads rows with: auto is TensorStore when it is installed (pip install tensorstore)."""
    path = storage.normalize(path)
    raw = read_root_attrs(path)
    if raw is None:
        raise PikvError(f"{path} is not a pikv teacher cache (no zarr.json with '{Y.ROOT_ATTR}' attributes); "
                        "create one with `pikv dump-teacher`")
    attrs = Y.RootAttrs.from_dict(raw, path)
    if not attrs.complete and not allow_incomplete:
        raise PikvError(f"{path} is an incomplete cache (the dump did not finish); re-run the same "
                        "`pikv dump-teacher` command to resume it")
    root = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
    arrays = {}
    for name in F.present_arrays(attrs.targets):
        try:
            arrays[name] = root[name]
        except Exception as e:
            raise PikvError(f"{path}/{name}: the array cannot be opened ({brief(e)}); the cache is damaged, "
                            "re-dump it")
    for name in F.ARRAY_NAMES:  # an array the attributes do not declare: they were changed (e.g. top_k 0)
        if name not in arrays and root.get(name) is not None:
            raise PikvError(f"{path}: holds {name}, which its root attributes do not declare; the cache is damaged, "
                            "re-dump it")
    cache = Cache(path=path, attrs=attrs, arrays=arrays)
    if check:
        _check_open(cache)
    if reader == "tensorstore" and storage.is_url(path):
        raise PikvError(f"--reader tensorstore reads local caches; {path} is a URL: use --reader zarr (or auto)")
    if reader != "zarr" and not storage.is_url(path):
        cache.tensorstore = _tensorstore(storage.local(path), arrays, required=reader == "tensorstore")
    return cache


def _tensorstore(path: str, arrays: dict, required: bool) -> dict | None:
    """TensorStore handles of the arrays (an independent Zarr v3 reader; checksums verified as zarr-python
    does), or None when it is not installed and not ``required``. A process that used TensorStore must
    not fork a child that uses it (the child aborts): open it in the process that reads."""
    try:
        import tensorstore as ts
    except ImportError:
        if required:
            raise PikvError("--reader tensorstore needs TensorStore: pip install tensorstore (or pikv-offline[fast])")
        return None
    try:
        return {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, name)}},
                              read=True).result() for name in arrays}
    except Exception as e:
        raise PikvError(f"{path}: TensorStore cannot open the cache ({brief(e)}); the cache is damaged, re-dump it")


def _check_open(cache: Cache) -> None:
    """The cheap checks every open does (verify does the rest): every array's shape against the root
    and the format, a marker for every unit of a complete cache, and the file of every zarr shard of
    the committed units, since a missing shard file reads back as zeros, not as an error."""
    a = cache.attrs
    specs = F.array_specs(a.n_sequences, a.seq_len, a.targets, a.teacher["vocab_size"], a.unit_seqs)
    for name, arr in cache.arrays.items():
        if arr.shape != specs[name].shape or (arr.shards or arr.chunks)[0] != a.unit_seqs:
            raise PikvError(f"{cache.path}/{name} has shape {arr.shape} in shards of {(arr.shards or arr.chunks)[0]}, "
                            f"the root says {specs[name].shape} in units of {a.unit_seqs}; the cache is damaged (or a "
                            "dump extended it while this ran: start again), re-dump it")
    units = cache.committed_units()
    files = cache.shard_files() if units else None
    if a.complete:  # a few markers, spread over the cache: they must commit it as it is (verify reads all)
        for u in sorted({0, a.n_units - 1, *range(0, a.n_units, max(1, a.n_units // 8))} & set(units)):
            m = Y.read_marker(cache.path, u)
            if m is None or not m.holds(u, a.n_sequences, a.unit_seqs, a.cache_key):
                raise PikvError(f"{cache.path}: the marker of unit {u} does not commit this cache ({m}); the cache "
                                "is damaged, or its attributes were changed: re-dump it")
    if a.complete and len(units) != a.n_units:
        missing = sorted(set(range(a.n_units)) - set(units))
        raise PikvError(f"{cache.path}: {len(missing)} of its {a.n_units} units are not committed (first: unit "
                        f"{missing[0]}, sequences {Y.unit_range(missing[0], a.n_sequences, a.unit_seqs)}), yet the "
                        "cache is marked complete; it is damaged (or was copied while a dump ran): re-run the dump")
    for u in units:
        missing = cache.missing_shard(u, files)
        if missing:
            start, stop = Y.unit_range(u, a.n_sequences, a.unit_seqs)
            raise PikvError(f"{cache.path}/{missing[0]}: the data of unit {u} (sequences [{start}, {stop})) is missing "
                            f"(no file {missing[1]}); the cache is damaged: re-dump it, or repair it (the same "
                            "`pikv dump-teacher` command with --repair)")


def describe(path: str) -> dict:
    """What `pikv inspect` prints: the root attributes plus live counts and stored bytes per token."""
    cache = open_cache(path, allow_incomplete=True)
    a = cache.attrs
    units = cache.committed_units()
    committed = sum(b - s for s, b in (Y.unit_range(u, a.n_sequences, a.unit_seqs) for u in units))
    positions = committed * cache.seq_len
    stored = cache.bytes_per_array()
    bpt = {k: round(v / max(positions, 1), 2) for k, v in stored.items()}
    counts = dict(a.counts)
    counts.update({"committed": committed, "units": a.n_units, "committed_units": len(units),
                   "positions": counts.get("positions", positions)})
    by_target = {"inputs": sum(bpt[n] for n in (F.INPUT_IDS, F.LOSS_MASK, F.SAMPLE_ID))}
    by_target["logits"] = sum(v for k, v in bpt.items() if k.startswith("logits/"))
    for r in cache.rich:
        label = f"{r.kind}:{r.layer}"
        by_target[label] = by_target.get(label, 0.0) + sum(bpt[n] for n in r.stored)
    return {"path": path, "format_version": a.format_version, "complete": a.complete,
            "cache_key": a.cache_key, "teacher": a.teacher, "data": a.data, "seq_len": a.seq_len,
            "targets": a.targets, "unit_seqs": a.unit_seqs,
            "counts": counts, "bytes_stored": stored, "bytes_per_token": bpt,
            "bytes_per_token_total": round(sum(bpt.values()), 2),
            "bytes_per_token_by_target": {k: round(v, 2) for k, v in by_target.items()},
            "encoding_errors": a.encoding_errors if a.complete else encoding_errors(cache),
            "package_version": a.package_version}


def encoding_errors(cache: Cache) -> dict:
    """Measured error of each rich target's encoding over every committed unit (format.error_summary)."""
    merged: dict = {}
    for u in cache.committed_units():
        marker = Y.read_marker(cache.path, u)
        for target, e in (marker.encoding_errors if marker else {}).items():
            merged[target] = F.merge_errors(merged.get(target), e)
    return {k: F.error_summary(v) for k, v in sorted(merged.items())}
