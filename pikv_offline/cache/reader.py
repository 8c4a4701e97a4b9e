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


@dataclass
class Cache:
    path: str
    attrs: dict
    shards: list  # zarr groups, one per writer rank, in rank order

    @property
    def top_k(self) -> int:
        return int(self.attrs["targets"]["logits"]["top_k"])

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.attrs["targets"]["logits"]["temperatures"]]

    @property
    def seq_len(self) -> int:
        return int(self.attrs["seq_len"])

    def shard_len(self, i: int) -> int:
        return int(self.shards[i].attrs[F.SHARD_ATTR]["committed"])

    def read(self, i: int, start: int, stop: int, top_k: int | None = None) -> dict[str, np.ndarray]:
        """Sequences [start, stop) of shard ``i``, decoded: log-probs float32, ids int64.

        ``top_k`` truncates at read time (the stored k is sorted by probability), so one cache
        serves a sweep over k.
        """
        g = self.shards[i]
        k = self.top_k if top_k is None else top_k
        return {
            F.INPUT_IDS: g[F.INPUT_IDS][start:stop],
            F.LOSS_MASK: g[F.LOSS_MASK][start:stop],
            F.SAMPLE_ID: g[F.SAMPLE_ID][start:stop],
            F.TOPK_IDS: g[F.TOPK_IDS][start:stop, :, :k].astype(np.int64),
            F.TOPK_LOGPROBS: F.decode_logprobs(g[F.TOPK_LOGPROBS][start:stop, :, :k]),
            F.LSE: g[F.LSE][start:stop],
        }

    def read_all(self, top_k: int | None = None) -> dict[str, np.ndarray]:
        """Every committed sequence of every shard, ordered by sample id (for tests and small caches)."""
        parts = [self.read(i, 0, self.shard_len(i), top_k) for i in range(len(self.shards))]
        parts = [p for p in parts if len(p[F.SAMPLE_ID])]
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.argsort(out[F.SAMPLE_ID], kind="stable")
        return {name: a[order] for name, a in out.items()}

    def bytes_per_array(self) -> dict[str, int]:
        """Stored (compressed) bytes of each array summed over shards."""
        return {name: sum(int(g[name].nbytes_stored()) for g in self.shards) for name in F.ARRAY_NAMES}


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
    return {"path": path, "format_version": a["format_version"], "complete": bool(a.get("complete")),
            "cache_key": a["cache_key"], "teacher": a["teacher"], "data": a["data"], "seq_len": a["seq_len"],
            "targets": a["targets"], "world_size": a["world_size"], "shard_seqs": a["shard_seqs"],
            "counts": counts, "bytes_stored": stored, "bytes_per_token": bpt,
            "bytes_per_token_total": round(sum(bpt.values()), 2), "package_version": a.get("package_version")}
