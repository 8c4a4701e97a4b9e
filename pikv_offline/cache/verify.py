"""`pikv verify`'s integrity check: prove a cache is whole.

    pikv verify CACHE            (fidelity against the live teacher: tools/fidelity.py, --recompute N)

Every chunk of every array is read (each carries a crc32c, so a flipped byte fails), every unit is
committed by its marker for this cache, its input ids hash to the marker's hash and all of them to
the root's content hash, the counts agree, each row holds its sample id, the stored values are well
formed (ids in the vocabulary, head ids distinct, tail draws outside the head and summing to the
draw count, log-probs <= 0, normalizers >= 0). The first problem stops the check with an error
naming the unit and its sequences.
"""

from __future__ import annotations

import numpy as np

from ..data import fingerprint
from ..errors import PikvError, brief
from . import format as F
from . import layout as Y
from .reader import decode, open_cache


def check_integrity(path: str) -> dict:
    cache = open_cache(path)  # refuses a non-cache, an unknown version, an incomplete cache, missing files
    cache.check_tokenizer()
    attrs = cache.attrs
    key, n, unit_seqs, vocab = attrs.cache_key, attrs.n_sequences, attrs.unit_seqs, attrs.teacher["vocab_size"]
    loss_tokens, hashes = 0, []
    for u in range(attrs.n_units):
        start, stop = Y.unit_range(u, n, unit_seqs)
        where = f"{path}: unit {u} (sequences [{start}, {stop}))"
        marker = Y.read_marker(path, u)
        if marker is None or not marker.holds(u, n, unit_seqs, key):
            raise PikvError(f"{where} is not committed for this cache (marker {marker}); re-run the dump to "
                            "complete it")
        try:
            raw = {a: cache.arrays[a][start:stop] for a in cache.names}
        except Exception as e:
            bad = cache.first_unreadable(np.arange(start, stop))
            raise PikvError(f"{where}: {bad} has an unreadable chunk ({brief(e)}); the cache is corrupt, "
                            "re-dump it")
        problem = _check_values(raw, decode(raw, cache.encoding, rich=tuple(cache.rich)),
                                Y.unit_sample_ids(u, n, unit_seqs, Y.order_seed(attrs.data["fingerprint"])), vocab,
                                cache.draws, cache.rich)
        if problem:
            raise PikvError(f"{where}: {problem}; the cache is damaged, re-dump it")
        got = fingerprint(raw[F.INPUT_IDS], raw[F.LOSS_MASK])
        tokens = int(raw[F.LOSS_MASK][:, 1:].sum())
        if Y.arrays_sha256(raw, cache.names) != marker.arrays_sha256:
            raise PikvError(f"{where}: its stored arrays do not hash to its marker's (another unit's data, or "
                            "edited); the cache is damaged, re-dump it")
        if got != marker.sha256 or tokens != marker.loss_tokens:
            raise PikvError(f"{where}: the stored input ids do not match its marker's hash and token count; the "
                            "cache is damaged, re-dump it")
        loss_tokens += tokens
        hashes.append(got)
    if Y.content_sha256(hashes) != attrs.content_sha256:
        raise PikvError(f"{path}: the stored input ids do not match the cache's content hash; the cache is "
                        "damaged, re-dump it")
    if loss_tokens != attrs.counts.get("loss_tokens"):
        raise PikvError(f"{path}: {loss_tokens} loss tokens stored, the root attributes say "
                        f"{attrs.counts.get('loss_tokens')}; the cache is damaged, re-dump it")
    return {"path": path, "ok": True, "format_version": attrs.format_version, "cache_key": key,
            "units": attrs.n_units, "sequences": n, "positions": n * cache.seq_len, "loss_tokens": loss_tokens,
            "arrays": list(cache.names)}


def _check_values(raw: dict, a: dict, sample_ids: np.ndarray, vocab: int, draws: int, rich: list = ()) -> str | None:
    if not np.array_equal(raw[F.SAMPLE_ID], sample_ids):
        return "sample ids are not the unit's (its range in the seeded order of layout.unit_sample_ids)"
    if ((raw[F.INPUT_IDS] < 0) | (raw[F.INPUT_IDS] >= vocab)).any():
        return "input ids outside the vocabulary"
    head, lp = a[F.HEAD_IDS] if F.HEAD_IDS in raw else None, a[F.HEAD_LOGPROBS]
    if head is not None:
        if (head >= vocab).any() or (raw[F.HEAD_IDS][..., 1:] == 0).any():
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
