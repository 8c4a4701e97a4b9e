"""Micro-batches of cached teacher targets for one rank, in a deterministic global order.

Order of an epoch: the cache's zarr blocks (``shard_seqs`` sequences of one writer shard) are
permuted with the seed and the epoch, their sequences concatenated, and the result shuffled
inside windows of ``window_blocks`` blocks. Global micro-step m takes the positions
[m*B*W, (m+1)*B*W) of that order (B = batch size, W = world size) and rank r the B positions at
offset r*B. So the sequences of an optimizer step do not depend on how they are split over ranks
or micro-batches, and resuming is skipping m micro-steps.

Reads: a rank fetches all of its sequences of one window with one orthogonal-selection call per
array and shard (zarr decodes the needed inner chunks of a few shard files in that one call),
never one sequence per call. Zarr handles are opened lazily inside the iterating process, so a
DataLoader worker never inherits one across fork.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..cache import format as F
from ..cache.reader import Cache, decode, open_cache


def is_eval(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Held-out sequences, chosen by a hash of the sample id (stable across dumps of the same data)."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    if fraction >= 1:
        return np.ones(len(sample_ids), dtype=bool)
    h = np.array([int(hashlib.sha256(str(int(s)).encode()).hexdigest()[:8], 16) for s in sample_ids])
    return h / 0xFFFFFFFF < fraction


class CacheIndex:
    """Which rows exist: (shard, row) of every committed sequence, split into train and eval."""

    def __init__(self, cache: Cache, eval_fraction: float):
        self.shard_seqs = int(cache.attrs["shard_seqs"])
        rows, held = [], []
        for i in range(len(cache.shards)):
            n = cache.shard_len(i)
            sid = cache.shards[i][F.SAMPLE_ID][:n]
            ev = is_eval(sid, eval_fraction)
            rows.append(np.stack([np.full(n, i), np.arange(n)], 1))
            held.append(ev)
        rows = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)
        held = np.concatenate(held) if held else np.zeros(0, bool)
        self.train = rows[~held]
        self.eval = rows[held]

    def epoch_order(self, seed: int, epoch: int, window_blocks: int = 4) -> np.ndarray:
        """[N, 2] (shard, row) of every training sequence in this epoch's order."""
        rows = self.train
        block = rows[:, 0] * (1 << 32) + rows[:, 1] // self.shard_seqs
        ublocks, inverse = np.unique(block, return_inverse=True)
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(len(ublocks))
        rank_of_block = np.empty_like(perm)
        rank_of_block[perm] = np.arange(len(perm))
        order = rows[np.lexsort((rows[:, 1], rank_of_block[inverse]))]
        window = window_blocks * self.shard_seqs
        for s in range(0, len(order), window):
            order[s:s + window] = order[s:s + window][rng.permutation(min(window, len(order) - s))]
        return order


def micro_steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    return n_train // (batch_size * world_size)


def rich_names(rich) -> tuple[str, ...]:
    return tuple(n for a in rich for n in a.stored)


def read_rows(cache: Cache, rows: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Stored arrays (``names``, default: the logit targets) of the given (shard, row) pairs, in that order;
    one call per array and shard. A run reads only the rich targets its losses use."""
    names = cache.logit_names if names is None else names
    out: dict[str, list] = {}
    parts, where = [], []
    for shard in np.unique(rows[:, 0]):
        sel = np.nonzero(rows[:, 0] == shard)[0]
        uniq, inv = np.unique(rows[sel, 1], return_inverse=True)
        g = cache.shards[int(shard)]
        parts.append({name: g[name].oindex[uniq][inv] for name in names})
        where.append(sel)
    where = np.concatenate(where)
    back = np.empty_like(where)
    back[where] = np.arange(len(where))
    for k in parts[0]:
        out[k] = np.concatenate([p[k] for p in parts])[back]
    return out


def to_tensors(raw: dict[str, np.ndarray], encoding: str, top_k: int, t_index: int,
               rich: tuple = ()) -> dict[str, torch.Tensor]:
    """A micro-batch for the trainer: teacher head (t_*), the normalizer at the run's T, sampled tail (tail_*),
    and the rich targets in ``rich`` under their array names."""
    a = decode(raw, encoding, top_k, rich=rich)
    return {**{r.name: torch.from_numpy(a[r.name]) for r in rich},
        "input_ids": torch.from_numpy(a[F.INPUT_IDS].astype(np.int64)),
        "loss_mask": torch.from_numpy(a[F.LOSS_MASK]),
        "sample_id": torch.from_numpy(a[F.SAMPLE_ID]),
        "t_ids": torch.from_numpy(a[F.HEAD_IDS]),
        "t_logprobs": torch.from_numpy(a[F.HEAD_LOGPROBS]),
        "t_tnorm": torch.from_numpy(np.ascontiguousarray(a[F.TNORM][..., t_index])),
        "tail_ids": torch.from_numpy(a[F.TAIL_IDS]),
        "tail_logprobs": torch.from_numpy(a[F.TAIL_LOGPROBS]),
        "tail_counts": torch.from_numpy(a[F.TAIL_COUNTS].astype(np.float32)),
    }


class TrainStream(torch.utils.data.IterableDataset):
    """Rank ``rank``'s micro-batches of one epoch, starting at global micro-step ``start``.

    ``index`` is the trainer's CacheIndex (plain arrays, safe to hand to a forked worker), so the
    sample ids are read and hashed once per run, not once per epoch.
    """

    def __init__(self, path: str, index: CacheIndex, *, seed: int, epoch: int, start: int, batch_size: int,
                 rank: int, world_size: int, top_k: int, t_index: int, window_blocks: int = 4, rich: tuple = ()):
        self.path, self.index, self.seed, self.epoch, self.start = path, index, seed, epoch, start
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.top_k, self.t_index, self.window_blocks, self.rich = top_k, t_index, window_blocks, rich

    def __iter__(self):
        cache = open_cache(self.path)  # opened here, in the iterating process
        order = self.index.epoch_order(self.seed, self.epoch, self.window_blocks)
        b, w = self.batch_size, self.world
        n_micro = micro_steps_per_epoch(len(order), b, w)
        window = self.window_blocks * self.index.shard_seqs
        loaded_window, data, mine = -1, None, None
        for m in range(self.start, n_micro):
            lo = m * b * w + self.rank * b
            positions = np.arange(lo, lo + b)
            if positions[-1] // window != loaded_window or positions[0] // window != loaded_window:
                # Load this rank's positions of the window(s) the micro-batch touches, in one read.
                w0, w1 = positions[0] // window, positions[-1] // window
                span = np.arange(w0 * window, min((w1 + 1) * window, n_micro * b * w))
                mine = span[(span // b) % w == self.rank]
                data = read_rows(cache, order[mine], cache.logit_names + rich_names(self.rich))
                loaded_window = w1
            sel = np.searchsorted(mine, positions)  # mine is sorted and holds every position of the batch
            yield to_tensors({k: v[sel] for k, v in data.items()}, cache.encoding, self.top_k, self.t_index, self.rich)


def eval_batches(cache: Cache, index: CacheIndex, *, rank: int, world_size: int, batch_size: int, top_k: int,
                 t_index: int, rich: tuple = ()):
    """This rank's share of the held-out sequences (rows rank::world), in micro-batches."""
    rows = index.eval[rank::world_size]
    for s in range(0, len(rows), batch_size):
        yield to_tensors(read_rows(cache, rows[s:s + batch_size], cache.logit_names + rich_names(rich)), cache.encoding,
                         top_k, t_index, rich)
