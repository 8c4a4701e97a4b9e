"""The teacher cache format, version 5: every array name, dtype, shape, codec and encoding.

The writer and the reader both import this module and nothing else defines the arrays; which
sequences go where and the attributes are layout.py's. See FORMAT.md beside this file for the
contract in prose. Any change to what is written here must
bump FORMAT_VERSION.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

# 3: optional hidden / kv / router / experts targets. 4: arrays over all sequences written in units
# (any rank writes any unit; resume at any world size; extension), ids stored as gaps (only codecs of
# the Zarr v3 specification: bytes, blosc, crc32c, sharding). 5: the sampled tail's slots cycle over
# proposal temperatures (targets.logits.tail_temperatures; 4 drew every slot at T=1).
FORMAT_VERSION = 5

INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
SAMPLE_ID = "sample_id"
HEAD_IDS = "logits/id_gaps"  # the exact top-k in ascending id order, stored as gaps: ids = cumsum along k
HEAD_LOGPROBS = "logits/logprobs"  # their T=1 log-probs, in the same order
TNORM = "logits/tnorm"  # log sum_v p_1(v)^(1/T) for each grid T after the first (T=1: 0)
TAIL_IDS = "logits/tail_id_gaps"  # distinct sampled tail ids, ascending, padded with the last one; as gaps
TAIL_LOGPROBS = "logits/tail_logprobs"
TAIL_COUNTS = "logits/tail_counts"  # draws of each id; 0 marks padding
ARRAY_NAMES = (INPUT_IDS, LOSS_MASK, SAMPLE_ID, HEAD_IDS, HEAD_LOGPROBS, TNORM, TAIL_IDS, TAIL_LOGPROBS,
               TAIL_COUNTS)
MAX_TAIL = 255  # counts are uint8


@dataclass(frozen=True)
class Encoding:
    """How log-probs and normalizers are stored. Every encoding keeps ids exact."""
    name: str
    logprob_bits: str  # "float16" or "bfloat16": uint16 bit patterns of that type
    tnorm_dtype: str
    relative_error: float  # max |stored - exact| / |logprob| from rounding to nearest


# Chosen by measurement on the demo teacher (V=4096, k=64; bench/storage.py): bf16 log-probs cost
# 56.5 B/token against 84.8 for fp16, at 4x the rounding error; a float16 normalizer costs 2.4
# B/token against 5.8 for float32 (two grid temperatures).
ENCODINGS = {
    "fp16": Encoding("fp16", "float16", "float32", 2.0 ** -11),
    "bf16": Encoding("bf16", "bfloat16", "float16", 2.0 ** -8),
}
DEFAULT_ENCODING = "fp16"

# Sequences per inner chunk of the per-position target arrays. zarr-python spends ~0.3 ms per inner
# chunk on a read (measured: 64 rows of logits/ids in 18.8 ms with 1-sequence chunks, 4.9 ms with
# 8), so chunks of 8 sequences make reads 4x cheaper and compress slightly better; the small
# per-sequence arrays (input_ids, loss_mask, sample_id) take one chunk per shard.
CHUNK_SEQS = 8


def inner_chunk(unit_seqs: int) -> int:
    """Sequences per inner chunk of the per-position arrays of a cache written in units of ``unit_seqs``."""
    return math.gcd(unit_seqs, CHUNK_SEQS)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tail_slot_temperatures(tail_temperatures, draws: int) -> list[float]:
    """The proposal temperature of each of the ``draws`` slots: slot j draws at tail_temperatures[j mod m]."""
    return [float(tail_temperatures[j % len(tail_temperatures)]) for j in range(draws)]


def tail_strata(tail_temperatures, draws: int) -> tuple[tuple[float, int], ...]:
    """((T_c, n_c), ...): each distinct proposal temperature, first-seen order, and how many slots draw at it."""
    slots = tail_slot_temperatures(tail_temperatures, draws)
    return tuple((t, slots.count(t)) for t in dict.fromkeys(slots))


def logit_arrays(top_k: int, n_temps: int, tail: int) -> tuple[str, ...]:
    """The per-sequence and logit arrays a cache with these settings holds: an empty target is not written."""
    skip = set()
    if top_k == 0:
        skip |= {HEAD_IDS, HEAD_LOGPROBS}
    if n_temps == 1:
        skip.add(TNORM)
    if tail == 0:
        skip |= {TAIL_IDS, TAIL_LOGPROBS, TAIL_COUNTS}
    return tuple(n for n in ARRAY_NAMES if n not in skip)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bit patterns of bfloat16, rounded to nearest, ties to even."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_logprobs(logprobs: np.ndarray, encoding: str = DEFAULT_ENCODING) -> np.ndarray:
    """float log-probs (<= 0) -> uint16 bit patterns of float16 or bfloat16, rounded to nearest."""
    x = np.clip(np.asarray(logprobs, dtype=np.float32), -65504.0, 0.0)
    if ENCODINGS[encoding].logprob_bits == "float16":
        return x.astype(np.float16).view(np.uint16)
    return bf16_bits(x)


def decode_logprobs(bits: np.ndarray, encoding: str = DEFAULT_ENCODING) -> np.ndarray:
    if ENCODINGS[encoding].logprob_bits == "float16":
        return bits.view(np.float16).astype(np.float32)
    return from_bf16_bits(bits)


def encode_gaps(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Ascending ids [..., k] -> their gaps (the first id itself, then each id minus the one before),
    the stored values: small, so they compress well, with no filter a Zarr reader must know."""
    ids = np.asarray(ids, np.int64)
    return np.diff(ids, axis=-1, prepend=0).astype(id_dtype(vocab_size))


