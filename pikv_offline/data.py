"""Prepare the data once, on disk: load records, tokenize and pack them into fixed-length sequences.

    prepare(data=..., tokenizer=..., seq_len=1024, ...) -> Prepared (a memory-mapped Arrow dataset)

Tokenizing and packing run as two batched `datasets` maps into the library's own on-disk cache, each
named by a fingerprint of what it depends on (the source files, the tokenizer, the fields and the
packing settings; not ``max_sequences``, not the process count). Tokenizing runs in ``num_proc``
worker processes; packing, vectorized, in one (a worker's shard would start inside a packing
batch, and the rows must not depend on the cores of the machine that prepared them). Documents are
packed in batches of PACK_DOCS (the `group_texts` pattern): concatenated with EOS between them and
cut every ``seq_len`` tokens; a batch's last partial sequence is padded, never dropped. A sequence's
global id is its row in the packed dataset, so the first N rows do not depend on how many are used.
A small index in the datasets cache (pikv-prepared/FP.json) names the packed files of local data, so
a re-run, a resume or another rank of the node opens only those: neither the records nor the
tokenized documents (opening an Arrow file touches every record batch's header).

``loss_mask[t]`` is aligned with the tokens: True when token t is one the student is trained to
predict (every real token of plain text, only assistant tokens of chat data, never padding).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass

import numpy as np

from .errors import PikvError, brief
from .faults import fault

PREP_VERSION = 2  # bump when tokenizing or packing changes what a source becomes
PACK_DOCS = 1000  # documents packed together (one map batch)

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text",
                  ".csv": "csv", ".arrow": "arrow"}

# Used when the tokenizer has no chat template of its own. Newlines are emitted as expressions
# because transformers renders templates with trim_blocks (a newline after a block tag vanishes);
# the header ends with a newline so BPE cannot merge it into the answer's first token. The
# assistant turn ends with EOS so the student learns where an answer stops.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant"}


def _looks_like_path(data: str) -> bool:
    return data.startswith((".", "/", "~")) or os.path.splitext(data)[1].lower() in LOCAL_BUILDERS


def local_files(data: str) -> list[str]:
    """The data files of a local --data file or folder, in a fixed order."""
    path = os.path.expanduser(data)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if os.path.splitext(f)[1].lower() in LOCAL_BUILDERS)
        if not files:
            raise PikvError(f"--data folder {data} holds no {'/'.join(sorted(LOCAL_BUILDERS))} files")
        return files
    return [path]


def _check_utf8(path: str, probe: int = 1 << 20) -> None:
    """Refuse a text file whose first MiB is not UTF-8 (binary data, another encoding), naming where."""
    with open(path, "rb") as f:
        head = f.read(probe)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data" and e.start >= len(head) - 3:
            return  # a character cut by the probe's end
        raise PikvError(f"--data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                        "(e.g. iconv -t utf-8) or leave it out")


def load_records(data: str, split: str = "train", data_config: str | None = None, streaming: bool = False):
    """A ``datasets.Dataset`` from a local file/folder (jsonl, json, parquet, txt, csv, arrow) or a hub name;
    with ``streaming`` a hub dataset comes as an ``IterableDataset`` (read as far as needed, never whole)."""
    import datasets

    datasets.disable_progress_bars()
    path = os.path.expanduser(data)
    if os.path.exists(path):
        files = local_files(data)
        if all(os.path.getsize(f) == 0 for f in files):
            raise PikvError(f"--data {data} is empty")
        kinds = {LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise PikvError(f"--data {data}: use files of one kind among "
                            f"{', '.join(sorted(LOCAL_BUILDERS))}")
        builder = kinds.pop()
        if builder in ("json", "text", "csv"):
            for f in files:
                _check_utf8(f)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error log would precede ours
        try:
            return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
        except Exception as e:
            raise PikvError(f"could not read --data {data} as {builder}: {brief(e)}")
        finally:
            datasets.logging.set_verbosity(level)
    if _looks_like_path(data):
        raise PikvError(f"--data path {data} does not exist")
    try:
        return datasets.load_dataset(data, data_config, split=split, streaming=streaming)
    except Exception as e:
        raise PikvError(f"could not load dataset {data!r} (split {split!r}) from the hub or its local "
                        f"cache: {brief(e)}")


def _normalize_turns(turns, field: str) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise PikvError(f"--chat-field {field!r} must hold a list of {{role, content}} turns")
    out = []
    for t in turns:
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role is None or content is None:
            raise PikvError(f"chat turn {t!r} has no role/content (or from/value) keys")
        if not isinstance(role, str) or not isinstance(content, str):
            raise PikvError(f"chat turn {str(t)[:80]!r}: role and content must be strings; fix the record or drop it")
        out.append({"role": _SHAREGPT_ROLES.get(role, role), "content": content})
    return out


def chat_tokens(tokenizer, turns: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Render a conversation with the chat template; mask = the tokens of assistant turns.

    An assistant turn i spans from the end of the rendering of turns[:i] with the generation prompt
    (so the "assistant" header is not trained) to the end of the rendering of turns[:i+1]. Tokens
    are assigned to spans by their character offsets in the full rendering: a token that overlaps
    an assistant span is trained (a BPE merge across the boundary still predicts assistant text).
    """
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template) if msgs else ""

    full = render(turns, False)
    spans = []
    for i, t in enumerate(turns):
        if t["role"] != "assistant":
            continue
        start, end_text = len(render(turns[:i], True)), render(turns[:i + 1], False)
        if not full.startswith(end_text):
            raise PikvError("the tokenizer's chat template does not render a conversation's prefix as a "
                            "prefix of the whole; cannot locate assistant tokens")
        spans.append((start, len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        mask[j] = e > s and any(s < b and e > a for a, b in spans)
    return ids, mask




_PROBE = 1 << 20  # bytes read at each of a data file's probe points


def source_identity(data: str, split: str, data_config: str | None, records=None) -> str:
    """What the prepared data comes from, the same on every node: for local files their names, sizes and
    17 probes of 1 MiB spread over each (hashing 40 GB of text in full would cost minutes per start);
    for a hub dataset its name, config and split, and the library's fingerprint of it when downloaded."""
    h = hashlib.sha256(json.dumps([split, data_config]).encode())
    path = os.path.expanduser(data)
    if os.path.exists(path):
        root = path if os.path.isdir(path) else os.path.dirname(path)
        for f in local_files(data):
            size = os.path.getsize(f)
            h.update(f"{os.path.relpath(f, root)}:{size}".encode())
            with open(f, "rb") as fh:
                for i in range(17):
                    fh.seek(max(0, (size - _PROBE) * i // 16))
                    h.update(fh.read(_PROBE))
    else:
        h.update(data.encode())
        h.update(str(getattr(records, "_fingerprint", "")).encode())
    return h.hexdigest()


def _tokenize_batch(batch: dict, *, tokenizer, field: str, chat: bool) -> dict:
    """A map over records: token ids and loss mask of each (empty for a blank or skipped record), and
    whether the record was skipped because its text is not a string."""
    ids, masks, skipped = [], [], []
    if chat:
        for turns in batch[field]:
            i, m = chat_tokens(tokenizer, _normalize_turns(turns, field))
            ids.append(i)
            masks.append(m)
            skipped.append(False)
        return {"ids": ids, "mask": masks, "skipped": skipped}
    eos = tokenizer.eos_token_id
    rows = batch[field]
    keep = [j for j, t in enumerate(rows) if isinstance(t, str) and t.strip()]
    encoded = iter(tokenizer([rows[j] for j in keep], add_special_tokens=True)["input_ids"] if keep else [])
    keep = set(keep)
    for j, t in enumerate(rows):
        x = next(encoded) if j in keep else []
        if x and eos is not None and x[-1] != eos:
            x = x + [eos]  # documents are separated by EOS when packed
        ids.append(x)
        masks.append([True] * len(x))
        skipped.append(t is not None and not isinstance(t, str))
    return {"ids": ids, "mask": masks, "skipped": skipped}


def _pack(ids, mask, *, seq_len: int, pad_id: int, pack: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized documents (pyarrow list arrays of ids and masks) -> fixed-length sequences [P, seq_len]:
    the `group_texts` pattern over one batch of PACK_DOCS documents, vectorized. Packed, the documents
    are one stream cut every ``seq_len`` tokens; unpacked, each is cut on its own. A piece shorter than
    ``seq_len`` is padded (mask False); a piece of fewer than 2 tokens predicts nothing and is dropped."""
    import pyarrow.compute as pc

    flat_ids = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    flat_mask = mask.flatten().to_numpy(zero_copy_only=False).astype(bool, copy=False)
    if pack:
        total = len(flat_ids)
        starts = np.arange(0, total, seq_len, dtype=np.int64)
        lengths = np.minimum(seq_len, total - starts)
    else:
        doc_len = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        doc_start = np.cumsum(doc_len) - doc_len
        pieces = -(-doc_len // seq_len)
        j = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece index within its doc
        starts = np.repeat(doc_start, pieces) + j * seq_len
        lengths = np.minimum(seq_len, np.repeat(doc_len, pieces) - j * seq_len)
    keep = lengths >= 2
    starts, lengths = starts[keep], lengths[keep]
    pos = np.arange(seq_len)
    valid = pos[None, :] < lengths[:, None]
    take = (starts[:, None] + pos[None, :])[valid]
    out_ids = np.full((len(starts), seq_len), pad_id, np.int32)
    out_mask = np.zeros((len(starts), seq_len), bool)
    out_ids[valid], out_mask[valid] = flat_ids[take], flat_mask[take]
    return out_ids, out_mask


def _pack_table(table, *, seq_len: int, pad_id: int, pack: bool):
    """The pack map (batches as pyarrow tables): the packed rows of a batch of tokenized documents."""
    import pyarrow as pa

    ids, mask = _pack(table.column("ids").combine_chunks(), table.column("mask").combine_chunks(), seq_len=seq_len,
                      pad_id=pad_id, pack=pack)
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len),
                     "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq_len),
                     "targets": pa.array(mask[:, 1:].sum(1), pa.int32())})


@dataclass
class Prepared:
    """The packed sequences, memory-mapped: rows [0, n) of ``dataset`` (numpy format: input_ids [., L]
    int32, loss_mask [., L] bool); ``fingerprint`` names the preparation (the cache key's data identity)."""
    dataset: object
    n: int
    fingerprint: str
    skipped_records: int

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        got = self.dataset[start:stop]
        return np.asarray(got["input_ids"], np.int32), np.asarray(got["loss_mask"], bool)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (any order), read in ascending order and put back in theirs."""
        uniq, inv = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        got = self.dataset[uniq.tolist()]
        return np.asarray(got["input_ids"], np.int32)[inv], np.asarray(got["loss_mask"], bool)[inv]


def prepare(*, data: str, split: str, data_config: str | None, tokenizer, tokenizer_sha256: str,
            text_field: str | None, chat_field: str | None, seq_len: int, pack: bool,
            max_sequences: int | None = None, num_proc: int | None = None, streaming: bool = False) -> Prepared:
    """Tokenize and pack ``data`` into the datasets cache (or find it there); see the module docstring.
    With ``streaming`` a hub dataset is read only as far as ``max_sequences`` sequences need."""
    import datasets

    field = chat_field or text_field
    if chat_field and not tokenizer.is_fast:
        raise PikvError("chat data needs a fast tokenizer (character offsets locate assistant tokens)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    local = os.path.exists(os.path.expanduser(data)) and not streaming  # its identity needs no loading
    records = None if local else load_records(data, split, data_config, streaming=streaming)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # normalizer, pre- and post-processor, vocab
    settings = {"source": source_identity(data, split, data_config, records), "tokenizer": tokenizer_sha256,
                "tokenizer_pipeline": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None,
                "chat_template": getattr(tokenizer, "chat_template", None) if chat_field else None,
                "field": field, "chat": bool(chat_field), "version": PREP_VERSION}
    tok_fp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    pack_settings = {**settings, "seq_len": seq_len, "pack": pack, "pad_id": pad_id, "pack_docs": PACK_DOCS}
    fp = hashlib.sha256(json.dumps(pack_settings, sort_keys=True).encode()).hexdigest()[:32]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
                                  "loss_mask": datasets.Sequence(datasets.Value("bool"), length=seq_len),
                                  "targets": datasets.Value("int32")})
    tok_kw = {"tokenizer": tokenizer, "field": field, "chat": bool(chat_field)}
    pack_kw = {"seq_len": seq_len, "pad_id": pad_id, "pack": pack}
    found = _find_prepared(fp) if local else None
    if found:  # prepared before: neither the records nor the tokenized documents are opened again
        packed, skipped = found
    elif streaming:
        _check_field(records, field, chat_field)
        if not max_sequences:
            raise PikvError("--streaming reads a hub dataset only as far as needed: give --max-sequences N")
        packed = datasets.Dataset.from_generator(
            _stream_packed, features=features, fingerprint=f"{fp}-{max_sequences}",
            gen_kwargs={"records": records, "tok_kw": tok_kw, "pack_kw": pack_kw, "n": max_sequences})
        skipped = 0
    else:
        records = records if records is not None else load_records(data, split, data_config)
        _check_field(records, field, chat_field)
        procs = max(1, min(num_proc or len(os.sched_getaffinity(0)), len(records) // PACK_DOCS))
        try:
            tokenized = records.map(_tokenize_batch, batched=True, batch_size=PACK_DOCS, fn_kwargs=tok_kw,
                                    remove_columns=records.column_names, num_proc=procs if procs > 1 else None,
                                    new_fingerprint=tok_fp, desc="tokenize")
            # One process: a batch is documents [i*PACK_DOCS, (i+1)*PACK_DOCS) only if no worker's shard
            # starts inside one (datasets cuts shards at len/num_proc), and the packed rows must not depend
            # on the cores of the machine that prepares them. Vectorized, it is a small share of the time.
            packed = tokenized.with_format("arrow").map(
                _pack_table, batched=True, batch_size=PACK_DOCS, fn_kwargs=pack_kw,
                remove_columns=tokenized.column_names, features=features, new_fingerprint=fp, desc="pack")
        except PikvError:
            raise
        except Exception as e:  # e.g. a record that does not decode, or a field of another type
            raise PikvError(f"could not tokenize --data {data}: {brief(e)}")
        skipped = _column_sum(tokenized, "skipped", len(tokenized))
        if local:
            _record_prepared(fp, packed, skipped)
    n = len(packed) if max_sequences is None else min(len(packed), max_sequences)
    if n == 0:
        raise PikvError("the data holds no usable tokens (empty files, empty texts, or every record too short)")
    if _column_sum(packed, "targets", n) == 0:
        raise PikvError("no token of the data is a training target (chat data without assistant turns?)")
    return Prepared(dataset=packed.with_format("numpy"), n=n, fingerprint=fp, skipped_records=skipped)


def prepare_in_child(**kw) -> Prepared:
    """prepare(**kw), the work done in a forked child process, then opened here from the datasets cache.

    Tokenizing and packing read the whole dataset through memory maps and build many small Python
    objects; in a child, neither the pages it read nor its heap (fragmented by then) stay with the
    caller, a dump rank that lives for days. A streamed dataset is prepared here (a second pass would
    stream it again)."""
    if kw.get("streaming"):
        return prepare(**kw)
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the tokenizer and settings are inherited, not pickled
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_prepare_child, args=(kw, send), name="pikv-prepare")  # not daemonic: it has workers
    child.start()
    send.close()
    died = object()
    try:
        # Polled: when the child dies (the OOM killer), its map workers may hold the pipe open, so no EOF comes.
        while not recv.poll(1.0) and child.is_alive():
            pass
        error = recv.recv() if recv.poll(0) else died
    except EOFError:
        error = died
    finally:
        if child.pid is not None:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # its workers, orphaned if it died or we were interrupted
            except (ProcessLookupError, PermissionError):
                pass
        child.join()
    if error is died:
        error = f"the data preparation process died (exit code {child.exitcode}); see its output above"
    if error:
        raise PikvError(error)
    return prepare(**kw)


def _prepare_child(kw: dict, send) -> None:
    os.setpgrp()  # its own process group, with the map workers it starts: killed together
    fault("prepare", 1)  # test hook (PIKV_FAULT=prepare:1): the preparation process dies
    try:
        prepare(**kw)
        send.send(None)
    except PikvError as e:
        send.send(str(e))
    except BaseException as e:  # noqa: BLE001 - the parent says it on one line
        send.send(f"preparing the data failed: {brief(e)}")


def _check_field(records, field: str, chat_field: str | None) -> None:
    columns = list(records.column_names or [])
    if columns and field not in columns:
        flag = "--chat-field" if chat_field else "--text-field"
        raise PikvError(f"{flag} {field!r} is not a column of the data; columns: {', '.join(columns)}")


def _index_path(fp: str) -> tuple[str, str]:
    """(the datasets cache, the file naming the packed dataset of preparation ``fp`` in it)."""
    import datasets

    root = os.path.realpath(str(datasets.config.HF_DATASETS_CACHE))
    return root, os.path.join(root, "pikv-prepared", f"{fp}.json")


def _record_prepared(fp: str, packed, skipped: int) -> None:
    """Name the packed dataset's files (relative to the datasets cache) for the next run's _find_prepared."""
    root, index = _index_path(fp)
    files = [os.path.realpath(f["filename"]) for f in packed.cache_files]
    if not files or not all(f.startswith(root + os.sep) for f in files):
        return  # e.g. caching disabled: nothing lasting to name
    entry = {"files": [os.path.relpath(f, root) for f in files], "sizes": [os.path.getsize(f) for f in files],
             "rows": len(packed), "skipped": skipped}
    try:
        os.makedirs(os.path.dirname(index), exist_ok=True)
        tmp = f"{index}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, index)
    except OSError:
        pass  # a read-only cache: the next run prepares through the maps' own cache lookups


def _find_prepared(fp: str):
    """(packed dataset, skipped records) of preparation ``fp`` when _record_prepared named it and its files
    are there as named (sizes), else None. Only files inside the datasets cache are opened."""
    import datasets

    root, index = _index_path(fp)
    try:
        with open(index) as f:
            entry = json.load(f)
        files = [os.path.realpath(os.path.join(root, rel)) for rel in entry["files"]]
        # the maps name their files by the fingerprint (cache-FP.arrow, cache-FP_00000_of_00002.arrow): files of
        # another preparation, or one file twice, are not this one's rows
        if not files or len(set(files)) != len(files) or not all(
                f.startswith(root + os.sep) and os.path.basename(f).startswith(f"cache-{fp}")
                and os.path.getsize(f) == size for f, size in zip(files, entry["sizes"], strict=True)):
            return None
        parts = [datasets.Dataset.from_file(f) for f in files]
        packed = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(packed) != entry["rows"] or not isinstance(entry["skipped"], int):
            return None
        return packed, entry["skipped"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _column_sum(ds, column: str, n: int) -> int:
    """Sum of a column's first n values, in Arrow (a formatted column read goes row by row in Python)."""
    import pyarrow.compute as pc

    return int(pc.sum(ds.data.column(column).slice(0, n).cast("int64")).as_py() or 0)


def _stream_packed(records, tok_kw: dict, pack_kw: dict, n: int):
    """Packed rows from a streamed dataset, in order, until ``n`` exist (the generator of --streaming)."""
    made, batch = 0, []
    for r in records:
        batch.append(r)
        if len(batch) == PACK_DOCS:
            for row in _packed_rows(_tokenize_batch(_columns(batch), **tok_kw), pack_kw):
                yield row
                made += 1
                if made >= n:
                    return
            batch = []
    if batch:
        for row in _packed_rows(_tokenize_batch(_columns(batch), **tok_kw), pack_kw)[:n - made]:
            yield row


def _columns(records: list[dict]) -> dict:
    return {k: [r.get(k) for r in records] for k in records[0]}


def _packed_rows(tokenized: dict, pack_kw: dict) -> list[dict]:
    import pyarrow as pa

    ids, mask = _pack(pa.array(tokenized["ids"], pa.list_(pa.int32())), pa.array(tokenized["mask"], pa.list_(pa.bool_())),
                      **pack_kw)
    return [{"input_ids": i, "loss_mask": m, "targets": int(m[1:].sum())} for i, m in zip(ids, mask)]


def fingerprint(input_ids: np.ndarray, loss_mask: np.ndarray) -> str:
    """Content hash of packed sequences (a unit's, in the cache): input ids and loss mask."""
    h = hashlib.sha256()
    h.update(str(input_ids.shape).encode())
    h.update(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes())
    h.update(np.packbits(loss_mask).tobytes())
    return h.hexdigest()
