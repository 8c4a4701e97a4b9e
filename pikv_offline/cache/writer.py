"""Per-rank writer of one writer group: whole zarr shards per call, committed only after their data is on disk.

Each rank owns its group (layout.group_name) and nobody else writes there, so no lock is needed. A
block is one zarr shard worth of sequences (``shard_seqs``); it is written with one call per array
(a partial-shard write would re-encode the whole shard file) and only then is the group's
``committed`` count raised. A restarted dump resumes at ``committed`` and rewrites the rest.
Rich targets arrive as float32 and are encoded here, in the writer thread, so encoding and the
measurement of its error overlap with the teacher's next forward.
"""

from __future__ import annotations

import os
import queue
import signal
import threading

import numpy as np
import zarr

from . import format as F
from . import layout as Y


def _fault(point: str, count: int) -> None:
    """Test hook for crash tests: PIKV_FAULT=write:N or commit:N SIGKILLs this process after the data
    (write) or the commit of its N-th block; a suffix @R limits it to rank R."""
    spec = os.environ.get("PIKV_FAULT", "")
    if not spec:
        return
    where, _, rank = spec.partition("@")
    if where == f"{point}:{count}" and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


class GroupWriter:
    def __init__(self, root: str, rank: int, world_size: int, n_seqs: int, *, seq_len: int, targets: dict,
                 vocab_size: int, shard_seqs: int, cache_key: str):
        self.shard_seqs = shard_seqs
        self.n_seqs = n_seqs
        path = Y.group_name(rank)
        root_group = zarr.open_group(root, mode="r+")
        meta = Y.GroupAttrs(rank=rank, world_size=world_size, n_sequences=n_seqs, committed=0, cache_key=cache_key)
        existing = root_group.get(path)
        if existing is not None and (existing.attrs.get(Y.GROUP_ATTR) or {}).get("cache_key") == cache_key:
            self.group = existing
            self.committed = Y.GroupAttrs.from_dict(existing.attrs.get(Y.GROUP_ATTR), f"{root}: {path}").committed
        else:
            self.group = root_group.create_group(path, overwrite=True, attributes={Y.GROUP_ATTR: meta.to_dict()})
            specs = F.array_specs(n_seqs, seq_len, targets, vocab_size, shard_seqs)
            for name, s in specs.items():
                self.group.create_array(name, shape=s.shape, dtype=s.dtype, chunks=s.chunks,
                                        shards=s.shards, filters=list(s.filters) or None,
                                        compressors=list(s.compressors), fill_value=0)
            self.committed = 0
        self.names = F.present_arrays(targets)
        self.rich = F.rich_arrays(targets)
        self._meta = dict(self.group.attrs[Y.GROUP_ATTR])
        self._blocks = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"pikv-writer-{rank}", daemon=True)
        self._thread.start()

    def submit(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue one block (sequences [start, start+n) of this shard) for writing: the stored arrays, and
        each rich target as float32 under its array name.

        Blocks the caller when two blocks are already waiting, which bounds host memory while the
        next forward pass overlaps with compression and I/O of the previous block.
        """
        if self._error is not None:
            raise self._error
        if start % self.shard_seqs:
            raise ValueError(f"block start {start} is not aligned to the zarr shard size {self.shard_seqs}")
        self._queue.put((start, arrays))

    def close(self) -> int:
        """Wait for every queued block; return the committed count. Raises the writer thread's error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.committed

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain, so submit() never blocks on a dead writer
            try:
                self._write(*item)
            except BaseException as e:  # surfaced to the main thread by submit()/close()
                self._error = e

    def _write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        n = len(arrays[F.SAMPLE_ID])
        errors = {}
        for a in self.rich:  # encode, and measure what the encoding lost on exactly these values
            x = arrays[a.name]
            arrays[a.name], scale = F.encode_tensor(x, a.encoding, a.group)
            if a.scale_name:
                arrays[a.scale_name] = scale
            errors[a.name] = F.encoding_error(x, F.decode_tensor(arrays[a.name], scale, a.encoding, a.group), a.group)
        # Every zarr shard is written even when all zeros (a tail of no draws, a mask of no targets), so a
        # reader can tell a missing file, which is damage, from data.
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name in self.names:
                self.group[name][start:start + n] = arrays[name]
        self._blocks += 1
        _fault("write", self._blocks)
        # zarr >= 3.1.3 writes zarr.json atomically (temp file + rename), so a crash leaves either
        # the old or the new count, never a torn file.
        self._meta["committed"] = start + n
        if errors:
            merged = dict(self._meta.get("encoding_errors", {}))
            for target, e in errors.items():
                merged[target] = F.merge_errors(merged.get(target), e)
            self._meta["encoding_errors"] = merged
        self.group.attrs[Y.GROUP_ATTR] = self._meta
        self.committed = start + n
        _fault("commit", self._blocks)
