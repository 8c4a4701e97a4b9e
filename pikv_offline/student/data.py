"""Micro-batches of cached teacher targets for one rank, in a deterministic global order.

Order of an epoch: the cache's zarr blocks (``shard_seqs`` sequences of one writer group, one zarr shard file) are
permuted with the seed and the epoch, their sequences concatenated, and the result shuffled
inside windows of ``window_blocks`` blocks. Global micro-step m takes the positions
[m*B*W, (m+1)*B*W) of that order (B = batch size, W = world size) and rank r the B positions at
offset r*B. So the sequences of an optimizer step do not depend on how they are split over ranks
or micro-batches, and resuming is skipping m micro-steps.

Reads: a rank fetches all of its sequences of one window with one orthogonal-selection call per
array and writer group (zarr decodes the needed inner chunks of a few shard files in that one call),
never one sequence per call. Zarr handles are opened lazily inside the iterating process, so a
DataLoader worker never inherits one across fork.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import format as F
from ..cache.reader import Cache, decode, open_cache
from ..errors import PikvError


@dataclass(frozen=True)
class TargetPlan:
    """What a run reads from the cache and how it compares with the student, fixed once at start-up:
    the data stream reads ``top_k`` head ids, the normalizer column ``grid_index`` (that of
    ``temperature``) and the ``rich`` arrays; the Distiller compares at ``temperature`` with the
    ``tail`` mode. One object, so the two can never disagree."""
    top_k: int
    temperature: float
    grid_index: int  # column of the stored tnorm grid at ``temperature`` (renorm off the grid: 0, unused)
    tail: str  # the loss mode for the mass outside the head: bucket | renorm | sampled
    draws: int  # sampled tail draws per position in the cache (0: none)
    rel_error: float  # the stored log-probs' relative rounding error
    rich: tuple = ()  # format.RichArray of each rich target array a loss uses


def plan_targets(cache: Cache, top_k: int | None, temperature: float, tail: str,
                 divergence: str = "forward_kl", rich: tuple = ()) -> TargetPlan:
    """The TargetPlan of a run; refuses what the cache cannot serve."""
    if tail == "auto":
        tail = "sampled" if cache.draws else "bucket"
    k = top_k or cache.top_k
    if k > cache.top_k:
        raise PikvError(f"--top-k {k} is above the cached k of {cache.top_k}; use --top-k {cache.top_k} or less")
    if tail == "sampled":
        if not cache.draws:
            raise PikvError("--tail sampled: the cache holds no sampled tail; re-dump with --sampled-tail N "
                            "or use --tail bucket")
        if divergence != "forward_kl":
            raise PikvError(f"--tail sampled estimates forward KL only; use --divergence forward_kl "
                            f"(got {divergence}) or --tail bucket")
        if k != cache.top_k:
            # The draws come from outside the stored head; a shorter head would leave ids in neither.
            raise PikvError(f"--tail sampled uses the whole cached head; drop --top-k {k} (cached k {cache.top_k})")
    elif cache.top_k == 0:
        raise PikvError(f"--tail {tail}: the cache has no top-k head (dumped with --top-k 0); use --tail sampled")
    grid = cache.temperatures
    if temperature in grid:
        index = grid.index(temperature)
    elif tail == "renorm":
        index = 0  # renorm needs no normalizer at T
    else:
        raise PikvError(f"--temperature {temperature} is not in the cache's grid {grid}: the teacher at T is exact "
                        "only there; pick one of those, re-dump with it, or use --tail renorm")
    return TargetPlan(top_k=k, temperature=temperature, grid_index=index, tail=tail, draws=cache.draws,
                      rel_error=cache.relative_error, rich=tuple(rich))


@dataclass
class Batch:
    """One micro-batch of teacher targets, as the Distiller takes it. B sequences of L tokens; the
    head is the teacher's top-k (most probable first), the tail its sampled draws (count 0 = empty)."""
    input_ids: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L] bool, aligned with the tokens (format semantics)
    sample_id: torch.Tensor  # [B] int64
    head_ids: torch.Tensor  # [B, L, k] int64
    head_logprobs: torch.Tensor  # [B, L, k] float32, T=1
    tnorm: torch.Tensor  # [B, L] float32, tnorm at the plan's temperature
    tail_ids: torch.Tensor  # [B, L, n] int64
    tail_logprobs: torch.Tensor  # [B, L, n] float32, T=1
    tail_counts: torch.Tensor  # [B, L, n] float32
    rich: dict = dataclasses.field(default_factory=dict)  # array name -> [B, L, ...] float32

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "rich"},
                     rich={k: fn(v) for k, v in self.rich.items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())  # the prediction at t is for token t+1


