"""Open a teacher cache and read its shards; refuses an incomplete or unknown-version cache unless told."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import PikvError
from . import format as F


def read_root_attrs(path: str) -> dict | None:
    """The cache's root attributes, or None when ``path`` holds no pikv cache."""
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        return None
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:
        return None
    attrs = group.attrs.get(F.ROOT_ATTR)
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
    attrs: dict
    shards: list  # zarr groups, one per writer rank, in rank order

    @property
    def logits(self) -> dict:
        return self.attrs["targets"]["logits"]

    @property
    def top_k(self) -> int:
        return int(self.logits["top_k"])

    @property
    def tail(self) -> int:
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
        return int(self.attrs["seq_len"])

    @property
    def names(self) -> tuple[str, ...]:
        return F.present_arrays(self.attrs["targets"])

    @property
    def logit_names(self) -> tuple[str, ...]:
        return F.logit_arrays(self.top_k, len(self.temperatures), self.tail)

    @property
    def rich(self) -> list:
        """Every stored rich target array (format.RichArray)."""
        return F.rich_arrays(self.attrs["targets"])

    @property
    def relative_error(self) -> float:
        """The stored log-probs' relative rounding error (their encoding's)."""
        return F.ENCODINGS[self.encoding].relative_error

    def shard_len(self, i: int) -> int:
        return int(self.shards[i].attrs[F.SHARD_ATTR]["committed"])

    def read(self, i: int, start: int, stop: int, top_k: int | None = None) -> dict[str, np.ndarray]:
        """Sequences [start, stop) of shard ``i``, decoded, the head most probable first.

        ``top_k`` truncates at read time (the stored head is exact, so its best k' are too), so one
        cache serves a sweep over k.
        """
        g = self.shards[i]
        return decode({name: g[name][start:stop] for name in self.names}, self.encoding, top_k, by_prob=True,
                      rich=tuple(self.rich))

    def read_all(self, top_k: int | None = None, first: int | None = None) -> dict[str, np.ndarray]:
        """Every committed sequence of every shard (or the ``first`` sample ids), ordered by sample id
        (for tests, verify and small caches). Rank r of W holds sample ids r, r+W, ..."""
        world = len(self.shards)
        parts = [self.read(i, 0, self.shard_len(i) if first is None else len(range(i, first, world)), top_k)
                 for i in range(world)]
        parts = [p for p in parts if len(p[F.SAMPLE_ID])]
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.argsort(out[F.SAMPLE_ID], kind="stable")
        return {name: a[order] for name, a in out.items()}

    def bytes_per_array(self) -> dict[str, int]:
        """Stored (compressed) bytes of each array summed over shards."""
        return {name: sum(int(g[name].nbytes_stored()) for g in self.shards) for name in self.names}


def open_cache(path: str, allow_incomplete: bool = False) -> Cache:
    attrs = read_root_attrs(path)
    if attrs is None:
        raise PikvError(f"{path} is not a pikv teacher cache (no zarr.json with '{F.ROOT_ATTR}' attributes); "
                        "create one with `pikv dump-teacher`")
    version = attrs.get("format_version")
    if version != F.FORMAT_VERSION:
        raise PikvError(f"{path} has cache format version {version}, this pikv reads version "
                        f"{F.FORMAT_VERSION}; re-dump it or use a matching pikv release")
    if not attrs.get("complete") and not allow_incomplete:
        raise PikvError(f"{path} is an incomplete cache (the dump did not finish); re-run the same "
                        "`pikv dump-teacher` command to resume it")
    root = zarr.open_group(path, mode="r")
    shards = []
    for r in range(int(attrs["world_size"])):
        g = root.get(F.shard_name(r))
        if g is None:
            if allow_incomplete:
                continue
            raise PikvError(f"{path}: shard {F.shard_name(r)} is missing; the cache is damaged, re-dump it")
        shards.append(g)
    return Cache(path=path, attrs=attrs, shards=shards)


def describe(path: str) -> dict:
    """What `pikv inspect` prints: the root attributes plus live counts and stored bytes per token."""
    cache = open_cache(path, allow_incomplete=True)
    a = cache.attrs
    committed = sum(cache.shard_len(i) for i in range(len(cache.shards)))
    positions = committed * cache.seq_len
    stored = cache.bytes_per_array()
    bpt = {k: round(v / max(positions, 1), 2) for k, v in stored.items()}
    counts = dict(a.get("counts", {}))
    counts.update({"committed": committed, "positions": counts.get("positions", positions)})
    by_target = {"inputs": sum(bpt[n] for n in (F.INPUT_IDS, F.LOSS_MASK, F.SAMPLE_ID))}
    by_target["logits"] = sum(v for k, v in bpt.items() if k.startswith("logits/"))
    for r in cache.rich:
        label = f"{r.kind}:{r.layer}"
        by_target[label] = by_target.get(label, 0.0) + sum(bpt[n] for n in r.stored)
    return {"path": path, "format_version": a["format_version"], "complete": bool(a.get("complete")),
            "cache_key": a["cache_key"], "teacher": a["teacher"], "data": a["data"], "seq_len": a["seq_len"],
            "targets": a["targets"], "world_size": a["world_size"], "shard_seqs": a["shard_seqs"],
            "counts": counts, "bytes_stored": stored, "bytes_per_token": bpt,
            "bytes_per_token_total": round(sum(bpt.values()), 2),
            "bytes_per_token_by_target": {k: round(v, 2) for k, v in by_target.items()},
            "encoding_errors": encoding_errors(cache), "package_version": a.get("package_version")}


def encoding_errors(cache: Cache) -> dict:
    """Measured error of each rich target's encoding over every committed block (format.error_summary)."""
    merged: dict = {}
    for g in cache.shards:
        for target, e in g.attrs[F.SHARD_ATTR].get("encoding_errors", {}).items():
            merged[target] = F.merge_errors(merged.get(target), e)
    return {k: F.error_summary(v) for k, v in sorted(merged.items())}
