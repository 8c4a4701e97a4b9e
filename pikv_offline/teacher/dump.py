"""Stage one: run the teacher over the data and write the cache.

    pikv dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    torchrun --nproc-per-node 2 -m pikv_offline dump-teacher --teacher DIR --data corpus.jsonl --out CACHE
    pikv dump-teacher ... --targets hidden:4,8@int8 --targets kv:6 --targets router --max-cache-gb 500

The data is prepared once per node (data.prepare). Rank r of W writes the units cache/layout.py
assigns it that are not committed yet, so a dump resumes at any world size, and the same command
with a larger --max-sequences extends a complete cache. The cache is marked complete by rank 0
after every unit is committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import zarr
from tqdm import tqdm

from .. import __version__, dist, lock, storage
from ..cache import format as F
from ..cache import layout as Y
from ..cache.reader import open_cache, read_root_attrs
from ..cache.verify import check_integrity
from ..cache.writer import UnitWriter, create_arrays, resize_arrays
from ..config import DumpConfig
from ..data import Prepared, prepare, prepare_in_child
from ..errors import PikvError
from ..faults import fault
from ..modeling import resolve_dtype, text_config, tokenizer_hash
from . import model as M
from . import repair as R

def size_check(cfg: DumpConfig, specs: dict) -> str | None:
    """An error message when the cache's estimated size exceeds --max-cache-gb (default: the free disk).

    The estimate is the uncompressed size, an upper bound: compression saves ~2x on the logit head
    but little on dense activations, which are what make a cache too big.
    """
    per_array = {name: int(np.prod(s.shape)) * s.dtype.itemsize for name, s in specs.items()}
    total = sum(per_array.values())
    if cfg.max_cache_gb is not None:
        limit, what = cfg.max_cache_gb * 1e9, f"--max-cache-gb {cfg.max_cache_gb:g}"
    elif storage.is_url(cfg.out):  # an object store has no free space to ask about
        return None
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


def _decide(cfg: DumpConfig, key: str, n_seqs: int) -> tuple[str, str]:
    """Rank 0's view of --out: ('new'|'resume'|'extend'|'hit'|'repair', message) or ('error', message)."""
    out = cfg.out
    if storage.is_url(out):
        if storage.is_object(out):  # a prefix that is an object would be cleared as if it were an empty cache
            return "error", f"--out {out} names an object, not a prefix that can hold a cache; choose another URL"
        empty = not set(storage.names(out) or ()) - {Y.LOCK_FILE}
    else:
        empty = not os.path.exists(out) or (os.path.isdir(out) and not set(os.listdir(out)) - {Y.LOCK_FILE})
    if empty:
        if cfg.repair:
            return "error", f"--repair: --out {out} holds no cache to repair; run the command without --repair to dump"
        return "new", ""
    if cfg.repair and storage.is_url(out):  # damaged units only: repair.py rebuilds a skeleton from a folder's files
        attrs = read_root_attrs(out)
        try:
            ok = attrs is not None and Y.RootAttrs.from_dict(attrs, out).cache_key == key
        except PikvError:
            ok = False
        if not ok:
            return "error", (f"--repair: the root of {out} is damaged, missing or of other inputs; on an object store "
                             "--repair recomputes damaged units of an intact root only: delete the prefix and re-dump")
        return "repair", f"repairing the cache at {out} (its units)"
    if cfg.repair:  # whatever state its skeleton is in (repair.fix_skeleton), if it is this command's cache
        if not os.path.isdir(out):
            return "error", f"--repair: --out {out} is not a folder"
        R.check_ours(out, key, n_seqs)
        return "repair", f"repairing the cache at {out}"
    attrs = read_root_attrs(out) if storage.is_url(out) or os.path.isdir(out) else None
    if attrs is None:
        return "error", (f"--out {out} exists and is not a pikv cache; choose a new or empty folder "
                         "(--overwrite only replaces pikv caches)")
    if attrs.get("cache_key") != key or attrs.get("format_version") != F.FORMAT_VERSION:
        if cfg.overwrite:  # only a cache of other inputs: the same inputs are a hit, a resume or an extension
            return "new", f"replacing the cache at {out} (--overwrite)"
        return "error", (f"--out {out} holds a cache of different inputs (teacher, data or settings "
                         "changed, or an older format); use another --out or pass --overwrite")
    have = Y.RootAttrs.from_dict(attrs, out).n_sequences
    if attrs.get("complete") and n_seqs <= have:
        return "hit", (f"cache hit: {out} is complete for these inputs (key {key}) with {have} sequences"
                       + (f", the first {n_seqs} of them asked for" if n_seqs < have else "") + "; nothing to do")
    if attrs.get("complete"):
        return "extend", f"extending the cache at {out} from {have} to {n_seqs} sequences: only the new units run"
    return "resume", (f"resuming the incomplete cache at {out}"
                      + (f" ({have} sequences asked for before, {n_seqs} now)" if have != n_seqs else ""))


