"""Stage one: run the teacher over the data and write the cache.

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    torchrun --nproc-per-node 2 -m pikv_offline dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    pikv dump-teacher ... --targets hidden:4,8@int8 --targets kv:6 --targets router --max-cache-gb 500

Rank r of W writes only its own writer group, the sequences cache/layout.py assigns it. The cache
is marked complete by rank 0 after every rank has committed all of its sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .. import __version__, dist
from ..cache import format as F
from ..cache import layout as Y
from ..cache.reader import encoding_errors, open_cache, read_root_attrs
from ..cache.writer import GroupWriter
from ..config import DumpConfig
from ..data import build_sequences, fingerprint, iter_documents, load_records
from ..errors import PikvError
from ..modeling import resolve_dtype, text_config, tokenizer_hash
from . import model as M

def size_check(cfg: DumpConfig, specs: dict) -> str | None:
    """An error message when the cache's estimated size exceeds --max-cache-gb (default: the free disk).

    The estimate is the uncompressed size, an upper bound: compression saves ~2x on the logit head
    but little on dense activations, which are what make a cache too big.
    """
    per_array = {name: int(np.prod(s.shape)) * s.dtype.itemsize for name, s in specs.items()}
    total = sum(per_array.values())
    if cfg.max_cache_gb is not None:
        limit, what = cfg.max_cache_gb * 1e9, f"--max-cache-gb {cfg.max_cache_gb:g}"
    else:
        probe = os.path.abspath(cfg.out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        limit = shutil.disk_usage(probe).free
        what = f"the {limit / 1e9:.2f} GB free at --out (set --max-cache-gb to choose a limit)"
    if total <= limit:
        return None
    positions = max(specs[F.INPUT_IDS].shape[0] * cfg.seq_len, 1)
    groups: dict[str, int] = {}
    for name, b in per_array.items():
        label = "logits" if name.startswith("logits/") else name.split("/")[0]
        groups[label] = groups.get(label, 0) + b
    parts = ", ".join(f"{k} {v / positions:.0f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))
    return (f"the cache would take about {total / 1e9:.2f} GB ({total / positions:.0f} B/token uncompressed: {parts}) "
            f"over {positions} positions, more than {what}; drop targets or layers, store them as int8, "
            "dump fewer --max-sequences, or raise --max-cache-gb")


def _decide(cfg: DumpConfig, key: str, world_size: int) -> tuple[str, str]:
    """Rank 0's view of --out: ('new'|'resume'|'hit', message) or ('error', message)."""
    out = cfg.out
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return "new", ""
    attrs = read_root_attrs(out) if os.path.isdir(out) else None
    if attrs is None:
        return "error", (f"--out {out} exists and is not a pikv cache; choose a new or empty folder "
                         "(--overwrite only replaces pikv caches)")
    if attrs.get("cache_key") != key or attrs.get("format_version") != F.FORMAT_VERSION:
        if cfg.overwrite:
            return "new", f"replacing the cache at {out} (--overwrite)"
        return "error", (f"--out {out} holds a cache of different inputs (teacher, data or settings "
                         "changed); use another --out or pass --overwrite")
    if attrs.get("complete") and not cfg.overwrite:
        return "hit", f"cache hit: {out} is complete for these inputs (key {key}); nothing to do"
    if cfg.overwrite:
        return "new", f"replacing the cache at {out} (--overwrite)"
    if int(attrs.get("world_size", -1)) != world_size:
        return "error", (f"--out {out} is an incomplete dump started with {attrs.get('world_size')} "
                         f"ranks; resume it with the same number of ranks or pass --overwrite")
    return "resume", f"resuming the incomplete cache at {out}"


def _create_root(cfg: DumpConfig, attrs: Y.RootAttrs, tokenizer) -> None:
    if os.path.exists(cfg.out):
        shutil.rmtree(cfg.out)
    root = zarr.open_group(cfg.out, mode="w", attributes={Y.ROOT_ATTR: attrs.to_dict()})
    root.create_group(Y.GROUPS)
    tokenizer.save_pretrained(os.path.join(cfg.out, Y.TOKENIZER_DIR))


