"""Who holds what in a cache and the attributes that say so: the one owner of the cache's layout.

format.py says what each array is (names, dtypes, codecs, encodings); this module says where the
sequences go and what the root and each writer group record about them:
  - writer group r of W (``shards/rank-<r>``) holds the global sequences r, r+W, r+2W, ... in order;
  - the root attributes (``RootAttrs``) and each group's (``GroupAttrs``), validated when read;
  - the tokenizer folder inside the cache; the cache-key recipe.
The writer, the reader, verify and the dump import these; nothing else derives them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..errors import PikvError
from .format import ENCODINGS, FORMAT_VERSION, MAX_TAIL

ROOT_ATTR = "pikv"  # key of the root attributes dict
GROUP_ATTR = "pikv_shard"  # key of each writer group's attributes dict
GROUPS = "shards"  # the folder of the writer groups
TOKENIZER_DIR = "tokenizer"  # the teacher's tokenizer (save_pretrained), inside the cache


def group_name(rank: int) -> str:
    return f"{GROUPS}/rank-{rank:05d}"


def group_sample_ids(n_seqs: int, rank: int, world_size: int) -> np.ndarray:
    """The global sequence ids writer group ``rank`` of ``world_size`` holds, in its row order."""
    return np.arange(rank, n_seqs, world_size, dtype=np.int64)


def group_size(n_seqs: int, rank: int, world_size: int) -> int:
    return len(range(rank, n_seqs, world_size))


def global_rows(rank: int, world_size: int, start: int, stop: int) -> slice:
    """The positions in global sequence order of rows [start, stop) of group ``rank``."""
    return slice(rank + start * world_size, rank + stop * world_size, world_size)


def cache_key(*, teacher: dict, tokenizer_sha256: str, fingerprint: str, seq_len: int, targets: dict) -> str:
    """What defines a cache's content: the teacher (config, weights, compute dtype; not its name), the
    tokenizer, the packed data, seq_len, the targets and the format version."""
    fields = {"format_version": FORMAT_VERSION, "teacher": {k: v for k, v in teacher.items() if k != "name"},
              "tokenizer": tokenizer_sha256, "data": fingerprint, "seq_len": seq_len, "targets": targets}
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
    targets: dict  # logits: top_k, sampled_tail, temperatures, encoding, id_dtype; rich kinds when asked
    world_size: int
    shard_seqs: int
    counts: dict  # sequences; at completion also positions, loss_tokens
    package_version: str | None = None
    dump_config: dict = dataclasses.field(default_factory=dict)
    bytes_stored: dict = dataclasses.field(default_factory=dict)
    encoding_errors: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "RootAttrs":
        """Checked: every field present with its type, the version known, the layout's own values."""
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise PikvError(f"{where} has cache format version {version}, this pikv reads version "
                            f"{FORMAT_VERSION}; re-dump it or use a matching pikv release")
        for key, kind, low in (("seq_len", int, 2), ("world_size", int, 1), ("shard_seqs", int, 1)):
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
        _need(d["counts"], "sequences", int, f"{where} (counts)", 0)
        lg = _need(d["targets"], "logits", dict, f"{where} (targets)")
        _need(lg, "top_k", int, f"{where} (targets.logits)", 0)
        draws = _need(lg, "sampled_tail", int, f"{where} (targets.logits)", 0)
        temps = _need(lg, "temperatures", list, f"{where} (targets.logits)")
        if draws > MAX_TAIL or lg.get("encoding") not in ENCODINGS or not temps or temps[0] != 1.0 or not all(
                isinstance(t, (int, float)) and t > 0 for t in temps):
            raise _damaged(where, f"targets.logits {lg} is not a valid head/tail/temperature description")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupAttrs:
    """A writer group's ``attributes["pikv_shard"]``: ``committed`` rows of ``n_sequences`` are on disk."""
    rank: int
    world_size: int
    n_sequences: int
    committed: int
    cache_key: str
    encoding_errors: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str) -> "GroupAttrs":
        if not isinstance(d, dict):
            raise _damaged(where, "the group has no pikv attributes")
        for key in ("rank", "world_size", "n_sequences", "committed"):
            _need(d, key, int, where, 0)
        _need(d, "cache_key", str, where)
        if d["committed"] > d["n_sequences"]:
            raise _damaged(where, f"{d['committed']} sequences committed of {d['n_sequences']}")
        return cls(**{k: d[k] for k in ("rank", "world_size", "n_sequences", "committed", "cache_key")},
                   encoding_errors=dict(d.get("encoding_errors") or {}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["encoding_errors"]:  # written only once a block measured some
            del d["encoding_errors"]
        return d