def _create_root(cfg: DumpConfig, attrs: Y.RootAttrs, tokenizer, vocab: int) -> None:
    for name in storage.names(cfg.out) or ():  # an old cache (--overwrite), not the lock this dump holds
        if name != Y.LOCK_FILE:
            storage.remove(cfg.out, name)
    # created, not opened with mode "w": that clears the whole store, this dump's lock (or lease) with it
    zarr.create_group(storage.zarr_store(cfg.out, read_only=False), attributes={Y.ROOT_ATTR: attrs.to_dict()},
                      overwrite=False)
    create_arrays(cfg.out, attrs.n_sequences, seq_len=attrs.seq_len, targets=attrs.targets, vocab_size=vocab,
                  unit_seqs=attrs.unit_seqs)
    if not storage.is_url(cfg.out):
        tokenizer.save_pretrained(os.path.join(cfg.out, Y.TOKENIZER_DIR))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.put_folder(tmp, cfg.out, Y.TOKENIZER_DIR)


def _regrow(cfg: DumpConfig, n_seqs: int, data_info: dict) -> None:
    """An incomplete or extended cache to ``n_seqs`` sequences, marked incomplete until the new units are in."""
    root = zarr.open_group(storage.zarr_store(cfg.out, read_only=False), mode="r+")
    attrs = Y.RootAttrs.from_dict(dict(root.attrs[Y.ROOT_ATTR]), cfg.out)
    if attrs.n_sequences != n_seqs:
        for u in Y.committed_units(cfg.out):  # a shrunk dump's markers beyond the new end would be stale
            if u >= Y.n_units(n_seqs, attrs.unit_seqs):
                Y.remove_marker(cfg.out, u)
        resize_arrays(cfg.out, n_seqs, attrs.targets)
    root.attrs[Y.ROOT_ATTR] = dataclasses.replace(attrs, complete=False, counts={"sequences": n_seqs},
                                                  data=data_info, content_sha256=None).to_dict()


def _prepare(cfg: DumpConfig, d: dist.Dist, tokenizer, tok_hash: str) -> Prepared:
    """The packed data, prepared once per node: local rank 0 tokenizes and packs into the datasets cache
    while the node's other ranks wait, then they open it. A failure on any rank stops every rank."""
    kw = dict(data=cfg.data, split=cfg.split, data_config=cfg.data_config, tokenizer=tokenizer,
              tokenizer_sha256=tok_hash, text_field=cfg.text_field, chat_field=cfg.chat_field, seq_len=cfg.seq_len,
              pack=cfg.pack, max_sequences=cfg.max_sequences, num_proc=cfg.num_proc, streaming=cfg.streaming)
    prep = None
    for turn in (0, 1):  # turn 0: local rank 0 of each node; turn 1: the others, from its cache
        error = None
        if (d.local_rank == 0) == (turn == 0):
            try:
                prep = prepare_in_child(**kw) if turn == 0 else prepare(**kw)
            except PikvError as e:
                error = str(e)
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise PikvError(errors[0])
    return prep


