"""`pikv verify`'s integrity check: prove a cache is whole.

    pikv verify CACHE            (fidelity against the live teacher: tools/fidelity.py, --recompute N)

Every chunk of every array is read (each carries a crc32c, so a flipped byte fails), every unit is
committed by its marker for this cache, its input ids hash to the marker's hash and all of them to
the root's content hash, the counts agree, each row holds its sample id, the stored values are well
formed (ids in the vocabulary, head ids distinct, tail draws outside the head and summing to the
draw count, log-probs <= 0, normalizers >= 0). The first problem stops the check with an error
naming the unit and its sequences; `pikv dump-teacher ... --repair` uses the same per-unit check
(unit_problem) to find the units to recompute.
"""

from __future__ import annotations

import numpy as np

from .. import storage
from ..data import fingerprint
from ..errors import PikvError, brief
from . import format as F
from . import layout as Y
from .reader import Cache, decode, open_cache


REMEDY = ("re-run the `pikv dump-teacher` command that wrote it with --repair (it recomputes only the damaged "
          "units), or re-dump it")


def check_integrity(path: str, trust_remote_code: bool = False) -> dict:
    cache = open_cache(path)  # refuses a non-cache, an unknown version, an incomplete cache, missing files
    cache.check_tokenizer(trust_remote_code)
    attrs = cache.attrs
    loss_tokens, hashes = 0, []
    files = cache.shard_files()  # on an object store one listing per array, not a look per unit and array
    for u in range(attrs.n_units):
        marker, problem = unit_problem(cache, u, files=files)
        if problem:
            start, stop = Y.unit_range(u, attrs.n_sequences, attrs.unit_seqs)
            raise PikvError(f"{path}: unit {u} (sequences [{start}, {stop})) {problem}; {REMEDY}")
        loss_tokens += marker.loss_tokens
        hashes.append(marker.sha256)
    if Y.content_sha256(hashes) != attrs.content_sha256:
        raise PikvError(f"{path}: the stored input ids do not match the cache's content hash; {REMEDY}")
    if loss_tokens != attrs.counts.get("loss_tokens"):
        raise PikvError(f"{path}: {loss_tokens} loss tokens stored, the root attributes say "
                        f"{attrs.counts.get('loss_tokens')}; {REMEDY}")
    return {"path": path, "ok": True, "format_version": attrs.format_version, "cache_key": attrs.cache_key,
            "units": attrs.n_units, "sequences": attrs.n_sequences, "positions": attrs.n_sequences * cache.seq_len,
            "loss_tokens": loss_tokens, "arrays": list(cache.names)}


def unit_problem(cache: Cache, u: int, inputs: tuple[np.ndarray, np.ndarray] | None = None,
                 files: dict | None = None) -> tuple[Y.UnitMarker | None, str | None]:
    """(its marker, what is wrong with unit ``u`` or None): the marker commits it for this cache, every
    array's shard file is there, every chunk reads (crc32c), the values are well formed, and the arrays
    and input ids hash to the marker's. With ``inputs`` (the prepared rows of its sample ids, as a
    repair has them) the stored input ids must also be those rows. ``files``: Cache.shard_files, taken once."""
    a = cache.attrs
    start, stop = Y.unit_range(u, a.n_sequences, a.unit_seqs)
    try:
        marker = Y.read_marker(cache.path, u)
    except PikvError:  # a torn or edited marker is damage of this unit
        return None, f"has a damaged marker ({Y.marker_name(u)} is not a valid marker)"
    if marker is None or not marker.holds(u, a.n_sequences, a.unit_seqs, a.cache_key):
        return marker, ("is not committed (no marker)" if marker is None else
                        "is not committed for this cache (its marker is of another cache, unit or range)")
    missing = cache.missing_shard(u, files)
    if missing:
        return marker, f"has no data in {missing[0]} (no file {missing[1]})"
    try:
        raw = {name: cache.arrays[name][start:stop] for name in cache.names}
    except Exception as e:
        storage.raise_remote(e, cache.path)  # a store that is down is not damage
        return marker, f"has an unreadable chunk in {cache.first_unreadable(np.arange(start, stop))} ({brief(e)})"
    sample_ids = Y.unit_sample_ids(u, a.n_sequences, a.unit_seqs, Y.order_seed(a.data["fingerprint"]))
    problem = _check_values(raw, decode(raw, cache.encoding, rich=tuple(cache.rich)), sample_ids,
                            a.teacher["vocab_size"], cache.draws, cache.rich)
    if problem:
        return marker, f"holds bad values: {problem}"
    if Y.arrays_sha256(raw, cache.names) != marker.arrays_sha256:
        return marker, "has stored arrays that do not hash to its marker's (another unit's data, or edited)"
    if fingerprint(raw[F.INPUT_IDS], raw[F.LOSS_MASK]) != marker.sha256 \
            or int(raw[F.LOSS_MASK][:, 1:].sum()) != marker.loss_tokens:
        return marker, "has input ids that do not match its marker's hash and token count"
    if inputs is not None and not (np.array_equal(raw[F.INPUT_IDS], inputs[0])
                                   and np.array_equal(raw[F.LOSS_MASK], inputs[1])):
        return marker, "has input ids that are not the data's rows of its sample ids"
    return marker, None


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