def decode_gaps(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps.astype(np.int64), axis=-1)


def encode_head(ids: np.ndarray, logprobs: np.ndarray, encoding: str, vocab_size: int):
    """Top-k in any order -> (gaps of the ids sorted ascending, their log-prob bits). Sorted ids differ by
    small steps: 26 B/token at k=64 against 85 in probability order (measured with a Delta filter in v3)."""
    order = np.argsort(ids, axis=-1)
    return (encode_gaps(np.take_along_axis(ids, order, -1), vocab_size),
            encode_logprobs(np.take_along_axis(logprobs, order, -1), encoding))


def decode_head(gaps: np.ndarray, bits: np.ndarray, encoding: str, top_k: int | None = None,
                by_prob: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stored head -> (ids int64, log-probs float32). Kept in id order (the losses do not care) unless
    ``by_prob`` or a ``top_k`` below the stored k asks for the most probable first."""
    lp = decode_logprobs(bits, encoding)
    ids = decode_gaps(gaps)
    if by_prob or (top_k is not None and top_k < ids.shape[-1]):
        order = np.argsort(-lp, axis=-1, kind="stable")[..., :top_k]
        return np.take_along_axis(ids, order, -1), np.take_along_axis(lp, order, -1)
    return ids, lp


def encode_tnorm(tnorm: np.ndarray, encoding: str) -> np.ndarray:
    """[.., nT] normalizers with column 0 (T=1, always 0) -> the stored [.., nT-1]."""
    return tnorm[..., 1:].astype(ENCODINGS[encoding].tnorm_dtype)


def decode_tnorm(stored: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Stored [.., nT-1] (or None when the grid is T=1 alone) -> [.., nT] float32 with the zero column."""
    out = np.zeros((*shape, 1 + (0 if stored is None else stored.shape[-1])), np.float32)
    if stored is not None:
        out[..., 1:] = stored
    return out


def encode_tail(draws: np.ndarray, logprobs: np.ndarray, encoding: str, vocab_size: int):
    """Sampled tail [.., n] draws (with replacement; -1 = no draw) and their log-probs -> distinct ids
    ascending (stored as gaps) with counts; the unused slots repeat the last id (gap 0) with count 0."""
    shape, n = draws.shape[:-1], draws.shape[-1]
    d = draws.reshape(-1, n).astype(np.int64)
    d = np.where(d < 0, vocab_size, d)  # a sentinel that sorts last
    order = np.argsort(d, axis=-1, kind="stable")
    d = np.take_along_axis(d, order, -1)
    lp = np.take_along_axis(logprobs.reshape(-1, n), order, -1)
    first = np.ones_like(d, dtype=bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = np.cumsum(first, -1) - 1
    rows = np.repeat(np.arange(len(d)), n)
    counts = np.zeros(d.shape, np.int64)
    np.add.at(counts, (rows, slot.ravel()), 1)
    ids = np.zeros_like(d)
    lps = np.zeros(d.shape, np.float32)
    r, c = np.nonzero(first)
    ids[r, slot[r, c]] = d[r, c]
    lps[r, slot[r, c]] = lp[r, c]
    counts[ids == vocab_size] = 0
    ids[ids == vocab_size] = 0
    ids = np.maximum.accumulate(ids, axis=-1)  # padding repeats the last id
    return (encode_gaps(ids.reshape(*shape, n), vocab_size),
            encode_logprobs(lps.reshape(*shape, n), encoding), counts.reshape(*shape, n).astype(np.uint8))


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    compressors: tuple


def _blosc(typesize_shuffle: str = "shuffle", level: int = 5) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle=typesize_shuffle)


def array_specs(n_seqs: int, seq_len: int, targets: dict, vocab_size: int, unit_seqs: int) -> dict[str, ArraySpec]:
    """Specs of every array of a cache of ``n_seqs`` sequences written in units of ``unit_seqs``.

    A zarr shard (one file) is one unit, so the writer writes whole shards at once and a reader
    fetches many sequences per call; inner chunks are CHUNK_SEQS sequences (or a divisor of the
    unit) for the targets and a whole unit for the small arrays. Every inner chunk ends with a
    crc32c checksum, so corruption is caught on read. Only codecs of the Zarr v3 specification.
    """
    lg = targets["logits"]
    top_k, n_temps, tail, encoding = lg["top_k"], len(lg["temperatures"]), lg.get("sampled_tail", 0), lg["encoding"]
    n = unit_seqs  # the shard size does not depend on the extent, so an extended cache keeps its files
    c = inner_chunk(n)
    ids = id_dtype(vocab_size)

    def spec(tail_shape: tuple[int, ...], dtype, chunk=c, level=5) -> ArraySpec:
        return ArraySpec(shape=(n_seqs, *tail_shape), dtype=np.dtype(dtype), chunks=(chunk, *tail_shape),
                         shards=(n, *tail_shape), compressors=(_blosc(level=level), Crc32cCodec()))

    specs = {
        INPUT_IDS: spec((seq_len,), np.int32, chunk=n),
        LOSS_MASK: spec((seq_len,), np.bool_, chunk=n),
        SAMPLE_ID: spec((), np.int64, chunk=n),
        HEAD_IDS: spec((seq_len, top_k), ids),
        HEAD_LOGPROBS: spec((seq_len, top_k), np.uint16),
        TNORM: spec((seq_len, n_temps - 1), ENCODINGS[encoding].tnorm_dtype),
        TAIL_IDS: spec((seq_len, tail), ids),
        TAIL_LOGPROBS: spec((seq_len, tail), np.uint16),
        TAIL_COUNTS: spec((seq_len, tail), np.uint8),
    }
    out = {name: specs[name] for name in logit_arrays(top_k, n_temps, tail)}
    # Dense activations gain little from zstd's higher levels and are the bulk of a rich cache; level 1
    # keeps the writer thread ahead of the teacher.
    for a in rich_arrays(targets):
        out[a.name] = spec((seq_len, *a.shape), a.value_dtype, level=1)
        if a.scale_name:
            out[a.scale_name] = spec((seq_len, *a.scale_shape), np.float32, level=1)
    return out


def present_arrays(targets: dict) -> tuple[str, ...]:
    """Every array a cache with these targets holds, in writing order."""
    lg = targets["logits"]
    names = list(logit_arrays(lg["top_k"], len(lg["temperatures"]), lg.get("sampled_tail", 0)))
    for a in rich_arrays(targets):
        names += a.stored
    return tuple(names)


# ---- rich targets: hidden states, the KV cache, MoE router logits and expert outputs ----------------

RICH_KINDS = ("hidden", "kv", "router", "experts")
# Each encoding's bound on |stored - exact| / absmax of the value's group (fp16/bf16: relative rounding
# of each value; int8: half a step of absmax / 127).
TENSOR_ERROR_BOUNDS = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "int8": 1 / 254}
TENSOR_ENCODINGS = tuple(TENSOR_ERROR_BOUNDS)
DEFAULT_TENSOR_ENCODING = "bf16"  # the range of float32: hidden states of large models have outliers in the 1000s
INT8_KINDS = ("hidden", "kv", "experts")  # int8 pays off on the wide activations; router logits are E per token
INT8_GROUP = 64  # hidden / experts: channels per int8 scale (kv: one scale per head)