def run(cfg: DumpConfig) -> dict:
    d = dist.init(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            return _run(cfg, d, held)
    finally:
        dist.teardown()


def _run(cfg: DumpConfig, d: dist.Dist, held: contextlib.ExitStack) -> dict:
    t_start = time.perf_counter()
    if cfg.device_map and d.world_size > 1:
        raise PikvError("--device-map auto spreads one teacher over the visible GPUs in one process; "
                        "run it without torchrun")
    folder = M.resolve_teacher(cfg.teacher)
    config = M.load_config(folder, cfg.teacher, cfg.trust_remote_code)
    tokenizer = M.load_tokenizer(folder, cfg.teacher, cfg.trust_remote_code)
    vocab = int(text_config(config).vocab_size)
    ctx = M.context_length(config)
    if ctx is not None and cfg.seq_len > ctx:
        raise PikvError(f"--seq-len {cfg.seq_len} exceeds the teacher's context of {ctx} tokens; "
                        f"use --seq-len {ctx} or less")
    if cfg.top_k > vocab:
        raise PikvError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary of {vocab}; use --top-k {vocab} or less")
    if cfg.sampled_tail and cfg.top_k >= vocab:
        raise PikvError(f"--sampled-tail {cfg.sampled_tail} needs a tail: --top-k {cfg.top_k} covers the whole "
                        f"vocabulary of {vocab}; lower --top-k or give --sampled-tail 0")
    if len(tokenizer) > vocab:
        raise PikvError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary is {vocab}; "
                        "they do not belong together")

    tok_hash = tokenizer_hash(tokenizer)
    prep = _prepare(cfg, d, tokenizer, tok_hash)
    n_seqs, unit_seqs = prep.n, cfg.shard_seqs
    if prep.skipped_records:
        dist.print0(f"skipped {prep.skipped_records} records whose {cfg.text_field!r} is not text")
    device = d.device if not cfg.device_map else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    teacher_info = {"name": cfg.teacher, "weights_sha256": M.weights_identity(folder),
                    "config_sha256": hashlib.sha256(json.dumps(  # not its folder: the same teacher anywhere
                        {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}, sort_keys=True,
                        default=str).encode()).hexdigest(),
                    "model_type": config.model_type, "vocab_size": vocab,
                    "num_layers": M.layer_count(config), "dtype": dtype_name}
    data_info = {"data": cfg.data, "split": cfg.split, "data_config": cfg.data_config,
                 "text_field": cfg.text_field, "chat_field": cfg.chat_field, "pack": cfg.pack,
                 "max_sequences": cfg.max_sequences, "fingerprint": prep.fingerprint}
    targets = {"logits": {"top_k": cfg.top_k, "temperatures": list(cfg.temperatures), "encoding": cfg.encoding,
                          "id_dtype": F.id_dtype(vocab).name, "sampled_tail": cfg.sampled_tail,
                          **({"tail_temperatures": list(cfg.tail_temperatures)} if cfg.sampled_tail else {})},
               **M.plan_targets(config, cfg.targets, cfg.teacher, cfg.trust_remote_code)}
    key = Y.cache_key(teacher=teacher_info, tokenizer_sha256=tok_hash, data=prep.fingerprint, seq_len=cfg.seq_len,
                      targets=targets)

    decision, message = None, None
    if d.is_main:  # rank 0 alone looks at and sets up --out; a failure there must reach every rank
        try:
            decision, message = _decide(cfg, key, n_seqs)
            if decision in ("new", "extend"):  # a hit or a resume writes no more than asked before
                too_big = size_check(cfg, F.array_specs(n_seqs, cfg.seq_len, targets, vocab, unit_seqs))
                decision, message = ("error", too_big) if too_big else (decision, message)
            if decision in ("new", "resume", "extend", "repair"):  # writing: one dump at a time, decided again
                if not storage.is_url(cfg.out):
                    os.makedirs(cfg.out, exist_ok=True)
                held.enter_context(lock.hold_at(cfg.out, Y.LOCK_FILE, what=f"--out {cfg.out}", by="dump"))
                decision, message = _decide(cfg, key, n_seqs)
            fresh = Y.RootAttrs(
                format_version=F.FORMAT_VERSION, complete=False, cache_key=key, teacher=teacher_info,
                tokenizer_sha256=tok_hash, tokenizer_dir=Y.TOKENIZER_DIR, data=data_info, seq_len=cfg.seq_len,
                targets=targets, unit_seqs=unit_seqs, counts={"sequences": n_seqs}, package_version=__version__,
                dump_config=cfg.to_dict())
            if decision == "new":
                _create_root(cfg, fresh, tokenizer, vocab)
            elif decision in ("extend", "resume"):
                _regrow(cfg, n_seqs, data_info)
            elif decision == "repair" and not storage.is_url(cfg.out):
                message = "\n".join([message, *(f"repair: {n}" for n in R.fix_skeleton(cfg.out, fresh, tokenizer,
                                                                                          vocab, cfg.trust_remote_code))])
        except PikvError as e:
            decision, message = "error", str(e)
        except OSError as e:  # a read-only or full --out
            decision, message = "error", f"cannot set up --out {cfg.out}: {e}"
    decision, message = dist.broadcast_object((decision, message))
    if decision == "error":
        raise PikvError(message)
    if message:
        dist.print0(message)
    if decision == "hit":
        return {"cache_hit": True, "cache_key": key, "out": cfg.out}
    if decision == "repair" and not _repair_units(cfg, d, prep):
        return _verified(cfg, d, {"cache_hit": True, "cache_key": key, "out": cfg.out, "units_written": 0})
    unit_seqs = Y.RootAttrs.from_dict(read_root_attrs(cfg.out), cfg.out).unit_seqs  # a resume keeps its units
    if unit_seqs != cfg.shard_seqs:
        dist.print0(f"--shard-size {cfg.shard_seqs} does not apply: the cache at --out keeps its units of {unit_seqs} "
                    "sequences")

    todo = [u for u in Y.rank_units(n_seqs, unit_seqs, d.rank, d.world_size)
            if not _committed(cfg.out, u, n_seqs, unit_seqs, key)]
    model = M.load_model(folder, cfg.teacher, dtype, device, cfg.device_map, cfg.trust_remote_code)
    cap = M.open_capture(model, targets, cfg.seq_len)
    writer = UnitWriter(cfg.out, n_seqs=n_seqs, unit_seqs=unit_seqs, targets=targets, cache_key=key)
    first_device = next(model.parameters()).device
    tokens_todo = sum(b - a for a, b in (Y.unit_range(u, n_seqs, unit_seqs) for u in todo)) * cfg.seq_len
    bar = tqdm(total=tokens_todo, unit="tok", unit_scale=True, desc=f"dump (rank 0 of {d.world_size})",
               disable=not d.is_main, dynamic_ncols=True)
    t_loop = time.perf_counter()
    fault("forward", 1)  # test and bench hook (PIKV_FAULT=forward:1): killed before the first forward
    try:
        forward_s = _dump_units(cfg, todo, prep, model, cap, writer, bar, key, vocab, n_seqs, unit_seqs, first_device)
    except OSError as e:
        if not _disk_full(e):
            raise
        bar.close()
        raise PikvError(_disk_full_message(cfg, targets, vocab, n_seqs, unit_seqs, key)) from None
    bar.close()
    if cap:
        cap.close()
    loop_s = time.perf_counter() - t_loop

    dist.barrier()  # every rank has committed all of its units
    per_rank = dist.all_gather_object({"tokens": tokens_todo, "loop_s": loop_s, "forward_s": forward_s,
                                       "units": len(todo)})
    result = {"cache_hit": False, "cache_key": key, "out": cfg.out, "sequences": n_seqs,
              "positions": n_seqs * cfg.seq_len, "units_written": sum(r["units"] for r in per_rank)}
    done = None
    if d.is_main:
        try:
            done = _complete(cfg.out, key)
        except PikvError as e:
            done = str(e)
        except OSError as e:  # e.g. the disk filled at the last write: every unit is committed, re-run to finish
            done = f"could not mark --out {cfg.out} complete ({e.strerror}); free space and re-run the same command"
    done = dist.broadcast_object(done)
    if isinstance(done, str):
        raise PikvError(done)
    result.update(done)
    if d.is_main:
        tokens = sum(r["tokens"] for r in per_rank)
        seconds = time.perf_counter() - t_start
        result.update({
            "seconds": round(seconds, 2),
            "dump_tokens_per_s": round(tokens / max(max(r["loop_s"] for r in per_rank), 1e-9), 1),
            "compute_tokens_per_s": round(tokens / max(max(r["forward_s"] for r in per_rank), 1e-9), 1),
        })
        bpt = result["bytes_per_token"]
        dist.print0(f"dumped {n_seqs} sequences ({result['units_written']} units written now), "
                    f"{result['positions']} tokens in {seconds:.1f}s ({result['dump_tokens_per_s']:.0f} tok/s); "
                    "bytes/token: " + ", ".join(f"{k} {v}" for k, v in bpt.items())
                    + f", total {sum(bpt.values()):.1f}")
    dist.barrier()
    return _verified(cfg, d, result) if decision == "repair" else result


