"""Prepare the data once, on disk: load records, tokenize and pack them into fixed-length sequences.

    prepare(data=..., tokenizer=..., seq_len=1024, ...) -> Prepared (a memory-mapped Arrow dataset)

Tokenizing and packing run as two `datasets` maps (batched, ``num_proc`` worker processes) into the
library's own on-disk cache, each named by a fingerprint of what it depends on (the source files,
the tokenizer, the fields and the packing settings; not ``max_sequences``), so a re-run, a resume
or another rank of the same node finds the work done and opens the result. Documents are packed
in batches of PACK_DOCS (the `group_texts` pattern): concatenated with EOS between them and cut
every ``seq_len`` tokens; a batch's last partial sequence is padded, never dropped. A sequence's
global id is its row in the packed dataset, so the first N rows do not depend on how many are used.

``loss_mask[t]`` is aligned with the tokens: True when token t is one the student is trained to
predict (every real token of plain text, only assistant tokens of chat data, never padding).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import PikvError, brief

PREP_VERSION = 1  # bump when tokenizing or packing changes what a source becomes
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


def _pack_batch(batch: dict, *, seq_len: int, pad_id: int, pack: bool) -> dict:
    """A map over tokenized documents: fixed-length sequences (the `group_texts` pattern over one batch)."""
    out_ids, out_mask = [], []

    def emit(ids, mask):
        n = len(ids)
        if n < seq_len:
            ids = np.concatenate([ids, np.full(seq_len - n, pad_id, np.int32)])
            mask = np.concatenate([mask, np.zeros(seq_len - n, bool)])
        out_ids.append(ids)
        out_mask.append(mask)

    docs = [(np.asarray(i, np.int32), np.asarray(m, bool)) for i, m in zip(batch["ids"], batch["mask"]) if len(i)]
    if pack and docs:
        ids, mask = np.concatenate([d[0] for d in docs]), np.concatenate([d[1] for d in docs])
        for s in range(0, len(ids), seq_len):
            if len(ids) - s >= 2:
                emit(ids[s:s + seq_len], mask[s:s + seq_len])
    elif not pack:
        for ids, mask in docs:
            for s in range(0, len(ids), seq_len):
                if len(ids) - s >= 2:
                    emit(ids[s:s + seq_len], mask[s:s + seq_len])
    return {"input_ids": out_ids, "loss_mask": out_mask,
            "targets": [int(m[1:].sum()) for m in out_mask]}


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
    records = load_records(data, split, data_config, streaming=streaming)
    columns = list(records.column_names or [])
    if columns and field not in columns:
        flag = "--chat-field" if chat_field else "--text-field"
        raise PikvError(f"{flag} {field!r} is not a column of the data; columns: {', '.join(columns)}")
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
    if streaming:
        if not max_sequences:
            raise PikvError("--streaming reads a hub dataset only as far as needed: give --max-sequences N")
        packed = datasets.Dataset.from_generator(
            _stream_packed, features=features, fingerprint=f"{fp}-{max_sequences}",
            gen_kwargs={"records": records, "tok_kw": tok_kw, "pack_kw": pack_kw, "n": max_sequences})
        skipped = 0
    else:
        procs = max(1, min(num_proc or len(os.sched_getaffinity(0)), len(records) // PACK_DOCS))
        try:
            tokenized = records.map(_tokenize_batch, batched=True, batch_size=PACK_DOCS, fn_kwargs=tok_kw,
                                    remove_columns=columns, num_proc=procs if procs > 1 else None,
                                    new_fingerprint=tok_fp, desc="tokenize")
            packed = tokenized.map(_pack_batch, batched=True, batch_size=PACK_DOCS, fn_kwargs=pack_kw,
                                   remove_columns=tokenized.column_names, features=features,
                                   num_proc=procs if procs > 1 else None, new_fingerprint=fp, desc="pack")
        except PikvError:
            raise
        except Exception as e:  # e.g. a record that does not decode, or a field of another type
            raise PikvError(f"could not tokenize --data {data}: {brief(e)}")
        skipped = _column_sum(tokenized, "skipped", len(tokenized))
    n = len(packed) if max_sequences is None else min(len(packed), max_sequences)
    if n == 0:
        raise PikvError("the data holds no usable tokens (empty files, empty texts, or every record too short)")
    if _column_sum(packed, "targets", n) == 0:
        raise PikvError("no token of the data is a training target (chat data without assistant turns?)")
    return Prepared(dataset=packed.with_format("numpy"), n=n, fingerprint=fp, skipped_records=skipped)


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
            for row in _rows(_pack_batch(_tokenize_batch(_columns(batch), **tok_kw), **pack_kw)):
                yield row
                made += 1
                if made >= n:
                    return
            batch = []
    if batch:
        for row in _rows(_pack_batch(_tokenize_batch(_columns(batch), **tok_kw), **pack_kw))[:n - made]:
            yield row


def _columns(records: list[dict]) -> dict:
    return {k: [r.get(k) for r in records] for k in records[0]}


def _rows(columns: dict) -> list[dict]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def fingerprint(input_ids: np.ndarray, loss_mask: np.ndarray) -> str:
    """Content hash of packed sequences (a unit's, in the cache): input ids and loss mask."""
    h = hashlib.sha256()
    h.update(str(input_ids.shape).encode())
    h.update(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes())
    h.update(np.packbits(loss_mask).tobytes())
    return h.hexdigest()
