"""Load text or chat records, tokenize, and pack them into fixed-length sequences.

A sequence's global id is its index in the packed stream, which depends only on the data, the
tokenizer and the packing settings; the cache key hashes the packed tokens themselves, so ids are
stable exactly when the content is.

``loss_mask[t]`` is aligned with the tokens: True when token t is one the student is trained to
predict (every real token of plain text, only assistant tokens of chat data, never padding).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import numpy as np

from .errors import PikvError, brief

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


def load_records(data: str, split: str = "train", data_config: str | None = None):
    """A ``datasets.Dataset`` from a local file/folder (jsonl, json, parquet, txt, csv, arrow) or a hub name."""
    import datasets

    datasets.disable_progress_bars()
    path = os.path.expanduser(data)
    if os.path.exists(path):
        if os.path.isdir(path):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if os.path.splitext(f)[1].lower() in LOCAL_BUILDERS)
            if not files:
                raise PikvError(f"--data folder {data} holds no {'/'.join(sorted(LOCAL_BUILDERS))} files")
        else:
            files = [path]
        if all(os.path.getsize(f) == 0 for f in files):
            raise PikvError(f"--data {data} is empty")
        kinds = {LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise PikvError(f"--data {data}: use files of one kind among "
                            f"{', '.join(sorted(LOCAL_BUILDERS))}")
        builder = kinds.pop()
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
        except Exception as e:
            raise PikvError(f"could not read --data {data} as {builder}: {brief(e)}")
    if _looks_like_path(data):
        raise PikvError(f"--data path {data} does not exist")
    try:
        return datasets.load_dataset(data, data_config, split=split)
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


def iter_documents(ds, tokenizer, text_field: str | None, chat_field: str | None,
                   batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (token ids int32, loss mask bool) per record."""
    field = chat_field or text_field
    if field not in ds.column_names:
        flag = "--chat-field" if chat_field else "--text-field"
        raise PikvError(f"{flag} {field!r} is not a column of the data; columns: {', '.join(ds.column_names)}")
    if chat_field and not tokenizer.is_fast:
        raise PikvError("chat data needs a fast tokenizer (character offsets locate assistant tokens)")
    eos = tokenizer.eos_token_id
    for lo in range(0, len(ds), batch):
        rows = ds[lo:lo + batch][field]
        if chat_field:
            for turns in rows:
                ids, mask = chat_tokens(tokenizer, _normalize_turns(turns, field))
                if len(ids):
                    yield ids, mask
            continue
        texts = [t for t in rows if isinstance(t, str) and t.strip()]
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]  # documents are separated by EOS when packed
            yield np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)


def build_sequences(docs: Iterator[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                    pack: bool = True, max_sequences: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Packed (documents concatenated and cut every seq_len) or per-document (split, last padded).

    Returns input_ids [N, seq_len] int32 and loss_mask [N, seq_len] bool. A trailing partial
    sequence is padded (mask False) rather than dropped. Stops reading documents once
    ``max_sequences`` full sequences exist.
    """
    seqs_ids, seqs_mask = [], []
    buf_ids, buf_mask, buffered = [], [], 0

    def emit(ids, mask):
        n = len(ids)
        if n < seq_len:
            ids = np.concatenate([ids, np.full(seq_len - n, pad_id, np.int32)])
            mask = np.concatenate([mask, np.zeros(seq_len - n, bool)])
        seqs_ids.append(ids)
        seqs_mask.append(mask)

    def full() -> bool:
        return max_sequences is not None and len(seqs_ids) >= max_sequences

    for ids, mask in docs:
        if pack:
            buf_ids.append(ids)
            buf_mask.append(mask)
            buffered += len(ids)
            if buffered >= seq_len:
                cat_ids, cat_mask = np.concatenate(buf_ids), np.concatenate(buf_mask)
                cut = (len(cat_ids) // seq_len) * seq_len
                for s in range(0, cut, seq_len):
                    emit(cat_ids[s:s + seq_len], cat_mask[s:s + seq_len])
                buf_ids, buf_mask = [cat_ids[cut:]], [cat_mask[cut:]]
                buffered = len(cat_ids) - cut
        else:
            for s in range(0, len(ids), seq_len):
                if len(ids) - s >= 2:
                    emit(ids[s:s + seq_len], mask[s:s + seq_len])
        if full():
            break
    if pack and buffered >= 2 and not full():
        emit(np.concatenate(buf_ids), np.concatenate(buf_mask))
    if not seqs_ids:
        raise PikvError("the data holds no usable tokens (empty files, empty texts, or every record too short)")
    if max_sequences is not None:
        seqs_ids, seqs_mask = seqs_ids[:max_sequences], seqs_mask[:max_sequences]
    input_ids, loss_mask = np.stack(seqs_ids), np.stack(seqs_mask)
    if not loss_mask.any():
        raise PikvError("no token of the data is a training target (chat data without assistant turns?)")
    return input_ids, loss_mask


def fingerprint(input_ids: np.ndarray, loss_mask: np.ndarray) -> str:
    """Content hash of the packed sequences: the data identity that enters the cache key."""
    h = hashlib.sha256()
    h.update(str(input_ids.shape).encode())
    h.update(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes())
    h.update(np.packbits(loss_mask).tobytes())
    return h.hexdigest()
