"""Who holds what in a cache and the attributes that say so: the one owner of the cache's layout.

format.py says what each array is (names, dtypes, codecs, encodings); this module says where the
sequences go and what records them:
  - every array covers all N sequences; it is written in *units* of ``unit_seqs`` sequences, unit u =
    rows [u*S, min((u+1)*S, N)), one zarr shard file per array, holding the sample ids (rows of the
    prepared data) of that range in a seeded order (unit_sample_ids);
  - any rank may write any unit; rank r of W takes the units u with u % W == r that are not
    committed yet, so a dump resumes at any world size and no lock is needed;
  - a unit is committed by its marker file ``units/u-<u>.json`` (``UnitMarker``), written atomically
    after the unit's data is on disk; the root attributes (``RootAttrs``) are marked complete last;
  - the tokenizer folder inside the cache; the cache-key recipe (independent of N, so a cache can be
    extended by more sequences of the same data).
The writer, the reader, verify and the dump import these; nothing else derives them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import PikvError
from .format import ENCODINGS, FORMAT_VERSION, MAX_TAIL, RICH_KINDS, TENSOR_ENCODINGS

ROOT_ATTR = "pikv"  # key of the root attributes dict
UNITS_DIR = "units"  # the folder of the unit markers
TOKENIZER_DIR = "tokenizer"  # the teacher's tokenizer (save_pretrained), inside the cache
LOCK_FILE = ".pikv-dump.lock"  # held by the dump writing the cache (lock.hold), for its life


def n_units(n_seqs: int, unit_seqs: int) -> int:
    return -(-n_seqs // unit_seqs)


def unit_range(unit: int, n_seqs: int, unit_seqs: int) -> tuple[int, int]:
    """The global sequence ids [start, stop) of ``unit``."""
    return unit * unit_seqs, min((unit + 1) * unit_seqs, n_seqs)


SHUFFLE_UNITS = 16  # units whose sequences are shuffled together at dump time (a block)


def block_range(unit: int, n_seqs: int, unit_seqs: int) -> tuple[int, int]:
    """The rows [start, stop) of the block of SHUFFLE_UNITS units that ``unit`` belongs to."""
    b = unit // SHUFFLE_UNITS
    return b * SHUFFLE_UNITS * unit_seqs, min((b + 1) * SHUFFLE_UNITS * unit_seqs, n_seqs)


def unit_sample_ids(unit: int, n_seqs: int, unit_seqs: int, seed: int) -> np.ndarray:
    """The sample ids (rows of the prepared data) that ``unit``'s rows hold, in row order.

    Consecutive prepared sequences are consecutive text, and the training order keeps an inner chunk
    (the unit of decoding, 8 rows) whole; so the dump shuffles the sequences of each block of
    SHUFFLE_UNITS units (a permutation seeded by the data and the block) and a chunk holds unrelated
    ones from a span of SHUFFLE_UNITS * unit_seqs sequences. The permutation depends on the block's
    size: extending a cache rewrites the units of its last, grown block (UnitMarker.block says which)."""
    b0, b1 = block_range(unit, n_seqs, unit_seqs)
    perm = np.random.default_rng([seed, unit // SHUFFLE_UNITS, b1 - b0]).permutation(b1 - b0).astype(np.int64)
    start, stop = unit_range(unit, n_seqs, unit_seqs)
    return b0 + perm[start - b0:stop - b0]


def order_seed(data_fingerprint: str) -> int:
    return int(data_fingerprint[:16], 16)


def rank_units(n_seqs: int, unit_seqs: int, rank: int, world_size: int) -> range:
    """The units rank ``rank`` of ``world_size`` writes (those not committed yet)."""
    return range(rank, n_units(n_seqs, unit_seqs), world_size)


def shard_key(array, unit: int) -> str:
    """The file of ``unit`` in zarr ``array`` (relative to the array's folder): the unit is one shard of it."""
    return array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))


def marker_name(unit: int) -> str:
    return f"{UNITS_DIR}/u-{unit:08d}.json"


def cache_key(*, teacher: dict, tokenizer_sha256: str, data: str, seq_len: int, targets: dict) -> str:
    """What defines a cache's content: the teacher (config, weights, compute dtype; not its name), the
    tokenizer, the prepared data (data.Prepared.fingerprint: the source and how it was packed, not how
    many sequences), seq_len, the targets and the format version."""
    fields = {"format_version": FORMAT_VERSION, "teacher": {k: v for k, v in teacher.items() if k != "name"},
              "tokenizer": tokenizer_sha256, "data": data, "seq_len": seq_len, "targets": targets}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _damaged(where: str, what: str) -> PikvError:
    return PikvError(f"{where}: {what}; the cache is damaged or not written by pikv, re-dump it")