def run(cfg: DumpConfig) -> dict:
    d = dist.init(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        dist.teardown()


def _run(cfg: DumpConfig, d: dist.Dist) -> dict:
    t_start = time.perf_counter()
    if cfg.device_map and d.world_size > 1:
        raise PikvError("--device-map auto spreads one teacher over the visible GPUs in one process; "
                        "run it without torchrun")
    folder = M.resolve_teacher(cfg.teacher)
    config = M.load_config(folder, cfg.teacher)
    tokenizer = M.load_tokenizer(folder, cfg.teacher)
    vocab = int(text_config(config).vocab_size)
    ctx = M.context_length(config)
    if ctx is not None and cfg.seq_len > ctx:
        raise PikvError(f"--seq-len {cfg.seq_len} exceeds the teacher's context of {ctx} tokens; "
                        f"use --seq-len {ctx} or less")
    if cfg.top_k > vocab:
        raise PikvError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary of {vocab}; use --top-k {vocab} or less")
    if cfg.sampled_tail and cfg.top_k >= vocab:
        raise PikvError(f"--sampled-tail needs a tail: --top-k {cfg.top_k} covers the whole vocabulary of {vocab}; "
                        "lower --top-k or drop --sampled-tail")
    if len(tokenizer) > vocab:
        raise PikvError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary is {vocab}; "
                        "they do not belong together")

    ds = load_records(cfg.data, cfg.split, cfg.data_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    docs = iter_documents(ds, tokenizer, cfg.text_field, cfg.chat_field)
    input_ids, loss_mask = build_sequences(docs, cfg.seq_len, pad_id, cfg.pack, cfg.max_sequences)
    n_seqs = len(input_ids)

    device = d.device if not cfg.device_map else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    teacher_info = {"name": cfg.teacher, "weights_sha256": M.weights_identity(folder),
                    "config_sha256": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True,
                                                               default=str).encode()).hexdigest(),
                    "model_type": config.model_type, "vocab_size": vocab,
                    "num_layers": M.layer_count(config), "dtype": dtype_name}
    data_info = {"data": cfg.data, "split": cfg.split, "data_config": cfg.data_config,
                 "text_field": cfg.text_field, "chat_field": cfg.chat_field, "pack": cfg.pack,
                 "max_sequences": cfg.max_sequences, "fingerprint": fingerprint(input_ids, loss_mask)}
    targets = {"logits": {"top_k": cfg.top_k, "temperatures": list(cfg.temperatures), "encoding": cfg.encoding,
                          "id_dtype": F.id_dtype(vocab).name, "sampled_tail": cfg.sampled_tail},
               **M.plan_targets(config, cfg.targets, cfg.teacher)}
    tok_hash = tokenizer_hash(tokenizer)
    key = Y.cache_key(teacher=teacher_info, tokenizer_sha256=tok_hash, fingerprint=data_info["fingerprint"],
                      seq_len=cfg.seq_len, targets=targets)

    decision, message = _decide(cfg, key, d.world_size) if d.is_main else (None, None)
    if decision == "new":  # only a new cache is sized: a hit or a resume writes no more than asked before
        too_big = size_check(cfg, F.array_specs(n_seqs, cfg.seq_len, targets, vocab, cfg.shard_seqs))
        decision, message = ("error", too_big) if too_big else (decision, message)
    if d.is_main and decision == "new":
        _create_root(cfg, Y.RootAttrs(
            format_version=F.FORMAT_VERSION, complete=False, cache_key=key, teacher=teacher_info,
            tokenizer_sha256=tok_hash, tokenizer_dir=Y.TOKENIZER_DIR, data=data_info, seq_len=cfg.seq_len,
            targets=targets, world_size=d.world_size, shard_seqs=cfg.shard_seqs, counts={"sequences": n_seqs},
            package_version=__version__, dump_config=cfg.to_dict()), tokenizer)
    decision, message = dist.broadcast_object((decision, message))
    if decision == "error":
        raise PikvError(message)
    if message:
        dist.print0(message)
    if decision == "hit":
        return {"cache_hit": True, "cache_key": key, "out": cfg.out}

    model = M.load_model(folder, cfg.teacher, dtype, device, cfg.device_map)
    mine = Y.group_sample_ids(n_seqs, d.rank, d.world_size)
    cap = M.open_capture(model, targets, cfg.seq_len)
    rich = F.rich_arrays(targets)
    writer = GroupWriter(cfg.out, d.rank, d.world_size, len(mine), seq_len=cfg.seq_len, targets=targets,
                         vocab_size=vocab, shard_seqs=cfg.shard_seqs, cache_key=key)
    first_device = next(model.parameters()).device
    todo = len(mine) - writer.committed
    bar = tqdm(total=todo * cfg.seq_len, unit="tok", unit_scale=True, desc=f"dump (rank 0 of {d.world_size})",
               disable=not d.is_main, dynamic_ncols=True)
    t_loop = time.perf_counter()
    forward_s = 0.0
    for start in range(writer.committed, len(mine), cfg.shard_seqs):
        block = mine[start:start + cfg.shard_seqs]
        parts = []
        for b in range(0, len(block), cfg.batch_size):
            t0 = time.perf_counter()
            rows = block[b:b + cfg.batch_size]
            x = torch.from_numpy(input_ids[rows]).long().to(first_device)
            u = torch.from_numpy(tail_uniforms(key, rows, cfg.seq_len, cfg.sampled_tail)) if cfg.sampled_tail else None
            got = M.logit_targets(model, x, cfg.top_k, cfg.temperatures, u,
                                  forward_kwargs=cap.forward_kwargs() if cap else None)
            if cap:
                got.update(M.rich_targets(cap, *x.shape))
            parts.append({k: v.cpu().numpy() for k, v in got.items()})
            forward_s += time.perf_counter() - t0
            bar.update(x.numel())
        t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays = {F.INPUT_IDS: input_ids[block], F.LOSS_MASK: loss_mask[block], F.SAMPLE_ID: block,
                  F.TNORM: F.encode_tnorm(t["tnorm"], cfg.encoding)}
        if cfg.top_k:
            arrays[F.HEAD_IDS], arrays[F.HEAD_LOGPROBS] = F.encode_head(t["ids"], t["logprobs"], cfg.encoding, vocab)
        if cfg.sampled_tail:
            arrays[F.TAIL_IDS], arrays[F.TAIL_LOGPROBS], arrays[F.TAIL_COUNTS] = F.encode_tail(
                t["tail_ids"], t["tail_logprobs"], cfg.encoding, vocab)
        arrays.update({a.name: t[a.name] for a in rich})  # float32; the writer thread encodes them
        writer.submit(start, arrays)
    committed = writer.close()
    bar.close()
    if cap:
        cap.close()
    loop_s = time.perf_counter() - t_loop
    assert committed == len(mine), (committed, len(mine))

    dist.barrier()  # every rank has committed all of its sequences
    result = {"cache_hit": False, "cache_key": key, "out": cfg.out, "sequences": n_seqs,
              "positions": n_seqs * cfg.seq_len, "loss_tokens": int(loss_mask[:, 1:].sum())}
    per_rank = dist.all_gather_object({"tokens": int(todo * cfg.seq_len), "loop_s": loop_s,
                                       "forward_s": forward_s})
    if d.is_main:
        cache = open_cache(cfg.out, allow_incomplete=True)
        stored = cache.bytes_per_array()
        attrs = dataclasses.replace(
            cache.attrs, counts={"sequences": n_seqs, "positions": result["positions"],
                                 "loss_tokens": result["loss_tokens"]},
            bytes_stored=stored, encoding_errors=encoding_errors(cache),
            complete=True)  # last write of the dump: readers trust the cache from here on
        zarr.open_group(cfg.out, mode="r+").attrs[Y.ROOT_ATTR] = attrs.to_dict()
        tokens = sum(r["tokens"] for r in per_rank)
        seconds = time.perf_counter() - t_start
        result.update({
            "seconds": round(seconds, 2),
            "dump_tokens_per_s": round(tokens / max(max(r["loop_s"] for r in per_rank), 1e-9), 1),
            "compute_tokens_per_s": round(tokens / max(max(r["forward_s"] for r in per_rank), 1e-9), 1),
            "bytes_per_token": {k: round(v / result["positions"], 2) for k, v in stored.items()},
            "encoding_errors": attrs.encoding_errors,
        })
        bpt = result["bytes_per_token"]
        dist.print0(f"dumped {n_seqs} sequences, {result['positions']} tokens in {seconds:.1f}s "
                    f"({result['dump_tokens_per_s']:.0f} tok/s); bytes/token: "
                    + ", ".join(f"{k} {v}" for k, v in bpt.items())
                    + f", total {sum(bpt.values()):.1f}")
    dist.barrier()
    return result


def tail_uniforms(key: str, sample_ids: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """[S, L, n] uniforms in [0, 1) that fix the sampled tail of each sequence: seeded by the cache key
    and the sample id, so a resumed, re-split or re-run dump draws the same tokens."""
    seed = int(key[:16], 16)
    return np.stack([np.random.default_rng([seed, int(i)]).random((seq_len, n), dtype=np.float32)
                     for i in sample_ids])
