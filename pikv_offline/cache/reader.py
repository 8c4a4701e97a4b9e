"""Open a teacher cache and read its writer groups; refuses an incomplete or unknown-version cache unless told."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import PikvError, brief
from . import format as F
from . import layout as Y


def read_root_attrs(path: str) -> dict | None:
    """The cache's root attributes, or None when ``path`` holds no pikv cache."""
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        return None
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:
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
        out[F.TAIL_IDS] = raw[F.TAIL_IDS].astype(np.int64)
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
    groups: list  # zarr groups, one per writer rank, in rank order

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, Y.TOKENIZER_DIR)

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
    def encoding(self) -> str:
        return self.logits["encoding"]

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.logits["temperatures"]]

    @property
    def seq_len(self) -> int:
        return self.attrs.seq_len

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

    def group_attrs(self, i: int) -> Y.GroupAttrs:
        return Y.GroupAttrs.from_dict(self.groups[i].attrs.get(Y.GROUP_ATTR), f"{self.path}: {self.groups[i].name}")

    def group_len(self, i: int) -> int:
        """Committed sequences of writer group ``i``."""
        return self.group_attrs(i).committed

    def read(self, i: int, start: int, stop: int, top_k: int | None = None) -> dict[str, np.ndarray]:
        """Sequences [start, stop) of writer group ``i``, decoded, the head most probable first.

        ``top_k`` truncates at read time (the stored head is exact, so its best k' are too), so one
        cache serves a sweep over k.
        """
        g = self.groups[i]
        return decode({name: g[name][start:stop] for name in self.names}, self.encoding, top_k, by_prob=True,
                      rich=tuple(self.rich))

    def read_all(self, top_k: int | None = None, first: int | None = None) -> dict[str, np.ndarray]:
        """Every committed sequence of every writer group (or the ``first`` sample ids), ordered by sample id
        (for tests, verify and small caches)."""
        world = len(self.groups)
        parts = [self.read(i, 0, self.group_len(i) if first is None else Y.group_size(first, i, world), top_k)
                 for i in range(world)]
        parts = [p for p in parts if len(p[F.SAMPLE_ID])]
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.argsort(out[F.SAMPLE_ID], kind="stable")
        return {name: a[order] for name, a in out.items()}

    def bytes_per_array(self) -> dict[str, int]:
        """Stored (compressed) bytes of each array summed over writer groups."""
        return {name: sum(int(g[name].nbytes_stored()) for g in self.groups) for name in self.names}


def open_cache(path: str, allow_incomplete: bool = False) -> Cache:
    raw = read_root_attrs(path)
    if raw is None:
        raise PikvError(f"{path} is not a pikv teacher cache (no zarr.json with '{Y.ROOT_ATTR}' attributes); "
                        "create one with `pikv dump-teacher`")
    attrs = Y.RootAttrs.from_dict(raw, path)
    if not attrs.complete and not allow_incomplete:
        raise PikvError(f"{path} is an incomplete cache (the dump did not finish); re-run the same "
                        "`pikv dump-teacher` command to resume it")
    root = zarr.open_group(path, mode="r")
    groups = []
    for r in range(attrs.world_size):
        g = root.get(Y.group_name(r))
        if g is None:
            if allow_incomplete:
                continue
            raise PikvError(f"{path}: writer group {Y.group_name(r)} is missing; the cache is damaged, re-dump it")
        groups.append(g)
    cache = Cache(path=path, attrs=attrs, groups=groups)
    _check_open(cache)
    return cache


def _check_open(cache: Cache) -> None:
    """The cheap checks every open does (verify does the rest): each group's attributes against the root
    and the layout, every array present with its shape, and the file of every zarr shard that holds
    committed rows, since a missing shard file reads back as zeros, not as an error."""
    a = cache.attrs
    n = a.counts["sequences"]
    for i, g in enumerate(cache.groups):
        where = f"{cache.path}: {g.path}"
        meta = cache.group_attrs(i)
        want = Y.group_size(n, meta.rank, a.world_size)
        if meta.cache_key != a.cache_key or meta.world_size != a.world_size or meta.n_sequences != want or (
                a.complete and meta.rank != i):
            raise PikvError(f"{where}: its attributes (rank {meta.rank} of {meta.world_size}, {meta.n_sequences} "
                            f"sequences, key {meta.cache_key}) do not match the root's ({a.world_size} ranks, "
                            f"{want} sequences for this rank, key {a.cache_key}); the cache is damaged, re-dump it")
        if a.complete and meta.committed != want:
            raise PikvError(f"{where}: {meta.committed} of its {want} sequences are committed, yet the cache is "
                            "marked complete; it is damaged (or was copied while a dump ran): re-run the dump")
        for name in cache.names:
            try:
                arr = g[name]
            except Exception as e:
                raise PikvError(f"{where}/{name}: the array cannot be opened ({brief(e)}); the cache is damaged, "
                                "re-dump it")
            if arr.shape[0] != meta.n_sequences:
                raise PikvError(f"{where}/{name} holds {arr.shape[0]} sequences, the group {meta.n_sequences}; "
                                "the cache is damaged, re-dump it")
            rows = (arr.shards or arr.chunks)[0]
            for j in range(-(-meta.committed // rows)):
                key = arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1))
                if not os.path.isfile(os.path.join(cache.path, g.path, name, key)):
                    raise PikvError(f"{where}/{name}: the data of sequences [{j * rows}, "
                                    f"{min((j + 1) * rows, meta.committed)}) is missing (no file {key}); the cache "
                                    "is damaged, re-dump it")


def describe(path: str) -> dict:
    """What `pikv inspect` prints: the root attributes plus live counts and stored bytes per token."""
    cache = open_cache(path, allow_incomplete=True)
    a = cache.attrs
    committed = sum(cache.group_len(i) for i in range(len(cache.groups)))
    positions = committed * cache.seq_len
    stored = cache.bytes_per_array()
    bpt = {k: round(v / max(positions, 1), 2) for k, v in stored.items()}
    counts = dict(a.counts)
    counts.update({"committed": committed, "positions": counts.get("positions", positions)})
    by_target = {"inputs": sum(bpt[n] for n in (F.INPUT_IDS, F.LOSS_MASK, F.SAMPLE_ID))}
    by_target["logits"] = sum(v for k, v in bpt.items() if k.startswith("logits/"))
    for r in cache.rich:
        label = f"{r.kind}:{r.layer}"
        by_target[label] = by_target.get(label, 0.0) + sum(bpt[n] for n in r.stored)
    return {"path": path, "format_version": a.format_version, "complete": a.complete,
            "cache_key": a.cache_key, "teacher": a.teacher, "data": a.data, "seq_len": a.seq_len,
            "targets": a.targets, "world_size": a.world_size, "shard_seqs": a.shard_seqs,
            "counts": counts, "bytes_stored": stored, "bytes_per_token": bpt,
            "bytes_per_token_total": round(sum(bpt.values()), 2),
            "bytes_per_token_by_target": {k: round(v, 2) for k, v in by_target.items()},
            "encoding_errors": encoding_errors(cache), "package_version": a.package_version}


def encoding_errors(cache: Cache) -> dict:
    """Measured error of each rich target's encoding over every committed block (format.error_summary)."""
    merged: dict = {}
    for i in range(len(cache.groups)):
        for target, e in cache.group_attrs(i).encoding_errors.items():
            merged[target] = F.merge_errors(merged.get(target), e)
    return {k: F.error_summary(v) for k, v in sorted(merged.items())}