def _repair_units(cfg: DumpConfig, d: dist.Dist, prep: Prepared) -> bool:
    """Every rank checks its share of the units; rank 0 un-commits the damaged ones. Whether any unit
    is left to write (damaged, or never committed)."""
    try:
        bad, error = R.find_damaged(cfg.out, prep, d.rank, d.world_size), None
    except PikvError as e:
        bad, error = {}, str(e)
    got = dist.all_gather_object((bad, error))
    errors = [e for _, e in got if e]
    if errors:
        raise PikvError(errors[0])
    bad = {u: why for b, _ in got for u, why in b.items()}
    left = None
    if d.is_main:
        try:
            attrs = Y.RootAttrs.from_dict(read_root_attrs(cfg.out), cfg.out)
            if bad:
                dist.print0(f"repair: {R.describe_damage(attrs, bad)}; recomputing them")
                R.uncommit(cfg.out, sorted(bad))
            left = bool(bad) or not attrs.complete
        except PikvError as e:
            left = str(e)
        except OSError as e:
            left = f"--repair: cannot un-commit the damaged units at --out {cfg.out} ({e})"
    left = dist.broadcast_object(left)
    if isinstance(left, str):
        raise PikvError(left)
    if not left:
        dist.print0("repair: every unit checks out; nothing to recompute")
    return left