@dataclass(frozen=True)
class RichArray:
    """One stored activation tensor: ``name`` [S, L, *shape] in ``encoding``; with int8 also
    ``scale_name`` [S, L, *shape[:-1], shape[-1] // group] float32 absmax/127 scales."""
    kind: str
    layer: int
    name: str
    shape: tuple[int, ...]
    encoding: str
    group: int

    @property
    def value_dtype(self) -> np.dtype:
        return np.dtype({"fp16": np.float16, "bf16": np.uint16, "int8": np.int8}[self.encoding])

    @property
    def scale_name(self) -> str | None:
        return f"{self.name}_scale" if self.encoding == "int8" else None

    @property
    def stored(self) -> tuple[str, ...]:
        """The arrays that hold this target: its values, and its scales with int8."""
        return (self.name, self.scale_name) if self.scale_name else (self.name,)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.shape[-1] // self.group)


def rich_name(kind: str, layer: int, part: str | None = None) -> str:
    return f"{kind}/layer_{layer}" + (f"/{part}" if part else "")


def rich_arrays(targets: dict, kinds: tuple[str, ...] = RICH_KINDS) -> list[RichArray]:
    """The rich arrays that ``targets`` (the root attribute) declares, kind by kind, layer by layer."""
    out = []
    for kind in kinds:
        t = targets.get(kind)
        if not t:
            continue
        shape, enc, group = tuple(t["shape"]), t["encoding"], int(t.get("group") or t["shape"][-1])
        for layer in t["layers"]:
            for part in (("key", "value") if kind == "kv" else (None,)):
                out.append(RichArray(kind, int(layer), rich_name(kind, layer, part), shape, enc, group))
    return out


