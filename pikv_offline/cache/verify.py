"""`pikv verify`'s integrity check: prove a cache is whole.

    pikv verify CACHE            (fidelity against the live teacher: tools/fidelity.py, --recompute N)

Every chunk of every array is read (each carries a crc32c, so a flipped byte fails), the root and
shard attributes agree (format version, completeness, cache key, counts), each shard holds exactly
its sample ids, the stored values are well formed (ids in the vocabulary, head ids distinct, tail
draws outside the head and summing to the draw count, log-probs <= 0, normalizers >= 0) and the
input ids hash to the data fingerprint of the cache key. The first problem stops the check with an
error naming the shard.
"""

from __future__ import annotations

import numpy as np

from ..data import fingerprint
from ..errors import PikvError, brief
from . import format as F
from . import layout as Y
from .reader import decode, open_cache


def check_integrity(path: str) -> dict:
    cache = open_cache(path)  # refuses a non-cache, an unknown version, an incomplete cache, missing groups
    attrs = cache.attrs
    world, key, total = attrs.world_size, attrs.cache_key, attrs.counts["sequences"]
    seq_len, vocab, shard_seqs = cache.seq_len, attrs.teacher["vocab_size"], attrs.shard_seqs
    loss_tokens = 0
    ids = np.empty((total, seq_len), np.int32)  # every sequence in global order, for the fingerprint
    mask = np.empty((total, seq_len), bool)
    for r, g in enumerate(cache.groups):
        name = Y.group_name(r)
        meta = cache.group_attrs(r)
        want = Y.group_size(total, r, world)
        if meta.cache_key != key:
            raise PikvError(f"{path}: {name} belongs to another dump (cache key {meta.cache_key}, root {key}); re-dump")
        if meta.committed != want or meta.n_sequences != want:
            raise PikvError(f"{path}: {name} holds {meta.committed} committed of {meta.n_sequences} "
                            f"sequences, the cache needs {want}; re-run the dump to complete it")
        specs = F.array_specs(want, seq_len, attrs.targets, vocab, shard_seqs)
        for array, spec in specs.items():
            if array not in g or g[array].shape != spec.shape:
                got = g[array].shape if array in g else "missing"
                raise PikvError(f"{path}: {name}/{array} is {got}, expected shape {spec.shape}; the cache is damaged")
        sample_ids = Y.group_sample_ids(total, r, world)
        for start in range(0, want, shard_seqs):
            stop = min(start + shard_seqs, want)
            try:
                raw = {a: g[a][start:stop] for a in cache.names}
            except Exception as e:
                raise PikvError(f"{path}: {name} has an unreadable chunk in sequences [{start}, {stop}) "
                                f"({brief(e)}); the cache is corrupt, re-dump it (or that group)")
            problem = _check_values(raw, decode(raw, cache.encoding, rich=tuple(cache.rich)), sample_ids[start:stop],
                                    vocab, cache.draws, cache.rich)
            if problem:
                raise PikvError(f"{path}: {name}, sequences [{start}, {stop}): {problem}; the cache is damaged, re-dump it")
            loss_tokens += int(raw[F.LOSS_MASK][:, 1:].sum())
            rows = Y.global_rows(r, world, start, stop)
            ids[rows], mask[rows] = raw[F.INPUT_IDS], raw[F.LOSS_MASK]
    if fingerprint(ids, mask) != attrs.data["fingerprint"]:
        raise PikvError(f"{path}: the stored input ids do not match the data fingerprint of the cache key; the "
                        "cache is damaged, re-dump it")
    if loss_tokens != attrs.counts.get("loss_tokens"):
        raise PikvError(f"{path}: {loss_tokens} loss tokens stored, the root attributes say "
                        f"{attrs.counts.get('loss_tokens')}; the cache is damaged, re-dump it")
    return {"path": path, "ok": True, "format_version": attrs.format_version, "cache_key": key,
            "shards": world, "sequences": total, "positions": total * seq_len, "loss_tokens": loss_tokens,
            "arrays": list(cache.names)}


def _check_values(raw: dict, a: dict, sample_ids: np.ndarray, vocab: int, draws: int, rich: list = ()) -> str | None:
    if not np.array_equal(raw[F.SAMPLE_ID], sample_ids):
        return "sample ids are not this writer group's (group r of W holds r, r+W, ...)"
    if ((raw[F.INPUT_IDS] < 0) | (raw[F.INPUT_IDS] >= vocab)).any():
        return "input ids outside the vocabulary"
    head, lp = raw.get(F.HEAD_IDS), a[F.HEAD_LOGPROBS]
    if head is not None:
        if (head >= vocab).any() or (np.diff(head.astype(np.int64), axis=-1) <= 0).any():
            return "head ids out of the vocabulary or not distinct and ascending"
    if not np.isfinite(lp).all() or (lp > 0).any():
        return "head log-probs not finite or above 0"
    if not np.isfinite(a[F.TNORM]).all() or (a[F.TNORM] < -1e-3).any():
        return "temperature normalizers not finite or negative"
    if draws:
        counts, ids = a[F.TAIL_COUNTS], a[F.TAIL_IDS]
        sums = counts.sum(-1)
        if not np.isin(sums, (0, draws)).all():
            return f"tail counts do not sum to {draws} draws"
        used = counts > 0
        if (ids >= vocab).any() or (a[F.TAIL_LOGPROBS][used] > 0).any():
            return "tail ids out of the vocabulary or log-probs above 0"
        if head is not None and ((ids[..., :, None] == a[F.HEAD_IDS][..., None, :]) & used[..., None]).any():
            return "a tail draw is one of the head ids"
    for r in rich:
        if not np.isfinite(a[r.name]).all():
            return f"{r.name} holds non-finite values"
    return None
