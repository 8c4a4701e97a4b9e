"""Micro-batches of cached teacher targets for one rank, in a deterministic global order.

Order of an epoch: the cache's units (``unit_seqs`` sequences, one zarr shard file each) are
permuted with the seed and the epoch, and their inner chunks (format.inner_chunk sequences, the
unit of decoding) shuffled inside windows of ``window_blocks`` units; a chunk stays whole, and the
held-out set is made of whole chunks too. Optimizer step s takes the G = B*W*A positions
[s*G, (s+1)*G) of that order (B batch size, W world size, A grad accum) and rank r the contiguous
B*A of them at r*B*A (micro_positions). So the sequences of a step do not depend on how they are
split over ranks or micro-batches, each rank decodes whole chunks (about its share, at any W), and
resuming is skipping micro-steps.

Reads: a rank fetches all of its sequences of one window with one orthogonal-selection call per
array (zarr decodes the needed inner chunks of a few shard files in that one call), never one
sequence per call. Zarr handles are opened lazily inside the iterating process, so a DataLoader
worker never inherits one across fork.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import storage
from ..cache import format as F
from ..cache.reader import Cache, decode, open_cache
from ..errors import PikvError, brief
from .losses import tail_log_proposal
from .xtok import Retokenizer


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
    proposal: tuple = ()  # sampled tail: (grid index, T_c, slots n_c) of each temperature the dump drew at
    grid: tuple = ()  # the cache's temperatures
    schedule: tuple = ()  # --temperature-schedule: (T0, T1, shape, total steps); () = ``temperature`` throughout

    def temperature_at(self, step: int) -> float:
        """The KD temperature of optimizer step ``step``: T0 -> T1 linear or cosine over the run; with an
        exact tail the grid point nearest to that value (between T0 and T1), with renorm the value itself."""
        if not self.schedule:
            return self.temperature
        t0, t1, shape, total = self.schedule
        x = min(max(step / max(total - 1, 1), 0.0), 1.0)
        f = x if shape == "linear" else 0.5 * (1 - math.cos(math.pi * x))
        t = t0 if f <= 0 else t1 if f >= 1 else t0 * (1 - f) + t1 * f  # ends exact, no cancellation
        if self.tail == "renorm":
            return t
        points = [g for g in self.grid if min(t0, t1) <= g <= max(t0, t1)]
        return min(points, key=lambda g: (abs(g - t), g))

    def column(self, temperature: float) -> int:
        """The tnorm grid column of ``temperature`` (renorm off the grid: 0, unused)."""
        return self.grid.index(temperature) if temperature in self.grid else self.grid_index


def plan_targets(cache: Cache, top_k: int | None, temperature: float, tail: str,
                 divergence: str = "forward_kl", rich: tuple = (), schedule: tuple | None = None,
                 total_steps: int = 1, cross: bool = False) -> TargetPlan:
    """The TargetPlan of a run; refuses what the cache cannot serve. ``schedule`` (T0, T1, shape) replaces
    ``temperature`` by T0 -> T1 over ``total_steps``; ``temperature`` becomes T1 (the eval's). ``cross``:
    cross-tokenizer KD, which reads the head and the normalizer alone (a sampled tail's ids are the teacher's)."""
    if tail == "auto" or cross:
        tail = "sampled" if cache.draws and not cross else "bucket"
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
    if schedule:
        off = [t for t in schedule[:2] if t not in grid]
        if off and tail != "renorm":
            raise PikvError(f"--temperature-schedule: {off[0]:g} is not in the cache's grid {grid}; with --tail {tail} "
                            "the schedule steps through grid points, so both ends must be on it (or use --tail renorm "
                            "for any values)")
        temperature = schedule[1]
    if temperature in grid:
        index = grid.index(temperature)
    elif tail == "renorm":
        index = 0  # renorm needs no normalizer at T
    else:
        raise PikvError(f"--temperature {temperature} is not in the cache's grid {grid}: the teacher at T is exact "
                        "only there; pick one of those, re-dump with it, or use --tail renorm")
    proposal = tuple((grid.index(t), t, n_c) for t, n_c in F.tail_strata(cache.tail_temperatures, cache.draws))
    return TargetPlan(top_k=k, temperature=temperature, grid_index=index, tail=tail, draws=cache.draws,
                      rel_error=cache.relative_error, rich=tuple(rich), proposal=proposal if tail == "sampled" else (),
                      grid=tuple(grid), schedule=(*schedule, total_steps) if schedule else ())


def plan_teachers(first: TargetPlan, first_cache: Cache, caches: list, *, top_k: int | None, tail: str,
                  divergence: str, schedule: tuple | None, total_steps: int) -> tuple:
    """The TargetPlan of each further teacher's cache (several --cache); refuses caches of other data or a
    tokenizer or temperatures they cannot serve exactly."""
    if caches and divergence != "forward_kl":
        raise PikvError(f"--divergence {divergence} with several --cache: only forward KL to the teachers' mixture "
                        "splits into a weighted sum over the teachers (the others need the mixture at every id); use "
                        "--divergence forward_kl")
    a0, plans = first_cache.attrs, []
    for cache in caches:
        a = cache.attrs
        for what, mine, theirs in (("data", a0.data["fingerprint"], a.data["fingerprint"]),
                                   ("tokenizer", a0.tokenizer_sha256, a.tokenizer_sha256),
                                   ("seq_len", a0.seq_len, a.seq_len), ("sequence count", first_cache.n, cache.n)):
            if mine != theirs:
                raise PikvError(f"--cache {cache.path}: its {what} differs from --cache {first_cache.path}'s "
                                f"({theirs} vs {mine}); several teachers need caches dumped from the same data with "
                                "the same tokenizer and --seq-len")
        try:
            plan = plan_targets(cache, top_k, first.temperature, tail, divergence, schedule=schedule,
                                total_steps=total_steps)
        except PikvError as e:
            raise PikvError(f"--cache {cache.path}: {e}")
        if plan.tail != "renorm":  # an exact tail reads tnorm at every T the run uses
            used = {first.temperature} | ({g for g in first.grid if min(schedule[:2]) <= g <= max(schedule[:2])}
                                          if schedule else set())
            off = sorted(t for t in used if t not in plan.grid or t not in first.grid)
            if off:
                raise PikvError(f"--cache {cache.path}: its temperature grid {list(plan.grid)} lacks T={off[0]:g}, "
                                f"which this run uses (grid of the first cache: {list(first.grid)}); with several "
                                "teachers every cache needs the run's temperatures, or use --tail renorm")
        plans.append(plan)
    return tuple(plans)


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
    tail_logq: torch.Tensor  # [B, L, n] float32, log of the density each tail id was drawn from (losses.tail_log_proposal)
    rich: dict = dataclasses.field(default_factory=dict)  # array name -> [B, L, ...] float32
    temperature: float | None = None  # the KD temperature of this micro-batch's step (None: the plan's)
    teachers: tuple = ()  # several --cache: the same rows' Batch of each further teacher (their logit targets)
    aligned: torch.Tensor | None = None  # cross-tokenizer: [B, L] bool, the teacher's targets hold at t (xtok.py)

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                        if f.name not in ("rich", "temperature", "teachers", "aligned")},
                     rich={k: fn(v) for k, v in self.rich.items()}, temperature=self.temperature,
                     teachers=tuple(b._map(fn) for b in self.teachers),
                     aligned=None if self.aligned is None else fn(self.aligned))

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())  # the prediction at t is for token t+1


def _unit_float(x: np.ndarray) -> np.ndarray:
    """A fixed hash of non-negative integers to [0, 1) (splitmix64's finalizer), vectorized."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_eval(sample_ids: np.ndarray, fraction: float, chunk: int) -> np.ndarray:
    """Held-out sequences: whole inner chunks of ``chunk`` sequences, chosen by a hash of the chunk index
    (stable across dumps of the same data, and the training order keeps its chunks whole); at least one
    chunk when ``fraction`` is positive and the cache has two."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    if fraction >= 1:
        return np.ones(len(sample_ids), dtype=bool)
    chunks = np.asarray(sample_ids) // chunk
    u = _unit_float(chunks)
    held = u < fraction
    if not held.any() and len(chunks) and chunks.min() != chunks.max():
        held = chunks == chunks[np.argmin(u)]  # a small cache still holds out one chunk
    return held


class CacheIndex:
    """Which sequences exist (sample ids, = rows), split into train and eval by whole inner chunks."""

    def __init__(self, cache: Cache | None, eval_fraction: float, *, n: int | None = None, unit_seqs: int | None = None):
        """From a cache, or (``cache`` None) from its sizes alone: a read plan needs no cache or process group."""
        self.unit_seqs = cache.attrs.unit_seqs if cache is not None else unit_seqs
        self.chunk = F.inner_chunk(self.unit_seqs)
        ids = np.arange(cache.n if cache is not None else n, dtype=np.int64)
        held = is_eval(ids, eval_fraction, self.chunk)
        self.train = ids[~held]
        self.eval = ids[held]

    def epoch_order(self, seed: int, epoch: int, window_blocks: int = 4) -> np.ndarray:
        """[N] sample ids of every training sequence in this epoch's order: the units permuted, then the
        inner chunks shuffled inside windows of ``window_blocks`` units; a chunk's sequences stay together."""
        ids = self.train
        rng = np.random.default_rng([seed, epoch])
        units = ids // self.unit_seqs
        uniq, inverse = np.unique(units, return_inverse=True)
        rank_of_unit = np.empty(len(uniq), np.int64)
        rank_of_unit[rng.permutation(len(uniq))] = np.arange(len(uniq))
        order = ids[np.lexsort((ids, rank_of_unit[inverse]))]
        chunks = order // self.chunk
        starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])  # where each chunk's run begins
        bounds = np.r_[starts, len(order)]
        window = window_blocks * self.unit_seqs
        perm = np.lexsort((rng.random(len(starts)), starts // window))  # chunks shuffled within their window
        lengths = np.diff(bounds)[perm]
        offsets = np.repeat(bounds[:-1][perm] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        return order[np.arange(len(order)) + offsets]


def micro_steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    return n_train // (batch_size * world_size)


def micro_positions(m: int, *, batch_size: int, world_size: int, grad_accum: int, rank: int) -> np.ndarray:
    """Positions in the epoch order of rank ``rank``'s micro-batch ``m`` (counted per rank, grad_accum per step).

    Step s takes the G = B*W*A positions [s*G, (s+1)*G), whatever W and A are (so 2 ranks == 1 rank and
    accum 2 == 1); rank r takes the contiguous B*A of them at r*B*A, so it decodes whole inner chunks,
    about its share, at any world size; micro-batch a of the step takes B of those at a*B.
    """
    b, a = batch_size, grad_accum
    step, micro = divmod(m, a)
    lo = step * b * world_size * a + rank * b * a + micro * b
    return np.arange(lo, lo + b)


def rich_names(rich) -> tuple[str, ...]:
    return tuple(n for a in rich for n in a.stored)


def read_rows(cache: Cache, ids: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Stored arrays (``names``, default: the logit targets) of the given sample ids, in that order; one
    call per array. A run reads only the rich targets its losses use."""
    names = cache.logit_names if names is None else names
    uniq, inv = np.unique(np.asarray(ids, np.int64), return_inverse=True)
    try:
        return {name: cache.take(name, uniq)[inv] for name in names}
    except Exception as e:  # e.g. a checksum mismatch: name the array and the sequences
        storage.raise_remote(e, cache.path)
        bad = cache.first_unreadable(uniq, names)
        raise PikvError(f"{cache.path}/{bad}: the stored data of sequences {int(uniq[0])}..{int(uniq[-1])} does not "
                        f"read ({brief(e)}); the cache is damaged: run `pikv verify {cache.path}` to name the "
                        "unit, and re-dump")



def to_batch(raw: dict[str, np.ndarray], encoding: str, plan: TargetPlan, step: int | None = None,
             temperature: float | None = None) -> Batch:
    """Stored arrays of some rows -> the Batch the plan asks for (at optimizer step ``step``'s temperature;
    None: the plan's own, e.g. for held-out batches; ``temperature``: this one, a further teacher's)."""
    if temperature is None:
        temperature = plan.temperature if step is None else plan.temperature_at(step)
    a = decode(raw, encoding, plan.top_k, rich=plan.rich)
    t = torch.from_numpy
    head_lp, tail_lp = t(a[F.HEAD_LOGPROBS]), t(a[F.TAIL_LOGPROBS])
    logq = torch.zeros_like(tail_lp)
    if plan.proposal and tail_lp.shape[-1]:  # the weights' denominators, from the teacher values alone
        tnorms = t(np.ascontiguousarray(a[F.TNORM][..., [i for i, _, _ in plan.proposal]]))
        logq = tail_log_proposal(head_lp.flatten(0, 1), tail_lp.flatten(0, 1), tnorms.flatten(0, 1),
                                 tuple((temp, n_c) for _, temp, n_c in plan.proposal), plan.draws,
                                 plan.rel_error).reshape(tail_lp.shape)
    return Batch(input_ids=t(a[F.INPUT_IDS].astype(np.int64)), loss_mask=t(a[F.LOSS_MASK]),
                 sample_id=t(a[F.SAMPLE_ID]), head_ids=t(a[F.HEAD_IDS]), head_logprobs=head_lp,
                 tnorm=t(np.ascontiguousarray(a[F.TNORM][..., plan.column(temperature)])), tail_ids=t(a[F.TAIL_IDS]),
                 tail_logprobs=tail_lp, tail_counts=t(a[F.TAIL_COUNTS].astype(np.float32)), tail_logq=logq,
                 rich={r.name: t(a[r.name]) for r in plan.rich}, temperature=temperature)


def with_teachers(batch: Batch, raws: list, extra: tuple, step: int | None = None) -> Batch:
    """``batch`` with the Batch of each further teacher (``extra``: (Cache, TargetPlan) each; ``raws``: the
    same rows read from each) attached; refuses caches whose tokens differ (checked on every batch read)."""
    if not extra:
        return batch
    others = tuple(to_batch(raw, cache.encoding, plan, temperature=batch.temperature)  # the first's T, checked on
                   for raw, (cache, plan) in zip(raws, extra))  # every grid by plan_teachers
    for o, (cache, _) in zip(others, extra):
        if not (torch.equal(o.input_ids, batch.input_ids) and torch.equal(o.loss_mask, batch.loss_mask)):
            raise PikvError(f"{cache.path}: its tokens of sequences {batch.sample_id.tolist()} differ from the first "
                            "--cache's; several teachers need caches dumped from the same data (the cache is damaged "
                            "or of other data: run `pikv verify` on both)")
    return dataclasses.replace(batch, teachers=others)


def cross_batch(batch: Batch, retokenizer) -> Batch:
    """A Batch of the teacher's tokens -> the student's tokens of the same text (xtok.Retokenizer), with the
    teacher's head and normalizer moved to the student positions aligned with a teacher position; the head's
    ids become the student ids of the same bytes (-1 where the student has none: xtok.vocab_map)."""
    rows = [retokenizer(batch.input_ids[i].numpy(), batch.loss_mask[i].numpy()) for i in range(len(batch.input_ids))]
    ids, mask, pos = (torch.from_numpy(np.stack(x)) for x in zip(*rows))
    at = pos.clamp_min(0)
    k = batch.head_ids.shape[-1]
    take = lambda t: torch.gather(t, 1, at[..., None].expand(-1, -1, k))  # noqa: E731
    empty = torch.zeros(*ids.shape, 0)
    return Batch(input_ids=ids, loss_mask=mask, sample_id=batch.sample_id,
                 head_ids=retokenizer.student_ids(take(batch.head_ids)),
                 head_logprobs=take(batch.head_logprobs), tnorm=torch.gather(batch.tnorm, 1, at),
                 tail_ids=empty.long(), tail_logprobs=empty, tail_counts=empty, tail_logq=empty,
                 temperature=batch.temperature, aligned=pos >= 0)


@dataclass(frozen=True)
class StreamError:
    """What a stream yields instead of a Batch when reading fails (a worker's exception would arrive wrapped
    in its traceback)."""
    message: str


class TrainStream(torch.utils.data.IterableDataset):
    """Rank ``rank``'s micro-batches of one epoch, starting at global micro-step ``start``.

    ``index`` is the trainer's CacheIndex (plain arrays, safe to hand to a forked worker), so the
    sample ids are read and hashed once per run, not once per epoch.
    """

    def __init__(self, path: str, index: CacheIndex, plan: TargetPlan, *, seed: int, epoch: int, start: int,
                 batch_size: int, rank: int, world_size: int, grad_accum: int = 1, window_blocks: int = 4,
                 reader: str = "zarr", extra: tuple = (), student_tokenizer: str | None = None):
        self.path, self.index, self.plan, self.seed, self.epoch, self.start = path, index, plan, seed, epoch, start
        self.extra = extra  # several teachers: (path, TargetPlan) of each further cache, read at the same rows
        self.student_tokenizer = student_tokenizer  # cross-tokenizer KD: the student's tokenizer folder
        self.reader = reader
        self.batch_size, self.rank, self.world, self.window_blocks = batch_size, rank, world_size, window_blocks
        self.grad_accum = grad_accum

    def __iter__(self):
        try:
            yield from self._batches()
        except PikvError as e:  # from a DataLoader worker: passed on as a value, raised by the trainer on one line
            yield StreamError(str(e))

    def _batches(self):
        # Opened here, in the iterating process. TensorStore only in a DataLoader worker: a process that used
        # it cannot fork a child that uses it (the child aborts), and the trainer forks a worker each epoch.
        in_worker = torch.utils.data.get_worker_info() is not None
        cache = open_cache(self.path, reader=self.reader if in_worker else "zarr")
        extra = tuple((open_cache(p, reader=self.reader if in_worker else "zarr"), plan) for p, plan in self.extra)
        cross = Retokenizer(cache.tokenizer_path, self.student_tokenizer, cache.seq_len) \
            if self.student_tokenizer else None
        order = self.index.epoch_order(self.seed, self.epoch, self.window_blocks)
        b, w, a = self.batch_size, self.world, self.grad_accum
        n_micro = len(order) // (b * w * a) * a
        where = dict(batch_size=b, world_size=w, grad_accum=a, rank=self.rank)
        window = self.window_blocks * self.index.unit_seqs
        names = cache.logit_names + rich_names(self.plan.rich)
        m = self.start
        while m < n_micro:
            # This rank's micro-batches whose first position lies in the current window: one read for all.
            w0 = micro_positions(m, **where)[0] // window
            group = [m]
            while group[-1] + 1 < n_micro and micro_positions(group[-1] + 1, **where)[0] // window == w0:
                group.append(group[-1] + 1)
            mine = np.concatenate([micro_positions(i, **where) for i in group])
            data = read_rows(cache, order[mine], names)
            more = [read_rows(c, order[mine]) for c, _ in extra]
            for j, micro in enumerate(group):  # the optimizer step, counted over epochs, fixes a schedule's T
                rows = lambda d: {k: v[j * b:(j + 1) * b] for k, v in d.items()}  # noqa: E731
                step = self.epoch * (n_micro // a) + micro // a
                batch = with_teachers(to_batch(rows(data), cache.encoding, self.plan, step=step),
                                      [rows(m) for m in more], extra, step)
                yield cross_batch(batch, cross) if cross else batch
            m = group[-1] + 1


def train_batches(path: str, index: CacheIndex, plan: TargetPlan, *, seed: int, batch_size: int, rank: int,
                  world_size: int, num_workers: int, pin_memory: bool, grad_accum: int = 1, reader: str = "zarr",
                  extra: tuple = (), student_tokenizer: str | None = None):
    """The default data source of train(): ``source(epoch, start)`` -> this rank's Batches of that epoch from
    global micro-step ``start``, read by ``num_workers`` (0 or 1) background DataLoader workers."""
    def source(epoch: int, start: int):
        stream = TrainStream(path, index, plan, seed=seed, epoch=epoch, start=start, batch_size=batch_size,
                             rank=rank, world_size=world_size, grad_accum=grad_accum, reader=reader, extra=extra,
                             student_tokenizer=student_tokenizer)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                                pin_memory=pin_memory, prefetch_factor=4 if num_workers else None))
    return source


def eval_batches(cache: Cache, index: CacheIndex, plan: TargetPlan, *, rank: int, world_size: int, batch_size: int,
                 extra: tuple = (), student_tokenizer: str | None = None):
    """This rank's share of the held-out sequences (a contiguous part: whole chunks), in micro-batches;
    ``extra``: (Cache, TargetPlan) of each further teacher; ``student_tokenizer``: cross-tokenizer KD."""
    rows = np.array_split(index.eval, world_size)[rank]
    cross = Retokenizer(cache.tokenizer_path, student_tokenizer, cache.seq_len) if student_tokenizer else None
    for s in range(0, len(rows), batch_size):
        ids = rows[s:s + batch_size]
        batch = with_teachers(to_batch(read_rows(cache, ids, cache.logit_names + rich_names(plan.rich)), cache.encoding,
                                     plan), [read_rows(c, ids) for c, _ in extra], extra)
        yield cross_batch(batch, cross) if cross else batch
