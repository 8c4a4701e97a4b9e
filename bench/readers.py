"""Zarr readers of a cache: zarr-python's default codec pipeline, zarr-python with the zarrs pipeline
(Rust; pip install zarrs) and TensorStore (pip install tensorstore), on the loader's two access patterns.

    python bench/readers.py --cache runs/demo/cache [--repeats 3]

  units   every array of every unit, one read per array and unit (a dump's verify, a repair's check);
  chunks  every array of 8-sequence inner chunks in a seeded random order (what the training loader
          reads: whole inner chunks of the step's sequences).
Each reader must return exactly what zarr-python's default returns (checked on every read). Prints one
JSON line per reader and pattern (sequences/s, MB/s of stored bytes, speed-up over the default) and
a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pikv_offline.cache import layout as Y  # noqa: E402
from pikv_offline.cache.reader import open_cache  # noqa: E402


def _zarr_reader(path: str, names, pipeline: str | None):
    import zarr

    if pipeline:
        zarr.config.set({"codec_pipeline.path": pipeline})
    else:
        zarr.config.reset()
    group = zarr.open_group(path, mode="r")
    arrays = {n: group[n] for n in names}
    return lambda name, a, b: arrays[name][a:b]


def _tensorstore_reader(path: str, names):
    import tensorstore as ts

    arrays = {n: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, n)}},
                         read=True).result() for n in names}
    return lambda name, a, b: arrays[name][a:b].read().result()


def _windows(cache, pattern: str, seed: int = 0) -> list[tuple[int, int]]:
    n, unit = cache.n, cache.attrs.unit_seqs
    if pattern == "units":
        return [Y.unit_range(u, n, unit) for u in range(cache.attrs.n_units)]
    inner = 8
    starts = np.random.default_rng(seed).permutation(np.arange(0, n, inner))
    return [(int(s), min(int(s) + inner, n)) for s in starts]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="runs/demo/cache")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cache = open_cache(args.cache)
    names = cache.names
    stored = sum(cache.bytes_per_array().values())
    default = _zarr_reader(args.cache, names, None)
    readers = {"zarr-python": lambda: _zarr_reader(args.cache, names, None)}
    try:
        import zarrs  # noqa: F401

        readers["zarrs"] = lambda: _zarr_reader(args.cache, names, "zarrs.ZarrsCodecPipeline")
    except ImportError:
        print(json.dumps({"bench": "readers", "reader": "zarrs", "skipped": "pip install zarrs"}))
    try:
        import tensorstore  # noqa: F401

        readers["tensorstore"] = lambda: _tensorstore_reader(args.cache, names)
    except ImportError:
        print(json.dumps({"bench": "readers", "reader": "tensorstore", "skipped": "pip install tensorstore"}))
    results = {}
    for pattern in ("units", "chunks"):
        windows = _windows(cache, pattern)
        want = {w: {n: default(n, *w) for n in names} for w in windows}  # the reference, read once
        for label, make in readers.items():
            read = make()
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for w in windows:
                    got = {n: read(n, *w) for n in names}
                    for n in names:
                        if not np.array_equal(got[n], want[w][n]):
                            raise SystemExit(f"{label} read other values of {n} rows {w}")
                best = min(best, time.perf_counter() - t0)
            row = {"bench": "readers", "reader": label, "pattern": pattern, "reads": len(windows) * len(names),
                   "seconds": round(best, 3), "sequences_per_s": round(cache.n / best, 1),
                   "stored_mb_per_s": round(stored / best / 1e6, 1)}
            results[(label, pattern)] = row
            print(json.dumps(row), flush=True)
        import zarr

        zarr.config.reset()
    print(json.dumps({"bench": "readers-summary", "cache": args.cache, "sequences": cache.n,
                      "speedup_over_zarr_python": {f"{r}/{p}": round(results[("zarr-python", p)]["seconds"]
                                                                      / results[(r, p)]["seconds"], 2)
                                                   for r, p in results if r != "zarr-python"}}))


if __name__ == "__main__":
    main()