def is_eval(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Held-out sequences, chosen by a hash of the sample id (stable across dumps of the same data)."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    if fraction >= 1:
        return np.ones(len(sample_ids), dtype=bool)
    h = np.array([int(hashlib.sha256(str(int(s)).encode()).hexdigest()[:8], 16) for s in sample_ids])
    return h / 0xFFFFFFFF < fraction


class CacheIndex:
    """Which rows exist: (writer group, row) of every committed sequence, split into train and eval."""

    def __init__(self, cache: Cache, eval_fraction: float):
        self.shard_seqs = int(cache.attrs.shard_seqs)
        rows, held = [], []
        for i in range(len(cache.groups)):
            n = cache.group_len(i)
            sid = cache.groups[i][F.SAMPLE_ID][:n]
            ev = is_eval(sid, eval_fraction)
            rows.append(np.stack([np.full(n, i), np.arange(n)], 1))
            held.append(ev)
        rows = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)
        held = np.concatenate(held) if held else np.zeros(0, bool)
        self.train = rows[~held]
        self.eval = rows[held]

    def epoch_order(self, seed: int, epoch: int, window_blocks: int = 4) -> np.ndarray:
        """[N, 2] (group, row) of every training sequence in this epoch's order."""
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
    """Stored arrays (``names``, default: the logit targets) of the given (group, row) pairs, in that order;
    one call per array and writer group. A run reads only the rich targets its losses use."""
    names = cache.logit_names if names is None else names
    out: dict[str, list] = {}
    parts, where = [], []
    for group in np.unique(rows[:, 0]):
        sel = np.nonzero(rows[:, 0] == group)[0]
        uniq, inv = np.unique(rows[sel, 1], return_inverse=True)
        g = cache.groups[int(group)]
        parts.append({name: g[name].oindex[uniq][inv] for name in names})
        where.append(sel)
    where = np.concatenate(where)
    back = np.empty_like(where)
    back[where] = np.arange(len(where))
    for k in parts[0]:
        out[k] = np.concatenate([p[k] for p in parts])[back]
    return out


def to_batch(raw: dict[str, np.ndarray], encoding: str, plan: TargetPlan) -> Batch:
    """Stored arrays of some rows -> the Batch the plan asks for."""
    a = decode(raw, encoding, plan.top_k, rich=plan.rich)
    t = torch.from_numpy
    return Batch(input_ids=t(a[F.INPUT_IDS].astype(np.int64)), loss_mask=t(a[F.LOSS_MASK]),
                 sample_id=t(a[F.SAMPLE_ID]), head_ids=t(a[F.HEAD_IDS]), head_logprobs=t(a[F.HEAD_LOGPROBS]),
                 tnorm=t(np.ascontiguousarray(a[F.TNORM][..., plan.grid_index])), tail_ids=t(a[F.TAIL_IDS]),
                 tail_logprobs=t(a[F.TAIL_LOGPROBS]), tail_counts=t(a[F.TAIL_COUNTS].astype(np.float32)),
                 rich={r.name: t(a[r.name]) for r in plan.rich})


class TrainStream(torch.utils.data.IterableDataset):
    """Rank ``rank``'s micro-batches of one epoch, starting at global micro-step ``start``.

    ``index`` is the trainer's CacheIndex (plain arrays, safe to hand to a forked worker), so the
    sample ids are read and hashed once per run, not once per epoch.
    """

    def __init__(self, path: str, index: CacheIndex, plan: TargetPlan, *, seed: int, epoch: int, start: int,
                 batch_size: int, rank: int, world_size: int, window_blocks: int = 4):
        self.path, self.index, self.plan, self.seed, self.epoch, self.start = path, index, plan, seed, epoch, start
        self.batch_size, self.rank, self.world, self.window_blocks = batch_size, rank, world_size, window_blocks

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
                data = read_rows(cache, order[mine], cache.logit_names + rich_names(self.plan.rich))
                loaded_window = w1
            sel = np.searchsorted(mine, positions)  # mine is sorted and holds every position of the batch
            yield to_batch({k: v[sel] for k, v in data.items()}, cache.encoding, self.plan)


def train_batches(path: str, index: CacheIndex, plan: TargetPlan, *, seed: int, batch_size: int, rank: int,
                  world_size: int, num_workers: int, pin_memory: bool):
    """The default data source of train(): ``source(epoch, start)`` -> this rank's Batches of that epoch from
    global micro-step ``start``, read by ``num_workers`` (0 or 1) background DataLoader workers."""
    def source(epoch: int, start: int):
        stream = TrainStream(path, index, plan, seed=seed, epoch=epoch, start=start, batch_size=batch_size,
                             rank=rank, world_size=world_size)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                pin_memory=pin_memory, prefetch_factor=4 if num_workers else None))
    return source


def eval_batches(cache: Cache, index: CacheIndex, plan: TargetPlan, *, rank: int, world_size: int, batch_size: int):
    """This rank's share of the held-out sequences (rows rank::world), in micro-batches."""
    rows = index.eval[rank::world_size]
    for s in range(0, len(rows), batch_size):
        yield to_batch(read_rows(cache, rows[s:s + batch_size], cache.logit_names + rich_names(plan.rich)),
                       cache.encoding, plan)