def int8_group(width: int) -> int:
    return math.gcd(width, INT8_GROUP)


def encode_tensor(x: np.ndarray, encoding: str, group: int) -> tuple[np.ndarray, np.ndarray | None]:
    """float activations [..., d] -> (stored values, int8 scales [..., d // group] or None).

    fp16 saturates at +-65504 (the measured error then shows it); bf16 rounds to nearest even;
    int8 stores round(x / s) with s = absmax / 127 per group of ``group`` channels, so |error| <= s / 2.
    s is float32: a float16 s is subnormal for activations below ~0.008 and its rounding then pushed
    |x / s| past 127 (measured: twice the bound on a tiny MoE's expert outputs).
    """
    x = np.asarray(x, dtype=np.float32)
    if encoding == "fp16":
        return np.clip(x, -65504.0, 65504.0).astype(np.float16), None
    if encoding == "bf16":
        return bf16_bits(x), None
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale = (np.abs(g).max(-1) / np.float32(127.0)).astype(np.float32)
    s = scale[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(g / s), 0.0)
    return np.clip(q, -127, 127).astype(np.int8).reshape(x.shape), scale


def decode_tensor(values: np.ndarray, scale: np.ndarray | None, encoding: str, group: int) -> np.ndarray:
    if encoding == "fp16":
        return values.astype(np.float32)
    if encoding == "bf16":
        return from_bf16_bits(values)
    g = values.reshape(*values.shape[:-1], values.shape[-1] // group, group).astype(np.float32)
    return (g * scale.astype(np.float32)[..., None]).reshape(values.shape)


def encoding_error(x: np.ndarray, decoded: np.ndarray, group: int) -> dict:
    """What an encoding lost on ``x``: the max absolute error, the max error over its group's absmax,
    and the sums behind the relative RMS error (sqrt(err_sq / ref_sq)), to merge over blocks."""
    x = np.asarray(x, np.float32)
    err = np.abs(decoded.astype(np.float32) - x)
    g = lambda a: a.reshape(*a.shape[:-1], a.shape[-1] // group, group)  # noqa: E731
    amax = g(np.abs(x)).max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(amax > 0, g(err) / amax, 0.0)
    return {"max_abs_error": float(err.max(initial=0.0)), "max_error_over_absmax": float(rel.max(initial=0.0)),
            "err_sq": float((err.astype(np.float64) ** 2).sum()), "ref_sq": float((x.astype(np.float64) ** 2).sum())}


def merge_errors(a: dict | None, b: dict) -> dict:
    if not a:
        return dict(b)
    return {k: (max(a[k], b[k]) if k.startswith("max") else a[k] + b[k]) for k in b}


def error_summary(e: dict) -> dict:
    """A merged encoding_error -> the figures reported: max abs, max over absmax, relative RMS."""
    return {"max_abs_error": e["max_abs_error"], "max_error_over_absmax": e["max_error_over_absmax"],
            "relative_rms_error": math.sqrt(e["err_sq"] / e["ref_sq"]) if e["ref_sq"] > 0 else 0.0}
