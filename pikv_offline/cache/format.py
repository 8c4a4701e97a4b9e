"""The teacher cache format, version 1: every array name, dtype, shape, codec and attribute key.

The writer and the reader both import this module and nothing else defines the layout. See
FORMAT.md beside this file for the contract in prose. Any change to what is written here must
bump FORMAT_VERSION.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

# The numcodecs Delta filter is not in the core v3 spec; zarr warns on every array it builds.
# We accept that: the codec is recorded in each array's metadata and zarr-python reads it back.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
from zarr.codecs.numcodecs import Delta  # noqa: E402

FORMAT_VERSION = 1
ROOT_ATTR = "pikv"  # key of the root attributes dict
SHARD_ATTR = "pikv_shard"  # key of each shard group's attributes dict
SHARDS_GROUP = "shards"

INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
SAMPLE_ID = "sample_id"
TOPK_IDS = "logits/ids"
TOPK_LOGPROBS = "logits/logprobs"
LSE = "logits/lse"
ARRAY_NAMES = (INPUT_IDS, LOSS_MASK, SAMPLE_ID, TOPK_IDS, TOPK_LOGPROBS, LSE)

# Log-probs are stored as the bit patterns of float16 in a uint16 array. For sorted (descending)
# log-probs, which are <= 0, the patterns increase monotonically along k, so an integer Delta
# filter turns them into small numbers that zstd packs well. Delta on a float dtype would be lossy,
# which is why the view is taken before the filter.
LOGPROB_ENCODING = "float16-bits"

# Sequences per inner chunk of the per-position target arrays. zarr-python spends ~0.3 ms per inner
# chunk on a read (measured: 64 rows of logits/ids in 18.8 ms with 1-sequence chunks, 4.9 ms with
# 8), so chunks of 8 sequences make reads 4x cheaper and compress slightly better; the small
# per-sequence arrays (input_ids, loss_mask, sample_id) take one chunk per shard.
CHUNK_SEQS = 8


def shard_name(rank: int) -> str:
    return f"{SHARDS_GROUP}/rank-{rank:05d}"


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """float log-probs -> uint16 bit patterns of their float16 values (finite, since fp16 covers >= -65504)."""
    return np.clip(logprobs, -65504.0, 0.0).astype(np.float16).view(np.uint16)


def decode_logprobs(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    filters: tuple
    compressors: tuple


def _blosc(typesize_shuffle: str = "shuffle") -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=typesize_shuffle)


def array_specs(n_seqs: int, seq_len: int, top_k: int, n_temps: int, vocab_size: int,
                shard_seqs: int) -> dict[str, ArraySpec]:
    """Specs of every array in one rank's shard group holding ``n_seqs`` sequences.

    A zarr shard (one file) holds ``shard_seqs`` sequences, so a reader fetches many sequences per
    call and the writer writes whole shards at once; inner chunks are CHUNK_SEQS sequences (or a
    divisor of the shard) for the targets and a whole shard for the small arrays. Every inner chunk
    ends with a crc32c checksum, so corruption is caught on read.
    """
    s = max(n_seqs, 1)  # zarr needs a non-zero extent to size chunks; an empty shard stays unwritten
    n = min(shard_seqs, s)
    c = math.gcd(n, CHUNK_SEQS)

    def spec(tail: tuple[int, ...], dtype, filters=(), chunk=c) -> ArraySpec:
        return ArraySpec(shape=(n_seqs, *tail), dtype=np.dtype(dtype), chunks=(chunk, *tail),
                         shards=(n, *tail), filters=tuple(filters),
                         compressors=(_blosc(), Crc32cCodec()))

    return {
        INPUT_IDS: spec((seq_len,), np.int32, chunk=n),
        LOSS_MASK: spec((seq_len,), np.bool_, chunk=n),
        SAMPLE_ID: spec((), np.int64, chunk=n),
        TOPK_IDS: spec((seq_len, top_k), id_dtype(vocab_size)),
        TOPK_LOGPROBS: spec((seq_len, top_k), np.uint16, filters=(Delta(dtype="<u2"),)),
        LSE: spec((seq_len, n_temps), np.float32),
    }