def _verified(cfg: DumpConfig, d: dist.Dist, result: dict) -> dict:
    """A repair ends with verify's full check (rank 0)."""
    error = None
    if d.is_main:
        try:
            result["verify"] = check_integrity(cfg.out, cfg.trust_remote_code)
            dist.print0(f"repair: verify passed ({result['verify']['units']} units)")
        except PikvError as e:
            error = f"--repair finished but verify fails: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise PikvError(error)
    return result


def _complete(out: str, key: str) -> dict:
    """Rank 0, after every rank committed its units: check every marker, sum the counts, errors and
    bytes, and mark the cache complete (its last write: readers trust the cache from here on)."""
    cache = open_cache(out, allow_incomplete=True)
    a = cache.attrs
    loss_tokens, hashes, errors = 0, [], {}
    for u in range(a.n_units):
        m = Y.read_marker(out, u)
        if m is None or not m.holds(u, a.n_sequences, a.unit_seqs, key):
            raise PikvError(f"{out}: unit {u} was not committed by any rank (marker {m}); re-run the dump")
        loss_tokens += m.loss_tokens
        hashes.append(m.sha256)
        for target, e in m.encoding_errors.items():
            errors[target] = F.merge_errors(errors.get(target), e)
    stored = cache.bytes_per_array()
    positions = a.n_sequences * a.seq_len
    attrs = dataclasses.replace(a, counts={"sequences": a.n_sequences, "positions": positions,
                                           "loss_tokens": loss_tokens},
                                content_sha256=Y.content_sha256(hashes), bytes_stored=stored,
                                encoding_errors={k: F.error_summary(v) for k, v in sorted(errors.items())},
                                complete=True)
    fault("complete", 1)
    zarr.open_group(storage.zarr_store(out, read_only=False), mode="r+").attrs[Y.ROOT_ATTR] = attrs.to_dict()
    return {"loss_tokens": loss_tokens, "bytes_per_token": {k: round(v / positions, 2) for k, v in stored.items()},
            "encoding_errors": attrs.encoding_errors}


