"""Unit writer: one unit (one zarr shard file per array) per call, committed only after its data is on disk.

Units are disjoint ranges of sequences, so ranks writing different units touch different files and
need no lock. A unit is written with one call per array (a partial-shard write would re-encode the
whole shard file) and only then is its marker written (layout.write_marker). A restarted dump
rewrites every unit without a marker, at any world size. Rich targets arrive as float32 and are
encoded here, in the writer thread, so encoding and the measurement of its error overlap with the
teacher's next forward.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import zarr

from .. import storage
from ..data import fingerprint
from ..errors import PikvError
from ..faults import fault
from . import format as F
from . import layout as Y


def create_arrays(root: str, n_seqs: int, *, seq_len: int, targets: dict, vocab_size: int, unit_seqs: int) -> None:
    """Every array of a new cache, empty (rank 0, before any unit is written)."""
    group = zarr.open_group(storage.zarr_store(root, read_only=False), mode="r+")
    for name, s in F.array_specs(n_seqs, seq_len, targets, vocab_size, unit_seqs).items():
        group.create_array(name, shape=s.shape, dtype=s.dtype, chunks=s.chunks, shards=s.shards,
                           compressors=list(s.compressors), fill_value=0)


def resize_arrays(root: str, n_seqs: int, targets: dict) -> None:
    """Every array to ``n_seqs`` sequences (an extension); the files of the units kept stay as they are."""
    group = zarr.open_group(storage.zarr_store(root, read_only=False), mode="r+")
    for name, a in _arrays(group, F.present_arrays(targets), root).items():
        a.resize((n_seqs, *a.shape[1:]))


def _arrays(group, names, root: str) -> dict:
    """The cache's arrays, each of which must open (a missing array zarr.json is damage, one line)."""
    out = {}
    for name in names:
        try:
            out[name] = group[name]
        except KeyError:
            fix = ("delete the prefix and re-dump" if storage.is_url(root) else
                   "re-run the same command with --repair")
            raise PikvError(f"{storage.join(root, name)}: the array's metadata (zarr.json) is missing; the cache is "
                            f"damaged: {fix}") from None
    return out


class UnitWriter:
    def __init__(self, root: str, *, n_seqs: int, unit_seqs: int, targets: dict, cache_key: str):
        self.root, self.n_seqs, self.unit_seqs, self.cache_key = root, n_seqs, unit_seqs, cache_key
        self.group = zarr.open_group(storage.zarr_store(root, read_only=False), mode="r+")
        self.names = F.present_arrays(targets)
        self.arrays = _arrays(self.group, self.names, root)  # each opens (shard keys); written through group[name]
        self.rich = F.rich_arrays(targets)
        self.written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pikv-writer", daemon=True)
        self._thread.start()

    def submit(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue one unit for writing: the stored arrays of its sequences, and each rich target as float32
        under its array name.

        Blocks the caller when two units are already waiting, which bounds host memory while the
        next forward pass overlaps with compression and I/O of the previous unit.
        """
        if self._error is not None:
            raise self._error
        self._queue.put((unit, arrays))

    def close(self) -> int:
        """Wait for every queued unit; return how many were written. Raises the writer thread's error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.written

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

    def _write(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        start, stop = Y.unit_range(unit, self.n_seqs, self.unit_seqs)
        if len(arrays[F.SAMPLE_ID]) != stop - start:
            raise ValueError(f"unit {unit} holds {stop - start} sequences, got {len(arrays[F.SAMPLE_ID])}")
        errors = {}
        for a in self.rich:  # encode, and measure what the encoding lost on exactly these values
            x = arrays[a.name]
            arrays[a.name], scale = F.encode_tensor(x, a.encoding, a.group)
            if a.scale_name:
                arrays[a.scale_name] = scale
            errors[a.name] = F.encoding_error(x, F.decode_tensor(arrays[a.name], scale, a.encoding, a.group), a.group)
        # Every zarr shard is written even when all zeros (a tail of no draws, a mask of no targets), so a
        # reader can tell a missing file, which is damage, from data.
        fault("enospc", self.written + 1)
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name in self.names:
                self.group[name][start:stop] = arrays[name]  # opened here: the array takes the setting at open
        for name in self.names:  # on disk before the marker says so, even if the node goes down
            storage.sync(self.root, f"{name}/{Y.shard_key(self.arrays[name], unit)}")
        self.written += 1
        fault("write", self.written)
        Y.write_marker(self.root, Y.UnitMarker(
            unit=unit, start=start, stop=stop, cache_key=self.cache_key,
            sha256=fingerprint(arrays[F.INPUT_IDS], arrays[F.LOSS_MASK]),
            loss_tokens=int(arrays[F.LOSS_MASK][:, 1:].sum()),
            block=list(Y.block_range(unit, self.n_seqs, self.unit_seqs)),
            arrays_sha256=Y.arrays_sha256(arrays, self.names), encoding_errors=errors))
        fault("commit", self.written)
