"""Data preparation: the vectorized packing equals the plain loop, and the prepared rows do not depend on
how many processes prepared them (nodes with other core counts must agree, sample id by sample id)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import write_jsonl
from pikv_offline import data as D


def _plain_pack(docs, masks, seq_len, pad_id, pack):
    """The group_texts loop, one piece at a time: the reference."""
    out = []

    def emit(ids, mask):
        ids = list(ids) + [pad_id] * (seq_len - len(ids))
        mask = list(mask) + [False] * (seq_len - len(mask))
        out.append((ids, mask))

    streams = [(sum(docs, []), sum(masks, []))] if pack else list(zip(docs, masks))
    for ids, mask in streams:
        for s in range(0, len(ids), seq_len):
            if len(ids) - s >= 2:
                emit(ids[s:s + seq_len], mask[s:s + seq_len])
    return out


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("seq_len", [2, 7, 16])
def test_vectorized_packing_equals_the_plain_loop(pack, seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = [0, 1, 2, seq_len, seq_len + 1, 3 * seq_len - 1, *rng.integers(0, 40, 50)]
    docs = [rng.integers(0, 500, n).tolist() for n in lengths]
    masks = [(rng.random(n) < 0.7).tolist() for n in lengths]
    ids, mask = D._pack(pa.array(docs, pa.list_(pa.int32())), pa.array(masks, pa.list_(pa.bool_())),
                        seq_len=seq_len, pad_id=3, pack=pack)
    want = _plain_pack(docs, masks, seq_len, 3, pack)
    assert ids.shape == (len(want), seq_len) and ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == [w[0] for w in want] and mask.tolist() == [w[1] for w in want]


@pytest.mark.parametrize("pack", [True, False])
def test_prepared_rows_do_not_depend_on_the_process_count(tokenizer, workdir, pack, monkeypatch):
    """2,500 records: two workers' shards start at record 1,250, inside a packing batch of 1,000."""
    import datasets

    from pikv_offline.modeling import tokenizer_hash

    monkeypatch.setattr(datasets.fingerprint, "_CACHING_ENABLED", False)  # each prepares anew, finds nothing

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "a", "longer-word", "x"]
    data = write_jsonl(workdir / f"procs-{pack}.jsonl",
                       [{"text": " ".join(rng.choice(words, int(rng.integers(1, 30))))} for _ in range(2500)])
    kw = dict(data=data, split="train", data_config=None, tokenizer=tokenizer, tokenizer_sha256=tokenizer_hash(tokenizer),
              text_field="text", chat_field=None, seq_len=24, pack=pack)
    one, two = D.prepare(**kw, num_proc=1), D.prepare(**kw, num_proc=2)
    assert one.fingerprint == two.fingerprint and one.n == two.n
    for a, b in zip(one.rows(0, one.n), two.rows(0, two.n)):
        assert np.array_equal(a, b)


def test_a_damaged_or_hostile_index_is_not_followed(tokenizer, workdir):
    """The index of prepared data is a convenience: one naming files outside the datasets cache, or of
    other sizes, or not JSON, is ignored and the maps' own cache lookups prepare the same rows."""
    import json
    import os

    from pikv_offline.modeling import tokenizer_hash

    data = write_jsonl(workdir / "index.jsonl", [{"text": f"record {i} " + "w " * (i % 9)} for i in range(40)])
    kw = dict(data=data, split="train", data_config=None, tokenizer=tokenizer, tokenizer_sha256=tokenizer_hash(tokenizer),
              text_field="text", chat_field=None, seq_len=16, pack=True)
    first = D.prepare(**kw)
    root, index = D._index_path(first.fingerprint)
    entry = json.load(open(index))
    assert D._find_prepared(first.fingerprint) is not None
    outside = workdir / "outside.arrow"
    outside.write_bytes(b"x" * 10)
    other = write_jsonl(workdir / "index-other.jsonl", [{"text": f"another corpus {i}"} for i in range(30)])
    theirs = json.load(open(D._index_path(D.prepare(**{**kw, "data": other}).fingerprint)[1]))
    for bad in ({**entry, "files": [os.path.relpath(outside, root)], "sizes": [10]}, theirs,
                {**entry, "files": entry["files"] * 2, "sizes": entry["sizes"] * 2, "rows": entry["rows"] * 2},
                {**entry, "sizes": [s + 1 for s in entry["sizes"]]}, {**entry, "rows": "many"}, "not json"):
        with open(index, "w") as f:
            f.write(bad if isinstance(bad, str) else json.dumps(bad))
        assert D._find_prepared(first.fingerprint) is None
        again = D.prepare(**kw)
        assert again.n == first.n and all(np.array_equal(a, b) for a, b in zip(again.rows(0, again.n),
                                                                                first.rows(0, first.n)))