def _dump_units(cfg: DumpConfig, todo: list[int], prep: Prepared, model, cap, writer: UnitWriter, bar, key: str,
                vocab: int, n_seqs: int, unit_seqs: int, first_device) -> float:
    """Run the teacher over this rank's units and hand each to the writer; returns the seconds spent in
    the forward passes (and target computation)."""
    rich = writer.rich
    forward_s = 0.0
    for u in todo:
        start, stop = Y.unit_range(u, n_seqs, unit_seqs)
        block = Y.unit_sample_ids(u, n_seqs, unit_seqs, Y.order_seed(prep.fingerprint))
        input_ids, loss_mask = prep.take(block)
        parts = []
        for b in range(0, len(block), cfg.batch_size):  # batches fixed by the unit: the same at any world size
            t0 = time.perf_counter()
            x = torch.from_numpy(input_ids[b:b + cfg.batch_size]).long().to(first_device)
            rows = block[b:b + cfg.batch_size]
            g = torch.from_numpy(tail_uniforms(key, rows, cfg.seq_len, cfg.sampled_tail)) if cfg.sampled_tail else None
            got = M.logit_targets(model, x, cfg.top_k, cfg.temperatures, g, tail_temperatures=cfg.tail_temperatures,
                                  forward_kwargs=cap.forward_kwargs() if cap else None)
            if cap:
                got.update(M.rich_targets(cap, *x.shape))
            parts.append({k: v.cpu().numpy() for k, v in got.items()})
            forward_s += time.perf_counter() - t0
            bar.update(x.numel())
        t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays = {F.INPUT_IDS: input_ids, F.LOSS_MASK: loss_mask, F.SAMPLE_ID: block,
                  F.TNORM: F.encode_tnorm(t["tnorm"], cfg.encoding)}
        if cfg.top_k:
            arrays[F.HEAD_IDS], arrays[F.HEAD_LOGPROBS] = F.encode_head(t["ids"], t["logprobs"], cfg.encoding, vocab)
        if cfg.sampled_tail:
            arrays[F.TAIL_IDS], arrays[F.TAIL_LOGPROBS], arrays[F.TAIL_COUNTS] = F.encode_tail(
                t["tail_ids"], t["tail_logprobs"], cfg.encoding, vocab)
        arrays.update({a.name: t[a.name] for a in rich})  # float32; the writer thread encodes them
        writer.submit(u, arrays)
    writer.close()
    return forward_s


def _committed(out: str, u: int, n_seqs: int, unit_seqs: int, key: str, say: bool = True) -> bool:
    """Whether unit ``u`` is committed; a damaged marker (markers are written atomically, so not by a crash)
    is not, and ``say`` says the unit is written again."""
    try:
        return Y.is_committed(out, u, n_seqs, unit_seqs, key)
    except PikvError:
        if say:
            print(f"the marker of unit {u} is damaged ({storage.join(out, Y.marker_name(u))}): writing the unit "
                  "again", flush=True)
        return False


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full_message(cfg: DumpConfig, targets: dict, vocab: int, n_seqs: int, unit_seqs: int, key: str) -> str:
    units = Y.n_units(n_seqs, unit_seqs)
    left = [u for u in range(units) if not _committed(cfg.out, u, n_seqs, unit_seqs, key, say=False)]
    per_unit = sum(int(np.prod(s.shape[1:])) * s.dtype.itemsize * unit_seqs
                   for s in F.array_specs(n_seqs, cfg.seq_len, targets, vocab, unit_seqs).values())
    free = shutil.disk_usage(cfg.out).free
    size = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"  # noqa: E731
    return (f"the disk at --out {cfg.out} is full ({size(free)} free): about {size(len(left) * per_unit)} more are "
            f"needed for the {len(left)} units not committed yet (uncompressed, an upper bound); free space and "
            f"re-run the same command: the {units - len(left)} committed units are kept")


def tail_uniforms(key: str, sample_ids: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """[S, L, n] uniforms in [0, 1) that fix the sampled tail of each sequence: seeded by the cache key
    and the sample id, so a resumed, re-split or re-run dump draws the same tokens."""
    seed = int(key[:16], 16)
    return np.stack([np.random.default_rng([seed, int(i)]).random((seq_len, n), dtype=np.float32)
                     for i in sample_ids])
