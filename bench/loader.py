"""The loader at many ranks: decode work per rank per step, and the loader's speed against training.

    python bench/loader.py                                   # read plans for W = 1, 8, 64 (no cache needed)
    python bench/loader.py --cache runs/demo/cache --student-config bench/student.json   # + measured speeds

Read plan (computed from the order alone, no process group): for rank 0 of W ranks, the sequences it
decodes per optimizer step (the loader reads a rank's positions of a window of 4 units in one call,
decoding each inner chunk they touch once; an inner chunk is format.inner_chunk sequences), against
its share (B x A sequences). "interleaved" is the order before format v4, where rank r took
the B sequences at offset r*B of each micro-step over a per-sequence shuffle: its decode grows with W.
With --cache: sequences/s of the real loader (its DataLoader worker, decode included; read through
zarr-python and through TensorStore, --reader) against sequences/s that training consumes (train-student, a few
steps, the same cache, kd + ce).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.student import data as D  # noqa: E402


def _per_step(order: np.ndarray, mine: np.ndarray, chunk: int, window: int, steps_per_window: float,
              windows: int) -> float:
    """Sequences rank 0 decodes per step: the loader reads its positions of a window in one call, decoding
    every inner chunk they touch once; averaged over the first windows."""
    decoded = [len(np.unique(order[mine[(mine // window) == w]] // chunk)) * chunk for w in range(windows)]
    return float(np.mean(decoded)) / steps_per_window


def plan(index, *, world: int, batch: int, accum: int, windows: int = 4, seed: int = 0) -> dict:
    order = index.epoch_order(seed, 0)
    window = 4 * index.unit_seqs
    g = batch * world * accum
    n_micro = (windows * window) // g * accum
    where = dict(batch_size=batch, world_size=world, grad_accum=accum, rank=0)
    mine = np.concatenate([D.micro_positions(m, **where) for m in range(max(n_micro, accum))])
    per = _per_step(order, mine, index.chunk, window, window / g, windows)
    return {"decoded_seqs_per_step": round(per, 2), "share": batch * accum, "ratio": round(per / (batch * accum), 3)}


def plan_interleaved(index, *, world: int, batch: int, accum: int, windows: int = 4, seed: int = 0) -> dict:
    """Before v4: sequences shuffled one by one inside windows; micro-step m gave rank r the B at m*B*W + r*B."""
    rng = np.random.default_rng(seed)
    order = index.train.copy()
    window = 4 * index.unit_seqs
    for s in range(0, len(order), window):
        order[s:s + window] = order[s:s + window][rng.permutation(min(window, len(order) - s))]
    span = np.arange(windows * window)
    mine = span[(span // batch) % world == 0]
    g = batch * world * accum
    per = _per_step(order, mine, index.chunk, window, window / g, windows)
    return {"decoded_seqs_per_step": round(per, 2), "share": batch * accum, "ratio": round(per / (batch * accum), 3)}


def speeds(args) -> dict:
    from pikv_offline.cache.reader import open_cache
    from pikv_offline.config import TrainConfig
    from pikv_offline.student.train import run

    cache = open_cache(args.cache)
    index = D.CacheIndex(cache, 0.0)
    p = D.plan_targets(cache, None, 1.0, "auto")
    loader = {}
    for reader in ("zarr", "tensorstore"):  # in a DataLoader worker, as training reads (TensorStore only there)
        stream = D.train_batches(args.cache, index, p, seed=0, batch_size=args.batch_size, rank=0, world_size=1,
                                 num_workers=1, pin_memory=False, reader=reader)(0, 0)
        t0, n = time.perf_counter(), 0
        for b in stream:
            n += len(b.sample_id)
            if n >= args.loader_seqs:
                break
        loader[reader] = n / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as out:
        res = run(TrainConfig(cache=args.cache, student_config=args.student_config, out=out, max_steps=args.steps,
                              batch_size=args.batch_size, ce_weight=1.0, eval_fraction=0.0, log_every=10**9,
                              num_workers=0, reader="zarr"))
    hist = res["history"]
    train_seqs = (len(hist) - 1) * args.batch_size / (hist[-1][0] - hist[0][0])
    return {"loader_seqs_per_s": {k: round(v, 1) for k, v in loader.items()}, "train_seqs_per_s": round(train_seqs, 1),
            "loader_over_train": {k: round(v / train_seqs, 2) for k, v in loader.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=1_000_000)
    ap.add_argument("--unit-seqs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--student-config", default=None)
    ap.add_argument("--loader-seqs", type=int, default=2048)
    args = ap.parse_args()
    index = D.CacheIndex(None, 0.01, n=args.sequences, unit_seqs=args.unit_seqs)
    for w in (1, 8, 64):
        kw = dict(world=w, batch=args.batch_size, accum=args.grad_accum)
        print(json.dumps({"bench": "loader-plan", "world_size": w, "batch_size": args.batch_size,
                          "grad_accum": args.grad_accum, "v4": plan(index, **kw),
                          "interleaved": plan_interleaved(index, **kw)}), flush=True)
    if args.cache:
        print(json.dumps({"bench": "loader-speed", "cache": args.cache, **speeds(args)}), flush=True)


if __name__ == "__main__":
    main()