def _need(d: dict, key: str, kind, where: str, minimum: int | None = None):
    v = d.get(key)
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok or (minimum is not None and v < minimum):
        raise _damaged(where, f"attribute {key} is {v!r}, expected {getattr(kind, '__name__', kind)}"
                       + (f" >= {minimum}" if minimum is not None else ""))
    return v


@dataclass(frozen=True)
class RootAttrs:
    """The root group's ``attributes["pikv"]`` (FORMAT.md, root attributes)."""
    format_version: int
    complete: bool
    cache_key: str
    teacher: dict  # name, weights_sha256, config_sha256, model_type, vocab_size, num_layers, dtype
    tokenizer_sha256: str
    tokenizer_dir: str
    data: dict  # data, split, data_config, text_field, chat_field, pack, max_sequences, fingerprint
    seq_len: int
    targets: dict  # logits: top_k, sampled_tail, tail_temperatures, temperatures, encoding, id_dtype; rich kinds when asked
    unit_seqs: int
    counts: dict  # sequences; at completion also positions, loss_tokens
    content_sha256: str | None = None  # at completion: the hash of the units' input hashes, in order
    package_version: str | None = None
    dump_config: dict = dataclasses.field(default_factory=dict)
    bytes_stored: dict = dataclasses.field(default_factory=dict)
    encoding_errors: dict = dataclasses.field(default_factory=dict)

    @property
    def n_sequences(self) -> int:
        return self.counts["sequences"]

    @property
    def n_units(self) -> int:
        return n_units(self.n_sequences, self.unit_seqs)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RootAttrs":
        """Checked: every field present with its type, the version known, the layout's own values."""
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise PikvError(f"{where} has cache format version {version!r}, this pikv reads version "
                            f"{FORMAT_VERSION}; re-dump it with this pikv (the data preparation and the "
                            "teacher run again), or use a matching pikv release")
        for key, kind, low in (("seq_len", int, 2), ("unit_seqs", int, 1)):
            _need(d, key, kind, where, low)
        for key in ("cache_key", "tokenizer_sha256", "tokenizer_dir"):
            _need(d, key, str, where)
        for key in ("teacher", "data", "targets", "counts"):
            _need(d, key, dict, where)
        _need(d, "complete", bool, where)
        if d["tokenizer_dir"] != TOKENIZER_DIR:
            raise _damaged(where, f"attribute tokenizer_dir is {d['tokenizer_dir']!r}; a cache keeps its tokenizer "
                                  f"in {TOKENIZER_DIR}/")
        _need(d["teacher"], "vocab_size", int, f"{where} (teacher)", 1)
        _need(d["teacher"], "num_layers", int, f"{where} (teacher)", 0)
        _need(d["data"], "fingerprint", str, f"{where} (data)")
        _need(d["counts"], "sequences", int, f"{where} (counts)", 1)
        lg = _need(d["targets"], "logits", dict, f"{where} (targets)")
        _need(lg, "top_k", int, f"{where} (targets.logits)", 0)
        draws = _need(lg, "sampled_tail", int, f"{where} (targets.logits)", 0)
        temps = _need(lg, "temperatures", list, f"{where} (targets.logits)")
        if draws > MAX_TAIL or lg.get("encoding") not in ENCODINGS or lg.get("id_dtype") not in ("uint16", "uint32") \
                or not temps or temps[0] != 1.0 or len(set(temps)) != len(temps) or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
                    for t in temps):
            raise _damaged(where, f"targets.logits {lg} is not a valid head/tail/temperature description")
        proposal = lg.get("tail_temperatures")
        if (draws or proposal is not None) and not (isinstance(proposal, list) and 0 < len(proposal) <= draws and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and t in temps for t in proposal)):
            raise _damaged(where, f"targets.logits tail_temperatures {proposal!r} is not a list of grid temperatures "
                                  "(the proposal of the sampled tail)")
        for kind in RICH_KINDS:
            t = d["targets"].get(kind)
            if t is None:
                continue
            ok = isinstance(t, dict) and t.get("encoding") in TENSOR_ENCODINGS and all(
                isinstance(t.get(k), list) and t[k] and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                            for x in t[k]) for k in ("layers", "shape"))
            if not ok or (t.get("group") is not None and not (isinstance(t["group"], int) and t["group"] > 0)):
                raise _damaged(where, f"targets.{kind} {t} is not a valid rich target description")
        for key in ("bytes_stored", "encoding_errors", "dump_config"):  # shown by inspect: of the kinds it prints
            if not isinstance(d.get(key, {}), dict):
                raise _damaged(where, f"attribute {key} is not a dict")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in d.get("bytes_stored", {}).values()) or not all(
                isinstance(e, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in e.values())
                for e in d.get("encoding_errors", {}).values()):
            raise _damaged(where, "attribute bytes_stored or encoding_errors holds values that are not numbers")
        names = {f.name for f in dataclasses.fields(cls)}
        attrs = cls(**{k: v for k, v in d.items() if k in names})
        if attrs.recomputed_key() != attrs.cache_key:
            raise _damaged(where, f"its cache key {attrs.cache_key} is not the hash of the attributes that define "
                                  "its content (teacher, tokenizer, data, seq_len, targets): they were changed")
        return attrs

    def recomputed_key(self) -> str:
        return cache_key(teacher=self.teacher, tokenizer_sha256=self.tokenizer_sha256, data=self.data["fingerprint"],
                         seq_len=self.seq_len, targets=self.targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class UnitMarker:
    """``units/u-<u>.json``: unit ``unit`` holds sequences [start, stop) of the cache with ``cache_key``,
    their inputs hash to ``sha256`` (data.fingerprint) and hold ``loss_tokens`` training targets."""
    unit: int
    start: int
    stop: int
    cache_key: str
    sha256: str
    loss_tokens: int
    block: list
    arrays_sha256: str  # of every stored array's bytes of the unit, in format.present_arrays order  # [start, stop) rows of the unit's shuffle block when it was written
    encoding_errors: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str) -> "UnitMarker":
        if not isinstance(d, dict):
            raise _damaged(where, "the unit marker is not a JSON object")
        for key in ("unit", "start", "stop", "loss_tokens"):
            _need(d, key, int, where, 0)
        for key in ("cache_key", "sha256", "arrays_sha256"):
            _need(d, key, str, where)
        errors = d.get("encoding_errors") or {}
        if not isinstance(errors, dict) or not all(isinstance(e, dict) for e in errors.values()):
            raise _damaged(where, "attribute encoding_errors is not a dict of dicts")
        block = d.get("block")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(x, int) for x in block)):
            raise _damaged(where, f"attribute block is {block!r}, expected [start, stop]")
        return cls(**{k: d[k] for k in ("unit", "start", "stop", "cache_key", "sha256", "loss_tokens", "block",
                                        "arrays_sha256")},
                   encoding_errors=dict(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def holds(self, unit: int, n_seqs: int, unit_seqs: int, cache_key: str) -> bool:
        """Whether this marker commits ``unit`` of the cache as it is now (an extended cache's old
        partial last unit is not committed: its range grew; nor are the units of its grown last block)."""
        return (self.unit, (self.start, self.stop), tuple(self.block), self.cache_key) == (
            unit, unit_range(unit, n_seqs, unit_seqs), block_range(unit, n_seqs, unit_seqs), cache_key)


def read_marker(cache_path: str, unit: int) -> UnitMarker | None:
    """The marker of ``unit``, or None when it has none; a marker that is not valid JSON is damage."""
    path = storage.join(cache_path, marker_name(unit))
    try:
        data = storage.read_bytes(cache_path, marker_name(unit))
    except OSError as e:  # a directory, unreadable, ...
        raise _damaged(path, f"the unit marker cannot be read ({e.strerror or e})")
    if data is None:
        return None
    try:
        d = json.loads(data)
    except ValueError:
        raise _damaged(path, "the unit marker is not valid JSON")
    return UnitMarker.from_dict(d, path)


def is_committed(cache_path: str, unit: int, n_seqs: int, unit_seqs: int, cache_key: str) -> bool:
    """Whether ``unit`` has a marker that commits it for the cache as it is now (UnitMarker.holds)."""
    m = read_marker(cache_path, unit)
    return m is not None and m.holds(unit, n_seqs, unit_seqs, cache_key)


def write_marker(cache_path: str, marker: UnitMarker) -> None:
    """Atomically (storage.write_bytes): a crash leaves the old marker or the new one, never a torn file."""
    storage.write_bytes(cache_path, marker_name(marker.unit), json.dumps(marker.to_dict()).encode())


def remove_marker(cache_path: str, unit: int) -> None:
    storage.remove(cache_path, marker_name(unit))


def committed_units(cache_path: str) -> set[int]:
    """The units that have a marker file (one listing; the markers' contents are checked where it matters)."""
    try:
        names = storage.names(cache_path, UNITS_DIR)
    except OSError as e:
        raise _damaged(storage.join(cache_path, UNITS_DIR), f"the units folder cannot be listed ({e.strerror or e})")
    return {int(n[2:-5]) for n in names or () if n.startswith("u-") and n.endswith(".json") and n[2:-5].isdigit()}


def arrays_sha256(arrays: dict, names) -> str:
    """The hash of a unit's stored arrays (as written, after encoding), in ``names`` order."""
    h = hashlib.sha256()
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def content_sha256(unit_hashes: list[str]) -> str:
    """The hash of a cache's inputs: of its units' input hashes, in unit order."""
    return hashlib.sha256("".join(unit_hashes).encode()).hexdigest()
